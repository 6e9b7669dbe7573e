"""The send API: a notification to one recipient or to a topic's subscribers, single or
in bulk, each under the Idempotency-Key protocol (notifications.idempotency): the key taken
in Redis (with the API key's rate-limit token), the record written in the notification's own
statement, the answer remembered; or the first answer replayed. The API views, the admin and
the management commands call these; accepting (one recipient) and fanout (a topic) do the
work."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from django.db import transaction

from notifications import idempotency
from notifications.accepting import (
    BulkOutcome,
    IdempotencyClaim,
    NotificationRequest,
    notification_accept,
    notifications_create_bulk,
)
from notifications.fanout import topic_notification_accept
from notifications.models import Owner, Priority


def notification_send(*, owner: Owner, request: NotificationRequest) -> dict[str, Any]:
    """Accept one notification, to its recipient or to its topic. Returns the 202 body."""
    if request.topic:
        return topic_notification_accept(owner=owner, request=request)
    return notification_accept(owner=owner, request=request)


def notification_create(
    *,
    owner: Owner,
    recipient: str | dict[str, Any],
    template_key: str,
    data: dict[str, Any],
    channels: list[str] | None = None,
    priority: str = Priority.NORMAL,
    send_at: datetime | None = None,
    idempotency: IdempotencyClaim | None = None,
) -> dict[str, Any]:
    """notification_send() with the request given field by field (admin, commands)."""
    return notification_send(
        owner=owner,
        request=NotificationRequest(
            recipient=recipient,
            template_key=template_key,
            data=data,
            channels=channels,
            priority=priority,
            send_at=send_at,
            idempotency=idempotency,
        ),
    )


@dataclass(frozen=True)
class Accepted:
    """What the API answers for one accepted notification: 202 when it was written now, 200
    with the first answer's body when its Idempotency-Key was seen before."""

    status_code: int
    body: dict[str, Any]

    @property
    def replayed(self) -> bool:
        return self.status_code == 200


def _claim_from(taken: idempotency.Proceed | None) -> IdempotencyClaim | None:
    if taken is None:
        return None
    return IdempotencyClaim(key=taken.key, fingerprint=taken.fingerprint)


def notification_accept_once(
    *,
    owner: Owner,
    request: NotificationRequest,
    idempotency_key: str | None = None,
    fingerprint: str = "",
    limit: idempotency.RateLimit | None = None,
) -> Accepted:
    """Accept one notification under an optional Idempotency-Key, through idempotency.once():
    the key taken in one Redis round trip (with `limit`'s token), the record written in the
    notification's own statement, the answer remembered; or the first answer replayed. Raises
    ValidationFailed (the key is given back), idempotency.InFlight (409),
    idempotency.Mismatch (422) and idempotency.RateLimited (429; only with a key)."""
    if idempotency_key is None:
        return Accepted(202, notification_send(owner=owner, request=request))

    def accept(claim: idempotency.Proceed) -> idempotency.Done:
        keyed = replace(request, idempotency=_claim_from(claim))
        return idempotency.Done(202, notification_send(owner=owner, request=keyed))

    done = idempotency.once(
        owner_id=owner.pk, key=idempotency_key, fp=fingerprint, operation=accept, limit=limit
    )
    # A replay answers 200 with the first body (the send endpoints' documented contract).
    return Accepted(200 if done.replayed else done.status_code, done.body)


@dataclass(frozen=True)
class BulkItem:
    """One valid item of a bulk request, with its own optional Idempotency-Key."""

    request: NotificationRequest
    idempotency_key: str | None = None
    fingerprint: str = ""


@dataclass(frozen=True)
class BulkResult:
    """An item's answer: `accepted`, or the error that refused it (ValidationFailed,
    idempotency.InFlight, idempotency.Mismatch)."""

    accepted: Accepted | None = None
    error: Exception | None = None


