"""The Delivery lifecycle on the worker's side, as named transitions: claim a batch, then settle
each claimed delivery as sent, retrying, deferred or dead, all in one transaction that also
writes the attempts and the status events. Every state change here writes its status event;
nothing else in workers/ updates a delivery's status."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Case, DateTimeField, F, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from notifications import cache as keys
from notifications.models import Delivery, DeliveryStatus, Device
from workers.dead_letters import dead_letter_create
from workers.delivery_log import AttemptRecord, delivery_status_events, get_delivery_log
from workers.dispatch import outbox_wake_on_commit
from workers.providers import SendResult


class Settle(enum.StrEnum):
    SENT = "sent"
    RETRY = "retry"
    DEFER = "deferred"  # back to the outbox for later; the attempt is not spent
    DEAD = "dead"


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


def deliveries_claim(*, delivery_ids: list[int]) -> list[Delivery]:
    """Lease every delivery of the list that is pending, due and held by nobody, under one
    lease token, and count the attempt now (a worker that dies mid-send has spent it). The
    others (final, leased elsewhere, not due) drop out. Returns the claimed rows, oldest
    first, with their notification and recipient."""
    if not delivery_ids:
        return []
    now = timezone.now()
    token = uuid.uuid4()
    claimed = (
        Delivery.objects.filter(pk__in=delivery_ids)
        .claimable(now)
        .update(
            lease_token=token,
            lease_expires_at=now + timedelta(seconds=settings.DELIVERY_LEASE_SECONDS),
            attempts=F("attempts") + 1,
            updated_at=now,
        )
    )
    if not claimed:
        return []
    return list(
        Delivery.objects.filter(pk__in=delivery_ids, lease_token=token)
        .select_related("notification", "notification__recipient")
        .order_by("id")
    )


def _attempt_record(
    settlement: Settlement, *, started_at: datetime, latency_ms: float
) -> AttemptRecord:
    delivery, result = settlement.delivery, settlement.result
    return AttemptRecord(
        delivery_id=delivery.pk,
        notification_id=str(delivery.notification_id),
        owner_id=delivery.notification.owner_id,
        recipient_id=delivery.notification.recipient.external_id,
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
    settlements: list[Settlement], *, started_at: datetime, latency_ms: float = 0.0
) -> list[Settlement]:
    """Write what became of a claimed batch in one transaction: the attempts made, each
    delivery's new state and its status event, dead letters. Only rows still under their
    lease change; returns the settlements that took effect (an in-app delivery the browser
    acknowledged meanwhile keeps `delivered`/`read` and only gets its provider filled in)."""
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
            for s in settlements
            if s.record_attempt
        ]
        if attempts:
            get_delivery_log().record_attempts(attempts)
        for settlement in settlements:
            if settlement.result.invalid_tokens:
                _devices_deactivate(settlement.delivery, settlement.result.invalid_tokens)
        applied += _settle_sent(by_kind[Settle.SENT], now)
        applied += _settle_deferred(by_kind[Settle.DEFER], now)
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
        get_delivery_log().record_statuses(
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
                *[When(pk=pk, then=Value(now + timedelta(seconds=by_id[pk].delay))) for pk in ours],
                output_field=DateTimeField(),
            ),
            enqueued_at=None,
            updated_at=now,
        )
    return [by_id[pk] for pk in ours]


def _settle_retry(settlement: Settlement, now: datetime) -> bool:
    delivery = settlement.delivery
    changed = Delivery.objects.filter(pk=delivery.pk, lease_token=delivery.lease_token).update(
        status=DeliveryStatus.RETRYING,
        next_attempt_at=now + timedelta(seconds=settlement.delay),
        enqueued_at=None,
        last_error=settlement.result.error,
        lease_token=None,
        lease_expires_at=None,
        updated_at=now,
        **({"provider": settlement.provider} if settlement.provider else {}),
    )
    if changed:
        get_delivery_log().record_statuses(
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
        get_delivery_log().record_statuses(
            delivery_status_events([delivery], DeliveryStatus.DEAD, detail=settlement.result.error)
        )
    return bool(changed)


def _devices_deactivate(delivery: Delivery, tokens: tuple[str, ...]) -> None:
    recipient_id = delivery.notification.recipient_id
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
