"""Clarion across hosts: what a scenario of tests/cluster builds on the network of net.py.

- The machine's side of the bridge (10.77.0.1): PostgreSQL and Redis (the suite's own, each
  reached through a socat forwarder bound to the bridge address, so the hosts see them as
  remote servers), and the provider emulators.
- `lb` (10.77.0.2): HAProxy, round robin over the API hosts with health checks, no sticky
  sessions; WebSocket upgrades pass through it.
- `api1`, `api2`: uvicorn on project.asgi (API and WebSocket server).
- `relay1`, `relay2`: the outbox relay.
- `sched`: beat and the maintenance pool (the sweeper, provider events); the relays release
  scheduled deliveries.
- `worker1`, `worker2`: a pool per channel queue (email, sms, push, web).
- `clients`: the WebSocket clients.

Each host has its own directory (its `var/`, its Prometheus multiprocess directory, its
logs) and its own environment; nothing is shared but the network."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings

from tests.chaos.harness import worker_argv
from tests.clock import FAKETIME_LIBRARY
from tests.cluster.net import GATEWAY, Host, Network, kill_all_in, pids_in
from tests.conftest import BIN, ROOT, Process, process_env, wait_until

LB_PORT = 8000
API_PORT = 8000

# Addresses on the bridge, by host name.
ADDRESSES = {
    "lb": 2,
    "api1": 11,
    "api2": 12,
    "relay1": 21,
    "relay2": 22,
    "sched": 31,
    "worker1": 41,
    "worker2": 42,
    "clients": 51,
}
CHANNEL_POOLS = ("email", "sms", "push", "web")

# Short leases and a fast sweeper, as tests/chaos runs them: a lost message or a dead
# worker's lease comes back within seconds, not minutes.
CLUSTER_ENV = {
    "DELIVERY_LEASE_SECONDS": "10",
    "SWEEPER_INTERVAL_SECONDS": "1",
    "SWEEPER_STALE_SECONDS": "15",
    "RATE_LIMITS": "email=600000/m,sms=10000/s,push=10000/s,web=10000/s",
    "API_RATE_LIMIT_PER_SECOND": "0",
    # A request whose API host died holds its Idempotency-Key this long (409 to retries).
    "IDEMPOTENCY_LOCK_SECONDS": "10",
    "LOG_LEVEL": "INFO",
    # Each process keeps its PostgreSQL connections, as in production (tests/conftest.py's
    # processes open one per request instead).
    "DATABASE_POOL": "true",
}


DEFAULT_PORTS = {"postgres": 5432, "postgresql": 5432, "redis": 6379, "amqp": 5672}


def _servers() -> dict[str, str]:
    """The suite's database, cache and broker URLs, which the cluster's hosts reach through
    forwarders on the bridge address."""
    return {
        "DATABASE_URL": process_env(Path("."))["DATABASE_URL"],
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
    }


def requirements() -> list[str]:
    """What this machine or this configuration lacks for a cluster run; empty when it can run
    one."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces)")
    for tool in ("ip", "haproxy", "socat"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if not FAKETIME_LIBRARY.exists():
        missing.append(f"libfaketime ({FAKETIME_LIBRARY})")
    for name, url in _servers().items():
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            missing.append(f"{name} on a TCP server (PostgreSQL, Redis or RabbitMQ), not {url}")
    return missing


def require_cluster() -> None:
    """Fail (on CI) or skip (elsewhere: the embedded SQLite and Redis of `make test`, or no
    root) when a cluster cannot run here."""
    missing = requirements()
    if missing:
        why = f"the cluster needs {'; '.join(missing)} (make cluster installs the tools)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def _moved(url: str, host: str, port: int | None = None) -> str:
    """`url` with its host (and port) replaced: the address the hosts reach it at."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{host}:{port or parts.port or DEFAULT_PORTS[parts.scheme]}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc}" if userinfo else netloc))


@dataclass
class Cluster:
    """The network, the forwarders, and every host process, with the log of each."""

    spawn: Callable[..., Process]
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    network: Network = field(default_factory=Network)
    forwarded: list[int] = field(default_factory=list)
    processes: dict[str, list[Process]] = field(default_factory=dict)

    # --- building ------------------------------------------------------------------------

    def bridge(self) -> Cluster:
        """The bridge and the machine's address on it (10.77.0.1), where the emulators
        listen."""
        self.network.up()
        return self

    def up(self, hosts: Iterable[str]) -> Cluster:
        for name in hosts:
            self.network.add(name, ADDRESSES[name])
        # The suite's PostgreSQL, Redis (and broker), forwarded to the bridge address.
        targets = {}
        for url in _servers().values():
            parts = urlsplit(url)
            port = parts.port or DEFAULT_PORTS[parts.scheme]
            targets[port] = f"{parts.hostname}:{port}"
        for port, target in targets.items():
            self.spawn(
                f"forward-{port}",
                [
                    "socat",
                    f"TCP-LISTEN:{port},bind={GATEWAY},fork,reuseaddr,backlog=1024",
                    f"TCP:{target}",
                ],
                dict(os.environ),
            )
        self.forwarded = sorted(targets)
        self.env = {
            **{name: _moved(url, GATEWAY) for name, url in _servers().items()},
            "ALLOWED_HOSTS": ",".join(f"10.77.0.{ADDRESSES[h]}" for h in ("lb", "api1", "api2")),
            "PUBLIC_BASE_URL": self.url,
            **CLUSTER_ENV,
        }
        wait_until(self._forwarders_answer, timeout=20, interval=0.1, message="the forwarders")
        return self

    def _forwarders_answer(self) -> bool:
        for port in self.forwarded:
            try:
                socket.create_connection((GATEWAY, port), timeout=1).close()
            except OSError:
                return False
        return True

    def host(self, name: str) -> Host:
        return self.network.hosts[name]

    def directory(self, name: str) -> Path:
        path = self.root / "hosts" / name
        (path / "metrics").mkdir(parents=True, exist_ok=True)
        return path

    def run(self, host_name: str, name: str, argv: list[str], **env: Any) -> Process:
        """Start a process on a host, with that host's own directory and environment."""
        host = self.host(host_name)
        directory = self.directory(host_name)
        environment = process_env(
            directory,
            **self.env,
            PROMETHEUS_MULTIPROC_DIR=str(directory / "metrics"),
            **env,
        )
        process = self.spawn(f"{host_name}-{name}", host.argv(argv), environment)
        self.processes.setdefault(host_name, []).append(process)
        return process

    @property
    def url(self) -> str:
        return f"http://10.77.0.{ADDRESSES['lb']}:{LB_PORT}"

    def api_url(self, host_name: str) -> str:
        return f"http://{self.host(host_name).address}:{API_PORT}"

    def start_api(self, host_name: str, **env: Any) -> Process:
        process = self.run(
            host_name,
            "api",
            [
                str(BIN / "uvicorn"),
                "project.asgi:application",
                "--host",
                self.host(host_name).address,
                "--port",
                str(API_PORT),
                "--workers",
                "1",
                "--lifespan",
                "off",
                "--no-access-log",
            ],
            **env,
        )
        url = self.api_url(host_name) + "/healthz"
        wait_until(
            lambda: _alive(process) and _answers(url),
            timeout=60,
            interval=0.2,
            message=f"the API on {host_name}",
        )
        return process

    def start_lb(self, apis: list[str]) -> Process:
        config = self.directory("lb") / "haproxy.cfg"
        servers = "\n".join(
            f"    server {name} {self.host(name).address}:{API_PORT} check" for name in apis
        )
        config.write_text(
            HAPROXY_CONFIG.format(bind=f"{self.host('lb').address}:{LB_PORT}", servers=servers)
        )
        process = self.run("lb", "haproxy", ["haproxy", "-db", "-f", str(config)])
        wait_until(
            lambda: _alive(process) and _answers(self.url + "/healthz"),
            timeout=30,
            interval=0.2,
            message="HAProxy",
        )
        return process

    def start_relay(self, host_name: str, **env: Any) -> Process:
        process = self.run(
            host_name, "relay", [sys.executable, str(ROOT / "manage.py"), "relay"], **env
        )
        wait_until(
            lambda: _alive(process) and "relay started" in process.log(),
            timeout=60,
            interval=0.2,
            message=f"the relay on {host_name}",
        )
        return process

    def start_workers(
        self,
        host_name: str,
        pools: Iterable[tuple[str, int]],
        *,
        beat: bool = False,
        **env: Any,
    ) -> list[Process]:
        """A `celery worker` per (queue, concurrency) on the host, as a worker host of
        compose runs them; `beat` adds the scheduler to the first."""
        started = []
        for index, (queue, concurrency) in enumerate(pools):
            argv = worker_argv(
                queue,
                f"{queue}@{host_name}",
                concurrency,
                beat_schedule=self.directory(host_name) / "beat-schedule"
                if beat and index == 0
                else None,
            )
            started.append(self.run(host_name, queue, argv, **env))
        wait_until(
            lambda: all(_alive(p) and " ready." in p.log() for p in started),
            timeout=120,
            interval=0.25,
            message=f"the workers on {host_name}",
        )
        return started

    def start_worker_host(self, host_name: str, **env: Any) -> list[Process]:
        return self.start_workers(
            host_name, [(q, 1 if q == "push" else 2) for q in CHANNEL_POOLS], **env
        )

    def start_clients(self, tokens: list[str]) -> tuple[Process, Path]:
        out = self.directory("clients") / "frames.jsonl"
        config = self.directory("clients") / "clients.json"
        config.write_text(
            json.dumps(
                {
                    "url": self.url.replace("http://", "ws://") + "/ws/notifications/",
                    "origin": self.url,
                    "tokens": tokens,
                    "out": str(out),
                }
            )
        )
        process = self.run(
            "clients", "ws", [sys.executable, "-m", "tests.cluster.ws_clients", str(config)]
        )
        wait_until(
            lambda: _alive(process) and f"connected {len(tokens)}\n" in process.log(),
            timeout=60,
            interval=0.2,
            message="every WebSocket client connected",
        )
        return process, out

    # --- breaking ------------------------------------------------------------------------

    def kill_host(self, host_name: str) -> None:
        """Every process of the host, SIGKILL, at once: a power cut."""
        kill_all_in(self.host(host_name).namespace)
        for process in self.processes.get(host_name, []):
            process.popen.wait(10)

    def cut(self, host_name: str) -> None:
        self.network.cut(self.host(host_name))

    def restore(self, host_name: str) -> None:
        self.network.restore(self.host(host_name))

    def down(self) -> None:
        self.network.down()

    # --- measuring -----------------------------------------------------------------------

    def clock_offset(self, host_name: str, **env: Any) -> float:
        """How far ahead of this process's wall clock a process on the host (with `env`)
        reads its own."""
        environment = {**os.environ, **{k: str(v) for k, v in env.items()}}
        before = time.time()
        done = subprocess.run(
            self.host(host_name).argv([sys.executable, "-c", "import time; print(time.time())"]),
            capture_output=True,
            text=True,
            env=environment,
            check=True,
        )
        after = time.time()
        return float(done.stdout) - (before + after) / 2

    def cpu_seconds(self, host_name: str) -> float:
        """User and system CPU of every process now running on the host, and of the children
        each has reaped (a process that exits unreaped between two readings is missed)."""
        total = 0.0
        ticks = os.sysconf("SC_CLK_TCK")
        for pid in pids_in(self.host(host_name).namespace):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # utime, stime, cutime, cstime (proc(5) fields 14 to 17).
            total += sum(int(f) for f in fields[11:15]) / ticks
        return total


HAPROXY_CONFIG = """\
global
    maxconn 8000

defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    # An upgraded WebSocket lives on as a tunnel.
    timeout tunnel 1h
    # A request whose connection could not be made goes to the other server.
    retries 3
    option redispatch

frontend api
    bind {bind}
    default_backend apis

backend apis
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
{servers}
"""


def _alive(process: Process) -> bool:
    if process.popen.poll() is not None:
        raise AssertionError(f"{process.name} exited early:\n{process.log()[-3000:]}")
    return True


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False
