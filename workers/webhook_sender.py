"""The webhooks worker: writes the `notification.completed` messages its completion checks
call for, then claims the due messages of the webhooks outbox under a lease, signs
each the Standard Webhooks way (every secret still valid, so a receiver can roll over), and
POSTs it to the endpoint's address as resolved and checked just now (pinned: no second DNS
answer reaches the connection). A breaker per endpoint host holds messages while the host
fails, without spending their attempts; failures retry with exponential backoff until
WEBHOOK_RETRY_FOR_SECONDS, then the message is dead (replayable); an endpoint that keeps
failing for WEBHOOK_DISABLE_AFTER_SECONDS is disabled."""

from __future__ import annotations

import json
import logging
import random
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import urllib3
from django.conf import settings
from django.db import transaction
from django.db.models import DurationField, ExpressionWrapper, F, Min, Q
from django.utils import timezone
from redis.exceptions import RedisError

from core import cache as keys
from core import db_clock
from core.db_clock import db_now, db_now_plus
from core.shared_state import redis_client
from notifications.models import Webhook, WebhookMessage, WebhookMessageStatus
from notifications.webhooks import (
    WAKE_TASK,
    UnsafeUrl,
    completion_checks_process,
    hooks_key,
    signing_secrets,
    url_check,
    webhook_signatures,
)
from project.celery import app as celery_app
from workers import retry
from workers.circuit_breaker import circuit_allow, circuit_record

log = logging.getLogger(__name__)

USER_AGENT = "Clarion-Webhooks/1"
# When the next wake asked for by webhooks_wake_when_due comes (epoch seconds), and how much
# later a due time may be and still count as covered by it.
NEXT_WAKE_KEY = "clarion:webhooks:next-wake"
WAKE_SLACK_SECONDS = 0.5


@dataclass(frozen=True)
class _Result:
    kind: str  # "sent", "failed", "held", "dead"
    status_code: int | None = None
    error: str = ""
    delay: float = 0.0


def breaker_name(url: str) -> str:
    return f"webhook:{urllib.parse.urlsplit(url).hostname or '-'}"


def webhooks_send_due(*, batch_size: int | None = None) -> int:
    """Write the `notification.completed` messages the completion checks call for, then send
    every due message, a leased batch at a time, and ask to be woken when the next one that
    waits falls due; returns how many went out."""
    size = batch_size or settings.WEBHOOK_BATCH_SIZE
    completion_checks_process(batch_size=size)
    sent = _send_rounds(size)
    webhooks_wake_when_due()
    return sent


def _send_rounds(size: int) -> int:
    sent = 0
    while True:
        with transaction.atomic():
            # Due, and the lease written into next_attempt_at, by the database's clock: a
            # sender whose clock runs ahead must not take a batch another sender still holds,
            # nor send a retry early (core/db_clock.py).
            batch = list(
                WebhookMessage.objects.filter(status=WebhookMessageStatus.PENDING)
                .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=db_now()))
                .select_for_update(skip_locked=True, of=("self",))
                .select_related("webhook")
                .order_by("id")[:size]
            )
            if not batch:
                return sent
            WebhookMessage.objects.filter(pk__in=[m.pk for m in batch]).update(
                next_attempt_at=db_now_plus(settings.WEBHOOK_TIMEOUT_SECONDS * 3),
                attempts=F("attempts") + 1,
            )
        with ThreadPoolExecutor(max_workers=max(1, settings.WEBHOOK_CONCURRENCY)) as pool:
            results = list(pool.map(_send, batch))
        _settle(batch, results)
        sent += sum(1 for r in results if r.kind == "sent")
        if len(batch) < size:
            return sent


def webhooks_next_due() -> float | None:
    """Seconds until the earliest pending message that is not due yet falls due (a retry, a
    held one, a lease that runs out), by the database's clock; None if none waits."""
    wait = WebhookMessage.objects.filter(
        status=WebhookMessageStatus.PENDING, next_attempt_at__gt=db_now()
    ).aggregate(
        wait=Min(ExpressionWrapper(F("next_attempt_at") - db_now(), output_field=DurationField()))
    )["wait"]
    return None if wait is None else max(0.0, wait.total_seconds())


def webhooks_wake_when_due() -> None:
    """A message due before the schedule's next sweep (WEBHOOK_SWEEP_SECONDS) gets a wake of
    its own at its time, so a retry goes out when its backoff says, while an idle service
    sweeps rarely. One wake per due time: a wake already asked for as early is not asked for
    again (Redis remembers when the next one comes)."""
    wait = webhooks_next_due()
    if wait is None or wait >= settings.WEBHOOK_SWEEP_SECONDS:
        return
    # The wake asked for is remembered as a time that every webhooks worker, on any host,
    # compares with its own due time: on the database's clock, as the due times are.
    now = db_clock.now().timestamp()
    due_at = now + wait
    try:
        client = redis_client()
        asked = client.get(NEXT_WAKE_KEY)
        # A wake still to come, no later than this due time, covers it (one that has come is
        # this very round, or one before it).
        if asked is not None and now < float(asked) <= due_at + WAKE_SLACK_SECONDS:
            return
        client.set(NEXT_WAKE_KEY, repr(due_at), px=int((wait + WAKE_SLACK_SECONDS) * 1000) + 1)
    except (RedisError, OSError) as exc:
        log.warning("webhooks: next wake not recorded (the schedule sends them): %s", exc)
        return
    try:
        celery_app.send_task(WAKE_TASK, queue="webhooks", countdown=wait, retry=False)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the schedule sends them
        client.delete(NEXT_WAKE_KEY)
        log.warning("webhooks: could not ask for a wake in %.1fs: %s", wait, exc)


