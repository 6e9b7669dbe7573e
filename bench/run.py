"""Run every bench phase, print the table with PASS/MISS per target, write bench/results.json and
refresh the generated part of docs/benchmarks.md.

    python -m bench.run            # what `make bench` runs
    BENCH_QUICK=1 python -m bench.run
    BENCH_PHASES=http,api python -m bench.run

Every phase that starts Clarion's Celery workers starts the outbox relay (`manage.py relay`)
with them: the API only writes the outbox.

Runs on the PostgreSQL and Redis that DATABASE_URL / REDIS_URL name (a database of its own,
`<name>_bench`, and a Redis database nobody uses), or on the embedded SQLite and Redis under
var/bench/.
Servers run on BENCH_SERVER_CPUS (0), load generators and this process on BENCH_LOAD_CPUS (1).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench import procs, report, sysinfo
from bench.loadgen import (
    HttpConnection,
    HttpRun,
    WsPool,
    closed_loop,
    http_once,
    http_request,
    open_loop,
    percentile,
)
from bench.procs import Proc, ProcessSet, procfile_commands

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VAR_DIR = ROOT / "var" / "bench"
RESULTS_PATH = ROOT / "bench" / "results.json"
DOC_PATH = ROOT / "docs" / "benchmarks.md"
PHASES = (
    "http",
    "api",
    "anatomy",
    "bulk",
    "celery",
    "e2e",
    "relay",
    "fanout",
    "ws_base",
    "ws",
    "idle",
    "ws_soak",
)
HOST = "127.0.0.1"
# The ws phase's rate sweep: seconds of POSTs at each rate, and the p99 a rate must hold.
WS_SWEEP_SECONDS = 4
WS_RATE_P99_MS = 100.0
# Several loopback source addresses, so 10,000 client sockets never run short of ports.
SOURCE_ADDRESSES = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
# The sandbox is no vendor: its channels get no rate limit worth the name, so the end-to-end
# figure measures the pipeline rather than the token bucket (defaults: email=1000/m, sms=100/s).
BENCH_RATE_LIMITS = "email=1000000/s,sms=1000000/s,push=1000000/s,web=1000000/s"
BENCH_API_RATE_LIMIT = 1_000_000
TWO_CHANNEL_TEMPLATE = {
    "email": {
        "subject": "Order {{ order_id }} shipped",
        "body": "Order {{ order_id }} is on its way.",
    },
    "sms": {"body": "Order {{ order_id }} shipped"},
}
WEB_TEMPLATE = {"web": {"title": "Shipped", "body": "Order {{ order_id }} is on its way"}}


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass
class Config:
    quick: bool
    phases: list[str]
    server_cpus: set[int] | None
    load_cpus: set[int] | None
    web_workers: int
    celery_concurrency: int
    web_worker_concurrency: int
    http_connections: int
    http_warmup: int
    http_duration: int
    fixed_duration: int
    ceiling_duration: int
    http_recipients: int
    bulk_requests: int
    bulk_items: int
    celery_tasks: int
    e2e_notifications: int
    e2e_batch: int
    ws_clients: int
    ws_hold: int
    ws_hold_seconds: int
    ws_samples: int
    ws_rate: float
    ws_sweep_rates: tuple[float, ...]
    ws_check_samples: int
    relay_rate: float
    relay_seconds: int
    fanout_subscribers: int
    idle_seconds: int
    soak_seconds: int
    soak_wave: int
    soak_hold_seconds: float
    profile: bool
    budget_seconds: int

    @classmethod
    def from_env(cls) -> Config:
        quick = os.environ.get("BENCH_QUICK", "") not in ("", "0", "false")
        phases = [p for p in os.environ.get("BENCH_PHASES", ",".join(PHASES)).split(",") if p]
        unknown = set(phases) - set(PHASES)
        if unknown:
            sys.exit(f"unknown BENCH_PHASES {sorted(unknown)}; choose from {', '.join(PHASES)}")
        cpus = os.cpu_count() or 1
        server = procs.parse_cpus(os.environ.get("BENCH_SERVER_CPUS", "0"))
        load = procs.parse_cpus(os.environ.get("BENCH_LOAD_CPUS", "1"))
        pinned = cpus >= 2 and max(server | load) < cpus
        return cls(
            quick=quick,
            phases=phases,
            server_cpus=server if pinned else None,
            load_cpus=load if pinned else None,
            web_workers=_env_int("WEB_CONCURRENCY", 1),
            # The Procfile's pools: 2 processes per channel queue.
            celery_concurrency=_env_int("BENCH_CELERY_CONCURRENCY", 2),
            web_worker_concurrency=_env_int("WEB_WORKER_CONCURRENCY", 2),
            http_connections=_env_int("BENCH_HTTP_CONNECTIONS", 32),
            http_warmup=3 if quick else 5,
            http_duration=_env_int("BENCH_HTTP_SECONDS", 5 if quick else 20),
            fixed_duration=5 if quick else 20,
            ceiling_duration=3 if quick else 8,
            http_recipients=1000,
            bulk_requests=2 if quick else 5,
            bulk_items=1000,
            celery_tasks=_env_int("BENCH_CELERY_TASKS", 3000 if quick else 10000),
            e2e_notifications=_env_int("BENCH_E2E_NOTIFICATIONS", 500 if quick else 3000),
            e2e_batch=250,
            ws_clients=_env_int("BENCH_WS_CLIENTS", 300 if quick else 2000),
            ws_hold=_env_int("BENCH_WS_HOLD", 1000 if quick else 10000),
            ws_hold_seconds=5 if quick else 20,
            ws_samples=100 if quick else 500,
            ws_rate=25.0,
            ws_sweep_rates=(50.0, 100.0) if quick else (50.0, 100.0, 200.0, 400.0),
            ws_check_samples=50 if quick else 200,
            relay_rate=float(os.environ.get("BENCH_RELAY_RATE", 50)),
            relay_seconds=_env_int("BENCH_RELAY_SECONDS", 5 if quick else 10),
            fanout_subscribers=_env_int("BENCH_FANOUT_SUBSCRIBERS", 10_000 if quick else 100_000),
            idle_seconds=_env_int("BENCH_IDLE_SECONDS", 15 if quick else 60),
            soak_seconds=_env_int("BENCH_SOAK_SECONDS", 45 if quick else 300),
            soak_wave=_env_int("BENCH_SOAK_WAVE", 300 if quick else 2000),
            soak_hold_seconds=2.0,
            profile=os.environ.get("BENCH_PROFILE", "1") not in ("", "0", "false"),
            # About 9 minutes of phases, then the WebSocket memory soak (5 minutes), which is
            # cut short rather than run past the budget.
            budget_seconds=_env_int("BENCH_BUDGET_SECONDS", 1500),
        )


# --- Where the bench's data lives -----------------------------------------------------------


def _with_redis_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    if parts.scheme in ("redis", "rediss"):
        return urlunsplit(parts._replace(path=f"/{db}"))
    if parts.scheme == "unix":
        query = re.sub(r"(^|&)db=\d+", "", parts.query).strip("&")
        query = f"{query}&db={db}" if query else f"db={db}"
        return urlunsplit(parts._replace(query=query))
    return url


def _with_database_suffix(url: str) -> str:
    parts = urlsplit(url)
    name = parts.path.lstrip("/") or "clarion"
    return urlunsplit(parts._replace(path=f"/{name}_bench"))


def pick_redis_db(url: str) -> int:
    """BENCH_REDIS_DB, or the highest database index below 15 (the test suite's) that holds no
    key and no other client: the bench flushes its database between phases, and must never
    flush one that someone else (a test run, `make run`) is using."""
    import redis

    if "BENCH_REDIS_DB" in os.environ:
        return int(os.environ["BENCH_REDIS_DB"])
    client = redis.Redis.from_url(url)
    busy = {int(c["db"]) for c in client.client_list()} | {
        int(name[2:]) for name in client.info("keyspace")
    }
    count = int(client.config_get("databases").get("databases", 16))
    for db in range(min(count, 15) - 1, 0, -1):
        if db not in busy:
            return db
    sys.exit("no free Redis database for the bench: set BENCH_REDIS_URL or BENCH_REDIS_DB")


def bench_environment(secret_key: str) -> tuple[dict[str, str], list[str]]:
    """The environment every bench process shares, and notes on where data goes."""
    notes = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PYTEST_"))}
    for name in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"):
        env.pop(name, None)
    env.update(
        CLARION_VAR_DIR=str(VAR_DIR),
        SECRET_KEY=secret_key,
        RATE_LIMITS=BENCH_RATE_LIMITS,
        # One API key sends everything: its own limit (100/s by default) would answer most
        # of the load with 429 and the figure would measure the throttle.
        API_RATE_LIMIT_PER_SECOND=str(BENCH_API_RATE_LIMIT),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
        DJANGO_SETTINGS_MODULE="project.settings",
    )
    database_url = os.environ.get("BENCH_DATABASE_URL") or (
        _with_database_suffix(os.environ["DATABASE_URL"])
        if os.environ.get("DATABASE_URL", "").startswith(("postgres", "pgsql"))
        else ""
    )
    if database_url:
        env["DATABASE_URL"] = database_url
        notes.append(f"database: {urlsplit(database_url).path.lstrip('/')} (dropped and recreated)")
    else:
        notes.append("database: embedded SQLite under var/bench/")
    redis_url = os.environ.get("BENCH_REDIS_URL") or (
        _with_redis_db(os.environ["REDIS_URL"], pick_redis_db(os.environ["REDIS_URL"]))
        if os.environ.get("REDIS_URL")
        else ""
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
        env["CELERY_BROKER_URL"] = redis_url
        notes.append(f"redis: {redis_url} (flushed between phases)")
    else:
        notes.append("redis: embedded server under var/bench/")
    return env, notes


def prepare_database(env: dict[str, str]) -> None:
    url = env.get("DATABASE_URL")
    if not url:
        for path in VAR_DIR.glob("clarion.sqlite3*"):
            path.unlink()
        return
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(env: dict[str, str]) -> None:
    url = env.get("DATABASE_URL")
    if not url or os.environ.get("BENCH_KEEP_DB"):
        return
    import psycopg

    parts = urlsplit(url)
    admin = urlunsplit(parts._replace(scheme="postgresql", path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parts.path.lstrip("/")}" WITH (FORCE)')


# --- The run --------------------------------------------------------------------------------


class PhaseFailed(Exception):
    pass


class Bench:
    def __init__(self, config: Config):
        self.config = config
        self.secret_key = secrets.token_urlsafe(40)
        self.env, self.notes = bench_environment(self.secret_key)
        self.procs = ProcessSet(VAR_DIR / "logs")
        self.results: dict[str, Any] = {
            "baselines": {},
            "figures": {},
            "errors": {},
        }
        self.nonce = uuid.uuid4().hex[:10]
        self.api_key = ""
        self.owner_id = 0
        self.recipient_pks: dict[str, int] = {}
        self.started_monotonic = time.monotonic()

    # --- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(VAR_DIR / "logs", ignore_errors=True)
        (VAR_DIR / "logs").mkdir()
        prepare_database(self.env)
        # This process uses Clarion's own settings and services to seed and to poll.
        os.environ.update(self.env)
        import django

        django.setup()
        from django.conf import settings
        from django.core.management import call_command

        call_command("migrate", verbosity=0, interactive=False)
        self.redis_url = settings.REDIS_URL
        self.broker_url = settings.CELERY_BROKER_URL
        os.environ["BENCH_BROKER_URL"] = self.broker_url
        self.flush_redis()
        self.seed()

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url)

    def flush_redis(self) -> None:
        self.redis().flushdb()

    def seed(self) -> None:
        from notifications.models import Recipient
        from notifications.services import api_key_create, template_save

        api_key, self.api_key = api_key_create(owner_name="bench", name="bench")
        owner = api_key.owner
        self.owner_id = owner.pk
        template_save(
            owner=owner,
            key="bench_two",
            category="bench",
            locale="en",
            content=TWO_CHANNEL_TEMPLATE,
        )
        template_save(
            owner=owner, key="bench_web", category="bench", locale="en", content=WEB_TEMPLATE
        )
        count = max(self.config.ws_hold, self.config.ws_clients + 100, self.config.http_recipients)
        Recipient.objects.bulk_create(
            [
                Recipient(
                    owner=owner,
                    external_id=f"bench-user-{i}",
                    email=f"bench-user-{i}@example.com",
                    phone="+14155550100",
                    locale="en",
                    timezone="UTC",
                )
                for i in range(1, count + 1)
            ],
            batch_size=2000,
        )
        self.recipient_pks = dict(
            Recipient.objects.filter(owner=owner).values_list("external_id", "pk")
        )

    def warm_caches(self) -> None:
        """What a server that has been up a while holds: templates and the recipients the HTTP
        phases use, cached in Redis exactly as the creation path caches them."""
        from notifications.selectors import recipient_context_get, template_snapshot_get

        for key in ("bench_two", "bench_web"):
            template_snapshot_get(owner_id=self.owner_id, key=key)
        for i in range(1, self.config.http_recipients + 1):
            recipient_context_get(owner_id=self.owner_id, external_id=f"bench-user-{i}")

    # --- processes --------------------------------------------------------------------------

    def free_port(self) -> int:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            return int(sock.getsockname()[1])

    def start_uvicorn(
        self, name: str, app: str, env: dict[str, str], workers: int, extra: tuple[str, ...] = ()
    ) -> Proc:
        port = self.free_port()
        argv = [
            str(BIN / "uvicorn"),
            app,
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--lifespan",
            "off",
            # Both B_http and the API run without access logs (a per-request write to a file).
            "--no-access-log",
            *extra,
        ]
        proc = self.procs.spawn(name, argv, env=env, cpus=self.config.server_cpus, cwd=ROOT)
        proc.port = port
        procs.wait_for(
            lambda: self._listening(proc, port), timeout=60, what=f"{name} to listen on {port}"
        )
        return proc

    def _listening(self, proc: Proc, port: int) -> bool:
        if not proc.alive():
            raise PhaseFailed(f"{proc.name} exited:\n{proc.log_tail()}")
        with socket.socket() as sock:
            return sock.connect_ex((HOST, port)) == 0

    def start_worker(
        self,
        name: str,
        app: str,
        queues: str,
        concurrency: int,
        env: dict[str, str] | None = None,
    ) -> Proc:
        argv = [
            str(BIN / "celery"),
            "-A",
            app,
            "worker",
            "-Q",
            queues,
            "-n",
            f"{name}-{self.nonce}@%h",
            "--concurrency",
            str(concurrency),
            # As the Procfile runs them: mingle's start-up inspect would leave its reply
            # queue's BRPOP pending on the consumer's channel for a whole BROKER_POLL_SECONDS.
            "--without-gossip",
            "--without-mingle",
            "--heartbeat-interval",
            "10",
            "-l",
            "info",
        ]
        env = dict(env or self.env, BENCH_BROKER_URL=self.broker_url)
        proc = self.procs.spawn(name, argv, env=env, cpus=self.config.server_cpus, cwd=ROOT)

        def ready() -> bool:
            if not proc.alive():
                raise PhaseFailed(f"{name} exited:\n{proc.log_tail()}")
            return " ready." in proc.log()

        procs.wait_for(ready, timeout=90, what=f"{name} to be ready")
        return proc

    def start_relay(self, name: str = "relay", env: dict[str, str] | None = None) -> Proc:
        """The outbox relay (`python manage.py relay`), as the Procfile runs it, with the same
        environment and pinning as the workers: without it nothing accepted is published."""
        argv = [str(BIN / "python"), "manage.py", "relay"]
        proc = self.procs.spawn(
            name, argv, env=env or self.env, cpus=self.config.server_cpus, cwd=ROOT
        )

        def ready() -> bool:
            if not proc.alive():
                raise PhaseFailed(f"{name} exited:\n{proc.log_tail()}")
            return "relay started" in proc.log()

        procs.wait_for(ready, timeout=60, what=f"{name} to be ready")
        return proc

    def retire_outbox(self) -> int:
        """Cancel every delivery earlier phases left pending (the API phases fill the outbox
        and no relay ran then), so that a phase's relay and workers work on its own
        notifications only. Returns how many."""
        from notifications.models import OUTBOX_STATUSES, Delivery

        return Delivery.objects.filter(status__in=OUTBOX_STATUSES).update(
            status="cancelled", next_attempt_at=None, lease_expires_at=None
        )

    def run_wrk(
        self, server: Proc, *, duration: int, template: str = "bench_two"
    ) -> dict[str, Any]:
        """wrk on the load CPUs against `server`; also how much CPU the server process group
        spent per request, a figure that holds up better than req/s on a busy machine."""
        port = server.port
        argv = [
            "wrk",
            "-t1",
            f"-c{self.config.http_connections}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(ROOT / "bench" / "post.lua"),
            f"http://{HOST}:{port}/api/v1/notifications",
            "--",
            f"{self.nonce}-{uuid.uuid4().hex[:6]}",
            self.api_key or "none",
            template,
            str(self.config.http_recipients),
        ]
        cpu0 = server.cpu_seconds()
        proc = self.procs.spawn("wrk", argv, env=dict(os.environ), cpus=self.config.load_cpus)
        try:
            proc.popen.wait(duration + 60)
        except subprocess.TimeoutExpired as exc:
            raise PhaseFailed("wrk did not finish") from exc
        finally:
            self.procs.stop(proc)
        result = parse_wrk(proc.log())
        cpu = server.cpu_seconds() - cpu0
        if result.get("requests"):
            result["server_cpu_ms_per_request"] = round(cpu * 1000 / result["requests"], 3)
            result["server_cpu_share"] = round(cpu / duration, 3)
        return result

    # --- request makers ---------------------------------------------------------------------

    def post_maker(
        self, template: str, recipients: Callable[[int], str], tag: str
    ) -> Callable[[int], bytes]:
        headers = {
            "Authorization": f"Bearer {self.api_key}",
            "Content-Type": "application/json",
        }
        run = f"{self.nonce}-{tag}-{uuid.uuid4().hex[:6]}"

        def make(index: int) -> bytes:
            body = json.dumps(
                {
                    "recipient": recipients(index),
                    "template": template,
                    "data": {"order_id": f"A-{index}", "seq": index},
                }
            ).encode()
            return http_request(
                "POST",
                "/api/v1/notifications",
                host=f"{HOST}",
                headers={**headers, "Idempotency-Key": f"{run}-{index}"},
                body=body,
            )

        return make

    def random_recipient(self, index: int) -> str:
        return f"bench-user-{random.randint(1, self.config.http_recipients)}"

    # --- phases -----------------------------------------------------------------------------

    def phase_http(self) -> None:
        """B_http with wrk, then the bench's own client's ceiling against the same server."""
        env = dict(self.env, DJANGO_SETTINGS_MODULE="bench.hello_settings")
        hello = self.start_uvicorn(
            "hello", "bench.hello_app:application", env, self.config.web_workers
        )
        try:
            self.run_wrk(hello, duration=self.config.http_warmup)
            b_http = self.run_wrk(hello, duration=self.config.http_duration)
            self.results["baselines"]["B_http"] = b_http
            ceiling = asyncio.run(
                closed_loop(
                    HOST,
                    hello.port,
                    self.post_maker("bench_two", self.random_recipient, "ceiling"),
                    connections=self.config.http_connections,
                    duration=self.config.ceiling_duration,
                )
            )
            self.results["figures"].setdefault("load_generator", {})["ceiling"] = ceiling.summary()
        finally:
            self.procs.stop(hello)

    def start_api(self, name: str = "api", workers: int | None = None) -> Proc:
        # As the Procfile's web process: client frames are tiny (settings.WS_MAX_FRAME_BYTES).
        ws_max = ("--ws-max-size", os.environ.get("WS_MAX_FRAME_BYTES", "4096"))
        return self.start_uvicorn(
            name, "project.asgi:application", self.env, workers or self.config.web_workers, ws_max
        )

    def phase_api(self) -> None:
        self.flush_redis()
        self.warm_caches()
        api = self.start_api()
        try:
            port = api.port
            self.run_wrk(api, duration=self.config.http_warmup)
            db0 = self.database_counters()
            peak = self.run_wrk(api, duration=self.config.http_duration)
            db1 = self.database_counters()
            if db0 and db1 and peak.get("requests"):
                # Statistics reach pg_stat_database a little late: a rough count, per request.
                peak["db_per_request"] = {
                    k: round((db1[k] - db0[k]) / peak["requests"], 2) for k in db0
                }
            # Only 2xx answers are accepts; anything else is reported and fails the target.
            requests = peak.get("requests") or 0
            accepted = requests - peak.get("non_2xx", 0) - peak.get("socket_errors", 0)
            peak["accepts_per_s"] = (
                round(peak["rate_per_s"] * accepted / requests, 1) if requests else 0.0
            )
            self.results["figures"]["api_max"] = peak
            rate = 0.7 * peak["accepts_per_s"]
            if rate <= 0:
                raise PhaseFailed("the API accepted nothing")
            fixed = asyncio.run(
                open_loop(
                    HOST,
                    port,
                    self.post_maker("bench_two", self.random_recipient, "fixed"),
                    rate=rate,
                    duration=self.config.fixed_duration,
                    connections=self.config.http_connections,
                )
            )
            self.results["figures"]["api_fixed_rate"] = {"target_rate": round(rate, 1)} | (
                fixed.summary()
            )
            if self.config.profile:
                self.profile_api(api)
        finally:
            self.procs.stop(api)

    def database_counters(self) -> dict[str, int] | None:
        from django.db import connection

        if connection.vendor != "postgresql":
            return None
        time.sleep(1.0)  # let backends flush their pending statistics
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT xact_commit, tup_inserted, tup_updated, tup_fetched"
                " FROM pg_stat_database WHERE datname = current_database()"
            )
            row = cursor.fetchone()
        return dict(zip(("commits", "inserted", "updated", "fetched"), row, strict=True))

    def profile_api(self, api: Proc) -> None:
        """py-spy on the API process while wrk drives it: a separate run, so sampling does not
        touch the figures above."""
        py_spy = BIN / "py-spy"
        if not py_spy.exists():
            self.notes.append("profile skipped: py-spy is not installed in the venv")
            return
        raw = VAR_DIR / "profile-api.raw.txt"
        seconds = 10 if self.config.quick else 15
        spy = self.procs.spawn(
            "py-spy",
            [
                str(py_spy),
                "record",
                "--pid",
                str(api.pid),
                "--duration",
                str(seconds),
                "--rate",
                "100",
                "--idle",
                "--threads",
                "--format",
                "raw",
                "--output",
                str(raw),
                "--nonblocking",
            ],
            env=dict(os.environ),
            cpus=self.config.load_cpus,
        )
        try:
            self.run_wrk(api, duration=seconds + 2)
            spy.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.notes.append("profile: py-spy did not finish")
        finally:
            self.procs.stop(spy)
        if not raw.exists():
            self.notes.append(f"profile: py-spy wrote nothing; see {spy.log_path}")
            return
        from bench.profile import render, summarise

        summary = summarise(raw, root=str(ROOT), top=30)
        (VAR_DIR / "profile-api.txt").write_text(render(summary) + "\n")
        self.results["profile_api"] = summary

    def bulk_request(self, items: list[dict[str, Any]]) -> bytes:
        """The raw HTTP request of POST /api/v1/notifications/bulk with these items."""
        return http_request(
            "POST",
            "/api/v1/notifications/bulk",
            host=HOST,
            headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
            body=json.dumps({"notifications": items}).encode(),
        )

    def _bulk(self, api: Proc) -> dict[str, Any]:
        """POST /notifications/bulk with 1000 items each, one request after another."""
        port = api.port
        items_total = 0
        seconds = 0.0
        latencies = []
        statuses = []
        budget_end = time.perf_counter() + (20 if self.config.quick else 45)
        for k in range(self.config.bulk_requests):
            if k and time.perf_counter() > budget_end:
                break  # a slow machine: fewer requests rather than a run past its budget
            items = [
                {
                    "recipient": f"bench-user-{i}",
                    "template": "bench_two",
                    "data": {"order_id": f"B-{k}-{i}"},
                    "idempotency_key": f"{self.nonce}-bulk-{k}-{i}",
                }
                for i in range(1, self.config.bulk_items + 1)
            ]
            raw = self.bulk_request(items)
            t0 = time.perf_counter()
            status, body = asyncio.run(http_once(HOST, port, raw, timeout=180))
            elapsed = time.perf_counter() - t0
            statuses.append(status)
            if status != 200:
                raise PhaseFailed(f"bulk answered {status}: {body[:300]!r}")
            accepted = json.loads(body)["accepted"]
            items_total += accepted
            seconds += elapsed
            latencies.append(round(elapsed * 1000, 1))
        return {
            "requests": len(latencies),
            "items_per_request": self.config.bulk_items,
            "accepted": items_total,
            "request_ms": latencies,
            "recipients_per_s": round(items_total / seconds, 1) if seconds else 0.0,
        }

    def anatomy(self, variant: str = "baseline") -> dict[str, Any]:
        """Counts and CPU time of one accept, of the relay's share and of one delivery, in a
        process of its own on the server CPUs."""
        # The relay's share is counted on the outbox the anatomy's own accepts leave.
        self.retire_outbox()
        env = dict(
            self.env,
            BENCH_VARIANT=variant,
            BENCH_ANATOMY_REQUESTS="100" if self.config.quick else "200",
            BENCH_ANATOMY_RECIPIENTS=str(self.config.http_recipients),
        )
        proc = self.procs.spawn(
            "anatomy",
            [sys.executable, "-m", "bench.anatomy", self.api_key],
            env=env,
            cpus=self.config.server_cpus,
            cwd=ROOT,
        )
        try:
            proc.popen.wait(240)
        except subprocess.TimeoutExpired as exc:
            raise PhaseFailed("the anatomy run did not finish") from exc
        finally:
            self.procs.stop(proc)
        lines = [line for line in proc.log().splitlines() if line.startswith('{"requests"')]
        if proc.popen.returncode != 0 or not lines:
            raise PhaseFailed(f"the anatomy run failed:\n{proc.log_tail()}")
        return json.loads(lines[-1])

    def phase_anatomy(self) -> None:
        self.flush_redis()
        self.warm_caches()
        result = self.anatomy()
        hello = (self.results["baselines"].get("B_http") or {}).get("server_cpu_ms_per_request")
        if hello:
            result["cpu_vs_B_http"] = round(result["cpu_ms_per_request"] / hello, 1)
        self.results["figures"]["anatomy"] = result

    def phase_bulk(self) -> None:
        self.flush_redis()
        self.warm_caches()
        api = self.start_api()
        try:
            self.results["figures"]["bulk"] = self._bulk(api)
        finally:
            self.procs.stop(api)

    def phase_fanout(self) -> None:
        """A topic of N subscribers (100,000; 10,000 quick), one POST with "topic", one relay
        (the Procfile's process, which fans out a FANOUT_CHUNK_SIZE chunk of subscribers per
        round between its outbox rounds) and no worker: timed from the POST until the last
        child is written (recipients/s, the target) and until the last child's delivery is
        on the broker."""
        from notifications.models import (
            Delivery,
            Notification,
            Owner,
            Recipient,
            Topic,
            TopicSubscription,
        )
        from notifications.services import template_save

        n = self.config.fanout_subscribers
        self.flush_redis()
        self.retire_outbox()
        owner_id = self.owner_id
        template_save(
            owner=Owner.objects.get(pk=owner_id),
            key="bench_email",
            category="bench",
            locale="en",
            content={"email": TWO_CHANNEL_TEMPLATE["email"]},
        )
        topic = Topic.objects.create(owner_id=owner_id, key=f"bench-{self.nonce}", name="bench")
        seed0 = time.perf_counter()
        Recipient.objects.bulk_create(
            [
                Recipient(
                    owner_id=owner_id,
                    external_id=f"bench-fan-{self.nonce}-{i}",
                    email=f"fan-{i}@example.com",
                    locale="en",
                    timezone="UTC",
                )
                for i in range(n)
            ],
            batch_size=5000,
        )
        ids = Recipient.objects.filter(
            owner_id=owner_id, external_id__startswith=f"bench-fan-{self.nonce}-"
        ).values_list("pk", flat=True)
        TopicSubscription.objects.bulk_create(
            [TopicSubscription(topic=topic, recipient_id=pk) for pk in ids], batch_size=5000
        )
        seeded_s = time.perf_counter() - seed0
        self.warm_caches()
        api = self.start_api()
        relay = self.start_relay()
        try:
            raw = http_request(
                "POST",
                "/api/v1/notifications",
                host=HOST,
                headers={
                    "Authorization": f"Bearer {self.api_key}",
                    "Content-Type": "application/json",
                },
                body=json.dumps(
                    {"topic": topic.key, "template": "bench_email", "data": {"order_id": "F-1"}}
                ).encode(),
            )
            cpu0 = relay.cpu_seconds()
            t0 = time.perf_counter()
            status, body = asyncio.run(http_once(HOST, api.port, raw, timeout=60))
            answered = time.perf_counter() - t0
            if status != 202:
                raise PhaseFailed(f"topic send answered {status}: {body[:300]!r}")
            parent_id = json.loads(body)["id"]

            def fanned_out() -> bool:
                if not relay.alive():
                    raise PhaseFailed(f"relay exited:\n{relay.log_tail()}")
                return Notification.objects.filter(
                    pk=parent_id, fanout_finished_at__isnull=False
                ).exists()

            procs.wait_for(fanned_out, timeout=900, what="the fan-out", interval=0.05)
            done = time.perf_counter() - t0
            children = Delivery.objects.filter(notification__parent_id=parent_id)
            procs.wait_for(
                lambda: not children.filter(enqueued_at__isnull=True).exists(),
                timeout=300,
                what="the children's deliveries on the broker",
                interval=0.05,
            )
            published = time.perf_counter() - t0
            relay_cpu = relay.cpu_seconds() - cpu0
            parent = Notification.objects.get(pk=parent_id)
            written = children.count()
        finally:
            self.procs.stop(relay)
            self.procs.stop(api)
        if parent.recipients_done != n or written != n:
            raise PhaseFailed(f"{parent.recipients_done} fanned out, {written} deliveries of {n}")
        self.results["figures"]["fanout"] = {
            "subscribers": n,
            "chunk_size": int(self.env.get("FANOUT_CHUNK_SIZE", 2000)),
            "seed_s": round(seeded_s, 1),
            "accept_ms": round(answered * 1000, 1),
            "fanned_out_s": round(done, 2),
            "published_s": round(published, 2),
            "recipients_per_s": round(n / done, 1),
            "relay_cpu_ms_per_recipient": round(relay_cpu * 1000 / n, 3),
        }
        self.flush_redis()  # the published tasks: no worker ran
        self.retire_outbox()

    def _queues_idle(self, queues: tuple[str, ...]) -> bool:
        r = self.redis()
        pipe = r.pipeline()
        for q in queues:
            pipe.llen(q)
        pipe.hlen("unacked")
        return sum(pipe.execute()) == 0

    def phase_celery(self) -> None:
        """B_publish, then B_celery, then B_celery with Celery's stock settings.

        B_publish: N no-op tasks published by Celery's own client from this process, one
        producer reused, nobody consuming (the workers are not started yet).
        B_celery: those N tasks, over two queues, consumed by two prefork workers (same
        concurrency and one-pool-per-queue topology as the channel pools, Clarion's transport
        settings) switched onto those queues at once; timed until both queues are empty and
        nothing is left unacked. Then the same again with two workers on Celery's stock
        settings (early ack, prefetch multiplier 4, no events): a reference, not a target."""
        from bench import noop_celery

        self.flush_redis()
        app = noop_celery.app
        app.conf.broker_url = self.broker_url
        queues = noop_celery.QUEUES
        n = self.config.celery_tasks
        self.results["baselines"]["B_publish"] = self._noop_publish(n)
        self.results["baselines"]["B_celery"] = self._noop_consume(n, "noop", stock=False)
        self.flush_redis()
        publish = self._noop_publish(n)
        stock = self._noop_consume(n, "noopstock", stock=True)
        stock["settings"] = "task_acks_late=False, worker_prefetch_multiplier=4, no task events"
        stock["publish_per_s"] = publish["messages_per_s"]
        self.results["baselines"]["B_celery_stock"] = stock
        if sum(self.redis().llen(q) for q in queues):
            raise PhaseFailed("no-op tasks left on the queues")

    def _noop_publish(self, n: int) -> dict[str, Any]:
        """Publish N no-op tasks over the two queues, one producer; nobody consumes them yet."""
        from bench import noop_celery

        app = noop_celery.app
        queues = noop_celery.QUEUES
        with app.connection_for_write() as conn:
            # No worker consumes these queues yet: declare them (and their bindings) so the
            # broker keeps what is published to them.
            for queue in app.amqp.queues.values():
                queue(conn.default_channel).declare()
        with app.producer_or_acquire() as producer:
            # The connection is open before the clock starts: the figure is publishing.
            producer.connection.ensure_connection()
            t0 = time.perf_counter()
            for i in range(n):
                noop_celery.noop.apply_async(args=[i], queue=queues[i % 2], producer=producer)
            publish_s = time.perf_counter() - t0
        waiting = sum(self.redis().llen(q) for q in queues)
        if waiting != n:
            raise PhaseFailed(f"{waiting} of {n} published no-op tasks are on the queues")
        return {
            "messages": n,
            "elapsed_s": round(publish_s, 3),
            "messages_per_s": round(n / publish_s, 1),
            "client": "Celery apply_async, one process, one producer reused, no consumer",
        }

    def _noop_consume(self, n: int, prefix: str, *, stock: bool) -> dict[str, Any]:
        """Start two no-op workers on the idle queue, switch them onto the loaded queues, time
        until the queues are empty and nothing is unacked."""
        from bench import noop_celery

        app = noop_celery.app
        queues = noop_celery.QUEUES
        env = dict(self.env, BENCH_NOOP_STOCK="1" if stock else "0")
        workers = [
            self.start_worker(
                f"{prefix}-{q[-1]}",
                "bench.noop_celery",
                noop_celery.IDLE_QUEUE,
                self.config.celery_concurrency,
                env=env,
            )
            for q in queues
        ]
        try:
            names = [f"{prefix}-{q[-1]}-{self.nonce}@{socket.gethostname()}" for q in queues]
            start = time.perf_counter()
            for queue, name in zip(queues, names, strict=True):
                app.control.add_consumer(queue, destination=[name])
            procs.wait_for(
                lambda: self._queues_idle(queues), timeout=300, what="no-op tasks", interval=0.01
            )
            done = time.perf_counter()
        finally:
            for w in workers:
                self.procs.stop(w)
        return {
            "tasks": n,
            "workers": len(workers),
            "concurrency_per_worker": self.config.celery_concurrency,
            "elapsed_s": round(done - start, 3),
            "tasks_per_s": round(n / (done - start), 1),
        }

    def phase_e2e(self) -> None:
        """API → outbox → relay → Celery → sandbox `sent`, with the relay and the channel pools
        of the Procfile (one per queue)."""
        from notifications.models import Delivery

        self.flush_redis()
        self.warm_caches()
        self.retire_outbox()
        last_pk = Delivery.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
        api = self.start_api()
        workers = [
            self.start_worker(q, "project", q, self.config.celery_concurrency)
            for q in ("email", "sms")
        ]
        relay = self.start_relay()
        cpu0 = {p.name: p.cpu_seconds() for p in (api, relay, *workers)}
        n = self.config.e2e_notifications
        batch = self.config.e2e_batch
        try:

            def sent() -> int:
                return Delivery.objects.filter(pk__gt=last_pk, status="sent").count()

            async def drive() -> dict[str, Any]:
                port = api.port
                t0 = time.perf_counter()
                posted = 0
                accept_end = t0 + (10 if self.config.quick else 20)
                for k in range(0, n, batch):
                    if k and time.perf_counter() > accept_end:
                        break  # bounded in time: what was accepted by then is the run
                    items = [
                        {
                            "recipient": f"bench-user-{1 + (k + i) % self.config.http_recipients}",
                            "template": "bench_two",
                            "data": {"order_id": f"E-{k + i}"},
                        }
                        for i in range(min(batch, n - k))
                    ]
                    raw = self.bulk_request(items)
                    status, body = await http_once(HOST, port, raw, timeout=120)
                    if status != 200:
                        raise PhaseFailed(f"bulk answered {status}: {body[:300]!r}")
                    posted += json.loads(body)["accepted"]
                accepted_at = time.perf_counter()
                expected = 2 * posted
                count = 0
                deadline = accepted_at + (45 if self.config.quick else 90)
                while time.perf_counter() < deadline:
                    count = await asyncio.to_thread(sent)
                    if count >= expected:
                        break
                    await asyncio.sleep(0.1)
                done = time.perf_counter()
                cpu = {
                    p.name: round(p.cpu_seconds() - cpu0[p.name], 2) for p in (api, relay, *workers)
                }
                return {
                    "notifications": posted,
                    "deliveries_expected": expected,
                    "deliveries_sent": count,
                    "accept_s": round(accepted_at - t0, 3),
                    "elapsed_s": round(done - t0, 3),
                    "deliveries_per_s": round(count / (done - t0), 1),
                    "complete": count >= expected,
                    "batch_size": self._dispatch_batch_size(),
                    "cpu_s": cpu,
                    "relay_cpu_ms_per_delivery": round(cpu["relay"] * 1000 / count, 3)
                    if count
                    else None,
                }

            self.results["figures"]["e2e"] = asyncio.run(drive())
        finally:
            self.procs.stop(relay)
            for w in workers:
                self.procs.stop(w)
            self.procs.stop(api)

    def _dispatch_batch_size(self) -> int:
        from django.conf import settings

        return int(settings.DISPATCH_BATCH_SIZE)

    def phase_relay(self) -> None:
        """Relay commit → publish latency, measured from the outside: single POSTs (2 channels)
        at a modest fixed rate, with the API and one relay running and no worker consuming;
        for each delivery, the time from the API's 202 (and from the POST going out: the
        commit lies between the two) to its message appearing in the broker's Redis list,
        which a thread polls every millisecond. The relay's own clarion_relay_lag_seconds
        histogram, from a multiprocess directory of its own, is reported beside it."""
        self.flush_redis()
        self.warm_caches()
        self.retire_outbox()
        prom_dir = VAR_DIR / "prometheus-relay"
        shutil.rmtree(prom_dir, ignore_errors=True)
        prom_dir.mkdir(parents=True)
        api = self.start_api()
        relay = self.start_relay(env=dict(self.env, PROMETHEUS_MULTIPROC_DIR=str(prom_dir)))
        try:
            out = self._relay_lag(api, relay)
            out["histogram"] = relay_histogram(prom_dir)
            self.results["figures"]["relay_lag"] = out
        finally:
            self.procs.stop(relay)
            self.procs.stop(api)

    def _relay_lag(self, api: Proc, relay: Proc) -> dict[str, Any]:
        from notifications.models import Delivery

        queues = ("email", "sms")
        seen_at: dict[int, float] = {}
        stop = threading.Event()
        poll_errors: list[str] = []

        def poll() -> None:
            r = self.redis()
            seen = dict.fromkeys(queues, 0)
            try:
                while not stop.is_set():
                    pipe = r.pipeline(transaction=False)
                    for q in queues:
                        pipe.llen(q)
                    lengths = pipe.execute()
                    now = time.perf_counter()
                    for q, length in zip(queues, lengths, strict=True):
                        if length > seen[q]:
                            # Nobody consumes: LPUSH only, the oldest message is the last.
                            for raw in r.lrange(q, -length, -(seen[q] + 1)):
                                for delivery_id in message_delivery_ids(raw):
                                    seen_at.setdefault(delivery_id, now)
                            seen[q] = length
                    time.sleep(0.001)
            except Exception as exc:  # noqa: BLE001 - reported with the figure
                poll_errors.append(f"{type(exc).__name__}: {exc}")

        rate, seconds = self.config.relay_rate, self.config.relay_seconds
        make = self.post_maker("bench_two", self.random_recipient, "relay")
        sent_at: dict[int, float] = {}
        answered: dict[str, tuple[float, float]] = {}
        statuses: Counter[int] = Counter()

        async def drive() -> None:
            conns = [await HttpConnection.open(HOST, api.port) for _ in range(4)]
            queue: asyncio.Queue[int | None] = asyncio.Queue()

            async def worker(conn: HttpConnection) -> None:
                while (index := await queue.get()) is not None:
                    raw = make(index)
                    sent_at[index] = time.perf_counter()
                    status, body = await conn.request(raw)
                    t_202 = time.perf_counter()
                    statuses[status] += 1
                    if status == 202:
                        answered[str(json.loads(body)["id"])] = (sent_at[index], t_202)

            tasks = [asyncio.ensure_future(worker(c)) for c in conns]
            start = time.perf_counter() + 0.05
            for index in range(int(rate * seconds)):
                delay = start + index / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                queue.put_nowait(index)
            for _ in tasks:
                queue.put_nowait(None)
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            for conn in conns:
                conn.close()

        poller = threading.Thread(target=poll, name="broker-poll", daemon=True)
        cpu0 = relay.cpu_seconds()
        poller.start()
        t0 = time.perf_counter()
        try:
            asyncio.run(drive())
            deliveries = list(
                Delivery.objects.filter(notification_id__in=list(answered)).values_list(
                    "id", "notification_id"
                )
            )
            procs.wait_for(
                lambda: all(d in seen_at for d, _ in deliveries) or bool(poll_errors),
                timeout=10,
                what="every delivery's message on the broker",
            )
        except TimeoutError:
            pass
        finally:
            stop.set()
            poller.join(5)
        relay_cpu = relay.cpu_seconds() - cpu0
        elapsed = time.perf_counter() - t0
        from_202, from_post = [], []
        for delivery_id, notification_id in deliveries:
            if delivery_id in seen_at:
                posted, accepted = answered[str(notification_id)]
                from_202.append((seen_at[delivery_id] - accepted) * 1000)
                from_post.append((seen_at[delivery_id] - posted) * 1000)

        def dist(values: list[float]) -> dict[str, float]:
            return {
                "p50_ms": round(percentile(values, 50), 2),
                "p90_ms": round(percentile(values, 90), 2),
                "p99_ms": round(percentile(values, 99), 2),
                "max_ms": round(max(values, default=float("nan")), 2),
            }

        return {
            "method": "202 → message in the Redis broker list (LLEN/LRANGE polled every 1 ms)",
            "rate_per_s": rate,
            "seconds": seconds,
            "posted": len(sent_at),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "deliveries": len(deliveries),
            "published_seen": len(from_202),
            "missing": len(deliveries) - len(from_202),
            "from_202": dist(from_202),
            "from_post_sent": dist(from_post),
            # The API's own answer time at that rate: the gap between the two bounds.
            "api_post_to_202": dist([(t - p) * 1000 for p, t in answered.values()]),
            "relay_cpu_share": round(relay_cpu / elapsed, 4) if elapsed else None,
            "relay_cpu_ms_per_delivery": round(relay_cpu * 1000 / len(from_202), 3)
            if from_202
            else None,
            "poll_errors": poll_errors,
        }

    def phase_ws_base(self) -> None:
        """B_ws: idle clients on a raw `websockets` server; memory per connection and a
        broadcast's arrival at every client."""
        port = self.free_port()
        server = self.procs.spawn(
            "ws-baseline",
            [sys.executable, "-m", "bench.ws_baseline", str(port)],
            env=self.env,
            cpus=self.config.server_cpus,
            cwd=ROOT,
        )
        procs.wait_for(lambda: self._listening(server, port), timeout=30, what="ws baseline")
        url = f"ws://{HOST}:{port}/"
        n = self.config.ws_clients
        try:

            async def drive() -> dict[str, Any]:
                pool = WsPool(ack=False)
                origin = f"http://{HOST}:{port}"
                warm = await pool.connect_many(
                    [url] * 20, origin=origin, source_addresses=SOURCE_ADDRESSES
                )
                await asyncio.sleep(1)
                rss0 = server.rss_kib()
                t0 = time.perf_counter()
                opened = await pool.connect_many(
                    [url] * n, origin=origin, source_addresses=SOURCE_ADDRESSES
                )
                connect_s = time.perf_counter() - t0
                await asyncio.sleep(3)
                rss1 = server.rss_kib()
                latencies: list[float] = []
                for seq in range(20):
                    t_send = time.perf_counter()
                    await pool.connections[0].send(f"broadcast {seq}")
                    end = t_send + 5
                    while len(pool.received.get(seq, [])) < warm + opened:
                        if time.perf_counter() > end:
                            break
                        await asyncio.sleep(0.005)
                    latencies += [(t - t_send) * 1000 for t in pool.received.get(seq, [])]
                await pool.close_all()
                return {
                    "clients": opened,
                    "connect_per_s": round(opened / connect_s, 1) if connect_s else None,
                    "connect_errors": dict(pool.connect_errors),
                    "rss_before_kib": rss0,
                    "rss_after_kib": rss1,
                    "kib_per_connection": round((rss1 - rss0) / opened, 2) if opened else None,
                    "broadcasts": 20,
                    "broadcast_p50_ms": round(percentile(latencies, 50), 2),
                    "broadcast_p99_ms": round(percentile(latencies, 99), 2),
                }

            self.results["baselines"]["B_ws"] = asyncio.run(drive())
        finally:
            self.procs.stop(server)

    def phase_ws(self) -> None:
        """Clarion's consumer: memory per idle connection at N clients, accept → receipt latency
        with N clients connected, then 10,000 idle connections held by one server process."""
        from notifications.tokens import recipient_token_issue

        self.flush_redis()
        self.warm_caches()
        self.retire_outbox()
        # One server process: the figures are per process.
        api = self.start_api("ws-api", workers=1)
        web_worker = self.start_worker("web", "project", "web", self.config.web_worker_concurrency)
        relay = self.start_relay()
        port = api.port
        warm_n, n, hold = (
            20,
            self.config.ws_clients,
            max(self.config.ws_hold, 20 + self.config.ws_clients),
        )
        external_ids = [f"bench-user-{i}" for i in range(1, hold + 1)]
        tokens = [
            recipient_token_issue(owner_id=self.owner_id, recipient_id=self.recipient_pks[e]).token
            for e in external_ids
        ]
        urls = [f"ws://{HOST}:{port}/ws/notifications/?token={t}" for t in tokens]
        origin = f"http://{HOST}:{port}"
        try:
            runs: list[str] = []

            async def latency_run(
                pool: WsPool, connected: list[str], samples: int, rate: float, tag: str
            ) -> dict[str, Any]:
                sent_at: dict[int, float] = {}
                # Each run's sequence numbers apart from every other run's.
                runs.append(tag)
                base = 1_000_000 * len(runs)

                def recipient(index: int) -> str:
                    return random.choice(connected)

                make = self.post_maker("bench_web", recipient, tag)

                def seq_make(index: int) -> bytes:
                    return make(base + index)

                def on_sent(index: int, due: float) -> None:
                    sent_at[base + index] = time.perf_counter()

                run: HttpRun = await open_loop(
                    HOST,
                    port,
                    seq_make,
                    rate=rate,
                    duration=samples / rate,
                    connections=8,
                    on_sent=on_sent,
                )
                end = time.perf_counter() + 10
                while time.perf_counter() < end and any(s not in pool.received for s in sent_at):
                    await asyncio.sleep(0.05)
                latencies = [
                    (pool.received[s][0] - t) * 1000
                    for s, t in sent_at.items()
                    if s in pool.received
                ]
                return {
                    "posted": run.requests,
                    "accepted": run.ok(),
                    "received": len(latencies),
                    "missing": len(sent_at) - len(latencies),
                    "p50_ms": round(percentile(latencies, 50), 2),
                    "p90_ms": round(percentile(latencies, 90), 2),
                    "p99_ms": round(percentile(latencies, 99), 2),
                    "max_ms": round(max(latencies, default=float("nan")), 2),
                    "api_p99_ms": run.summary()["p99_ms"],
                }

            async def drive() -> dict[str, Any]:
                pool = WsPool(ack=True)
                out: dict[str, Any] = {}
                opened = await pool.connect_many(
                    urls[:warm_n], origin=origin, source_addresses=SOURCE_ADDRESSES, wait_ready=True
                )
                await asyncio.sleep(2)
                rss0 = api.rss_kib()
                t0 = time.perf_counter()
                opened_n = await pool.connect_many(
                    urls[warm_n : warm_n + n],
                    origin=origin,
                    source_addresses=SOURCE_ADDRESSES,
                    wait_ready=True,
                )
                connect_s = time.perf_counter() - t0
                await asyncio.sleep(3)
                rss1 = api.rss_kib()
                out["memory"] = {
                    "clients": opened_n,
                    "connect_per_s": round(opened_n / connect_s, 1) if connect_s else None,
                    "rss_before_kib": rss0,
                    "rss_after_kib": rss1,
                    "kib_per_connection": round((rss1 - rss0) / opened_n, 2) if opened_n else None,
                }
                connected = external_ids[: warm_n + n]
                out["latency"] = await latency_run(
                    pool, connected, self.config.ws_samples, self.config.ws_rate, "ws"
                )
                out["latency"]["connected"] = pool.open_count
                # The highest POST rate at which these sockets still see frames within
                # WS_RATE_P99_MS at p99, none missing: rates doubling until one misses.
                sweep: list[dict[str, Any]] = []
                for rate in self.config.ws_sweep_rates:
                    step = await latency_run(
                        pool, connected, int(rate * WS_SWEEP_SECONDS), rate, f"rate{int(rate)}"
                    )
                    step["rate"] = rate
                    sweep.append(step)
                    if step["missing"] or not step["p99_ms"] <= WS_RATE_P99_MS:
                        break
                held = [
                    s["rate"] for s in sweep if not s["missing"] and s["p99_ms"] <= WS_RATE_P99_MS
                ]
                out["rate_sweep"] = {
                    "p99_bound_ms": WS_RATE_P99_MS,
                    "highest_rate": max(held, default=None),
                    "steps": sweep,
                }
                t1 = time.perf_counter()
                more = await pool.connect_many(
                    urls[warm_n + n : hold],
                    origin=origin,
                    source_addresses=SOURCE_ADDRESSES,
                    wait_ready=True,
                    parallel=200,
                )
                hold_connect_s = time.perf_counter() - t1
                first_attempt_errors = dict(pool.connect_errors)
                if pool.failed_urls:
                    # As the browser client does: a refused socket tries again a moment later.
                    await asyncio.sleep(2)
                    more += await pool.connect_many(
                        list(pool.failed_urls),
                        origin=origin,
                        source_addresses=SOURCE_ADDRESSES,
                        wait_ready=True,
                        parallel=50,
                    )
                target = hold
                held_min = pool.open_count
                # The server's CPU while it holds every socket idle (pings and pongs only).
                await asyncio.sleep(2)
                idle_cpu0, idle_t0 = api.cpu_seconds(), time.perf_counter()
                end = time.perf_counter() + self.config.ws_hold_seconds
                while time.perf_counter() < end:
                    await asyncio.sleep(0.5)
                    held_min = min(held_min, pool.open_count)
                    if not api.alive():
                        break
                idle_cpu = (api.cpu_seconds() - idle_cpu0) / (time.perf_counter() - idle_t0)
                rss2 = api.rss_kib() if api.alive() else None
                check = await latency_run(
                    pool,
                    external_ids[:hold],
                    self.config.ws_check_samples,
                    self.config.ws_rate,
                    "hold",
                )
                check["connected"] = pool.open_count
                out["hold"] = {
                    "target": target,
                    "opened": opened + opened_n + more,
                    "connect_per_s": round(more / hold_connect_s, 1) if hold_connect_s else None,
                    "first_attempt_errors": first_attempt_errors,
                    "errors_after_retry": dict(pool.connect_errors - Counter(first_attempt_errors)),
                    "held_seconds": self.config.ws_hold_seconds,
                    "held_min": held_min,
                    "open_at_end": pool.open_count,
                    "server_alive": api.alive(),
                    "idle_cpu_percent": round(idle_cpu * 100, 2),
                    "rss_kib": rss2,
                    "kib_per_connection": round((rss2 - rss0) / (pool.open_count - warm_n), 2)
                    if rss2 and pool.open_count > warm_n
                    else None,
                    "check": check,
                }
                await pool.close_all()
                return out

            self.results["figures"]["ws"] = asyncio.run(drive())
        finally:
            self.procs.stop(relay)
            self.procs.stop(web_worker)
            self.procs.stop(api)

    def phase_idle(self) -> None:
        """Idle CPU of the whole `make run` process set: every process of the Procfile (web,
        relay, the channel workers, maintenance, beat, flower), started as the Procfile says,
        pinned to the server CPUs, on the bench's database and Redis, with no traffic. Once
        every one is ready and a few seconds have passed, the CPU time of each process group
        (a worker with its pool children) over BENCH_IDLE_SECONDS."""
        self.flush_redis()
        self.retire_outbox()
        web_port, flower_port = self.free_port(), self.free_port()
        env = dict(self.env, PORT=str(web_port), FLOWER_PORT=str(flower_port))
        started: list[Proc] = []
        try:
            for name, argv in procfile_commands(ROOT / "Procfile", env):
                proc = self.procs.spawn(
                    f"idle-{name}", argv, env=env, cpus=self.config.server_cpus, cwd=ROOT
                )
                started.append(proc)

            def ready(proc: Proc) -> bool:
                if not proc.alive():
                    raise PhaseFailed(f"{proc.name} exited:\n{proc.log_tail()}")
                argv = proc.popen.args
                if proc.name == "idle-web":
                    return self._listening(proc, web_port)
                if proc.name == "idle-flower":
                    return self._listening(proc, flower_port)
                if "worker" in argv:
                    return " ready." in proc.log()
                if "relay" in argv:
                    return "relay started" in proc.log()
                return True

            procs.wait_for(
                lambda: all(ready(p) for p in started),
                timeout=120,
                what="the Procfile's processes to be ready",
                interval=0.5,
            )
            time.sleep(3 if self.config.quick else 10)
            cpu0 = {p.name: p.cpu_seconds() for p in started}
            t0 = time.perf_counter()
            time.sleep(self.config.idle_seconds)
            elapsed = time.perf_counter() - t0
            cpu = {p.name: p.cpu_seconds() - cpu0[p.name] for p in started}
            dead = [p.name for p in started if not p.alive()]
            if dead:
                raise PhaseFailed(f"{dead} exited while idle")
            total = sum(cpu.values())
            self.results["figures"]["idle"] = {
                "seconds": round(elapsed, 1),
                "processes": {
                    name.removeprefix("idle-"): {
                        "cpu_s": round(seconds, 3),
                        "share_of_core": round(seconds / elapsed, 4),
                    }
                    for name, seconds in cpu.items()
                },
                "cpu_s": round(total, 3),
                "share_of_core": round(total / elapsed, 4),
            }
        finally:
            for proc in reversed(started):
                self.procs.stop(proc)

    def phase_ws_soak(self) -> None:
        """WebSocket memory soak: against one server process, waves of BENCH_SOAK_WAVE sockets
        are opened (each with its recipient token, answering pings as the browser does),
        held a moment and closed, for BENCH_SOAK_SECONDS (cut short to stay within the run's
        budget); the server's RSS is sampled after each wave has closed. Does it level off?"""
        from notifications.tokens import recipient_token_issue

        self.flush_redis()
        remaining = self.budget_left() - 45
        seconds = min(self.config.soak_seconds, remaining)
        if seconds < 20:
            raise PhaseFailed(f"only {remaining:.0f}s of the run's budget left for the soak")
        api = self.start_api("soak-api", workers=1)
        port = api.port
        wave = self.config.soak_wave
        ids = list(self.recipient_pks.items())[: max(wave, 1)]
        urls = [
            f"ws://{HOST}:{port}/ws/notifications/?token="
            + recipient_token_issue(owner_id=self.owner_id, recipient_id=pk).token
            for _, pk in ids
        ]
        origin = f"http://{HOST}:{port}"
        try:

            async def drive() -> dict[str, Any]:
                warm = WsPool(ack=True)
                await warm.connect_many(
                    urls[:20], origin=origin, source_addresses=SOURCE_ADDRESSES, wait_ready=True
                )
                await warm.close_all()
                await asyncio.sleep(2)
                rss0 = api.rss_kib()
                waves: list[dict[str, Any]] = []
                errors: Counter[str] = Counter()
                t0 = time.perf_counter()
                while time.perf_counter() - t0 < seconds and api.alive():
                    pool = WsPool(ack=True)
                    w0 = time.perf_counter()
                    opened = await pool.connect_many(
                        urls[:wave],
                        origin=origin,
                        source_addresses=SOURCE_ADDRESSES,
                        wait_ready=True,
                        parallel=200,
                    )
                    errors.update(pool.connect_errors)
                    rss_open = api.rss_kib()
                    await asyncio.sleep(self.config.soak_hold_seconds)
                    await pool.close_all()
                    await asyncio.sleep(1.0)
                    waves.append(
                        {
                            "opened": opened,
                            "seconds": round(time.perf_counter() - w0, 1),
                            "rss_open_kib": rss_open,
                            "rss_closed_kib": api.rss_kib() if api.alive() else None,
                        }
                    )
                series = [w["rss_closed_kib"] for w in waves if w["rss_closed_kib"]]
                # The server collects what its gc.freeze() kept alive in one go now and then,
                # so the series is a saw-tooth when memory is bounded: compare the peak of the
                # last third with the peak before it.
                cut = len(series) - max(1, len(series) // 3)
                growth = max(series[cut:]) / max(series[:cut]) - 1 if len(series) >= 3 else None
                log = api.log()
                return {
                    "wave_size": wave,
                    "waves": len(waves),
                    "sockets_opened": sum(w["opened"] for w in waves),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "connect_errors": dict(errors),
                    "server_alive": api.alive(),
                    "rss_start_kib": rss0,
                    "rss_closed_kib": series,
                    "rss_open_kib": [w["rss_open_kib"] for w in waves],
                    "wave_seconds": [w["seconds"] for w in waves],
                    "last_third_growth": round(growth, 4) if growth is not None else None,
                    "server_full_collections": log.count("gc: full collection"),
                    "levels_off": growth is not None and growth < 0.05,
                }

            self.results["figures"]["ws_soak"] = asyncio.run(drive())
        finally:
            self.procs.stop(api)

    def budget_left(self) -> float:
        return self.config.budget_seconds - (time.monotonic() - self.started_monotonic)

    # --- assembling -------------------------------------------------------------------------

    def versions(self) -> dict[str, str]:
        from django.db import connection

        try:
            redis_version = self.redis().info("server")["redis_version"]
        except Exception as exc:  # noqa: BLE001 - a version string is not worth failing a run
            redis_version = f"? ({exc})"
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SHOW server_version")
                database = f"PostgreSQL {cursor.fetchone()[0]}"
        else:
            import sqlite3

            database = f"SQLite {sqlite3.sqlite_version}"
        return sysinfo.versions(redis_version=redis_version, database=database)

    def targets(self) -> list[dict[str, Any]]:
        b = self.results["baselines"]
        f = self.results["figures"]
        out: list[dict[str, Any]] = []

        def add(
            figure: str,
            value: float | int | None,
            unit: str,
            target: str,
            passed: bool | None,
            *,
            ratio: float | None = None,
            baseline_text: str = "",
            reference_text: str = "",
            result: str | None = None,
        ) -> None:
            if result is None:
                result = "ERROR" if passed is None else ("PASS" if passed else "MISS")
            out.append(
                {
                    "figure": figure,
                    "value": value,
                    "unit": unit,
                    "ratio": round(ratio, 3) if ratio is not None else None,
                    "baseline_text": baseline_text,
                    "target": target,
                    "result": result,
                    "reference_text": reference_text,
                }
            )

        def ratio_of(a: float | None, base: float | None) -> float | None:
            return a / base if a is not None and base else None

        b_http = (b.get("B_http") or {}).get("rate_per_s")
        b_celery = (b.get("B_celery") or {}).get("tasks_per_s")
        b_publish = (b.get("B_publish") or {}).get("messages_per_s")
        b_stock = (b.get("B_celery_stock") or {}).get("tasks_per_s")
        b_ws_mem = (b.get("B_ws") or {}).get("kib_per_connection")
        if "api" in self.config.phases:
            api = f.get("api_max") or {}
            value = api.get("accepts_per_s")
            r = ratio_of(value, b_http)
            bad = api.get("non_2xx", 0) + api.get("socket_errors", 0)
            add(
                "API accepts/s (POST + Idempotency-Key, 2 channels)",
                value,
                "/s",
                "≥ 0.40 x B_http",
                None if r is None else (r >= 0.40 and bad <= 0.01 * max(1, api.get("requests", 0))),
                ratio=r,
                baseline_text=f"B_http {b_http:,.0f}/s" if b_http else "",
            )
            fixed = f.get("api_fixed_rate") or {}
            p99 = fixed.get("p99_ms")
            errors = fixed.get("errors", 0) + sum(
                n for s, n in (fixed.get("statuses") or {}).items() if s not in ("200", "202")
            )
            add(
                f"API p99 at 70% of max ({fixed.get('target_rate', '?')}/s, open loop)",
                p99,
                "ms",
                "< 50 ms",
                None if p99 is None else (p99 < 50 and errors == 0),
            )
        if "bulk" in self.config.phases:
            bulk = f.get("bulk") or {}
            value = bulk.get("recipients_per_s")
            r = ratio_of(value, b_publish)
            add(
                "bulk accept, recipients/s (1000 items/request)",
                value,
                "/s",
                "≥ 5 x B_publish",
                None if r is None else r >= 5,
                ratio=r,
                baseline_text=f"B_publish {b_publish:,.0f}/s" if b_publish else "",
            )
        if "fanout" in self.config.phases:
            fan = f.get("fanout") or {}
            value = fan.get("recipients_per_s")
            r = ratio_of(value, b_publish)
            add(
                f"topic fan-out, recipients/s ({fan.get('subscribers', '?'):,} subscribers)"
                if fan.get("subscribers")
                else "topic fan-out, recipients/s",
                value,
                "/s",
                "≥ 5 x B_publish",
                None if r is None else r >= 5,
                ratio=r,
                baseline_text=f"B_publish {b_publish:,.0f}/s" if b_publish else "",
            )
        if "e2e" in self.config.phases:
            e2e = f.get("e2e") or {}
            value = e2e.get("deliveries_per_s")
            r = ratio_of(value, b_celery)
            r_stock = ratio_of(value, b_stock)
            add(
                "end-to-end deliveries/s (API → outbox → relay → worker → sandbox sent)",
                value,
                "/s",
                "≥ 2 x B_celery",
                None if r is None else (r >= 2 and bool(e2e.get("complete"))),
                ratio=r,
                baseline_text=f"B_celery {b_celery:,.0f}/s" if b_celery else "",
                reference_text=f"B_celery stock {b_stock:,.0f}/s: {r_stock:.2f}x"
                if b_stock and r_stock is not None
                else "",
            )
        if "relay" in self.config.phases:
            lag = f.get("relay_lag") or {}
            p99 = (lag.get("from_202") or {}).get("p99_ms")
            p50 = (lag.get("from_202") or {}).get("p50_ms")
            hist = lag.get("histogram") or {}
            add(
                f"relay commit → publish p99 (p50 {_num(p50)} ms), "
                f"{lag.get('rate_per_s', '?')}/s single POSTs, 202 → broker list",
                p99,
                "ms",
                "reported",
                None,
                result="-"
                if p99 is not None and p99 == p99 and not lag.get("missing")
                else "ERROR",
                reference_text=f"relay histogram p50 {_num(hist.get('p50_ms'))} / "
                f"p99 {_num(hist.get('p99_ms'))} ms"
                if hist.get("count")
                else "",
            )
        if "ws" in self.config.phases:
            ws = f.get("ws") or {}
            lat = ws.get("latency") or {}
            p99 = lat.get("p99_ms")
            add(
                f"WebSocket POST → receipt p99, {lat.get('connected', '?')} clients",
                p99,
                "ms",
                "< 50 ms",
                None if p99 is None or p99 != p99 else (p99 < 50 and lat.get("missing", 1) == 0),
                baseline_text=(
                    f"B_ws broadcast p99 {b['B_ws']['broadcast_p99_ms']} ms"
                    if b.get("B_ws")
                    else ""
                ),
            )
            mem = (ws.get("memory") or {}).get("kib_per_connection")
            r = ratio_of(mem, b_ws_mem)
            add(
                "memory per idle WebSocket connection",
                mem,
                "KiB",
                "≤ 2 x B_ws",
                None if r is None else r <= 2,
                ratio=r,
                baseline_text=f"B_ws {b_ws_mem} KiB" if b_ws_mem else "",
            )
            hold = ws.get("hold") or {}
            check = hold.get("check") or {}
            p99 = check.get("p99_ms")
            add(
                f"WebSocket POST → receipt p99, {check.get('connected', '?')} clients",
                p99,
                "ms",
                "< 100 ms",
                None if p99 is None or p99 != p99 else (p99 < 100 and check.get("missing", 1) == 0),
            )
            rate = hold.get("connect_per_s")
            b_ws_rate = (b.get("B_ws") or {}).get("connect_per_s")
            add(
                "WebSocket connects per second (hold phase, token + backlog + subscription)",
                rate,
                "/s",
                "≥ 1,000/s",
                None if rate is None else rate >= 1000,
                ratio=ratio_of(rate, b_ws_rate),
                baseline_text=f"B_ws {b_ws_rate}/s" if b_ws_rate else "",
            )
            idle_cpu = hold.get("idle_cpu_percent")
            add(
                f"server CPU holding {hold.get('open_at_end', '?')} idle WebSockets",
                idle_cpu,
                "% of a core",
                "< 5 %",
                None if idle_cpu is None else idle_cpu < 5,
            )
            sweep = ws.get("rate_sweep") or {}
            highest = sweep.get("highest_rate")
            add(
                f"highest POST rate with WebSocket p99 < {WS_RATE_P99_MS:.0f} ms, "
                f"{lat.get('connected', '?')} clients",
                highest,
                "/s",
                "≥ 100/s",
                None if not sweep else (highest or 0) >= 100,
                reference_text="steps: "
                + ", ".join(
                    f"{step['rate']:.0f}/s p99 {step['p99_ms']} ms"
                    + (f" ({step['missing']} missing)" if step.get("missing") else "")
                    for step in sweep.get("steps", [])
                ),
            )
            held = hold.get("open_at_end")
            target_n = hold.get("target", self.config.ws_hold)
            add(
                "idle connections held by one server process",
                held,
                "",
                f"{target_n:,} held {hold.get('held_seconds', '?')} s",
                None
                if held is None
                else (
                    held >= target_n
                    and hold.get("held_min", 0) >= target_n
                    and bool(hold.get("server_alive"))
                    and (hold.get("check") or {}).get("missing", 1) == 0
                ),
            )
        if "idle" in self.config.phases:
            idle = f.get("idle") or {}
            share = idle.get("share_of_core")
            add(
                f"idle CPU of the `make run` process set ({len(idle.get('processes', {}))} "
                f"processes, {idle.get('seconds', '?')} s)",
                round(100 * share, 2) if share is not None else None,
                "% of a core",
                "< 2 % of one core",
                None if share is None else share < 0.02,
            )
        if "ws_soak" in self.config.phases:
            soak = f.get("ws_soak") or {}
            growth = soak.get("last_third_growth")
            add(
                f"WebSocket memory soak: RSS peak of the last third over the peak before, "
                f"{soak.get('waves', '?')} waves ({soak.get('sockets_opened', '?')} sockets "
                "opened and closed)",
                round(100 * growth, 2) if growth is not None else None,
                "%",
                "< 5 % (levels off)" + ("" if self.config.quick else ", ≥ 10,000 sockets"),
                None
                if growth is None
                else (
                    growth < 0.05
                    and bool(soak.get("server_alive"))
                    and soak.get("sockets_opened", 0) >= (0 if self.config.quick else 10_000)
                ),
            )
        return out

    def run(self) -> int:
        started = time.time()
        self.started_monotonic = time.monotonic()
        self.results["run"] = {
            "started_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "quick": self.config.quick,
            "phases": self.config.phases,
            "server_cpus": ",".join(map(str, sorted(self.config.server_cpus or []))) or "any",
            "load_cpus": ",".join(map(str, sorted(self.config.load_cpus or []))) or "any",
            "web_workers": self.config.web_workers,
            "celery_concurrency": self.config.celery_concurrency,
            "http_connections": self.config.http_connections,
            "nofile": procs.raise_nofile(),
        }
        self.results["machine"] = sysinfo.machine()
        try:
            print(f"bench: setting up ({'; '.join(self.notes)})", flush=True)
            self.setup()
            self.results["versions"] = self.versions()
            for phase in self.config.phases:
                print(f"bench: {phase} …", flush=True)
                t0 = time.monotonic()
                try:
                    getattr(self, f"phase_{phase}")()
                except Exception as exc:  # noqa: BLE001 - one broken phase must not hide the rest
                    self.results["errors"][phase] = f"{type(exc).__name__}: {exc}"
                    print(f"bench: {phase} failed: {exc}", flush=True)
                    traceback.print_exc()
                    self.procs.stop_all()
                print(f"bench: {phase} done in {time.monotonic() - t0:.0f}s", flush=True)
        except procs.Deadline as exc:
            self.results["errors"]["deadline"] = str(exc)
            print(f"bench: {exc}; stopping", flush=True)
        finally:
            self.procs.stop_all()
            try:
                self.flush_redis()
            except Exception as exc:  # noqa: BLE001 - cleaning up after a failure already reported
                print(f"bench: could not flush Redis: {exc}", flush=True)
        self.results["run"]["duration_s"] = round(time.time() - started)
        self.results["notes"] = self.notes + self.derived_notes()
        self.results["targets"] = self.targets()
        RESULTS_PATH.write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        if not self.config.quick and set(self.config.phases) == set(PHASES):
            report.update_docs(DOC_PATH, self.results)
        print()
        print(report.text_table(self.results))
        for extra in (report.anatomy_markdown(self.results), report.figures_markdown(self.results)):
            if extra:
                print()
                print(extra)
        print()
        for note in self.results["notes"]:
            print(f"note: {note}")
        for phase, error in self.results["errors"].items():
            print(f"error in {phase}: {error}")
        print(
            f"\nresults: {RESULTS_PATH.relative_to(ROOT)}; logs: {VAR_DIR.relative_to(ROOT)}/logs"
        )
        return 0

    def derived_notes(self) -> list[str]:
        notes = []
        machine = self.results.get("machine", {})
        try:
            load = float(str(machine.get("loadavg_at_start", "0")).split()[0])
        except ValueError:
            load = 0.0
        if load > 0.5 * (machine.get("nproc") or 1):
            notes.append(
                f"PROVISIONAL: the machine was busy when the run started (load average "
                f"{load} on {machine.get('nproc')} CPUs); rerun on a quiet machine"
            )
        f = self.results["figures"]
        gen = f.get("load_generator", {}).get("ceiling")
        fixed = f.get("api_fixed_rate")
        if gen and fixed:
            notes.append(
                f"load generator: ceiling {gen['rate_per_s']:,.0f} req/s closed loop "
                "against B_http "
                f"({gen['client_cpu_share']:.0%} of its core); at the fixed rate of "
                f"{fixed['target_rate']}/s it used {fixed['client_cpu_share']:.0%} of its core, "
                f"schedule lag p99 {fixed['generator_lag_p99_ms']} ms"
            )
        e2e = f.get("e2e")
        if e2e and not e2e.get("complete"):
            notes.append(
                "end-to-end run incomplete: "
                f"{e2e['deliveries_sent']}/{e2e['deliveries_expected']} sent"
            )
        lag = f.get("relay_lag") or {}
        if lag.get("missing") or lag.get("poll_errors"):
            notes.append(
                f"relay latency: {lag.get('missing')} of {lag.get('deliveries')} deliveries "
                f"never seen on the broker {lag.get('poll_errors') or ''}"
            )
        soak = f.get("ws_soak") or {}
        if soak and soak.get("seconds", 0) < self.config.soak_seconds:
            notes.append(
                f"WebSocket soak cut to {soak.get('seconds')} s (of {self.config.soak_seconds} s) "
                "to stay within the run's budget"
            )
        if soak.get("connect_errors"):
            notes.append(f"WebSocket soak: handshakes refused {soak['connect_errors']}")
        ws = f.get("ws") or {}
        lat = ws.get("latency") or {}
        if lat.get("missing"):
            notes.append(
                f"WebSocket: {lat['missing']} of {lat['posted']} notifications had not reached "
                f"their socket 10 s after the last POST (API p99 during that run: "
                f"{lat.get('api_p99_ms')} ms)"
            )
        hold = ws.get("hold") or {}
        if hold.get("first_attempt_errors"):
            notes.append(
                f"WebSocket hold: handshakes refused on the first attempt "
                f"{hold['first_attempt_errors']}, still refused after one retry "
                f"{hold.get('errors_after_retry') or {}}; see var/bench/logs/ws-api.log"
            )
        if self.config.server_cpus is None:
            notes.append("fewer than 2 CPUs: nothing was pinned")
        return notes


_WRK_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _wrk_ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not match:
        return float("nan")
    return float(match[1]) * _WRK_UNITS[match[2]]


def parse_wrk(output: str) -> dict[str, Any]:
    result: dict[str, Any] = {"non_2xx": 0, "socket_errors": 0}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", output):
        result["rate_per_s"] = float(m[1])
    else:
        raise PhaseFailed(f"wrk printed no rate:\n{output[-2000:]}")
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+)", output):
        result["requests"] = int(m[1])
    for q in ("50", "75", "90", "99"):
        if m := re.search(rf"^\s+{q}%\s+(\S+)", output, re.MULTILINE):
            result[f"p{q}_ms"] = round(_wrk_ms(m[1]), 2)
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        result["non_2xx"] = int(m[1])
    if m := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        result["socket_errors"] = sum(int(x) for x in m.groups())
    return result


