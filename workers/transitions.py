"""The Delivery lifecycle as named transitions. Published: marked and handed to the broker
(the relay's round, the fan-out's chunks). The worker's side: claim a batch, then settle each
claimed delivery as sent, retrying, deferred or dead, all in one transaction that also writes
the attempts and the status events. Around it: back to the outbox (lost messages), released
when due (scheduled), digested into a new notification (workers/digests.py), replayed from a
dead letter, cancelled (by the API and the admin, an escalation no longer needed, a digest
that cannot be rendered), and the inbox's delivered, read and archived. Every status change
here writes its status event; nothing else updates a delivery's status. A delivery is
created, with its first status, by notifications.accepting.notifications_write (single sends,
bulk, the fan-out's children) or by deliveries_digest."""

from __future__ import annotations

import enum
import uuid
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, DateTimeField, Exists, F, OuterRef, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from core import cache as keys
from core.db_clock import db_now, db_now_plus
from core.outbox import outbox_wake_on_commit
from notifications.delivery_log import (
    AttemptRecord,
    StatusEvent,
    delivery_status_events,
    get_delivery_log,
)
from notifications.fanout import topic_fanouts_stop
from notifications.models import (
    CHANNEL_ORDER,
    FINAL_STATUSES,
    INBOX_STATUSES,
    OUTBOX_STATUSES,
    UNACKNOWLEDGED_STATUSES,
    UNREAD_STATUSES,
    Channel,
    Delivery,
    DeliveryStatus,
    Device,
    InboxCounter,
    Notification,
    Owner,
    ProviderEventKind,
    SkipReason,
)
from notifications.webhooks import webhook_events_emit
from workers import dispatch
from workers.models import DeadLetter
from workers.providers import SendResult


class Settle(enum.StrEnum):
    SENT = "sent"
    RETRY = "retry"
    DEFER = "deferred"  # back to the outbox for later; the attempt is not spent
    DEAD = "dead"
    SKIP = "skipped"  # not sent and never will be (the address is suppressed)


@dataclass
class Settlement:
    """What became of one claimed delivery."""

    delivery: Delivery
    kind: Settle
    result: SendResult
    provider: str = ""
    # Seconds until it is due again (RETRY, DEFER).
    delay: float = 0.0
    # False when no provider call was made (breaker open, no token, worker lost).
    record_attempt: bool = True


def _statuses_record(
    events: list[StatusEvent], *, completing: Collection[str] | None = None
) -> None:
    """Every status change goes to the delivery log, and becomes the status webhooks the
    owner's endpoints asked for (with a completion check for a final status), in the
    caller's transaction. `completing`: the only notifications these changes may have
    completed, when the caller knows some of its deliveries were final already."""
    get_delivery_log().record_statuses(events)
    webhook_events_emit(events, completing=completing)


def deliveries_publish(delivery_ids: list[int]) -> dict[str, list[int]]:
    """Mark published those of these outbox rows no one has published yet, and publish them,
    in the caller's transaction: should the publish fail, the rollback puts them back in the
    outbox; a row another relay published meanwhile is not published twice. The mark is the
    database's time: the sweeper compares it with that clock (core/db_clock.py). Returns the
    ids published, by channel."""
    if not delivery_ids:
        return {}
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {connection.ops.quote_name(Delivery._meta.db_table)} "  # noqa: S608
                # STATEMENT_TIMESTAMP(): what Now() is on PostgreSQL.
                "SET enqueued_at = STATEMENT_TIMESTAMP() "
                "WHERE id = ANY(%s) AND enqueued_at IS NULL RETURNING id, channel",
                [delivery_ids],
            )
            marked = cursor.fetchall()
    else:
        rows = Delivery.objects.filter(pk__in=delivery_ids, enqueued_at__isnull=True)
        marked = list(rows.select_for_update().values_list("pk", "channel"))
        Delivery.objects.filter(pk__in=[pk for pk, _ in marked]).update(enqueued_at=db_now())
    by_channel: dict[str, list[int]] = defaultdict(list)
    for pk, channel in sorted(marked):
        by_channel[channel].append(pk)
    dispatch.batches_publish_rollback_unsafe(by_channel)
    return by_channel


