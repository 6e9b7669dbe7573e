"""One-click unsubscribe (RFC 8058): every email of a non-transactional category carries a
List-Unsubscribe URL with a signed token naming the owner, the recipient and the category;
a POST to it opts the recipient out of that category for email, with no login. Templates
can place the same URL in the body as `{{ unsubscribe_url }}`."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings
from django.core import signing

from notifications.models import Channel, Recipient

log = logging.getLogger(__name__)

# The template variable every email render gets.
URL_VARIABLE = "unsubscribe_url"
_SALT = "clarion.unsubscribe"


@dataclass(frozen=True)
class UnsubscribeTarget:
    owner_id: int
    recipient_id: int
    category: str


def unsubscribable(category: str) -> bool:
    """Whether email of this category carries List-Unsubscribe: it has a category, and not
    one of TRANSACTIONAL_CATEGORIES (password resets, receipts: mail a person asked for)."""
    return bool(category) and category not in settings.TRANSACTIONAL_CATEGORIES


def unsubscribe_url(*, owner_id: int, recipient_id: int, category: str) -> str:
    """The recipient's own link for the category (a blank category: every email)."""
    token = signing.dumps([owner_id, recipient_id, category], salt=_SALT, compress=True)
    base = settings.PUBLIC_BASE_URL or f"http://localhost:{settings.PORT}"
    return f"{base}/unsubscribe/{token}"


def unsubscribe_headers(*, owner_id: int, recipient_id: int, category: str) -> dict[str, str]:
    """The RFC 8058 headers for an email of this category, or none."""
    if not unsubscribable(category):
        return {}
    url = unsubscribe_url(owner_id=owner_id, recipient_id=recipient_id, category=category)
    return {
        "List-Unsubscribe": f"<{url}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def unsubscribe_target(token: str) -> UnsubscribeTarget | None:
    """Whom and what a token names; None for a token we did not sign (or one whose recipient
    is gone or erased)."""
    try:
        owner_id, recipient_id, category = signing.loads(token, salt=_SALT)
    except (signing.BadSignature, ValueError, TypeError):
        return None
    if not isinstance(owner_id, int) or not isinstance(recipient_id, int):
        return None
    if not isinstance(category, str):
        return None
    exists = Recipient.objects.filter(
        pk=recipient_id, owner_id=owner_id, erased_at__isnull=True
    ).exists()
    return UnsubscribeTarget(owner_id, recipient_id, category) if exists else None


def unsubscribe_apply(*, target: UnsubscribeTarget) -> None:
    """Opt the recipient out of the category for email (idempotent)."""
    from notifications.services import PreferencesChange, preferences_update

    recipient = Recipient.objects.get(pk=target.recipient_id, owner_id=target.owner_id)
    # The category's email, or every email when the link names no category ("").
    change = PreferencesChange(switches={(target.category, Channel.EMAIL.value): False})
    preferences_update(recipient=recipient, change=change)
    log.info(
        "recipient %s unsubscribed from %s email",
        target.recipient_id,
        target.category or "all",
    )


def render_data(
    *,
    channel: str,
    fields: dict[str, str],
    data: dict[str, object],
    owner_id: int,
    recipient_id: int | None,
    category: str,
) -> dict[str, object]:
    """The data an email's fields render with: `data` and, where the fields use it, the
    recipient's `unsubscribe_url` (a placeholder link for a preview, which has no recipient).
    Other channels, and fields that do not use it, render with `data` as it is."""
    if not personal(channel=channel, fields=fields):
        return data
    if recipient_id is None:
        base = settings.PUBLIC_BASE_URL or f"http://localhost:{settings.PORT}"
        url = f"{base}/unsubscribe/preview"
    else:
        url = unsubscribe_url(owner_id=owner_id, recipient_id=recipient_id, category=category)
    return {**data, URL_VARIABLE: url}


def personal(*, channel: str, fields: dict[str, str]) -> bool:
    """Whether the channel's fields render differently per recipient (an email that places
    its unsubscribe link): such renders cannot be shared between recipients."""
    return channel == Channel.EMAIL and any(
        isinstance(value, str) and URL_VARIABLE in value for value in fields.values()
    )
