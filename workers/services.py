"""The delivery path, a batch at a time: claim the deliveries of one task, take their tokens
from the provider's bucket in one call, ask the breaker once, send them (the vendor's batch
call, or bounded concurrent calls; each call is told to the breaker, and none is made once it
opens), and settle every one in one transaction; and the sweeper that hands back to the relay
what the broker lost."""

from __future__ import annotations

import enum
import functools
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import structlog
from django.conf import settings
from django.utils import timezone
from redis.exceptions import RedisError

from core import metrics
from core.db_clock import db_now_plus
from core.logs import scoped_log_context
from core.rate_limiter import (
    rate_limit_offsets,
    rate_limit_refund,
    rate_limit_slow,
    rate_limit_spread_seconds,
    rate_limit_take_many,
)
from notifications.models import PENDING_STATUSES, Channel, Delivery, DeliveryQuerySet, Device
from notifications.suppressions import (
    SUPPRESSIBLE_CHANNELS,
    address_normalize,
    suppressed_reasons,
    suppression_binds,
)
from notifications.unsubscribe import unsubscribe_headers
from workers import retry
from workers.circuit_breaker import CircuitState, circuit_allow, circuit_record
from workers.providers import (
    BatchProvider,
    OutboundMessage,
    Outcome,
    Provider,
    SendResult,
    providers_for,
)
from workers.selectors import broker_holdings, queue_depths
from workers.transitions import (
    Settle,
    Settlement,
    deliveries_claim,
    deliveries_return_to_outbox,
    deliveries_settle,
)

log = logging.getLogger(__name__)

# A batch that found the rate limiter and breaker unreachable (Redis down or a connection gone
# silent) is due again after this, with up to a second of jitter: Redis answers again or the
# next try holds it again, never an attempt spent.
SHARED_STATE_RETRY_SECONDS = 5.0


class ProcessOutcome(enum.StrEnum):
    SENT = "sent"
    RETRY = "retry"
    DEAD = "dead"
    NOT_CLAIMED = "not_claimed"
    DEFERRED = "deferred"
    SKIPPED = "skipped"


_OUTCOME_OF = {
    Settle.SENT: ProcessOutcome.SENT,
    Settle.RETRY: ProcessOutcome.RETRY,
    Settle.DEFER: ProcessOutcome.DEFERRED,
    Settle.DEAD: ProcessOutcome.DEAD,
    Settle.SKIP: ProcessOutcome.SKIPPED,
}
_METRIC_OF = {
    Settle.SENT: metrics.OUTCOME_SENT,
    Settle.RETRY: metrics.OUTCOME_RETRIED,
    Settle.DEFER: metrics.OUTCOME_DEFERRED,
    Settle.DEAD: metrics.OUTCOME_DEAD,
    Settle.SKIP: metrics.OUTCOME_SKIPPED,
}


def _not_suppressed(
    sendable: list[tuple[Delivery, OutboundMessage]], settled: list[Settlement]
) -> list[tuple[Delivery, OutboundMessage]]:
    """What may still be sent: a delivery whose address was suppressed since it was accepted
    is settled `skipped` instead (one query per batch, email and SMS only)."""
    if not sendable or sendable[0][0].channel not in SUPPRESSIBLE_CHANNELS:
        return sendable
    reasons = suppressed_reasons((m.owner_id, m.channel, str(m.to)) for _, m in sendable)
    if not reasons:
        return sendable
    kept = []
    for delivery, message in sendable:
        address = address_normalize(channel=message.channel, address=str(message.to))
        reason = reasons.get((message.owner_id, message.channel, address))
        if reason and suppression_binds(reason=reason, priority=delivery.notification.priority):
            result = SendResult(Outcome.PERMANENT, error=f"suppressed: {reason}")
            settled.append(Settlement(delivery, Settle.SKIP, result, record_attempt=False))
        else:
            kept.append((delivery, message))
    return kept


def _max_attempts() -> int:
    return settings.RETRY_MAX_ATTEMPTS + 1


