"""Writes: API keys, recipients, preferences, devices, templates, notification creation and
the in-app inbox. API views, consumers, admin actions and management commands call these."""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import phonenumbers
import structlog
from django.conf import settings
from django.db import IntegrityError, models, transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from notifications import cache as keys
from notifications import metrics, templating
from notifications.logs import scoped_log_context
from notifications.models import (
    CHANNEL_ORDER,
    INBOX_STATUSES,
    UNACKNOWLEDGED_STATUSES,
    UNREAD_STATUSES,
    ApiKey,
    Channel,
    Delivery,
    DeliveryStatus,
    Device,
    IdempotencyRecord,
    Notification,
    Owner,
    Preference,
    Priority,
    Recipient,
    SkipReason,
    Template,
)
from notifications.selectors import (
    RecipientContext,
    TemplateSnapshot,
    devices_active_get,
    recipient_context_get,
    recipient_contexts_get_many,
    template_snapshot_get,
)

API_KEY_PREFIX = "clr_"

log = logging.getLogger(__name__)


class ValidationFailed(Exception):
    """Bad input to a service; `fields` maps a field path to messages (a 400 in the API)."""

    def __init__(self, fields: dict[str, list[str]]):
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in fields.items()))
        self.fields = fields


class NotFound(Exception):
    """A referenced object does not exist for this owner (a 404, or a 400 inside a body)."""


# --- API keys -------------------------------------------------------------------------------


