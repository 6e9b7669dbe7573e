"""One clock for leases and due times: the database's. A worker, relay or sweeper whose wall
clock runs 30 s ahead (or behind) neither takes a lease another worker still holds, nor sends
or releases a delivery before it is due, nor hands back to the relay a delivery whose message
is not stale; and it still delivers ordinary work exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.db.models.functions import Now
from django.utils import timezone

from notifications.models import Delivery, DeliveryStatus
from project.celery import app as celery_app
from tests.clock import skewed_env
from tests.conftest import Process, SmtpSink, wait_until
from workers import services
from workers.dispatch import deliver_task_name
from workers.relay import outbox_next_due, outbox_publish_due
from workers.services import ProcessOutcome, deliveries_sweep
from workers.transitions import Settle, Settlement, deliveries_claim, deliveries_settle

SKEW = timedelta(seconds=30)


def database_clock() -> datetime:
    """The database's time now, as Now() reads it (PostgreSQL's CURRENT_TIMESTAMP is the
    transaction's start; SQLite's has whole seconds)."""
    now = (
        "STATEMENT_TIMESTAMP()"
        if connection.vendor == "postgresql"
        else "STRFTIME('%Y-%m-%d %H:%M:%f', 'NOW')"
    )
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {now}")
        value = cursor.fetchone()[0]
    if isinstance(value, str):  # SQLite
        value = datetime.fromisoformat(value).replace(tzinfo=UTC)
    return value


def accept(api: Any, n: int, **extra: Any) -> Delivery:
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": {"id": f"user-{n}", "email": f"user-{n}@example.com"},
            "template": "order_shipped",
            "data": {"order_id": f"A-{n}"},
            "channels": ["email"],
            **extra,
        },
        format="json",
    )
    assert response.status_code == 202
    return Delivery.objects.get(notification_id=response.json()["id"], channel="email")


# --- In process: this process's clock skewed, the database's not ---------------------------


@pytest.fixture
def skewed(monkeypatch: pytest.MonkeyPatch) -> Callable[[timedelta], None]:
    """Shift this process's wall clock (django.utils.timezone.now) by the given amount."""
    real_now = timezone.now

    def shift(by: timedelta) -> None:
        monkeypatch.setattr(timezone, "now", lambda: real_now() + by)

    return shift


@pytest.mark.django_db
def test_a_clock_ahead_takes_no_lease_the_database_clock_still_holds(
    api: Any, template: Any, skewed: Callable[[timedelta], None]
) -> None:
    delivery = accept(api, 1)
    other = uuid.uuid4()
    Delivery.objects.filter(pk=delivery.pk).update(
        lease_token=other, lease_expires_at=Now() + timedelta(seconds=20), attempts=1
    )
    skewed(SKEW)

    assert deliveries_claim(delivery_ids=[delivery.pk]) == []
    assert services.delivery_process(delivery_id=delivery.pk) == ProcessOutcome.NOT_CLAIMED
    delivery.refresh_from_db()
    assert (delivery.lease_token, delivery.attempts, delivery.status) == (other, 1, "queued")


@pytest.mark.django_db
def test_a_clock_ahead_neither_claims_nor_publishes_a_retry_before_it_is_due(
    api: Any, template: Any, skewed: Callable[[timedelta], None]
) -> None:
    delivery = accept(api, 1)
    Delivery.objects.filter(pk=delivery.pk).update(
        status=DeliveryStatus.RETRYING, attempts=1, next_attempt_at=Now() + timedelta(seconds=20)
    )
    skewed(SKEW)

    assert deliveries_claim(delivery_ids=[delivery.pk]) == []
    assert outbox_publish_due() == 0
    # The relay sleeps until the row falls due by the database's clock, not 0 s (a busy loop).
    assert 18 < (outbox_next_due() or 0) <= 20
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.enqueued_at) == ("retrying", 1, None)


