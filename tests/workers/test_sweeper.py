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


def test_a_queue_with_a_backlog_is_not_swept_again(
    api: Any, template: Any, redis_broker: None
) -> None:
    """Stale rows of a channel whose queue still holds messages are a backlog: publishing them
    again would add a second message per delivery at every sweep. Rows marked unpublished
    (enqueued_at NULL) are published whatever the queue holds."""
    from workers.dispatch import deliveries_publish_rollback_unsafe

    stale, unpublished = make(api, 2)
    # Their messages, as the API publishes them on commit (this test's transaction never
    # commits).
    deliveries_publish_rollback_unsafe([(stale.pk, "email"), (unpublished.pk, "email")])
    old = timezone.now() - timedelta(seconds=settings.SWEEPER_STALE_SECONDS + 5)
    Delivery.objects.filter(pk=stale.pk).update(enqueued_at=old)
    Delivery.objects.filter(pk=unpublished.pk).update(enqueued_at=None)
    assert queued_ids("email") == sorted([stale.pk, unpublished.pk])

    assert deliveries_sweep() == 1
    assert queued_ids("email") == sorted([stale.pk, unpublished.pk, unpublished.pk])

    redis.Redis.from_url(settings.REDIS_URL).flushdb()  # the broker lost the backlog
    assert deliveries_sweep() == 1
    assert queued_ids("email") == [stale.pk]


def test_a_failed_publish_pauses_publishing_and_leaves_the_rows_to_the_next_sweep(
    api: Any, template: Any, redis_broker: None, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    from kombu.exceptions import OperationalError

    from workers import dispatch
    from workers.tasks import DELIVER_TASKS

    first, second, third = make(api, 3)
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    calls = []

    def broker_down(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs["args"][0])
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    settings.BROKER_PUBLISH_PAUSE_SECONDS = 30
    with monkeypatch.context() as patch:
        patch.setattr(DELIVER_TASKS["email"], "apply_async", broker_down)
        assert dispatch.deliveries_publish_rollback_unsafe([(first.pk, "email")]) == 0
        # Paused: the next publishes are not even tried, only marked for the sweeper.
        assert (
            dispatch.deliveries_publish_rollback_unsafe([(second.pk, "email"), (third.pk, "email")])
            == 0
        )
    assert calls == [first.pk]
    assert list(
        Delivery.objects.filter(pk__in=[first.pk, second.pk, third.pk]).values_list(
            "enqueued_at", flat=True
        )
    ) == [None, None, None]
    assert deliveries_sweep() == 0  # the sweeper's publishes are paused too
    dispatch._paused_until = 0.0  # the pause is over
    assert deliveries_sweep() == 3
    assert queued_ids("email") == sorted([first.pk, second.pk, third.pk])
