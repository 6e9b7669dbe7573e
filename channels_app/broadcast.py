"""The one way the server pushes to browsers: a frame sent to a recipient's group on the
channel layer, which reaches every socket of that recipient on any server process or host."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

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
    content: dict[str, Any],
    data: dict[str, Any],
    created_at: datetime,
) -> dict[str, Any]:
    """The server → client frame of DESIGN.md, from a web delivery's rendered content."""
    return {
        "type": "notification",
        "id": str(notification_id),
        "title": content.get("title", ""),
        "body": content.get("body", ""),
        "data": data,
        "created_at": iso_datetime(created_at),
    }


def recipient_broadcast(*, recipient_id: int, frame: dict[str, Any], timeout: float) -> None:
    """Publish a frame to every socket of the recipient (none connected is fine: the database
    holds the notification). Raises the channel layer's error, or TimeoutError after
    `timeout` seconds, for the caller to classify."""
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("CHANNEL_LAYERS is not configured")

    async def publish() -> None:
        message = {"type": LIVE_MESSAGE_TYPE, "frame": frame}
        await asyncio.wait_for(layer.group_send(recipient_group(recipient_id), message), timeout)

    async_to_sync(publish)()
