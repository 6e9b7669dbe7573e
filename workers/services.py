"""The delivery path: claim a delivery, send it through its channel's provider, record the
attempt, then mark it sent, schedule a retry, or give up; and the sweeper that re-enqueues
what the broker lost."""

from __future__ import annotations

import enum
import logging
import random
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from notifications import cache as keys
from notifications import metrics
from notifications.logs import scoped_log_context
from notifications.models import (
    PENDING_STATUSES,
    Channel,
    Delivery,
    DeliveryStatus,
    Device,
)
from workers import retry
from workers.circuit_breaker import circuit_allow, circuit_record
from workers.dead_letters import dead_letter_create
from workers.delivery_log import AttemptRecord, StatusEvent, get_delivery_log
from workers.dispatch import deliveries_publish_rollback_unsafe
from workers.providers import BatchProvider, OutboundMessage, Outcome, SendResult, provider_for
from workers.rate_limiter import rate_limit_refund, rate_limit_take_many

log = logging.getLogger(__name__)


class ProcessOutcome(enum.StrEnum):
    SENT = "sent"
    RETRY = "retry"
    DEAD = "dead"
    NOT_CLAIMED = "not_claimed"
    DEFERRED = "deferred"


def _max_attempts() -> int:
    return settings.RETRY_MAX_ATTEMPTS + 1


def delivery_claim(*, delivery_id: int) -> Delivery | None:
    """Take a lease on a pending, due delivery that nobody holds; count the attempt now, so a
    worker that dies mid-send has still spent one. None when it is not this worker's to send."""
    now = timezone.now()
    token = uuid.uuid4()
    claimed = (
        Delivery.objects.filter(pk=delivery_id, status__in=PENDING_STATUSES)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))
        .update(
            lease_token=token,
            lease_expires_at=now + timedelta(seconds=settings.DELIVERY_LEASE_SECONDS),
            attempts=F("attempts") + 1,
            updated_at=now,
        )
    )
    if not claimed:
        return None
    return Delivery.objects.select_related("notification", "notification__recipient").get(
        pk=delivery_id
    )


def _republish_if_early(delivery_id: int) -> None:
    """A message that arrived before its delivery is due goes back with the time left."""
    row = (
        Delivery.objects.filter(pk=delivery_id, status__in=PENDING_STATUSES)
        .values("channel", "next_attempt_at", "lease_expires_at")
        .first()
    )
    if row is None or row["next_attempt_at"] is None:
        return
    remaining = (row["next_attempt_at"] - timezone.now()).total_seconds()
    if remaining > 0:
        deliveries_publish_rollback_unsafe([(delivery_id, row["channel"])], countdown=remaining)


def _outbound_message(delivery: Delivery) -> OutboundMessage | SendResult:
    notification = delivery.notification
    to: str | list[str] = delivery.address
    if delivery.channel == Channel.PUSH:
        to = list(
            Device.objects.filter(recipient_id=notification.recipient_id, active=True)
            .order_by("created_at")
            .values_list("token", flat=True)
        )
        if not to:
            return SendResult(Outcome.PERMANENT, error="no active device for this recipient")
    return OutboundMessage(
        delivery_id=delivery.pk,
        notification_id=str(notification.pk),
        owner_id=notification.owner_id,
        channel=delivery.channel,
        to=to,
        content=delivery.content,
        data=notification.data,
    )


