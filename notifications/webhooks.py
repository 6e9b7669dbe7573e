"""Status webhooks out: an owner registers endpoints for delivery and notification events;
every status change the delivery log records becomes, in the same transaction, one message
per subscribed endpoint (the webhooks outbox), and a final status a completion check from
which the webhooks worker writes `notification.completed`; that worker signs the messages
the Standard Webhooks way and sends them (workers/webhook_sender.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
import urllib.parse
import uuid
from collections.abc import Collection, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from core import cache as keys
from core import db_clock
from core.db_clock import db_now
from notifications.models import (
    CHANNEL_ORDER,
    FINAL_STATUSES,
    CompletionCheck,
    Delivery,
    Notification,
    Owner,
    Webhook,
    WebhookEventType,
    WebhookMessage,
    WebhookMessageStatus,
)

if TYPE_CHECKING:
    from notifications.delivery_log import StatusEvent

log = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
# The delivery statuses that are events, and their names.
STATUS_EVENTS = {
    "sent": WebhookEventType.DELIVERY_SENT,
    "delivered": WebhookEventType.DELIVERY_DELIVERED,
    "read": WebhookEventType.DELIVERY_READ,
    "failed": WebhookEventType.DELIVERY_FAILED,
    "bounced": WebhookEventType.DELIVERY_BOUNCED,
    "dead": WebhookEventType.DELIVERY_DEAD,
}
WAKE_TASK = "clarion.webhooks.send_due"


class UnsafeUrl(ValueError):
    """A URL the webhooks worker must not call (SSRF): not https, or an address that is
    private, loopback, link-local, multicast or reserved."""


# --- Endpoints -------------------------------------------------------------------------------


def secret_new() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def url_check(url: str, *, resolve: bool = True) -> list[str]:
    """The addresses the URL's host resolves to, all of them allowed; raises UnsafeUrl. With
    WEBHOOK_ALLOW_PRIVATE, http:// and private addresses are allowed (tests, a private
    network)."""
    parts = urllib.parse.urlsplit(url)
    allow_private = settings.WEBHOOK_ALLOW_PRIVATE
    if parts.scheme != "https" and not (allow_private and parts.scheme == "http"):
        raise UnsafeUrl("Only https:// URLs are accepted.")
    if not parts.hostname:
        raise UnsafeUrl("The URL has no host.")
    if parts.username or parts.password:
        raise UnsafeUrl("The URL may not carry credentials.")
    if not resolve:
        return []
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise UnsafeUrl(f"The host does not resolve: {exc}") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not allow_private:
        for address in addresses:
            ip = ipaddress.ip_address(address)
            if not ip.is_global or ip.is_multicast:
                raise UnsafeUrl(f"The host resolves to {address}, which is not a public address.")
    return addresses


def webhook_create(*, owner: Owner, url: str, event_types: list[str]) -> Webhook:
    url_check(url)
    webhook = Webhook.objects.create(
        owner=owner, url=url, event_types=sorted(set(event_types)), secret=secret_new()
    )
    keys.invalidate_on_commit(hooks_key(owner.pk))
    return webhook


def webhook_delete(*, webhook: Webhook) -> None:
    webhook.delete()
    keys.invalidate_on_commit(hooks_key(webhook.owner_id))


def webhook_rotate_secret(*, webhook: Webhook) -> Webhook:
    """A new secret; the old one keeps signing for WEBHOOK_SECRET_ROLLOVER_SECONDS."""
    webhook.previous_secret = webhook.secret
    # On the database's clock, as the sender judges it (workers/webhook_sender.py).
    webhook.previous_secret_expires_at = db_clock.now() + timedelta(
        seconds=settings.WEBHOOK_SECRET_ROLLOVER_SECONDS
    )
    webhook.secret = secret_new()
    webhook.save(update_fields=["secret", "previous_secret", "previous_secret_expires_at"])
    return webhook


def webhook_enable(*, webhook: Webhook) -> None:
    """Switch a disabled endpoint back on (its failing run starts afresh)."""
    Webhook.objects.filter(pk=webhook.pk).update(
        disabled_at=None, disabled_reason="", failing_since=None
    )
    keys.invalidate_on_commit(hooks_key(webhook.owner_id))


def webhooks_list(*, owner: Owner) -> QuerySet[Webhook]:
    return Webhook.objects.filter(owner=owner).order_by("-created_at", "-id")


def webhook_messages_replay(*, webhook: Webhook) -> int:
    """Send the endpoint's dead messages again, from scratch (same webhook-id)."""
    with transaction.atomic():
        count = WebhookMessage.objects.filter(
            webhook=webhook, status=WebhookMessageStatus.DEAD
        ).update(
            status=WebhookMessageStatus.PENDING,
            attempts=0,
            next_attempt_at=None,
            # Its retries run for WEBHOOK_RETRY_FOR_SECONDS from now, on the database's clock.
            created_at=db_now(),
        )
        if count:
            transaction.on_commit(webhooks_wake)
    return count


