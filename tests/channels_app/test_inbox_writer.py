"""Acks and reads in sets: a server process gathers its sockets' acks and reads for
WS_ACK_WINDOW_SECONDS and writes them in one set-based statement per kind, cancelling
escalation steps only where a notification has one, and keeps a batch the database refused."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.db import OperationalError, connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from channels_app import inbox_writer as writer_module
from channels_app.inbox_writer import InboxWriter
from notifications import sending, services
from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Notification
from tests.channels_app.support import (
    communicator,
    create_web_notification,
    expected_frame,
    inbox_writes_drained,
    push,
    recipient_with_token,
)
from tests.factories import TemplateFactory
from workers import transitions

pytestmark = pytest.mark.django_db(transaction=True)


def _web(notification: Notification) -> Delivery:
    return Delivery.objects.get(notification=notification, channel="web")


def _pushed(owner: Any, count: int, prefix: str = "user") -> list[tuple[int, Notification]]:
    out = []
    for n in range(count):
        recipient, _ = recipient_with_token(owner, f"{prefix}-{n}")
        notification = create_web_notification(owner, f"{prefix}-{n}", f"O-{n}")
        push(notification)
        out.append((recipient.pk, notification))
    return out


def _queries(acks: list[tuple[int, uuid.UUID]], reads: list[tuple[int, uuid.UUID]]) -> int:
    with CaptureQueriesContext(connection) as queries:
        transitions.inbox_record(acks=acks, reads=reads, source="websocket")
    return len(queries)


def test_a_batch_costs_the_same_statements_whatever_its_size(owner: Any, template: Any) -> None:
    pushed = _pushed(owner, 21)
    one = _queries([(pushed[0][0], pushed[0][1].pk)], [(pushed[0][0], pushed[0][1].pk)])
    rest = [(r, n.pk) for r, n in pushed[1:]]
    twenty = _queries(rest, rest)
    assert twenty == one
    for _, notification in pushed:
        delivery = _web(notification)
        assert delivery.status == DeliveryStatus.READ
        assert delivery.delivered_at is not None and delivery.read_at is not None
        assert list(
            DeliveryEvent.objects.filter(delivery=delivery)
            .order_by("pk")
            .values_list("status", flat=True)
        ) == ["queued", "sent", "delivered", "read"]


def test_a_pair_with_someone_elses_notification_moves_nothing(owner: Any, template: Any) -> None:
    (mine_recipient, mine), (theirs_recipient, theirs) = _pushed(owner, 2)
    delivered, read = transitions.inbox_record(
        acks=[(mine_recipient, theirs.pk), (mine_recipient, mine.pk)],
        reads=[(theirs_recipient, mine.pk)],
        source="websocket",
    )
    assert (delivered, read) == (1, 0)
    assert _web(mine).status == DeliveryStatus.DELIVERED
    assert _web(theirs).status == DeliveryStatus.SENT


def test_a_read_in_a_batch_cancels_only_its_own_notifications_escalation(owner: Any) -> None:
    TemplateFactory(
        owner=owner,
        key="order_shipped",
        escalation=[{"after": "1h", "unless": "read", "channel": "sms"}],
    )
    pushed = []
    for n in range(3):
        recipient, _ = services.recipient_upsert(
            owner=owner, external_id=f"user-{n}", phone="+14155550100"
        )
        # Every channel of the template: web now, the SMS as the escalation step.
        with override_settings(WEB_PUSH_AT_ACCEPT=False):
            body = sending.notification_create(
                owner=owner,
                recipient=f"user-{n}",
                template_key="order_shipped",
                data={"order_id": f"O-{n}"},
            )
        notification = Notification.objects.get(pk=body["id"])
        push(notification)
        pushed.append((recipient.pk, notification))
    steps = Delivery.objects.filter(channel="sms", status=DeliveryStatus.SCHEDULED)
    assert steps.count() == 3
    # Acks alone meet no `unless: read`; reads of two notifications cancel their two steps.
    transitions.inbox_record(acks=[(r, n.pk) for r, n in pushed], reads=[], source="websocket")
    assert steps.count() == 3
    transitions.inbox_record(acks=[], reads=[(r, n.pk) for r, n in pushed[:2]], source="websocket")
    assert set(steps.values_list("notification_id", flat=True)) == {pushed[2][1].pk}
    cancelled = Delivery.objects.filter(channel="sms", status=DeliveryStatus.CANCELLED)
    assert set(cancelled.values_list("notification_id", flat=True)) == {
        pushed[0][1].pk,
        pushed[1][1].pk,
    }


def test_acks_of_many_sockets_are_written_in_one_batch(
    owner: Any, template: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed = _pushed(owner, 3)
    tokens = [recipient_with_token(owner, f"user-{n}")[1] for n in range(3)]
    batches: list[tuple[list[Any], list[Any]]] = []
    write = writer_module._write

    async def recorded(acks: list[Any], reads: list[Any]) -> tuple[int, int]:
        batches.append((acks, reads))
        return await write(acks, reads)

    monkeypatch.setattr(writer_module, "_write", recorded)

    async def scenario() -> None:
        sockets = [communicator(token=t) for t in tokens]
        for ws, (_, notification) in zip(sockets, pushed, strict=True):
            assert await ws.connect() == (True, None)
            assert await ws.receive_json_from() == expected_frame(notification, position=1)
            assert await ws.receive_json_from() == {"type": "ready", "position": 1}
        for ws, (_, notification) in zip(sockets, pushed, strict=True):
            await ws.send_json_to({"type": "ack", "id": str(notification.pk)})
            await ws.send_json_to({"type": "ack", "id": str(notification.pk)})
        for ws in sockets:
            await ws.send_json_to({"type": "nonsense"})
            assert await ws.receive_json_from() == {"type": "error", "error": "unknown_type"}
        await inbox_writes_drained()
        for ws in sockets:
            await ws.disconnect()

    async_to_sync(scenario)()
    # One batch, each ack once, though each was sent twice.
    [(acks, reads)] = batches
    assert (sorted(acks), reads) == (sorted((r, n.pk) for r, n in pushed), [])
    assert {_web(n).status for _, n in pushed} == {DeliveryStatus.DELIVERED}


def test_a_batch_the_database_refused_is_written_later(
    owner: Any, template: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (recipient, notification), *_ = _pushed(owner, 1)
    monkeypatch.setattr(writer_module, "RETRY_SECONDS", 0.01)
    calls: list[int] = []
    write = writer_module._write

    async def refuses_once(acks: list[Any], reads: list[Any]) -> tuple[int, int]:
        calls.append(len(acks) + len(reads))
        if len(calls) == 1:
            raise OperationalError("the server closed the connection")
        return await write(acks, reads)

    monkeypatch.setattr(writer_module, "_write", refuses_once)

    async def scenario() -> None:
        writer = InboxWriter(window=0.01, pending_max=10)
        writer.add(writer_module.ACK, recipient, notification.pk)
        writer.add(writer_module.READ, recipient, notification.pk)
        await writer.drain()

    async_to_sync(scenario)()
    assert calls == [2, 2]
    assert _web(notification).status == DeliveryStatus.READ
