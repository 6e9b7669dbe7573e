"""Provider events in: the emulators post SendGrid's signed Event Webhook and Twilio's signed
status callbacks and inbound messages about messages they really accepted; the hooks verify,
store and answer; applying them moves the deliveries, logs the provider's words, and fills
the suppression list that later sends respect."""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from django.test import Client
from django.utils import timezone

from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Suppression
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.factories import OwnerFactory, RecipientFactory
from workers.models import ProviderEvent
from workers.provider_events import provider_events_apply
from workers.providers import provider_for
from workers.services import ProcessOutcome, deliveries_process

pytestmark = pytest.mark.django_db

TWILIO_HOOK_URL = "http://testserver/hooks/twilio"


def _pointed_at(emulator: Any, settings: Any) -> Iterator[Any]:
    """The emulator, running, with the settings that select it."""
    emulator.start()
    for name, value in emulator.settings_overrides().items():
        setattr(settings, name, value)
    provider_for.cache_clear()
    yield emulator
    provider_for.cache_clear()
    emulator.stop()


@pytest.fixture
def sendgrid(settings: Any) -> Iterator[SendGridEmulator]:
    yield from _pointed_at(SendGridEmulator(), settings)


@pytest.fixture
def twilio(settings: Any) -> Iterator[TwilioEmulator]:
    yield from _pointed_at(TwilioEmulator(), settings)


def _send(api: Any, n: int, channel: str, **extra: Any) -> dict[str, Any]:
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": {
                "id": f"user-{n}",
                "email": f"user-{n}@example.com",
                "phone": f"+1415555{n:04d}",
            },
            "template": "order_shipped",
            "data": {"order_id": f"A-{n}"},
            "channels": [channel],
            **extra,
        },
        format="json",
    )
    assert response.status_code == 202, response.content
    return dict(response.json())


def _sent(api: Any, channel: str, count: int) -> list[Delivery]:
    """`count` notifications on the channel, sent by the worker's code in one batch."""
    ids = [_send(api, n, channel)["id"] for n in range(count)]
    deliveries = [Delivery.objects.get(notification_id=i) for i in ids]
    outcomes = deliveries_process(delivery_ids=[d.pk for d in deliveries])
    assert set(outcomes.values()) == {ProcessOutcome.SENT}
    for delivery in deliveries:
        delivery.refresh_from_db()
    return deliveries


def _post_sendgrid(body: bytes, headers: dict[str, str]) -> Any:
    return Client().post(
        "/hooks/sendgrid", data=body, content_type="application/json", headers=headers
    )


def _post_events(sendgrid: SendGridEmulator, events: list[dict[str, Any]]) -> Any:
    body = json.dumps(events).encode()
    return _post_sendgrid(body, sendgrid.sign(body))


def _post_twilio(
    twilio: TwilioEmulator, params: dict[str, str], signature: str | None = None
) -> Any:
    headers = {"X-Twilio-Signature": twilio.sign(TWILIO_HOOK_URL, params)}
    if signature is not None:
        headers = {"X-Twilio-Signature": signature} if signature else {}
    return Client().post(
        "/hooks/twilio",
        data=urllib.parse.urlencode(params),
        content_type="application/x-www-form-urlencoded",
        headers=headers,
    )


def _log(delivery: Delivery) -> list[tuple[str, str]]:
    return list(
        DeliveryEvent.objects.filter(delivery=delivery)
        .exclude(status__in=("queued", "sent"))
        .values_list("status", "detail")
    )


def _status(delivery: Delivery) -> str:
    delivery.refresh_from_db()
    return delivery.status


# --- SendGrid --------------------------------------------------------------------------------


