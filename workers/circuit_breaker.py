"""A circuit breaker per provider whose state every worker shares in Redis: closed → open
after CIRCUIT_FAILURE_THRESHOLD consecutive transient failures → half-open after
CIRCUIT_OPEN_SECONDS, letting one trial call through at a time → closed after
CIRCUIT_SUCCESS_THRESHOLD successful trials, or open again on a failed one."""

from __future__ import annotations

import enum
from functools import cache

from django.conf import settings
from redis.commands.core import Script

from core.shared_state import redis_client


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# A trial call that never reports back (worker killed) frees its slot after this long.
TRIAL_TIMEOUT_SECONDS = 30

# allow: returns "0" to go, or the seconds to wait before asking again.
_ALLOW = """
local open_seconds = tonumber(ARGV[1])
local trial_timeout = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then return '0' end
if state == 'open' then
  local opened_at = tonumber(redis.call('HGET', KEYS[1], 'opened_at'))
  local remaining = opened_at + open_seconds - now
  if remaining > 0 then return tostring(remaining) end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'successes', 0,
             'trial_until', tostring(now + trial_timeout))
  return '0'
end
local trial_until = tonumber(redis.call('HGET', KEYS[1], 'trial_until') or '0')
if trial_until > now then return tostring(math.min(1, trial_until - now)) end
redis.call('HSET', KEYS[1], 'trial_until', tostring(now + trial_timeout))
return '0'
"""

# record: ARGV[1] is ok | transient | permanent. Returns the state after it.
_RECORD = """
local outcome = ARGV[1]
local failure_threshold = tonumber(ARGV[2])
local success_threshold = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if outcome == 'ok' then
  if state == 'half_open' then
    local successes = redis.call('HINCRBY', KEYS[1], 'successes', 1)
    if successes >= success_threshold then
      redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'successes', 0,
                 'trial_until', 0)
      return 'closed'
    end
    redis.call('HSET', KEYS[1], 'trial_until', 0)
    return 'half_open'
  end
  if state == 'closed' then redis.call('HSET', KEYS[1], 'failures', 0) end
  return state
end
if outcome == 'transient' then
  if state == 'half_open' then
    redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', tostring(now), 'trial_until', 0)
    return 'open'
  end
  if state == 'closed' then
    local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
    if failures >= failure_threshold then
      redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', tostring(now))
      return 'open'
    end
  end
  return state
end
-- A permanent failure means the provider answered: it neither trips nor closes the
-- breaker, but it ends a half-open trial so the next one can go.
if state == 'half_open' then redis.call('HSET', KEYS[1], 'trial_until', 0) end
return state
"""


def _key(provider: str) -> str:
    return f"clarion:circuit:{provider}"


@cache
def _scripts() -> tuple[Script, Script]:
    client = redis_client()
    return client.register_script(_ALLOW), client.register_script(_RECORD)


def circuit_allow(*, provider: str) -> float:
    """0.0 when a call may go now; otherwise the seconds until the breaker may let one."""
    allow, _ = _scripts()
    return float(
        allow(keys=[_key(provider)], args=[settings.CIRCUIT_OPEN_SECONDS, TRIAL_TIMEOUT_SECONDS])
    )


def circuit_record(*, provider: str, outcome: str) -> CircuitState:
    _, record = _scripts()
    state = record(
        keys=[_key(provider)],
        args=[outcome, settings.CIRCUIT_FAILURE_THRESHOLD, settings.CIRCUIT_SUCCESS_THRESHOLD],
    )
    return CircuitState(state.decode() if isinstance(state, bytes) else state)


def circuit_state(*, provider: str) -> CircuitState:
    state = redis_client().hget(_key(provider), "state")
    if isinstance(state, bytes):
        state = state.decode()
    return CircuitState(state) if state else CircuitState.CLOSED


def circuit_states_present(providers: list[str]) -> dict[str, CircuitState]:
    """The state of each of these providers that has a breaker in Redis (one round trip);
    a provider never called has none and is left out."""
    pipe = redis_client().pipeline(transaction=False)
    for provider in providers:
        pipe.exists(_key(provider))
        pipe.hget(_key(provider), "state")
    replies = pipe.execute()
    states = {}
    for index, provider in enumerate(providers):
        exists, state = replies[2 * index], replies[2 * index + 1]
        if exists:
            if isinstance(state, bytes):
                state = state.decode()
            states[provider] = CircuitState(state) if state else CircuitState.CLOSED
    return states
