"""Reads: cached lookups on the creation path and the shapes the API returns."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import F, Prefetch, Q, QuerySet

from core import cache as keys
from notifications.models import (
    CHANNEL_ORDER,
    INBOX_STATUSES,
    UNREAD_STATUSES,
    Channel,
    Delivery,
    DeliveryStatus,
    Device,
    InboxCounter,
    Notification,
    Owner,
    Preference,
    Recipient,
    Template,
    Topic,
    TopicSubscription,
)
from notifications.schedules import (
    Cap,
    DigestRule,
    EscalationStep,
    QuietHours,
    RuleError,
    caps_parse,
    digest_parse,
    escalation_parse,
    quiet_hours_parse,
)

if TYPE_CHECKING:
    from notifications.tokens import RecipientClaims

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecipientContext:
    """What routing needs to know of a recipient, as cached for CACHE_TTL_PREFERENCES."""

    id: int
    external_id: str
    email: str
    phone: str
    locale: str
    timezone: str
    # (category, channel) -> enabled; category "" is the channel-wide switch.
    preferences: dict[tuple[str, str], bool]
    quiet_hours: QuietHours | None = None
    # channel -> why its address is on the owner's suppression list (SuppressionReason).
    suppressed: dict[str, str] = field(default_factory=dict)

    def allows(self, *, channel: str, category: str) -> bool:
        if category and (category, channel) in self.preferences:
            return self.preferences[(category, channel)]
        return self.preferences.get(("", channel), True)


def _recipient_context(recipient: Recipient, preferences: list[Preference]) -> RecipientContext:
    from notifications.suppressions import recipient_suppressions

    return RecipientContext(
        id=recipient.pk,
        external_id=recipient.external_id,
        email=recipient.email,
        phone=recipient.phone,
        locale=recipient.locale,
        timezone=recipient.timezone,
        preferences={(p.category, p.channel): p.enabled for p in preferences},
        quiet_hours=_quiet_hours_or_none(recipient.quiet_hours),
        suppressed=recipient_suppressions(recipient),
    )


def _quiet_hours_or_none(document: Any) -> QuietHours | None:
    """A stored document was checked when saved; one edited by hand into something unusable
    is ignored (logged) rather than blocking every send to the recipient."""
    try:
        return quiet_hours_parse(document)
    except RuleError as exc:
        log.warning("ignoring unusable quiet hours %r: %s", document, exc)
        return None


def recipient_context_get(*, owner_id: int, external_id: str) -> RecipientContext | None:
    def load() -> RecipientContext | None:
        recipient = (
            Recipient.objects.filter(
                owner_id=owner_id, external_id=external_id, erased_at__isnull=True
            )
            .prefetch_related("preferences")
            .first()
        )
        if recipient is None:
            return None
        return _recipient_context(recipient, list(recipient.preferences.all()))

    return keys.cached(
        keys.recipient_key(owner_id, external_id),
        load,
        lambda context: settings.CACHE_TTL_PREFERENCES if context is not None else 0,
    )


def recipient_contexts_get_many(
    *, owner_id: int, external_ids: list[str]
) -> dict[str, RecipientContext]:
    """recipient_context_get() for many recipients: one Redis round trip for the cached ones;
    unknown recipients are absent from the answer."""
    by_key = {
        keys.recipient_key(owner_id, external_id): external_id for external_id in external_ids
    }
    contexts = {by_key[key]: value for key, value in cache.get_many(list(by_key)).items()}
    for external_id in set(external_ids) - set(contexts):
        context = recipient_context_get(owner_id=owner_id, external_id=external_id)
        if context is not None:
            contexts[external_id] = context
    return contexts


def devices_active_get(*, recipient_id: int) -> list[tuple[str, str]]:
    """Active push devices as (platform, token), cached for CACHE_TTL_DEVICES."""

    def load() -> tuple[tuple[str, str], ...]:
        return tuple(
            Device.objects.filter(recipient_id=recipient_id, active=True)
            .order_by("created_at")
            .values_list("platform", "token")
        )

    return list(
        keys.cached(
            keys.devices_key(recipient_id), load, lambda devices: settings.CACHE_TTL_DEVICES
        )
    )


@dataclass(frozen=True)
class TemplateSnapshot:
    id: int
    key: str
    category: str
    locale: str
    content: dict[str, dict[str, str]]
    translations: dict[str, dict[str, dict[str, str]]]
    frequency_caps: dict[str, Cap] = field(default_factory=dict)
    frequency_cap_scope: str = "template"
    escalation: list[EscalationStep] = field(default_factory=list)
    digest: DigestRule | None = None

    @property
    def cap_scope_key(self) -> str:
        """What a frequency cap counts over: this template, or its whole category."""
        if self.frequency_cap_scope == "category":
            return f"category:{self.category}"
        return f"template:{self.key}"


def template_snapshot_get(*, owner_id: int, key: str) -> TemplateSnapshot | None:
    def load() -> TemplateSnapshot | None:
        template = Template.objects.filter(owner_id=owner_id, key=key).first()
        if template is None:
            return None
        return TemplateSnapshot(
            id=template.pk,
            key=template.key,
            category=template.category,
            locale=template.locale,
            content=template.content,
            translations=template.translations,
            frequency_caps=_rule_or_default(caps_parse, template.frequency_caps, {}),
            frequency_cap_scope=template.frequency_cap_scope,
            escalation=_rule_or_default(escalation_parse, template.escalation, []),
            digest=_rule_or_default(digest_parse, template.digest, None),
        )

    return keys.cached(
        keys.template_key(owner_id, key),
        load,
        lambda snapshot: settings.CACHE_TTL_TEMPLATES if snapshot is not None else 0,
    )


def _rule_or_default(parse: Any, stored: Any, default: Any) -> Any:
    """Rules are checked when a template is saved; one edited by hand into something
    unusable is ignored (logged) rather than failing every send of the template."""
    try:
        return parse(stored if stored is not None else default)
    except RuleError as exc:
        log.warning("ignoring an unusable template rule %r: %s", stored, exc)
        return default


def recipient_get(*, owner: Owner, external_id: str) -> Recipient | None:
    return Recipient.objects.filter(
        owner=owner, external_id=external_id, erased_at__isnull=True
    ).first()


def preferences_document(*, recipient: Recipient) -> dict[str, Any]:
    """The API's preferences shape: every channel's switch, and explicit category rules."""
    channels = {channel: True for channel in CHANNEL_ORDER}
    categories: dict[str, dict[str, bool]] = {}
    for pref in recipient.preferences.order_by("category", "channel"):
        if pref.category:
            categories.setdefault(pref.category, {})[pref.channel] = pref.enabled
        else:
            channels[pref.channel] = pref.enabled
    return {
        "channels": channels,
        "categories": categories,
        "quiet_hours": recipient.quiet_hours,
    }


def template_categories(*, owner_id: int) -> list[str]:
    """The distinct non-empty categories of an owner's templates, in order."""
    return list(
        Template.objects.filter(owner_id=owner_id)
        .exclude(category="")
        .order_by("category")
        .values_list("category", flat=True)
        .distinct()
    )