def api_key_hash(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_create(*, owner_name: str, name: str) -> tuple[ApiKey, str]:
    """Create a key for the owner named `owner_name` (created if new); the raw key is
    returned once and never stored."""
    raw_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        owner, _ = Owner.objects.get_or_create(name=owner_name)
        api_key = ApiKey.objects.create(
            owner=owner, name=name, prefix=raw_key[:12], key_hash=api_key_hash(raw_key)
        )
    return api_key, raw_key


def api_key_revoke(*, api_key: ApiKey) -> None:
    api_key.revoked_at = timezone.now()
    api_key.save(update_fields=["revoked_at"])
    keys.invalidate_on_commit(keys.api_key_key(api_key.key_hash))


# --- Recipients, preferences, devices -------------------------------------------------------

RECIPIENT_FIELDS = ("email", "phone", "locale", "timezone")


def _normalise_contact(values: dict[str, Any]) -> dict[str, str]:
    errors: dict[str, list[str]] = {}
    clean: dict[str, str] = {}
    for field in RECIPIENT_FIELDS:
        if field not in values:
            continue
        value = values[field]
        if value is None:
            value = ""
        if not isinstance(value, str):
            errors[field] = ["Must be a string."]
            continue
        value = value.strip()
        if field == "phone" and value:
            try:
                number = phonenumbers.parse(value, None)
            except phonenumbers.NumberParseException:
                number = None
            if (
                number is None
                or not value.startswith("+")
                or not phonenumbers.is_valid_number(number)
            ):
                errors[field] = ["Enter a valid phone number in E.164 form, e.g. +14155550100."]
                continue
            value = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        if field == "timezone" and value:
            try:
                zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                errors[field] = ["Unknown time zone; use an IANA name such as Europe/Paris."]
                continue
        clean[field] = value
    if errors:
        raise ValidationFailed(errors)
    return clean


def recipient_invalidate(*, recipient: Recipient) -> None:
    keys.invalidate_on_commit(
        keys.recipient_key(recipient.owner_id, recipient.external_id),
        keys.devices_key(recipient.pk),
    )


def recipient_upsert(*, owner: Owner, external_id: str, **contact: Any) -> tuple[Recipient, bool]:
    """Create or update a recipient; only the contact fields given are changed."""
    clean = _normalise_contact(contact)
    with transaction.atomic():
        recipient, created = Recipient.objects.get_or_create(
            owner=owner, external_id=external_id, defaults=clean
        )
        if not created:
            changed = [f for f, v in clean.items() if getattr(recipient, f) != v]
            if changed:
                for field in changed:
                    setattr(recipient, field, clean[field])
                recipient.save(update_fields=[*changed, "updated_at"])
        recipient_invalidate(recipient=recipient)
    return recipient, created


def preferences_update(*, recipient: Recipient, document: Any) -> None:
    """Apply a partial preferences document: {"channels": {ch: bool}, "categories":
    {category: {ch: bool}}}; whatever is absent keeps its current value."""
    errors: dict[str, list[str]] = {}
    rows: dict[tuple[str, str], bool] = {}
    if not isinstance(document, dict):
        raise ValidationFailed({"non_field_errors": ["Must be an object."]})
    for name in document:
        if name not in ("channels", "categories"):
            errors[name] = ["Unknown field; use channels and categories."]

    def take(switches: Any, category: str, path: str) -> None:
        if not isinstance(switches, dict):
            errors[path] = ["Must be an object of channel: true|false."]
            return
        for channel, enabled in switches.items():
            if channel not in CHANNEL_ORDER:
                errors[f"{path}.{channel}"] = [f"Unknown channel; use {', '.join(CHANNEL_ORDER)}."]
            elif not isinstance(enabled, bool):
                errors[f"{path}.{channel}"] = ["Must be true or false."]
            else:
                rows[(category, channel)] = enabled

    take(document.get("channels", {}), "", "channels")
    categories = document.get("categories", {})
    if not isinstance(categories, dict):
        errors["categories"] = ["Must be an object keyed by category."]
    else:
        for category, switches in categories.items():
            if not category or len(category) > 100:
                errors[f"categories.{category}"] = ["A category name is 1 to 100 characters."]
                continue
            take(switches, category, f"categories.{category}")
    if errors:
        raise ValidationFailed(errors)
    with transaction.atomic():
        for (category, channel), enabled in rows.items():
            Preference.objects.update_or_create(
                recipient=recipient,
                category=category,
                channel=channel,
                defaults={"enabled": enabled},
            )
        recipient_invalidate(recipient=recipient)


def device_register(*, recipient: Recipient, platform: str, token: str) -> tuple[Device, bool]:
    """Register (or reactivate) a push token. A token belongs to one recipient of an owner at
    a time: a phone that changes hands stops receiving the previous user's pushes."""
    with transaction.atomic():
        moved = Device.objects.filter(
            recipient__owner_id=recipient.owner_id, platform=platform, token=token
        ).exclude(recipient=recipient)
        for previous in moved.select_related("recipient"):
            recipient_invalidate(recipient=previous.recipient)
        moved.delete()
        device, created = Device.objects.get_or_create(
            recipient=recipient, platform=platform, token=token
        )
        if not device.active:
            device.active = True
            device.save(update_fields=["active", "updated_at"])
        recipient_invalidate(recipient=recipient)
    return device, created


# --- Templates ------------------------------------------------------------------------------


def _template_validate(content: Any, translations: Any) -> None:
    errors: dict[str, list[str]] = {}
    for check, value in (
        (templating.validate_content, content),
        (templating.validate_translations, translations),
    ):
        try:
            check(value)
        except templating.TemplateError as exc:
            errors.update(exc.fields)
    if errors:
        raise ValidationFailed(errors)


def template_invalidate(*, template: Template) -> None:
    keys.invalidate_on_commit(keys.template_key(template.owner_id, template.key))


def template_save(
    *,
    owner: Owner,
    key: str,
    category: str,
    locale: str,
    content: dict[str, Any],
    translations: dict[str, Any] | None = None,
    create_only: bool = False,
) -> tuple[Template, bool]:
    """Create or replace a template after checking every field compiles."""
    translations = translations or {}
    _template_validate(content, translations)
    values = {
        "category": category,
        "locale": locale,
        "content": content,
        "translations": translations,
    }
    with transaction.atomic():
        if create_only:
            if Template.objects.filter(owner=owner, key=key).exists():
                raise ValidationFailed({"key": ["A template with this key already exists."]})
            template, created = Template.objects.create(owner=owner, key=key, **values), True
        else:
            template, created = Template.objects.update_or_create(
                owner=owner, key=key, defaults=values
            )
        template_invalidate(template=template)
    return template, created


def template_delete(*, template: Template) -> None:
    with transaction.atomic():
        template_invalidate(template=template)
        template.delete()


# --- Notifications --------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    channel: str
    status: str
    reason: str = ""
    address: str = ""


def channels_route(
    *,
    requested: list[str] | None,
    template: TemplateSnapshot,
    recipient: RecipientContext,
    priority: str,
    scheduled: bool,
) -> list[Route]:
    """requested ∩ template ∩ preferences ∩ addresses, each exclusion with its reason."""
    template_channels = [c for c in CHANNEL_ORDER if c in template.content]
    wanted = requested if requested is not None else template_channels
    pending = DeliveryStatus.SCHEDULED if scheduled else DeliveryStatus.QUEUED
    routes = []
    for channel in wanted:
        if channel not in template.content:
            routes.append(Route(channel, DeliveryStatus.SKIPPED, SkipReason.NOT_IN_TEMPLATE))
            continue
        if priority != Priority.CRITICAL and not recipient.allows(
            channel=channel, category=template.category
        ):
            routes.append(Route(channel, DeliveryStatus.SKIPPED, SkipReason.OPTED_OUT))
            continue
        address = ""
        if channel == Channel.EMAIL:
            address = recipient.email
        elif channel == Channel.SMS:
            address = recipient.phone
        elif channel == Channel.PUSH:
            has_device = bool(devices_active_get(recipient_id=recipient.id))
            address = "devices" if has_device else ""
        else:
            address = recipient.external_id
        if not address:
            routes.append(Route(channel, DeliveryStatus.SKIPPED, SkipReason.NO_ADDRESS))
            continue
        routes.append(Route(channel, pending, "", address if channel != Channel.PUSH else ""))
    return routes


@dataclass(frozen=True)
class IdempotencyClaim:
    """The key a creation writes its backstop record under, in its own transaction."""

    key: str
    fingerprint: str


class IdempotencyRecordExists(Exception):
    """Another request committed the same idempotency key first."""


@dataclass
class PreparedNotification:
    """A notification rendered and routed, not yet written."""

    notification: Notification
    deliveries: list[Delivery]
    routes: list[Route]
    recipient_external_id: str
    idempotency: IdempotencyClaim | None

    @property
    def body(self) -> dict[str, Any]:
        """The 202 body."""
        return {
            "id": str(self.notification.pk),
            "status": "accepted",
            "deliveries": [
                {"channel": route.channel, "status": route.status}
                | ({"reason": route.reason} if route.reason else {})
                for route in self.routes
            ],
        }


@dataclass(frozen=True)
class NotificationRequest:
    """One notification as the API asks for it."""

    recipient: str | dict[str, Any]
    template_key: str
    data: dict[str, Any]
    channels: list[str] | None = None
    priority: str = Priority.NORMAL
    send_at: datetime | None = None
    idempotency: IdempotencyClaim | None = None


def _notification_prepare(
    *,
    owner: Owner,
    request: NotificationRequest,
    now: datetime,
    templates: dict[str, TemplateSnapshot | None],
    contexts: dict[str, RecipientContext] | None = None,
) -> PreparedNotification:
    """Render and route one notification (ValidationFailed for bad input). `templates` memoises
    snapshots across the items of one bulk request; `contexts` holds the recipients (by id)
    it read at once."""
    template_key = request.template_key
    if template_key not in templates:
        templates[template_key] = template_snapshot_get(owner_id=owner.pk, key=template_key)
    template = templates[template_key]
    if template is None:
        raise ValidationFailed({"template": [f"Unknown template '{template_key}'."]})

    if isinstance(request.recipient, dict):
        external_id = request.recipient["id"]
        contact = {k: v for k, v in request.recipient.items() if k != "id"}
        recipient_upsert(owner=owner, external_id=external_id, **contact)
        if contexts is not None:
            contexts.pop(external_id, None)  # read before this change
        context = recipient_context_get(owner_id=owner.pk, external_id=external_id)
    else:
        external_id = request.recipient
        context = (contexts or {}).get(external_id) or recipient_context_get(
            owner_id=owner.pk, external_id=external_id
        )
    if context is None:
        raise ValidationFailed(
            {"recipient": [f"Unknown recipient '{external_id}'; send its contact data."]}
        )

    send_at = request.send_at
    scheduled = send_at is not None and send_at > now
    routes = channels_route(
        requested=request.channels,
        template=template,
        recipient=context,
        priority=request.priority,
        scheduled=scheduled,
    )
    locale, content = templating.pick_locale_content(
        default_locale=template.locale,
        content=template.content,
        translations=template.translations,
        wanted=context.locale,
    )
    rendered: dict[str, dict[str, str]] = {}
    errors: dict[str, list[str]] = {}
    # Every channel of the template is rendered, even the ones this recipient skips, so a
    # missing variable fails the request the same way whoever the recipient is.
    for channel in CHANNEL_ORDER:
        if channel in content:
            try:
                rendered[channel] = templating.render_channel(
                    channel, content[channel], request.data
                )
            except templating.TemplateError as exc:
                errors.update(exc.fields)
    if errors:
        raise ValidationFailed(errors)

    notification = Notification(
        owner=owner,
        recipient_id=context.id,
        template_id=template.id,
        template_key=template.key,
        category=template.category,
        priority=request.priority,
        locale=locale,
        data=request.data,
        send_at=send_at,
        idempotency_key=request.idempotency.key if request.idempotency else "",
    )
    deliveries = [
        Delivery(
            notification=notification,
            channel=route.channel,
            status=route.status,
            skip_reason=route.reason,
            address=route.address,
            content=rendered.get(route.channel, {}),
            next_attempt_at=send_at if scheduled else None,
        )
        for route in routes
    ]
    return PreparedNotification(
        notification=notification,
        deliveries=deliveries,
        routes=routes,
        recipient_external_id=context.external_id,
        idempotency=request.idempotency,
    )


def _notifications_write(
    *, owner: Owner, prepared: list[PreparedNotification], now: datetime
) -> None:
    """Write notifications with their deliveries, first status events and idempotency records
    in one transaction; publish the queued deliveries once it commits."""
    from workers.delivery_log import StatusEvent, get_delivery_log
    from workers.dispatch import outbox_wake_on_commit

    with transaction.atomic():
        Notification.objects.bulk_create([p.notification for p in prepared])
        deliveries = Delivery.objects.bulk_create([d for p in prepared for d in p.deliveries])
        external_ids = {p.notification.pk: p.recipient_external_id for p in prepared}
        get_delivery_log().record_statuses(
            [
                StatusEvent(
                    delivery_id=d.pk,
                    notification_id=str(d.notification_id),
                    owner_id=owner.pk,
                    recipient_id=external_ids[d.notification_id],
                    channel=d.channel,
                    status=d.status,
                    at=now,
                    detail=d.skip_reason,
                )
                for d in deliveries
            ]
        )
        IdempotencyRecord.objects.bulk_create(
            [
                IdempotencyRecord(
                    owner=owner,
                    key=p.idempotency.key,
                    fingerprint=p.idempotency.fingerprint,
                    status_code=202,
                    response=p.body,
                )
                for p in prepared
                if p.idempotency is not None
            ]
        )
        # Nothing is published here: the queued rows are the outbox, and the relay publishes
        # them once woken after commit.
        if any(d.status == DeliveryStatus.QUEUED for d in deliveries):
            outbox_wake_on_commit()
        metrics.notifications_accepted_on_commit(
            d.channel
            for d in deliveries
            if d.status in (DeliveryStatus.QUEUED, DeliveryStatus.SCHEDULED)
        )


def _log_accepted(prepared: PreparedNotification) -> None:
    log.info(
        "notification %s accepted: %s",
        prepared.notification.pk,
        ", ".join(f"{route.channel} {route.status}" for route in prepared.routes),
    )


def notification_create(
    *,
    owner: Owner,
    recipient: str | dict[str, Any],
    template_key: str,
    data: dict[str, Any],
    channels: list[str] | None = None,
    priority: str = Priority.NORMAL,
    send_at: datetime | None = None,
    idempotency: IdempotencyClaim | None = None,
) -> dict[str, Any]:
    """notification_accept() with the request given field by field (admin, commands)."""
    return notification_accept(
        owner=owner,
        request=NotificationRequest(
            recipient=recipient,
            template_key=template_key,
            data=data,
            channels=channels,
            priority=priority,
            send_at=send_at,
            idempotency=idempotency,
        ),
    )


@scoped_log_context
def notification_accept(*, owner: Owner, request: NotificationRequest) -> dict[str, Any]:
    """Accept one notification: render it, route it, write it with its deliveries in one
    transaction, and enqueue the deliveries after commit. Returns the 202 body."""
    now = timezone.now()
    prepared = _notification_prepare(owner=owner, request=request, now=now, templates={})
    structlog.contextvars.bind_contextvars(notification_id=str(prepared.notification.pk))
    try:
        _notifications_write(owner=owner, prepared=[prepared], now=now)
    except IntegrityError as exc:
        claim = request.idempotency
        if claim is not None and _idempotency_record_exists(owner, [claim.key]):
            raise IdempotencyRecordExists from exc
        raise
    _log_accepted(prepared)
    return prepared.body


def _idempotency_record_exists(owner: Owner, keys_: list[str]) -> bool:
    return IdempotencyRecord.objects.filter(owner=owner, key__in=keys_).exists()


@dataclass(frozen=True)
class BulkOutcome:
    """One item of a bulk request: its 202 body, why it was refused, or that its idempotency
    record was already in the database (the caller answers with what that record holds)."""

    body: dict[str, Any] | None = None
    error: ValidationFailed | None = None
    idempotency_record_exists: bool = False


def notifications_create_bulk(
    *, owner: Owner, requests: list[NotificationRequest]
) -> list[BulkOutcome]:
    """Accept many notifications at once: each is rendered and routed on its own (a bad one is
    refused alone), and all the good ones are written in one transaction and published on
    one broker connection after it commits. An item whose idempotency record is already in the
    database (Redis lost its key) makes the whole write fall back to one transaction per item;
    that item's outcome then says its record exists, for the caller to answer from it."""
    now = timezone.now()
    templates: dict[str, TemplateSnapshot | None] = {}
    contexts = recipient_contexts_get_many(
        owner_id=owner.pk,
        external_ids=list({r.recipient for r in requests if isinstance(r.recipient, str)}),
    )
    outcomes: list[BulkOutcome | None] = []
    prepared: list[tuple[int, PreparedNotification]] = []
    for index, request in enumerate(requests):
        try:
            prepared.append(
                (
                    index,
                    _notification_prepare(
                        owner=owner,
                        request=request,
                        now=now,
                        templates=templates,
                        contexts=contexts,
                    ),
                )
            )
            outcomes.append(None)
        except ValidationFailed as exc:
            outcomes.append(BulkOutcome(error=exc))
    if prepared:
        try:
            _notifications_write(owner=owner, prepared=[p for _, p in prepared], now=now)
        except IntegrityError:
            claimed = [p.idempotency.key for _, p in prepared if p.idempotency is not None]
            if not claimed or not _idempotency_record_exists(owner, claimed):
                raise
            log.info("an idempotency record already exists; writing the bulk one by one")
            for index, item in prepared:
                outcomes[index] = _bulk_write_one(owner, item, now)
        else:
            for index, item in prepared:
                outcomes[index] = BulkOutcome(body=item.body)
                _log_accepted(item)
    return [outcome or BulkOutcome() for outcome in outcomes]


def _bulk_write_one(owner: Owner, item: PreparedNotification, now: datetime) -> BulkOutcome:
    for delivery in item.deliveries:  # the rolled-back bulk insert numbered them
        delivery.pk = None
        delivery._state.adding = True
    try:
        _notifications_write(owner=owner, prepared=[item], now=now)
    except IntegrityError:
        claim = item.idempotency
        if claim is not None and _idempotency_record_exists(owner, [claim.key]):
            return BulkOutcome(idempotency_record_exists=True)
        raise
    _log_accepted(item)
    return BulkOutcome(body=item.body)


def idempotency_records_purge(*, older_than_seconds: int | None = None) -> int:
    ttl = older_than_seconds if older_than_seconds is not None else settings.IDEMPOTENCY_TTL_SECONDS
    cutoff = timezone.now() - timedelta(seconds=ttl)
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=cutoff).delete()
    return deleted


