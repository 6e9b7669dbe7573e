"""An in-app delivery due at accept is pushed by the process that committed it: its frame
reaches the socket with no relay and no `web` worker running, recorded as a worker's push
would be; the relay leaves the row alone; and a push that never happens is handed to the
relay by the sweeper."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.utils import timezone
from rest_framework.test import APIClient

from notifications.models import Delivery, DeliveryEvent, DeliveryStatus
from tests.channels_app.support import communicator, recipient_with_token
from tests.conftest import wait_until
from workers import services, web_push
from workers.relay import outbox_publish_due

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/api/v1/notifications"


def _post(api: APIClient, recipient: str, order_id: str, **extra: Any) -> str:
    answer = api.post(
        URL,
        {
            "recipient": recipient,
            "template": "order_shipped",
            "data": {"order_id": order_id},
            "channels": ["web"],
            **extra,
        },
        format="json",
    )
    assert answer.status_code == 202, answer.content
    return str(answer.json()["id"])


def _web(notification_id: str) -> Delivery:
    return Delivery.objects.get(notification_id=notification_id, channel="web")


def test_a_frame_goes_out_from_the_accepting_process(
    api: APIClient, owner: Any, template: Any
) -> None:
    _, token = recipient_with_token(owner, "user-a")

    async def scenario() -> dict[str, Any]:
        ws = communicator(token=token)
        assert await ws.connect() == (True, None)
        assert (await ws.receive_json_from())["type"] == "ready"
        started = time.monotonic()
        notification_id = await sync_to_async(_post)(api, "user-a", "A-1")
        frame = await ws.receive_json_from(timeout=5)
        frame["waited"] = time.monotonic() - started
        assert frame["id"] == notification_id
        await ws.disconnect()
        return frame

    frame = async_to_sync(scenario)()
    assert frame["title"] == "Shipped" and frame["body"] == "Order A-1 is on its way"
    delivery = _web(frame["id"])
    wait_until(lambda: _web(frame["id"]).status == DeliveryStatus.SENT, timeout=5, message="sent")
    delivery.refresh_from_db()
    assert delivery.provider == "websocket"
    assert delivery.attempts == 1 and delivery.lease_token is None
    assert list(
        DeliveryEvent.objects.filter(delivery=delivery)
        .order_by("pk")
        .values_list("status", flat=True)
    ) == ["queued", "sent"]
    # Nothing for the relay to publish: no `web` task will push it again.
    assert not Delivery.objects.outbox().filter(pk=delivery.pk).exists()
    assert outbox_publish_due() == 0


def test_a_scheduled_one_waits_for_the_relay(
    api: APIClient, owner: Any, template: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipient_with_token(owner, "user-a")
    handed: list[int] = []
    monkeypatch.setattr(web_push._Pusher, "submit", lambda self, ids: handed.extend(ids))
    later = (timezone.now() + timedelta(hours=1)).isoformat()
    notification_id = _post(api, "user-a", "A-2", send_at=later)
    # The hand-over happens at commit, before the answer: nothing was handed to the pusher.
    assert handed == []
    delivery = _web(notification_id)
    assert delivery.status == DeliveryStatus.SCHEDULED
    assert Delivery.objects.outbox().filter(pk=delivery.pk).exists()


def test_a_push_that_never_happened_is_handed_to_the_relay(
    api: APIClient, owner: Any, template: Any, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipient_with_token(owner, "user-a")
    calls: list[list[int]] = []

    def dies(*, delivery_ids: list[int]) -> None:
        calls.append(delivery_ids)
        raise RuntimeError("the process died before it pushed")

    monkeypatch.setattr(services, "deliveries_process", dies)
    notification_id = _post(api, "user-a", "A-3")
    wait_until(lambda: calls, timeout=5, message="the push attempted")
    delivery = _web(notification_id)
    assert (delivery.status, delivery.lease_token) == (DeliveryStatus.QUEUED, None)
    assert delivery.enqueued_at is not None
    assert outbox_publish_due() == 0
    monkeypatch.undo()
    # Published, with no message in any queue: the sweeper gives it back to the relay.
    settings.SWEEPER_LOST_SECONDS = 0
    Delivery.objects.filter(pk=delivery.pk).update(
        enqueued_at=timezone.now() - timedelta(seconds=1)
    )
    assert services.deliveries_sweep() == 1
    assert outbox_publish_due() == 1
    assert services.delivery_process(delivery_id=delivery.pk).value == "sent"


def test_the_pusher_batches_what_arrives_together(
    owner: Any, template: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[list[int]] = []
    monkeypatch.setattr(
        services, "deliveries_process", lambda *, delivery_ids: batches.append(delivery_ids)
    )
    pusher = web_push._Pusher()
    pusher.submit([5, 3, 4])
    wait_until(lambda: sum(map(len, batches)) == 3, timeout=5, message="pushed")
    assert sorted(pk for batch in batches for pk in batch) == [3, 4, 5]
    assert all(batch == sorted(batch) for batch in batches)


def test_drain_waits_for_what_was_handed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the tests' teardown waits on before emptying the database."""
    import threading

    release = threading.Event()
    done: list[int] = []

    def slow(*, delivery_ids: list[int]) -> None:
        release.wait(5)
        done.extend(delivery_ids)

    monkeypatch.setattr(services, "deliveries_process", slow)
    pusher = web_push._Pusher()
    assert pusher.drain(timeout=0.1)  # nothing handed over yet
    pusher.submit([1, 2])
    assert not pusher.drain(timeout=0.2)  # still in deliveries_process
    release.set()
    assert pusher.drain(timeout=5)
    assert sorted(done) == [1, 2]
