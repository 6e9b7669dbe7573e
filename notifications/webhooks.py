"""Status webhooks out: an owner registers endpoints for delivery and notification events;
every status change the delivery log records becomes, in the same transaction, one message
per subscribed endpoint (the webhooks outbox), which the webhooks worker signs the Standard
Webhooks way and sends (workers/webhook_sender.py)."""

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
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from notifications import cache as keys
from notifications.models import (
    FINAL_STATUSES,
    Delivery,
    Owner,
    Webhook,
    WebhookEventType,
    WebhookMessage,
    WebhookMessageStatus,
)

if TYPE_CHECKING:
    from workers.delivery_log import StatusEvent

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
    webhook.previous_secret_expires_at = timezone.now() + timedelta(
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
            created_at=timezone.now(),
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


def webhook_events_emit(events: list[StatusEvent]) -> None:
    """Turn status events (being written in the caller's transaction) into webhook messages
    for the endpoints that want them, and a `notification.completed` once every delivery of
    a notification is final."""
    wanted = [e for e in events if e.status in STATUS_EVENTS]
    if not wanted:
        return
    hooks = {owner_id: _owner_hooks(owner_id) for owner_id in {e.owner_id for e in wanted}}
    if not any(hooks.values()):
        return
    rows: list[WebhookMessage] = []
    completed_wanted: dict[str, StatusEvent] = {}
    for event in wanted:
        event_type = STATUS_EVENTS[event.status]
        for webhook_id, types in hooks[event.owner_id]:
            if event_type in types:
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
            if WebhookEventType.NOTIFICATION_COMPLETED in types:
                completed_wanted[event.notification_id] = event
    if completed_wanted:
        # One read of every delivery of these notifications: which are complete, and how.
        statuses_of: dict[str, dict[str, str]] = {}
        unfinished: set[str] = set()
        for nid, channel, status in Delivery.objects.filter(
            notification_id__in=list(completed_wanted)
        ).values_list("notification_id", "channel", "status"):
            statuses_of.setdefault(str(nid), {})[channel] = status
            if status not in FINAL_STATUSES:
                unfinished.add(str(nid))
        for notification_id, event in completed_wanted.items():
            if notification_id in unfinished:
                continue
            statuses = statuses_of.get(notification_id, {})
            for webhook_id, types in hooks[event.owner_id]:
                if WebhookEventType.NOTIFICATION_COMPLETED in types:
                    rows.append(
                        _message(
                            webhook_id,
                            WebhookEventType.NOTIFICATION_COMPLETED,
                            f"notification.completed:{notification_id}",
                            {
                                "notification_id": notification_id,
                                "recipient": event.recipient_id,
                                "deliveries": statuses,
                            },
                        )
                    )
    if rows:
        WebhookMessage.objects.bulk_create(rows, ignore_conflicts=True)
        transaction.on_commit(webhooks_wake)


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
