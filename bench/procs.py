"""The processes a bench run starts: each pinned to its cores, in its own process group, with a
raised file limit, logged to a file, and every one of them stopped when the run ends."""

from __future__ import annotations

import atexit
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# 10,000 WebSocket clients in one process and 10,000 sockets in one server process, plus the
# database, Redis and log descriptors each side keeps.
WANTED_NOFILE = 65536


def raise_nofile() -> int:
    """Raise this process's descriptor limit as far as allowed; return the soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for new_hard in (max(hard, WANTED_NOFILE), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(WANTED_NOFILE, new_hard), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def parse_cpus(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def pin(cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def rss_kib(self) -> int:
        """Resident set of the process itself (not its children), from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for {self.name}")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of every live process in this one's process group: a
        uvicorn server, or a Celery worker with its prefork children."""
        return group_cpu_seconds(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.popen.wait(10)


_TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after its closing one.
        fields = text[text.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS


class ProcessSet:
    """Every process the run started, stopped in reverse order at the end, on an exception, on
    SIGINT/SIGTERM/SIGHUP, and at interpreter exit."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[Proc] = []
        atexit.register(self.stop_all)

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str],
        cpus: set[int] | None,
        cwd: Path | None = None,
    ) -> Proc:
        log_path = self.log_dir / f"{name}.log"

        def setup_child() -> None:
            pin(cpus)
            raise_nofile()

        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=setup_child,  # spawned from the main thread only
            )
        proc = Proc(name, popen, log_path)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        while self.started:
            self.started.pop().stop()


def wait_for(
    predicate: Callable[[], object], *, timeout: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Deadline(BaseException):
    """The whole run went past its time budget (a BaseException: no phase may swallow it)."""


def install_signal_handlers(budget_seconds: int) -> None:
    """Turn SIGINT/SIGTERM/SIGHUP into SystemExit (so `finally` blocks and atexit run) and
    bound the whole run with SIGALRM."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    def out_of_time(signum: int, frame: object) -> None:
        raise Deadline(f"the bench exceeded its budget of {budget_seconds}s")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(budget_seconds)


def procfile_commands(path: Path, env: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The Procfile's processes, `$VAR` and `${VAR:-default}` expanded from `env`, the venv's
    executables taken from this interpreter's venv (the bench and the tests start them as
    `make run` does)."""

    def expand(match: re.Match[str]) -> str:
        name = match[1] or match[3]
        return env.get(name) or (match[2] or "")

    out = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, command = line.partition(":")
        command = re.sub(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)", expand, command)
        argv = shlex.split(command)
        if argv[0].startswith(".venv/bin/"):
            argv[0] = str(Path(sys.executable).parent / argv[0].removeprefix(".venv/bin/"))
        out.append((name.strip(), argv))
    return out