def _outbound_messages(deliveries: list[Delivery]) -> list[OutboundMessage | SendResult]:
    """What to send for each delivery, or why it cannot be sent. Push reads the devices of
    every recipient of the batch in one query."""
    tokens: dict[int, list[str]] = {}
    pushes = [d.notification.recipient_id for d in deliveries if d.channel == Channel.PUSH]
    if pushes:
        for recipient_id, token in (
            Device.objects.filter(recipient_id__in=set(pushes), active=True)
            .order_by("created_at", "id")
            .values_list("recipient_id", "token")
        ):
            tokens.setdefault(recipient_id, []).append(token)
    out: list[OutboundMessage | SendResult] = []
    for delivery in deliveries:
        notification = delivery.notification
        to: str | list[str] = delivery.address
        if delivery.channel == Channel.PUSH:
            to = tokens.get(notification.addressee_id, [])
            if not to:
                out.append(
                    SendResult(Outcome.PERMANENT, error="no active device for this recipient")
                )
                continue
        headers = (
            unsubscribe_headers(
                owner_id=notification.owner_id,
                recipient_id=notification.addressee_id,
                category=notification.category,
            )
            if delivery.channel == Channel.EMAIL
            else {}
        )
        out.append(
            OutboundMessage(
                delivery_id=delivery.pk,
                notification_id=str(notification.pk),
                owner_id=notification.owner_id,
                channel=delivery.channel,
                to=to,
                content=delivery.content,
                data=notification.data,
                headers=headers,
            )
        )
    return out


_executor: tuple[int, ThreadPoolExecutor] | None = None


def _send_pool() -> ThreadPoolExecutor:
    """This process's threads for concurrent provider calls (made anew after a fork)."""
    global _executor
    if _executor is None or _executor[0] != os.getpid():
        _executor = (
            os.getpid(),
            ThreadPoolExecutor(
                max_workers=max(1, settings.PROVIDER_CONCURRENCY),
                thread_name_prefix="provider",
            ),
        )
    return _executor[1]


class _Round:
    """The provider calls of one batch, each told to the shared breaker as it ends: a round
    of several calls (vendor batches of `max_batch`, or one call per message) makes no new
    call once the breaker has opened, so a provider that is down gets the failures that open
    the breaker and the calls already under way, not the rest of every batch."""

    def __init__(self, provider_name: str):
        self.provider_name = provider_name
        self.opened = threading.Event()

    def call(self, send: Callable[[], list[SendResult]]) -> list[SendResult] | None:
        """The call's results, or None when it was not made: the breaker opened first."""
        if self.opened.is_set():
            return None
        results = send()
        try:
            state = circuit_record(
                provider=self.provider_name, outcome=_breaker_outcome(results).value
            )
        except (RedisError, OSError) as exc:
            # The call was made and its result must be settled whatever the breaker's store
            # says; the breaker misses one outcome.
            log.warning("breaker of %s not told (Redis unreachable): %s", self.provider_name, exc)
            return results
        if state is CircuitState.OPEN:
            self.opened.set()
        return results


def _send(
    provider: Provider, messages: list[OutboundMessage], offsets: list[float]
) -> list[SendResult | None]:
    """One result per message, in order (None for a message not sent because the breaker
    opened during the round): the vendor's batch call where there is one (after the last
    token is due), else at most PROVIDER_CONCURRENCY calls at once on the provider's pooled
    connections, each made when its own token is due (`offsets`, from now)."""
    start = time.monotonic()
    round_ = _Round(provider.name)
    if isinstance(provider, BatchProvider) and len(messages) > 1:
        time.sleep(max(offsets, default=0.0))
        size = max(1, provider.max_batch)
        results: list[SendResult | None] = []
        for first in range(0, len(messages), size):
            chunk = messages[first : first + size]
            sent = round_.call(functools.partial(provider.send_batch, chunk))
            results += sent if sent is not None else [None] * len(chunk)
        return results

    def paced(index: int) -> SendResult | None:
        delay = start + offsets[index] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent = round_.call(lambda: [provider.send(messages[index])])
        return sent[0] if sent is not None else None

    if len(messages) == 1 or settings.PROVIDER_CONCURRENCY <= 1:
        return [paced(index) for index in range(len(messages))]
    return list(_send_pool().map(paced, range(len(messages))))


