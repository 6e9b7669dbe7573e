"""Handing deliveries to the broker. The database row is written first; the message is only
a wake-up call, so a publish that fails is logged and left to the sweeper."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from kombu.exceptions import OperationalError

log = logging.getLogger(__name__)

# Keep a margin under the broker's visibility timeout: Redis would redeliver a message whose
# countdown outlives it. Longer waits stay in the database (next_attempt_at) for the sweeper.
COUNTDOWN_MARGIN_SECONDS = 60


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
    from workers.tasks import DELIVER_TASKS

    if countdown is not None and countdown > max_countdown_seconds():
        return 0
    published = 0
    for delivery_id, channel in items:
        try:
            DELIVER_TASKS[channel].apply_async(
                args=[delivery_id],
                queue=channel,
                countdown=countdown,
                retry=True,
                retry_policy={
                    "max_retries": settings.BROKER_PUBLISH_MAX_RETRIES,
                    "interval_start": 0,
                    "interval_step": 0.2,
                    "interval_max": 0.5,
                },
            )
            published += 1
        except (OperationalError, OSError) as exc:
            log.warning(
                "publish failed, the sweeper will re-enqueue delivery %s: %s",
                delivery_id,
                exc,
                extra={"delivery_id": delivery_id},
            )
    return published
