"""Idempotency-Key handling with the semantics of Stripe and the IETF draft: a Redis fast path
(one SET NX per request) over the database's unique record, which survives a Redis flush."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from notifications.models import IdempotencyRecord

MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Proceed:
    """This request holds the key: run it, then complete() or release()."""

    key: str
    fingerprint: str
    lock_token: str


@dataclass(frozen=True)
class Replay:
    status_code: int
    body: Any


class InFlight(Exception):
    """The same key is being processed by another request (409)."""


class Mismatch(Exception):
    """The key was used with a different request body (422)."""


def fingerprint(*, method: str, path: str, body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def _cache_key(owner_id: int, key: str) -> str:
    return f"idem:{owner_id}:{hashlib.sha256(key.encode()).hexdigest()}"


def _from_database(owner_id: int, key: str, fp: str) -> Replay | None:
    cutoff = timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS)
    record = IdempotencyRecord.objects.filter(owner_id=owner_id, key=key).first()
    if record is None:
        return None
    if record.created_at < cutoff:
        record.delete()
        return None
    if record.fingerprint != fp:
        raise Mismatch
    return Replay(record.status_code, record.response)


def begin(*, owner_id: int, key: str, fp: str) -> Proceed | Replay:
    """Take the key, or say why not: Replay for a finished twin, InFlight, Mismatch. One Redis
    round trip when the key is new."""
    cache_key = _cache_key(owner_id, key)
    token = uuid.uuid4().hex
    for _ in range(2):
        if cache.add(
            cache_key,
            {"state": "in_flight", "fp": fp, "token": token},
            settings.IDEMPOTENCY_LOCK_SECONDS,
        ):
            # Redis had nothing. The database may still hold a record (Redis flushed or
            # evicted): the creation's own insert of the record then fails on its unique key,
            # and the caller answers from replay_from_database. No read here.
            return Proceed(key=key, fingerprint=fp, lock_token=token)
        entry = cache.get(cache_key)
        if entry is None:
            continue  # expired between the two calls: try to take it again
        if entry["fp"] != fp:
            raise Mismatch
        if entry["state"] == "in_flight":
            raise InFlight
        return Replay(entry["status"], entry["body"])
    raise InFlight


def _remember(cache_key: str, fp: str, replay: Replay) -> None:
    cache.set(
        cache_key,
        {"state": "done", "fp": fp, "status": replay.status_code, "body": replay.body},
        settings.IDEMPOTENCY_TTL_SECONDS,
    )


def complete(*, owner_id: int, claim: Proceed, status_code: int, body: Any) -> None:
    _remember(_cache_key(owner_id, claim.key), claim.fingerprint, Replay(status_code, body))


def release(*, owner_id: int, claim: Proceed) -> None:
    """Give the key back after a request that changed nothing (a 4xx), so it can be reused."""
    cache_key = _cache_key(owner_id, claim.key)
    entry = cache.get(cache_key)
    if entry is not None and entry.get("token") == claim.lock_token:
        cache.delete(cache_key)


def replay_from_database(*, owner_id: int, key: str, fp: str) -> Replay | None:
    """After the database refused a duplicate record: what the winner answered."""
    return _from_database(owner_id, key, fp)
