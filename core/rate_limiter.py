"""Token buckets shared by every process through one Redis script: one per provider for the
workers (Celery's own `rate_limit` is per worker process, so it multiplies with the pool
size), and one per API key for the API (notifications.api.throttling)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from redis.commands.core import Script

from core.shared_state import redis_client

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_SPEC = re.compile(r"^\s*(email|sms|push|web)\s*=\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")

# Refill, then grant up to `want` tokens: those free now plus those that come within max_wait
# (the caller sleeps until the last granted one is due); or grant none and say how long until
# one would be free. Redis's own clock is used so that workers on different hosts agree.
_TAKE = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then
  tokens = capacity
  ts = now
end
tokens = math.min(capacity, tokens + (now - ts) * rate)
local granted = 0
local wait = 0
local can = math.floor(tokens + max_wait * rate + 1e-9)
if can >= 1 then
  granted = math.min(want, can)
  tokens = tokens - granted
  if tokens < 0 then wait = -tokens / rate end
else
  wait = -(1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 60)
return {tostring(granted), tostring(wait)}
"""


@dataclass(frozen=True)
class Rate:
    per_second: float
    capacity: float


def parse_rate_limits(spec: str) -> dict[str, Rate]:
    """`email=1000/m,sms=100/s` → per-channel rates. The bucket holds RATE_LIMIT_BURST
    tokens, so a burst after a quiet spell is that many sends at most."""
    rates = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = _SPEC.match(part)
        if not match:
            raise ImproperlyConfigured(
                f"RATE_LIMITS entry {part!r} is not channel=N/s|m|h (e.g. sms=100/s)"
            )
        channel, count, unit = match.groups()
        per_second = float(count) / _UNITS[unit]
        if per_second <= 0:
            raise ImproperlyConfigured(f"RATE_LIMITS entry {part!r} must be above zero")
        rates[channel] = Rate(per_second, max(1.0, float(settings.RATE_LIMIT_BURST)))
    return rates


@cache
def _rates() -> dict[str, Rate]:
    return parse_rate_limits(settings.RATE_LIMITS)


@cache
def _script() -> Script:
    return redis_client().register_script(_TAKE)


def token_bucket_script() -> Script:
    """The take script, to run inside another caller's round trip: keys [bucket key], args
    token_bucket_args(); token_bucket_answer() reads its reply."""
    return _script()


def token_bucket_args(
    *, per_second: float, capacity: float, max_wait: float, want: int
) -> list[Any]:
    return [per_second, capacity, max_wait, want]


def token_bucket_answer(reply: Any) -> tuple[int, float]:
    granted, wait = reply
    return int(granted), abs(float(wait))


def rate_limit_take(*, channel: str, provider: str, max_wait: float) -> float:
    """0: go now. Positive: a token is reserved, go after sleeping that long. Negative: no
    token within max_wait; the next one is free in that many seconds (nothing reserved)."""
    granted, wait = rate_limit_take_many(
        channel=channel, provider=provider, max_wait=max_wait, want=1
    )
    return wait if granted else -abs(wait)


def rate_limit_take_many(
    *, channel: str, provider: str, max_wait: float, want: int
) -> tuple[int, float]:
    """Up to `want` tokens for one batched provider call: (granted, seconds to sleep before
    sending them); (0, seconds until one is free) when none comes within max_wait."""
    rate = _rates().get(channel)
    if rate is None:
        return want, 0.0
    return token_bucket_take(
        key=_key(channel, provider),
        per_second=rate.per_second,
        capacity=rate.capacity,
        max_wait=max_wait,
        want=want,
    )


def token_bucket_take(
    *, key: str, per_second: float, capacity: float, max_wait: float, want: int
) -> tuple[int, float]:
    """Take up to `want` tokens from the bucket at `key` (refilled at `per_second`, holding at
    most `capacity`), counting those due within max_wait: (granted, seconds until the last
    granted one is due); (0, seconds until one is free) when none comes within max_wait."""
    return token_bucket_answer(
        _script()(
            keys=[key],
            args=token_bucket_args(
                per_second=per_second, capacity=capacity, max_wait=max_wait, want=want
            ),
        )
    )


def rate_limit_refund(*, channel: str, provider: str, count: int) -> None:
    """Give back tokens granted for sends that did not happen."""
    if count > 0 and channel in _rates():
        redis_client().hincrbyfloat(_key(channel, provider), "tokens", count)


# Empty the bucket and push its refill `seconds` into the future: no token is granted before
# then (a provider's 429 with Retry-After), whatever the bucket held.
_SLOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local seconds = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or 0
local ts = tonumber(state[2]) or now
tokens = math.min(tokens + (now - ts) * rate, -seconds * rate)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(seconds) + 60)
return 1
"""


@cache
def _slow_script() -> Script:
    return redis_client().register_script(_SLOW)


def rate_limit_slow(*, channel: str, provider: str, seconds: float) -> None:
    """Grant no token of this provider's bucket for `seconds` (it answered 429)."""
    rate = _rates().get(channel)
    if rate is not None and seconds > 0:
        _slow_script()(keys=[_key(channel, provider)], args=[rate.per_second, seconds])


def rate_limit_offsets(*, channel: str, granted: int, wait: float) -> list[float]:
    """When each of `granted` tokens of one take falls due, in seconds from the take: the last
    at `wait`, the ones before it one refill interval apart, none before 0. Pacing each send
    on its own token keeps the provider's rate even instead of a burst after the wait."""
    rate = _rates().get(channel)
    if rate is None or wait <= 0:
        return [0.0] * granted
    return [max(0.0, wait - (granted - k) / rate.per_second) for k in range(1, granted + 1)]


def rate_limit_spread_seconds(*, channel: str, count: int) -> float:
    """How long the channel's bucket takes to refill `count` tokens."""
    rate = _rates().get(channel)
    return count / rate.per_second if rate is not None else 0.0


def _key(channel: str, provider: str) -> str:
    return f"clarion:ratelimit:{channel}:{provider}"