# --- In-app inbox ---------------------------------------------------------------------------


def _inbox_transition(
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
    from workers.delivery_log import delivery_status_events, get_delivery_log

    now = timezone.now()
    at = Value(now, output_field=models.DateTimeField())
    wanted = Delivery.objects.filter(
        channel=Channel.WEB, notification__recipient_id=recipient_id, status__in=from_statuses
    )
    if notification_id is not None:
        wanted = wanted.filter(notification_id=notification_id)
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
    with transaction.atomic():
        deliveries = list(
            wanted.select_related("notification__recipient")
            .select_for_update(of=("self",))
            .order_by("pk")
        )
        if not deliveries:
            return 0
        Delivery.objects.filter(pk__in=[d.pk for d in deliveries], status__in=from_statuses).update(
            **changes
        )
        get_delivery_log().record_statuses(
            delivery_status_events(deliveries, to_status, detail=source)
        )
    return len(deliveries)


def inbox_acknowledge(*, recipient_id: int, notification_id: uuid.UUID, source: str) -> bool:
    """A browser received the notification (WebSocket ack): `delivered`. Only the
    recipient's own web delivery moves; an id of anyone else's does nothing."""
    changed = _inbox_transition(
        recipient_id=recipient_id,
        notification_id=notification_id,
        from_statuses=UNACKNOWLEDGED_STATUSES,
        to_status=DeliveryStatus.DELIVERED,
        source=source,
    )
    return changed > 0


def inbox_mark_read(*, recipient_id: int, notification_id: uuid.UUID, source: str) -> bool:
    changed = _inbox_transition(
        recipient_id=recipient_id,
        notification_id=notification_id,
        from_statuses=UNREAD_STATUSES,
        to_status=DeliveryStatus.READ,
        source=source,
    )
    return changed > 0


def inbox_mark_all_read(*, recipient_id: int, source: str) -> int:
    return _inbox_transition(
        recipient_id=recipient_id,
        notification_id=None,
        from_statuses=UNREAD_STATUSES,
        to_status=DeliveryStatus.READ,
        source=source,
    )


def inbox_archive(*, recipient_id: int, notification_id: uuid.UUID) -> bool:
    """Hide an entry from the inbox (it stays readable under ?archived=true); idempotent."""
    now = timezone.now()
    changed = Delivery.objects.filter(
        channel=Channel.WEB,
        notification__recipient_id=recipient_id,
        notification_id=notification_id,
        status__in=INBOX_STATUSES,
        archived_at__isnull=True,
    ).update(archived_at=now, updated_at=now)
    return changed > 0


def recipient_contact_normalise(*, values: dict[str, Any]) -> dict[str, str]:
    """Contact fields as recipient_upsert stores them (E.164 phone, a known time zone), or
    ValidationFailed; for write paths that save a Recipient themselves, as the admin does."""
    return _normalise_contact(values)
