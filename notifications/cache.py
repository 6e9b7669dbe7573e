"""Cache keys and invalidation for what the creation path reads on every request; every
write path (API, admin, commands) goes through these so nothing stays stale."""

from __future__ import annotations

from django.core.cache import cache
from django.db import transaction


def recipient_key(owner_id: int, external_id: str) -> str:
    return f"recipient:{owner_id}:{external_id}"


def template_key(owner_id: int, key: str) -> str:
    return f"template:{owner_id}:{key}"


def devices_key(recipient_id: int) -> str:
    return f"devices:{recipient_id}"


def api_key_key(key_hash: str) -> str:
    return f"apikey:{key_hash}"


def invalidate_on_commit(*keys: str) -> None:
    """Drop cache entries once the write that made them stale is committed (and also now,
    so a reader inside this transaction does not see the old entry)."""
    cache.delete_many(list(keys))
    transaction.on_commit(lambda: cache.delete_many(list(keys)))