def deliveries_claim(*, delivery_ids: list[int]) -> list[Delivery]:
    """Lease every delivery of the list that is pending, due and held by nobody, under one
    lease token, and count the attempt now (a worker that dies mid-send has spent it). The
    others (final, leased elsewhere, not due) drop out. Returns the claimed rows, oldest
    first, with their notification and recipient."""
    if not delivery_ids:
        return []
    token = uuid.uuid4()
    # Due, unleased and the lease's end all by the database's clock: a worker whose own clock
    # runs ahead would otherwise take leases still held and send retries early; one behind
    # would write a lease that has already run out for the others.
    claimed = (
        Delivery.objects.filter(pk__in=delivery_ids)
        .claimable()
        .update(
            lease_token=token,
            lease_expires_at=db_now_plus(settings.DELIVERY_LEASE_SECONDS),
            attempts=F("attempts") + 1,
            updated_at=db_now(),
        )
    )
    if not claimed:
        return []
    deliveries = list(
        Delivery.objects.filter(pk__in=delivery_ids, lease_token=token)
        .select_related("notification", "notification__recipient")
        .order_by("id")
    )
    inbox_positions_give(
        [d for d in deliveries if d.channel == Channel.WEB and d.inbox_position is None]
    )
    return deliveries


def inbox_positions_give(deliveries: list[Delivery]) -> None:
    """Give these leased in-app deliveries their recipients' next inbox positions, in id
    order per recipient, before they are pushed (the frame carries its position): each
    recipient's InboxCounter row is counted up and locked until the positions are written,
    so positions are dense and commit in order per recipient (see InboxCounter). A delivery
    keeps its position through retries."""
    # An in-app delivery's notification has its recipient (a topic's own has none, and no
    # in-app delivery either).
    runs = [
        (delivery, recipient_id)
        for delivery in deliveries
        if (recipient_id := delivery.notification.recipient_id) is not None
    ]
    if not runs:
        return
    wanted: dict[int, int] = {}
    for _, recipient_id in runs:
        wanted[recipient_id] = wanted.get(recipient_id, 0) + 1
    table = connection.ops.quote_name(InboxCounter._meta.db_table)
    # Rows in recipient id order: two pushes of overlapping recipients lock them in the same
    # order and cannot deadlock.
    rows = sorted(wanted.items())
    with transaction.atomic(), connection.cursor() as cursor:
        values = ", ".join(["(%s, %s)"] * len(rows))
        cursor.execute(
            f"INSERT INTO {table} (recipient_id, position) VALUES {values} "  # noqa: S608 - names
            f"ON CONFLICT (recipient_id) DO UPDATE SET position = {table}.position"
            " + excluded.position RETURNING recipient_id, position",
            [value for row in rows for value in row],
        )
        # The first position of each recipient's run.
        nexts = {recipient_id: top - wanted[recipient_id] + 1 for recipient_id, top in cursor}
        for delivery, recipient_id in runs:
            delivery.inbox_position = nexts[recipient_id]
            nexts[recipient_id] += 1
        Delivery.objects.bulk_update([delivery for delivery, _ in runs], ["inbox_position"])


def _attempt_record(
    settlement: Settlement, *, started_at: datetime, latency_ms: float
) -> AttemptRecord:
    delivery, result = settlement.delivery, settlement.result
    return AttemptRecord(
        delivery_id=delivery.pk,
        notification_id=str(delivery.notification_id),
        owner_id=delivery.notification.owner_id,
        recipient_id=delivery.notification.addressee.external_id,
        channel=delivery.channel,
        number=delivery.attempts,
        provider=settlement.provider or "-",
        outcome=result.outcome.value,
        status_code=result.status_code,
        provider_message_id=result.provider_message_id,
        error=result.error,
        started_at=started_at,
        latency_ms=latency_ms,
    )


def deliveries_settle(
    settlements: list[Settlement],
    *,
    started_at: datetime,
    latency_ms: float = 0.0,
    failed_over: list[Settlement] | None = None,
) -> list[Settlement]:
    """Write what became of a claimed batch in one transaction: the attempts made (those
    that failed over to the next provider, `failed_over`, too), each delivery's new state
    and its status event, dead letters. Only rows still under their lease change; returns
    the settlements that took effect (an in-app delivery the browser acknowledged meanwhile
    keeps `delivered`/`read` and only gets its provider filled in).

    Due times (retries, deferrals) are written on the database's clock; `now`, this
    process's clock, only stamps what is informational (sent_at, updated_at)."""
    if not settlements:
        return []
    now = timezone.now()
    applied: list[Settlement] = []
    by_kind: dict[Settle, list[Settlement]] = {kind: [] for kind in Settle}
    for settlement in settlements:
        by_kind[settlement.kind].append(settlement)
    with transaction.atomic():
        attempts = [
            _attempt_record(s, started_at=started_at, latency_ms=latency_ms)
            for s in [*(failed_over or []), *settlements]
            if s.record_attempt
        ]
        if attempts:
            get_delivery_log().record_attempts(attempts)
        for settlement in settlements:
            if settlement.result.invalid_tokens:
                _devices_deactivate(settlement.delivery, settlement.result.invalid_tokens)
            if settlement.result.suppress:
                _address_suppress(settlement)
        by_provider: dict[str, list[Settlement]] = {}
        for settlement in by_kind[Settle.SENT]:
            by_provider.setdefault(settlement.provider, []).append(settlement)
        for sent in by_provider.values():
            applied += _settle_sent(sent, now)
        applied += _settle_deferred(by_kind[Settle.DEFER], now)
        applied += _settle_skipped(by_kind[Settle.SKIP], now)
        for settlement in by_kind[Settle.RETRY]:
            if _settle_retry(settlement, now):
                applied.append(settlement)
        for settlement in by_kind[Settle.DEAD]:
            if _settle_dead(settlement, now):
                applied.append(settlement)
        if by_kind[Settle.RETRY] or by_kind[Settle.DEFER]:
            # The relay recomputes when the next row falls due.
            outbox_wake_on_commit()
    return applied


