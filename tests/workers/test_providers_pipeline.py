"""Each vendor adapter end to end: the API accepts, a real Celery worker on the real broker
sends through the vendor's official SDK to its emulator, and the retry policy, the dead-letter
queue, the circuit breaker and the shared rate limit act on what the emulator answers."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from notifications.models import Delivery, DeliveryStatus, Device
from tests.conftest import Process, wait_until
from tests.emulators import fcm as fcm_faults
from tests.emulators.base import Request, Response
from tests.emulators.fcm import FcmEmulator
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.factories import DeviceFactory, RecipientFactory, TemplateFactory
from workers.models import DeadLetter

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

CONTENT = {
    "email": {"subject": "Order {{ order_id }} shipped", "body": "Order {{ order_id }}."},
    "sms": {"body": "Order {{ order_id }} shipped"},
    "push": {"title": "Shipped", "body": "Order {{ order_id }}"},
}

# Jitter is ±20 %. A retry waits in the outbox until due; the relay publishes it then (woken
# at its due time, or at the latest by its RELAY_POLL_SECONDS poll of 1 s should it miss the
# wake-up), and a worker takes it from the broker within a few tens of ms, plus the time the
# SDK call itself takes. On a loaded 2-core machine one retry in a CI run came 1.06 s late.
JITTER = 0.2
SLACK_SECONDS = 1.1


@dataclass
class Case:
    """One vendor: its emulator, the channel it serves, the settings that select it, and its
    way of saying each kind of failure."""

    vendor: str
    channel: str
    emulator: Any
    env: dict[str, str]
    server_error: Callable[..., Response]
    rate_limited: Callable[[int], Response]
    permanent: Callable[[], Response]
    accepted_ids: Callable[[], list[str]]
    # What a request carries that says which notification (n) it is for.
    trace: Callable[[Request], str]
    expected_trace: Callable[[str, int], str]

    def sends(self) -> list[Request]:
        """The delivery calls the emulator received."""
        return list(self.emulator.requests())


def _case(vendor: str, tmp_path: Path) -> Case:
    if vendor == "sendgrid":
        sendgrid = SendGridEmulator()
        return Case(
            vendor,
            "email",
            sendgrid,
            sendgrid.settings_env(),
            sendgrid.server_error,
            sendgrid.rate_limited,
            sendgrid.bad_address,
            sendgrid.accepted_ids,
            lambda r: sendgrid.trace_id(r, "notification_id"),
            lambda notification_id, n: notification_id,
        )
    if vendor == "twilio":
        # Twilio carries no custom data: a message is told by its destination number.
        twilio = TwilioEmulator()
        return Case(
            vendor,
            "sms",
            twilio,
            twilio.settings_env(),
            twilio.server_error,
            twilio.rate_limited,
            twilio.bad_number,
            twilio.accepted_ids,
            lambda r: twilio.trace_id(r, "to"),
            lambda notification_id, n: _phone(n),
        )
    fcm = FcmEmulator()
    return Case(
        vendor,
        "push",
        fcm,
        fcm.settings_env(tmp_path),
        fcm_faults.server_error,
        fcm_faults.rate_limited,
        fcm_faults.unregistered,
        lambda: list(fcm.accepted_ids),
        lambda r: fcm.trace_id(r, "notification_id"),
        lambda notification_id, n: notification_id,
    )


@pytest.fixture(params=["sendgrid", "twilio", "fcm"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    vendor_case = _case(request.param, tmp_path)
    vendor_case.emulator.start()
    yield vendor_case
    vendor_case.emulator.stop()


def _phone(n: int) -> str:
    return f"+1415555{n:04d}"


def _recipient(owner: Any, n: int) -> Any:
    recipient = RecipientFactory(
        owner=owner,
        external_id=f"user-{n}",
        email=f"user-{n}@example.com",
        phone=_phone(n),
    )
    DeviceFactory(recipient=recipient, token=f"device-token-{n:05d}")
    return recipient


def _post(api: Any, channel: str, n: int) -> str:
    response = api.post(
        "/api/v1/notifications",
        {"recipient": f"user-{n}", "template": "shipped", "data": {"order_id": f"A-{n}"}},
        format="json",
    )
    assert response.status_code == 202, response.content
    assert response.json()["deliveries"] == [{"channel": channel, "status": "queued"}]
    return str(response.json()["id"])


@pytest.fixture
def accept(api: Any, owner: Any, case: Case) -> Callable[[int], list[str]]:
    """Accept `count` notifications on the case's channel, one recipient each."""
    TemplateFactory(owner=owner, key="shipped", content={case.channel: CONTENT[case.channel]})

    def post(count: int) -> list[str]:
        ids = []
        for n in range(count):
            _recipient(owner, n)
            ids.append(_post(api, case.channel, n))
        return ids

    return post


def _delivery(notification_id: str) -> Delivery:
    return Delivery.objects.get(notification_id=notification_id)


