"""The sweeper: pending deliveries whose message was lost go back to the outbox for the relay;
leased, not-yet-due and freshly published ones do not, nor a queue's backlog."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from notifications.models import Delivery, DeliveryStatus
from workers.relay import outbox_publish_due
from workers.services import deliveries_sweep

pytestmark = pytest.mark.django_db


def queued_ids(queue: str) -> list[list[int]]:
    """The delivery ids of each message waiting in a Redis broker queue, oldest first."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL.replace("redis+socket://", "unix://"))
    batches = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        batches.append(body[0][0])
    return batches


@pytest.fixture
def redis_broker() -> None:
    if not settings.CELERY_BROKER_URL.startswith(("redis://", "redis+socket://")):
        pytest.skip("inspects Redis broker lists; the broker here is not Redis")


def make(api: Any, n: int, **body: Any) -> list[Delivery]:
    deliveries = []
    for i in range(n):
        response = api.post(
            "/api/v1/notifications",
            {
                "recipient": {"id": f"u{i}", "email": f"u{i}@example.com"},
                "template": "order_shipped",
                "data": {"order_id": str(i)},
                "channels": ["email"],
                **body,
            },
            format="json",
        )
        deliveries.append(Delivery.objects.get(notification_id=response.json()["id"]))
    return deliveries


def test_sweeps_lost_and_due_only(api: Any, template: Any, redis_broker: None) -> None:
    lost, _fresh, leased, waiting = make(api, 4)
    assert outbox_publish_due() == 4
    old = timezone.now() - timedelta(seconds=settings.SWEEPER_STALE_SECONDS + 5)
    Delivery.objects.filter(pk__in=[lost.pk, leased.pk, waiting.pk]).update(enqueued_at=old)
    Delivery.objects.filter(pk=leased.pk).update(
        lease_expires_at=timezone.now() + timedelta(seconds=60)
    )
    Delivery.objects.filter(pk=waiting.pk).update(
        status=DeliveryStatus.RETRYING, next_attempt_at=timezone.now() + timedelta(hours=2)
    )
    redis.Redis.from_url(settings.REDIS_URL).flushdb()  # the broker lost every message

    assert deliveries_sweep() == 1
    assert list(Delivery.objects.outbox().values_list("pk", flat=True)) == [lost.pk]
    assert outbox_publish_due() == 1
    assert queued_ids("email") == [[lost.pk]]
    # Just published again: the next sweep leaves it alone.
    assert deliveries_sweep() == 0


def test_a_queue_with_a_backlog_is_not_swept_again(
    api: Any, template: Any, redis_broker: None
) -> None:
    """Stale rows of a channel whose queue still holds messages are a backlog: publishing them
    again would add a second message per delivery at every sweep."""
    stale, other = make(api, 2)
    assert outbox_publish_due() == 2
    old = timezone.now() - timedelta(seconds=settings.SWEEPER_STALE_SECONDS + 5)
    Delivery.objects.filter(pk__in=[stale.pk, other.pk]).update(enqueued_at=old)
    assert queued_ids("email") == [[stale.pk, other.pk]]

    assert deliveries_sweep() == 0

    redis.Redis.from_url(settings.REDIS_URL).flushdb()  # the broker lost the backlog
    assert deliveries_sweep() == 2
    assert outbox_publish_due() == 2
    assert queued_ids("email") == [[stale.pk, other.pk]]
