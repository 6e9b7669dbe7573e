"""The creation path reads recipient, preferences, devices, template and API key from the
cache once warm, and the bulk endpoint answers per item."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from notifications.models import Notification
from tests.factories import DeviceFactory, RecipientFactory

pytestmark = pytest.mark.django_db


def test_warm_creation_only_writes(api: Any, template: Any) -> None:
    recipient = RecipientFactory(owner=template.owner, external_id="user-42")
    DeviceFactory(recipient=recipient)
    body = {"recipient": "user-42", "template": "order_shipped", "data": {"order_id": "1"}}
    assert api.post("/api/v1/notifications", body, format="json").status_code == 202
    with CaptureQueriesContext(connection) as queries:
        assert api.post("/api/v1/notifications", body, format="json").status_code == 202
    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    # INSERTs of the notification, of its four deliveries (one statement) and of their
    # "queued" events in the delivery log, in one transaction (a savepoint inside the
    # test's own): no SELECT at all.
    assert statements.count("INSERT") == 3
    assert "SELECT" not in statements
    assert "UPDATE" not in statements


def test_bulk_answers_per_item(api: Any, template: Any) -> None:
    items = [
        {
            "recipient": {"id": "b-1", "email": "b1@example.com"},
            "template": "order_shipped",
            "data": {"order_id": "1"},
            "channels": ["email"],
        },
        {
            "recipient": {"id": "b-2", "email": "b2@example.com"},
            "template": "order_shipped",
            "data": {},
            "channels": ["email"],
        },
        {"recipient": "b-1", "template": "nope", "data": {}},
        {
            "recipient": "b-1",
            "template": "order_shipped",
            "data": {"order_id": "2"},
            "channels": ["email"],
            "idempotency_key": "bulk-k",
        },
        {
            "recipient": "b-1",
            "template": "order_shipped",
            "data": {"order_id": "2"},
            "channels": ["email"],
            "idempotency_key": "bulk-k",
        },
        {"template": "order_shipped"},
    ]
    response = api.post("/api/v1/notifications/bulk", {"notifications": items}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (3, 3)
    results = body["results"]
    assert [r["status"] for r in results] == [202, 400, 400, 202, 200, 400]
    assert results[0]["deliveries"] == [{"channel": "email", "status": "queued"}]
    assert results[1]["error"]["fields"] == {"data.order_id": ["Missing template variable."]}
    assert results[2]["error"]["fields"] == {"template": ["Unknown template 'nope'."]}
    assert results[4]["id"] == results[3]["id"]
    assert results[5]["error"]["fields"] == {"recipient": ["This field is required."]}
    assert Notification.objects.count() == 2


def test_bulk_refuses_more_than_1000(api: Any, template: Any) -> None:
    items = [{"recipient": "x", "template": "order_shipped"}] * 1001
    response = api.post("/api/v1/notifications/bulk", {"notifications": items}, format="json")
    assert response.status_code == 400
    assert response.json()["fields"] == {
        "notifications": ["Ensure this field has no more than 1000 elements."]
    }
