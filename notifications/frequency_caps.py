"""Frequency caps: at most N deliveries of a channel per recipient per sliding window,
counted in Redis (one sorted set per recipient, scope and channel, shared by every API
process) with the database as the truth. A set Redis no longer has (flushed, restarted,
expired) is first seeded from the deliveries the database holds for the window, so a flush
may let one extra through in a race, never many; with Redis down the database count alone
decides. A `critical` notification is counted but never capped."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any

from django.db.models import Q
from redis.commands.core import Script
from redis.exceptions import RedisError

from core.db_clock import db_now_plus
from core.shared_state import redis_client
from notifications.models import Delivery, DeliveryStatus

log = logging.getLogger(__name__)

# ARGV: window in ms, limit, member, force ("1": count, never refuse), seeded ("1": the
# database's members for the window follow as score, member pairs). Answers 1 (taken),
# 0 (capped) or -1 (the set is gone: call again with the database's members).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[5] ~= '1' then return -1 end
  for i = 6, #ARGV, 2 do
    redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1])
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if ARGV[4] ~= '1' and redis.call('ZCARD', KEYS[1]) >= limit then
  redis.call('PEXPIRE', KEYS[1], window)
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return 1
"""

# Deliveries that count against a cap: everything routed to go out, not what was skipped
# or cancelled before it did.
_NOT_COUNTED = (DeliveryStatus.SKIPPED, DeliveryStatus.CANCELLED)


@cache
def _take_script() -> Script:
    return redis_client().register_script(_TAKE)


@dataclass(frozen=True)
class CapCheck:
    """One delivery about to be routed under a cap."""

    owner_id: int
    recipient_id: int
    scope: str  # "template:<key>" or "category:<name>"
    channel: str
    limit: int
    window: timedelta
    member: str  # "<notification id>:<channel>", as the database seed spells it
    force: bool  # critical: counted, never refused

    @property
    def key(self) -> str:
        seconds = int(self.window.total_seconds())
        where = f"{self.owner_id}:{self.recipient_id}:{self.scope}:{self.channel}"
        return f"clarion:cap:{where}:{seconds}"


def _window_ms(check: CapCheck) -> int:
    return int(check.window.total_seconds() * 1000)


def _database_members(check: CapCheck) -> list[tuple[int, str]]:
    """(epoch ms, member) of the deliveries the database counts for this check's window."""
    # The window runs back from the database's now, as everything else that is due or
    # expired across hosts does (core/db_clock.py).
    since = db_now_plus(-check.window.total_seconds())
    scope_kind, _, scope_name = check.scope.partition(":")
    scope = (
        Q(notification__category=scope_name)
        if scope_kind == "category"
        else Q(notification__template_key=scope_name)
    )
    rows = (
        Delivery.objects.filter(
            scope,
            notification__owner_id=check.owner_id,
            notification__recipient_id=check.recipient_id,
            channel=check.channel,
            created_at__gte=since,
        )
        .exclude(status__in=_NOT_COUNTED)
        .values_list("notification_id", "created_at")
    )
    return [(int(at.timestamp() * 1000), f"{nid}:{check.channel}") for nid, at in rows]


def caps_take(checks: list[CapCheck]) -> list[bool]:
    """Take a place under each check's cap, in order (two checks of one request on the same
    set count each other). True: under the cap, counted; False: capped."""
    if not checks:
        return []
    try:
        return _take_in_redis(checks)
    except RedisError as exc:
        log.warning("frequency caps counted from the database, Redis failed: %s", exc)
        return _take_from_database(checks)


def _take_in_redis(checks: list[CapCheck]) -> list[bool]:
    script = _take_script()
    client = redis_client()
    pipe = client.pipeline(transaction=False)
    for check in checks:
        script(
            keys=[check.key],
            args=[_window_ms(check), check.limit, check.member, int(check.force), 0],
            client=pipe,
        )
    answers = [int(a) for a in pipe.execute()]
    # Sets Redis did not have: seed them from the database, one check at a time (a later
    # check on the same set then finds it).
    for index, answer in enumerate(answers):
        if answer != -1:
            continue
        check = checks[index]
        seeds: list[Any] = []
        for score, member in _database_members(check):
            seeds += [score, member]
        answers[index] = int(
            script(
                keys=[check.key],
                args=[_window_ms(check), check.limit, check.member, int(check.force), 1, *seeds],
            )
        )
    return [answer == 1 for answer in answers]


def _take_from_database(checks: list[CapCheck]) -> list[bool]:
    taken: dict[str, int] = {}
    results = []
    for check in checks:
        if check.key not in taken:
            taken[check.key] = len(_database_members(check))
        allowed = check.force or taken[check.key] < check.limit
        if allowed:
            taken[check.key] += 1
        results.append(allowed)
    return results


def caps_give_back(checks: list[CapCheck]) -> None:
    """Places taken for deliveries that were not written after all (the write failed)."""
    if not checks:
        return
    try:
        pipe = redis_client().pipeline(transaction=False)
        for check in checks:
            pipe.zrem(check.key, check.member)
        pipe.execute()
    except RedisError as exc:
        log.warning("frequency cap places not given back: %s", exc)
