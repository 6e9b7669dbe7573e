"""The in-app WebSocket at /ws/notifications/: authenticates one recipient, replays what it
missed from the database, then streams live notifications and takes its acks and reads."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from redis.exceptions import RedisError

from channels_app.broadcast import notification_frame, recipient_group
from channels_app.database import in_thread_pool
from channels_app.inbox_writer import inbox_writer
from channels_app.positions import SeenPositions
from core import metrics
from notifications import selectors
from notifications.selectors import InboxCatchUp, InboxRecipient
from notifications.tokens import RecipientClaims, recipient_token_claims
from workers.web_push import web_push_soon

log = logging.getLogger(__name__)

# Close codes. 4000-4999 are the application's own (RFC 6455 §7.4.2); 1009 is the standard
# "message too big".
CLOSE_UNAUTHENTICATED = 4401
CLOSE_HEARTBEAT_TIMEOUT = 4408
CLOSE_FRAME_TOO_BIG = 1009
# The channel layer (Redis) did not take the subscription: the client should come back later.
CLOSE_TRY_AGAIN_LATER = 1013
# The heartbeat's frame, serialised once: at 10,000 sockets the server sends 400 a second.
PING_TEXT = json.dumps({"type": "ping"})


def _uuid(value: Any) -> uuid.UUID | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _position(value: Any) -> int | None:
    """A `since`: an inbox position (a non-negative integer, given as a number or a string
    of digits); anything else (an older client's notification id) is no position at all."""
    if isinstance(value, str) and value.isdigit() and len(value) < 19:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return None


def _frames(catch_up: InboxCatchUp) -> tuple[int, list[dict[str, Any]]]:
    if catch_up.unpushed:
        # Due and not pushed yet (the `web` pool is down or behind): this process pushes
        # them, and the socket, already in its recipient's group, receives them live. The
        # push takes a lease, so one that a worker or another process does is not doubled.
        web_push_soon(catch_up.unpushed)
    return catch_up.position, [
        notification_frame(
            notification_id=d.notification_id,
            position=d.inbox_position or 0,
            content=d.content,
            data=d.notification.data,
            created_at=d.notification.created_at,
        )
        for d in catch_up.entries
    ]


@in_thread_pool
def _catch_up(recipient_id: int, since: int) -> tuple[int, list[dict[str, Any]]]:
    return _frames(
        selectors.inbox_catch_up(
            recipient_id=recipient_id, since=since, limit=settings.WS_BACKLOG_MAX
        )
    )


@in_thread_pool
def _open(
    claims: RecipientClaims, since: int | None
) -> tuple[InboxRecipient, int, list[dict[str, Any]]] | None:
    """A connect's one trip to the database: the token's recipient, still there, its last
    inbox position and what it has not read after `since`; None when the recipient (or its
    owner) is gone."""
    opened = selectors.inbox_open(claims=claims, since=since, limit=settings.WS_BACKLOG_MAX)
    if opened is None:
        return None
    recipient, catch_up = opened
    return recipient, *_frames(catch_up)


class _FrameBudget:
    """A token bucket over one connection's client frames; `take()` says how long to wait."""

    def __init__(self, *, rate: float, burst: int):
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()

    def take(self) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class NotificationConsumer(AsyncWebsocketConsumer):
    """One socket of one recipient. Messages are handled one at a time (Channels dispatches
    sequentially), so live frames that arrive while the backlog is being sent wait their turn
    and are then dropped if the backlog already carried them."""

    recipient: InboxRecipient | None = None
    closing = False
    # Counted in clarion_websocket_connections once authenticated, until it closes.
    counted = False

    async def connect(self) -> None:
        # The positions sent on this socket (none until it is authenticated).
        self.seen = SeenPositions(limit=settings.WS_SENT_IDS_MAX)
        self.tasks: list[asyncio.Task[None]] = []
        self.budget = _FrameBudget(
            rate=settings.WS_CLIENT_FRAMES_PER_SECOND, burst=settings.WS_CLIENT_FRAMES_BURST
        )
        # keep_blank_values: an empty ?token= is a bad token, not first-frame auth.
        params = parse_qs(
            self.scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True
        )
        self.since: int | None = _position((params.get("since") or [None])[0])
        token = (params.get("token") or [None])[0]
        if token is None:
            # First-frame auth: the token stays out of URLs and access logs, at the cost of
            # accepting before knowing who this is (bounded by WS_AUTH_TIMEOUT_SECONDS).
            await self.accept()
            self._spawn(self._auth_deadline())
            return
        # Before accept, any refusal is the handshake's (HTTP 403): nothing is streamed.
        claims = recipient_token_claims(token)
        if claims is None or not await self._join(claims):
            await self.close()
            return
        opened = await _open(claims, self.since)
        if opened is None:
            await self.close()
            return
        await self.accept()
        await self._start(*opened)

    async def disconnect(self, code: int) -> None:
        self.closing = True
        if self.counted:
            self.counted = False
            metrics.websocket_connection_closed()
        for task in self.tasks:
            task.cancel()
        # The tasks hold this consumer (their frames' self) and it held them: without the
        # cycle, a closed socket is freed as soon as its last task ends, with no collection.
        self.tasks = []

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.closing:
            return
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > settings.WS_MAX_FRAME_BYTES:
            await self._close(CLOSE_FRAME_TOO_BIG)
            return
        wait = self.budget.take()
        if wait:
            # Backpressure: this socket is not read meanwhile, so a flooding client slows
            # itself down instead of turning into database writes.
            await asyncio.sleep(wait)
        frame = self._parse(text_data)
        if self.recipient is None:
            await self._authenticate(frame)
            return
        if frame is None:
            await self._send_json({"type": "error", "error": "bad_frame"})
            return
        kind = frame["type"]
        if kind == "pong":
            # Older clients answer every ping; nothing needs the answer any more.
            return
        if kind in ("ack", "read"):
            notification_id = _uuid(frame.get("id"))
            if notification_id is None:
                await self._send_json({"type": "error", "error": "bad_id"})
                return
            # Written with the other sockets' within WS_ACK_WINDOW_SECONDS; scoped to the
            # token's recipient: an id of someone else's notification changes nothing.
            inbox_writer().add(kind, self.recipient.recipient_id, notification_id)
            log.debug(
                "client %s on %s", kind, self.group, extra={"notification_id": str(notification_id)}
            )
            return
        await self._send_json({"type": "error", "error": "unknown_type"})

    async def dispatch(self, message: dict[str, Any]) -> None:
        """As Channels' own, without its close_old_connections() on every message: that is a
        hop through the one thread-sensitive thread per frame, ack and pong. The functions
        that touch the database close stale connections themselves (database_sync_to_async)."""
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def inbox_notification(self, event: dict[str, Any]) -> None:
        """A live frame from the broadcast helper."""
        await self._push(event["frame"])

    async def layer_reconnected(self, event: dict[str, Any]) -> None:
        """The process's subscription was lost and is back (channels_app/layer.py): what was
        published meanwhile reached nobody here, so fetch it from the database, from the
        position up to which this socket has been sent everything."""
        if self.recipient is None or self.closing:
            return
        position, frames = await _catch_up(self.recipient.recipient_id, self.seen.mark)
        for frame in frames:
            await self._push(frame)
        self.seen.advance(position)

    # --- internals --------------------------------------------------------------------------

    @staticmethod
    def _parse(text_data: str | None) -> dict[str, Any] | None:
        if text_data is None:
            return None
        try:
            frame = json.loads(text_data)
        except ValueError:
            return None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return None
        return frame

    async def _authenticate(self, frame: dict[str, Any] | None) -> None:
        if frame is None or frame["type"] != "auth" or not isinstance(frame.get("token"), str):
            await self._close(CLOSE_UNAUTHENTICATED)
            return
        claims = recipient_token_claims(frame["token"])
        if claims is None:
            await self._close(CLOSE_UNAUTHENTICATED)
            return
        since = _position(frame.get("since"))
        if since is not None:
            self.since = since
        if not await self._join(claims):
            await self._close(CLOSE_TRY_AGAIN_LATER)
            return
        opened = await _open(claims, self.since)
        if opened is None:
            await self._close(CLOSE_UNAUTHENTICATED)
            return
        await self._start(*opened)

    async def _join(self, claims: RecipientClaims) -> bool:
        """Subscribe to the recipient's group; False when the channel layer is unavailable.
        Before the backlog is read, so nothing published in between is missed (the live copy
        of a frame the backlog also carried is dropped: frames go out once per socket)."""
        self.group = recipient_group(claims.recipient_id)
        try:
            # In this process's memory, plus one SUBSCRIBE when it is the recipient's first
            # socket here; returns once Redis has confirmed it (channels_app/layer.py).
            await self.channel_layer.group_add(self.group, self.channel_name)
        except (RedisError, OSError):
            log.warning("channel layer unavailable; %s not joined", self.group)
            return False
        # websocket_disconnect discards every group listed here.
        self.groups.append(self.group)
        return True

    async def _start(
        self, recipient: InboxRecipient, position: int, backlog: list[dict[str, Any]]
    ) -> None:
        """Send what the socket missed, then `ready` with the position it has now seen
        everything up to (its next `since`)."""
        self.recipient = recipient
        self.counted = True
        metrics.websocket_connection_opened()
        for frame in backlog:
            await self._push(frame)
        self.seen.advance(position)
        await self._send_json({"type": "ready", "position": self.seen.mark})
        self._spawn(self._heartbeat())

    async def _push(self, frame: dict[str, Any]) -> None:
        """Send a notification frame once per connection (a live copy of one the backlog
        carried, or pushed twice by a retry, is dropped)."""
        if self.closing or not self.seen.add(frame["position"]):
            return
        await self._send_json(frame)
        metrics.websocket_frame_pushed()
        log.debug("notification pushed to %s", self.group, extra={"notification_id": frame["id"]})

    async def _send_json(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(frame))

    async def _close(self, code: int) -> None:
        if not self.closing:
            self.closing = True
            await self.close(code=code)

    def _spawn(self, coroutine: Any) -> None:
        self.tasks.append(asyncio.ensure_future(coroutine))

    async def _auth_deadline(self) -> None:
        await asyncio.sleep(settings.WS_AUTH_TIMEOUT_SECONDS)
        if self.recipient is None:
            await self._close(CLOSE_UNAUTHENTICATED)

    async def _heartbeat(self) -> None:
        """Send `{"type": "ping"}` every WS_PING_INTERVAL_SECONDS: the browser's sign that the
        server is still there (clarion.js reconnects after a silence; a browser cannot see the
        protocol's own pings), and traffic that keeps an idle connection open through proxies.
        No answer is awaited: a client that is gone stops answering the WebSocket protocol's
        pings, which uvicorn sends and checks by itself (--ws-ping-interval,
        --ws-ping-timeout), so keeping sockets alive costs no frame through this consumer. A
        client that stopped reading is closed with 4408 once a ping cannot be written within
        WS_PING_TIMEOUT_SECONDS."""
        # The first ping is spread over the interval, so sockets opened together (a server
        # restart, a reconnect storm) do not ping together for ever after.
        next_ping = time.monotonic() + settings.WS_PING_INTERVAL_SECONDS * random.uniform(0.5, 1)
        try:
            while not self.closing:
                await asyncio.sleep(next_ping - time.monotonic())
                next_ping = time.monotonic() + settings.WS_PING_INTERVAL_SECONDS
                try:
                    # A client that stopped reading fills its socket's buffers, and a send
                    # then waits for as long as it does not read.
                    async with asyncio.timeout(settings.WS_PING_TIMEOUT_SECONDS):
                        await self.send(text_data=PING_TEXT)
                except TimeoutError:
                    log.info("closing a WebSocket of %s that does not read", self.group)
                    await self._close(CLOSE_HEARTBEAT_TIMEOUT)
                    return
        except OSError:
            # The server already lost the socket; its disconnect cancels this task.
            return
