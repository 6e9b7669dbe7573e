"""The WebSocket consumer through the real ASGI application and the real channels-redis layer:
who gets in, who gets what, acks and reads, the backlog on (re)connect, and the limits."""

from __future__ import annotations

import time
import uuid
from typing import Any
from unittest import mock

import pytest
import redis
from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.core import signing
from redis.exceptions import ConnectionError as RedisConnectionError

from channels_app import consumers
from channels_app.broadcast import recipient_broadcast
from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Notification
from notifications.tokens import SIGNING_SALT, recipient_token_issue
from tests.channels_app.support import (
    communicator,
    create_web_notification,
    expected_frame,
    inbox_writes_drained,
    push,
    recipient_with_token,
)
from workers import transitions

pytestmark = pytest.mark.django_db(transaction=True)


def web_delivery(notification: Notification) -> Delivery:
    return Delivery.objects.get(notification=notification, channel="web")


def statuses(notification: Notification) -> list[str]:
    return list(
        DeliveryEvent.objects.filter(delivery__notification=notification)
        .order_by("at", "id")
        .values_list("status", flat=True)
    )


# --- Who gets in ----------------------------------------------------------------------------


def test_query_token_connects_and_first_frame_is_ready(owner: Any, template: Any) -> None:
    _, token = recipient_with_token(owner, "user-a")

    async def scenario() -> None:
        ws = communicator(token=token)
        assert await ws.connect() == (True, None)
        assert (await ws.receive_json_from())["type"] == "ready"
        assert await ws.receive_nothing(0.3)
        await ws.disconnect()

    async_to_sync(scenario)()


def test_first_frame_auth_joins_and_replays(owner: Any, template: Any) -> None:
    _, token = recipient_with_token(owner, "user-a")
    waiting = create_web_notification(owner, "user-a", "A-1")

    async def scenario() -> None:
        ws = communicator()
        assert await ws.connect() == (True, None)
        await ws.send_json_to({"type": "auth", "token": token})
        assert (await ws.receive_json_from())["type"] == "ready"
        assert await ws.receive_json_from() == expected_frame(waiting)
        assert await ws.receive_nothing(0.3)
        await ws.disconnect()

    async_to_sync(scenario)()


def _expired_token(recipient_id: int, owner_id: int) -> str:
    an_hour_and_a_bit_ago = time.time() - 3700
    with mock.patch("django.core.signing.time.time", return_value=an_hour_and_a_bit_ago):
        return recipient_token_issue(owner_id=owner_id, recipient_id=recipient_id).token


def test_refused_before_accept(owner: Any, other_owner: Any, template: Any) -> None:
    recipient_a, token_a = recipient_with_token(owner, "user-a")
    recipient_b, _ = recipient_with_token(owner, "user-b")
    deleted, deleted_token = recipient_with_token(other_owner, "user-gone")
    deleted.delete()
    payload, timestamp, signature = token_a.split(":")
    tampered_payload = signing.b64_encode(
        signing.JSONSerializer().dumps({"o": owner.pk, "r": recipient_b.pk})
    ).decode()
    refused = {
        "expired": _expired_token(recipient_a.pk, owner.pk),
        "forged (another key)": signing.dumps(
            {"o": owner.pk, "r": recipient_a.pk}, key="not-our-secret", salt=SIGNING_SALT
        ),
        "forged (another salt)": signing.dumps({"o": owner.pk, "r": recipient_a.pk}),
        "another recipient in a signed token": f"{tampered_payload}:{timestamp}:{signature}",
        "owner swapped": signing.dumps(
            {"o": other_owner.pk, "r": recipient_a.pk}, salt=SIGNING_SALT
        ),
        "deleted recipient": deleted_token,
        "api key": "clr_not-a-recipient-token",
        "empty": "",
    }
    assert payload != tampered_payload

    async def scenario() -> None:
        for name, token in refused.items():
            ws = communicator(token=token)
            connected, _ = await ws.connect()
            assert connected is False, name
            await ws.disconnect()
        for origin in ("http://evil.example", "http://127.0.0.1.evil.example", ""):
            ws = communicator(token=token_a, origin=origin)
            connected, _ = await ws.connect()
            assert connected is False, f"origin {origin!r}"
            await ws.disconnect()
        # The same valid token from an allowed origin does get in.
        ws = communicator(token=token_a)
        assert await ws.connect() == (True, None)
        await ws.disconnect()

    async_to_sync(scenario)()