def _breaker_outcome(results: list[SendResult]) -> Outcome:
    """What one round of calls tells the breaker: the provider is up if any message went
    through or it only asked us to slow down (429); transient failures count against it."""
    outcomes = {r.outcome for r in results}
    if Outcome.OK in outcomes or any(r.throttled for r in results):
        return Outcome.OK
    if Outcome.TRANSIENT in outcomes:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def _judge(delivery: Delivery, result: SendResult, provider_name: str) -> Settlement:
    """Sent, retry, defer or dead for one delivery after its provider call."""
    if result.ok:
        return Settlement(delivery, Settle.SENT, result, provider=provider_name)
    if result.throttled:
        # 429: the provider is fine but wants us slower. Not an attempt that failed: wait
        # what it asked (or the next backoff step) and try again.
        delay = result.retry_after
        if delay is None:
            delay = retry.backoff_seconds(max(1, delivery.attempts))
        return Settlement(delivery, Settle.DEFER, result, provider=provider_name, delay=delay)
    decision = retry.decide(result, attempts_made=delivery.attempts)
    if decision.retry:
        return Settlement(
            delivery, Settle.RETRY, result, provider=provider_name, delay=decision.delay_seconds
        )
    return Settlement(delivery, Settle.DEAD, result, provider=provider_name)


def _held(
    deliveries: list[Delivery], *, delay: Callable[[int], float], why: str, provider_name: str
) -> list[Settlement]:
    """Deferred without a provider call (no token, breaker open): the attempt is not spent."""
    return [
        Settlement(
            delivery,
            Settle.DEFER,
            SendResult(Outcome.TRANSIENT, error=why),
            provider=provider_name,
            delay=delay(index),
            record_attempt=False,
        )
        for index, delivery in enumerate(deliveries)
    ]


@scoped_log_context
def deliveries_process(*, delivery_ids: list[int]) -> dict[int, ProcessOutcome]:
    """Deliver one task's batch (ids of one channel). Returns each id's outcome; ids that
    were not this worker's to send (final, leased elsewhere, not due) are NOT_CLAIMED."""
    outcomes = dict.fromkeys(delivery_ids, ProcessOutcome.NOT_CLAIMED)
    claimed = deliveries_claim(delivery_ids=delivery_ids)
    if not claimed:
        return outcomes
    channel = claimed[0].channel
    structlog.contextvars.bind_contextvars(channel=channel, batch=len(claimed))
    now = timezone.now()
    settled: list[Settlement] = []
    sendable: list[tuple[Delivery, OutboundMessage]] = []
    for delivery, message in zip(claimed, _outbound_messages(claimed), strict=True):
        if delivery.attempts > _max_attempts():
            # Workers died mid-send on every attempt: stop handing it out.
            error = f"abandoned after {delivery.attempts - 1} attempts that did not finish"
            settled.append(
                Settlement(
                    delivery,
                    Settle.DEAD,
                    SendResult(Outcome.PERMANENT, error=f"{error} (worker lost)"),
                    record_attempt=False,
                )
            )
        elif isinstance(message, SendResult):
            settled.append(Settlement(delivery, Settle.DEAD, message))
        else:
            sendable.append((delivery, message))
    sendable = _not_suppressed(sendable, settled)
    if not sendable:
        return _settle(outcomes, settled, started_at=now)

    # When the attempt started, for its record only: this host's clock will do.
    started_at = timezone.now()
    latency_ms = 0.0
    # Failover: what one provider could not take (its breaker open, a transient failure, the
    # breaker opening mid-round) goes to the next in the list; the last one's answer stands.
    failed_over: list[Settlement] = []
    providers = providers_for(channel)
    for index, provider in enumerate(providers):
        if not sendable:
            break
        sendable, spent_ms = _through(
            provider,
            sendable,
            channel=channel,
            last=index == len(providers) - 1,
            settled=settled,
            failed_over=failed_over,
        )
        latency_ms += spent_ms
    return _settle(
        outcomes, settled, started_at=started_at, latency_ms=latency_ms, failed_over=failed_over
    )