def _ours(settlements: list[Settlement]) -> tuple[list[int], dict[int, Settlement]]:
    by_id = {s.delivery.pk: s for s in settlements}
    tokens = {s.delivery.lease_token for s in settlements}
    locked = list(
        Delivery.objects.filter(pk__in=list(by_id), lease_token__in=tokens)
        .select_for_update()
        .values_list("pk", "lease_token")
    )
    ours = [pk for pk, token in locked if by_id[pk].delivery.lease_token == token]
    return ours, by_id


def _settle_sent(settlements: list[Settlement], now: datetime) -> list[Settlement]:
    if not settlements:
        return []
    ours, by_id = _ours(settlements)
    if ours:
        message_ids = {
            pk: by_id[pk].result.provider_message_id
            for pk in ours
            if by_id[pk].result.provider_message_id
        }
        changes: dict[str, object] = {
            "status": DeliveryStatus.SENT,
            "provider": settlements[0].provider,
            "sent_at": now,
            "next_attempt_at": None,
            "last_error": "",
            "lease_token": None,
            "lease_expires_at": None,
            "updated_at": now,
        }
        if message_ids:
            changes["provider_message_id"] = Case(
                *[When(pk=pk, then=Value(mid)) for pk, mid in message_ids.items()],
                default=Value(""),
            )
        else:
            changes["provider_message_id"] = ""
        Delivery.objects.filter(pk__in=ours).update(**changes)
        _statuses_record(
            delivery_status_events(
                (by_id[pk].delivery for pk in ours),
                DeliveryStatus.SENT,
                detail=settlements[0].provider,
            )
        )
    acked = [pk for pk in by_id if pk not in set(ours)]
    for pk in acked:
        # The browser acknowledged the in-app frame before this write (its ack released the
        # lease): keep `delivered`/`read`, only fill in how it was sent.
        settlement = by_id[pk]
        Delivery.objects.filter(
            pk=pk, status__in=(DeliveryStatus.DELIVERED, DeliveryStatus.READ), provider=""
        ).update(
            provider=settlement.provider,
            provider_message_id=settlement.result.provider_message_id,
            sent_at=Coalesce("sent_at", Value(now, output_field=DateTimeField())),
            attempts=settlement.delivery.attempts,
        )
    return [by_id[pk] for pk in ours]


def _settle_deferred(settlements: list[Settlement], now: datetime) -> list[Settlement]:
    """Back to the outbox, due after each one's delay, without spending the attempt."""
    if not settlements:
        return []
    ours, by_id = _ours(settlements)
    if ours:
        Delivery.objects.filter(pk__in=ours).update(
            lease_token=None,
            lease_expires_at=None,
            attempts=F("attempts") - 1,
            next_attempt_at=Case(
                *[When(pk=pk, then=db_now_plus(by_id[pk].delay)) for pk in ours],
                output_field=DateTimeField(),
            ),
            enqueued_at=None,
            updated_at=now,
        )
    return [by_id[pk] for pk in ours]


def _settle_skipped(settlements: list[Settlement], now: datetime) -> list[Settlement]:
    """`skipped` with reason `suppressed`: the address went on the suppression list after the
    delivery was accepted. No attempt is spent (no provider call was made)."""
    if not settlements:
        return []
    ours, by_id = _ours(settlements)
    if ours:
        Delivery.objects.filter(pk__in=ours).update(
            status=DeliveryStatus.SKIPPED,
            skip_reason=SkipReason.SUPPRESSED,
            attempts=F("attempts") - 1,
            next_attempt_at=None,
            lease_token=None,
            lease_expires_at=None,
            updated_at=now,
        )
        _statuses_record(
            [
                event
                for pk in ours
                for event in delivery_status_events(
                    [by_id[pk].delivery], DeliveryStatus.SKIPPED, detail=by_id[pk].result.error
                )
            ]
        )
    return [by_id[pk] for pk in ours]


