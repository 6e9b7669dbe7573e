"""Provider failover: EMAIL_PROVIDERS=sendgrid,smtp. A transient failure at SendGrid, or its
breaker open, sends the email through SMTP in the same task; every attempt names its
provider; traffic returns to SendGrid once its breaker closes. Permanent failures do not
fail over."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from notifications.models import Delivery, DeliveryAttempt
from tests.conftest import SmtpSink
from tests.emulators.sendgrid import SendGridEmulator
from workers.circuit_breaker import CircuitState, circuit_state
from workers.providers import provider_for, providers_for
from workers.services import ProcessOutcome, deliveries_process

pytestmark = pytest.mark.django_db


@pytest.fixture
def both(settings: Any, smtp_server: SmtpSink) -> Iterator[tuple[SendGridEmulator, SmtpSink]]:
    sendgrid = SendGridEmulator().start()
    for name, value in sendgrid.settings_overrides().items():
        setattr(settings, name, value)
    settings.EMAIL_PROVIDERS = ["sendgrid", "smtp"]
    settings.SMTP_HOST = smtp_server.host
    settings.SMTP_PORT = smtp_server.port
    settings.CIRCUIT_FAILURE_THRESHOLD = 2
    settings.CIRCUIT_OPEN_SECONDS = 1
    settings.CIRCUIT_SUCCESS_THRESHOLD = 1
    settings.SENDGRID_MAX_BATCH = 1
    settings.PROVIDER_CONCURRENCY = 1
    settings.RATE_LIMITS = "email=100000/m,sms=100/s,push=5000/s,web=10000/s"
    provider_for.cache_clear()
    yield sendgrid, smtp_server
    provider_for.cache_clear()
    sendgrid.stop()


def _emails(api: Any, count: int, start: int = 0) -> list[Delivery]:
    ids = []
    for n in range(start, start + count):
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
        ids.append(response.json()["id"])
    return list(Delivery.objects.filter(notification_id__in=ids).order_by("pk"))


def _attempts(delivery: Delivery) -> list[tuple[int, str, str]]:
    return list(
        DeliveryAttempt.objects.filter(delivery=delivery)
        .order_by("id")
        .values_list("number", "provider", "outcome")
    )


def test_a_transient_failure_fails_over_and_the_open_breaker_skips_the_primary(
    api: Any, template: Any, both: tuple[SendGridEmulator, SmtpSink]
) -> None:
    sendgrid, smtp = both
    sendgrid.fail_always(sendgrid.server_error(503))
    first = _emails(api, 3)
    outcomes = deliveries_process(delivery_ids=[d.pk for d in first])
    assert set(outcomes.values()) == {ProcessOutcome.SENT}
    # Two 503s open SendGrid's breaker (threshold 2): the third email is not offered to it.
    assert len(sendgrid.requests()) == 2
    assert circuit_state(provider="sendgrid") is CircuitState.OPEN
    assert len(smtp.received()) == 3
    for delivery in first:
        delivery.refresh_from_db()
        assert (delivery.status, delivery.provider, delivery.attempts) == ("sent", "smtp", 1)
    assert [_attempts(d) for d in first] == [
        [(1, "sendgrid", "transient"), (1, "smtp", "ok")],
        [(1, "sendgrid", "transient"), (1, "smtp", "ok")],
        [(1, "smtp", "ok")],
    ]

    # SendGrid is back; once its breaker lets a trial through, traffic returns to it.
    sendgrid.fail_always(None)
    time.sleep(1.2)  # CIRCUIT_OPEN_SECONDS: the breaker lets a trial through
    later = _emails(api, 3, start=3)
    assert set(deliveries_process(delivery_ids=[d.pk for d in later]).values()) == {
        ProcessOutcome.SENT
    }
    assert circuit_state(provider="sendgrid") is CircuitState.CLOSED
    assert [Delivery.objects.get(pk=d.pk).provider for d in later] == ["sendgrid"] * 3
    assert len(sendgrid.accepted_requests()) == 3
    assert len(smtp.received()) == 3


def test_a_permanent_failure_does_not_fail_over(
    api: Any, template: Any, both: tuple[SendGridEmulator, SmtpSink]
) -> None:
    sendgrid, smtp = both
    sendgrid.fail_next(sendgrid.bad_address())
    [delivery] = _emails(api, 1)
    assert deliveries_process(delivery_ids=[delivery.pk]) == {delivery.pk: ProcessOutcome.DEAD}
    assert smtp.received() == []
    assert _attempts(delivery) == [(1, "sendgrid", "permanent")]


def test_both_down_retries_with_an_attempt_per_provider(
    api: Any, template: Any, both: tuple[SendGridEmulator, SmtpSink], settings: Any
) -> None:
    sendgrid, _ = both
    settings.CIRCUIT_FAILURE_THRESHOLD = 5
    sendgrid.fail_always(sendgrid.server_error())
    settings.SMTP_PORT = 1  # nothing listens there
    provider_for.cache_clear()
    [delivery] = _emails(api, 1)
    assert deliveries_process(delivery_ids=[delivery.pk]) == {delivery.pk: ProcessOutcome.RETRY}
    delivery.refresh_from_db()
    assert (delivery.status, delivery.provider, delivery.attempts) == ("retrying", "smtp", 1)
    assert _attempts(delivery) == [(1, "sendgrid", "transient"), (1, "smtp", "transient")]


def test_the_provider_lists_are_checked(settings: Any) -> None:
    settings.EMAIL_PROVIDERS = ["sendgrid", "fax"]
    settings.SENDGRID_API_KEY = "SG.x"
    provider_for.cache_clear()
    with pytest.raises(ImproperlyConfigured) as bad:
        providers_for("email")
    assert str(bad.value) == (
        "EMAIL_PROVIDERS='sendgrid,fax': 'fax' is not a provider; "
        "use one of sandbox, sendgrid, smtp"
    )
    settings.EMAIL_PROVIDERS = ["smtp", "smtp"]
    provider_for.cache_clear()
    with pytest.raises(ImproperlyConfigured) as twice:
        providers_for("email")
    assert str(twice.value) == "EMAIL_PROVIDERS names a provider twice: smtp,smtp"
    settings.EMAIL_PROVIDERS = []
    settings.EMAIL_PROVIDER = "smtp"
    provider_for.cache_clear()
    assert [p.name for p in providers_for("email")] == ["smtp"]
    provider_for.cache_clear()
