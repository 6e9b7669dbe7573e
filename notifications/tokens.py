"""Recipient tokens: short-lived, signed credentials for one recipient's browser, accepted by
the WebSocket and the inbox API and by nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core import signing
from django.utils import timezone

# A salt of its own: a value Django signed for another purpose (a session, a password reset
# link) never verifies as a recipient token, and the reverse.
SIGNING_SALT = "clarion.channels_app.recipient-token"


@dataclass(frozen=True)
class RecipientClaims:
    owner_id: int
    recipient_id: int


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_at: datetime


def recipient_token_issue(*, owner_id: int, recipient_id: int) -> IssuedToken:
    """Sign the (owner, recipient) pair with a timestamp; the TTL is checked on verification."""
    token = signing.dumps({"o": owner_id, "r": recipient_id}, salt=SIGNING_SALT, compress=False)
    expires_at = timezone.now() + timedelta(seconds=settings.RECIPIENT_TOKEN_TTL_SECONDS)
    return IssuedToken(token=token, expires_at=expires_at)


def recipient_token_claims(token: str) -> RecipientClaims | None:
    """The claims of a well-signed, unexpired token, or None. Does not check that the
    recipient still exists: see notifications.selectors.recipient_for_token."""
    if not token or len(token) > 512:
        return None
    try:
        payload = signing.loads(
            token, salt=SIGNING_SALT, max_age=settings.RECIPIENT_TOKEN_TTL_SECONDS
        )
    except signing.BadSignature:  # SignatureExpired is a BadSignature too
        return None
    if not isinstance(payload, dict):
        return None
    owner_id, recipient_id = payload.get("o"), payload.get("r")
    if type(owner_id) is not int or type(recipient_id) is not int:
        return None
    return RecipientClaims(owner_id=owner_id, recipient_id=recipient_id)
