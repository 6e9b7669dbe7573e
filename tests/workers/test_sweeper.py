"""The sweeper: due scheduled deliveries and pending ones whose message was lost go back on
their queue; leased, not-yet-due and freshly enqueued ones do not."""

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
from workers.services import deliveries_sweep

pytestmark = pytest.mark.django_db


def queued_ids(queue: str) -> list[int]:
    """Delivery ids waiting in a Redis broker queue."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL.replace("redis+socket://", "unix://"))
    ids = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        ids.append(body[0][0])
    return sorted(ids)


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
    lost, fresh, leased, waiting = make(api, 4)
    [scheduled] = make(api, 1, send_at="2999-01-01T00:00:00Z")
    old = timezone.now() - timedelta(seconds=settings.SWEEPER_STALE_SECONDS + 5)
    Delivery.objects.filter(pk__in=[lost.pk, leased.pk, waiting.pk]).update(enqueued_at=old)
    Delivery.objects.filter(pk=leased.pk).update(
        lease_expires_at=timezone.now() + timedelta(seconds=60)
    )
    Delivery.objects.filter(pk=waiting.pk).update(
        status=DeliveryStatus.RETRYING, next_attempt_at=timezone.now() + timedelta(hours=2)
    )
    Delivery.objects.filter(pk=scheduled.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    redis.Redis.from_url(settings.REDIS_URL).flushdb()

    assert deliveries_sweep() == 2
    assert queued_ids("email") == sorted([lost.pk, scheduled.pk])
    assert fresh.pk not in queued_ids("email")
    scheduled.refresh_from_db()
    assert scheduled.status == DeliveryStatus.QUEUED
    # Just re-enqueued: the next sweep leaves them alone.
    assert deliveries_sweep() == 0