def _address_suppress(settlement: Settlement) -> None:
    """The provider refused the address for good (hard bounce, STOP): suppress it."""
    from notifications.suppressions import suppression_add

    delivery = settlement.delivery
    suppression_add(
        owner_id=delivery.notification.owner_id,
        channel=delivery.channel,
        address=delivery.address,
        reason=settlement.result.suppress,
        source=settlement.provider or "-",
        detail=settlement.result.error,
        delivery_id=delivery.pk,
    )


def _settle_retry(settlement: Settlement, now: datetime) -> bool:
    delivery = settlement.delivery
    changed = Delivery.objects.filter(pk=delivery.pk, lease_token=delivery.lease_token).update(
        status=DeliveryStatus.RETRYING,
        next_attempt_at=db_now_plus(settlement.delay),
        enqueued_at=None,
        last_error=settlement.result.error,
        lease_token=None,
        lease_expires_at=None,
        updated_at=now,
        **({"provider": settlement.provider} if settlement.provider else {}),
    )
    if changed:
        _statuses_record(
            delivery_status_events(
                [delivery], DeliveryStatus.RETRYING, detail=settlement.result.error
            )
        )
    return bool(changed)


def _settle_dead(settlement: Settlement, now: datetime) -> bool:
    delivery = settlement.delivery
    if not settlement.record_attempt:
        # No call was made on this claim (the worker was lost on every attempt before):
        # the attempt counted at claim time was not one.
        delivery.attempts -= 1
    changed = Delivery.objects.filter(pk=delivery.pk, lease_token=delivery.lease_token).update(
        status=DeliveryStatus.DEAD,
        next_attempt_at=None,
        last_error=settlement.result.error,
        attempts=delivery.attempts,
        lease_token=None,
        lease_expires_at=None,
        updated_at=now,
        **({"provider": settlement.provider} if settlement.provider else {}),
    )
    if changed:
        dead_letter_create(
            delivery=delivery, provider=settlement.provider, error=settlement.result.error
        )
        _statuses_record(
            delivery_status_events([delivery], DeliveryStatus.DEAD, detail=settlement.result.error)
        )
    return bool(changed)


def _devices_deactivate(delivery: Delivery, tokens: tuple[str, ...]) -> None:
    recipient_id = delivery.notification.addressee_id
    Device.objects.filter(recipient_id=recipient_id, token__in=tokens).update(active=False)
    keys.invalidate_on_commit(keys.devices_key(recipient_id))


def deliveries_return_to_outbox(*, delivery_ids: list[int]) -> int:
    """Pending deliveries whose message was lost go back to the outbox for the relay."""
    if not delivery_ids:
        return 0
    with transaction.atomic():
        returned = Delivery.objects.filter(
            pk__in=delivery_ids, status__in=(DeliveryStatus.QUEUED, DeliveryStatus.RETRYING)
        ).update(enqueued_at=None)
        if returned:
            outbox_wake_on_commit()
    return returned


# --- Dead letters ---------------------------------------------------------------------------


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
            "to": delivery.address or notification.addressee.external_id,
            "content": delivery.content,
        },
    )


def deliveries_replay(*, delivery_ids: list[int], now: datetime) -> list[Delivery]:
    """Dead deliveries start again from scratch: `queued` with no attempt spent, back in the
    outbox for the relay (the caller closes their dead letters in the same transaction)."""
    Delivery.objects.filter(pk__in=delivery_ids, status=DeliveryStatus.DEAD).update(
        status=DeliveryStatus.QUEUED,
        attempts=0,
        last_error="",
        next_attempt_at=None,
        enqueued_at=None,
        lease_token=None,
        lease_expires_at=None,
        updated_at=now,
    )
    deliveries = list(
        Delivery.objects.filter(pk__in=delivery_ids, status=DeliveryStatus.QUEUED).select_related(
            "notification__recipient"
        )
    )
    _statuses_record(delivery_status_events(deliveries, DeliveryStatus.QUEUED, detail="replayed"))
    if deliveries:
        outbox_wake_on_commit()
    return deliveries


# --- Scheduled deliveries -------------------------------------------------------------------