def _through(
    provider: Provider,
    sendable: list[tuple[Delivery, OutboundMessage]],
    *,
    channel: str,
    last: bool,
    settled: list[Settlement],
    failed_over: list[Settlement],
) -> tuple[list[tuple[Delivery, OutboundMessage]], float]:
    """Send what it can of `sendable` through one provider: tokens from its bucket, its
    breaker asked, the calls made. What is settled goes to `settled`; returns what the next
    provider should take (nothing when this is the `last`) and the milliseconds spent."""
    name = provider.name
    try:
        granted, wait = rate_limit_take_many(
            channel=channel,
            provider=name,
            max_wait=settings.RATE_LIMIT_MAX_SLEEP_SECONDS,
            want=len(sendable),
        )
        closed_in = circuit_allow(provider=name)
    except (RedisError, OSError) as exc:
        # No token and no breaker without Redis: nothing is sent, the batch goes back for a
        # little later without spending an attempt (its lease is released at once, rather
        # than held until it runs out).
        log.warning("%s %s deliveries held: Redis unreachable: %s", len(sendable), channel, exc)
        settled += _held(
            [delivery for delivery, _ in sendable],
            delay=lambda i: SHARED_STATE_RETRY_SECONDS + random.uniform(0, 1),
            why="rate limiter and breaker unreachable",
            provider_name=name,
        )
        return [], 0.0
    if granted < len(sendable):
        # Tokens not granted: the rest goes back for later, spread over the time the bucket
        # needs to refill for them, costing no attempt.
        rest = [delivery for delivery, _ in sendable[granted:]]
        spread = rate_limit_spread_seconds(channel=channel, count=len(rest))
        # Settled after the granted ones' sleep (if any were granted): count from then.
        start = wait if not granted else 0.0
        settled += _held(
            rest,
            delay=lambda i: start + spread * (i + random.random()) / len(rest),
            why="rate limited",
            provider_name=name,
        )
        metrics.rate_limiter_waited(channel=channel, provider=name, count=len(rest))
        sendable = sendable[:granted]
    if not sendable:
        return [], 0.0
    offsets = rate_limit_offsets(channel=channel, granted=len(sendable), wait=wait)
    if wait > 0:
        metrics.rate_limiter_waited(channel=channel, provider=name, count=len(sendable))
    if closed_in > 0:
        # The tokens were not used: give them back to the bucket.
        _best_effort(rate_limit_refund, channel=channel, provider=name, count=len(sendable))
        if not last:
            return sendable, 0.0
        # Spread so the held deliveries do not all ask again at once.
        settled += _held(
            [delivery for delivery, _ in sendable],
            delay=lambda i: closed_in + random.uniform(0, 1),
            why="circuit open",
            provider_name=name,
        )
        return [], 0.0
    t0 = time.perf_counter()
    attempted = _send(provider, [message for _, message in sendable], offsets)
    latency_ms = (time.perf_counter() - t0) * 1000
    results = [r for r in attempted if r is not None]
    slow_for = max((r.retry_after or 0.0 for r in results if r.throttled), default=0.0)
    if slow_for > 0:
        _best_effort(rate_limit_slow, channel=channel, provider=name, seconds=slow_for)
    next_provider: list[tuple[Delivery, OutboundMessage]] = []
    unsent: list[Delivery] = []
    for (delivery, message), result in zip(sendable, attempted, strict=True):
        if result is None:
            if last:
                unsent.append(delivery)
            else:
                next_provider.append((delivery, message))
        elif not last and result.outcome is Outcome.TRANSIENT and not result.throttled:
            failed_over.append(Settlement(delivery, Settle.RETRY, result, provider=name))
            next_provider.append((delivery, message))
        else:
            settled.append(_judge(delivery, result, name))
    not_called = sum(1 for r in attempted if r is None)
    if not_called:
        _best_effort(rate_limit_refund, channel=channel, provider=name, count=not_called)
    if unsent:
        # The breaker opened during this round: the rest waits for it, costing no attempt.
        settled += _held(
            unsent,
            delay=lambda i: settings.CIRCUIT_OPEN_SECONDS + random.uniform(0, 1),
            why="circuit open",
            provider_name=name,
        )
    if next_provider:
        log.info(
            "%s of %s %s deliveries fail over from %s",
            len(next_provider),
            len(sendable),
            channel,
            name,
        )
    return next_provider, latency_ms


