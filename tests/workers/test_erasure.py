"""Erasure: DELETE /api/v1/recipients/{id} takes away everything that names the person and
keeps the notifications and the delivery log as anonymous counts; audited in the admin log."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.models import DELETION, LogEntry
from django.utils import timezone
from rest_framework.test import APIClient

from notifications.models import (
    Delivery,
    DeliveryAttempt,
    DeliveryEvent,
    Device,
    IdempotencyRecord,
    Notification,
    Preference,
    Recipient,
    Suppression,
    Topic,
    TopicSubscription,
)
from notifications.suppressions import suppression_add
from tests.factories import RecipientFactory
from workers.models import DeadLetter, SandboxMessage
from workers.services import deliveries_process
from workers.transitions import dead_letter_create

pytestmark = pytest.mark.django_db

PERSON = {"id": "user-42", "email": "Ada@Example.com", "phone": "+14155550142"}


def _notify(api: APIClient, **extra: Any) -> str:
    response = api.post(
        "/api/v1/notifications",
        {"recipient": PERSON, "template": "order_shipped", "data": {"order_id": "A-1"}, **extra},
        format="json",
    )
    assert response.status_code == 202, response.content
    return str(response.json()["id"])


@pytest.fixture
def person(api: APIClient, owner: Any, template: Any, settings: Any) -> dict[str, Any]:
    """A recipient with everything that can name it: contact data, preferences, a device, a
    topic, suppressions, sent and pending notifications, an inbox entry, a dead letter."""
    settings.EMAIL_PROVIDER = settings.SMS_PROVIDER = settings.PUSH_PROVIDER = "sandbox"
    settings.WEB_PROVIDER = "sandbox"
    api.put(f"/api/v1/recipients/{PERSON['id']}", PERSON, format="json")
    assert (
        api.put(
            f"/api/v1/recipients/{PERSON['id']}/preferences",
            {"categories": {"marketing": {"sms": False}}},
            format="json",
        ).status_code
        == 200
    )
    api.post(
        f"/api/v1/recipients/{PERSON['id']}/devices",
        {"platform": "fcm", "token": "ada-device"},
        format="json",
    )
    topic = Topic.objects.create(owner=owner, key="news")
    recipient = Recipient.objects.get(external_id=PERSON["id"])
    TopicSubscription.objects.create(topic=topic, recipient=recipient)
    sent = api.post(
        "/api/v1/notifications",
        {"recipient": PERSON["id"], "template": "order_shipped", "data": {"order_id": "A-1"}},
        format="json",
        HTTP_IDEMPOTENCY_KEY="order-A-1-ada",
    ).json()["id"]
    deliveries_process(
        delivery_ids=list(
            Delivery.objects.filter(notification_id=sent).values_list("pk", flat=True)
        )
    )
    pending = _notify(api, send_at=(timezone.now() + timedelta(days=1)).isoformat())
    dead = Delivery.objects.select_related("notification__recipient").get(
        notification_id=sent, channel="push"
    )
    Delivery.objects.filter(pk=dead.pk).update(status="dead")
    dead_letter_create(delivery=dead, provider="fcm", error="ada-device is not registered")
    suppression_add(
        owner_id=owner.pk,
        channel="email",
        address=PERSON["email"],
        reason="complained",
        source="sendgrid",
        detail="ada@example.com reported spam",
    )
    # Someone else's: untouched.
    other = RecipientFactory(owner=owner, external_id="user-7", email="bob@example.com")
    suppression_add(
        owner_id=owner.pk, channel="email", address=other.email, reason="bounced", source="smtp"
    )
    return {"recipient": recipient, "sent": sent, "pending": pending, "other": other}


def _counts(notification_ids: list[str]) -> list[tuple[str, str]]:
    return sorted(
        Delivery.objects.filter(notification_id__in=notification_ids).values_list(
            "channel", "status"
        )
    )


def test_erasure_leaves_nothing_that_names_the_person_and_keeps_the_counts(
    api: APIClient, person: dict[str, Any]
) -> None:
    recipient = person["recipient"]
    notification_ids = [person["sent"], person["pending"]]
    token = api.post(f"/api/v1/recipients/{PERSON['id']}/token").json()["token"]
    before = _counts(notification_ids)
    events_before = DeliveryEvent.objects.filter(
        delivery__notification__recipient=recipient
    ).count()
    attempts_before = DeliveryAttempt.objects.filter(
        delivery__notification__recipient=recipient
    ).count()
    assert attempts_before > 0 and IdempotencyRecord.objects.count() == 1

    answer = api.delete(f"/api/v1/recipients/{PERSON['id']}")
    assert (answer.status_code, answer.content) == (204, b"")

    recipient.refresh_from_db()
    assert recipient.external_id.startswith("erased-") and len(recipient.external_id) == 39
    assert (recipient.email, recipient.phone, recipient.locale, recipient.timezone) == ("",) * 4
    assert (recipient.quiet_hours, recipient.erased_at is not None) == (None, True)
    assert not Preference.objects.filter(recipient=recipient).exists()
    assert not Device.objects.filter(recipient=recipient).exists()
    assert not TopicSubscription.objects.filter(recipient=recipient).exists()
    assert list(Suppression.objects.values_list("address", flat=True)) == ["bob@example.com"]
    assert not DeadLetter.objects.exists()
    assert not SandboxMessage.objects.exists()
    assert not IdempotencyRecord.objects.exists()
    # The counts stay: every delivery, event and attempt, with nothing personal in them. The
    # pending notification's deliveries are cancelled.
    after = _counts(notification_ids)
    assert [c for c, _ in after] == [c for c, _ in before]
    assert {s for c, s in after if c != "push"} <= {"sent", "cancelled"}
    assert ("email", "cancelled") in after and ("email", "sent") in after
    assert set(
        Delivery.objects.filter(notification_id__in=notification_ids).values_list(
            "address", "provider_message_id", "last_error"
        )
    ) == {("", "", "")}
    assert all(
        c == {}
        for c in Delivery.objects.filter(notification__recipient=recipient).values_list(
            "content", flat=True
        )
    )
    assert set(
        Notification.objects.filter(pk__in=notification_ids).values_list(
            "idempotency_key", "cancel_key"
        )
    ) == {("", "")}
    assert all(
        d == {}
        for d in Notification.objects.filter(pk__in=notification_ids).values_list("data", flat=True)
    )
    events = DeliveryEvent.objects.filter(delivery__notification__recipient=recipient)
    assert events.count() == events_before + 4  # one `cancelled` per pending delivery
    assert set(events.values_list("detail", flat=True)) == {""}
    attempts = DeliveryAttempt.objects.filter(delivery__notification__recipient=recipient)
    assert attempts.count() == attempts_before
    assert set(attempts.values_list("error", "provider_message_id")) == {("", "")}

    # Gone for the API and for the browser's token; the id is free for a new person.
    assert api.delete(f"/api/v1/recipients/{PERSON['id']}").status_code == 404
    assert api.get(f"/api/v1/recipients/{PERSON['id']}").status_code == 404
    assert api.get(f"/api/v1/notifications/{person['sent']}").json()["recipient"] == (
        recipient.external_id
    )
    browser = APIClient()
    browser.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert browser.get("/api/v1/inbox").status_code == 401
    again = api.put(
        f"/api/v1/recipients/{PERSON['id']}", {"email": "new@example.com"}, format="json"
    )
    assert again.status_code == 201
    assert again.json()["email"] == "new@example.com"
    taken = api.put(f"/api/v1/recipients/{recipient.external_id}", {}, format="json")
    assert taken.status_code == 400
    assert taken.json()["fields"] == {
        "id": ["Recipient ids starting with 'erased-' name erased recipients."]
    }

    [entry] = LogEntry.objects.all()
    assert (entry.action_flag, entry.object_id, entry.object_repr) == (
        DELETION,
        str(recipient.pk),
        recipient.external_id,
    )
    assert entry.user.username == "clarion-api" and not entry.user.is_active
    assert entry.change_message.startswith("Erased by API key #")
    assert "2 notifications and 8 deliveries kept as anonymous counts" in entry.change_message
    assert "4 pending deliveries cancelled" in entry.change_message
    assert "Ada" not in entry.change_message and "ada" not in entry.change_message


def test_an_erased_recipient_is_sent_nothing_more(
    api: APIClient, person: dict[str, Any], owner: Any
) -> None:
    assert api.delete(f"/api/v1/recipients/{PERSON['id']}").status_code == 204
    # A topic send does not reach it: its subscription went with it.
    answer = api.post(
        "/api/v1/notifications",
        {"topic": "news", "template": "order_shipped", "data": {"order_id": "T-1"}},
        format="json",
    )
    assert answer.status_code == 202, answer.content
    assert answer.json()["recipients_total"] == 0
    # A send by the old id is to an unknown recipient.
    unknown = api.post(
        "/api/v1/notifications",
        {"recipient": PERSON["id"], "template": "order_shipped", "data": {"order_id": "A-2"}},
        format="json",
    )
    assert unknown.status_code == 400


def test_erasure_takes_the_kept_answers_that_name_the_person(
    api: APIClient, person: dict[str, Any], django_capture_on_commit_callbacks: Any
) -> None:
    """Idempotency-Key answers kept for a day hold a recipient's id (a token), its address and
    content (a dead letter): they go with the person, in the database and in Redis."""
    token = api.post(f"/api/v1/recipients/{PERSON['id']}/token", HTTP_IDEMPOTENCY_KEY="t-ada")
    letter = DeadLetter.objects.get()
    discarded = api.post(
        f"/api/v1/dead-letters/{letter.pk}/discard", HTTP_IDEMPOTENCY_KEY="discard-ada"
    )
    bobs = api.post("/api/v1/recipients/user-7/token", HTTP_IDEMPOTENCY_KEY="t-bob")
    assert (token.status_code, discarded.status_code, bobs.status_code) == (200, 200, 200)
    assert discarded.json()["recipient"] == PERSON["id"]
    assert set(IdempotencyRecord.objects.values_list("key", flat=True)) == {
        "order-A-1-ada",
        "t-ada",
        "discard-ada",
        "t-bob",
    }
    with django_capture_on_commit_callbacks(execute=True):
        assert api.delete(f"/api/v1/recipients/{PERSON['id']}").status_code == 204
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["t-bob"]
    # Redis forgot them too: the same key is new again (the person's id names nobody now).
    assert (
        api.post(
            f"/api/v1/recipients/{PERSON['id']}/token", HTTP_IDEMPOTENCY_KEY="t-ada"
        ).status_code
        == 404
    )
    replayed = api.post("/api/v1/recipients/user-7/token", HTTP_IDEMPOTENCY_KEY="t-bob")
    assert (replayed.json(), replayed["Idempotent-Replayed"]) == (bobs.json(), "true")
