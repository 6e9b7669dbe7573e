"""Shared fixtures: a clean Redis per test, API clients per owner, a real SMTP server, and
real Celery worker and API server processes on the same database and broker as the test."""

from __future__ import annotations

import email
import email.policy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import redis
from aiosmtpd.controller import Controller
from django.conf import settings
from django.db import connection
from rest_framework.test import APIClient

from tests.factories import OwnerFactory, TemplateFactory, api_key_for

ROOT = Path(__file__).resolve().parent.parent
# The idle BRPOP's wait on the server outside the tests (BROKER_POLL_SECONDS); process_env
# shortens it, and the tests of idle and stall behaviour put it back.
PRODUCTION_BROKER_POLL_SECONDS = "10"
BIN = Path(sys.executable).parent


def wait_until(
    predicate: Callable[[], Any],
    *,
    timeout: float,
    interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Poll until `predicate()` is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def clean_redis() -> Iterator[None]:
    """Each test starts with an empty cache (this process's local layer too) and empty
    broker queues."""
    from core import cache as keys

    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    keys.local_clear()
    yield
    client.flushdb()
    keys.local_clear()


@pytest.fixture(autouse=True)
def web_pushes_finished() -> Iterator[None]:
    """An in-app delivery accepted in this process is pushed by a thread of this process
    (workers/web_push.py): let those pushes end before the test's database is emptied (a
    flush that met a push's transaction deadlocked)."""
    yield
    from workers.web_push import web_push_drain

    assert web_push_drain(timeout=30), "in-app pushes of this process still running after 30 s"


@pytest.fixture(autouse=True)
def no_api_rate_limit(settings: Any) -> None:
    """Tests drive the API in-process faster than the default per-key limit (100/s); the
    limit has tests of its own, which set it."""
    settings.API_RATE_LIMIT_PER_SECOND = 0


@pytest.fixture
def owner(db: None) -> Any:
    return OwnerFactory(name="acme")


@pytest.fixture
def other_owner(db: None) -> Any:
    return OwnerFactory(name="globex")


def _client_for(owner: Any) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_for(owner)}")
    return client


@pytest.fixture
def api(owner: Any) -> APIClient:
    return _client_for(owner)


@pytest.fixture
def other_api(other_owner: Any) -> APIClient:
    return _client_for(other_owner)


@pytest.fixture
def template(owner: Any) -> Any:
    return TemplateFactory(owner=owner)


# --- A real SMTP server ---------------------------------------------------------------------


@dataclass
class SmtpSink:
    """Every message the SMTP server received, parsed."""

    host: str
    port: int
    messages: list[EmailMessage] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # While set, every RCPT TO is refused with 550 (a bounced address).
    refuse_recipients: bool = False

    def received(self) -> list[EmailMessage]:
        with self.lock:
            return list(self.messages)


class _Handler:
    def __init__(self, sink: SmtpSink):
        self.sink = sink

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if self.sink.refuse_recipients:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.sink.lock:
            self.sink.messages.append(message)  # type: ignore[arg-type]
        return "250 OK"


@pytest.fixture
def smtp_server() -> Iterator[SmtpSink]:
    sink = SmtpSink(host="127.0.0.1", port=free_port())
    controller = Controller(_Handler(sink), hostname=sink.host, port=sink.port)
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()


# --- Real processes on the test database and broker -----------------------------------------


def _database_url() -> str:
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] or ""
    if db["PASSWORD"]:
        auth += f":{db['PASSWORD']}"
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def process_env(tmp_path: Path, **overrides: Any) -> dict[str, str]:
    """The environment of a Clarion process that shares this test's database and broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "DJANGO_"))}
    env.update(
        DATABASE_URL=_database_url(),
        REDIS_URL=settings.REDIS_URL,
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
        SECRET_KEY=settings.SECRET_KEY,
        CLARION_VAR_DIR=str(tmp_path),
        DATABASE_POOL="false",
        # Tests change data in this process and read it from another within a millisecond:
        # each process checks the cache version on every read. The default's lag of up to
        # 0.1 s is tested in tests/core/test_cache.py.
        CACHE_LOCAL_CHECK_SECONDS="0",
        # A worker's warm shutdown waits for its idle BRPOP to return (kombu reads the reply
        # rather than lose a message): the default 10 s would add seconds to every test that
        # stops a worker. Tests of the idle and stall behaviour pass the default themselves.
        BROKER_POLL_SECONDS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        self.signal(sig)
        self.reap(timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def reap(self, timeout: float = 20) -> None:
        """Wait for it to end after a signal; kill it after `timeout` seconds."""
        if self.popen.poll() is not None:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so a fixture's teardown knows the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


LOG_TAIL_LINES = 40


@pytest.fixture
def spawn(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Process]]:
    """Start a process in its own group; every one is stopped at teardown. When the test
    failed, the end of each process's log is printed (pytest shows it with the failure), so a
    failure on CI, whose temporary directories are gone, still says what each process did."""
    started: list[Process] = []

    def start(name: str, argv: list[str], env: dict[str, str]) -> Process:
        log_path = tmp_path / f"{name}.log"
        popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process = Process(name, popen, log_path)
        started.append(process)
        return process

    yield start
    # All told at once, then waited for: each winds down (a worker's warm shutdown waits for
    # its idle BRPOP) while the others do.
    for process in reversed(started):
        process.signal()
    for process in reversed(started):
        process.reap()
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        for process in started:
            tail = process.log().splitlines()[-LOG_TAIL_LINES:]
            print(f"--- the last {len(tail)} lines of {process.name} ---", *tail, sep="\n")


@pytest.fixture
def relay_process(spawn: Callable[..., Process], tmp_path: Path) -> Callable[..., Process]:
    """Start the outbox relay (`manage.py relay`) and wait until it runs."""

    def start(*, name: str = "relay", **env: Any) -> Process:
        process = spawn(
            name,
            [sys.executable, str(ROOT / "manage.py"), "relay"],
            process_env(tmp_path, **env),
        )

        def ready() -> bool:
            if process.popen.poll() is not None:
                pytest.fail(f"relay exited early:\n{process.log()}")
            return "relay started" in process.log()

        wait_until(ready, timeout=60, message="the relay to be running")
        return process

    return start


@pytest.fixture
def celery_worker_process(
    spawn: Callable[..., Process], tmp_path: Path, relay_process: Callable[..., Process]
) -> Callable[..., Process]:
    """Start `celery worker` on the given queues and wait until it is ready; with `relay`
    (the default), an outbox relay with the same environment, since nothing reaches a
    worker without one."""

    def start(
        queues: str,
        *,
        concurrency: int = 2,
        beat: bool = False,
        name: str = "worker",
        relay: bool = True,
        **env: Any,
    ) -> Process:
        if relay:
            relay_process(name=f"{name}-relay", **env)
        argv = [
            str(BIN / "celery"),
            "-A",
            "project",
            "worker",
            "-Q",
            queues,
            "-n",
            f"{name}-{os.getpid()}@%h",
            "--concurrency",
            str(concurrency),
            "--without-gossip",
            "--without-mingle",
            "-l",
            "info",
        ]
        if beat:
            argv += ["-B", "-s", str(tmp_path / f"{name}-beat-schedule")]
        process = spawn(name, argv, process_env(tmp_path, **env))

        def ready() -> bool:
            if process.popen.poll() is not None:
                pytest.fail(f"worker exited early:\n{process.log()}")
            return " ready." in process.log()

        wait_until(ready, timeout=60, message="the Celery worker to be ready")
        return process

    return start