def deliveries_release_due(*, delivery_ids: list[int], now: datetime) -> set[int]:
    """Scheduled deliveries whose time has come become `queued` (and say so in the log), as
    the relay publishes them in the same transaction, which holds their rows locked. An
    escalation step whose condition was met meanwhile (another delivery of the notification
    read, or delivered) is cancelled instead; returns the ids cancelled so, not to publish.
    Which rows are due the relay judged on the database's clock; `now` only stamps
    updated_at."""
    if not delivery_ids:
        return set()
    steps = list(
        Delivery.objects.filter(pk__in=delivery_ids)
        .exclude(escalate_unless="")
        .values_list("pk", "notification_id", "escalate_unless")
    )
    not_needed: dict[int, str] = {}
    if steps:
        reached = _escalation_conditions_met({nid for _, nid, _ in steps})
        for pk, nid, unless in steps:
            channel = reached.get((nid, unless))
            if channel is not None:
                not_needed[pk] = f"escalation not needed: {channel} {unless} in time"
    if not_needed:
        deliveries_cancel_locked(
            list(
                Delivery.objects.filter(pk__in=list(not_needed)).select_related(
                    "notification__recipient"
                )
            ),
            now,
            detail=not_needed,
        )
    released_ids = [pk for pk in delivery_ids if pk not in not_needed]
    if released_ids:
        Delivery.objects.filter(pk__in=released_ids).update(
            status=DeliveryStatus.QUEUED, skip_reason="", next_attempt_at=None, updated_at=now
        )
        released = Delivery.objects.filter(pk__in=released_ids).select_related(
            "notification__recipient"
        )
        _statuses_record(
            delivery_status_events(list(released), DeliveryStatus.QUEUED, detail="due")
        )
    return set(not_needed)


def _escalation_conditions_met(notification_ids: set[Any]) -> dict[tuple[Any, str], str]:
    """(notification id, "read" | "delivered") → a channel whose delivery got there."""
    met: dict[tuple[Any, str], str] = {}
    rows = (
        Delivery.objects.filter(
            notification_id__in=notification_ids,
            escalate_unless="",
            status__in=(DeliveryStatus.DELIVERED, DeliveryStatus.READ),
        )
        .values_list("notification_id", "channel", "status")
        .order_by("notification_id", "channel")
    )
    for nid, channel, status in rows:
        met.setdefault((nid, "delivered"), channel)
        if status == DeliveryStatus.READ:
            met.setdefault((nid, "read"), channel)
    return met


def deliveries_cancel_locked(
    rows: list[Delivery], now: datetime, *, detail: str | dict[int, str]
) -> None:
    """Cancel rows the caller holds locked (loaded with notification__recipient), with one
    status event each; `detail` is one text for all, or one per delivery id."""
    Delivery.objects.filter(pk__in=[d.pk for d in rows]).update(
        status=DeliveryStatus.CANCELLED, next_attempt_at=None, updated_at=now
    )
    if isinstance(detail, str):
        events = delivery_status_events(rows, DeliveryStatus.CANCELLED, detail=detail)
    else:
        events = [
            event
            for row in rows
            for event in delivery_status_events(
                [row], DeliveryStatus.CANCELLED, detail=detail[row.pk]
            )
        ]
    _statuses_record(events)


# The `unless` conditions a delivered or read web delivery meets.
ESCALATION_CONDITIONS: dict[str, tuple[str, ...]] = {
    DeliveryStatus.READ: ("read", "delivered"),
    DeliveryStatus.DELIVERED: ("delivered",),
}


def escalations_cancel(*, notification_ids: list[Any], reached: str, channel: str) -> int:
    """A delivery of these notifications was read (or delivered) before their escalation
    deadlines: cancel the escalation steps waiting on that. Called inside the transaction
    that records the read. A step the relay has already locked and released is past its
    deadline and goes out."""
    conditions = ESCALATION_CONDITIONS[reached]
    with transaction.atomic():
        waiting = list(
            Delivery.objects.filter(
                notification_id__in=notification_ids,
                escalate_unless__in=conditions,
                status=DeliveryStatus.SCHEDULED,
            )
            .select_for_update(skip_locked=True, of=("self",))
            .select_related("notification__recipient")
        )
        if not waiting:
            return 0
        why = {
            d.pk: f"escalation not needed: {channel} {d.escalate_unless} in time" for d in waiting
        }
        deliveries_cancel_locked(waiting, timezone.now(), detail=why)
    return len(waiting)


# --- Digests (workers/digests.py) -----------------------------------------------------------


