"""Inbox positions (notifications.models.InboxCounter): given to in-app deliveries when they are
first claimed for a push, dense and in order per recipient, kept through retries, and never
given twice when processes push for the same recipients at once (PostgreSQL's row locks)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection

from notifications.models import Delivery, InboxCounter
from tests.channels_app.support import create_web_notification, recipient_with_token
from workers.transitions import deliveries_claim, inbox_positions_give


def _web_ids(owner: Any, external_id: str, count: int) -> list[int]:
    return [
        Delivery.objects.get(
            notification=create_web_notification(owner, external_id, f"{external_id}-{n}"),
            channel="web",
        ).pk
        for n in range(count)
    ]


def _positions(ids: list[int]) -> list[int | None]:
    by_id = dict(Delivery.objects.filter(pk__in=ids).values_list("pk", "inbox_position"))
    return [by_id[pk] for pk in ids]


@pytest.mark.django_db
def test_a_claim_gives_each_recipient_its_next_positions_in_id_order(
    owner: Any, template: Any
) -> None:
    a, _ = recipient_with_token(owner, "user-a")
    b, _ = recipient_with_token(owner, "user-b")
    a_ids, b_ids = _web_ids(owner, "user-a", 3), _web_ids(owner, "user-b", 2)
    claimed = deliveries_claim(delivery_ids=a_ids[:2] + b_ids)
    assert [d.inbox_position for d in claimed] == [1, 2, 1, 2]
    assert _positions(a_ids + b_ids) == [1, 2, None, 1, 2]
    deliveries_claim(delivery_ids=a_ids[2:])
    assert _positions(a_ids) == [1, 2, 3]
    assert dict(InboxCounter.objects.values_list("recipient_id", "position")) == {a.pk: 3, b.pk: 2}


@pytest.mark.django_db
def test_a_delivery_claimed_again_keeps_its_position(owner: Any, template: Any) -> None:
    recipient_with_token(owner, "user-a")
    [first, second] = _web_ids(owner, "user-a", 2)
    deliveries_claim(delivery_ids=[first])
    # Its lease ran out (the worker died): the next claim takes it with its position.
    Delivery.objects.filter(pk=first).update(lease_token=None, lease_expires_at=None)
    [again, other] = deliveries_claim(delivery_ids=[first, second])
    assert (again.inbox_position, other.inbox_position) == (1, 2)
    assert InboxCounter.objects.get().position == 2


@pytest.mark.django_db
def test_other_channels_get_no_position(owner: Any, template: Any) -> None:
    from notifications import sending

    recipient_with_token(owner, "user-a")
    sending.notification_create(
        owner=owner,
        recipient="user-a",
        template_key="order_shipped",
        data={"order_id": "A-1"},
        channels=["email"],
    )
    [email] = Delivery.objects.filter(channel="email")
    deliveries_claim(delivery_ids=[email.pk])
    email.refresh_from_db()
    assert email.inbox_position is None
    assert not InboxCounter.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_processes_pushing_for_the_same_recipients_at_once_give_dense_unique_positions(
    owner: Any, template: Any
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("row locks between connections: PostgreSQL (CI runs it)")
    recipients = ["user-a", "user-b", "user-c"]
    for external_id in recipients:
        recipient_with_token(owner, external_id)
    ids = {external_id: _web_ids(owner, external_id, 40) for external_id in recipients}
    # Each of 4 threads takes every 4th delivery of every recipient, in rounds of 5: their
    # transactions overlap on the same counter rows all the time.
    shares = [sorted(pk for batch in ids.values() for pk in batch[n::4]) for n in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(shares))

    def push(share: list[int]) -> None:
        try:
            start.wait()
            for round_start in range(0, len(share), 5):
                batch = list(
                    Delivery.objects.filter(pk__in=share[round_start : round_start + 5])
                    .select_related("notification")
                    .order_by("id")
                )
                inbox_positions_give(batch)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=push, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    for external_id, batch in ids.items():
        assert sorted(_positions(batch)) == list(range(1, 41)), external_id  # type: ignore[type-var]