def test_sendgrid_events_move_each_delivery_once_and_fill_the_suppression_list(
    api: Any, template: Any, sendgrid: SendGridEmulator
) -> None:
    first, second, third = _sent(api, "email", 3)
    # One SendGrid request carried all three: one X-Message-Id, so only the custom argument
    # tells them apart.
    [request] = sendgrid.accepted_requests()
    assert len({first.provider_message_id, second.provider_message_id}) == 1
    delivered, _, _ = sendgrid.events_for(request, "delivered", response="250 OK")
    opened, _, _ = sendgrid.events_for(request, "open", useragent="Mozilla/5.0")
    clicked, _, _ = sendgrid.events_for(request, "click", url="https://example.com/order")
    _, bounced, _ = sendgrid.events_for(
        request, "bounce", type="bounce", reason="550 5.1.1 The email account does not exist"
    )
    _, _, spam = sendgrid.events_for(request, "spamreport")
    events = [delivered, opened, clicked, bounced, spam]

    answers = [_post_events(sendgrid, events), _post_events(sendgrid, events)]
    assert [(a.status_code, a.json()) for a in answers] == [(200, {"received": 5})] * 2
    # The repeat is the same five events: kept once.
    assert ProviderEvent.objects.count() == 5
    assert provider_events_apply() == 5
    assert provider_events_apply() == 0

    assert [_status(d) for d in (first, second, third)] == ["delivered", "bounced", "sent"]
    assert _log(first) == [
        ("delivered", "sendgrid delivered: 250 OK"),
        ("opened", "sendgrid open"),
        ("clicked", "sendgrid click: https://example.com/order"),
    ]
    assert _log(second) == [
        ("bounced", "sendgrid bounce: hard: 550 5.1.1 The email account does not exist")
    ]
    assert _log(third) == [("complained", "sendgrid spamreport")]
    assert first.delivered_at is not None
    assert set(
        Suppression.objects.values_list("channel", "address", "reason", "source", "delivery")
    ) == {
        ("email", "user-1@example.com", "bounced", "sendgrid", second.pk),
        ("email", "user-2@example.com", "complained", "sendgrid", third.pk),
    }
    # The status as the API tells it.
    detail = api.get(f"/api/v1/notifications/{second.notification_id}").json()
    assert (detail["status"], detail["deliveries"][0]["status"]) == ("failed", "bounced")

    # Later sends: a hard bounce stops even a critical one; a complaint stops all but those.
    skipped = {"channel": "email", "status": "skipped", "reason": "suppressed"}
    queued = {"channel": "email", "status": "queued"}
    assert _send(api, 1, "email")["deliveries"] == [skipped]
    assert _send(api, 1, "email", priority="critical")["deliveries"] == [skipped]
    assert _send(api, 2, "email")["deliveries"] == [skipped]
    assert _send(api, 2, "email", priority="critical")["deliveries"] == [queued]
    assert _send(api, 0, "email")["deliveries"] == [queued]


def test_a_late_delivered_does_not_undo_a_bounce_and_a_late_bounce_wins(
    api: Any, template: Any, sendgrid: SendGridEmulator
) -> None:
    first, second = _sent(api, "email", 2)
    [request] = sendgrid.accepted_requests()
    soft = {"type": "blocked", "reason": "421 try later"}
    # First: bounced, then a delivered that comes late. Second: delivered, then bounced.
    assert (
        _post_events(sendgrid, [sendgrid.events_for(request, "bounce", **soft)[0]]).status_code
        == 200
    )
    provider_events_apply()
    assert _post_events(sendgrid, sendgrid.events_for(request, "delivered")).status_code == 200
    provider_events_apply()
    assert (
        _post_events(sendgrid, [sendgrid.events_for(request, "bounce", **soft)[1]]).status_code
        == 200
    )
    provider_events_apply()

    assert (_status(first), _status(second)) == ("bounced", "bounced")
    assert _log(first) == [
        ("bounced", "sendgrid bounce: soft: 421 try later"),
        ("delivered", "sendgrid delivered (late: the delivery stays bounced)"),
    ]
    assert _log(second) == [
        ("delivered", "sendgrid delivered"),
        ("bounced", "sendgrid bounce: soft: 421 try later"),
    ]
    # A soft bounce says nothing of the address.
    assert not Suppression.objects.exists()


