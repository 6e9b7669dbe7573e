"""The retry policy, in one place: which failures are transient, and how long to wait."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from django.conf import settings

from workers.providers.base import Outcome, SendResult


def classify_http_status(status_code: int) -> Outcome:
    if 200 <= status_code < 300:
        return Outcome.OK
    if status_code == 429 or status_code == 408 or status_code >= 500:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def retry_after_seconds(value: str | None) -> float | None:
    """An HTTP Retry-After header: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def classify_smtp_code(code: int) -> Outcome:
    """SMTP reply codes: 2xx accepted, 4xx try again later, 5xx refused for good."""
    if 200 <= code < 400:
        return Outcome.OK
    if 400 <= code < 500:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def backoff_seconds(retry_number: int) -> float:
    """1 s, 2 s, 4 s, … (with the default base) with ±20 % jitter so retries of a burst
    do not arrive together."""
    base = settings.RETRY_BACKOFF_BASE_SECONDS * (2 ** (retry_number - 1))
    return base * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_seconds: float = 0.0


def decide(result: SendResult, *, attempts_made: int) -> Decision:
    """After attempt number `attempts_made` failed: retry (and when), or give up."""
    if result.outcome is not Outcome.TRANSIENT:
        return Decision(retry=False)
    retries_made = attempts_made - 1
    if retries_made >= settings.RETRY_MAX_ATTEMPTS:
        return Decision(retry=False)
    delay = backoff_seconds(retries_made + 1)
    if result.retry_after is not None:
        delay = max(delay, result.retry_after)
    return Decision(retry=True, delay_seconds=delay)
