"""In-app provider: pushes web deliveries to the recipients' open sockets through the channel
layer. `sent` means published; the browser's ack makes it `delivered`."""

from __future__ import annotations

from typing import cast

from django.conf import settings
from redis.exceptions import RedisError

from channels_app.broadcast import notification_frame, recipients_broadcast
from notifications.models import Delivery
from workers.providers.base import OutboundMessage, Outcome, SendResult

GONE = SendResult(Outcome.PERMANENT, error="the notification no longer exists")


class WebSocketProvider:
    """A batch provider: a worker's batch of web deliveries costs one query and one concurrent
    round of publishes on the process's broadcast loop."""

    name = "websocket"

    def __init__(self, *, timeout: float, max_batch: int | None = None):
        self.timeout = timeout
        self.max_batch = max(1, max_batch or settings.DISPATCH_BATCH_SIZE)

    def send(self, message: OutboundMessage) -> SendResult:
        [result] = self.send_batch([message])
        return result

    def send_batch(self, messages: list[OutboundMessage]) -> list[SendResult]:
        """One result per message, in order."""
        rows = {
            row["id"]: row
            # The claim gave each its inbox position (workers.transitions.deliveries_claim);
            # only an in-app delivery without a recipient has none, and no inbox to reach.
            for row in Delivery.objects.filter(
                pk__in={m.delivery_id for m in messages}, inbox_position__isnull=False
            ).values(
                "id", "inbox_position", "notification__recipient_id", "notification__created_at"
            )
        }
        found = [rows.get(message.delivery_id) for message in messages]
        frames = [
            (
                row["notification__recipient_id"],
                notification_frame(
                    notification_id=message.notification_id,
                    position=cast(int, row["inbox_position"]),
                    content=message.content,
                    data=message.data,
                    created_at=row["notification__created_at"],
                ),
            )
            for message, row in zip(messages, found, strict=True)
            if row is not None
        ]
        errors = iter(recipients_broadcast(frames=frames, timeout=self.timeout))
        return [GONE if row is None else _result(next(errors)) for row in found]


def _result(error: BaseException | None) -> SendResult:
    if error is None:
        return SendResult(Outcome.OK)
    if isinstance(error, RedisError | OSError | TimeoutError):
        # The layer is down or slow: worth retrying. Nothing is lost meanwhile, since the
        # browser also reads the notification from the database when it (re)connects.
        return SendResult(
            Outcome.TRANSIENT, error=f"channel layer: {type(error).__name__}: {error}"
        )
    # Anything else is a bug (a frame the layer cannot serialise), not a provider outcome.
    raise error