def deliveries_digest(
    *,
    members: list[Delivery],
    data: dict[str, Any],
    rendered: dict[str, dict[str, str]],
    now: datetime,
) -> list[Delivery]:
    """Digest members (held locked, oldest first, loaded with notification__recipient) become
    ONE notification, the newest member's in all but its data, with one queued delivery per
    channel holding `rendered[channel]`; the members become `skipped` (`digested`), each
    with an event naming the digest. Returns the new deliveries, to be published."""
    newest = members[-1].notification
    addresses = {member.channel: member.address for member in members}  # the newest's
    digest = Notification.objects.create(
        owner_id=newest.owner_id,
        recipient_id=newest.recipient_id,
        template_id=newest.template_id,
        template_key=newest.template_key,
        category=newest.category,
        priority=newest.priority,
        locale=newest.locale,
        data=data,
    )
    created = Delivery.objects.bulk_create(
        [
            Delivery(
                notification=digest,
                channel=channel,
                status=DeliveryStatus.QUEUED,
                address=addresses[channel],
                content=rendered[channel],
            )
            for channel in CHANNEL_ORDER
            if channel in addresses
        ]
    )
    digest.recipient = newest.recipient
    for delivery in created:
        delivery.notification = digest
    Delivery.objects.filter(pk__in=[m.pk for m in members]).update(
        status=DeliveryStatus.SKIPPED,
        skip_reason=SkipReason.DIGESTED,
        next_attempt_at=None,
        updated_at=now,
    )
    count = len({m.notification_id for m in members})
    _statuses_record(
        [
            *delivery_status_events(
                created, DeliveryStatus.QUEUED, detail=f"digest of {count} notifications"
            ),
            *delivery_status_events(
                members, DeliveryStatus.SKIPPED, detail=f"digested into {digest.pk}"
            ),
        ]
    )
    return created


# --- What providers report after sending (workers/provider_events.py) -----------------------

# How far a sent delivery has got: a provider's report moves it only forward, so a late
# `delivered` does not undo a bounce (an asynchronous bounce after `delivered` does win).
_PROVIDER_RANK: dict[str, int] = {
    DeliveryStatus.SENT: 1,
    DeliveryStatus.DELIVERED: 2,
    DeliveryStatus.READ: 3,
    DeliveryStatus.BOUNCED: 4,
    DeliveryStatus.FAILED: 4,
}
_STATUS_OF_EVENT = {
    ProviderEventKind.DELIVERED: DeliveryStatus.DELIVERED,
    ProviderEventKind.BOUNCED: DeliveryStatus.BOUNCED,
    ProviderEventKind.FAILED: DeliveryStatus.FAILED,
}


def delivery_provider_event(*, delivery: Delivery, kind: str, detail: str, at: datetime) -> str:
    """Record what the provider said of a delivery it accepted (the caller holds its row
    locked; loaded with notification__recipient): always an event in the delivery log, with
    the provider's words in its detail; the status too when the report moves it forward.
    Returns what it did."""
    now = timezone.now()
    status = _STATUS_OF_EVENT.get(ProviderEventKind(kind))
    current = delivery.status
    moves = status is not None and _PROVIDER_RANK.get(status, 0) > _PROVIDER_RANK.get(current, 99)
    if status is not None and moves:
        changes: dict[str, Any] = {"status": status, "updated_at": now}
        if status == DeliveryStatus.DELIVERED:
            changes["delivered_at"] = at
        Delivery.objects.filter(pk=delivery.pk).update(**changes)
        # A report moves a delivery that was final already (sent at least): its notification
        # was complete, or waits for another delivery, before; it completes nothing.
        _statuses_record(delivery_status_events([delivery], status, detail=detail), completing=())
        if status == DeliveryStatus.DELIVERED:
            escalations_cancel(
                notification_ids=[delivery.notification_id],
                reached=DeliveryStatus.DELIVERED,
                channel=delivery.channel,
            )
        return f"{current} -> {status}"
    if status is not None:
        detail = f"{detail} (late: the delivery stays {current})"
    _statuses_record(delivery_status_events([delivery], kind, detail=detail), completing=())
    return f"{kind} recorded, stays {current}"


# --- The in-app inbox -----------------------------------------------------------------------


def deliveries_inbox_advance(
    *,
    recipient_id: int,
    notification_id: uuid.UUID | None,
    from_statuses: tuple[str, ...],
    to_status: str,
    source: str,
) -> int:
    """Move the recipient's web deliveries (one, or all when notification_id is None) from
    `from_statuses` to delivered or read, record each change in the delivery log, and return
    how many changed. Repeating it changes nothing (idempotent)."""
    wanted = Delivery.objects.filter(
        channel=Channel.WEB, notification__recipient_id=recipient_id, status__in=from_statuses
    )
    if notification_id is not None:
        wanted = wanted.filter(notification_id=notification_id)
    return _inbox_advance(wanted, from_statuses, to_status, source, owned=None)


def deliveries_inbox_advance_many(
    *,
    entries: Collection[tuple[int, uuid.UUID]],
    from_statuses: tuple[str, ...],
    to_status: str,
    source: str,
) -> int:
    """deliveries_inbox_advance for many (recipient_id, notification_id) pairs at once (the
    acks or reads a server process gathered): one locking SELECT, one UPDATE, one insert of
    events. A pair whose notification is not that recipient's changes nothing."""
    owned = {(int(r), uuid.UUID(str(n))) for r, n in entries}
    if not owned:
        return 0
    wanted = Delivery.objects.filter(
        channel=Channel.WEB,
        notification_id__in=sorted({n for _, n in owned}),
        notification__recipient_id__in=sorted({r for r, _ in owned}),
        status__in=from_statuses,
    )
    return _inbox_advance(wanted, from_statuses, to_status, source, owned=owned)


