"""The dead-letter queue: deliveries that failed for good are kept with their history, and
replayed (back onto the normal path with fresh attempts) or discarded by an operator. A dead
letter whose address is suppressed is not replayed (the worker would only skip it) unless the
suppression is lifted with it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, QuerySet
from django.utils import timezone

from notifications.models import Delivery, Owner, Suppression
from notifications.suppressions import (
    address_normalize,
    suppression_binds,
    suppressions_delete,
    suppressions_matching,
)
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


@dataclass(frozen=True)
class DeadLetterReplay:
    """What replaying one open dead letter did. `suppression` is the suppression of its
    address that would stop the send: lifted when `replayed`, in the way when not."""

    dead_letter_id: int
    replayed: bool
    suppression: Suppression | None = None


def dead_letter_replay(
    *, dead_letter: DeadLetter, lift_suppression: bool = False
) -> DeadLetterReplay | None:
    """Send the delivery again from scratch; None when it is no longer open."""
    done = dead_letters_replay(
        letters=DeadLetter.objects.filter(pk=dead_letter.pk), lift_suppression=lift_suppression
    )
    return done[0] if done else None


def dead_letters_replay(
    *, letters: QuerySet[DeadLetter], lift_suppression: bool = False
) -> list[DeadLetterReplay]:
    """Replay every open dead letter in `letters`, but those whose address is suppressed
    (for their notification's priority), which stay open; with `lift_suppression`, those
    suppressions are lifted and every one is replayed. One answer per open dead letter, in
    id order."""
    now = timezone.now()
    with transaction.atomic():
        chosen = sorted(
            letters.filter(status=DeadLetterStatus.OPEN)
            .select_for_update()
            .values_list("pk", "delivery_id")
        )
        if not chosen:
            return []
        in_the_way = _suppressions_in_the_way([delivery_id for _, delivery_id in chosen])
        if lift_suppression:
            suppressions_delete(suppressions=list({s.pk: s for s in in_the_way.values()}.values()))
        go = [(pk, d) for pk, d in chosen if lift_suppression or d not in in_the_way]
        if go:
            DeadLetter.objects.filter(pk__in=[pk for pk, _ in go]).update(
                status=DeadLetterStatus.REPLAYED, resolved_at=now
            )
            deliveries_replay(delivery_ids=[delivery_id for _, delivery_id in go], now=now)
    return [
        DeadLetterReplay(
            dead_letter_id=pk,
            replayed=lift_suppression or delivery_id not in in_the_way,
            suppression=in_the_way.get(delivery_id),
        )
        for pk, delivery_id in chosen
    ]


def _suppressions_in_the_way(delivery_ids: list[int]) -> dict[int, Suppression]:
    """delivery id → the suppression that would make the worker skip it (workers.services
    checks the same address, owner and priority when it sends)."""
    deliveries = list(
        Delivery.objects.filter(pk__in=delivery_ids).values_list(
            "pk", "channel", "address", "notification__owner_id", "notification__priority"
        )
    )
    found = suppressions_matching(
        (owner_id, channel, address) for _, channel, address, owner_id, _ in deliveries
    )
    in_the_way = {}
    for pk, channel, address, owner_id, priority in deliveries:
        normal = address_normalize(channel=channel, address=address)
        suppression = found.get((owner_id, channel, normal))
        if suppression is not None and suppression_binds(
            reason=suppression.reason, priority=priority
        ):
            in_the_way[pk] = suppression
    return in_the_way


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