def _wait_status(notification_id: str, status: str, timeout: float = 30) -> Delivery:
    def reached() -> Delivery | None:
        delivery = _delivery(notification_id)
        return delivery if delivery.status == status else None

    return wait_until(reached, timeout=timeout, message=f"the delivery to be {status}")


def _gaps(requests: list[Request]) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(requests)]


def test_success_records_the_provider_message_id(
    case: Case, accept: Callable[[int], list[str]], celery_worker_process: Callable[..., Process]
) -> None:
    celery_worker_process(case.channel, **case.env)
    [notification_id] = accept(1)
    delivery = _wait_status(notification_id, DeliveryStatus.SENT)
    assert case.accepted_ids() == [delivery.provider_message_id]
    assert (delivery.provider, delivery.attempts) == (case.vendor, 1)
    [request] = case.sends()
    assert case.trace(request) == case.expected_trace(notification_id, 0)


def test_two_server_errors_then_success_backs_off_one_then_two_seconds(
    case: Case, accept: Callable[[int], list[str]], celery_worker_process: Callable[..., Process]
) -> None:
    case.emulator.fail_next(case.server_error(), case.server_error(503))
    celery_worker_process(case.channel, **case.env)
    [notification_id] = accept(1)
    delivery = _wait_status(notification_id, DeliveryStatus.SENT)
    assert delivery.attempts == 3
    sends = case.sends()
    assert len(sends) == 3
    first, second = _gaps(sends)
    assert 1 * (1 - JITTER) <= first <= 1 * (1 + JITTER) + SLACK_SECONDS, first
    assert 2 * (1 - JITTER) <= second <= 2 * (1 + JITTER) + SLACK_SECONDS, second
    attempts = list(delivery.attempt_log.values_list("number", "outcome", "status_code"))
    assert attempts == [(1, "transient", 500), (2, "transient", 503), (3, "ok", attempts[2][2])]


def test_a_permanent_error_is_dead_after_one_attempt(
    case: Case, accept: Callable[[int], list[str]], celery_worker_process: Callable[..., Process]
) -> None:
    case.emulator.fail_always(case.permanent())
    celery_worker_process(case.channel, **case.env)
    [notification_id] = accept(1)
    delivery = _wait_status(notification_id, DeliveryStatus.DEAD)
    time.sleep(1.5)  # longer than the first backoff: nothing else may arrive
    assert len(case.sends()) == 1
    assert delivery.attempts == 1
    dead_letter = DeadLetter.objects.get(delivery=delivery)
    assert (dead_letter.channel, dead_letter.provider, dead_letter.attempts) == (
        case.channel,
        case.vendor,
        1,
    )
    if case.vendor == "fcm":
        # An unregistered token is switched off, so later pushes skip it.
        assert list(Device.objects.values_list("active", flat=True)) == [False]


def test_server_errors_every_time_end_dead_after_four_attempts(
    case: Case, accept: Callable[[int], list[str]], celery_worker_process: Callable[..., Process]
) -> None:
    case.emulator.fail_always(case.server_error())
    celery_worker_process(case.channel, **case.env)
    [notification_id] = accept(1)
    delivery = _wait_status(notification_id, DeliveryStatus.DEAD, timeout=40)
    assert delivery.attempts == 4
    sends = case.sends()
    assert len(sends) == 4
    for gap, expected in zip(_gaps(sends), (1, 2, 4), strict=True):
        assert expected * (1 - JITTER) <= gap <= expected * (1 + JITTER) + SLACK_SECONDS, gap
    assert DeadLetter.objects.get(delivery=delivery).attempts == 4


def test_retry_after_is_honoured(
    case: Case, accept: Callable[[int], list[str]], celery_worker_process: Callable[..., Process]
) -> None:
    case.emulator.fail_next(case.rate_limited(3))
    celery_worker_process(case.channel, **case.env)
    [notification_id] = accept(1)
    delivery = _wait_status(notification_id, DeliveryStatus.SENT)
    first, second = case.sends()
    assert 3.0 <= second.at - first.at <= 3.0 + SLACK_SECONDS + 1
    # A 429 is the provider asking us to slow down, not a failed attempt: both calls are in
    # the log, but the delivery has spent one attempt of its RETRY_MAX_ATTEMPTS.
    assert delivery.attempts == 1
    attempts = list(delivery.attempt_log.values_list("number", "outcome", "status_code"))
    assert attempts == [(1, "transient", 429), (1, "ok", attempts[1][2])]


# --- Circuit breaker, rate limit and a killed worker, on one vendor each -------------------


@pytest.fixture
def sendgrid() -> Iterator[SendGridEmulator]:
    emulator = SendGridEmulator().start()
    yield emulator
    emulator.stop()


def _accept_emails(api: Any, owner: Any, count: int) -> list[str]:
    TemplateFactory(owner=owner, key="shipped", content={"email": CONTENT["email"]})
    return [_post_new(api, "email", n) for n in range(count)]