@pytest.mark.django_db
def test_a_clock_ahead_does_not_release_a_scheduled_delivery_early(
    api: Any, template: Any, skewed: Callable[[timedelta], None]
) -> None:
    send_at = database_clock() + timedelta(seconds=20)
    accept(api, 1, send_at=send_at.isoformat())
    skewed(SKEW)

    assert outbox_publish_due() == 0
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.next_attempt_at) == ("scheduled", send_at)


@pytest.mark.django_db
def test_a_sweeper_clock_ahead_hands_back_nothing_that_is_not_stale(
    api: Any, template: Any, skewed: Callable[[timedelta], None]
) -> None:
    fresh, stale = accept(api, 1), accept(api, 2)
    age = settings.SWEEPER_STALE_SECONDS - 10
    Delivery.objects.filter(pk=fresh.pk).update(enqueued_at=Now() - timedelta(seconds=age))
    Delivery.objects.filter(pk=stale.pk).update(
        enqueued_at=Now() - timedelta(seconds=settings.SWEEPER_STALE_SECONDS + 1)
    )
    skewed(SKEW)

    assert deliveries_sweep() == 1
    assert list(Delivery.objects.outbox().values_list("pk", flat=True)) == [stale.pk]


@pytest.mark.django_db
def test_a_clock_behind_writes_leases_and_retries_on_the_database_clock(
    api: Any, template: Any, skewed: Callable[[timedelta], None]
) -> None:
    """A worker 30 s behind would otherwise write a lease that has already run out for the
    others, and a retry due 30 s early."""
    retried, deferred = accept(api, 1), accept(api, 2)
    skewed(-SKEW)
    claimed = deliveries_claim(delivery_ids=[retried.pk, deferred.pk])
    assert [d.pk for d in claimed] == [retried.pk, deferred.pk]
    now = database_clock()
    lease_ends = {d.lease_expires_at for d in Delivery.objects.all()}
    assert len(lease_ends) == 1
    lease_left = (lease_ends.pop() - now).total_seconds()
    assert settings.DELIVERY_LEASE_SECONDS - 5 < lease_left <= settings.DELIVERY_LEASE_SECONDS
    # Another worker (its clock right) finds the lease held.
    skewed(timedelta(0))
    assert deliveries_claim(delivery_ids=[retried.pk, deferred.pk]) == []

    skewed(-SKEW)
    failed = services.SendResult(services.Outcome.TRANSIENT, error="timeout")
    deliveries_settle(
        [
            Settlement(claimed[0], Settle.RETRY, failed, provider="sandbox", delay=20),
            Settlement(claimed[1], Settle.DEFER, failed, provider="sandbox", delay=20),
        ],
        started_at=timezone.now(),
    )
    now = database_clock()
    for delivery in Delivery.objects.all():
        due_in = (delivery.next_attempt_at - now).total_seconds()
        assert 15 < due_in <= 20, (delivery.pk, due_in)
        assert delivery.lease_token is None
    skewed(timedelta(0))
    assert outbox_publish_due() == 0


# --- A real Celery worker (and its relay) 30 s ahead under libfaketime -----------------------


@pytest.fixture
def faketime_env() -> dict[str, str]:
    if connection.vendor != "postgresql":
        pytest.skip("the database's clock is this host's clock on SQLite: nothing to skew")
    env = skewed_env(int(SKEW.total_seconds()))
    # The skew takes hold in a Python process (else the test below would prove nothing).
    ahead = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env={**os.environ, **env},
        capture_output=True,
        check=True,
        text=True,
    )
    assert float(ahead.stdout) - time.time() > SKEW.total_seconds() - 5
    return env


