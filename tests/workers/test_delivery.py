"""The delivery service on one delivery: claim, send through the real SMTP conversation,
record the attempt, then sent / retrying / dead; idempotent on redelivery."""

from __future__ import annotations

import logging
import smtplib
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from notifications.models import Delivery, DeliveryAttempt, DeliveryStatus
from tests.conftest import SmtpSink, free_port
from workers import services
from workers.providers import Outcome, provider_for
from workers.services import ProcessOutcome
from workers.transitions import deliveries_claim

pytestmark = pytest.mark.django_db


@pytest.fixture
def smtp_settings(settings: Any, smtp_server: SmtpSink) -> Iterator[SmtpSink]:
    settings.EMAIL_PROVIDER = "smtp"
    settings.SMTP_HOST = smtp_server.host
    settings.SMTP_PORT = smtp_server.port
    settings.SMTP_TIMEOUT_SECONDS = 5
    provider_for.cache_clear()
    yield smtp_server
    provider_for.cache_clear()


def accept(api: Any, **body: Any) -> Delivery:
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": {"id": "user-1", "email": "user-1@example.com"},
            "template": "order_shipped",
            "data": {"order_id": "A-1"},
            "channels": ["email"],
            **body,
        },
        format="json",
    )
    assert response.status_code == 202
    return Delivery.objects.get(notification_id=response.json()["id"], channel="email")


def test_sent_once_even_when_the_message_comes_twice(
    api: Any, template: Any, smtp_settings: SmtpSink
) -> None:
    delivery = accept(api)
    assert services.delivery_process(delivery_id=delivery.pk) == ProcessOutcome.SENT
    assert services.delivery_process(delivery_id=delivery.pk) == ProcessOutcome.NOT_CLAIMED
    assert len(smtp_settings.received()) == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.provider) == ("sent", 1, "smtp")
    assert delivery.lease_token is None
    assert DeliveryAttempt.objects.filter(delivery=delivery).count() == 1


def test_a_delivery_leased_by_another_worker_is_not_sent(
    api: Any, template: Any, smtp_settings: SmtpSink
) -> None:
    delivery = accept(api)
    assert deliveries_claim(delivery_ids=[delivery.pk]) != []
    assert services.delivery_process(delivery_id=delivery.pk) == ProcessOutcome.NOT_CLAIMED
    assert smtp_settings.received() == []


def test_a_result_that_comes_after_the_lease_moved_on_changes_nothing(
    api: Any, template: Any, smtp_settings: SmtpSink, monkeypatch: Any, caplog: Any
) -> None:
    """A worker cut off (or paused) past its lease: another worker claimed the delivery
    meanwhile, so this worker's late `sent` is fenced by the lease token and said so."""
    delivery = accept(api)
    send = services._send
    taken_over = uuid.uuid4()

    def send_then_lose_the_lease(*args: Any, **kwargs: Any) -> Any:
        results = send(*args, **kwargs)
        Delivery.objects.filter(pk=delivery.pk).update(lease_token=taken_over)
        return results

    monkeypatch.setattr(services, "_send", send_then_lose_the_lease)
    with caplog.at_level(logging.WARNING, logger="workers.services"):
        services.delivery_process(delivery_id=delivery.pk)
    delivery.refresh_from_db()
    assert (delivery.status, delivery.lease_token) == (DeliveryStatus.QUEUED, taken_over)
    assert not delivery.events.filter(status=DeliveryStatus.SENT).exists()
    assert "1 results dropped: their lease ran out" in caplog.text


