"""A token bucket per provider, shared by every worker process through one Redis script.
Celery's own `rate_limit` is per worker process, so it multiplies with the pool size."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from redis.commands.core import Script

from workers.shared_state import redis_client

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_SPEC = re.compile(r"^\s*(email|sms|push|web)\s*=\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*$")

# Refill, then take a token now, or reserve the next one when it comes within max_wait
# (the caller sleeps that long), or refuse and say how long until one would be free.
# Redis's own clock is used so that workers on different hosts agree.
_TAKE = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
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
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
  if wait <= max_wait then
    tokens = tokens - 1
  else
    wait = -wait
  end
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 60)
return tostring(wait)
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


def rate_limit_take(*, channel: str, provider: str, max_wait: float) -> float:
    """0: go now. Positive: a token is reserved, go after sleeping that long. Negative: no
    token within max_wait; the next one is free in that many seconds (nothing reserved)."""
    rate = _rates().get(channel)
    if rate is None:
        return 0.0
    result = _script()(
        keys=[f"clarion:ratelimit:{channel}:{provider}"],
        args=[rate.per_second, rate.capacity, max_wait],
    )
    return float(result)
