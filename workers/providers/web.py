"""In-app provider: pushes a web delivery to the recipient's open sockets through the
channel layer. `sent` means published; the browser's ack makes it `delivered`."""

from __future__ import annotations

from redis.exceptions import RedisError

from channels_app.broadcast import notification_frame, recipient_broadcast
from notifications.models import Notification
from workers.providers.base import OutboundMessage, Outcome, SendResult


class WebSocketProvider:
    name = "websocket"

    def __init__(self, *, timeout: float):
        self.timeout = timeout

    def send(self, message: OutboundMessage) -> SendResult:
        row = (
            Notification.objects.filter(pk=message.notification_id)
            .values("recipient_id", "created_at")
            .first()
        )
        if row is None:
            return SendResult(Outcome.PERMANENT, error="the notification no longer exists")
        frame = notification_frame(
            notification_id=message.notification_id,
            content=message.content,
            data=message.data,
            created_at=row["created_at"],
        )
        try:
            recipient_broadcast(recipient_id=row["recipient_id"], frame=frame, timeout=self.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            # The layer is down or slow: worth retrying. Nothing is lost meanwhile, since the
            # browser also reads the notification from the database when it (re)connects.
            error = f"channel layer: {type(exc).__name__}: {exc}"
            return SendResult(Outcome.TRANSIENT, error=error)
        return SendResult(Outcome.OK)