def test_an_event_that_comes_before_the_delivery_is_settled_waits_for_it(
    api: Any, template: Any, sendgrid: SendGridEmulator, settings: Any
) -> None:
    [first] = _sent(api, "email", 1)
    [request] = sendgrid.accepted_requests()
    [event] = sendgrid.events_for(request, "delivered")
    # As if our own write of `sent` had not committed yet.
    Delivery.objects.filter(pk=first.pk).update(status=DeliveryStatus.QUEUED)
    assert _post_events(sendgrid, [event]).status_code == 200
    assert provider_events_apply() == 0
    waiting = ProviderEvent.objects.get()
    assert (waiting.tries, waiting.processed_at) == (1, None)
    assert waiting.not_before is not None and waiting.not_before > timezone.now()
    assert provider_events_apply() == 0  # not due yet

    Delivery.objects.filter(pk=first.pk).update(status=DeliveryStatus.SENT)
    ProviderEvent.objects.update(not_before=timezone.now())
    assert provider_events_apply() == 1
    assert _status(first) == "delivered"
    assert ProviderEvent.objects.get().result == "sent -> delivered"


def test_sendgrid_posts_that_are_not_sendgrids_are_refused(
    template: Any, sendgrid: SendGridEmulator, settings: Any
) -> None:
    body = json.dumps([{"event": "delivered", "sg_event_id": "e1", "delivery_id": "1"}]).encode()
    good = sendgrid.sign(body)
    other_key = ec.generate_private_key(ec.SECP256R1())
    forged = {
        **good,
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(
            other_key.sign(
                good["X-Twilio-Email-Event-Webhook-Timestamp"].encode() + body,
                ec.ECDSA(hashes.SHA256()),
            )
        ).decode(),
    }
    stale = sendgrid.sign(body, timestamp=int(time.time()) - 3600)
    not_json = b"delivered"
    answers = {
        "unsigned": _post_sendgrid(body, {}),
        "forged": _post_sendgrid(body, forged),
        "tampered": _post_sendgrid(body.replace(b"e1", b"e2"), good),
        "stale": _post_sendgrid(body, stale),
        "not events": _post_sendgrid(not_json, sendgrid.sign(not_json)),
    }
    assert {name: a.status_code for name, a in answers.items()} == {
        "unsigned": 401,
        "forged": 401,
        "tampered": 401,
        "stale": 400,
        "not events": 400,
    }
    assert answers["unsigned"].json() == {
        "error": "unauthenticated",
        "detail": "X-Twilio-Email-Event-Webhook-Signature and "
        "X-Twilio-Email-Event-Webhook-Timestamp are required.",
    }
    # 3600 s, or 3601 when a second ticks between signing and checking.
    assert re.fullmatch(r"The post was signed 360[01] s ago\.", answers["stale"].json()["detail"])
    settings.SENDGRID_WEBHOOK_PUBLIC_KEY = ""
    unconfigured = _post_sendgrid(body, good)
    assert (unconfigured.status_code, unconfigured.json()["detail"]) == (
        401,
        "SENDGRID_WEBHOOK_PUBLIC_KEY is not set.",
    )
    assert not ProviderEvent.objects.exists()


# --- Twilio ----------------------------------------------------------------------------------


def test_twilio_callbacks_move_the_delivery_and_a_dead_number_is_suppressed(
    api: Any, template: Any, twilio: TwilioEmulator
) -> None:
    first, second = _sent(api, "sms", 2)
    delivered = twilio.status_params(first.provider_message_id, "delivered", to=first.address)
    unknown = twilio.status_params(
        second.provider_message_id, "undelivered", to=second.address, error_code="30005"
    )
    for params in (delivered, unknown, delivered):
        answer = _post_twilio(twilio, params)
        assert answer.status_code == 200
        assert answer["Content-Type"] == "text/xml"
        assert answer.content.decode().endswith("<Response></Response>")
    assert ProviderEvent.objects.count() == 2
    assert provider_events_apply() == 2
    assert (_status(first), _status(second)) == ("delivered", "bounced")
    assert _log(first) == [("delivered", "twilio delivered")]
    assert _log(second) == [("bounced", "twilio undelivered: error 30005")]
    assert list(Suppression.objects.values_list("channel", "address", "reason")) == [
        ("sms", second.address, "bounced")
    ]


