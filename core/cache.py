"""Cache keys and invalidation for what the creation path reads on every request; every
write path (API, admin, commands) goes through these so nothing stays stale.

Two layers. Redis is shared by every process and invalidated on commit. In front of it, each
process keeps what it read for CACHE_LOCAL_SECONDS (a dict, no round trip), trusted while the
shared version in Redis is unchanged: every invalidation replaces that version with a new
random one, and a process reads it at most every CACHE_LOCAL_CHECK_SECONDS. The process that
wrote drops its own entries at once; the others follow within CACHE_LOCAL_CHECK_SECONDS. A
flushed Redis changes the version too (it is gone), so the local layer never outlives the
shared one.

With Redis unreachable, reads go to the database: the local layer is dropped (the version it
was trusted under cannot be checked) and nothing is kept until Redis answers again.
Invalidations that cannot reach Redis are logged and skipped; an entry Redis still holds
from before may then be read until its TTL (CACHE_TTL_*) ends, if Redis comes back with its
data."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from redis.exceptions import RedisError

T = TypeVar("T")

log = logging.getLogger(__name__)

VERSION_KEY = "cache-version"
# What a miss in the local layer looks like (None is a value worth keeping: "no such key").
_MISSING = object()


# The shape of the cached routing snapshots (selectors.RecipientContext, TemplateSnapshot),
# part of their keys: a release that changes a shape bumps it, so that during a rolling
# deploy each release reads only the entries it wrote (2: quiet hours; caps, escalation and
# digest rules; 3: suppressed addresses).
SNAPSHOT_SHAPE = 3


def recipient_key(owner_id: int, external_id: str) -> str:
    return f"recipient:v{SNAPSHOT_SHAPE}:{owner_id}:{external_id}"


def template_key(owner_id: int, key: str) -> str:
    return f"template:v{SNAPSHOT_SHAPE}:{owner_id}:{key}"


def devices_key(recipient_id: int) -> str:
    return f"devices:{recipient_id}"


def api_key_key(key_hash: str) -> str:
    return f"apikey:{key_hash}"


class _Local:
    """The process-local layer: key -> (value, monotonic expiry), and the shared version it
    was filled under."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Any, float]] = {}
        self.version: Any = _MISSING
        self.checked_at = float("-inf")
        self.lock = threading.Lock()

    def clear(self) -> None:
        self.entries.clear()
        self.version = _MISSING
        self.checked_at = float("-inf")

    def fresh(self, now: float) -> bool:
        """Drop every entry if the shared version moved since the last look. False when Redis
        cannot be asked: every entry is dropped then, and none may be kept."""
        if now - self.checked_at < settings.CACHE_LOCAL_CHECK_SECONDS:
            return self.version is not _MISSING
        with self.lock:
            if now - self.checked_at < settings.CACHE_LOCAL_CHECK_SECONDS:
                return self.version is not _MISSING
            try:
                version = cache.get(VERSION_KEY)
                if version is None:
                    # First reader, or Redis was flushed: a version of its own, so that a
                    # later flush shows as a change too.
                    cache.add(VERSION_KEY, uuid.uuid4().hex, None)
                    version = cache.get(VERSION_KEY)
            except RedisError as exc:
                log.warning("cache version unknown, Redis unavailable: %s", exc)
                self.entries.clear()
                self.version = _MISSING
                self.checked_at = now
                return False
            if version != self.version:
                self.entries.clear()
                self.version = version
            self.checked_at = now
            return True


_local = _Local()


def local_clear() -> None:
    """Forget every local entry (tests, between cases)."""
    _local.clear()


def cached(key: str, load: Callable[[], T], ttl: Callable[[T], int]) -> T:
    """The value under `key`: from this process, else from Redis, else load(), which is then
    kept for ttl(value) seconds (0: not kept; the local layer keeps it for at most
    CACHE_LOCAL_SECONDS). Values must be immutable snapshots: every caller shares them."""
    lifetime = settings.CACHE_LOCAL_SECONDS
    now = time.monotonic()
    if lifetime > 0:
        if not _local.fresh(now):
            return load()  # Redis unavailable: the database, and nothing kept
        entry = _local.entries.get(key)
        if entry is not None and entry[1] > now:
            return entry[0]
    try:
        value = cache.get(key, _MISSING)
    except RedisError as exc:
        log.warning("cache unavailable, reading %s from the database: %s", key, exc)
        return load()
    seconds = None
    if value is _MISSING:
        value = load()
        seconds = ttl(value)
        if seconds > 0:
            try:
                cache.set(key, value, seconds)
            except RedisError as exc:
                log.warning("cache unavailable, %s not kept: %s", key, exc)
                return value
    if lifetime > 0:
        seconds = ttl(value) if seconds is None else seconds
        if seconds > 0:
            if len(_local.entries) >= settings.CACHE_LOCAL_MAX_ENTRIES:
                _local.entries.clear()
            _local.entries[key] = (value, now + min(lifetime, seconds))
    return value


def _shared_drop(keys: list[str]) -> None:
    for key in keys:
        _local.entries.pop(key, None)
    try:
        # A new shared version first: a reader that misses Redis after the delete reloads.
        cache.set_many({VERSION_KEY: uuid.uuid4().hex}, None)
        cache.delete_many(keys)
    except RedisError as exc:
        log.warning("cache entries %s not invalidated, Redis unavailable: %s", keys, exc)


def invalidate_on_commit(*keys: str) -> None:
    """Drop cache entries once the write that made them stale is committed (and also now,
    so a reader inside this transaction does not see the old entry), in this process, in
    Redis, and (through the shared version) in every other process."""
    _shared_drop(list(keys))
    transaction.on_commit(lambda: _shared_drop(list(keys)))
