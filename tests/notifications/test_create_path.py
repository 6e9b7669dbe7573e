"""The creation path reads recipient, preferences, devices, template and API key from the
cache once warm, and the bulk endpoint answers per item."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.cache import cache
from django.db import connection
from django.test.utils import CaptureQueriesContext

from notifications.models import Delivery, DeliveryEvent, IdempotencyRecord, Notification
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
    # One transaction (a savepoint inside the test's own) and no read at all. On PostgreSQL
    # one statement writes the notification, its four deliveries and their "queued" events
    # (writable CTEs); elsewhere one INSERT per table.
    writes = ["WITH"] if connection.vendor == "postgresql" else ["INSERT"] * 3
    assert statements == ["SAVEPOINT", *writes, "RELEASE"]
    notification = Notification.objects.latest("created_at")
    deliveries = list(notification.deliveries.order_by("channel").values_list("channel", "status"))
    assert deliveries == [
        ("email", "queued"),
        ("push", "queued"),
        ("sms", "queued"),
        ("web", "queued"),
    ]
    assert (
        sorted(
            DeliveryEvent.objects.filter(delivery__notification=notification).values_list(
                "delivery__channel", "status"
            )
        )
        == deliveries
    )


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


def _items(count: int, *, prefix: str = "k") -> list[dict[str, Any]]:
    return [
        {
            "recipient": {"id": f"r-{n}", "email": f"r{n}@example.com"},
            "template": "order_shipped",
            "data": {"order_id": str(n)},
            "channels": ["email", "web"],
            "idempotency_key": f"{prefix}-{n}",
        }
        for n in range(count)
    ]


def test_bulk_writes_every_item_in_one_set_of_inserts(api: Any, template: Any) -> None:
    """A bulk request is one transaction whatever its size: one write per table, not one per
    item (recipients known and cached, as a bulk usually goes)."""
    first = api.post("/api/v1/notifications/bulk", {"notifications": _items(50)}, format="json")
    assert first.json()["accepted"] == 50
    items = _items(50, prefix="again")
    for item in items:
        item["recipient"] = item["recipient"]["id"]
    with CaptureQueriesContext(connection) as queries:
        response = api.post("/api/v1/notifications/bulk", {"notifications": items}, format="json")
    assert response.json()["accepted"] == 50
    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    if connection.vendor == "postgresql":
        # The deliveries' ids in one query, then one COPY per table (notifications,
        # deliveries, their "queued" events, idempotency records) on the driver's cursor,
        # which Django's query log does not see.
        [ids] = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("SELECT")]
        assert "nextval" in ids and "generate_series" in ids
        assert "INSERT" not in statements
    else:
        # One INSERT per table, or a few batches where the database caps a statement's
        # parameters (SQLite's 999).
        assert 4 <= statements.count("INSERT") <= 10, statements
        assert "SELECT" not in statements
    assert Notification.objects.count() == 100
    assert Delivery.objects.count() == 200
    assert DeliveryEvent.objects.count() == 200
    assert IdempotencyRecord.objects.count() == 100


@pytest.mark.parametrize("size", [3, 30])  # one statement; COPY on PostgreSQL
def test_bulk_falls_back_one_by_one_when_redis_forgot_a_key(
    api: Any, template: Any, size: int, django_capture_on_commit_callbacks: Any
) -> None:
    """Redis lost the keys (flush, eviction) but the database holds one item's record: the
    bulk write fails on it, each item is written on its own, and that item answers as the
    first time while the others are accepted."""
    items = _items(size)
    first = api.post("/api/v1/notifications/bulk", {"notifications": items[1:2]}, format="json")
    [original] = first.json()["results"]
    cache.clear()
    # Run what waits for the commit (here, the answers remembered in Redis).
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/notifications/bulk", {"notifications": items}, format="json")
    results = response.json()["results"]
    assert [r["status"] for r in results] == [202, 200] + [202] * (size - 2)
    assert results[1]["id"] == original["id"]
    assert Notification.objects.count() == size
    assert IdempotencyRecord.objects.count() == size
    # The answers are remembered in Redis again: a third try replays them all.
    again = api.post("/api/v1/notifications/bulk", {"notifications": items}, format="json")
    assert [r["status"] for r in again.json()["results"]] == [200] * size
    assert [r["id"] for r in again.json()["results"]] == [r["id"] for r in results]


def test_bulk_item_reusing_a_key_with_another_body_is_refused(api: Any, template: Any) -> None:
    items = _items(2)
    items[1]["idempotency_key"] = items[0]["idempotency_key"]
    response = api.post("/api/v1/notifications/bulk", {"notifications": items}, format="json")
    results = response.json()["results"]
    assert [r["status"] for r in results] == [202, 422]
    assert results[1]["error"]["error"] == "idempotency_key_reused"
    assert Notification.objects.count() == 1


def test_bulk_item_whose_key_is_in_flight_elsewhere_answers_409(
    api: Any, owner: Any, template: Any
) -> None:
    from notifications import idempotency

    items = _items(2)
    fp = idempotency.fingerprint(method="POST", path="bulk-item", body=items[0])
    held = idempotency.begin(owner_id=owner.pk, key=items[0]["idempotency_key"], fp=fp)
    assert isinstance(held, idempotency.Proceed)
    response = api.post("/api/v1/notifications/bulk", {"notifications": items}, format="json")
    results = response.json()["results"]
    assert [r["status"] for r in results] == [409, 202]
    assert results[0]["error"]["error"] == "conflict"
    assert Notification.objects.count() == 1