def test_twilio_posts_that_are_not_twilios_are_refused(
    template: Any, twilio: TwilioEmulator, settings: Any
) -> None:
    params = twilio.status_params("SM" + "0" * 32, "delivered", to="+14155550000")
    assert _post_twilio(twilio, params, signature="").status_code == 401
    forged = _post_twilio(twilio, params, signature=base64.b64encode(b"x" * 20).decode())
    assert (forged.status_code, forged.json()["detail"]) == (401, "The signature is not valid.")
    # Signed for another URL: a signature cannot be moved to this hook.
    elsewhere = twilio.sign("https://example.com/hooks/twilio", params)
    assert _post_twilio(twilio, params, signature=elsewhere).status_code == 401
    # Behind a proxy the public URL is what Twilio signed.
    settings.PUBLIC_BASE_URL = "https://notify.example.com"
    assert _post_twilio(twilio, params).status_code == 401
    public = twilio.sign("https://notify.example.com/hooks/twilio", params)
    assert _post_twilio(twilio, params, signature=public).status_code == 200
    assert ProviderEvent.objects.count() == 1


def test_an_inbound_stop_suppresses_the_number_for_every_owner_and_start_lifts_it(
    api: Any, owner: Any, template: Any, twilio: TwilioEmulator
) -> None:
    number = "+14155550000"
    RecipientFactory(owner=owner, external_id="user-0", phone=number)
    other = OwnerFactory()
    RecipientFactory(owner=other, external_id="same-person", phone=number)
    RecipientFactory(owner=OwnerFactory(), external_id="someone-else", phone="+14155559999")
    stop = twilio.inbound_params(from_=number, body="Stop")
    assert _post_twilio(twilio, stop).status_code == 200
    assert provider_events_apply() == 1
    assert set(Suppression.objects.values_list("owner", "channel", "address", "reason")) == {
        (owner.pk, "sms", number, "stopped"),
        (other.pk, "sms", number, "stopped"),
    }
    skipped = [{"channel": "sms", "status": "skipped", "reason": "suppressed"}]
    assert _send(api, 0, "sms")["deliveries"] == skipped
    # STOP binds a critical message too: the carrier would refuse it.
    assert _send(api, 0, "sms", priority="critical")["deliveries"] == skipped

    assert (
        _post_twilio(twilio, twilio.inbound_params(from_=number, body="START")).status_code == 200
    )
    assert provider_events_apply() == 1
    assert not Suppression.objects.exists()
    assert _send(api, 0, "sms")["deliveries"] == [{"channel": "sms", "status": "queued"}]


def test_twilio_21610_on_send_suppresses_the_number(
    api: Any, template: Any, twilio: TwilioEmulator
) -> None:
    twilio.fail_next(twilio.unsubscribed())
    notification = _send(api, 0, "sms")
    delivery = Delivery.objects.get(notification_id=notification["id"])
    assert deliveries_process(delivery_ids=[delivery.pk]) == {delivery.pk: ProcessOutcome.DEAD}
    [suppression] = Suppression.objects.all()
    assert (suppression.address, suppression.reason, suppression.source) == (
        "+14155550000",
        "stopped",
        "twilio",
    )
    assert suppression.detail == (
        "Twilio 400 (code 21610): Attempt to send to unsubscribed recipient"
    )
    assert _send(api, 0, "sms")["deliveries"] == [
        {"channel": "sms", "status": "skipped", "reason": "suppressed"}
    ]


def test_a_delivery_accepted_before_its_address_was_suppressed_is_skipped_by_the_worker(
    api: Any, template: Any, twilio: TwilioEmulator, owner: Any
) -> None:
    waiting = Delivery.objects.get(notification_id=_send(api, 0, "sms")["id"])
    stop = twilio.inbound_params(from_="+14155550000", body="STOP")
    assert _post_twilio(twilio, stop).status_code == 200
    provider_events_apply()
    assert deliveries_process(delivery_ids=[waiting.pk]) == {waiting.pk: ProcessOutcome.SKIPPED}
    waiting.refresh_from_db()
    assert (waiting.status, waiting.skip_reason, waiting.attempts) == ("skipped", "suppressed", 0)
    assert twilio.requests() == []
    assert _log(waiting) == [("skipped", "suppressed: stopped")]
