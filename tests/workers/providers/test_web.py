"""The websocket provider on the real channel layer: the frame it publishes, a layer that is
down as a transient failure, and a browser ack that beats the worker's own "sent"."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels_redis.core import RedisChannelLayer

from channels_app import broadcast
from channels_app.broadcast import recipient_group
from notifications import services
from notifications.models import Delivery, DeliveryEvent, DeliveryStatus
from tests.channels_app.support import create_web_notification, expected_frame
from tests.conftest import free_port
from workers.providers import OutboundMessage, Outcome, provider_for
from workers.providers.sandbox import SandboxProvider
from workers.providers.web import WebSocketProvider
from workers.services import delivery_process

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fresh_providers() -> Iterator[None]:
    provider_for.cache_clear()
    yield
    provider_for.cache_clear()


def _message(delivery: Delivery) -> OutboundMessage:
    return OutboundMessage(
        delivery_id=delivery.pk,
        notification_id=str(delivery.notification_id),
        owner_id=delivery.notification.owner_id,
        channel="web",
        to=delivery.address,
        content=delivery.content,
        data=delivery.notification.data,
    )


def test_websocket_is_the_default_web_provider_and_sandbox_stays_selectable(
    settings: Any, fresh_providers: None
) -> None:
    assert isinstance(provider_for("web"), WebSocketProvider)
    assert provider_for("web").name == "websocket"
    settings.WEB_PROVIDER = "sandbox"
    provider_for.cache_clear()
    assert isinstance(provider_for("web"), SandboxProvider)


def test_send_publishes_the_design_frame_to_the_recipients_group(owner: Any, template: Any) -> None:
    services.recipient_upsert(owner=owner, external_id="user-a")
    notification = create_web_notification(owner, "user-a", "A-1")
    delivery = Delivery.objects.select_related("notification").get(
        notification=notification, channel="web"
    )
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(recipient_group(notification.recipient_id), channel)

    result = WebSocketProvider(timeout=5).send(_message(delivery))

    assert (result.outcome, result.error) == (Outcome.OK, "")
    received = async_to_sync(layer.receive)(channel)
    assert received == {"type": "inbox.notification", "frame": expected_frame(notification)}


def test_a_channel_layer_that_is_down_is_a_transient_failure(
    owner: Any, template: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    services.recipient_upsert(owner=owner, external_id="user-a")
    notification = create_web_notification(owner, "user-a", "A-1")
    delivery = Delivery.objects.select_related("notification").get(
        notification=notification, channel="web"
    )
    nowhere = RedisChannelLayer(hosts=[f"redis://127.0.0.1:{free_port()}/0"])
    monkeypatch.setattr(broadcast, "get_channel_layer", lambda: nowhere)

    result = WebSocketProvider(timeout=5).send(_message(delivery))

    assert result.outcome is Outcome.TRANSIENT
    assert result.error.startswith("channel layer: ConnectionError: Error 111 connecting to")


def test_an_ack_that_beats_the_workers_sent_is_kept(
    owner: Any, template: Any, monkeypatch: pytest.MonkeyPatch, fresh_providers: None
) -> None:
    """The browser acks the frame while the worker is still between publish and marking the
    delivery sent: the delivery ends `delivered`, not back at `sent`."""
    recipient, _ = services.recipient_upsert(owner=owner, external_id="user-a")
    notification = create_web_notification(owner, "user-a", "A-1")
    publish = WebSocketProvider.send

    def publish_then_the_browser_acks(self: WebSocketProvider, message: OutboundMessage) -> Any:
        result = publish(self, message)
        assert services.inbox_acknowledge(
            recipient_id=recipient.pk, notification_id=notification.pk, source="websocket"
        )
        return result

    monkeypatch.setattr(WebSocketProvider, "send", publish_then_the_browser_acks)
    delivery = Delivery.objects.get(notification=notification, channel="web")

    delivery_process(delivery_id=delivery.pk)

    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.DELIVERED
    assert delivery.sent_at is not None and delivery.delivered_at is not None
    assert (delivery.lease_token, delivery.attempts) == (None, 1)
    # How it was sent is still recorded, without moving the status back.
    assert delivery.provider == "websocket"
    # The worker's message, redelivered by the broker, finds nothing to send.
    assert delivery_process(delivery_id=delivery.pk).value == "not_claimed"
    assert list(
        DeliveryEvent.objects.filter(delivery=delivery)
        .order_by("at", "id")
        .values_list("status", flat=True)
    ) == ["queued", "delivered"]