@scoped_log_context
def delivery_process(*, delivery_id: int) -> ProcessOutcome:
    # Every line logged while this delivery is handled carries its ids (stdlib calls too).
    structlog.contextvars.bind_contextvars(delivery_id=delivery_id)
    delivery = delivery_claim(delivery_id=delivery_id)
    if delivery is None:
        _republish_if_early(delivery_id)
        return ProcessOutcome.NOT_CLAIMED
    structlog.contextvars.bind_contextvars(notification_id=str(delivery.notification_id))
    number = delivery.attempts
    if number > _max_attempts():
        # Workers died mid-send on every attempt: stop handing it out.
        result = SendResult(
            Outcome.PERMANENT,
            error=f"abandoned after {number - 1} attempts that did not finish (worker lost)",
        )
        return _finish(delivery, result, number=number - 1, provider_name="", record=False)
    message = _outbound_message(delivery)
    if isinstance(message, SendResult):
        return _complete(delivery, message, provider_name="", started_at=timezone.now())
    provider = provider_for(delivery.channel)
    provider_name = provider.name
    batch_size = provider.max_batch if isinstance(provider, BatchProvider) else 1
    candidates = _batch_candidates(delivery, batch_size - 1)
    granted, wait = rate_limit_take_many(
        channel=delivery.channel,
        provider=provider_name,
        max_wait=settings.RATE_LIMIT_MAX_SLEEP_SECONDS,
        want=1 + len(candidates),
    )
    if not granted:
        metrics.rate_limiter_waited(channel=delivery.channel, provider=provider_name)
        return _defer(delivery, wait, reason="rate limited", provider_name=provider_name)
    companions = _claim_companions(delivery, candidates[: granted - 1])
    rate_limit_refund(
        channel=delivery.channel, provider=provider_name, count=granted - 1 - len(companions)
    )
    batch: list[tuple[Delivery, OutboundMessage]] = [(delivery, message)]
    for companion in companions:
        companion_message = _outbound_message(companion)
        if isinstance(companion_message, SendResult):
            _complete(companion, companion_message, provider_name="", started_at=timezone.now())
        else:
            batch.append((companion, companion_message))
    if wait > 0:
        metrics.rate_limiter_waited(
            channel=delivery.channel, provider=provider_name, count=len(batch)
        )
        time.sleep(wait)
    wait = circuit_allow(provider=provider_name)
    if wait > 0:
        for held, _ in batch:
            # Spread the deferred deliveries so they do not all ask again at once.
            _defer(
                held,
                wait + random.uniform(0, 1),
                reason="circuit open",
                provider_name=provider_name,
            )
        return ProcessOutcome.DEFERRED
    started_at = timezone.now()
    t0 = time.perf_counter()
    if len(batch) == 1:
        results = [provider.send(message)]
    else:
        assert isinstance(provider, BatchProvider)  # only batch providers get companions
        results = provider.send_batch([m for _, m in batch])
    latency_ms = (time.perf_counter() - t0) * 1000
    circuit_record(provider=provider_name, outcome=_call_outcome(results).value)
    outcomes = [
        _complete(
            held,
            result,
            provider_name=provider_name,
            started_at=started_at,
            latency_ms=latency_ms,
        )
        for (held, _), result in zip(batch, results, strict=True)
    ]
    return outcomes[0]


def _call_outcome(results: list[SendResult]) -> Outcome:
    """What one provider call tells the breaker: it answered if any message went through."""
    outcomes = {r.outcome for r in results}
    for outcome in (Outcome.OK, Outcome.TRANSIENT):
        if outcome in outcomes:
            return outcome
    return Outcome.PERMANENT


def _batch_candidates(delivery: Delivery, limit: int) -> list[int]:
    """Other queued deliveries of the same channel, oldest first, that one batched provider
    call can carry along. Their own messages, when they come, find them final and do nothing."""
    if limit <= 0:
        return []
    now = timezone.now()
    return list(
        Delivery.objects.filter(channel=delivery.channel, status=DeliveryStatus.QUEUED)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))
        .exclude(pk=delivery.pk)
        .order_by("id")
        .values_list("id", flat=True)[:limit]
    )


def _claim_companions(delivery: Delivery, candidate_ids: list[int]) -> list[Delivery]:
    """Lease the candidates nobody took meanwhile under the batch's own lease token."""
    if not candidate_ids:
        return []
    now = timezone.now()
    Delivery.objects.filter(
        pk__in=candidate_ids, status=DeliveryStatus.QUEUED, attempts__lt=_max_attempts()
    ).filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now)).filter(
        Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now)
    ).update(
        lease_token=delivery.lease_token,
        lease_expires_at=delivery.lease_expires_at,
        attempts=F("attempts") + 1,
        updated_at=now,
    )
    return list(
        Delivery.objects.filter(pk__in=candidate_ids, lease_token=delivery.lease_token)
        .select_related("notification", "notification__recipient")
        .order_by("id")
    )


def _complete(
    delivery: Delivery,
    result: SendResult,
    *,
    provider_name: str,
    started_at: datetime,
    latency_ms: float = 0.0,
) -> ProcessOutcome:
    """Record the attempt a claimed delivery just made, then settle it: one transaction for
    the attempt, the delivery's new state and its status event."""
    with transaction.atomic():
        return _complete_in_transaction(
            delivery,
            result,
            provider_name=provider_name,
            started_at=started_at,
            latency_ms=latency_ms,
        )


