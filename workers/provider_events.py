"""Provider events in: what SendGrid and Twilio post about messages after accepting them. A
hook stores each event as it came (once per provider event id, so a repeated post changes
nothing) and answers at once; a maintenance task applies them to the deliveries (delivered,
bounced, failed; opened, clicked, complained as events in the delivery log) and to the
suppression list. Applying is safe out of order: a status only moves forward, and an event
that arrives before its delivery is settled waits for it."""

from __future__ import annotations

import logging
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from core.db_clock import db_now, db_now_plus
from notifications.models import (
    Channel,
    Delivery,
    DeliveryStatus,
    Recipient,
    SuppressionReason,
)
from notifications.suppressions import suppression_add, suppressions_lift
from workers.models import ProviderEvent
from workers.providers.base import ProviderEventIn
from workers.transitions import delivery_provider_event

log = logging.getLogger(__name__)

APPLY_TASK = "clarion.provider_events_apply"
# Which channel a provider's events are about.
_CHANNEL_OF = {"sendgrid": Channel.EMAIL, "twilio": Channel.SMS}
# Delivery statuses that say the worker has not settled the provider call yet: an event for
# it (Twilio can call back before our own write commits) waits.
_NOT_SETTLED = (DeliveryStatus.SCHEDULED, DeliveryStatus.QUEUED, DeliveryStatus.RETRYING)


def provider_events_store(*, events: list[ProviderEventIn]) -> None:
    """Keep the events of one post (those already kept are left as they are) and, once they
    are committed, ask a maintenance worker to apply them."""
    rows = [
        ProviderEvent(
            provider=e.provider,
            event_id=e.event_id,
            kind=e.kind,
            raw_status=e.raw_status,
            detail=e.detail,
            suppress=e.suppress,
            delivery_id=e.delivery_id,
            message_id=e.message_id,
            address=e.address,
            payload=e.payload,
            occurred_at=e.occurred_at,
        )
        for e in events
    ]
    with transaction.atomic():
        ProviderEvent.objects.bulk_create(rows, ignore_conflicts=True)
        transaction.on_commit(provider_events_apply_soon)


def provider_events_apply_soon() -> None:
    """Publish the apply task. Best effort: the beat schedule runs it every
    PROVIDER_EVENTS_INTERVAL_SECONDS, so a broker hiccup delays events, never loses them."""
    from project.celery import app as celery_app

    try:
        celery_app.send_task(APPLY_TASK, queue="maintenance", retry=False)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the schedule applies them
        log.warning(
            "could not publish %s (the schedule will apply the events): %s", APPLY_TASK, exc
        )


def provider_events_apply(*, limit: int | None = None) -> int:
    """Apply the stored events not applied yet, oldest first, in rounds of
    PROVIDER_EVENTS_BATCH_SIZE until none is due; returns how many were applied. Several
    workers may run it at once (each round locks its rows, skipping those locked)."""
    size = limit or settings.PROVIDER_EVENTS_BATCH_SIZE
    applied = 0
    while True:
        now = timezone.now()
        with transaction.atomic():
            events = list(
                ProviderEvent.objects.filter(processed_at__isnull=True)
                # Held events fall due by the database's clock, as their hold was written.
                .exclude(not_before__gt=db_now())
                .select_for_update(skip_locked=True)
                .order_by("id")[:size]
            )
            for event in events:
                if _apply(event, now):
                    applied += 1
        if len(events) < size:
            return applied


def _apply(event: ProviderEvent, now: datetime) -> bool:
    """Apply one event (its row locked); False when it has to wait for its delivery. `now`
    stamps processed_at."""
    if event.kind in ("stop", "start"):
        result = _sms_opt(event)
    elif event.kind == "ignored":
        result = "nothing to do"
    else:
        delivery = _delivery_of(event)
        if delivery is None:
            result = "no such delivery"
        elif delivery.status in _NOT_SETTLED and not _given_up(event):
            event.tries += 1
            ProviderEvent.objects.filter(pk=event.pk).update(
                tries=event.tries,
                not_before=db_now_plus(settings.PROVIDER_EVENTS_RETRY_SECONDS),
            )
            return False
        else:
            result = delivery_provider_event(
                delivery=delivery,
                kind=event.kind,
                detail=_detail(event),
                at=event.occurred_at,
            )
            if event.suppress:
                suppression_add(
                    owner_id=delivery.notification.owner_id,
                    channel=delivery.channel,
                    address=delivery.address or event.address,
                    reason=event.suppress,
                    source=event.provider,
                    detail=_detail(event),
                    delivery_id=delivery.pk,
                )
    event.processed_at = now
    event.result = result[:200]
    event.save(update_fields=["processed_at", "result"])
    return True


def _given_up(event: ProviderEvent) -> bool:
    """An event whose delivery stays unsettled for PROVIDER_EVENTS_WAIT_SECONDS is applied
    anyway. Judged on the database's clock, which received_at was written on, in SQL: only an
    event that found its delivery unsettled (a callback racing our own commit) asks."""
    return ProviderEvent.objects.filter(
        pk=event.pk, received_at__lt=db_now_plus(-settings.PROVIDER_EVENTS_WAIT_SECONDS)
    ).exists()


def _detail(event: ProviderEvent) -> str:
    """The provider's own status word, and what it said: kept in the delivery log."""
    said = f"{event.provider} {event.raw_status}"
    return f"{said}: {event.detail}" if event.detail else said


def _delivery_of(event: ProviderEvent) -> Delivery | None:
    channel = _CHANNEL_OF.get(event.provider)
    deliveries = Delivery.objects.select_related("notification__recipient").select_for_update(
        of=("self",)
    )
    if event.delivery_id is not None:
        delivery = deliveries.filter(pk=event.delivery_id, channel=channel).first()
        if delivery is not None:
            return delivery
    if not event.message_id:
        return None
    # Without our own id (SendGrid events of a message sent before custom args, Twilio always)
    # the provider's message id names it; a SendGrid batch shares one id, so only a single
    # match counts.
    found = list(deliveries.filter(channel=channel, provider_message_id=event.message_id)[:2])
    return found[0] if len(found) == 1 else None


def _sms_opt(event: ProviderEvent) -> str:
    """An inbound STOP suppresses the number for every owner with a recipient at it; START
    lifts what STOP did."""
    number = event.address
    if not number:
        return "no number"
    if event.kind == "start":
        lifted = suppressions_lift(
            channel=Channel.SMS, address=number, reason=SuppressionReason.STOPPED
        )
        return f"lifted {lifted} suppressions"
    owners = sorted(set(Recipient.objects.filter(phone=number).values_list("owner_id", flat=True)))
    for owner_id in owners:
        suppression_add(
            owner_id=owner_id,
            channel=Channel.SMS,
            address=number,
            reason=SuppressionReason.STOPPED,
            source=event.provider,
            detail=_detail(event),
        )
    return f"suppressed for {len(owners)} owners"
