"""The channel layer of the live path: channels-redis's Redis pub/sub layer, used as one
subscription per server process.

channels-redis's default layer (RedisChannelLayer) keeps a list per process in Redis and a
sorted set per group: a frame cost 3 Redis round trips to send and 4 to receive, and a socket
2 to connect. Its pub/sub layer (RedisPubSubChannelLayer) publishes a frame once, and each
server process holds one Redis connection subscribed to the groups of the sockets it serves,
with the map from group to sockets in memory. Three things are changed here:

- A socket's own channel stays in the process. Clarion only ever sends to groups, so the
  library's SUBSCRIBE per socket (a round trip on connect, an UNSUBSCRIBE at close) bought
  nothing; a send to a channel of this process is handed over in memory.
- The subscription's reader blocks for up to RECEIVE_WAIT_SECONDS instead of polling every
  0.1 s, publishes run concurrently over the pool instead of one at a time, and a subscription
  that has heard nothing (not even the health check's PONG) for longer than its health check
  interval plus SILENCE_GRACE_SECONDS is taken for half-open and reconnected.
- A group is joined when Redis has confirmed its SUBSCRIBE, not when the command was written:
  a socket reads its backlog after joining, so a frame published between the two is in the
  backlog or heard live, never in neither.
- After the subscription was lost and has come back (redis-py re-subscribes every group on
  reconnect), every socket of the process is sent RECONNECTED_TYPE, so it fetches from the
  database what was published while it was not listening (pub/sub keeps nothing).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels_redis.pubsub import (
    RedisPubSubChannelLayer,
    RedisPubSubLoopLayer,
    RedisSingleShardConnection,
)
from channels_redis.utils import _wrap_close, decode_hosts
from redis.exceptions import TimeoutError as RedisTimeoutError

from core import metrics

log = logging.getLogger(__name__)

# The message every socket of a process gets once its subscription is back after a loss.
RECONNECTED_TYPE = "layer.reconnected"
# How long one read of the subscription waits for a message before looking at its health.
RECEIVE_WAIT_SECONDS = 1.0
# A subscription silent for its health check interval plus this is taken for half-open.
SILENCE_GRACE_SECONDS = 5.0
# How often the depth of the sockets' queues is sampled for /metrics.
SEND_QUEUE_SAMPLE_SECONDS = 1.0
# How long joining a group waits for Redis to confirm the SUBSCRIBE.
SUBSCRIBE_CONFIRM_SECONDS = 5.0
# Waits between tries at reaching Redis again, doubling up to the second.
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0


class LiveShard(RedisSingleShardConnection):
    """One Redis server's connections for one loop: a pool for PUBLISH and one subscription."""

    channel_layer: LiveLoopLayer

    def __init__(self, host: dict[str, Any], channel_layer: LiveLoopLayer):
        super().__init__(host, channel_layer)
        self.health_check_interval = float(host.get("health_check_interval") or 0)
        # Set when something is subscribed, so an idle reader sleeps until then.
        self._wanted = asyncio.Event()
        # Per group channel, done once Redis has confirmed the subscription.
        self._confirmed: dict[str, asyncio.Future[None]] = {}

    async def publish(self, channel: str, message: bytes) -> None:
        # The library holds the shard's lock around every publish, so a process published one
        # frame per round trip; the pool serves concurrent publishes by itself.
        self._ensure_redis()
        await self._redis.publish(channel, message)

    async def subscribe(self, channel: str) -> None:
        """Returns once Redis has confirmed the subscription: a PUBLISH it handles after that
        reaches this process. Raises redis's TimeoutError when no confirmation comes."""
        confirmed = self._confirmed.get(channel)
        if confirmed is None:
            confirmed = self._confirmed[channel] = asyncio.get_running_loop().create_future()
        await super().subscribe(channel)
        self._wanted.set()
        if not confirmed.done():
            try:
                await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_CONFIRM_SECONDS)
            except TimeoutError:
                raise RedisTimeoutError(f"no confirmation of SUBSCRIBE {channel}") from None

    async def unsubscribe(self, channel: str) -> None:
        await super().unsubscribe(channel)
        confirmed = self._confirmed.pop(channel, None)
        if confirmed is not None and not confirmed.done():
            confirmed.cancel()

    async def flush(self) -> None:
        await super().flush()
        for confirmed in self._confirmed.values():
            confirmed.cancel()
        self._confirmed.clear()

    def _confirm(self, message: dict[str, Any]) -> None:
        name = message["channel"]
        confirmed = self._confirmed.get(name.decode() if isinstance(name, bytes) else name)
        if confirmed is not None and not confirmed.done():
            confirmed.set_result(None)

    async def _do_receiving(self) -> None:
        lost = False
        retry = RETRY_FIRST_SECONDS
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not (self._pubsub and self._pubsub.subscribed):
                    self._wanted.clear()
                    await self._wanted.wait()
                    continue
                message = await self._pubsub.get_message(timeout=RECEIVE_WAIT_SECONDS)
                if lost:
                    # A read went through, so the connection is back and redis-py has
                    # subscribed it again to every group (PubSub.on_connect).
                    lost = False
                    retry = RETRY_FIRST_SECONDS
                    log.warning("channel layer subscription restored; sockets catch up")
                    metrics.websocket_layer_reconnected()
                    self.channel_layer.reconnected()
                if message is not None and message["type"] == "subscribe":
                    self._confirm(message)
                elif message is not None and message["type"] == "message":
                    self._receive_message(message)
                self.channel_layer.send_queue_sample(loop.time())
                connection = self._pubsub.connection
                if (
                    self.health_check_interval
                    and connection is not None
                    and connection.next_health_check > 0
                    and loop.time()
                    > connection.next_health_check
                    + self.health_check_interval
                    + SILENCE_GRACE_SECONDS
                ):
                    # PINGs went out and nothing came back: the connection is half-open.
                    raise ConnectionError("channel layer subscription silent past its health check")
            except (asyncio.CancelledError, GeneratorExit):
                raise
            # Anything at all: a reader that dies leaves every socket of the process deaf.
            except Exception as error:  # noqa: BLE001
                if not lost:
                    log.warning("channel layer subscription lost (%s); reconnecting", error)
                lost = True
                connection = self._pubsub.connection if self._pubsub else None
                if connection is not None:
                    # The next read connects anew, and redis-py re-subscribes on connect.
                    await connection.disconnect(nowait=True)
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX_SECONDS)


