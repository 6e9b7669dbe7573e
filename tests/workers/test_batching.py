"""Batched sends: one task carries a batch of delivery ids; the worker sends them through
SendGrid in one request (personalizations) as far as the shared rate limit allows, defers the
rest without spending an attempt, and each delivery still gets its own attempt, status and
dead letter. A provider without a batch API gets bounded concurrent calls."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone

from core import rate_limiter
from core.rate_limiter import rate_limit_refund, rate_limit_take_many
from notifications.models import Delivery, DeliveryAttempt, DeliveryStatus
from tests.emulators.sendgrid import SendGridEmulator
from workers.circuit_breaker import CircuitState, circuit_state
from workers.models import DeadLetter
from workers.providers import provider_for
from workers.services import ProcessOutcome, deliveries_process

pytestmark = pytest.mark.django_db


@pytest.fixture
def sendgrid(settings: Any) -> Iterator[SendGridEmulator]:
    emulator = SendGridEmulator().start()
    for name, value in emulator.settings_overrides().items():
        setattr(settings, name, value)
    settings.RATE_LIMITS = "sms=100/s"  # email unlimited unless a test says otherwise
    provider_for.cache_clear()
    rate_limiter._rates.cache_clear()
    yield emulator
    emulator.stop()
    provider_for.cache_clear()
    rate_limiter._rates.cache_clear()


def accept_emails(api: Any, count: int, *, bad: frozenset[int] = frozenset()) -> list[Delivery]:
    """Accept one email each for `count` recipients; the ones in `bad` get an address that
    SendGrid refuses (set behind the API, which would refuse it itself)."""
    deliveries = []
    for n in range(count):
        response = api.post(
            "/api/v1/notifications",
            {
                "recipient": {"id": f"user-{n}", "email": f"user-{n}@example.com"},
                "template": "order_shipped",
                "data": {"order_id": f"A-{n}"},
                "channels": ["email"],
            },
            format="json",
        )
        assert response.status_code == 202, response.content
        delivery = Delivery.objects.get(notification_id=response.json()["id"])
        if n in bad:
            Delivery.objects.filter(pk=delivery.pk).update(address="not-an-address")
        deliveries.append(delivery)
    return deliveries


def test_one_task_sends_every_queued_email_in_one_request(
    api: Any, template: Any, sendgrid: SendGridEmulator
) -> None:
    deliveries = accept_emails(api, 30)
    ids = [d.pk for d in deliveries]

    assert set(deliveries_process(delivery_ids=ids).values()) == {ProcessOutcome.SENT}

    [request] = sendgrid.requests()
    assert len(request.json()["personalizations"]) == 30
    expected = {str(d.notification_id): 1 for d in deliveries}
    assert sendgrid.count_by("notification_id", accepted_only=True) == expected
    [message_id] = sendgrid.accepted_ids()
    rows = Delivery.objects.order_by("id").values_list(
        "status", "attempts", "provider", "provider_message_id"
    )
    assert list(rows) == [(DeliveryStatus.SENT, 1, "sendgrid", message_id)] * 30
    assert DeliveryAttempt.objects.filter(number=1, outcome="ok").count() == 30
    # The same batch again (a redelivered message) finds nothing to do.
    assert set(deliveries_process(delivery_ids=ids).values()) == {ProcessOutcome.NOT_CLAIMED}
    assert len(sendgrid.requests()) == 1


def test_the_batch_takes_no_more_than_the_rate_limit_grants(
    api: Any, template: Any, sendgrid: SendGridEmulator, settings: Any
) -> None:
    settings.RATE_LIMITS = "email=600/m"  # 10 a second
    settings.RATE_LIMIT_MAX_SLEEP_SECONDS = 1.0
    rate_limiter._rates.cache_clear()
    deliveries = accept_emails(api, 30)

    outcomes = deliveries_process(delivery_ids=[d.pk for d in deliveries])

    # The one token in the bucket plus the ten that come within the second it may wait.
    [request] = sendgrid.requests()
    assert len(request.json()["personalizations"]) == 11
    assert [outcomes[d.pk] for d in deliveries] == [ProcessOutcome.SENT] * 11 + [
        ProcessOutcome.DEFERRED
    ] * 19
    assert Delivery.objects.filter(status=DeliveryStatus.SENT).count() == 11
    # The rest went back to the outbox, spread over the 1.9 s the bucket needs for them, with
    # no attempt spent.
    rest = Delivery.objects.filter(status=DeliveryStatus.QUEUED, lease_token=None)
    assert rest.count() == 19
    assert set(rest.values_list("attempts", "enqueued_at")) == {(0, None)}
    due = sorted(rest.values_list("next_attempt_at", flat=True))
    sent_at = Delivery.objects.filter(status=DeliveryStatus.SENT).latest("sent_at").sent_at
    assert 0 <= (due[0] - sent_at).total_seconds() < 0.5
    assert 1.5 < (due[-1] - sent_at).total_seconds() < 3.0


def test_a_refused_address_kills_only_its_own_delivery(
    api: Any, template: Any, sendgrid: SendGridEmulator
) -> None:
    deliveries = accept_emails(api, 5, bad=frozenset({2}))

    deliveries_process(delivery_ids=[d.pk for d in deliveries])

    statuses = list(Delivery.objects.order_by("id").values_list("status", flat=True))
    assert statuses == ["sent", "sent", "dead", "sent", "sent"]
    dead_letter = DeadLetter.objects.get()
    assert dead_letter.delivery_id == deliveries[2].pk
    assert "Does not contain a valid address." in dead_letter.error


def test_an_open_breaker_defers_the_whole_batch_without_spending_attempts(
    api: Any, template: Any, sendgrid: SendGridEmulator
) -> None:
    from workers.circuit_breaker import circuit_record

    deliveries = accept_emails(api, 4)
    for _ in range(5):
        circuit_record(provider="sendgrid", outcome="transient")

    outcomes = deliveries_process(delivery_ids=[d.pk for d in deliveries])
    assert set(outcomes.values()) == {ProcessOutcome.DEFERRED}

    assert sendgrid.requests() == []
    rows = Delivery.objects.values_list("status", "attempts", "lease_token")
    assert sorted(rows) == [(DeliveryStatus.QUEUED, 0, None)] * 4
    assert Delivery.objects.filter(next_attempt_at__isnull=False).count() == 4


def test_a_provider_down_gets_the_calls_that_open_the_breaker_and_no_more(
    api: Any, template: Any, sendgrid: SendGridEmulator, settings: Any
) -> None:
    """One task of 30 emails in SendGrid batches of 5 while SendGrid answers 503: each call
    is told to the breaker, which opens after the third; the other three batches are not
    sent and wait for the breaker without spending an attempt."""
    settings.SENDGRID_MAX_BATCH = 5
    settings.CIRCUIT_FAILURE_THRESHOLD = 3
    settings.CIRCUIT_OPEN_SECONDS = 60
    provider_for.cache_clear()
    deliveries = accept_emails(api, 30)
    sendgrid.fail_always(sendgrid.server_error(503))

    outcomes = deliveries_process(delivery_ids=[d.pk for d in deliveries])

    assert len(sendgrid.requests()) == 3
    assert circuit_state(provider="sendgrid") == CircuitState.OPEN
    assert [outcomes[d.pk] for d in deliveries] == [ProcessOutcome.RETRY] * 15 + [
        ProcessOutcome.DEFERRED
    ] * 15
    rows = list(Delivery.objects.order_by("id").values_list("status", "attempts"))
    assert rows == [(DeliveryStatus.RETRYING, 1)] * 15 + [(DeliveryStatus.QUEUED, 0)] * 15
    # Held until the breaker lets a trial through.
    held = Delivery.objects.filter(status=DeliveryStatus.QUEUED)
    first_due = min(held.values_list("next_attempt_at", flat=True))
    assert (first_due - timezone.now()).total_seconds() > 55


def test_one_call_per_message_stops_once_the_breaker_opens(
    api: Any, template: Any, settings: Any
) -> None:
    """A provider without a batch API (Twilio), down: the calls of one round stop at the one
    that opens the breaker."""
    from tests.emulators.twilio import TwilioEmulator

    twilio = TwilioEmulator().start()
    try:
        for name, value in twilio.settings_overrides().items():
            setattr(settings, name, value)
        settings.PROVIDER_CONCURRENCY = 1
        settings.CIRCUIT_FAILURE_THRESHOLD = 4
        settings.CIRCUIT_OPEN_SECONDS = 60
        provider_for.cache_clear()
        ids = []
        for n in range(12):
            response = api.post(
                "/api/v1/notifications",
                {
                    "recipient": {"id": f"user-{n}", "phone": f"+141555501{n:02d}"},
                    "template": "order_shipped",
                    "data": {"order_id": f"A-{n}"},
                    "channels": ["sms"],
                },
                format="json",
            )
            assert response.status_code == 202, response.content
            ids.append(Delivery.objects.get(notification_id=response.json()["id"]).pk)
        twilio.fail_always(twilio.server_error(503))

        outcomes = deliveries_process(delivery_ids=ids)

        assert len(twilio.requests()) == 4
        assert [outcomes[pk] for pk in ids] == [ProcessOutcome.RETRY] * 4 + [
            ProcessOutcome.DEFERRED
        ] * 8
        assert Delivery.objects.filter(attempts=0, status=DeliveryStatus.QUEUED).count() == 8
    finally:
        twilio.stop()
        provider_for.cache_clear()


def test_take_many_grants_what_comes_within_max_wait_and_refunds(settings: Any) -> None:
    settings.RATE_LIMITS = "sms=2/s"
    settings.RATE_LIMIT_BURST = 1
    rate_limiter._rates.cache_clear()
    try:
        granted, wait = rate_limit_take_many(channel="sms", provider="p", max_wait=2.5, want=50)
        assert granted == 6  # one now, five more within two and a half seconds
        assert 2.4 < wait <= 2.5
        # Nothing within half a second: refused, nothing reserved.
        granted, wait = rate_limit_take_many(channel="sms", provider="p", max_wait=0.5, want=5)
        assert granted == 0
        assert 2.9 < wait <= 3.0
        rate_limit_refund(channel="sms", provider="p", count=5)
        granted, _ = rate_limit_take_many(channel="sms", provider="p", max_wait=0.0, want=50)
        assert granted == 0  # the bucket stands near 0 after the refund: not a whole token
        rate_limit_refund(channel="sms", provider="p", count=1)
        granted, wait = rate_limit_take_many(channel="sms", provider="p", max_wait=0.0, want=50)
        assert (granted, wait) == (1, 0.0)
    finally:
        rate_limiter._rates.cache_clear()
