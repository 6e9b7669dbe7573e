"""What every API view does with a request: its owner, a validated body, a recipient or 404."""

from __future__ import annotations

from typing import Any, cast

from django.http import Http404
from rest_framework.request import Request

from notifications import selectors
from notifications.models import Owner, Recipient


def request_owner(request: Request) -> Owner:
    """The owner of the API key that authenticated the request (ApiKeyAuthentication puts it
    in request.auth)."""
    return cast(Owner, request.auth)


def recipient_or_404(owner: Owner, rid: str) -> Recipient:
    recipient = selectors.recipient_get(owner=owner, external_id=rid)
    if recipient is None:
        raise Http404
    return recipient


def validated(serializer_class: type, data: Any, **kwargs: Any) -> dict[str, Any]:
    """The serializer's validated data; a ValidationError (400, `fields`) otherwise."""
    serializer = serializer_class(data=data, **kwargs)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


# Where idempotency_header keeps the header on the request once read.
_IDEMPOTENCY_HEADER = "clarion_idempotency_header"
_UNREAD = object()


def idempotency_header(request: Request) -> str | None:
    """The Idempotency-Key header as sent (None without one), read once per request: the
    throttle, the view and the protocol all ask for it."""
    header = getattr(request, _IDEMPOTENCY_HEADER, _UNREAD)
    if header is _UNREAD:
        header = request.headers.get("Idempotency-Key")
        setattr(request, _IDEMPOTENCY_HEADER, header)
    return cast(str | None, header)