class LiveLoopLayer(RedisPubSubLoopLayer):
    """The pub/sub layer of one event loop, with sockets' channels kept in the process."""

    def __init__(self, hosts: list[Any] | None = None, **kwargs: Any):
        super().__init__(hosts, **kwargs)
        self._shards: list[LiveShard] = [LiveShard(host, self) for host in decode_hosts(hosts)]

    async def _subscribe_to_channel(self, channel: str) -> None:
        # Nothing in Redis: only this process sends to its sockets' own channels.
        self.channels[channel] = asyncio.Queue()

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        queue = self.channels.get(channel)
        if queue is None:
            await super().send(channel, message)
            return
        queue.put_nowait(self.channel_layer.serialize(message))

    # When the depth of the sockets' queues was last put in /metrics.
    sampled_at = 0.0

    def send_queue_sample(self, now: float) -> None:
        """At most once a second (a sum over every socket of the process)."""
        if now - self.sampled_at >= SEND_QUEUE_SAMPLE_SECONDS:
            self.sampled_at = now
            metrics.websocket_send_queue(sum(q.qsize() for q in self.channels.values()))

    def reconnected(self) -> None:
        """Tell every socket of this loop that frames may have been missed."""
        data = self.channel_layer.serialize({"type": RECONNECTED_TYPE})
        for queue in self.channels.values():
            queue.put_nowait(data)


class LiveChannelLayer(RedisPubSubChannelLayer):
    """CHANNEL_LAYERS' backend: RedisPubSubChannelLayer with LiveLoopLayer per event loop."""

    async def close_pools(self) -> None:
        """Close this loop's connections (the broadcast loop's stop() calls it)."""
        layer = self._layers.pop(asyncio.get_running_loop(), None)
        if layer is not None:
            await layer.flush()

    def _get_layer(self) -> LiveLoopLayer:
        loop = asyncio.get_running_loop()
        try:
            layer: LiveLoopLayer = self._layers[loop]
        except KeyError:
            layer = LiveLoopLayer(*self._args, **self._kwargs, channel_layer=self)
            self._layers[loop] = layer
            _wrap_close(self, loop)
        return layer