# --- Signing (Standard Webhooks) -------------------------------------------------------------


def webhook_signatures(*, secrets_: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """`webhook-signature`: "v1,<base64 HMAC-SHA256>" for each secret, space-separated, over
    "<msg_id>.<timestamp>.<body>" with the secret's base64 bytes as the key."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    out = []
    for secret in secrets_:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
        digest = hmac.new(key, signed, hashlib.sha256).digest()
        out.append("v1," + base64.b64encode(digest).decode())
    return " ".join(out)


def signing_secrets(webhook: Webhook, now: datetime) -> list[str]:
    current = [webhook.secret]
    expires = webhook.previous_secret_expires_at
    if webhook.previous_secret and expires is not None and expires > now:
        current.append(webhook.previous_secret)
    return current


# --- Events in, messages out -----------------------------------------------------------------


def hooks_key(owner_id: int) -> str:
    """The cache key of the owner's enabled endpoints."""
    return f"webhooks:v1:{owner_id}"


def _owner_hooks(owner_id: int) -> tuple[tuple[int, frozenset[str]], ...]:
    """The owner's enabled endpoints and their event types (cached; most owners have none)."""

    def load() -> tuple[tuple[int, frozenset[str]], ...]:
        return tuple(
            (pk, frozenset(types))
            for pk, types in Webhook.objects.filter(
                owner_id=owner_id, disabled_at__isnull=True
            ).values_list("pk", "event_types")
        )

    return keys.cached(hooks_key(owner_id), load, lambda _: settings.CACHE_TTL_PREFERENCES)


def _wants_completed(hooks: tuple[tuple[int, frozenset[str]], ...]) -> bool:
    return any(WebhookEventType.NOTIFICATION_COMPLETED in types for _, types in hooks)


def webhook_events_emit(
    events: list[StatusEvent], *, completing: Collection[str] | None = None
) -> None:
    """Turn status events (being written in the caller's transaction) into webhook messages
    for the endpoints that want them, and a completion check for each notification that a
    final status may have completed, when its owner has an endpoint that wants
    `notification.completed` (the webhooks worker decides, completion_checks_process).
    `completing` narrows the checks to those notification ids: a caller that knows its
    deliveries were final before (a provider's report after `sent`) passes none."""
    wanted = [e for e in events if e.status in STATUS_EVENTS or e.status in FINAL_STATUSES]
    if not wanted:
        return
    hooks = {owner_id: _owner_hooks(owner_id) for owner_id in {e.owner_id for e in wanted}}
    if not any(hooks.values()):
        return
    rows: list[WebhookMessage] = []
    checks: set[str] = set()
    for event in wanted:
        owner_hooks = hooks[event.owner_id]
        event_type = STATUS_EVENTS.get(event.status)
        for webhook_id, types in owner_hooks:
            if event_type is not None and event_type in types:
                rows.append(
                    _message(
                        webhook_id,
                        event_type,
                        f"{event_type}:{event.delivery_id}:{event.at.isoformat()}",
                        {
                            "notification_id": event.notification_id,
                            "delivery_id": event.delivery_id,
                            "recipient": event.recipient_id,
                            "channel": event.channel,
                            "status": event.status,
                            "detail": event.detail,
                            "at": event.at.isoformat(),
                        },
                    )
                )
        if (
            event.status in FINAL_STATUSES
            and (completing is None or event.notification_id in completing)
            and _wants_completed(owner_hooks)
        ):
            checks.add(event.notification_id)
    if rows:
        WebhookMessage.objects.bulk_create(rows, ignore_conflicts=True)
    if checks:
        CompletionCheck.objects.bulk_create(
            [CompletionCheck(notification_id=nid) for nid in sorted(checks)]
        )
    if rows or checks:
        transaction.on_commit(webhooks_wake)


def completion_checks_add(*, owner_id: int, notification_ids: list[uuid.UUID]) -> None:
    """Notifications accepted with every delivery final (all skipped), in the accepting
    transaction: a completion check each when the owner has an endpoint that wants
    `notification.completed`. The endpoints come from the cache: no query for the many
    owners without one."""
    if not notification_ids or not _wants_completed(_owner_hooks(owner_id)):
        return
    CompletionCheck.objects.bulk_create(
        [CompletionCheck(notification_id=nid) for nid in notification_ids]
    )
    transaction.on_commit(webhooks_wake)


def completion_checks_process(*, batch_size: int) -> int:
    """The webhooks worker's step before sending: claim the completion checks (SKIP LOCKED,
    so several workers share them), and for each of their notifications whose deliveries are
    all final as committed now, write one `notification.completed` message per endpoint that
    wants it; delete exactly the checks claimed, in the same transaction. Rounds of
    `batch_size` until none is left; returns how many checks it handled.

    Exactly once: the check of whichever settling transaction commits last is read after that
    commit, so it sees every delivery final even when two workers settled two channels at
    once and each saw the other's row unfinished; a second check that finds the notification
    complete again writes nothing new, since the event key is unique per endpoint. The
    deliveries and notifications are read without locks: a settling worker never waits for
    this, nor this for it. Messages are inserted in (endpoint, notification) order, so two
    workers inserting the same keys wait for one another in one order, never in a circle."""
    handled = 0
    while True:
        with transaction.atomic():
            claimed = list(
                CompletionCheck.objects.select_for_update(skip_locked=True)
                .order_by("id")
                .values_list("pk", "notification_id")[:batch_size]
            )
            if not claimed:
                return handled
            _completions_write({nid for _, nid in claimed})
            CompletionCheck.objects.filter(pk__in=[pk for pk, _ in claimed]).delete()
        handled += len(claimed)
        if len(claimed) < batch_size:
            return handled


def _completions_write(notification_ids: set[uuid.UUID]) -> None:
    statuses_of: dict[uuid.UUID, dict[str, str]] = {}
    unfinished: set[uuid.UUID] = set()
    for nid, channel, status in Delivery.objects.filter(
        notification_id__in=notification_ids
    ).values_list("notification_id", "channel", "status"):
        statuses_of.setdefault(nid, {})[channel] = status
        if status not in FINAL_STATUSES:
            unfinished.add(nid)
    complete = sorted(set(statuses_of) - unfinished)
    if not complete:
        return
    rows: list[WebhookMessage] = []
    for nid, owner_id, recipient in (
        Notification.objects.filter(pk__in=complete)
        .order_by("pk")
        .values_list("pk", "owner_id", "recipient__external_id")
    ):
        statuses = statuses_of[nid]
        for webhook_id, types in _owner_hooks(owner_id):
            if WebhookEventType.NOTIFICATION_COMPLETED in types:
                rows.append(
                    _message(
                        webhook_id,
                        WebhookEventType.NOTIFICATION_COMPLETED,
                        f"notification.completed:{nid}",
                        {
                            "notification_id": str(nid),
                            "recipient": recipient,
                            "deliveries": {c: statuses[c] for c in CHANNEL_ORDER if c in statuses},
                        },
                    )
                )
    if rows:
        rows.sort(key=lambda row: (row.webhook_id, row.event_key))
        WebhookMessage.objects.bulk_create(rows, ignore_conflicts=True)


def _message(
    webhook_id: int, event_type: str, event_key: str, data: dict[str, Any]
) -> WebhookMessage:
    return WebhookMessage(
        webhook_id=webhook_id,
        msg_id=f"msg_{uuid.uuid4().hex}",
        event_type=event_type,
        event_key=event_key[:200],
        payload={"type": event_type, "timestamp": timezone.now().isoformat(), "data": data},
    )


def webhooks_wake() -> None:
    """Ask the webhooks worker to send what is due. Best effort: the beat schedule does the
    same every WEBHOOK_SWEEP_SECONDS."""
    from project.celery import app as celery_app

    try:
        celery_app.send_task(WAKE_TASK, queue="webhooks", retry=False)
    except Exception as exc:  # noqa: BLE001 - any broker failure: the schedule sends them
        log.warning("could not publish %s (the schedule will send them): %s", WAKE_TASK, exc)