def template_list(*, owner: Owner) -> QuerySet[Template]:
    return Template.objects.filter(owner=owner).order_by("key")


def template_get(*, owner: Owner, key: str) -> Template | None:
    return Template.objects.filter(owner=owner, key=key).first()


def notification_get(*, owner: Owner, notification_id: uuid.UUID) -> Notification | None:
    return (
        Notification.objects.filter(owner=owner, pk=notification_id)
        .select_related("recipient", "topic")
        .prefetch_related(Prefetch("deliveries", queryset=Delivery.objects.order_by("id")))
        .first()
    )


def notifications_by_key(
    *, owner: Owner, cancel_key: str = "", idempotency_key: str = ""
) -> list[Notification]:
    """The owner's notifications created with this cancel_key, or with this Idempotency-Key
    (one at most); oldest first."""
    if bool(cancel_key) == bool(idempotency_key):
        raise ValueError("give exactly one of cancel_key and idempotency_key")
    found = Notification.objects.filter(owner=owner)
    if cancel_key:
        found = found.filter(cancel_key=cancel_key)
    else:
        found = found.filter(idempotency_key=idempotency_key)
    return list(found.order_by("created_at", "pk"))


_IN_PROGRESS = {DeliveryStatus.QUEUED, DeliveryStatus.RETRYING}
_DONE = {DeliveryStatus.SENT, DeliveryStatus.DELIVERED, DeliveryStatus.READ}
# Did not reach the recipient: given up on by us (dead), or reported by the provider.
_FAILED = {DeliveryStatus.DEAD, DeliveryStatus.BOUNCED, DeliveryStatus.FAILED}