def _complete_in_transaction(
    delivery: Delivery,
    result: SendResult,
    *,
    provider_name: str,
    started_at: datetime,
    latency_ms: float,
) -> ProcessOutcome:
    number = delivery.attempts
    if result.invalid_tokens:
        _devices_deactivate(delivery, result.invalid_tokens)
    get_delivery_log().record_attempt(
        AttemptRecord(
            delivery_id=delivery.pk,
            notification_id=str(delivery.notification_id),
            owner_id=delivery.notification.owner_id,
            recipient_id=delivery.notification.recipient.external_id,
            channel=delivery.channel,
            number=number,
            provider=provider_name or "-",
            outcome=result.outcome.value,
            status_code=result.status_code,
            provider_message_id=result.provider_message_id,
            error=result.error,
            started_at=started_at,
            latency_ms=latency_ms,
        )
    )
    return _finish(delivery, result, number=number, provider_name=provider_name, record=True)


def _defer(delivery: Delivery, delay: float, *, reason: str, provider_name: str) -> ProcessOutcome:
    """Put a claimed delivery back for later without spending its attempt."""
    now = timezone.now()
    Delivery.objects.filter(pk=delivery.pk, lease_token=delivery.lease_token).update(
        lease_token=None,
        lease_expires_at=None,
        attempts=delivery.attempts - 1,
        next_attempt_at=now + timedelta(seconds=delay),
        enqueued_at=now,
        updated_at=now,
    )
    deliveries_publish_rollback_unsafe([(delivery.pk, delivery.channel)], countdown=delay)
    log.info(
        "delivery %s deferred %.2fs: %s",
        delivery.pk,
        delay,
        reason,
        extra={"delivery_id": delivery.pk, "notification_id": str(delivery.notification_id)},
    )
    metrics.delivery_outcome(
        channel=delivery.channel, provider=provider_name, outcome=metrics.OUTCOME_DEFERRED
    )
    return ProcessOutcome.DEFERRED


def delivery_status_events(
    deliveries: list[Delivery], status: str, *, detail: str = ""
) -> list[StatusEvent]:
    """Status events for deliveries loaded with notification__recipient."""
    now = timezone.now()
    return [
        StatusEvent(
            delivery_id=d.pk,
            notification_id=str(d.notification_id),
            owner_id=d.notification.owner_id,
            recipient_id=d.notification.recipient.external_id,
            channel=d.channel,
            status=status,
            at=now,
            detail=detail,
        )
        for d in deliveries
    ]


def _finish(
    delivery: Delivery, result: SendResult, *, number: int, provider_name: str, record: bool
) -> ProcessOutcome:
    now = timezone.now()
    ours = Delivery.objects.filter(pk=delivery.pk, lease_token=delivery.lease_token)
    common: dict[str, Any] = {
        "lease_token": None,
        "lease_expires_at": None,
        "attempts": number,
        "updated_at": now,
    }
    if provider_name:
        common["provider"] = provider_name
    context = {"delivery_id": delivery.pk, "notification_id": str(delivery.notification_id)}
    if result.ok:
        changed = ours.update(
            status=DeliveryStatus.SENT,
            provider_message_id=result.provider_message_id,
            sent_at=now,
            next_attempt_at=None,
            last_error="",
            **common,
        )
        if changed:
            get_delivery_log().record_statuses(
                delivery_status_events([delivery], DeliveryStatus.SENT, detail=provider_name)
            )
        else:
            # The client acknowledged the in-app frame before this write (its ack releases
            # the lease): keep `delivered`/`read`, only fill in how it was sent.
            Delivery.objects.filter(
                pk=delivery.pk,
                status__in=(DeliveryStatus.DELIVERED, DeliveryStatus.READ),
                provider="",
            ).update(
                provider=provider_name,
                provider_message_id=result.provider_message_id,
                sent_at=Coalesce("sent_at", Value(now)),
                attempts=number,
            )
        log.info("delivery %s sent via %s", delivery.pk, provider_name, extra=context)
        metrics.delivery_outcome(
            channel=delivery.channel, provider=provider_name, outcome=metrics.OUTCOME_SENT
        )
        metrics.delivery_sent_latency(
            channel=delivery.channel,
            accepted_at=delivery.notification.created_at,
            send_at=delivery.notification.send_at,
        )
        return ProcessOutcome.SENT
    decision = retry.decide(result, attempts_made=number)
    if decision.retry:
        ours.update(
            status=DeliveryStatus.RETRYING,
            next_attempt_at=now + timedelta(seconds=decision.delay_seconds),
            enqueued_at=now,
            last_error=result.error,
            **common,
        )
        get_delivery_log().record_statuses(
            delivery_status_events([delivery], DeliveryStatus.RETRYING, detail=result.error)
        )
        delay = decision.delay_seconds
        # After commit: a worker taking the message early would find the delivery still leased.
        transaction.on_commit(
            lambda: deliveries_publish_rollback_unsafe(
                [(delivery.pk, delivery.channel)], countdown=delay
            )
        )
        log.info(
            "delivery %s attempt %s failed (%s), retry in %.2fs",
            delivery.pk,
            number,
            result.error,
            decision.delay_seconds,
            extra=context,
        )
        metrics.delivery_outcome(
            channel=delivery.channel, provider=provider_name, outcome=metrics.OUTCOME_RETRIED
        )
        return ProcessOutcome.RETRY
    with transaction.atomic(savepoint=False):
        if ours.update(
            status=DeliveryStatus.DEAD, next_attempt_at=None, last_error=result.error, **common
        ):
            delivery.attempts = number
            dead_letter_create(delivery=delivery, provider=provider_name, error=result.error)
            get_delivery_log().record_statuses(
                delivery_status_events([delivery], DeliveryStatus.DEAD, detail=result.error)
            )
    log.warning(
        "delivery %s dead after %s attempts: %s", delivery.pk, number, result.error, extra=context
    )
    metrics.delivery_outcome(
        channel=delivery.channel, provider=provider_name, outcome=metrics.OUTCOME_DEAD
    )
    return ProcessOutcome.DEAD