@pytest.mark.parametrize(
    "first_frame",
    [
        {"type": "auth", "token": "forged"},
        {"type": "ack", "id": str(uuid.uuid4())},
        {"type": "auth"},
        "not json",
    ],
)
def test_bad_first_frame_is_closed_with_4401(owner: Any, first_frame: Any) -> None:
    async def scenario() -> None:
        ws = communicator()
        assert await ws.connect() == (True, None)
        if isinstance(first_frame, str):
            await ws.send_to(text_data=first_frame)
        else:
            await ws.send_json_to(first_frame)
        assert await ws.receive_output(2) == {"type": "websocket.close", "code": 4401}
        await ws.disconnect()

    async_to_sync(scenario)()


def test_no_auth_frame_in_time_is_closed_with_4401(owner: Any, settings: Any) -> None:
    settings.WS_AUTH_TIMEOUT_SECONDS = 0.3

    async def scenario() -> None:
        ws = communicator()
        assert await ws.connect() == (True, None)
        started = time.monotonic()
        assert await ws.receive_output(3) == {"type": "websocket.close", "code": 4401}
        assert 0.25 <= time.monotonic() - started < 2
        await ws.disconnect()

    async_to_sync(scenario)()


# --- Who gets what --------------------------------------------------------------------------


def test_a_never_receives_what_is_sent_to_b(owner: Any) -> None:
    _, token_a = recipient_with_token(owner, "user-a")
    recipient_b, token_b = recipient_with_token(owner, "user-b")
    frames = [
        {
            "type": "notification",
            "id": str(uuid.uuid4()),
            "position": n + 1,
            "title": f"for b {n}",
            "body": "",
            "data": {"n": n},
            "created_at": "2026-01-01T00:00:00Z",
        }
        for n in range(1000)
    ]
    publish = sync_to_async(recipient_broadcast)

    async def scenario() -> None:
        ws_a, ws_b = communicator(token=token_a), communicator(token=token_b)
        for ws in (ws_a, ws_b):
            assert await ws.connect() == (True, None)
            assert (await ws.receive_json_from())["type"] == "ready"
        received = []
        # In batches, so B's channel never holds more than the layer's capacity.
        for start in range(0, 1000, 50):
            for frame in frames[start : start + 50]:
                await publish(recipient_id=recipient_b.pk, frame=frame, timeout=5)
            for _ in range(50):
                received.append(await ws_b.receive_json_from(timeout=5))
        assert received == frames
        assert await ws_b.receive_nothing(0.3)
        assert await ws_a.receive_nothing(0.5)
        await ws_a.disconnect()
        await ws_b.disconnect()

    async_to_sync(scenario)()


def test_ack_and_read_change_only_the_senders_own_delivery(owner: Any, template: Any) -> None:
    _, token_a = recipient_with_token(owner, "user-a")
    recipient_with_token(owner, "user-b")
    mine = create_web_notification(owner, "user-a", "A-1")
    push(mine)
    theirs = create_web_notification(owner, "user-b", "B-1")
    push(theirs)

    async def scenario() -> None:
        ws = communicator(token=token_a)
        assert await ws.connect() == (True, None)
        assert await ws.receive_json_from() == expected_frame(mine, position=1)
        assert await ws.receive_json_from() == {"type": "ready", "position": 1}
        for kind in ("ack", "read"):
            await ws.send_json_to({"type": kind, "id": str(theirs.pk)})
        await ws.send_json_to({"type": "ack", "id": str(mine.pk)})
        await ws.send_json_to({"type": "ack", "id": str(mine.pk)})
        await ws.send_json_to({"type": "ack", "id": "not-a-uuid"})
        assert await ws.receive_json_from() == {"type": "error", "error": "bad_id"}
        await ws.send_json_to({"type": "read", "id": str(mine.pk)})
        await ws.send_json_to({"type": "read", "id": str(mine.pk)})
        await ws.send_json_to({"type": "ack", "id": str(mine.pk)})
        await ws.send_json_to({"type": "subscribe", "recipient": "user-b"})
        # Frames are handled in order: the error answers the last one, so all were handled.
        assert await ws.receive_json_from() == {"type": "error", "error": "unknown_type"}
        await ws.disconnect()
        await inbox_writes_drained()

    async_to_sync(scenario)()
    mine_delivery, theirs_delivery = web_delivery(mine), web_delivery(theirs)
    assert mine_delivery.status == DeliveryStatus.READ
    assert mine_delivery.delivered_at is not None
    assert mine_delivery.read_at is not None
    assert mine_delivery.delivered_at <= mine_delivery.read_at
    assert statuses(mine) == ["queued", "sent", "delivered", "read"]
    assert (theirs_delivery.status, theirs_delivery.delivered_at) == (DeliveryStatus.SENT, None)
    assert statuses(theirs) == ["queued", "sent"]