def _inbox_advance(
    wanted: Any,
    from_statuses: tuple[str, ...],
    to_status: str,
    source: str,
    *,
    owned: set[tuple[int, uuid.UUID]] | None,
) -> int:
    now = timezone.now()
    at = Value(now, output_field=DateTimeField())
    changes: dict[str, Any] = {
        "status": to_status,
        "updated_at": now,
        # A browser can ack a frame before the worker that pushed it has marked it sent.
        # Dropping the worker's lease makes its late "sent" write match nothing, so the
        # delivery never moves back from delivered/read; and a delivery a browser already
        # has is never pushed again.
        "lease_token": None,
        "lease_expires_at": None,
        "next_attempt_at": None,
        "sent_at": Coalesce(F("sent_at"), at),
    }
    if to_status == DeliveryStatus.DELIVERED:
        changes["delivered_at"] = now
    else:
        changes["delivered_at"] = Coalesce(F("delivered_at"), at)
        changes["read_at"] = now
    conditions = ESCALATION_CONDITIONS[to_status]
    with transaction.atomic():
        deliveries = list(
            wanted.select_related("notification__recipient")
            .annotate(
                # Whether the notification has an escalation step this change can cancel.
                escalating=Exists(
                    Delivery.objects.filter(
                        notification_id=OuterRef("notification_id"),
                        escalate_unless__in=conditions,
                        status=DeliveryStatus.SCHEDULED,
                    )
                )
            )
            .select_for_update(of=("self",))
            .order_by("pk")
        )
        if owned is not None:
            # Scoped to each socket's recipient: an id of someone else's notification is left.
            deliveries = [
                d for d in deliveries if (d.notification.recipient_id, d.notification_id) in owned
            ]
        if not deliveries:
            return 0
        Delivery.objects.filter(pk__in=[d.pk for d in deliveries], status__in=from_statuses).update(
            **changes
        )
        # Only a delivery that was not final yet (queued, retrying) can complete its
        # notification; a sent one moving on to delivered or read was final before.
        _statuses_record(
            delivery_status_events(deliveries, to_status, detail=source),
            completing={
                str(d.notification_id) for d in deliveries if d.status not in FINAL_STATUSES
            },
        )
        # The lookup that locks the steps runs only where there is a step to cancel.
        escalating = sorted({d.notification_id for d in deliveries if d.escalating})
        if escalating:
            escalations_cancel(notification_ids=escalating, reached=to_status, channel=Channel.WEB)
    return len(deliveries)


def deliveries_inbox_archive(*, recipient_id: int, notification_id: uuid.UUID) -> bool:
    """Hide a recipient's inbox entry (it stays readable under ?archived=true); idempotent."""
    now = timezone.now()
    changed = Delivery.objects.filter(
        channel=Channel.WEB,
        notification__recipient_id=recipient_id,
        notification_id=notification_id,
        status__in=INBOX_STATUSES,
        archived_at__isnull=True,
    ).update(archived_at=now, updated_at=now)
    return changed > 0


# --- Cancel ---------------------------------------------------------------------------------


def deliveries_cancel(*, notification_ids: list[uuid.UUID], detail: str) -> set[int]:
    """Cancel every delivery of these notifications that no provider has been handed yet:
    scheduled, queued or retrying (deferred ones are queued or retrying with a later due
    time), and held by no worker. Returns the ids it cancelled.

    A worker's lease is the line. A leased delivery goes on to its provider and is not
    cancelled; a cancelled one is never claimed, since a claim takes pending rows only, and
    never published, since the outbox holds pending and scheduled rows only. The rows are
    locked first: a claim running at the same time either commits before (the row is leased
    and left alone) or waits and then finds it cancelled. Sent or cancelled, never both."""
    now = timezone.now()
    with transaction.atomic():
        rows = list(
            Delivery.objects.filter(
                notification_id__in=notification_ids,
                status__in=OUTBOX_STATUSES,
                lease_token__isnull=True,
            )
            .select_for_update(of=("self",))
            .select_related("notification__recipient")
            .order_by("pk")
        )
        if not rows:
            return set()
        deliveries_cancel_locked(rows, now, detail=detail)
    return {d.pk for d in rows}


# --- In-app inbox ---------------------------------------------------------------------------