def notifications_accept_bulk(*, owner: Owner, items: list[BulkItem]) -> list[BulkResult]:
    """notification_accept_once() for many: keys taken in one Redis round trip and
    remembered in another, every new item written in one transaction. An item repeating the
    key of an earlier item of the same request answers as that item (422 for another body)."""
    results: list[BulkResult | None] = [None] * len(items)
    first_with_key: dict[str, tuple[int, str]] = {}
    twins: list[tuple[int, int]] = []
    keyed: list[tuple[int, tuple[str, str]]] = []
    for index, item in enumerate(items):
        key = item.idempotency_key
        if key is None:
            continue
        if key in first_with_key:
            first, first_fp = first_with_key[key]
            if first_fp != item.fingerprint:
                results[index] = BulkResult(error=idempotency.Mismatch())
            else:
                twins.append((index, first))
            continue
        first_with_key[key] = (index, item.fingerprint)
        keyed.append((index, (key, item.fingerprint)))
    answers = dict(
        zip(
            [index for index, _ in keyed],
            idempotency.begin_many(owner_id=owner.pk, claims=[pair for _, pair in keyed]),
            strict=True,
        )
    )
    twin_indexes = {index for index, _ in twins}
    pending: list[tuple[int, NotificationRequest, idempotency.Proceed | None]] = []
    for index, item in enumerate(items):
        if results[index] is not None or index in twin_indexes:
            continue
        answer = answers.get(index)
        if isinstance(answer, idempotency.Replay):
            results[index] = BulkResult(accepted=Accepted(200, answer.body))
        elif isinstance(answer, (idempotency.InFlight, idempotency.Mismatch)):
            results[index] = BulkResult(error=answer)
        else:
            pending.append((index, replace(item.request, idempotency=_claim_from(answer)), answer))
    try:
        outcomes = notifications_create_bulk(
            owner=owner, requests=[request for _, request, _ in pending]
        )
    except BaseException:
        for _, _, taken in pending:
            if taken is not None:
                idempotency.release(owner_id=owner.pk, claim=taken)
        raise
    done: list[tuple[idempotency.Proceed, int, Any]] = []
    for (index, _, taken), outcome in zip(pending, outcomes, strict=True):
        if outcome.body is not None:
            results[index] = BulkResult(accepted=Accepted(202, outcome.body))
            if taken is not None:
                done.append((taken, 202, outcome.body))
        else:
            results[index] = _bulk_not_written(owner, taken, outcome)
    # Remembered once committed: under a transaction of the caller's (an Idempotency-Key on
    # the whole bulk request, api/idempotent.py), a rollback must not leave Redis replaying
    # notifications that were never written. With none open, this runs at once.
    transaction.on_commit(
        functools.partial(idempotency.complete_many, owner_id=owner.pk, done=done)
    )
    for index, first in twins:
        first_result = results[first]
        if first_result is not None and first_result.accepted is not None:
            results[index] = BulkResult(accepted=Accepted(200, first_result.accepted.body))
        else:
            results[index] = first_result
    return [result or BulkResult(error=idempotency.InFlight()) for result in results]


def _bulk_not_written(
    owner: Owner, taken: idempotency.Proceed | None, outcome: BulkOutcome
) -> BulkResult:
    """An item the bulk write refused, or found already recorded in the database."""
    if outcome.error is not None:
        if taken is not None:
            idempotency.release(owner_id=owner.pk, claim=taken)
        return BulkResult(error=outcome.error)
    if taken is None or not outcome.idempotency_record_exists:
        return BulkResult(error=idempotency.InFlight())
    try:
        replay = idempotency.recorded(owner_id=owner.pk, claim=taken)
    except idempotency.Mismatch as exc:
        return BulkResult(error=exc)
    if replay is None:
        # The record had expired; the item was not written. Sent again, it will be.
        idempotency.release(owner_id=owner.pk, claim=taken)
        return BulkResult(error=idempotency.InFlight())
    return BulkResult(accepted=Accepted(200, replay.body))