def _best_effort(update: Callable[..., None], **kwargs: Any) -> None:
    """A change to the shared rate-limit state after the provider calls were made: their
    results are settled whether or not Redis takes it."""
    try:
        update(**kwargs)
    except (RedisError, OSError) as exc:
        log.warning("%s skipped (Redis unreachable): %s", update.__name__, exc)


def _settle(
    outcomes: dict[int, ProcessOutcome],
    settled: list[Settlement],
    *,
    started_at: datetime,
    latency_ms: float = 0.0,
    failed_over: list[Settlement] | None = None,
) -> dict[int, ProcessOutcome]:
    applied = deliveries_settle(
        settled, started_at=started_at, latency_ms=latency_ms, failed_over=failed_over
    )
    applied_ids = {s.delivery.pk for s in applied}
    # Fenced by the lease token: this worker's lease ran out (it was cut off, paused or slow),
    # another took the delivery, and this result changes nothing. (An in-app frame acked
    # meanwhile also goes unapplied, and is no such case.)
    fenced = [
        s.delivery.pk
        for s in settled
        if s.delivery.pk not in applied_ids and s.delivery.channel != Channel.WEB
    ]
    if fenced:
        log.warning(
            "%s results dropped: their lease ran out before this worker settled them (%s)",
            len(fenced),
            fenced[:20],
        )
    for settlement in settled:
        delivery, result = settlement.delivery, settlement.result
        outcomes[delivery.pk] = _OUTCOME_OF[settlement.kind]
        context = {"delivery_id": delivery.pk, "notification_id": str(delivery.notification_id)}
        metrics.delivery_outcome(
            channel=delivery.channel,
            provider=settlement.provider,
            outcome=_METRIC_OF[settlement.kind],
        )
        if settlement.kind is Settle.SENT:
            if delivery.pk in applied_ids or delivery.channel == Channel.WEB:
                metrics.delivery_sent_latency(
                    channel=delivery.channel,
                    accepted_at=delivery.notification.created_at,
                    send_at=delivery.notification.send_at,
                )
            log.info("delivery %s sent via %s", delivery.pk, settlement.provider, extra=context)
        elif settlement.kind is Settle.RETRY:
            log.info(
                "delivery %s attempt %s failed (%s), retry in %.2fs",
                delivery.pk,
                delivery.attempts,
                result.error,
                settlement.delay,
                extra=context,
            )
        elif settlement.kind is Settle.DEFER:
            log.info(
                "delivery %s deferred %.2fs: %s",
                delivery.pk,
                settlement.delay,
                result.error,
                extra=context,
            )
        elif settlement.kind is Settle.SKIP:
            log.info("delivery %s skipped: %s", delivery.pk, result.error, extra=context)
        else:
            log.warning(
                "delivery %s dead after %s attempts: %s",
                delivery.pk,
                delivery.attempts,
                result.error,
                extra=context,
            )
    return outcomes


def delivery_process(*, delivery_id: int) -> ProcessOutcome:
    """deliveries_process() of one delivery."""
    return deliveries_process(delivery_ids=[delivery_id])[delivery_id]