def notification_summary_status(statuses: list[str]) -> str:
    """One word for a notification from its deliveries' statuses:
    scheduled / in_progress while any is waiting; then sent, partially_failed, failed,
    skipped or cancelled once all are final."""
    active = [s for s in statuses if s not in (DeliveryStatus.SKIPPED, DeliveryStatus.CANCELLED)]
    if not active:
        if statuses and all(s == DeliveryStatus.CANCELLED for s in statuses):
            return "cancelled"
        return "skipped"
    if any(s in _IN_PROGRESS for s in active):
        return "in_progress"
    if any(s == DeliveryStatus.SCHEDULED for s in active):
        return "scheduled"
    dead = sum(1 for s in active if s in _FAILED)
    if dead == len(active):
        return "failed"
    if dead:
        return "partially_failed"
    if all(s == DeliveryStatus.READ for s in active):
        return "read"
    if all(s in (DeliveryStatus.DELIVERED, DeliveryStatus.READ) for s in active):
        return "delivered"
    return "sent"


# A topic notification's `status` in the API and the admin.
FANNING_OUT = "fanning_out"
FANNED_OUT = "fanned_out"
FANOUT_CANCELLED = "cancelled"


def topic_notification_status(notification: Notification) -> str:
    if notification.fanout_cancelled_at is not None:
        return FANOUT_CANCELLED
    return FANNING_OUT if notification.fanout_finished_at is None else FANNED_OUT


def notification_detail(*, notification: Notification) -> dict[str, Any]:
    from notifications.delivery_log import get_delivery_log

    deliveries = list(notification.deliveries.all())
    attempts = get_delivery_log().attempts_for_deliveries(
        notification_id=str(notification.pk), delivery_ids=[d.pk for d in deliveries]
    )
    if notification.topic_id is not None or notification.recipients_total is not None:
        status = topic_notification_status(notification)
    else:
        status = notification_summary_status([d.status for d in deliveries])
    return {
        "id": str(notification.pk),
        "status": status,
        # NULL for a topic notification, whose children each have their recipient.
        "recipient": notification.recipient.external_id if notification.recipient else None,
        "topic": notification.topic.key if notification.topic else None,
        "parent": str(notification.parent_id) if notification.parent_id else None,
        "recipients_total": notification.recipients_total,
        "recipients_done": (
            notification.recipients_done if notification.recipients_total is not None else None
        ),
        "template": notification.template_key,
        "category": notification.category,
        "priority": notification.priority,
        "locale": notification.locale,
        "data": notification.data,
        "send_at": notification.send_at,
        "created_at": notification.created_at,
        "deliveries": [
            {
                "id": d.pk,
                "channel": d.channel,
                "status": d.status,
                "reason": d.skip_reason or None,
                "unless": d.escalate_unless or None,
                "provider": d.provider or None,
                "provider_message_id": d.provider_message_id or None,
                "attempt_count": d.attempts,
                "last_error": d.last_error or None,
                "next_attempt_at": d.next_attempt_at,
                "sent_at": d.sent_at,
                "delivered_at": d.delivered_at,
                "read_at": d.read_at,
                "attempts": [a.as_api() for a in attempts.get(d.pk, [])],
            }
            for d in deliveries
        ],
    }


