"""Handing deliveries to the broker. Writers never publish: they leave rows in the outbox
(Delivery.enqueued_at NULL) and, once their transaction commits, wake the relay
(core/outbox.py); the relay publishes one task per batch of delivery ids (workers/relay.py).
Tasks are published by name, so nothing here imports the tasks."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.conf import settings

from core import metrics

log = logging.getLogger(__name__)


def deliver_task_name(channel: str) -> str:
    """The delivery task of a channel's queue (workers/tasks.py registers them)."""
    return f"clarion.deliver.{channel}"


def batches(ids: Iterable[int], size: int | None = None) -> list[list[int]]:
    """Delivery ids in chunks of at most DISPATCH_BATCH_SIZE, in order."""
    chunk = max(1, size or settings.DISPATCH_BATCH_SIZE)
    items = list(ids)
    return [items[start : start + chunk] for start in range(0, len(items), chunk)]


def batches_publish_rollback_unsafe(by_channel: dict[str, list[int]]) -> int:
    """Publish one delivery task per batch of ids of each channel, now, whatever the
    transaction state: on Redis all of them in one round trip (kombu's Producer.batch()
    buffers the LPUSHes of the block in one pipeline). Raises the broker's error, having
    published nothing that counts; returns how many messages went out."""
    from project.celery import app as celery_app

    messages = [
        (channel, chunk) for channel, ids in by_channel.items() for chunk in batches(ids) if chunk
    ]
    if not messages:
        return 0
    retry_policy = {
        "max_retries": settings.BROKER_PUBLISH_MAX_RETRIES,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
    }
    with celery_app.producer_or_acquire() as producer, producer.batch(len(messages)):
        for channel, chunk in messages:
            celery_app.send_task(
                deliver_task_name(channel),
                args=[chunk],
                queue=channel,
                producer=producer,
                retry=True,
                retry_policy=retry_policy,
            )
    for channel, ids in by_channel.items():
        chunks = -(-len(ids) // max(1, settings.DISPATCH_BATCH_SIZE))
        metrics.relay_published(channel=channel, deliveries=len(ids), messages=chunks)
    return len(messages)
