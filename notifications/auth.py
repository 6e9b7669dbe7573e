"""API key authentication: `Authorization: Bearer <key>`, looked up by its SHA-256 hash; and
recipient-token authentication for the inbox API, which accepts no API key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog
from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from core import cache as keys
from notifications.models import ApiKey, Owner
from notifications.selectors import InboxRecipient, recipient_for_token
from notifications.services import api_key_hash


@dataclass(frozen=True)
class AuthenticatedKey:
    """What a request needs of its API key, cached under the key's hash: the owner, and the
    key's id and rate limit for the throttle. A change to the rate limit applies once the
    entry expires (CACHE_TTL_API_KEYS) or is invalidated."""

    owner: Owner
    api_key_id: int
    rate_limit_per_second: int | None


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Any, Owner] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme.lower() != "bearer" or not raw_key.strip():
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <api key>'.")
        key = self._key_for(raw_key.strip())
        if key is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        structlog.contextvars.bind_contextvars(owner_id=key.owner.pk, api_key_id=key.api_key_id)
        # The owner is what views scope by, carried as request.auth.
        return (_ServicePrincipal(key), key.owner)

    def _key_for(self, raw_key: str) -> AuthenticatedKey | None:
        key_hash = api_key_hash(raw_key)

        def load() -> AuthenticatedKey | str:
            api_key = (
                ApiKey.objects.select_related("owner")
                .filter(key_hash=key_hash, revoked_at__isnull=True)
                .first()
            )
            if api_key is None:
                return "-"
            return AuthenticatedKey(
                owner=api_key.owner,
                api_key_id=api_key.pk,
                rate_limit_per_second=api_key.rate_limit_per_second,
            )

        # Unknown keys are cached briefly too, so guessing keys does not hammer the database.
        found = keys.cached(
            keys.api_key_key(key_hash),
            load,
            lambda key: settings.CACHE_TTL_API_KEYS if key != "-" else 10,
        )
        if isinstance(found, AuthenticatedKey) or found is None:
            return found
        if found == "-":
            return None
        # Anything else (an entry written by an older version) is read again.
        fresh = load()
        return fresh if isinstance(fresh, AuthenticatedKey) else None

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="clarion"'


class _ServicePrincipal:
    """The authenticated caller: a service acting for an owner with one of its API keys."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, key: AuthenticatedKey):
        self.owner = key.owner
        self.api_key_id = key.api_key_id
        self.rate_limit_per_second = key.rate_limit_per_second

    def __str__(self) -> str:
        return f"owner:{self.owner.name}"


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "notifications.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "A Clarion API key."}


class RecipientTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <recipient token>` from POST /recipients/{rid}/token. Used only by
    the inbox views; an API key is not a recipient token and fails here, as a recipient
    token fails ApiKeyAuthentication on the service API."""

    def authenticate(self, request: Request) -> tuple[Any, InboxRecipient] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <recipient token>'.")
        recipient = recipient_for_token(token=token.strip())
        if recipient is None:
            raise exceptions.AuthenticationFailed("Invalid or expired recipient token.")
        return (_RecipientPrincipal(recipient), recipient)

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="clarion-inbox"'


class _RecipientPrincipal:
    """The authenticated caller of the inbox API: one recipient's browser."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, recipient: InboxRecipient):
        self.recipient = recipient

    def __str__(self) -> str:
        return f"recipient:{self.recipient.recipient_id}"


class RecipientTokenScheme(OpenApiAuthenticationExtension):
    target_class = "notifications.auth.RecipientTokenAuthentication"
    name = "RecipientToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A recipient token from POST /api/v1/recipients/{rid}/token.",
        }
