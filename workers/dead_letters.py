"""The dead-letter queue: deliveries that failed for good are kept with their history, and
replayed (back onto the normal path with fresh attempts) or discarded by an operator."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, QuerySet
from django.utils import timezone

from notifications.models import Delivery, DeliveryStatus, Owner
from workers.delivery_log import delivery_status_events, get_delivery_log
from workers.dispatch import outbox_wake_on_commit
from workers.models import DeadLetter, DeadLetterStatus


@dataclass(frozen=True)
class DeadLetterFilter:
    channel: str | None = None
    error: str | None = None
    older_than: datetime | None = None
    newer_than: datetime | None = None
    status: str | None = DeadLetterStatus.OPEN


def dead_letter_create(*, delivery: Delivery, provider: str, error: str) -> DeadLetter:
    """Keep a delivery that just died (loaded with notification__recipient)."""
    notification = delivery.notification
    history = get_delivery_log().attempts_for_deliveries(
        notification_id=str(notification.pk), delivery_ids=[delivery.pk]
    )
    return DeadLetter.objects.create(
        owner_id=notification.owner_id,
        notification=notification,
        delivery=delivery,
        channel=delivery.channel,
        provider=provider,
        error=error,
        attempts=delivery.attempts,
        attempt_history=[
            {**a.as_api(), "started_at": a.started_at.isoformat()}
            for a in history.get(delivery.pk, [])
        ],
        payload={
            "to": delivery.address or notification.recipient.external_id,
            "content": delivery.content,
        },
    )


def dead_letters_list(*, owner: Owner | None, where: DeadLetterFilter) -> QuerySet[DeadLetter]:
    letters = DeadLetter.objects.select_related("notification__recipient")
    if owner is not None:
        letters = letters.filter(owner=owner)
    if where.status:
        letters = letters.filter(status=where.status)
    if where.channel:
        letters = letters.filter(channel=where.channel)
    if where.error:
        letters = letters.filter(error__icontains=where.error)
    if where.older_than:
        letters = letters.filter(created_at__lt=where.older_than)
    if where.newer_than:
        letters = letters.filter(created_at__gte=where.newer_than)
    return letters


def dead_letter_replay(*, dead_letter: DeadLetter) -> bool:
    """Send the delivery again from scratch; False when it is no longer open."""
    return dead_letters_replay(letters=DeadLetter.objects.filter(pk=dead_letter.pk)) == 1


def dead_letters_replay(*, letters: QuerySet[DeadLetter]) -> int:
    """Replay every open dead letter in `letters`; returns how many."""

    now = timezone.now()
    with transaction.atomic():
        chosen = list(
            letters.filter(status=DeadLetterStatus.OPEN)
            .select_for_update()
            .values_list("pk", "delivery_id")
        )
        if not chosen:
            return 0
        delivery_ids = [delivery_id for _, delivery_id in chosen]
        DeadLetter.objects.filter(pk__in=[pk for pk, _ in chosen]).update(
            status=DeadLetterStatus.REPLAYED, resolved_at=now
        )
        Delivery.objects.filter(pk__in=delivery_ids, status=DeliveryStatus.DEAD).update(
            status=DeliveryStatus.QUEUED,
            attempts=0,
            last_error="",
            next_attempt_at=None,
            # Back in the outbox: the relay publishes it.
            enqueued_at=None,
            lease_token=None,
            lease_expires_at=None,
            updated_at=now,
        )
        deliveries = list(
            Delivery.objects.filter(
                pk__in=delivery_ids, status=DeliveryStatus.QUEUED
            ).select_related("notification__recipient")
        )
        get_delivery_log().record_statuses(
            delivery_status_events(deliveries, DeliveryStatus.QUEUED, detail="replayed")
        )
        if deliveries:
            outbox_wake_on_commit()
    return len(chosen)


def dead_letters_discard(*, letters: QuerySet[DeadLetter]) -> int:
    """Close open dead letters without sending; the deliveries stay `dead`."""
    return letters.filter(status=DeadLetterStatus.OPEN).update(
        status=DeadLetterStatus.DISCARDED, resolved_at=timezone.now()
    )


def dead_letter_counts(*, owner: Owner | None = None) -> dict[str, Any]:
    """Open dead letters per channel, and the channels over the alert threshold."""
    letters = DeadLetter.objects.filter(status=DeadLetterStatus.OPEN)
    if owner is not None:
        letters = letters.filter(owner=owner)
    counts = {"email": 0, "sms": 0, "push": 0, "web": 0}
    for row in letters.values("channel").annotate(n=Count("id")):
        counts[row["channel"]] = row["n"]
    threshold = settings.DEAD_LETTER_ALERT_THRESHOLD
    return {
        "channels": counts,
        "threshold": threshold,
        "over_threshold": sorted(c for c, n in counts.items() if n > threshold),
    }


def dead_letter_groups(*, limit: int = 20) -> list[dict[str, Any]]:
    """Open dead letters counted per channel and exact error, largest groups first: what an
    operator looks at to decide what to replay."""
    rows = (
        DeadLetter.objects.filter(status=DeadLetterStatus.OPEN)
        .values("channel", "error")
        .annotate(count=Count("id"))
        .order_by("-count", "channel", "error")[:limit]
    )
    return [{"channel": r["channel"], "error": r["error"], "count": r["count"]} for r in rows]