def _send(message: WebhookMessage) -> _Result:
    webhook = message.webhook
    if webhook.disabled_at is not None:
        return _Result("dead", error=f"endpoint disabled: {webhook.disabled_reason}")
    closed_in = circuit_allow(provider=breaker_name(webhook.url))
    if closed_in > 0:
        return _Result("held", delay=closed_in + random.uniform(0, 1), error="circuit open")
    try:
        addresses = url_check(webhook.url)
    except UnsafeUrl as exc:
        return _Result("dead", error=f"refused: {exc}")
    body = json.dumps(message.payload, separators=(",", ":")).encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message.msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": webhook_signatures(
            # The rollover's end was written on the database's clock (webhook_rotate_secret).
            secrets_=signing_secrets(webhook, db_clock.now()),
            msg_id=message.msg_id,
            timestamp=timestamp,
            body=body,
        ),
    }
    result = _post(webhook.url, addresses[0], headers, body)
    circuit_record(
        provider=breaker_name(webhook.url),
        outcome="ok" if result.kind == "sent" else "transient",
    )
    return result


def _post(url: str, address: str, headers: dict[str, str], body: bytes) -> _Result:
    """POST to the checked address, naming the host in Host and TLS (SNI, certificate)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    timeout = urllib3.Timeout(total=settings.WEBHOOK_TIMEOUT_SECONDS)
    pool: urllib3.HTTPConnectionPool
    if https:
        pool = urllib3.HTTPSConnectionPool(
            address,
            port,
            timeout=timeout,
            retries=False,
            server_hostname=host,
            assert_hostname=host,
            cert_reqs="CERT_REQUIRED",
        )
    else:
        pool = urllib3.HTTPConnectionPool(address, port, timeout=timeout, retries=False)
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    try:
        with pool:
            response = pool.urlopen(
                "POST",
                target,
                body=body,
                headers={**headers, "host": parts.netloc.rpartition("@")[2]},
                redirect=False,
                preload_content=True,
            )
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        return _Result("failed", error=f"{exc.__class__.__name__}: {exc}"[:500])
    if 200 <= response.status < 300:
        return _Result("sent", status_code=response.status)
    text = response.data[:200].decode("utf-8", "replace")
    return _Result("failed", status_code=response.status, error=f"HTTP {response.status}: {text}")


def _settle(batch: list[WebhookMessage], results: list[_Result]) -> None:
    # This host's clock stamps sent_at; the give-up and disable checks compare times written
    # on the database's clock (created_at, failing_since) with it, in SQL.
    now = timezone.now()
    recovered: set[int] = set()
    failing: set[int] = set()
    with transaction.atomic():
        too_old = _too_old(
            [m.pk for m, r in zip(batch, results, strict=True) if r.kind == "failed"]
        )
        for message, result in zip(batch, results, strict=True):
            mine = WebhookMessage.objects.filter(pk=message.pk, status=WebhookMessageStatus.PENDING)
            if result.kind == "sent":
                mine.update(
                    status=WebhookMessageStatus.SENT,
                    sent_at=now,
                    next_attempt_at=None,
                    last_status_code=result.status_code,
                    last_error="",
                )
                recovered.add(message.webhook_id)
            elif result.kind == "held":
                mine.update(
                    attempts=F("attempts") - 1,
                    next_attempt_at=db_now_plus(result.delay),
                    last_error=result.error,
                )
            elif result.kind == "dead" or message.pk in too_old:
                mine.update(
                    status=WebhookMessageStatus.DEAD,
                    next_attempt_at=None,
                    last_status_code=result.status_code,
                    last_error=result.error,
                )
                log.warning("webhook message %s dead: %s", message.msg_id, result.error)
                if result.kind != "dead":
                    failing.add(message.webhook_id)
            else:
                delay = min(
                    retry.backoff_seconds(max(1, message.attempts + 1)),
                    settings.WEBHOOK_RETRY_MAX_DELAY_SECONDS,
                )
                mine.update(
                    next_attempt_at=db_now_plus(delay),
                    last_status_code=result.status_code,
                    last_error=result.error,
                )
                failing.add(message.webhook_id)
        if recovered:
            Webhook.objects.filter(pk__in=recovered).update(failing_since=None)
        failing -= recovered
        if failing:
            Webhook.objects.filter(pk__in=failing, failing_since__isnull=True).update(
                failing_since=db_now()
            )
            _disable_the_long_failing(failing)


def _too_old(message_ids: list[int]) -> set[int]:
    """The messages among these first queued WEBHOOK_RETRY_FOR_SECONDS ago or more: no retry."""
    if not message_ids:
        return set()
    return set(
        WebhookMessage.objects.filter(
            pk__in=message_ids,
            created_at__lt=db_now_plus(-settings.WEBHOOK_RETRY_FOR_SECONDS),
        ).values_list("pk", flat=True)
    )


def _disable_the_long_failing(webhook_ids: set[int]) -> None:
    for webhook in Webhook.objects.filter(
        pk__in=webhook_ids,
        failing_since__lt=db_now_plus(-settings.WEBHOOK_DISABLE_AFTER_SECONDS),
        disabled_at__isnull=True,
    ).annotate(failing_for=ExpressionWrapper(db_now() - F("failing_since"), DurationField())):
        days = webhook.failing_for.total_seconds() / 86400
        reason = f"every call failed for {days:.1f} days"
        Webhook.objects.filter(pk=webhook.pk).update(disabled_at=db_now(), disabled_reason=reason)
        keys.invalidate_on_commit(hooks_key(webhook.owner_id))
        log.warning("webhook %s disabled: %s", webhook.pk, reason)