def _num(value: Any) -> str:
    return "?" if value is None else f"{value:g}"


def message_delivery_ids(raw: bytes) -> list[int]:
    """The delivery ids a `clarion.deliver.<channel>` message on the Redis broker carries
    (kombu's JSON envelope, the task's args `[[id, ...]]` in a base64 body)."""
    envelope = json.loads(raw)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0]
    return [int(i) for i in args[0]]


def relay_histogram(prom_dir: Path) -> dict[str, Any]:
    """clarion_relay_lag_seconds as the relay wrote it to its multiprocess directory: count,
    and p50/p99 interpolated within the buckets (coarse: the buckets are 1, 2.5, 5, 10, 25 ms
    ...)."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(prom_dir))
    buckets: list[tuple[float, float]] = []
    count = total = 0.0
    for metric in registry.collect():
        if metric.name != "clarion_relay_lag_seconds":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    buckets.sort()

    def quantile(q: float) -> float | None:
        if not count:
            return None
        rank, lower, below = q * count, 0.0, 0.0
        for upper, cumulative in buckets:
            if cumulative >= rank:
                if upper == float("inf"):
                    return round(lower * 1000, 2)
                share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
                return round((lower + share * (upper - lower)) * 1000, 2)
            lower, below = upper, cumulative
        return None

    return {
        "method": "relay's clarion_relay_lag_seconds (created_at, before the commit → publish)",
        "count": int(count),
        "mean_ms": round(total / count * 1000, 2) if count else None,
        "p50_ms": quantile(0.50),
        "p99_ms": quantile(0.99),
    }


def main() -> int:
    config = Config.from_env()
    procs.raise_nofile()
    procs.pin(config.load_cpus)
    procs.install_signal_handlers(config.budget_seconds)
    if not shutil.which("wrk") and {"http", "api"} & set(config.phases):
        sys.exit("wrk is not installed: apt-get install -y wrk (make bench does this)")
    bench = Bench(config)
    try:
        return bench.run()
    finally:
        bench.procs.stop_all()
        try:
            from django.db import connections

            connections.close_all()
            drop_database(bench.env)
        except Exception as exc:  # noqa: BLE001 - report, do not mask the run's own outcome
            print(f"bench: could not drop the bench database: {exc}", file=sys.stderr)
        if "REDIS_URL" not in bench.env:
            from project import embedded_redis

            embedded_redis.stop(VAR_DIR)


if __name__ == "__main__":
    sys.exit(main())
