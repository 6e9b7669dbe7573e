"""Handing deliveries to the broker. The database row is written first; the message is only
a wake-up call, so a publish that fails is logged and left to the sweeper."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.db import DatabaseError, transaction
from kombu.exceptions import BatchPublishError, OperationalError

log = logging.getLogger(__name__)

# Keep a margin under the broker's visibility timeout: Redis would redeliver a message whose
# countdown outlives it. Longer waits stay in the database (next_attempt_at) for the sweeper.
COUNTDOWN_MARGIN_SECONDS = 60

# After a publish fails, this process stops publishing for BROKER_PUBLISH_PAUSE_SECONDS: each
# publish to a broker that is down waits out its connection retries, and a bulk request of a
# thousand deliveries would wait a thousand times. Unpublished rows are the sweeper's.
_paused_until = 0.0
# Broker operations buffered before a flush, in a bulk publish.
PUBLISH_BATCH_SIZE = 500


def max_countdown_seconds() -> float:
    return max(0.0, settings.BROKER_VISIBILITY_TIMEOUT - COUNTDOWN_MARGIN_SECONDS)


def deliveries_enqueue_on_commit(items: list[tuple[int, str]]) -> None:
    """Publish (delivery id, channel) pairs once the current transaction commits."""
    if items:
        transaction.on_commit(lambda: deliveries_publish_rollback_unsafe(items))


def deliveries_publish_rollback_unsafe(
    items: list[tuple[int, str]], *, countdown: float | None = None
) -> int:
    """Publish now, whatever the transaction state; returns how many were published."""
    from project.celery import app as celery_app
    from workers.tasks import DELIVER_TASKS

    if not items or (countdown is not None and countdown > max_countdown_seconds()):
        return 0
    global _paused_until
    published = 0
    try:
        # One producer (one pooled broker connection) for the whole list, and on Redis one
        # pipeline: kombu's Producer.batch() sends the buffered LPUSHes in one round trip when
        # the block ends (AMQP publishes each at once). Nothing counts as published before
        # that; a failure leaves the whole list to the sweeper.
        with celery_app.producer_or_acquire() as producer, producer.batch(PUBLISH_BATCH_SIZE):
            for delivery_id, channel in items:
                if time.monotonic() < _paused_until:
                    break
                DELIVER_TASKS[channel].apply_async(
                    args=[delivery_id],
                    queue=channel,
                    countdown=countdown,
                    producer=producer,
                    retry=True,
                    retry_policy={
                        "max_retries": settings.BROKER_PUBLISH_MAX_RETRIES,
                        "interval_start": 0,
                        "interval_step": 0.2,
                        "interval_max": 0.5,
                    },
                )
                published += 1
    except (OperationalError, OSError, BatchPublishError) as exc:
        _paused_until = time.monotonic() + settings.BROKER_PUBLISH_PAUSE_SECONDS
        _leave_to_sweeper(items, f"publish failed: {exc}")
        return 0
    if published < len(items):
        _leave_to_sweeper(items[published:], "the broker failed moments ago")
    return published


def _leave_to_sweeper(items: list[tuple[int, str]], why: str) -> None:
    """Mark deliveries whose message was not published, so the next sweep (not the stale
    check minutes later) publishes them. Only a retry (countdown) keeps its due time."""
    from notifications.models import Delivery

    ids = [delivery_id for delivery_id, _ in items]
    log.warning(
        "%s; the sweeper will enqueue %s deliveries (first %s)",
        why,
        len(ids),
        ids[0],
        extra={"delivery_id": ids[0]},
    )
    try:
        Delivery.objects.filter(pk__in=ids, enqueued_at__isnull=False).update(enqueued_at=None)
    except DatabaseError as exc:
        # The stale check (SWEEPER_STALE_SECONDS) still finds them.
        log.warning("could not mark %s deliveries for the sweeper: %s", len(ids), exc)
