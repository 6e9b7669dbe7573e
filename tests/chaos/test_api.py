"""Chaos at the API: fifty concurrent posts with one Idempotency-Key, the database gone while
clients post (clean JSON 503s, not tracebacks), and, under `make chaos` only, the machine's
PostgreSQL restarted under load with nothing half-written afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, connections

from notifications.models import Delivery, Notification
from tests.chaos.conftest import committed, item, received, record
from tests.chaos.harness import (
    FULL,
    RECOVERY_ENV,
    Ledger,
    WorkerSpec,
    http,
    report,
    run,
    scale,
    start_api,
    start_workers,
    tally,
    wait_settled,
)
from tests.conftest import Process, free_port, wait_until
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.factories import api_key_for

pytestmark = [pytest.mark.chaos, pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

STAMPEDE = 50


def test_fifty_concurrent_posts_with_one_idempotency_key_make_one_notification(
    owner: Any,
    chaos_template: Any,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    rounds = scale(1, 10)
    env = {**RECOVERY_ENV, **sendgrid.settings_env(), **twilio.settings_env()}
    api_key = api_key_for(owner)
    server = start_api(spawn, tmp_path, workers=2, **env)
    start_workers(spawn, tmp_path, [WorkerSpec("send", "email,sms")], **env)
    ledger = Ledger()
    statuses: Counter[int] = Counter()
    for n in range(rounds):
        body = item(n, "idem")
        key = f"chaos-stampede-{n}"
        barrier = threading.Barrier(STAMPEDE)

        def post(
            _: int,
            body: dict[str, Any] = body,
            key: str = key,
            barrier: threading.Barrier = barrier,
        ) -> Any:
            # All fifty leave together, so that they race for the key.
            barrier.wait(30)
            return server.post("/api/v1/notifications", body, api_key, {"Idempotency-Key": key})

        with ThreadPoolExecutor(max_workers=STAMPEDE) as pool:
            answers = list(pool.map(post, range(STAMPEDE)))
        statuses.update(status for status, _, _ in answers)
        [created] = [json.loads(b) for status, _, b in answers if status == 202]
        replays = [(h.get("idempotent-replayed"), json.loads(b)) for s, h, b in answers if s == 200]
        conflicts = {json.loads(b)["error"] for status, _, b in answers if status == 409}
        assert {status for status, _, _ in answers} <= {200, 202, 409}, answers
        assert replays == [("true", created)] * len(replays)
        assert conflicts <= {"conflict"}
        assert [d["channel"] for d in created["deliveries"]] == ["email", "sms"]
        record(ledger, created["id"], body["data"]["ref"], created["deliveries"])
        rows = Notification.objects.filter(idempotency_key=key)
        assert [str(pk) for pk in rows.values_list("pk", flat=True)] == [created["id"]]
        assert sorted(rows.get().deliveries.values_list("channel", flat=True)) == ["email", "sms"]
    wait_settled(ledger.accepted, timeout=60, message="the stampede's deliveries sent")
    result = tally(
        "6 idempotency stampede",
        ledger,
        received(sendgrid, twilio),
        note=f"{rounds} x {STAMPEDE} posts: {dict(sorted(statuses.items()))}",
    )
    assert statuses[202] == rounds
    assert (result.lost, result.duplicated, result.unexpected) == (0, 0, 0)
    assert Notification.objects.count() == rounds


def _is_json_503(status: int, headers: dict[str, str], body: bytes) -> bool:
    try:
        error = json.loads(body).get("error")
    except ValueError:
        return False
    return status == 503 and bool(error) and "retry-after" in headers


def test_database_unreachable_answers_json_503_with_retry_after(
    owner: Any, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    """An API process whose database does not answer (nothing listens on its port)."""
    api_key = api_key_for(owner)
    server = start_api(
        spawn, tmp_path, DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/down"
    )
    calls = [
        ("POST", "/api/v1/notifications", item(1, "down")),
        ("GET", f"/api/v1/notifications/{'0' * 8}-0000-4000-8000-{'0' * 12}", None),
        ("GET", "/api/v1/templates", None),
        ("PUT", "/api/v1/recipients/u1", {"email": "u1@example.com"}),
    ]
    answers = [http(method, server.url + path, body, api_key) for method, path, body in calls]
    report(
        "5 database unreachable: "
        + ", ".join(
            f"{m} {p.split('/')[3]} -> {a[0]}" for (m, p, _), a in zip(calls, answers, strict=True)
        )
    )
    assert [_is_json_503(*answer) for answer in answers] == [True] * len(calls)


RESTART_POSTGRES = os.environ.get("CHAOS_RESTART_POSTGRES") == "1"


def _postgres(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action])


@pytest.mark.skipif(
    not (RESTART_POSTGRES and FULL and connection.vendor == "postgresql"),
    reason="make chaos only: restarts the machine's PostgreSQL",
)
def test_postgres_restarted_under_api_load_answers_503_and_half_writes_nothing(
    owner: Any,
    chaos_template: Any,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    outage = 5.0
    env = {**RECOVERY_ENV, **sendgrid.settings_env(), **twilio.settings_env()}
    api_key = api_key_for(owner)
    # The pool is what production runs with (settings: DATABASE_POOL defaults to true).
    server = start_api(spawn, tmp_path, workers=2, DATABASE_POOL="true", **env)
    start_workers(
        spawn,
        tmp_path,
        [
            WorkerSpec("sweeper", "maintenance", concurrency=1, beat=True),
            WorkerSpec("send", "email,sms"),
        ],
        **env,
    )
    answers: list[tuple[float, int, dict[str, str], bytes, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        for n in range(worker * 100_000, worker * 100_000 + 5000):
            if stop.is_set():
                return
            sent = item(n, "pg")
            status, headers, body = server.post("/api/v1/notifications", sent, api_key)
            with lock:
                answers.append((time.monotonic(), status, headers, body, sent["data"]["ref"]))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        down_at = time.monotonic()
        _postgres("stop")
        time.sleep(outage)
    finally:
        _postgres("start")
    up_at = time.monotonic()
    wait_until(
        lambda: (
            subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1"], check=False).returncode == 0
        ),
        timeout=60,
        message="PostgreSQL to accept connections again",
    )
    # This process's own connection died with the server.
    connections.close_all()
    wait_until(
        lambda: any(a[1] == 202 and a[0] > up_at for a in answers),
        timeout=60,
        message="a 202 after the restart",
    )
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(60)
    codes = Counter(a[1] for a in answers if a[0] >= down_at)
    failures = [a for a in answers if a[1] != 202]
    not_clean = [(a[1], a[3][:200]) for a in failures if not _is_json_503(a[1], a[2], a[3])]
    # Nothing half-written: every notification has its two deliveries, every 202 its rows.
    ledger = Ledger()
    written = committed(ledger)
    accepted = {json.loads(a[3])["id"] for a in answers if a[1] == 202}
    wait_settled(ledger.accepted, timeout=300, message="every committed delivery sent")
    # A worker that had claimed a delivery when the server went away could not record its
    # attempt (nor, if it had sent it, mark it sent): after its lease it is sent again. Those
    # deliveries count fewer attempt records than attempts, and bound the duplicates, as the
    # deliveries in flight at a kill do.
    exposed = sum(
        1
        for delivery in Delivery.objects.prefetch_related("attempt_log")
        if len(delivery.attempt_log.all()) < delivery.attempts
    )
    result = tally(
        "5 PostgreSQL restarted under API load",
        ledger,
        received(sendgrid, twilio),
        note=f"answers from the stop on: {dict(sorted(codes.items()))}; "
        f"{len(not_clean)} not a JSON 503 with Retry-After; {exposed} claimed when it stopped",
    )
    assert set(written.values()) <= {("email", "sms")}
    assert accepted <= set(written)
    assert (result.lost, result.unexpected) == (0, 0)
    assert result.duplicated <= exposed
    assert not_clean == []