# --- In-app inbox ---------------------------------------------------------------------------


@dataclass(frozen=True)
class InboxRecipient:
    """Whom a verified recipient token speaks for."""

    owner_id: int
    recipient_id: int
    external_id: str


def recipient_for_token(*, token: str) -> InboxRecipient | None:
    """The recipient a token was issued for: None when the token is forged, expired, or its
    recipient (or owner) has been deleted since."""
    from notifications.tokens import recipient_token_claims

    claims = recipient_token_claims(token)
    if claims is None:
        return None
    return recipient_for_claims(claims=claims)


def _recipient_of_claims(claims: RecipientClaims) -> QuerySet[Recipient]:
    return Recipient.objects.filter(
        pk=claims.recipient_id, owner_id=claims.owner_id, erased_at__isnull=True
    )


def recipient_for_claims(*, claims: RecipientClaims) -> InboxRecipient | None:
    """The recipient of a verified token's claims: None when it (or its owner) is gone."""
    external_id = _recipient_of_claims(claims).values_list("external_id", flat=True).first()
    if external_id is None:
        return None
    return InboxRecipient(
        owner_id=claims.owner_id, recipient_id=claims.recipient_id, external_id=external_id
    )


def inbox_deliveries(*, recipient_id: int) -> QuerySet[Delivery]:
    """The recipient's inbox: its web deliveries from acceptance on (see INBOX_STATUSES)."""
    return Delivery.objects.filter(
        channel=Channel.WEB,
        notification__recipient_id=recipient_id,
        status__in=INBOX_STATUSES,
    )


def inbox_list(
    *, recipient_id: int, unread: bool | None = None, archived: bool = False
) -> QuerySet[Delivery]:
    """Archived or not-archived entries; unread True/False narrows to unread/read ones.
    Unordered: the paginator orders it, newest first."""
    entries = inbox_deliveries(recipient_id=recipient_id).filter(archived_at__isnull=not archived)
    if unread is True:
        entries = entries.filter(status__in=UNREAD_STATUSES)
    elif unread is False:
        entries = entries.exclude(status__in=UNREAD_STATUSES)
    return entries.select_related("notification")


def inbox_unread_count(*, recipient_id: int) -> int:
    return (
        inbox_deliveries(recipient_id=recipient_id)
        .filter(status__in=UNREAD_STATUSES, archived_at__isnull=True)
        .count()
    )


def inbox_entry_get(*, recipient_id: int, notification_id: uuid.UUID) -> Delivery | None:
    return (
        inbox_deliveries(recipient_id=recipient_id)
        .filter(notification_id=notification_id)
        .select_related("notification")
        .first()
    )


def inbox_entry(delivery: Delivery) -> dict[str, Any]:
    """The API's shape of an inbox entry (a web delivery loaded with its notification)."""
    return {
        "id": str(delivery.notification_id),
        "title": delivery.content.get("title", ""),
        "body": delivery.content.get("body", ""),
        "data": delivery.notification.data,
        "created_at": delivery.notification.created_at,
        "status": delivery.status,
        "read_at": delivery.read_at,
    }


@dataclass(frozen=True)
class InboxCatchUp:
    """What a socket has missed: `entries` in position order, and `position`, up to which
    the socket has now seen everything it can be sent (its new `since`): the recipient's
    last position when it was read, or the last entry's when WS_BACKLOG_MAX cut the list.
    `unpushed`: unread entries no push has reached yet (no position: a `web` pool that is
    down or behind), which the socket's process may push itself."""

    position: int
    entries: list[Delivery]
    unpushed: list[int]


def inbox_open(
    *, claims: RecipientClaims, since: int | None, limit: int
) -> tuple[InboxRecipient, InboxCatchUp] | None:
    """A connecting socket's recipient, with what it missed (see inbox_catch_up); None when
    the recipient (or its owner) is gone. The recipient and its last position in one query."""
    row = _recipient_of_claims(claims).values_list("external_id", "inbox_counter__position").first()
    if row is None:
        return None
    recipient = InboxRecipient(
        owner_id=claims.owner_id, recipient_id=claims.recipient_id, external_id=row[0]
    )
    return recipient, _inbox_catch_up(recipient.recipient_id, row[1] or 0, since, limit)


