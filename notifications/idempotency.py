"""Idempotency-Key handling with the semantics of Stripe and the IETF draft: a Redis fast path
(one SET NX per request) over the database's unique record, which survives a Redis flush.
With Redis unreachable the database record alone keeps a key to one answer: the request
proceeds, a twin racing it is refused by the record's unique key and answered from it, and
nothing is remembered in Redis (the API key's rate limit is not enforced meanwhile, as
elsewhere). once() is the whole protocol for one request; the API's idempotent views and the
create path both run through it."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError
from redis.exceptions import RedisError

from core import db_clock
from core.rate_limiter import token_bucket_answer, token_bucket_args, token_bucket_script
from notifications.models import IdempotencyRecord

MAX_KEY_LENGTH = 255

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class RateLimit:
    """One token to take from a token bucket in the same Redis round trip as the key (the
    API key's rate limit, notifications.api.throttling)."""

    key: str
    per_second: float
    capacity: float


class RateLimited(Exception):
    """The bucket had no token: nothing was taken, the key included (429)."""

    def __init__(self, wait: float):
        super().__init__(f"rate limited for {wait:.3f} s")
        self.wait = wait


class InFlight(Exception):
    """The same key is being processed by another request (409)."""


class Mismatch(Exception):
    """The key was used with another request: a different body, or another method or path
    (422)."""


class RecordExists(Exception):
    """The database already holds a record under the key: a request that Redis let through
    (its entry lost or unreachable) raced one that committed first."""


@dataclass(frozen=True)
class Done:
    """An answer: an operation's, or the first one given again (replayed)."""

    status_code: int
    body: Any
    replayed: bool = False


def kept(status_code: int) -> bool:
    """Whether an answer is remembered under its key. Only a success is: every refusal of the
    API (a 4xx) changes nothing, so its key is given back and a corrected retry with the same
    key runs (as Stripe does for a request that fails validation)."""
    return 200 <= status_code < 300


def fingerprint(*, method: str, path: str, body: Any) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def _cache_key(owner_id: int, key: str) -> str:
    return f"idem:{owner_id}:{hashlib.sha256(key.encode()).hexdigest()}"


def _from_database(owner_id: int, key: str, fp: str) -> Replay | None:
    # On the clock the purge judges the TTL on (records_purge).
    cutoff = db_clock.now() - timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS)
    record = IdempotencyRecord.objects.filter(owner_id=owner_id, key=key).first()
    if record is None:
        return None
    if record.created_at < cutoff:
        record.delete()
        return None
    if record.fingerprint != fp:
        raise Mismatch
    return Replay(record.status_code, record.response)


def _add_with_token(cache_key: str, value: dict[str, Any], limit: RateLimit) -> bool:
    """add() and the bucket's token in one round trip; RateLimited (the key given back) when
    the bucket is empty."""
    reply, added = cache.add_after_script(  # type: ignore[attr-defined]
        cache_key,
        value,
        settings.IDEMPOTENCY_LOCK_SECONDS,
        token_bucket_script(),
        [limit.key],
        token_bucket_args(per_second=limit.per_second, capacity=limit.capacity, max_wait=0, want=1),
    )
    granted, wait = token_bucket_answer(reply)
    if not granted:
        if added:
            cache.delete(cache_key)
        raise RateLimited(wait)
    return bool(added)


def begin(*, owner_id: int, key: str, fp: str, limit: RateLimit | None = None) -> Proceed | Replay:
    """Take the key, or say why not: Replay for a finished twin, InFlight, Mismatch. One Redis
    round trip when the key is new, with `limit`'s token taken in the same one (RateLimited
    when there is none). With Redis unreachable: Proceed, under the database record alone."""
    try:
        return _begin(owner_id=owner_id, key=key, fp=fp, limit=limit)
    except RedisError as exc:
        log.warning("Idempotency-Key kept by the database alone, Redis unavailable: %s", exc)
        return Proceed(key=key, fingerprint=fp, lock_token="")


