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

from notifications.models import Owner
from workers.models import DeadLetter, DeadLetterStatus

# A dead letter is made by the Delivery's transition to `dead` (workers.transitions.
# dead_letter_create); this module lists, replays and discards them.
from workers.transitions import deliveries_replay


@dataclass(frozen=True)
class DeadLetterFilter:
    channel: str | None = None
    error: str | None = None
    older_than: datetime | None = None
    newer_than: datetime | None = None
    status: str | None = DeadLetterStatus.OPEN


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
        DeadLetter.objects.filter(pk__in=[pk for pk, _ in chosen]).update(
            status=DeadLetterStatus.REPLAYED, resolved_at=now
        )
        deliveries_replay(delivery_ids=[delivery_id for _, delivery_id in chosen], now=now)
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
