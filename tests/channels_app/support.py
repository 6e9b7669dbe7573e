"""Helpers for the WebSocket tests: recipients with tokens, notifications delivered through the
real delivery path, and WebSocket clients on the real ASGI application or a real server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from channels.testing.websocket import WebsocketCommunicator
from django.test import override_settings

from channels_app import broadcast
from channels_app.inbox_writer import inbox_writer
from notifications import sending, services
from notifications.models import Delivery, Notification, Owner, Recipient
from notifications.tokens import recipient_token_issue
from project.asgi import application
from tests.conftest import Process
from tests.project.api_server import start_api_server
from workers.services import delivery_process

ORIGIN = "http://127.0.0.1"


def recipient_with_token(owner: Owner, external_id: str) -> tuple[Recipient, str]:
    recipient, _ = services.recipient_upsert(owner=owner, external_id=external_id)
    token = recipient_token_issue(owner_id=owner.pk, recipient_id=recipient.pk).token
    return recipient, token


def create_web_notification(owner: Owner, external_id: str, order_id: str) -> Notification:
    """Accepted through the creation service, not pushed yet (its delivery is queued, in the
    outbox: this process does not push it at accept, so a test pushes it when it wants)."""
    with override_settings(WEB_PUSH_AT_ACCEPT=False):
        body = sending.notification_create(
            owner=owner,
            recipient=external_id,
            template_key="order_shipped",
            data={"order_id": order_id},
            channels=["web"],
        )
    return Notification.objects.get(pk=body["id"])


def push(notification: Notification) -> None:
    """Run the notification's web delivery through the real delivery path in this process:
    the websocket provider publishes it on the real channel layer."""
    delivery = Delivery.objects.get(notification=notification, channel="web")
    assert delivery_process(delivery_id=delivery.pk).value == "sent"


class GroupListener:
    """A socket's side of the channel layer, for tests that publish from synchronous code: a
    channel of its own in the given groups, on an event loop in a thread of its own (the
    pub/sub layer keeps a channel's messages in the memory of the loop that made it)."""

    def __init__(self, *groups: str):
        self.runner = broadcast._LoopRunner()

        async def join() -> str:
            layer = self.runner.channel_layer()
            channel: str = await layer.new_channel()
            for group in groups:
                await layer.group_add(group, channel)
            return channel

        self.channel = self.runner.call(join(), timeout=10)

    def receive(self, count: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        async def take() -> list[dict[str, Any]]:
            layer = self.runner.channel_layer()
            return [await layer.receive(self.channel) for _ in range(count)]

        messages: list[dict[str, Any]] = self.runner.call(take(), timeout=timeout)
        return messages

    def __enter__(self) -> GroupListener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.runner.stop()


async def inbox_writes_drained() -> None:
    """Wait until the acks and reads this loop's sockets sent are written: the server gathers
    them for WS_ACK_WINDOW_SECONDS first (channels_app/inbox_writer.py)."""
    await inbox_writer().drain()


class _Position:
    """Equal to any inbox position (a positive integer): for frames whose exact position a
    test does not pin."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, int) and not isinstance(other, bool) and other > 0

    def __repr__(self) -> str:
        return "<any position>"


def expected_frame(notification: Notification, position: int | None = None) -> dict[str, Any]:
    order_id = notification.data["order_id"]
    return {
        "type": "notification",
        "id": str(notification.pk),
        "position": _Position() if position is None else position,
        "title": "Shipped",
        "body": f"Order {order_id} is on its way",
        "data": {"order_id": order_id},
        "created_at": notification.created_at.isoformat().replace("+00:00", "Z"),
    }


def communicator(
    *, token: str | None = None, since: str | None = None, origin: str = ORIGIN
) -> WebsocketCommunicator:
    query = {k: v for k, v in (("token", token), ("since", since)) if v is not None}
    path = "/ws/notifications/" + (f"?{urlencode(query)}" if query else "")
    headers = [(b"origin", origin.encode()), (b"host", b"127.0.0.1")]
    return WebsocketCommunicator(application, path, headers=headers)


def start_server(
    spawn: Callable[..., Process], tmp_path: Path, name: str, *, port: int | None = None
) -> tuple[str, Process]:
    """A real uvicorn process serving project.asgi; returns its base URL once it answers."""
    server, base = start_api_server(spawn, tmp_path, name=name, port=port)
    return base, server


def post_notification(api: Any, recipient: str, order_id: str) -> str:
    response = api.post(
        "/api/v1/notifications",
        {"recipient": recipient, "template": "order_shipped", "data": {"order_id": order_id}},
        format="json",
    )
    assert response.status_code == 202, response.content
    assert response.json()["deliveries"] == [
        {"channel": "email", "status": "skipped", "reason": "no_address"},
        {"channel": "sms", "status": "skipped", "reason": "no_address"},
        {"channel": "push", "status": "skipped", "reason": "no_address"},
        {"channel": "web", "status": "queued"},
    ]
    return str(response.json()["id"])


def json_frame(raw: str | bytes) -> dict[str, Any]:
    return dict(json.loads(raw))
