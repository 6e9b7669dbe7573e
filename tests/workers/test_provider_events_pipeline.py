"""Provider events in, end to end over real processes: a real API server takes the
notifications and the providers' signed posts, real Celery workers send through the official
SDKs to the emulators and apply the events on the maintenance queue, and the emulators post
SendGrid's Event Webhook and Twilio's callbacks over HTTP as the vendors do."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from notifications.models import Delivery, DeliveryEvent, Suppression
from tests.conftest import Process, wait_until
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.factories import api_key_for
from tests.project.api_server import http, start_api_server
from workers.models import ProviderEvent

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def emulators() -> Iterator[tuple[SendGridEmulator, TwilioEmulator]]:
    sendgrid, twilio = SendGridEmulator().start(), TwilioEmulator().start()
    yield sendgrid, twilio
    sendgrid.stop()
    twilio.stop()


def test_signed_events_posted_over_http_reach_the_deliveries_once(
    owner: Any,
    template: Any,
    emulators: tuple[SendGridEmulator, TwilioEmulator],
    spawn: Callable[..., Process],
    tmp_path: Path,
    celery_worker_process: Callable[..., Process],
) -> None:
    sendgrid, twilio = emulators
    env = {**sendgrid.settings_env(), **twilio.settings_env(), "SENDGRID_MAX_BATCH": "1"}
    _, base = start_api_server(spawn, tmp_path, **env)
    celery_worker_process("email,sms,maintenance", **env)
    headers = {"Authorization": f"Bearer {api_key_for(owner)}"}

    def send(n: int, channels: list[str]) -> dict[str, Any]:
        answer = http(
            "POST",
            f"{base}/api/v1/notifications",
            body={
                "recipient": {
                    "id": f"user-{n}",
                    "email": f"user-{n}@example.com",
                    "phone": f"+1415555{n:04d}",
                },
                "template": "order_shipped",
                "data": {"order_id": f"A-{n}"},
                "channels": channels,
            },
            headers=headers,
        )
        assert answer.status == 202, answer.body
        return dict(answer.json())

    ids = [send(n, ["email", "sms"])["id"] for n in range(2)]

    def all_sent() -> bool:
        return (
            list(Delivery.objects.filter(notification_id__in=ids).values_list("status", flat=True))
            == ["sent"] * 4
        )

    wait_until(all_sent, timeout=60, message="the four deliveries to be sent")
    email = {
        d.notification.recipient.external_id: d
        for d in Delivery.objects.filter(channel="email").select_related("notification__recipient")
    }
    sms = {
        d.notification.recipient.external_id: d
        for d in Delivery.objects.filter(channel="sms").select_related("notification__recipient")
    }

    # SendGrid: user-0's email delivered and opened, user-1's bounced hard; posted twice.
    by_id = {sendgrid.trace_id(r, "delivery_id"): r for r in sendgrid.accepted_requests()}
    first = by_id[str(email["user-0"].pk)]
    second = by_id[str(email["user-1"].pk)]
    events = [
        *sendgrid.events_for(first, "delivered", response="250 OK"),
        *sendgrid.events_for(first, "open"),
        *sendgrid.events_for(second, "bounce", type="bounce", reason="550 5.1.1 no such user"),
    ]
    for _ in range(2):
        status, body = sendgrid.post_events(f"{base}/hooks/sendgrid", events)
        assert (status, body) == (200, b'{"received":3}')
    # Twilio: user-0's SMS delivered; user-1 replies STOP.
    hook = f"{base}/hooks/twilio"
    callback = twilio.status_params(
        sms["user-0"].provider_message_id, "delivered", to=sms["user-0"].address
    )
    for params in (callback, twilio.inbound_params(from_=sms["user-1"].address, body="STOP")):
        status, body = twilio.post(hook, params)
        assert status == 200, body

    def applied() -> bool:
        return ProviderEvent.objects.filter(processed_at__isnull=True).count() == 0 and (
            ProviderEvent.objects.count() == 5
        )

    wait_until(applied, timeout=30, message="the maintenance worker to apply the events")
    statuses = {
        (d.channel, d.notification.recipient.external_id): d.status
        for d in Delivery.objects.select_related("notification__recipient")
    }
    assert statuses == {
        ("email", "user-0"): "delivered",
        ("email", "user-1"): "bounced",
        ("sms", "user-0"): "delivered",
        ("sms", "user-1"): "sent",
    }
    assert list(
        DeliveryEvent.objects.filter(delivery=email["user-0"])
        .exclude(status__in=("queued", "sent"))
        .values_list("status", flat=True)
    ) == ["delivered", "opened"]
    assert set(Suppression.objects.values_list("channel", "address", "reason")) == {
        ("email", "user-1@example.com", "bounced"),
        ("sms", "+14155550001", "stopped"),
    }
    # The next notification to user-1 reaches neither address; user-0's goes out.
    again = send(1, ["email", "sms"])
    assert again["deliveries"] == [
        {"channel": "email", "status": "skipped", "reason": "suppressed"},
        {"channel": "sms", "status": "skipped", "reason": "suppressed"},
    ]
    assert send(0, ["email"])["deliveries"] == [{"channel": "email", "status": "queued"}]