def inbox_catch_up(*, recipient_id: int, since: int | None, limit: int) -> InboxCatchUp:
    """The unread, not archived entries of a recipient's inbox with a position after `since`
    (all of them without one), oldest first, at most `limit`."""
    position = (
        InboxCounter.objects.filter(recipient_id=recipient_id)
        .values_list("position", flat=True)
        .first()
    )
    return _inbox_catch_up(recipient_id, position or 0, since, limit)


def _inbox_catch_up(
    recipient_id: int, position: int, since: int | None, limit: int
) -> InboxCatchUp:
    if since is not None and since > position:
        # Past anything given to this recipient: not a position of this inbox (a database
        # restored from a backup, a cursor of another server): everything unread is sent.
        since = None
    # `position` was read before these entries: every position up to it had committed, so
    # none of them is missing here, and one given later reaches the socket live (it joined
    # the recipient's group before either read).
    rows = list(
        inbox_deliveries(recipient_id=recipient_id)
        .filter(
            Q(inbox_position__gt=since or 0) | Q(inbox_position__isnull=True),
            status__in=UNREAD_STATUSES,
            archived_at__isnull=True,
        )
        .select_related("notification")
        .order_by(F("inbox_position").asc(nulls_last=True))[:limit]
    )
    entries = [d for d in rows if d.inbox_position is not None]
    if len(rows) == limit and rows[-1].inbox_position is not None:
        # Cut by the limit: what follows the last entry sent comes on the next catch-up.
        position = rows[-1].inbox_position
    return InboxCatchUp(
        position=position,
        entries=entries,
        unpushed=[d.pk for d in rows if d.inbox_position is None],
    )


# --- Topics ---------------------------------------------------------------------------------


def topic_get(*, owner: Owner, key: str) -> Topic | None:
    return Topic.objects.filter(owner=owner, key=key).first()


def topic_detail(*, topic: Topic) -> dict[str, Any]:
    return {
        "key": topic.key,
        "name": topic.name,
        "subscribers_count": topic.subscriptions.count(),
        "created_at": topic.created_at,
    }


def topic_subscriber_contexts(
    *, topic_id: int, after: int, until: int, limit: int
) -> list[RecipientContext]:
    """The routing contexts of the next `limit` subscribers of a topic whose recipient id is
    in (after, until], in recipient id order: the subscriptions joined with their recipients
    in one query, their preferences in a second, as plain rows and not cached (a topic
    fan-out reads each subscriber once, so caching them would only push out the recipients
    that single sends keep reading)."""
    chunk = TopicSubscription.objects.filter(
        topic_id=topic_id, recipient_id__gt=after, recipient_id__lte=until
    ).order_by("recipient_id")
    rows = list(
        chunk.values_list(
            "recipient_id",
            "recipient__external_id",
            "recipient__email",
            "recipient__phone",
            "recipient__locale",
            "recipient__timezone",
            "recipient__quiet_hours",
        )[:limit]
    )
    if not rows:
        return []
    switches: dict[int, dict[tuple[str, str], bool]] = {}
    for recipient_id, category, channel, enabled in Preference.objects.filter(
        recipient_id__in=chunk.filter(recipient_id__lte=rows[-1][0]).values("recipient_id")
    ).values_list("recipient_id", "category", "channel", "enabled"):
        switches.setdefault(recipient_id, {})[(category, channel)] = enabled
    return [
        RecipientContext(
            id=pk,
            external_id=external_id,
            email=email,
            phone=phone,
            locale=locale,
            timezone=tz,
            preferences=switches.get(pk, {}),
            quiet_hours=_quiet_hours_or_none(quiet) if quiet else None,
        )
        for pk, external_id, email, phone, locale, tz, quiet in rows
    ]
