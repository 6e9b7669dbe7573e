"""API key authentication: `Authorization: Bearer <key>`, looked up by its SHA-256 hash."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.cache import cache
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from notifications import cache as keys
from notifications.models import ApiKey, Owner
from notifications.services import api_key_hash


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[Any, Owner] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw_key = header.partition(" ")
        if scheme.lower() != "bearer" or not raw_key.strip():
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <api key>'.")
        owner = self._owner_for(raw_key.strip())
        if owner is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        # request.user stays None: the owner is the principal, carried as request.auth.
        return (_ServicePrincipal(owner), owner)

    def _owner_for(self, raw_key: str) -> Owner | None:
        key_hash = api_key_hash(raw_key)
        cache_key = keys.api_key_key(key_hash)
        owner = cache.get(cache_key)
        if owner is not None:
            return owner if owner != "-" else None
        api_key = (
            ApiKey.objects.select_related("owner")
            .filter(key_hash=key_hash, revoked_at__isnull=True)
            .first()
        )
        owner = api_key.owner if api_key else None
        # Unknown keys are cached briefly too, so guessing keys does not hammer the database.
        cache.set(cache_key, owner or "-", settings.CACHE_TTL_API_KEYS if owner else 10)
        return owner

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="clarion"'


class _ServicePrincipal:
    """The authenticated caller: a service acting for an owner."""

    is_authenticated = True
    is_anonymous = False

    def __init__(self, owner: Owner):
        self.owner = owner

    def __str__(self) -> str:
        return f"owner:{self.owner.name}"


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "notifications.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "A Clarion API key."}
