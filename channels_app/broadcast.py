"""The one way the server pushes to browsers: a frame sent to a recipient's group on the
channel layer, which reaches every socket of that recipient on any server process or host.
Workers publish from synchronous code through one event loop per process that lives as long
as the process (see _LoopRunner)."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any, TypeVar

from channels import DEFAULT_CHANNEL_LAYER
from channels.layers import BaseChannelLayer, channel_layers
from django.conf import settings

T = TypeVar("T")

# The message type consumers handle (NotificationConsumer.inbox_notification).
LIVE_MESSAGE_TYPE = "inbox.notification"


def recipient_group(recipient_id: int) -> str:
    """The group of every socket of one recipient. Built from the recipient's primary key
    (taken from a verified token), never from client input."""
    return f"recipient.{int(recipient_id)}"


def iso_datetime(value: datetime) -> str:
    """The same text as the REST API gives a datetime, so a client can compare the two."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def notification_frame(
    *,
    notification_id: uuid.UUID | str,
    position: int,
    content: dict[str, Any],
    data: dict[str, Any],
    created_at: datetime,
) -> dict[str, Any]:
    """The server → client frame of DESIGN.md, from a web delivery's rendered content."""
    return {
        "type": "notification",
        "id": str(notification_id),
        # The recipient's inbox position (InboxCounter): what a client resumes from (`since`).
        "position": position,
        "title": content.get("title", ""),
        "body": content.get("body", ""),
        "data": data,
        "created_at": iso_datetime(created_at),
    }


# Publishes of one batch that run at once: bounded so a large batch cannot take more than its
# share of the layer's Redis pool (CHANNEL_LAYERS max_connections), which refuses rather than
# waits when it is empty. A batch is DISPATCH_BATCH_SIZE (50) frames by default.
BROADCAST_CONCURRENCY = settings.BROADCAST_CONCURRENCY
# What run_coroutine_threadsafe waits beyond the per-frame timeout before giving up on the loop
# itself (a frame's own timeout ends it on the loop first; this only guards a wedged loop).
LOOP_GRACE_SECONDS = 1.0


def channel_layer_new() -> BaseChannelLayer:
    """A channel layer object of our own, not the process-wide one of get_channel_layer(): it is
    created on the broadcast loop and dies with it, so nothing of another loop (or of the
    parent process, after a fork) is ever reused."""
    if DEFAULT_CHANNEL_LAYER not in channel_layers.configs:
        raise RuntimeError("CHANNEL_LAYERS is not configured")
    return channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)


class _LoopRunner:
    """An asyncio loop running forever in a daemon thread of one process, and the channel layer
    made on it. async_to_sync per publish built a loop and a new Redis connection each time;
    a profile showed this cuts the publish CPU by three quarters, and the layer's connection
    pool is reused across publishes."""

    def __init__(self, *, layer_factory: Callable[[], BaseChannelLayer] = channel_layer_new):
        # A loop belongs to the process that started it: threads are not copied by fork, so a
        # forked child (Celery prefork) sees this pid differ from its own and starts anew.
        self.pid = os.getpid()
        self.layer_factory = layer_factory
        # Only touched on the loop, so no lock: made by the first publish that needs it.
        self.layer: BaseChannelLayer | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="clarion-broadcast", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def channel_layer(self) -> BaseChannelLayer:
        """The layer of this loop; call it on the loop only."""
        if self.layer is None:
            self.layer = self.layer_factory()
        return self.layer

    def call(self, coroutine: Coroutine[Any, Any, T], *, timeout: float) -> T:
        """Run a coroutine on the loop and wait for its result from the calling thread. Raises
        TimeoutError after `timeout` seconds (and cancels the coroutine)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def stop(self) -> None:
        """Close the layer's connections and end the loop and its thread (tests; a process
        that exits needs none of it, the thread is a daemon)."""

        async def close() -> None:
            close_pools: Callable[[], Awaitable[None]] | None = getattr(
                self.layer, "close_pools", None
            )
            if close_pools is not None:
                await close_pools()

        try:
            self.call(close(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            if not self.thread.is_alive():
                self.loop.close()


_runner: _LoopRunner | None = None
_runner_lock = threading.Lock()


def _loop_runner() -> _LoopRunner:
    """This process's loop, started on first use, and again in a forked child."""
    global _runner
    runner = _runner
    if runner is not None and runner.pid == os.getpid():
        return runner
    with _runner_lock:
        if _runner is None or _runner.pid != os.getpid():
            # After a fork the parent's runner is left as it is: its thread does not exist
            # here, and its loop and sockets are the parent's to close, not ours.
            _runner = _LoopRunner()
        return _runner


def _renew_lock_after_fork() -> None:
    # Another thread of the parent may have held the lock at the moment of the fork; in the
    # child nobody would ever release it.
    global _runner_lock
    _runner_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_lock_after_fork)


async def _publish_all(
    runner: _LoopRunner, frames: list[tuple[int, dict[str, Any]]], timeout: float
) -> list[BaseException | None]:
    layer = runner.channel_layer()
    limit = asyncio.Semaphore(BROADCAST_CONCURRENCY)

    async def publish(recipient_id: int, frame: dict[str, Any]) -> None:
        # Each frame has its own deadline (waiting for the limit included), so one slow
        # publish fails alone and the whole call ends within `timeout`.
        async with asyncio.timeout(timeout), limit:
            message = {"type": LIVE_MESSAGE_TYPE, "frame": frame}
            await layer.group_send(recipient_group(recipient_id), message)

    results = await asyncio.gather(*(publish(r, f) for r, f in frames), return_exceptions=True)
    return [result if isinstance(result, BaseException) else None for result in results]


def recipients_broadcast(
    *, frames: list[tuple[int, dict[str, Any]]], timeout: float
) -> list[BaseException | None]:
    """Publish many (recipient_id, frame) pairs at once on this process's broadcast loop; one
    entry per pair, in order: None when published, else the error for the caller to classify
    (the layer's RedisError, OSError, or TimeoutError after `timeout` seconds). An error that
    is not about one frame (no channel layer configured) is raised."""
    if not frames:
        return []
    _refuse_inside_a_running_loop()
    runner = _loop_runner()
    try:
        return runner.call(
            _publish_all(runner, frames, timeout), timeout=timeout + LOOP_GRACE_SECONDS
        )
    except TimeoutError:
        # The loop did not even answer: nothing is known of any frame, so each one failed.
        waited = timeout + LOOP_GRACE_SECONDS
        return [TimeoutError(f"broadcast loop did not answer in {waited}s") for _ in frames]


def recipient_broadcast(*, recipient_id: int, frame: dict[str, Any], timeout: float) -> None:
    """Publish a frame to every socket of the recipient (none connected is fine: the database
    holds the notification). Raises the channel layer's error, or TimeoutError after
    `timeout` seconds, for the caller to classify."""
    [error] = recipients_broadcast(frames=[(recipient_id, frame)], timeout=timeout)
    if error is not None:
        raise error


def _refuse_inside_a_running_loop() -> None:
    # Waiting here would block that loop for up to the timeout (async_to_sync refused the same):
    # async code calls the sync helpers through sync_to_async.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError("broadcast from async code: call it through sync_to_async")