def _begin(*, owner_id: int, key: str, fp: str, limit: RateLimit | None) -> Proceed | Replay:
    cache_key = _cache_key(owner_id, key)
    token = uuid.uuid4().hex
    value = {"state": "in_flight", "fp": fp, "token": token}
    for attempt in range(2):
        if (
            _add_with_token(cache_key, value, limit)
            if limit is not None and attempt == 0
            else cache.add(cache_key, value, settings.IDEMPOTENCY_LOCK_SECONDS)
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


def begin_many(
    *, owner_id: int, claims: list[tuple[str, str]]
) -> list[Proceed | Replay | InFlight | Mismatch]:
    """begin() for many (key, fingerprint) pairs in two Redis round trips; each answer is what
    begin() would return, or the exception it would raise. Keys must be distinct."""
    try:
        return _begin_many(owner_id=owner_id, claims=claims)
    except RedisError as exc:
        log.warning("Idempotency-Keys kept by the database alone, Redis unavailable: %s", exc)
        return [Proceed(key=key, fingerprint=fp, lock_token="") for key, fp in claims]


def _begin_many(
    *, owner_id: int, claims: list[tuple[str, str]]
) -> list[Proceed | Replay | InFlight | Mismatch]:
    token = uuid.uuid4().hex
    cache_keys = [_cache_key(owner_id, key) for key, _ in claims]
    taken = cache.add_many(  # type: ignore[attr-defined]
        {
            cache_key: {"state": "in_flight", "fp": fp, "token": token}
            for cache_key, (_, fp) in zip(cache_keys, claims, strict=True)
        },
        settings.IDEMPOTENCY_LOCK_SECONDS,
    )
    held = cache.get_many([k for k in cache_keys if k not in taken])
    answers: list[Proceed | Replay | InFlight | Mismatch] = []
    for cache_key, (key, fp) in zip(cache_keys, claims, strict=True):
        if cache_key in taken:
            answers.append(Proceed(key=key, fingerprint=fp, lock_token=token))
            continue
        entry = held.get(cache_key)
        if entry is None:  # expired between the two calls
            try:
                answers.append(begin(owner_id=owner_id, key=key, fp=fp))
            except (InFlight, Mismatch) as exc:
                answers.append(exc)
        elif entry["fp"] != fp:
            answers.append(Mismatch())
        elif entry["state"] == "in_flight":
            answers.append(InFlight())
        else:
            answers.append(Replay(entry["status"], entry["body"]))
    return answers


def complete_many(*, owner_id: int, done: list[tuple[Proceed, int, Any]]) -> None:
    """complete() for many (claim, status, body) in one Redis round trip."""
    if done:
        try:
            cache.set_many(
                {
                    _cache_key(owner_id, claim.key): _done_entry(claim.fingerprint, code, body)
                    for claim, code, body in done
                },
                settings.IDEMPOTENCY_TTL_SECONDS,
            )
        except RedisError as exc:  # the database records answer the replays
            log.warning("answers not remembered in Redis, unavailable: %s", exc)


def _done_entry(fp: str, status_code: int, body: Any) -> dict[str, Any]:
    return {"state": "done", "fp": fp, "status": status_code, "body": body}


def _remember(cache_key: str, fp: str, replay: Replay) -> None:
    try:
        cache.set(
            cache_key,
            _done_entry(fp, replay.status_code, replay.body),
            settings.IDEMPOTENCY_TTL_SECONDS,
        )
    except RedisError as exc:  # the database record answers the replays
        log.warning("answer not remembered in Redis, unavailable: %s", exc)


def complete(*, owner_id: int, claim: Proceed, status_code: int, body: Any) -> None:
    _remember(_cache_key(owner_id, claim.key), claim.fingerprint, Replay(status_code, body))


def release(*, owner_id: int, claim: Proceed) -> None:
    """Give the key back after a request that changed nothing (a 4xx), so it can be reused."""
    if not claim.lock_token:  # taken while Redis was unavailable: nothing to give back
        return
    cache_key = _cache_key(owner_id, claim.key)
    try:
        entry = cache.get(cache_key)
        if entry is not None and entry.get("token") == claim.lock_token:
            cache.delete(cache_key)
    except RedisError as exc:  # its lock expires after IDEMPOTENCY_LOCK_SECONDS
        log.warning("Idempotency-Key not given back, Redis unavailable: %s", exc)


def replay_from_database(*, owner_id: int, key: str, fp: str) -> Replay | None:
    """After the database refused a duplicate record: what the winner answered."""
    return _from_database(owner_id, key, fp)


def record_hold(*, owner_id: int, claim: Proceed) -> IdempotencyRecord:
    """The key's database record, inserted first in the caller's transaction and given its
    answer by record_answer() before commit (no one sees it before). A twin that Redis let
    through (its entry lost or unreachable) inserts the same row: it waits for this
    transaction, then fails with RecordExists and is answered from the record."""
    try:
        return IdempotencyRecord.objects.create(
            owner_id=owner_id,
            key=claim.key,
            fingerprint=claim.fingerprint,
            status_code=0,
            response={},
        )
    except IntegrityError as exc:
        raise RecordExists from exc


def accepted_record(*, owner_id: int, key: str, fingerprint: str, body: Any) -> IdempotencyRecord:
    """The record of a key whose request was accepted (202), unsaved: the send paths write it
    in the statement that writes the notification."""
    return IdempotencyRecord(
        owner_id=owner_id, key=key, fingerprint=fingerprint, status_code=202, response=body
    )


def records_exist(*, owner_id: int, keys: list[str]) -> bool:
    """Whether any of these keys has its record (after the database refused a write)."""
    return IdempotencyRecord.objects.filter(owner_id=owner_id, key__in=keys).exists()


def records_purge(*, older_than_seconds: int | None = None) -> int:
    """Delete the records older than IDEMPOTENCY_TTL_SECONDS (by the database's clock)."""
    ttl = older_than_seconds if older_than_seconds is not None else settings.IDEMPOTENCY_TTL_SECONDS
    deleted, _ = IdempotencyRecord.objects.filter(
        created_at__lt=db_clock.db_now_plus(-ttl)
    ).delete()
    return deleted


def record_answer(*, record: IdempotencyRecord, status_code: int, body: Any) -> None:
    record.status_code = status_code
    record.response = body
    record.save(update_fields=["status_code", "response"])


def recorded(*, owner_id: int, claim: Proceed) -> Replay | None:
    """After RecordExists: answer as the request that wrote the record did, and remember that
    in Redis (None when the record had expired and is gone now). Raises Mismatch (after
    giving the key back) for another body."""
    try:
        replay = replay_from_database(owner_id=owner_id, key=claim.key, fp=claim.fingerprint)
    except Mismatch:
        release(owner_id=owner_id, claim=claim)
        raise
    if replay is not None:
        complete(owner_id=owner_id, claim=claim, status_code=replay.status_code, body=replay.body)
    return replay


def once(
    *,
    owner_id: int,
    key: str,
    fp: str,
    operation: Callable[[Proceed], Done],
    limit: RateLimit | None = None,
) -> Done:
    """Run `operation` at most once under the key: take the key (one Redis round trip, which
    takes `limit`'s token too), run it, remember a kept answer (one more) or give the key
    back; or answer the first request's answer again. `operation` returns its answer (status
    and JSON body), and writes the key's record in the same transaction as its work (the create
    path in its own statement; others with record_hold and record_answer), so a lost Redis
    entry cannot let it run twice: RecordExists from it is answered from that record.
    Raises InFlight (409), Mismatch (422), RateLimited (429), and whatever `operation`
    raises (the key given back)."""
    begun = begin(owner_id=owner_id, key=key, fp=fp, limit=limit)
    if isinstance(begun, Replay):
        return Done(begun.status_code, begun.body, replayed=True)
    claim = begun
    try:
        # A second run only when an expired record, deleted by recorded(), refused the first.
        for _ in range(2):
            try:
                answer = operation(claim)
            except RecordExists:
                replay = recorded(owner_id=owner_id, claim=claim)
                if replay is not None:
                    return Done(replay.status_code, replay.body, replayed=True)
                continue
            break
        else:
            raise InFlight
    except Mismatch:
        raise  # recorded() gave the key back
    except BaseException:
        release(owner_id=owner_id, claim=claim)
        raise
    if kept(answer.status_code):
        complete(owner_id=owner_id, claim=claim, status_code=answer.status_code, body=answer.body)
    else:
        release(owner_id=owner_id, claim=claim)
    return answer


def forget(*, owner_id: int, keys: list[str]) -> None:
    """Drop the Redis copies of these keys' answers (their records are being deleted)."""
    if keys:
        try:
            cache.delete_many([_cache_key(owner_id, key) for key in keys])
        except RedisError as exc:  # they expire after IDEMPOTENCY_TTL_SECONDS
            log.warning("answers not forgotten in Redis, unavailable: %s", exc)