def test_connection_refused_is_transient_and_scheduled_for_retry(
    api: Any, template: Any, settings: Any
) -> None:
    settings.EMAIL_PROVIDER = "smtp"
    settings.SMTP_HOST = "127.0.0.1"
    settings.SMTP_PORT = free_port()  # nothing listens there
    settings.RETRY_BACKOFF_BASE_SECONDS = 1
    provider_for.cache_clear()
    delivery = accept(api)
    before = timezone.now()
    assert services.delivery_process(delivery_id=delivery.pk) == ProcessOutcome.RETRY
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.RETRYING
    assert delivery.attempts == 1
    assert "ConnectionRefusedError" in delivery.last_error
    # First retry after 1 s ± 20 % jitter.
    wait = (delivery.next_attempt_at - before).total_seconds()
    assert 0.8 <= wait <= 1.3
    [attempt] = DeliveryAttempt.objects.filter(delivery=delivery)
    assert (attempt.outcome, attempt.number) == (Outcome.TRANSIENT, 1)
    # Not due yet: a redelivered message does not send early.
    assert services.delivery_process(delivery_id=delivery.pk) == ProcessOutcome.NOT_CLAIMED
    provider_for.cache_clear()


def test_retries_exhausted_make_it_dead(api: Any, template: Any, settings: Any) -> None:
    settings.EMAIL_PROVIDER = "smtp"
    settings.SMTP_HOST = "127.0.0.1"
    settings.SMTP_PORT = free_port()
    provider_for.cache_clear()
    delivery = accept(api)
    outcomes = []
    for _ in range(4):
        Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
        outcomes.append(services.delivery_process(delivery_id=delivery.pk))
    assert outcomes == [ProcessOutcome.RETRY] * 3 + [ProcessOutcome.DEAD]
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.DEAD, 4)
    assert list(
        DeliveryAttempt.objects.filter(delivery=delivery).values_list("number", flat=True)
    ) == [1, 2, 3, 4]
    provider_for.cache_clear()


def test_refused_recipient_is_permanent_and_dead_after_one_attempt(
    api: Any, template: Any, smtp_settings: SmtpSink, monkeypatch: Any
) -> None:
    def refuse(self: Any, messages: Any) -> None:
        raise smtplib.SMTPRecipientsRefused(
            {"user-1@example.com": (550, b"5.1.1 mailbox unavailable")}
        )

    monkeypatch.setattr("django.core.mail.backends.smtp.EmailBackend.send_messages", refuse)
    delivery = accept(api)
    assert services.delivery_process(delivery_id=delivery.pk) == ProcessOutcome.DEAD
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.DEAD
    assert delivery.attempts == 1
    assert delivery.last_error == "SMTP 550: 5.1.1 mailbox unavailable"


def test_attempts_of_workers_that_died_end_in_dead(
    api: Any, template: Any, smtp_settings: SmtpSink, settings: Any
) -> None:
    delivery = accept(api)
    # Four workers claimed it and died mid-send (their leases ran out).
    Delivery.objects.filter(pk=delivery.pk).update(
        attempts=4, lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert services.delivery_process(delivery_id=delivery.pk) == ProcessOutcome.DEAD
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.DEAD
    assert delivery.last_error == ("abandoned after 4 attempts that did not finish (worker lost)")
    assert smtp_settings.received() == []


def test_push_without_an_active_device_is_permanent(api: Any, template: Any) -> None:
    from tests.factories import DeviceFactory

    device = DeviceFactory(recipient__owner=template.owner, recipient__external_id="user-1")
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": "user-1",
            "template": "order_shipped",
            "data": {"order_id": "A-1"},
            "channels": ["push"],
        },
        format="json",
    )
    assert response.json()["deliveries"] == [{"channel": "push", "status": "queued"}]
    device.active = False
    device.save()
    delivery = Delivery.objects.get(channel="push")
    assert services.delivery_process(delivery_id=delivery.pk) == ProcessOutcome.DEAD
    delivery.refresh_from_db()
    assert delivery.last_error == "no active device for this recipient"


def test_missing_provider_setting_is_named(settings: Any) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from workers import providers

    settings.EMAIL_PROVIDER = "smtp"
    settings.EMAIL_FROM = ""
    with pytest.raises(ImproperlyConfigured, match="EMAIL_FROM must be set"):
        providers.check()
    settings.EMAIL_PROVIDER = "carrier-pigeon"
    with pytest.raises(ImproperlyConfigured, match="EMAIL_PROVIDER='carrier-pigeon'"):
        providers.check()
    provider_for.cache_clear()
