"""Chaos between the database and the broker: a Redis broker killed and restarted with a
backlog in it, an API whose broker is down (it publishes nothing, so it must not care), an API
process killed under load, and the outbox relay killed in the middle of publishing. The
relay and the sweeper must find every committed delivery, and send none twice."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from notifications.models import Delivery, DeliveryStatus
from tests.chaos.conftest import committed, item, received, record
from tests.chaos.harness import (
    RECOVERY_ENV,
    Ledger,
    PrivateRedis,
    WorkerSpec,
    http,
    kill_group,
    report,
    scale,
    start_api,
    start_relay,
    start_workers,
    tally,
    wait_settled,
)
from tests.conftest import Process, free_port, wait_until
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.factories import api_key_for

pytestmark = [pytest.mark.chaos, pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]


def _post_bulk(url: str, api_key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    status, _, body = http(
        "POST", url + "/api/v1/notifications/bulk", {"notifications": items}, api_key, timeout=600
    )
    assert status == 200, body[:500]
    answer: dict[str, Any] = json.loads(body)
    return answer


def test_broker_killed_and_restarted_with_a_backlog_loses_nothing(
    owner: Any,
    chaos_template: Any,
    twilio: TwilioEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    backlog = scale(200, 5000)
    broker = PrivateRedis(spawn, tmp_path / "broker")
    broker.start()
    # Only the broker is the scenario's own Redis: cache, rate limits and breakers stay on
    # the suite's.
    # Small batches: the broker holds many messages, so the kill finds some still queued.
    batch = 5
    env = {
        **RECOVERY_ENV,
        **twilio.settings_env(),
        "CELERY_BROKER_URL": broker.url,
        "DISPATCH_BATCH_SIZE": str(batch),
    }
    api_key = api_key_for(owner)
    server = start_api(spawn, tmp_path, workers=2, **env)
    items = [item(n, "broker", channels=["sms"]) for n in range(backlog)]
    chunks = [items[i : i + 250] for i in range(0, len(items), 250)]
    ledger = Ledger()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for chunk, body in zip(
            chunks, pool.map(lambda c: _post_bulk(server.url, api_key, c), chunks), strict=True
        ):
            assert (body["accepted"], body["rejected"]) == (len(chunk), 0), body
            for result, sent in zip(body["results"], chunk, strict=True):
                record(ledger, result["id"], sent["data"]["ref"], result["deliveries"])
    # The relay publishes the whole outbox before any worker runs: the backlog, in batches.
    start_relay(spawn, tmp_path, **env)
    wait_until(
        lambda: Delivery.objects.outbox().count() == 0,
        timeout=scale(30, 120),
        interval=0.2,
        message="the relay to publish the outbox",
    )
    queued = broker.backlog(["sms"])
    assert queued == -(-backlog // batch)  # DISPATCH_BATCH_SIZE ids a message
    start_workers(
        spawn,
        tmp_path,
        [WorkerSpec("sweeper", "maintenance", concurrency=1, beat=True), WorkerSpec("sms", "sms")],
        relay=False,
        **env,
    )
    # Kill it while the workers are busy with the backlog: what it held is gone for good.
    wait_until(
        lambda: Delivery.objects.filter(status=DeliveryStatus.SENT).count() >= backlog // 10,
        timeout=60,
        interval=0.1,
        message="the workers to start on the backlog",
    )
    left_in_broker = broker.backlog(["sms"])
    broker.kill()
    time.sleep(scale(2, 5))
    broker.start()
    wait_settled(backlog, timeout=scale(90, 600), message="the backlog settled after the restart")
    result = tally(
        "2 broker killed and restarted",
        ledger,
        received(None, twilio),
        note=f"{left_in_broker} messages in the broker when it died, {backlog} accepted",
    )
    assert left_in_broker > 0
    assert (result.lost, result.duplicated, result.unexpected) == (0, 0, 0)
    assert Delivery.objects.filter(status=DeliveryStatus.SENT).count() == backlog


def test_publish_failing_after_commit_loses_nothing(
    owner: Any,
    chaos_template: Any,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    """The API's broker does not answer: the API publishes nothing anyway, so it answers 202
    as fast as ever, and the relay (which reaches the broker) sends every delivery."""
    count = scale(10, 200)
    env = {**RECOVERY_ENV, **sendgrid.settings_env(), **twilio.settings_env()}
    api_key = api_key_for(owner)
    # Nothing listens on this port: every publish after commit fails.
    server = start_api(
        spawn, tmp_path, CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0", **env
    )
    start_workers(
        spawn,
        tmp_path,
        [
            WorkerSpec("sweeper", "maintenance", concurrency=1, beat=True),
            WorkerSpec("send", "email,sms"),
        ],
        **env,
    )
    ledger = Ledger()
    latencies = []
    for n in range(count):
        sent = item(n, "publish")
        started = time.monotonic()
        status, _, body = server.post("/api/v1/notifications", sent, api_key)
        latencies.append(time.monotonic() - started)
        assert status == 202, body[:500]
        answer = json.loads(body)
        record(ledger, answer["id"], sent["data"]["ref"], answer["deliveries"])
    wait_settled(ledger.accepted, timeout=scale(60, 300), message="the sweeper to send them all")
    slowest = max(latencies)
    result = tally(
        "3a publish fails after commit",
        ledger,
        received(sendgrid, twilio),
        note=f"202 in {sum(latencies) / len(latencies):.2f}s on average, {slowest:.2f}s at most",
    )
    assert (result.lost, result.duplicated, result.unexpected) == (0, 0, 0)


def test_api_killed_under_load_loses_no_committed_delivery(
    owner: Any,
    chaos_template: Any,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    """kill -9 of the API process while clients post: whatever it committed is sent, whether
    or not its message was published and whether or not the client saw the 202."""
    env = {**RECOVERY_ENV, **sendgrid.settings_env(), **twilio.settings_env()}
    api_key = api_key_for(owner)
    server = start_api(spawn, tmp_path, **env)
    answered: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(worker: int) -> None:
        for n in range(worker * 100_000, worker * 100_000 + 2000):
            if stop.is_set():
                return
            status, _, body = server.post("/api/v1/notifications", item(n, "crash"), api_key)
            if status == 202:
                with lock:
                    answered.append(json.loads(body)["id"])

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(answered) >= scale(10, 100), timeout=60, message="accepted traffic")
    kill_group(server.process)
    stop.set()
    for thread in threads:
        thread.join(30)
    # The database is the truth: every notification it holds was committed, answered or not.
    ledger = Ledger()
    written = committed(ledger)
    # Nothing half-written: every notification has both its deliveries, every 202 its rows.
    assert set(written.values()) == {("email", "sms")}
    assert set(answered) <= set(written)
    start_workers(
        spawn,
        tmp_path,
        [
            WorkerSpec("sweeper", "maintenance", concurrency=1, beat=True),
            WorkerSpec("send", "email,sms"),
        ],
        **env,
    )
    wait_settled(ledger.accepted, timeout=scale(60, 300), message="every committed delivery sent")
    result = tally(
        "3b API killed under load",
        ledger,
        received(sendgrid, twilio),
        note=f"{len(written)} notifications committed, "
        f"{len(answered)} answered 202 before the kill",
    )
    assert (result.lost, result.duplicated, result.unexpected) == (0, 0, 0)


def test_a_bulk_request_is_not_held_up_by_a_broker_that_is_down(
    owner: Any, chaos_template: Any, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    """A broker that does not answer must not hold the API up: the accept path publishes
    nothing (the relay does), so twenty notifications of two deliveries each in one bulk
    request, then ten single posts, answer as fast as with a broker."""
    api_key = api_key_for(owner)
    server = start_api(
        spawn, tmp_path, CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0", **RECOVERY_ENV
    )
    items = [item(n, "bulk-down") for n in range(20)]
    _post_bulk(server.url, api_key, items[:1])  # the process warms up on its first request
    started = time.monotonic()
    answer = _post_bulk(server.url, api_key, items[1:])
    took = time.monotonic() - started
    report(f"3a publish fails after commit: a bulk of 19 answered in {took:.1f}s")
    assert (answer["accepted"], answer["rejected"]) == (19, 0)
    assert took < 3.0
    started = time.monotonic()
    for n in range(20, 30):
        status, _, body = http(
            "POST", server.url + "/api/v1/notifications", item(n, "single-down"), api_key
        )
        assert status == 202, body[:300]
    took = time.monotonic() - started
    report(f"3a publish fails after commit: 10 single posts answered in {took:.1f}s")
    # Each would wait out its connection retries (about 0.25 s) without the pause.
    assert took < 2.0
    pending = Delivery.objects.filter(status=DeliveryStatus.QUEUED)
    assert pending.count() == 60
    assert not pending.filter(enqueued_at__isnull=False).exists()  # all marked for the sweep


def test_relay_killed_mid_publish_loses_nothing(
    owner: Any,
    chaos_template: Any,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    """kill -9 of the relay while accepts pour in and it publishes them: a round it had
    published but not committed stays in the outbox and goes out again with the next relay (a
    duplicate message, which the workers' lease makes a no-op), and what was accepted while no
    relay ran waits in the outbox. Nothing is lost, nothing is sent twice."""
    count = scale(600, 6000)
    env = {**RECOVERY_ENV, **sendgrid.settings_env(), **twilio.settings_env()}
    api_key = api_key_for(owner)
    server = start_api(spawn, tmp_path, **env)
    start_workers(
        spawn,
        tmp_path,
        [
            WorkerSpec("sweeper", "maintenance", concurrency=1, beat=True),
            WorkerSpec("send", "email,sms"),
        ],
        relay=False,
        **env,
    )
    first = start_relay(spawn, tmp_path, name="relay-1", **env)
    ledger = Ledger()
    items = [item(n, "relay") for n in range(count)]
    chunk = 50
    left = 0
    for start in range(0, count, chunk):
        if start == count // 3:
            kill_group(first)  # mid-stream: it was publishing what the last posts committed
        body = _post_bulk(server.url, api_key, items[start : start + chunk])
        for result, sent in zip(body["results"], items[start : start + chunk], strict=True):
            record(ledger, result["id"], sent["data"]["ref"], result["deliveries"])
    left = Delivery.objects.outbox().count()
    start_relay(spawn, tmp_path, name="relay-2", **env)
    wait_settled(ledger.accepted, timeout=scale(90, 600), message="every delivery sent")
    result = tally(
        "6 relay killed mid-publish",
        ledger,
        received(sendgrid, twilio),
        note=f"{left} of {2 * count} deliveries waiting in the outbox for the second relay",
    )
    assert left >= 2 * (count - count // 3)
    assert (result.lost, result.duplicated, result.unexpected) == (0, 0, 0)
