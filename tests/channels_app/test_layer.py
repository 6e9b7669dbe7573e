"""The live path's channel layer (channels_app/layer.py) on the real Redis: a group frame
published once reaches every subscribed process, sockets' own channels stay in memory, and a
subscription that was lost (killed, or gone half-open) comes back by itself and tells its
sockets to catch up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
from asgiref.sync import async_to_sync
from django.conf import settings

from channels_app import layer as live_layer
from channels_app.layer import RECONNECTED_TYPE, LiveChannelLayer
from core import metrics
from tests.chaos.forwarder import forwarding, port_of


def layer_on(url: str, prefix: str, **host: Any) -> LiveChannelLayer:
    return LiveChannelLayer(hosts=[{"address": url, **host}], prefix=prefix)


def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def subscribed_channels(prefix: str) -> set[str]:
    return {name.decode() for name in redis_client().pubsub_channels(f"{prefix}*")}


def reconnects() -> float:
    return metrics.WEBSOCKET_LAYER_RECONNECTS._value.get()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async_to_sync(scenario)()


async def received(layer: LiveChannelLayer, channel: str, timeout: float = 5) -> dict[str, Any]:
    # Not asyncio.wait_for around layer.receive: a cancelled receive drops its channel.
    queue = layer._get_layer().channels[channel]
    data = await asyncio.wait_for(queue.get(), timeout)
    message: dict[str, Any] = layer.deserialize(data)
    return message


def test_a_group_frame_reaches_every_subscribed_process_and_sockets_stay_in_memory() -> None:
    prefix = f"clarion-ws-test-{uuid.uuid4().hex[:8]}:"

    async def scenario() -> None:
        first, second, sender = (layer_on(settings.REDIS_URL, prefix) for _ in range(3))
        try:
            a1, a2 = await first.new_channel(), await first.new_channel()
            b1 = await second.new_channel()
            # Sockets' own channels: nothing subscribed in Redis for them.
            assert subscribed_channels(prefix) == set()
            for layer, channel in ((first, a1), (first, a2), (second, b1)):
                await layer.group_add("recipient.7", channel)
            # One subscription per process and group, whatever its sockets.
            assert subscribed_channels(prefix) == {f"{prefix}__group__recipient.7"}
            assert redis_client().pubsub_numsub(f"{prefix}__group__recipient.7") == [
                (f"{prefix}__group__recipient.7".encode(), 2)
            ]
            await sender.group_send("recipient.7", {"type": "inbox.notification", "n": 1})
            for layer, channel in ((first, a1), (first, a2), (second, b1)):
                assert await received(layer, channel) == {"type": "inbox.notification", "n": 1}
            # A send to a channel of this process is handed over in memory.
            await first.send(a2, {"type": "direct"})
            assert await received(first, a2) == {"type": "direct"}
            assert first._get_layer().channels[a1].empty()

            await first.group_discard("recipient.7", a1)
            assert len(subscribed_channels(prefix)) == 1  # a2 still listens
            await first.group_discard("recipient.7", a2)
            await second.group_discard("recipient.7", b1)
            assert subscribed_channels(prefix) == set()
        finally:
            for layer in (first, second, sender):
                await layer.flush()

    run(scenario)


def test_a_group_is_joined_once_redis_has_confirmed_the_subscription() -> None:
    """A socket reads its backlog after joining its group: a frame published as soon as the join
    returns must be heard, however slow the road to Redis (here 0.3 s for every chunk on the
    way up, while the publisher's road is direct)."""
    prefix = f"clarion-ws-test-{uuid.uuid4().hex[:8]}:"
    db = int(settings.REDIS_URL.rsplit("/", 1)[-1] or 0)

    with forwarding(port_of(settings.REDIS_URL)) as forwarder:
        forwarder.lag = 0.3

        async def scenario() -> None:
            layer = layer_on(forwarder.url(db), prefix)
            sender = layer_on(settings.REDIS_URL, prefix)
            try:
                channel = await layer.new_channel()
                await layer.group_add("g", channel)
                await sender.group_send("g", {"type": "inbox.notification", "n": 1})
                assert await received(layer, channel) == {"type": "inbox.notification", "n": 1}
                # A second socket of the process joins the subscribed group at once.
                other = await layer.new_channel()
                await layer.group_add("g", other)
                await sender.group_send("g", {"type": "inbox.notification", "n": 2})
                assert await received(layer, other) == {"type": "inbox.notification", "n": 2}
            finally:
                await layer.flush()
                await sender.flush()

        run(scenario)


async def reconnected_then_live(
    layer: LiveChannelLayer, sender: LiveChannelLayer, channel: str, timeout: float
) -> None:
    """The socket is told of the reconnect, and the group is subscribed again."""
    assert await received(layer, channel, timeout) == {"type": RECONNECTED_TYPE}
    await sender.group_send("g", {"type": "inbox.notification", "n": 2})
    assert await received(layer, channel) == {"type": "inbox.notification", "n": 2}


def test_a_killed_subscription_comes_back_and_its_sockets_are_told() -> None:
    prefix = f"clarion-ws-test-{uuid.uuid4().hex[:8]}:"
    before = reconnects()

    async def scenario() -> None:
        layer, sender = layer_on(settings.REDIS_URL, prefix), layer_on(settings.REDIS_URL, prefix)
        try:
            channel = await layer.new_channel()
            await layer.group_add("g", channel)
            await sender.group_send("g", {"type": "inbox.notification", "n": 1})
            assert await received(layer, channel) == {"type": "inbox.notification", "n": 1}
            # Redis drops the subscribing connection (as a restart or a CLIENT KILL does).
            connection = layer._get_layer()._shards[0]._pubsub.connection
            host, port = connection._writer.get_extra_info("sockname")[:2]
            assert redis_client().client_kill(f"{host}:{port}")
            await reconnected_then_live(layer, sender, channel, timeout=10)
        finally:
            await layer.flush()
            await sender.flush()

    run(scenario)
    assert reconnects() == before + 1


def test_a_half_open_subscription_is_found_by_its_health_check_and_reconnected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bytes to and from Redis swallowed, nothing closed: the PINGs of the health check get no
    answer, and the subscription is taken for dead and opened again."""
    prefix = f"clarion-ws-test-{uuid.uuid4().hex[:8]}:"
    monkeypatch.setattr(live_layer, "SILENCE_GRACE_SECONDS", 1.0)
    monkeypatch.setattr(live_layer, "RECEIVE_WAIT_SECONDS", 0.2)
    db = int(settings.REDIS_URL.rsplit("/", 1)[-1] or 0)

    with forwarding(port_of(settings.REDIS_URL)) as forwarder:

        async def scenario() -> None:
            layer = layer_on(forwarder.url(db), prefix, health_check_interval=1)
            sender = layer_on(settings.REDIS_URL, prefix)
            try:
                channel = await layer.new_channel()
                await layer.group_add("g", channel)
                await sender.group_send("g", {"type": "inbox.notification", "n": 1})
                assert await received(layer, channel) == {"type": "inbox.notification", "n": 1}
                assert forwarder.silence() >= 1
                # Found within health check (1 s) + grace (1 s) + a read (0.2 s), reconnected.
                await reconnected_then_live(layer, sender, channel, timeout=10)
            finally:
                await layer.flush()
                await sender.flush()

        run(scenario)


def test_the_depth_of_frames_its_sockets_have_not_taken_is_in_metrics() -> None:
    prefix = f"clarion-ws-test-{uuid.uuid4().hex[:8]}:"

    def depth() -> float:
        return float(metrics.WEBSOCKET_SEND_QUEUE._value.get())

    async def until_depth(value: float) -> None:
        for _ in range(100):
            if depth() == value:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"send queue {depth()}, not {value}")

    async def scenario() -> None:
        server, sender = layer_on(settings.REDIS_URL, prefix), layer_on(settings.REDIS_URL, prefix)
        try:
            slow, quick = await server.new_channel(), await server.new_channel()
            for channel in (slow, quick):
                await server.group_add("recipient.9", channel)
            for n in range(3):
                await sender.group_send("recipient.9", {"type": "inbox.notification", "n": n})
            for n in range(3):
                assert (await received(server, quick))["n"] == n
            # The slow socket has taken none of its three: sampled within a second or so.
            await until_depth(3)
            for _ in range(3):
                await received(server, slow)
            await until_depth(0)
        finally:
            for layer in (server, sender):
                await layer.flush()

    run(scenario)