@pytest.fixture
def skewed_worker(
    celery_worker_process: Callable[..., Process],
    smtp_server: SmtpSink,
    faketime_env: dict[str, str],
) -> Iterator[Callable[[], Process]]:
    def start() -> Process:
        return celery_worker_process(
            "email,maintenance",
            concurrency=2,
            beat=True,
            EMAIL_PROVIDER="smtp",
            SMTP_HOST=smtp_server.host,
            SMTP_PORT=smtp_server.port,
            EMAIL_FROM="clarion@example.com",
            SWEEPER_INTERVAL_SECONDS="1",
            SWEEPER_STALE_SECONDS="45",
            **faketime_env,
        )

    yield start


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_a_worker_30s_ahead_steals_no_lease_sends_nothing_early_and_sends_once(
    api: Any,
    template: Any,
    smtp_server: SmtpSink,
    skewed_worker: Callable[[], Process],
) -> None:
    held, retrying, published = accept(api, 1), accept(api, 2), accept(api, 3)
    # Another worker holds `held` for 20 s more by the database's clock; its message has been
    # taken (enqueued_at just now), and a duplicate will come (a relay crash, say).
    Delivery.objects.filter(pk=held.pk).update(
        lease_token=uuid.uuid4(),
        lease_expires_at=Now() + timedelta(seconds=20),
        attempts=1,
        enqueued_at=Now(),
    )
    # `retrying` failed once and is due again in 20 s: back in the outbox.
    Delivery.objects.filter(pk=retrying.pk).update(
        status=DeliveryStatus.RETRYING, attempts=1, next_attempt_at=Now() + timedelta(seconds=20)
    )
    # `published` was handed to the broker 20 s ago and its message is still on its way (in
    # a prefetch buffer, say): not stale for a sweeper (SWEEPER_STALE_SECONDS=45).
    Delivery.objects.filter(pk=published.pk).update(enqueued_at=Now() - timedelta(seconds=20))
    published_at = Delivery.objects.get(pk=published.pk).enqueued_at
    due_at = Delivery.objects.get(pk=retrying.pk).next_attempt_at
    assert due_at is not None

    worker = skewed_worker()
    ordinary = [accept(api, n) for n in range(10, 15)]
    # The duplicate message for the held and the not-yet-due delivery reaches the worker.
    duplicate = celery_app.send_task(
        deliver_task_name("email"), args=[[held.pk, retrying.pk]], queue="email"
    )

    def sent_to() -> Counter[str]:
        return Counter(m["To"] for m in smtp_server.received())

    wait_until(
        lambda: sum(sent_to()[f"user-{n}@example.com"] for n in range(10, 15)) == 5,
        timeout=30,
        message="the ordinary deliveries sent by the skewed worker",
    )
    wait_until(
        lambda: f"[{duplicate.id}] succeeded" in worker.log(),
        timeout=15,
        message="the skewed worker to handle the duplicate message",
    )
    assert f"[{duplicate.id}] succeeded" in worker.log()
    assert "{'not_claimed': 2}" in worker.log().split(f"[{duplicate.id}] succeeded", 1)[1]

    # Until the retry falls due (by the database's clock), the skewed relay, worker and
    # sweeper leave `held`, `retrying` and `published` alone.
    while database_clock() < due_at - timedelta(seconds=2):
        counts = sent_to()
        assert counts["user-1@example.com"] == 0, "a lease held elsewhere was taken"
        assert counts["user-2@example.com"] == 0, "a retry was sent before it was due"
        assert Delivery.objects.get(pk=retrying.pk).enqueued_at is None, "published early"
        assert Delivery.objects.get(pk=published.pk).enqueued_at == published_at, "swept"
        time.sleep(0.5)

    # Once due, the retry goes out, once.
    wait_until(
        lambda: Delivery.objects.filter(pk=retrying.pk, status="sent").exists(),
        timeout=20,
        message="the retry sent once due",
    )
    retried = Delivery.objects.get(pk=retrying.pk)
    assert retried.attempts == 2
    assert database_clock() >= due_at

    counts = sent_to()
    assert counts["user-1@example.com"] == 0
    assert {n: counts[f"user-{n}@example.com"] for n in range(10, 15)} == dict.fromkeys(
        range(10, 15), 1
    )
    assert counts["user-3@example.com"] == 0
    held_row = Delivery.objects.get(pk=held.pk)
    assert (held_row.status, held_row.attempts) == ("queued", 1)
    assert Delivery.objects.filter(pk__in=[d.pk for d in ordinary], status="sent").count() == 5
    assert set(
        Delivery.objects.filter(pk__in=[d.pk for d in ordinary]).values_list("attempts", flat=True)
    ) == {1}
