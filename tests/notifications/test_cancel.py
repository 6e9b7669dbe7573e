"""Cancelling notifications through the API: by id, by the caller's cancel_key and by
Idempotency-Key; what is cancelled, what is not and why; and the claim and the relay leaving
cancelled deliveries alone."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Notification
from workers import transitions
from workers.relay import outbox_publish_due

pytestmark = pytest.mark.django_db

USER = {"id": "user-42", "email": "user-42@example.com", "phone": "+14155550100"}


def _send(api: Any, *, headers: dict[str, str] | None = None, **fields: Any) -> str:
    body = {
        "recipient": USER,
        "template": "order_shipped",
        "data": {"order_id": "A-1"},
        "channels": ["email", "sms"],
    }
    response = api.post(
        "/api/v1/notifications", {**body, **fields}, format="json", **(headers or {})
    )
    assert response.status_code == 202, response.content
    return str(response.json()["id"])


def _later() -> str:
    return (timezone.now() + timedelta(hours=1)).isoformat()


def test_a_scheduled_notification_is_cancelled_whole_and_says_so(api: Any, template: Any) -> None:
    notification_id = _send(api, send_at=_later(), channels=["email", "sms"])
    answer = api.post(f"/api/v1/notifications/{notification_id}/cancel")
    assert answer.status_code == 200
    assert answer.json() == {
        "id": notification_id,
        "cancelled": [
            {"channel": "email", "status": "cancelled"},
            {"channel": "sms", "status": "cancelled"},
        ],
        "not_cancelled": [],
    }
    detail = api.get(f"/api/v1/notifications/{notification_id}").json()
    assert detail["status"] == "cancelled"
    events = DeliveryEvent.objects.filter(delivery__notification_id=notification_id)
    assert sorted(events.filter(status="cancelled").values_list("detail", flat=True)) == [
        "cancelled by request",
        "cancelled by request",
    ]
    # Again: nothing more to cancel, and the answer says where each stands.
    again = api.post(f"/api/v1/notifications/{notification_id}/cancel").json()
    assert again["cancelled"] == []
    assert again["not_cancelled"] == [
        {"channel": "email", "status": "cancelled"},
        {"channel": "sms", "status": "cancelled"},
    ]


def test_what_has_gone_or_is_being_sent_is_not_cancelled(api: Any, template: Any) -> None:
    notification_id = _send(api, channels=["email", "sms", "push"])
    email, sms, _push = Delivery.objects.filter(notification_id=notification_id).order_by("pk")
    Delivery.objects.filter(pk=email.pk).update(status=DeliveryStatus.SENT)
    # A worker holds the SMS: it goes to its provider.
    Delivery.objects.filter(pk=sms.pk).update(
        lease_token=uuid.uuid4(), lease_expires_at=timezone.now() + timedelta(minutes=2)
    )
    answer = api.post(f"/api/v1/notifications/{notification_id}/cancel").json()
    assert answer["cancelled"] == []  # push was skipped (no device): final already
    assert answer["not_cancelled"] == [
        {"channel": "email", "status": "sent"},
        {"channel": "sms", "status": "queued", "reason": "being_sent"},
        {"channel": "push", "status": "skipped"},
    ]
    assert Delivery.objects.get(pk=sms.pk).status == DeliveryStatus.QUEUED


def test_a_cancelled_delivery_is_neither_claimed_nor_published(api: Any, template: Any) -> None:
    notification_id = _send(api, channels=["sms"])
    [sms] = Delivery.objects.filter(notification_id=notification_id)
    api.post(f"/api/v1/notifications/{notification_id}/cancel")
    assert outbox_publish_due() == 0
    assert transitions.deliveries_claim(delivery_ids=[sms.pk]) == []
    sms.refresh_from_db()
    assert (sms.status, sms.attempts, sms.lease_token) == (DeliveryStatus.CANCELLED, 0, None)


def test_a_cancel_key_cancels_every_notification_made_with_it(
    api: Any, other_api: Any, template: Any, owner: Any, other_owner: Any
) -> None:
    from tests.factories import TemplateFactory

    TemplateFactory(owner=other_owner, key="order_shipped")
    mine = [_send(api, send_at=_later(), cancel_key="order-A-1001") for _ in range(2)]
    unrelated = _send(api, send_at=_later(), cancel_key="order-A-1002")
    theirs = _send(other_api, send_at=_later(), cancel_key="order-A-1001")

    answer = api.post("/api/v1/notifications/cancel", {"cancel_key": "order-A-1001"}, format="json")
    assert answer.status_code == 200
    assert [n["id"] for n in answer.json()["notifications"]] == mine
    assert all(n["cancelled"] and not n["not_cancelled"] for n in answer.json()["notifications"])
    for untouched in (unrelated, theirs):
        assert set(
            Delivery.objects.filter(notification_id=untouched).values_list("status", flat=True)
        ) == {DeliveryStatus.SCHEDULED}
    # Nothing under that key any more: an empty answer, not an error.
    nothing = api.post("/api/v1/notifications/cancel", {"cancel_key": "no-such"}, format="json")
    assert nothing.json() == {"notifications": []}


def test_an_idempotency_key_cancels_the_notification_it_created(api: Any, template: Any) -> None:
    notification_id = _send(api, send_at=_later(), headers={"HTTP_IDEMPOTENCY_KEY": "order-9"})
    answer = api.post(
        "/api/v1/notifications/cancel", {"idempotency_key": "order-9"}, format="json"
    ).json()
    assert [n["id"] for n in answer["notifications"]] == [notification_id]
    assert Notification.objects.get(pk=notification_id).idempotency_key == "order-9"
    assert set(
        Delivery.objects.filter(notification_id=notification_id).values_list("status", flat=True)
    ) == {DeliveryStatus.CANCELLED}


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "non_field_errors"),
        ({"cancel_key": "a", "idempotency_key": "b"}, "non_field_errors"),
        ({"cancel_key": "k" * 256}, "cancel_key"),
        ({"cancel_key": ""}, "cancel_key"),
    ],
)
def test_a_cancel_by_key_needs_exactly_one_valid_key(
    api: Any, body: dict[str, Any], field: str
) -> None:
    answer = api.post("/api/v1/notifications/cancel", body, format="json")
    assert answer.status_code == 400
    assert field in answer.json()["fields"]


def test_a_cancel_key_is_checked_at_creation(api: Any, template: Any) -> None:
    body = {"recipient": USER, "template": "order_shipped", "data": {"order_id": "A-1"}}
    answer = api.post("/api/v1/notifications", {**body, "cancel_key": "k" * 256}, format="json")
    assert answer.status_code == 400
    assert "cancel_key" in answer.json()["fields"]


def test_another_owners_notification_cannot_be_cancelled(
    api: Any, other_api: Any, template: Any
) -> None:
    notification_id = _send(api, send_at=_later())
    assert other_api.post(f"/api/v1/notifications/{notification_id}/cancel").status_code == 404
    assert api.post("/api/v1/notifications/not-a-uuid/cancel").status_code == 404
    assert set(
        Delivery.objects.filter(notification_id=notification_id).values_list("status", flat=True)
    ) == {DeliveryStatus.SCHEDULED}
