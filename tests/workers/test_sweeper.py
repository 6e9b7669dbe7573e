"""The sweeper: pending deliveries whose message was lost go back to the outbox for the relay;
leased, not-yet-due and freshly published ones do not, nor a queue's backlog; on a Redis
broker, a message a consumer lost is found within a sweep."""

from __future__ import annotations

import base64
import json
import time
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


def _broker() -> redis.Redis:
    return redis.Redis.from_url(settings.CELERY_BROKER_URL.replace("redis+socket://", "unix://"))


def _publish_alone(delivery: Delivery, *, seconds_ago: float) -> None:
    """Its own message, published `seconds_ago` by the database's record."""
    Delivery.objects.filter(pk=delivery.pk).update(enqueued_at=None)
    assert outbox_publish_due() == 1
    Delivery.objects.filter(pk=delivery.pk).update(
        enqueued_at=timezone.now() - timedelta(seconds=seconds_ago)
    )


def _take_oldest(queue: str, *, held: bool) -> None:
    """What a kombu Redis consumer does with the oldest message (BRPOP), and, with `held`,
    what it does next (the message recorded as unacknowledged). Without it, the consumer's
    connection failed in between: the message is gone."""
    client = _broker()
    raw = client.rpop(queue)
    assert raw is not None
    if held:
        message = json.loads(raw)
        tag = message["properties"]["delivery_tag"]
        client.zadd("unacked_index", {tag: time.time()})
        client.hset("unacked", tag, json.dumps([message, queue, queue]))


def test_a_message_a_consumer_lost_is_swept_within_a_sweep(
    api: Any, template: Any, redis_broker: None
) -> None:
    """Published less than SWEEPER_STALE_SECONDS ago: a delivery whose message was taken off
    its queue and is held by no consumer is lost, also behind a queue that still holds newer
    messages (first in, first out); one a consumer holds, one still waiting, and one taken
    too recently to judge are not."""
    lost, held, waiting, recent = make(api, 4)
    Delivery.objects.filter(pk__in=[lost.pk, held.pk, waiting.pk, recent.pk]).update(
        enqueued_at=timezone.now()
    )
    _publish_alone(lost, seconds_ago=40)
    _publish_alone(held, seconds_ago=35)
    _publish_alone(waiting, seconds_ago=30)
    _take_oldest("email", held=False)  # lost's message, gone with its consumer's connection
    _take_oldest("email", held=True)  # held's, recorded as unacknowledged
    assert queued_ids("email") == [[waiting.pk]]

    assert deliveries_sweep() == 1
    assert list(Delivery.objects.outbox().values_list("pk", flat=True)) == [lost.pk]

    # Taken off an empty queue a moment ago: within SWEEPER_LOST_SECONDS it may still be on
    # its way to being recorded, so it is not judged yet.
    Delivery.objects.filter(pk=lost.pk).update(enqueued_at=timezone.now())  # published again
    _take_oldest("email", held=False)  # waiting's: now the queue is empty
    _publish_alone(recent, seconds_ago=settings.SWEEPER_LOST_SECONDS / 2)
    _take_oldest("email", held=False)
    assert deliveries_sweep() == 1  # waiting's, published 30 s ago; not recent's
    assert sorted(Delivery.objects.outbox().values_list("pk", flat=True)) == [waiting.pk]