def deliveries_sweep() -> int:
    """Hand back to the relay the pending deliveries whose message was lost (broker restart,
    worker killed after its lease ran out, a message dropped): due, unleased, and published
    longer than SWEEPER_STALE_SECONDS ago on a channel whose queue is empty, all by the
    database's clock (the relay wrote enqueued_at, workers the leases, on it). On a Redis
    broker also those published longer than SWEEPER_LOST_SECONDS ago that the broker shows to
    be nowhere a worker could still take them from (_lost_by_the_broker). Returns how many."""
    depths = _queue_depths_or_none()
    backlog = [channel for channel, depth in (depths or {}).items() if depth > 0]
    sweepable = Delivery.objects.filter(status__in=PENDING_STATUSES).due().unleased().order_by("id")
    lost = list(
        sweepable
        # A queue with messages waiting is a backlog, not a loss: its stale rows most likely
        # have their message in it, and publishing each again would double the backlog at
        # every sweep.
        .exclude(channel__in=backlog)
        .filter(enqueued_at__lt=db_now_plus(-settings.SWEEPER_STALE_SECONDS))
        .values_list("id", flat=True)[: settings.SWEEPER_BATCH_SIZE]
    )
    room = settings.SWEEPER_BATCH_SIZE - len(lost)
    if depths is not None and room > 0:
        lost += _lost_by_the_broker(sweepable, depths=depths, limit=room)
    if lost:
        log.warning("sweeper hands %s deliveries whose messages were lost to the relay", len(lost))
    return deliveries_return_to_outbox(delivery_ids=lost)


def _lost_by_the_broker(
    sweepable: DeliveryQuerySet, *, depths: dict[str, int], limit: int
) -> list[int]:
    """Deliveries published between SWEEPER_LOST_SECONDS and SWEEPER_STALE_SECONDS ago that
    no consumer holds and no queue can still hold: their channel's queue is empty, or its
    head (the oldest message waiting) was published after them. A Redis consumer loses a
    message when its connection fails between taking it and recording it, or when the server
    answers its BRPOP into a connection that went silent; found here within a sweep, not
    after SWEEPER_STALE_SECONDS."""
    recent = list(
        sweepable.filter(
            enqueued_at__lt=db_now_plus(-settings.SWEEPER_LOST_SECONDS),
            enqueued_at__gte=db_now_plus(-settings.SWEEPER_STALE_SECONDS),
        ).values_list("id", "channel", "enqueued_at")[:limit]
    )
    if not recent:
        return []
    waiting = sorted({channel for _, channel, _ in recent if depths.get(channel, 0) > 0})
    try:
        holdings = broker_holdings(
            queues=waiting, held_younger_than=settings.DELIVERY_LEASE_SECONDS
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure: only the slow rule applies
        log.warning("broker holdings unavailable, sweeping by age alone: %s", exc)
        return []
    if holdings is None:
        return []
    head_ids = {pk for ids in holdings.heads.values() if ids for pk in ids}
    published = dict(Delivery.objects.filter(pk__in=head_ids).values_list("id", "enqueued_at"))
    # When each waiting queue's head was published: what was published before it has left.
    head_since: dict[str, datetime] = {}
    for channel, ids in holdings.heads.items():
        times = [at for pk in ids or () if (at := published.get(pk)) is not None]
        if times:
            head_since[channel] = min(times)
    return [
        pk
        for pk, channel, enqueued_at in recent
        if pk not in holdings.held
        and (
            depths.get(channel, 0) == 0
            or (
                channel in head_since
                and enqueued_at is not None
                and enqueued_at < head_since[channel]
            )
        )
    ]


def _queue_depths_or_none() -> dict[str, int] | None:
    """Messages waiting per queue; None when the broker cannot say."""
    try:
        return queue_depths()
    except Exception as exc:  # noqa: BLE001 - any broker failure: sweep as if all were empty
        log.warning("queue depths unavailable, sweeping every channel: %s", exc)
        return None