def _post_new(api: Any, channel: str, n: int) -> str:
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": {"id": f"user-{n}", "email": f"user-{n}@example.com"},
            "template": "shipped",
            "data": {"order_id": f"A-{n}"},
        },
        format="json",
    )
    assert response.status_code == 202, response.content
    return str(response.json()["id"])


def test_breaker_holds_traffic_off_a_provider_that_is_down(
    api: Any,
    owner: Any,
    sendgrid: SendGridEmulator,
    celery_worker_process: Callable[..., Process],
) -> None:
    total = 100
    down_for = 20.0
    open_seconds = 5
    sendgrid.fail_always(sendgrid.server_error(503))
    ids = _accept_emails(api, owner, total)
    down_since = time.monotonic()
    celery_worker_process(
        "email", concurrency=4, CIRCUIT_OPEN_SECONDS=open_seconds, **sendgrid.settings_env()
    )
    time.sleep(max(0.0, down_for - (time.monotonic() - down_since)))
    sendgrid.fail_always(None)
    up_since = time.monotonic()
    while_down = [r for r in sendgrid.requests() if r.at < up_since]
    # 5 failures open the breaker; then one trial per open period at most.
    trials = int(down_for // open_seconds) + 1
    print(f"calls while down: {len(while_down)} (at most {5 + trials})")
    assert len(while_down) <= 5 + trials

    def all_sent() -> bool:
        return Delivery.objects.filter(status=DeliveryStatus.SENT).count() == total

    wait_until(all_sent, timeout=90, interval=0.5, message="all 100 emails sent after recovery")
    assert Delivery.objects.filter(status=DeliveryStatus.DEAD).count() == 0
    # Each email accepted exactly once (several may share one batched request).
    assert sendgrid.count_by("notification_id", accepted_only=True) == dict.fromkeys(ids, 1)
    assert all(r.at >= up_since for r in sendgrid.accepted_requests())


def test_shared_rate_limit_holds_across_two_worker_processes(
    api: Any, owner: Any, tmp_path: Path, celery_worker_process: Callable[..., Process]
) -> None:
    twilio = TwilioEmulator().start()
    try:
        TemplateFactory(owner=owner, key="shipped", content={"sms": CONTENT["sms"]})
        total = 200
        for n in range(total):
            _recipient(owner, n)
            _post(api, "sms", n)
        env = {**twilio.settings_env(), "RATE_LIMITS": "sms=20/s"}
        celery_worker_process("sms", concurrency=2, name="sms-a", **env)
        celery_worker_process("sms", concurrency=2, name="sms-b", **env)
        wait_until(
            lambda: Delivery.objects.filter(status=DeliveryStatus.SENT).count() == total,
            timeout=60,
            interval=0.5,
            message="200 SMS sent",
        )
        times = sorted(r.at for r in twilio.requests())
        assert len(times) == total
        rate = (total - 1) / (times[-1] - times[0])
        print(f"observed rate: {rate:.2f}/s for a limit of 20/s")
        assert 19.0 <= rate <= 21.0
    finally:
        twilio.stop()


def test_a_worker_killed_mid_run_loses_nothing(
    api: Any,
    owner: Any,
    sendgrid: SendGridEmulator,
    celery_worker_process: Callable[..., Process],
) -> None:
    total = 500
    # Each call takes a while, so there are deliveries in flight when the kill comes.
    sendgrid.fail_always(None)
    sendgrid.latency = 0.02
    ids = _accept_emails(api, owner, total)
    env = {
        **sendgrid.settings_env(),
        "DELIVERY_LEASE_SECONDS": "3",
        "SWEEPER_INTERVAL_SECONDS": "1",
        "SWEEPER_STALE_SECONDS": "5",
    }
    victim = celery_worker_process("email", concurrency=2, name="victim", **env)
    celery_worker_process("email,maintenance", concurrency=2, beat=True, name="survivor", **env)
    wait_until(
        lambda: sum(sendgrid.count_by("notification_id").values()) >= total // 4,
        timeout=60,
        message="a quarter sent",
    )
    in_flight = Delivery.objects.filter(
        status__in=[DeliveryStatus.QUEUED, DeliveryStatus.RETRYING], lease_token__isnull=False
    ).count()
    os.killpg(victim.popen.pid, signal.SIGKILL)
    wait_until(
        lambda: Delivery.objects.filter(status=DeliveryStatus.SENT).count() == total,
        timeout=120,
        interval=0.5,
        message="all 500 sent after the kill",
    )
    counts = sendgrid.count_by("notification_id", accepted_only=True)
    twice = sum(1 for n in counts.values() if n > 1)
    print(f"in flight at the kill: {in_flight}; delivered twice: {twice}")
    assert set(counts) == set(ids)
    assert twice <= in_flight
    assert max(counts.values()) <= 2
