"""The API gateway's rate limit: a token bucket per API key in Redis, shared by every API
process, refilled at the key's rate_limit_per_second (API_RATE_LIMIT_PER_SECOND when unset,
no limit when 0) and holding API_RATE_LIMIT_BURST_SECONDS worth of requests."""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from redis.exceptions import RedisError
from rest_framework.exceptions import Throttled
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from core.rate_limiter import token_bucket_take
from notifications.api.common import idempotency_header
from notifications.idempotency import MAX_KEY_LENGTH, RateLimit

log = logging.getLogger(__name__)


def api_key_rate(rate_limit_per_second: int | None) -> int:
    """Requests per second a key may make; 0 means no limit."""
    if rate_limit_per_second is None:
        return int(settings.API_RATE_LIMIT_PER_SECOND)
    return rate_limit_per_second


def api_key_bucket_capacity(rate: int) -> float:
    return max(1.0, rate * settings.API_RATE_LIMIT_BURST_SECONDS)


def api_key_limit(request: Request) -> RateLimit | None:
    """The bucket of the request's API key; None when the request has no key or no limit."""
    api_key_id = getattr(request.user, "api_key_id", None)
    if api_key_id is None:
        return None
    rate = api_key_rate(getattr(request.user, "rate_limit_per_second", None))
    if rate <= 0:
        return None
    return RateLimit(
        key=f"clarion:ratelimit:api:{api_key_id}",
        per_second=rate,
        capacity=api_key_bucket_capacity(rate),
    )


def deferred_limit(request: Request, view: Any) -> RateLimit | None:
    """The limit that the throttle left to the view: a view with `rate_limit_with_claim`
    takes the token in the same Redis round trip as the request's Idempotency-Key (see
    notifications.idempotency.begin). None when the throttle took it itself."""
    key = idempotency_header(request)
    if not getattr(view, "rate_limit_with_claim", False) or not key:
        return None
    if len(key) > MAX_KEY_LENGTH:
        return None  # refused with 400 before any claim: the throttle took the token
    return api_key_limit(request)


def take_or_throttle(limit: RateLimit) -> None:
    """Take the token now, for a deferred request that ends before its claim (an invalid
    body): over the limit it answers 429, as it would have without the deferral."""
    granted, wait = _take(limit)
    if not granted:
        raise Throttled(wait=max(wait, 0.001))


def _take(limit: RateLimit) -> tuple[int, float]:
    try:
        return token_bucket_take(
            key=limit.key,
            per_second=limit.per_second,
            capacity=limit.capacity,
            max_wait=0,
            want=1,
        )
    except RedisError as exc:
        # The limit protects the service; it is not worth refusing every request for.
        log.warning("API rate limit not enforced, Redis unavailable: %s", exc)
        return 1, 0.0


class ApiKeyRateThrottle(BaseThrottle):
    """Answers 429 with Retry-After (through DRF's Throttled and the API's error shape) once a
    key's bucket is empty. Requests not made with an API key (the recipient-token inbox,
    the schema) are not this throttle's; nor are those whose view takes the token with the
    idempotency claim (deferred_limit)."""

    def __init__(self) -> None:
        self._wait = 0.0

    def allow_request(self, request: Request, view: Any) -> bool:
        limit = api_key_limit(request)
        if limit is None or deferred_limit(request, view) is not None:
            return True
        granted, wait = _take(limit)
        if granted:
            return True
        self._wait = wait
        return False

    def wait(self) -> float:
        # DRF sends Retry-After only for a wait above zero; it rounds up to whole seconds.
        return max(self._wait, 0.001)


def document_rate_limit(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: every operation an API key authenticates may
    answer 429, with the error body and Retry-After (settings.SPECTACULAR_SETTINGS)."""
    for item in result.get("paths", {}).values():
        for operation in item.values():
            schemes = {name for s in operation.get("security", []) for name in s}
            if "ApiKey" in schemes:
                operation.setdefault("responses", {}).setdefault(
                    "429",
                    {
                        "description": "This API key's rate limit is exceeded: {error, detail}",
                        "headers": {
                            "Retry-After": {
                                "schema": {"type": "integer"},
                                "description": "Seconds until the key may send again.",
                            }
                        },
                    },
                )
    return result