# --- No loss when offline -------------------------------------------------------------------


def test_twenty_sent_while_offline_arrive_in_order_once_on_reconnect(
    owner: Any, template: Any
) -> None:
    _, token = recipient_with_token(owner, "user-a")

    async def scenario() -> None:
        ws = communicator(token=token)
        assert await ws.connect() == (True, None)
        assert (await ws.receive_json_from())["type"] == "ready"
        first = await sync_to_async(create_web_notification)(owner, "user-a", "A-0")
        await sync_to_async(push)(first)
        assert await ws.receive_json_from(timeout=5) == expected_frame(first, position=1)
        await ws.send_json_to({"type": "ack", "id": str(first.pk)})
        await ws.send_json_to({"type": "pong"})
        assert await ws.receive_nothing(0.3)
        await ws.disconnect()

        missed = []
        for n in range(1, 21):
            notification = await sync_to_async(create_web_notification)(owner, "user-a", f"A-{n}")
            await sync_to_async(push)(notification)
            missed.append(notification)

        ws = communicator(token=token, since="1")
        assert await ws.connect() == (True, None)
        received = [await ws.receive_json_from(timeout=5) for _ in range(20)]
        assert received == [expected_frame(n, position=p) for p, n in enumerate(missed, 2)]
        assert await ws.receive_json_from() == {"type": "ready", "position": 21}
        assert await ws.receive_nothing(1.0)
        await ws.disconnect()

    async_to_sync(scenario)()
    assert web_delivery(Notification.objects.get(data={"order_id": "A-0"})).status == "delivered"


def test_without_since_every_unread_not_archived_entry_oldest_first(
    owner: Any, template: Any
) -> None:

    recipient, token = recipient_with_token(owner, "user-a")
    recipient_with_token(owner, "user-b")
    pending = create_web_notification(owner, "user-a", "A-1")  # queued: not pushed yet
    acked = create_web_notification(owner, "user-a", "A-2")
    push(acked)
    transitions.inbox_acknowledge(recipient_id=recipient.pk, notification_id=acked.pk, source="t")
    read = create_web_notification(owner, "user-a", "A-3")
    push(read)
    transitions.inbox_mark_read(recipient_id=recipient.pk, notification_id=read.pk, source="t")
    archived = create_web_notification(owner, "user-a", "A-4")
    push(archived)
    transitions.inbox_archive(recipient_id=recipient.pk, notification_id=archived.pk)
    create_web_notification(owner, "user-b", "B-1")
    sent = create_web_notification(owner, "user-a", "A-5")
    push(sent)

    async def scenario() -> None:
        ws = communicator(token=token)
        assert await ws.connect() == (True, None)
        received = [await ws.receive_json_from() for _ in range(2)]
        assert received == [expected_frame(acked, position=1), expected_frame(sent, position=4)]
        assert await ws.receive_json_from() == {"type": "ready", "position": 4}
        # Never pushed (no `web` pool here): the socket's own process pushes it.
        assert await ws.receive_json_from(timeout=5) == expected_frame(pending, position=5)
        assert await ws.receive_nothing(0.5)
        await ws.disconnect()

    async_to_sync(scenario)()


