"""The websocket provider on the real channel layer: the frame it publishes, a batch of them
(one query, one result per message in order), a layer that is down as a transient failure, and
a browser ack that beats the worker's own "sent"."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings as django_settings

from channels_app import broadcast
from channels_app.broadcast import recipient_group
from channels_app.layer import LiveChannelLayer
from notifications import services
from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Notification
from tests.channels_app.support import GroupListener, create_web_notification, expected_frame
from tests.conftest import free_port
from workers import transitions
from workers.providers import BatchProvider, OutboundMessage, Outcome, SendResult, provider_for
from workers.providers.sandbox import SandboxProvider
from workers.providers.web import WebSocketProvider
from workers.services import delivery_process
from workers.transitions import inbox_positions_give

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fresh_providers() -> Iterator[None]:
    provider_for.cache_clear()
    yield
    provider_for.cache_clear()


@pytest.fixture
def layer_down(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's broadcast loop, for the test, publishes to a Redis nobody listens on."""
    port = free_port()
    runner = broadcast._LoopRunner(
        layer_factory=lambda: LiveChannelLayer(hosts=[f"redis://127.0.0.1:{port}/0"])
    )
    monkeypatch.setattr(broadcast, "_runner", runner)
    yield
    runner.stop()


def _web_delivery(notification: Notification) -> Delivery:
    """As a worker's claim hands it to the provider: with its inbox position."""
    delivery = Delivery.objects.select_related("notification").get(
        notification=notification, channel="web"
    )
    inbox_positions_give([delivery])
    return delivery


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
    provider = provider_for("web")
    assert isinstance(provider, WebSocketProvider)
    assert isinstance(provider, BatchProvider)
    assert (provider.name, provider.max_batch) == ("websocket", django_settings.DISPATCH_BATCH_SIZE)
    settings.WEB_PROVIDER = "sandbox"
    provider_for.cache_clear()
    assert isinstance(provider_for("web"), SandboxProvider)


def test_send_publishes_the_design_frame_to_the_recipients_group(owner: Any, template: Any) -> None:
    services.recipient_upsert(owner=owner, external_id="user-a")
    notification = create_web_notification(owner, "user-a", "A-1")
    delivery = _web_delivery(notification)
    with GroupListener(recipient_group(notification.recipient_id)) as listener:
        result = WebSocketProvider(timeout=5).send(_message(delivery))

        assert (result.outcome, result.error) == (Outcome.OK, "")
        assert listener.receive() == [
            {"type": "inbox.notification", "frame": expected_frame(notification)}
        ]


def test_send_batch_publishes_each_frame_and_answers_in_order(
    owner: Any, template: Any, django_assert_num_queries: Any
) -> None:
    services.recipient_upsert(owner=owner, external_id="user-a")
    services.recipient_upsert(owner=owner, external_id="user-b")
    a1 = create_web_notification(owner, "user-a", "A-1")
    b1 = create_web_notification(owner, "user-b", "B-1")
    gone = create_web_notification(owner, "user-a", "A-gone")
    a2 = create_web_notification(owner, "user-a", "A-2")
    messages = [_message(_web_delivery(n)) for n in (a1, b1, gone, a2)]
    Notification.objects.filter(pk=gone.pk).delete()
    listener_a = GroupListener(recipient_group(a1.recipient_id))
    listener_b = GroupListener(recipient_group(b1.recipient_id))
    with listener_a, listener_b:
        provider = WebSocketProvider(timeout=5, max_batch=10)

        with django_assert_num_queries(1):
            results = provider.send_batch(messages)

        assert results == [
            SendResult(Outcome.OK),
            SendResult(Outcome.OK),
            SendResult(Outcome.PERMANENT, error="the notification no longer exists"),
            SendResult(Outcome.OK),
        ]
        # The two of one recipient were published at once: either may come first.
        received_a = listener_a.receive(2)
        received_a.sort(key=lambda message: message["frame"]["id"] != str(a1.pk))
        assert received_a == [
            {"type": "inbox.notification", "frame": expected_frame(a1)},
            {"type": "inbox.notification", "frame": expected_frame(a2)},
        ]
        assert listener_b.receive() == [{"type": "inbox.notification", "frame": expected_frame(b1)}]
    assert provider.send_batch([]) == []


def test_a_channel_layer_that_is_down_is_a_transient_failure(
    owner: Any, template: Any, layer_down: None
) -> None:
    services.recipient_upsert(owner=owner, external_id="user-a")
    notification = create_web_notification(owner, "user-a", "A-1")
    gone = create_web_notification(owner, "user-a", "A-gone")
    other = create_web_notification(owner, "user-a", "A-2")
    messages = [_message(_web_delivery(n)) for n in (notification, gone, other)]
    Notification.objects.filter(pk=gone.pk).delete()

    result = WebSocketProvider(timeout=5).send(messages[0])
    results = WebSocketProvider(timeout=5).send_batch(messages)

    assert result.outcome is Outcome.TRANSIENT
    assert result.error.startswith("channel layer: ConnectionError: Error 111 connecting to")
    assert [r.outcome for r in results] == [Outcome.TRANSIENT, Outcome.PERMANENT, Outcome.TRANSIENT]
    assert results[0].error.startswith("channel layer: ConnectionError: Error 111 connecting to")
    assert results[1].error == "the notification no longer exists"
    assert results[2].error.startswith("channel layer: ConnectionError: Error 111 connecting to")


def test_an_ack_that_beats_the_workers_sent_is_kept(
    owner: Any, template: Any, monkeypatch: pytest.MonkeyPatch, fresh_providers: None
) -> None:
    """The browser acks the frame while the worker is still between publish and marking the
    delivery sent: the delivery ends `delivered`, not back at `sent`."""
    recipient, _ = services.recipient_upsert(owner=owner, external_id="user-a")
    notification = create_web_notification(owner, "user-a", "A-1")
    publish = WebSocketProvider.send_batch

    def publish_then_the_browser_acks(
        self: WebSocketProvider, messages: list[OutboundMessage]
    ) -> Any:
        results = publish(self, messages)
        assert transitions.inbox_acknowledge(
            recipient_id=recipient.pk, notification_id=notification.pk, source="websocket"
        )
        return results

    # send() goes through send_batch, so this holds whichever the delivery path calls.
    monkeypatch.setattr(WebSocketProvider, "send_batch", publish_then_the_browser_acks)
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