def inbox_acknowledge(*, recipient_id: int, notification_id: uuid.UUID, source: str) -> bool:
    """A browser received the notification (WebSocket ack): `delivered`. Only the
    recipient's own web delivery moves; an id of anyone else's does nothing."""
    changed = deliveries_inbox_advance(
        recipient_id=recipient_id,
        notification_id=notification_id,
        from_statuses=UNACKNOWLEDGED_STATUSES,
        to_status=DeliveryStatus.DELIVERED,
        source=source,
    )
    return changed > 0


def inbox_mark_read(*, recipient_id: int, notification_id: uuid.UUID, source: str) -> bool:
    changed = deliveries_inbox_advance(
        recipient_id=recipient_id,
        notification_id=notification_id,
        from_statuses=UNREAD_STATUSES,
        to_status=DeliveryStatus.READ,
        source=source,
    )
    return changed > 0


def inbox_record(
    *,
    acks: Collection[tuple[int, uuid.UUID]],
    reads: Collection[tuple[int, uuid.UUID]],
    source: str,
) -> tuple[int, int]:
    """Acks and reads of many sockets, as (recipient_id, notification_id) pairs, written
    together: acks first, so a frame read at once is delivered, then read. Each pair moves
    only its recipient's own web delivery. Returns how many deliveries each moved."""
    delivered = deliveries_inbox_advance_many(
        entries=acks,
        from_statuses=UNACKNOWLEDGED_STATUSES,
        to_status=DeliveryStatus.DELIVERED,
        source=source,
    )
    read = deliveries_inbox_advance_many(
        entries=reads, from_statuses=UNREAD_STATUSES, to_status=DeliveryStatus.READ, source=source
    )
    return delivered, read


def inbox_mark_all_read(*, recipient_id: int, source: str) -> int:
    return deliveries_inbox_advance(
        recipient_id=recipient_id,
        notification_id=None,
        from_statuses=UNREAD_STATUSES,
        to_status=DeliveryStatus.READ,
        source=source,
    )


def inbox_archive(*, recipient_id: int, notification_id: uuid.UUID) -> bool:
    """Hide an entry from the inbox (it stays readable under ?archived=true); idempotent."""
    return deliveries_inbox_archive(recipient_id=recipient_id, notification_id=notification_id)


# --- Cancel ---------------------------------------------------------------------------------


def notifications_cancel(
    *, owner: Owner, notifications: list[Notification], detail: str
) -> list[dict[str, Any]]:
    """Cancel what has not gone out of each of the owner's `notifications` (see
    deliveries_cancel), and say per notification which deliveries this
    call cancelled and where the others stand. Repeating it cancels nothing more."""
    ids = [n.pk for n in notifications if n.owner_id == owner.pk]
    # A topic notification: its fan-out stops, and its children written so far are cancelled.
    topic_children = _topic_fanouts_cancel(ids)
    cancelled = deliveries_cancel(
        notification_ids=list({*ids, *(c for cs in topic_children.values() for c in cs)}),
        detail=detail,
    )
    deliveries: dict[uuid.UUID, list[Delivery]] = {pk: [] for pk in ids}
    for delivery in Delivery.objects.filter(notification_id__in=ids).order_by("pk"):
        deliveries[delivery.notification_id].append(delivery)
    answers = []
    for pk in ids:
        done, left = [], []
        for delivery in deliveries[pk]:
            if delivery.pk in cancelled:
                done.append({"channel": delivery.channel, "status": delivery.status})
                continue
            entry: dict[str, Any] = {"channel": delivery.channel, "status": delivery.status}
            if delivery.lease_token is not None and delivery.status in OUTBOX_STATUSES:
                entry["reason"] = "being_sent"
            left.append(entry)
        answer: dict[str, Any] = {"id": str(pk), "cancelled": done, "not_cancelled": left}
        if pk in topic_children:
            children = set(topic_children[pk])
            answer["children_cancelled"] = Delivery.objects.filter(
                pk__in=cancelled, notification_id__in=children
            ).count()
        answers.append(answer)
    return answers


def _topic_fanouts_cancel(ids: list[uuid.UUID]) -> dict[uuid.UUID, list[uuid.UUID]]:
    """Stop the fan-out of the topic notifications among `ids`; their children, by topic
    notification."""
    topic_fanouts_stop(notification_ids=ids)
    topics = Notification.objects.filter(pk__in=ids, recipients_total__isnull=False)
    children: dict[uuid.UUID, list[uuid.UUID]] = {
        pk: [] for pk in topics.values_list("pk", flat=True)
    }
    for child, parent in Notification.objects.filter(parent_id__in=list(children)).values_list(
        "pk", "parent_id"
    ):
        children[parent].append(child)
    return children