def test_live_frames_racing_the_backlog_arrive_once(
    owner: Any, template: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live frames published after the socket joined its group but before the backlog query
    wait behind the backlog, and the ones it already carried are dropped."""
    _, token = recipient_with_token(owner, "user-a")
    waiting = [create_web_notification(owner, "user-a", f"A-{n}") for n in range(5)]
    opened = consumers._open

    async def open_while_the_worker_pushes(claims: Any, since: Any) -> Any:
        for notification in waiting:
            await sync_to_async(push)(notification)
        return await opened(claims, since)

    monkeypatch.setattr(consumers, "_open", open_while_the_worker_pushes)

    async def scenario() -> None:
        ws = communicator(token=token)
        assert await ws.connect() == (True, None)
        received = [await ws.receive_json_from(timeout=5) for _ in range(5)]
        assert received == [expected_frame(n, position=p) for p, n in enumerate(waiting, 1)]
        assert await ws.receive_json_from() == {"type": "ready", "position": 5}
        later = await sync_to_async(create_web_notification)(owner, "user-a", "A-later")
        await sync_to_async(push)(later)
        assert await ws.receive_json_from(timeout=5) == expected_frame(later)
        assert await ws.receive_nothing(1.0)
        await ws.disconnect()

    async_to_sync(scenario)()


def test_several_tabs_of_one_recipient_all_receive(owner: Any, template: Any) -> None:
    _, token = recipient_with_token(owner, "user-a")

    async def scenario() -> None:
        tabs = [communicator(token=token) for _ in range(3)]
        for ws in tabs:
            assert await ws.connect() == (True, None)
            assert (await ws.receive_json_from())["type"] == "ready"
        notification = await sync_to_async(create_web_notification)(owner, "user-a", "A-1")
        await sync_to_async(push)(notification)
        for ws in tabs:
            assert await ws.receive_json_from(timeout=5) == expected_frame(notification)
            assert await ws.receive_nothing(0.2)
            await ws.disconnect()

    async_to_sync(scenario)()


# --- Limits and heartbeat -------------------------------------------------------------------


def test_oversized_frame_closes_with_1009(owner: Any, settings: Any) -> None:
    _, token = recipient_with_token(owner, "user-a")
    settings.WS_MAX_FRAME_BYTES = 4096

    async def scenario() -> None:
        ws = communicator(token=token)
        assert await ws.connect() == (True, None)
        assert (await ws.receive_json_from())["type"] == "ready"
        await ws.send_to(text_data='{"type": "pong", "pad": "' + "x" * 4096 + '"}')
        assert await ws.receive_output(2) == {"type": "websocket.close", "code": 1009}
        await ws.disconnect()

    async_to_sync(scenario)()


def test_frames_over_the_rate_are_slowed_down_not_dropped(owner: Any, settings: Any) -> None:
    _, token = recipient_with_token(owner, "user-a")
    settings.WS_CLIENT_FRAMES_PER_SECOND = 10
    settings.WS_CLIENT_FRAMES_BURST = 5

    async def scenario() -> None:
        ws = communicator(token=token)
        assert await ws.connect() == (True, None)
        assert (await ws.receive_json_from())["type"] == "ready"
        started = time.monotonic()
        for _ in range(25):
            await ws.send_json_to({"type": "pong"})
        await ws.send_json_to({"type": "nonsense"})
        # The connect frame was not a client frame; 26 frames, 5 free, then 10 a second.
        assert await ws.receive_json_from(timeout=10) == {"type": "error", "error": "unknown_type"}
        elapsed = time.monotonic() - started
        assert 1.9 <= elapsed < 5, elapsed
        await ws.disconnect()

    async_to_sync(scenario)()


def test_server_pings_and_awaits_no_answer(owner: Any, settings: Any) -> None:
    """Application pings are signs of life for the browser; liveness is the protocol's own
    ping, which the ASGI server checks (test_live.py)."""
    _, token = recipient_with_token(owner, "user-a")
    settings.WS_PING_INTERVAL_SECONDS = 0.2

    async def scenario() -> None:
        ws = communicator(token=token)
        assert await ws.connect() == (True, None)
        assert (await ws.receive_json_from())["type"] == "ready"
        for _ in range(5):
            assert await ws.receive_json_from(timeout=2) == {"type": "ping"}
        # An answer from an older client is taken and changes nothing.
        await ws.send_json_to({"type": "pong"})
        assert await ws.receive_json_from(timeout=2) == {"type": "ping"}
        await ws.disconnect()

    async_to_sync(scenario)()


def test_an_idle_socket_still_receives(owner: Any, template: Any) -> None:
    """channels-redis blocks up to 5 s per receive; a Redis read timeout no longer than that
    would end an idle socket's consumer."""
    _, token = recipient_with_token(owner, "user-a")

    async def scenario() -> None:
        ws = communicator(token=token)
        assert await ws.connect() == (True, None)
        assert (await ws.receive_json_from())["type"] == "ready"
        assert await ws.receive_nothing(12, interval=0.5)
        notification = await sync_to_async(create_web_notification)(owner, "user-a", "A-1")
        await sync_to_async(push)(notification)
        assert await ws.receive_json_from(timeout=5) == expected_frame(notification)
        await ws.disconnect()

    async_to_sync(scenario)()


def test_a_socket_catches_up_on_what_was_published_while_its_process_was_not_subscribed(
    owner: Any, template: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis drops the server process's subscription (a restart, a killed connection): a frame
    published before it is back reaches nobody (pub/sub keeps nothing), and the socket gets it
    from the database once the subscription is back, exactly once; later frames come live."""
    from channels.layers import get_channel_layer

    from channels_app import layer as live_layer
    from core import metrics

    _, token = recipient_with_token(owner, "user-a")
    # Slow the reconnect, so the publish below surely falls in the gap.
    monkeypatch.setattr(live_layer, "RETRY_FIRST_SECONDS", 1.5)
    reconnects = metrics.WEBSOCKET_LAYER_RECONNECTS._value.get

    async def scenario() -> None:
        ws = communicator(token=token)
        assert await ws.connect() == (True, None)
        assert (await ws.receive_json_from())["type"] == "ready"
        seen = await sync_to_async(create_web_notification)(owner, "user-a", "A-0")
        await sync_to_async(push)(seen)
        assert await ws.receive_json_from(timeout=5) == expected_frame(seen)

        before = reconnects()
        subscription = get_channel_layer()._get_layer()._shards[0]._pubsub.connection
        host, port = subscription._writer.get_extra_info("sockname")[:2]
        killer = redis.Redis.from_url(settings.REDIS_URL)
        assert await sync_to_async(killer.client_kill)(f"{host}:{port}")
        missed = await sync_to_async(create_web_notification)(owner, "user-a", "A-1")
        await sync_to_async(push)(missed)

        assert await ws.receive_json_from(timeout=10) == expected_frame(missed)
        assert reconnects() == before + 1
        live = await sync_to_async(create_web_notification)(owner, "user-a", "A-2")
        await sync_to_async(push)(live)
        assert await ws.receive_json_from(timeout=5) == expected_frame(live)
        # Neither the frame sent before the loss nor the caught-up one comes again.
        assert await ws.receive_nothing(0.5)
        await ws.disconnect()

    async_to_sync(scenario)()


def test_a_layer_that_refuses_the_subscription_refuses_the_socket(owner: Any) -> None:
    """Redis unreachable when a socket joins: a query-token handshake is refused, a first-frame
    auth is closed with 1013 (try again later), never a 500."""
    from channels_app.layer import LiveLoopLayer

    _, token = recipient_with_token(owner, "user-a")

    async def refused(self: Any, group: str, channel: str) -> None:
        raise RedisConnectionError("Connection refused")

    async def scenario() -> None:
        with mock.patch.object(LiveLoopLayer, "group_add", refused):
            ws = communicator(token=token)
            connected, _ = await ws.connect()
            assert connected is False
            await ws.disconnect()

            ws = communicator()
            assert await ws.connect() == (True, None)
            await ws.send_json_to({"type": "auth", "token": token})
            assert await ws.receive_output(3) == {"type": "websocket.close", "code": 1013}
            await ws.disconnect()

    async_to_sync(scenario)()


def test_a_closed_socket_is_freed_without_a_garbage_collection(
    owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server freezes its heap (channels_app/gc_freeze.py), so a closed socket's objects
    must go by reference counting alone: no cycle between the consumer and its tasks."""
    import asyncio
    import gc
    import weakref

    _, token = recipient_with_token(owner, "user-a")
    made: list[weakref.ref[consumers.NotificationConsumer]] = []
    init = consumers.NotificationConsumer.__init__

    def tracked_init(self: consumers.NotificationConsumer, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(consumers.NotificationConsumer, "__init__", tracked_init)

    async def scenario() -> None:
        for kind in ("query token", "first-frame auth"):
            ws = communicator(token=token) if kind == "query token" else communicator()
            assert await ws.connect() == (True, None)
            if kind == "first-frame auth":
                await ws.send_json_to({"type": "auth", "token": token})
            assert (await ws.receive_json_from())["type"] == "ready"
            await ws.disconnect()
        await asyncio.sleep(0.2)  # the cancelled heartbeat tasks end

    gc.collect()
    gc.disable()
    try:
        async_to_sync(scenario)()
        alive = [ref() for ref in made if ref() is not None]
    finally:
        gc.enable()
    assert len(made) == 2
    assert alive == []
