"""The cluster's network: Linux network namespaces ("hosts") joined by veth pairs to one
bridge, on 10.77.0.0/24, a subnet that exists only on that bridge and inside the namespaces
and is routed nowhere else. The machine's own side of the bridge (10.77.0.1) is where
PostgreSQL, Redis and the provider emulators answer the hosts.

Every name this module makes starts with `clr-`: `clean()` removes whatever a run left behind
(processes in the namespaces, the namespaces, the links, the bridge), and runs before a cluster
is built, when it is torn down, and from `make cluster`'s trap on failure or Ctrl-C. As a
command: `python -m tests.cluster.net clean`. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "clr-"
BRIDGE = "clr-br"
SUBNET = "10.77.0"
GATEWAY = f"{SUBNET}.1"


def ip(*args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def namespaces() -> list[str]:
    """The namespaces of ours that exist now."""
    return [
        line.split()[0]
        for line in ip("netns", "list", check=False).splitlines()
        if line.startswith(PREFIX)
    ]


def links() -> list[str]:
    """The links of ours in the machine's namespace (bridge and host ends of veth pairs)."""
    names = []
    for line in ip("-o", "link", "show", check=False).splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0]
        if name.startswith(PREFIX):
            names.append(name)
    return names


def pids_in(namespace: str) -> list[int]:
    return [int(p) for p in ip("netns", "pids", namespace, check=False).split()]


def kill_all_in(namespace: str) -> None:
    """SIGKILL every process in the namespace (a host's power cut) and wait until none is left."""
    deadline = time.monotonic() + 10
    while pids := pids_in(namespace):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in {namespace} survived SIGKILL")
        time.sleep(0.05)


def forwarders() -> list[int]:
    """The socat forwarders of a cluster (tests/cluster/harness.py), which run in the
    machine's own namespace, bound to the bridge address."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"socat") and any(f"bind={GATEWAY},".encode() in a for a in argv):
            found.append(int(entry.name))
    return found


def clean() -> list[str]:
    """Remove everything of ours, going on past what fails; returns what was removed (empty on
    a clean machine) and raises at the end if something could not be."""
    removed, failed = [], []
    for pid in forwarders():
        try:
            os.kill(pid, signal.SIGKILL)
            removed.append(f"forwarder {pid}")
        except ProcessLookupError:
            pass
    for namespace in namespaces():
        try:
            kill_all_in(namespace)
        except RuntimeError as exc:
            failed.append(str(exc))
        ip("netns", "delete", namespace, check=False)
        removed.append(f"netns {namespace}")
    # Deleting a namespace deletes the ends inside it, and with them their peers; what is
    # left is the bridge and any pair whose namespace end never moved.
    for link in links():
        ip("link", "delete", link, check=False)
        removed.append(f"link {link}")
    left = namespaces() + links()
    if failed or left:
        raise RuntimeError(f"the cluster's clean-up left {left}: {'; '.join(failed)}")
    return removed


@dataclass(frozen=True)
class Host:
    """One namespace: a name (api1, worker2, ...) and its address on the bridge."""

    name: str
    address: str

    @property
    def namespace(self) -> str:
        return PREFIX + self.name

    @property
    def outer(self) -> str:
        """The veth end on the bridge: down means the host is cut off."""
        return f"{PREFIX}h-{self.name}"[:15]

    def argv(self, argv: list[str]) -> list[str]:
        """A command run inside the host."""
        return ["ip", "netns", "exec", self.namespace, *argv]


class Network:
    """The bridge and the hosts on it."""

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}

    def up(self) -> Network:
        if os.geteuid() != 0:
            raise PermissionError("the cluster needs root: network namespaces and links")
        clean()
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        return self

    def add(self, name: str, octet: int) -> Host:
        host = Host(name, f"{SUBNET}.{octet}")
        inner = f"{PREFIX}n-{name}"[:15]
        ip("netns", "add", host.namespace)
        ip("link", "add", host.outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", host.namespace)
        ip("link", "set", host.outer, "master", BRIDGE)
        ip("link", "set", host.outer, "up")
        inside = ["-n", host.namespace]
        ip(*inside, "link", "set", inner, "name", "eth0")
        ip(*inside, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip(*inside, "link", "set", "eth0", "up")
        ip(*inside, "link", "set", "lo", "up")
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Take the host's link down: it runs on, reaching nothing and reached by nothing."""
        ip("link", "set", host.outer, "down")

    def restore(self, host: Host) -> None:
        ip("link", "set", host.outer, "up")

    def down(self) -> None:
        clean()
        self.hosts.clear()


if __name__ == "__main__":
    if sys.argv[1:] != ["clean"]:
        sys.exit("usage: python -m tests.cluster.net clean")
    for line in clean():
        print(f"removed {line}")