def _devices_deactivate(delivery: Delivery, tokens: tuple[str, ...]) -> None:
    recipient_id = delivery.notification.recipient_id
    Device.objects.filter(recipient_id=recipient_id, token__in=tokens).update(active=False)
    keys.invalidate_on_commit(keys.devices_key(recipient_id))


def deliveries_sweep() -> int:
    """Enqueue scheduled deliveries that are due, and pending ones whose message was lost
    (broker restart, crash between commit and publish, worker killed). Returns how many."""
    now = timezone.now()
    batch = settings.SWEEPER_BATCH_SIZE
    due_scheduled = list(
        Delivery.objects.filter(status=DeliveryStatus.SCHEDULED, next_attempt_at__lte=now)
        .order_by("next_attempt_at")
        .values_list("id", "channel")[:batch]
    )
    if due_scheduled:
        with transaction.atomic():
            Delivery.objects.filter(
                id__in=[d for d, _ in due_scheduled], status=DeliveryStatus.SCHEDULED
            ).update(
                status=DeliveryStatus.QUEUED, next_attempt_at=None, enqueued_at=now, updated_at=now
            )
            released = Delivery.objects.filter(id__in=[d for d, _ in due_scheduled]).select_related(
                "notification__recipient"
            )
            get_delivery_log().record_statuses(
                delivery_status_events(list(released), DeliveryStatus.QUEUED, detail="due")
            )
    stale_before = now - timedelta(seconds=settings.SWEEPER_STALE_SECONDS)
    lost = list(
        Delivery.objects.filter(status__in=PENDING_STATUSES)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now))
        .filter(Q(enqueued_at__isnull=True) | Q(enqueued_at__lt=stale_before))
        # A queue with messages waiting is a backlog, not a loss: its stale rows most likely
        # have their message in it, and publishing each again would double the backlog at
        # every sweep. Rows known to be unpublished (enqueued_at NULL) go out regardless.
        .exclude(channel__in=_channels_with_backlog(), enqueued_at__isnull=False)
        .order_by("id")
        .values_list("id", "channel")[:batch]
    )
    if lost:
        Delivery.objects.filter(id__in=[d for d, _ in lost]).update(enqueued_at=now)
        log.warning("sweeper re-enqueues %s deliveries whose messages were lost", len(lost))
    published = deliveries_publish_rollback_unsafe(due_scheduled + lost)
    return published


def _channels_with_backlog() -> list[str]:
    """Channels whose broker queue holds messages; none when the broker cannot say."""
    try:
        depths = metrics.queue_depths()
    except Exception as exc:  # noqa: BLE001 - any broker failure: sweep as if all were empty
        log.warning("queue depths unavailable, sweeping every channel: %s", exc)
        return []
    return [channel for channel, depth in depths.items() if depth > 0]
