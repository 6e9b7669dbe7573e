"""Writes: API keys, recipients, preferences, devices, templates, notification creation and
the in-app inbox. API views, consumers, admin actions and management commands call these."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import secrets
import zoneinfo
from dataclasses import dataclass
from typing import Any

import phonenumbers
from django.db import transaction
from django.utils import timezone

from core import cache as keys
from notifications import templating
from notifications.models import (
    ApiKey,
    Device,
    Owner,
    Preference,
    Recipient,
    Template,
)
from notifications.schedules import (
    QuietHours,
    RuleError,
    caps_parse,
    digest_parse,
    escalation_parse,
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
# An erased recipient is renamed to this prefix and a random suffix (workers.erasure);
# no live recipient may take such an id.
ERASED_PREFIX = "erased-"


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
    if external_id.startswith(ERASED_PREFIX):
        raise ValidationFailed(
            {"id": [f"Recipient ids starting with {ERASED_PREFIX!r} name erased recipients."]}
        )
    clean = _normalise_contact(contact)
    with transaction.atomic():
        recipient, created = Recipient.objects.get_or_create(
            owner=owner, external_id=external_id, defaults=clean
        )
        changed = [] if created else [f for f, v in clean.items() if getattr(recipient, f) != v]
        if changed:
            for field in changed:
                setattr(recipient, field, clean[field])
            recipient.save(update_fields=[*changed, "updated_at"])
        # A send that repeats the contact data it sent before changes nothing and keeps the
        # caches (every invalidation also empties the other processes' local layer).
        if created or changed:
            recipient_invalidate(recipient=recipient)
    return recipient, created


@dataclass(frozen=True)
class PreferencesChange:
    """A validated partial preferences document (notifications/api/serializers.py
    PreferencesSerializer): opt-in switches by (category, channel), category "" for the
    channel-wide ones; quiet hours set or removed when `quiet_hours_given`."""

    switches: dict[tuple[str, str], bool] = dataclasses.field(default_factory=dict)
    quiet_hours: QuietHours | None = None
    quiet_hours_given: bool = False


def preferences_update(*, recipient: Recipient, change: PreferencesChange) -> None:
    """Apply a partial preferences change; whatever it does not name keeps its value."""
    with transaction.atomic():
        for (category, channel), enabled in change.switches.items():
            Preference.objects.update_or_create(
                recipient=recipient,
                category=category,
                channel=channel,
                defaults={"enabled": enabled},
            )
        if change.quiet_hours_given:
            quiet = change.quiet_hours
            recipient.quiet_hours = quiet.document() if quiet is not None else None
            recipient.save(update_fields=["quiet_hours", "updated_at"])
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


def template_rules_validate(
    *, frequency_caps: Any, frequency_cap_scope: Any, escalation: Any, digest: Any = None
) -> dict[str, list[str]]:
    """Field errors of a template's delivery rules (empty when they are usable)."""
    errors: dict[str, list[str]] = {}
    for parse, value in (
        (caps_parse, frequency_caps),
        (escalation_parse, escalation),
        (digest_parse, digest),
    ):
        try:
            parse(value)
        except RuleError as exc:
            errors.update(exc.fields)
    if frequency_cap_scope not in ("template", "category"):
        errors["frequency_cap_scope"] = ["Use template or category."]
    if (
        isinstance(digest, dict)
        and isinstance(digest.get("key"), str)
        and "digest.key" not in errors
    ):
        try:
            templating.validate_content({"sms": {"body": digest["key"] or "-"}})
        except templating.TemplateError as exc:
            errors["digest.key"] = [m for messages in exc.fields.values() for m in messages]
    return errors


def _template_validate(content: Any, translations: Any, rules: dict[str, Any]) -> None:
    errors: dict[str, list[str]] = {}
    for check, value in (
        (templating.validate_content, content),
        (templating.validate_translations, translations),
    ):
        try:
            check(value)
        except templating.TemplateError as exc:
            errors.update(exc.fields)
    errors.update(template_rules_validate(**rules))
    steps = rules["escalation"] if isinstance(rules["escalation"], list) else []
    for index, step in enumerate(steps):
        channel = step.get("channel") if isinstance(step, dict) else None
        if channel and isinstance(content, dict) and channel not in content:
            errors.setdefault(f"escalation.{index}.channel", []).append(
                "The template has no content for this channel."
            )
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
    frequency_caps: dict[str, str] | None = None,
    frequency_cap_scope: str = "template",
    escalation: list[dict[str, Any]] | None = None,
    digest: dict[str, Any] | None = None,
    create_only: bool = False,
) -> tuple[Template, bool]:
    """Create or replace a template after checking every field compiles and every rule
    (frequency caps, escalation) is usable."""
    translations = translations or {}
    rules = {
        "frequency_caps": frequency_caps or {},
        "frequency_cap_scope": frequency_cap_scope,
        "escalation": escalation or [],
        "digest": digest or {},
    }
    _template_validate(content, translations, rules)
    values = {
        "category": category,
        "locale": locale,
        "content": content,
        "translations": translations,
        **rules,
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


def recipient_contact_normalise(*, values: dict[str, Any]) -> dict[str, str]:
    """Contact fields as recipient_upsert stores them (E.164 phone, a known time zone), or
    ValidationFailed; for write paths that save a Recipient themselves, as the admin does."""
    return _normalise_contact(values)
