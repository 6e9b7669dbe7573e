"""One clock for leases and due times: the database's. A worker, relay or sweeper whose wall
clock runs 30 s ahead (or behind) neither takes a lease another worker still holds, nor sends
or releases a delivery before it is due, nor hands back to the relay a delivery whose message
is not stale; and it still delivers ordinary work exactly once. An API process (or a relay
fanning out a topic) 30 s ahead or behind places a `send_at`, an escalation step, a digest
window and a quiet-hours end where the database's clock puts them; the provider events'
and the webhooks' give-up and disable checks are judged on that clock too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.db.models.functions import Now
from django.utils import timezone

from core.shared_state import redis_client
from notifications.models import (
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Webhook,
    WebhookMessage,
)
from project.celery import app as celery_app
from tests.clock import skewed_env
from tests.conftest import Process, SmtpSink, wait_until
from tests.emulators.base import Response
from tests.emulators.webhook_receiver import WebhookReceiver
from tests.factories import TemplateFactory, api_key_for
from tests.project.api_server import http, start_api_server
from workers import services
from workers.dispatch import deliver_task_name
from workers.fanout import topic_fanout_step
from workers.models import ProviderEvent
from workers.provider_events import provider_events_apply
from workers.relay import outbox_next_due, outbox_publish_due
from workers.services import ProcessOutcome, deliveries_sweep
from workers.transitions import Settle, Settlement, deliveries_claim, deliveries_settle
from workers.webhook_sender import NEXT_WAKE_KEY, webhooks_send_due, webhooks_wake_when_due

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
    api: Any, template: Any, skewed: Callable[[timedelta], None], settings: Any
) -> None:
    # The age rule alone: the broker's rule (SWEEPER_LOST_SECONDS, tests/workers/test_sweeper.py)
    # would hand back both, as no message for either is in the broker here.
    settings.SWEEPER_LOST_SECONDS = settings.SWEEPER_STALE_SECONDS
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


# --- An API process (or a relay fanning out) ahead or behind: due times set at accept ---------

URL = "/api/v1/notifications"
# Post one notification to an API process; returns its 202 body.
Post = Callable[[dict[str, Any]], dict[str, Any]]
DIGEST_WINDOW = timedelta(seconds=30)
ESCALATE_AFTER = timedelta(seconds=40)
# How far an accepting process's estimate of the database's clock may stray from the test's
# readings around the request: the estimate's error is half a loopback round trip.
SLACK = timedelta(milliseconds=250)


def zulu(value: datetime) -> str:
    """As the 202 body spells a time."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@pytest.fixture
def on_postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the database's clock is this host's clock on SQLite: nothing to skew")


@pytest.fixture
def digest_template(owner: Any) -> Any:
    return TemplateFactory(
        owner=owner,
        key="digested",
        content={"sms": {"body": "{{ count }} events"}},
        digest={"window": f"{int(DIGEST_WINDOW.total_seconds())}s"},
    )


def due_of(answer: dict[str, Any], channel: str) -> datetime:
    due = Delivery.objects.get(notification_id=answer["id"], channel=channel).next_attempt_at
    assert due is not None, answer
    return due


def accept_and_check_due_times(api: Any, post: Post, *, label: str, ahead: bool) -> datetime:
    """Through `post` (an API process whose clock runs 30 s ahead or behind) accept a send_at
    20 s ahead, an escalation step, a digest member, and an escalation step that falls 10 s
    inside quiet hours, on the side a clock 30 s off would see outside them; each lands where
    the database's clock puts it. Returns the send_at."""
    mail, phone, quiet = (f"{kind}-{label}" for kind in ("mail", "phone", "quiet"))
    api.put(f"/api/v1/recipients/{mail}", {"email": f"{mail}@example.com"}, format="json")
    api.put(f"/api/v1/recipients/{phone}", {"phone": "+14155550100"}, format="json")
    api.put(
        f"/api/v1/recipients/{quiet}", {"phone": "+14155550101", "timezone": "UTC"}, format="json"
    )
    now = database_clock()
    # Quiet hours of two minutes, starting 45 to 105 s from now (minutes are their grain).
    start = (now + timedelta(seconds=105)).replace(second=0, microsecond=0)
    end = start + timedelta(minutes=2)
    window = {"start": f"{start:%H:%M}", "end": f"{end:%H:%M}", "channels": ["sms"]}
    answer = api.put(
        f"/api/v1/recipients/{quiet}/preferences", {"quiet_hours": window}, format="json"
    )
    assert answer.status_code == 200, answer.content
    edge = end - timedelta(seconds=10) if ahead else start + timedelta(seconds=10)

    send_at = now + timedelta(seconds=20)
    before = database_clock()
    quiet_after = round((edge - before).total_seconds())
    order = {"template": "order_shipped", "data": {"order_id": label}}
    at_send_at = post(
        {**order, "recipient": mail, "channels": ["email"], "send_at": send_at.isoformat()}
    )
    escalated = post(
        {
            **order,
            "recipient": phone,
            "channels": ["sms"],
            "escalation": [{"after": "40s", "unless": "read", "channel": "sms"}],
        }
    )
    digested = post({"recipient": phone, "template": "digested", "data": {}, "channels": ["sms"]})
    held = post(
        {
            **order,
            "recipient": quiet,
            "channels": ["sms"],
            "escalation": [{"after": f"{quiet_after}s", "unless": "read", "channel": "sms"}],
        }
    )
    after = database_clock()

    # Still ahead by the database's clock: scheduled, for exactly that time.
    assert at_send_at["deliveries"] == [
        {"channel": "email", "status": "scheduled", "scheduled_for": zulu(send_at)}
    ]
    assert due_of(at_send_at, "email") == send_at
    # The step's deadline and the digest's window end run from the database's now.
    assert [d["status"] for d in escalated["deliveries"]] == ["scheduled"]
    assert before - SLACK <= due_of(escalated, "sms") - ESCALATE_AFTER <= after + SLACK
    assert [(d["status"], d["reason"]) for d in digested["deliveries"]] == [("scheduled", "digest")]
    assert before - SLACK <= due_of(digested, "sms") - DIGEST_WINDOW <= after + SLACK
    # Due inside the quiet hours by the database's clock: held until they end.
    assert held["deliveries"] == [
        {
            "channel": "sms",
            "status": "scheduled",
            "reason": "quiet_hours",
            "scheduled_for": zulu(end),
            "unless": "read",
        }
    ]
    assert due_of(held, "sms") == end
    return send_at


def accepted(response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.content
    return dict(response.json())


@pytest.mark.django_db
@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "behind"])
def test_an_api_process_30s_off_places_due_times_on_the_database_clock(
    api: Any,
    template: Any,
    digest_template: Any,
    on_postgresql: None,
    skewed: Callable[[timedelta], None],
    ahead: bool,
) -> None:
    skewed(SKEW if ahead else -SKEW)
    accept_and_check_due_times(
        api,
        lambda body: accepted(api.post(URL, body, format="json")),
        label="ahead" if ahead else "behind",
        ahead=ahead,
    )


@pytest.mark.django_db
@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "behind"])
def test_a_relay_30s_off_fans_a_topic_out_on_the_database_clock(
    api: Any,
    template: Any,
    digest_template: Any,
    on_postgresql: None,
    skewed: Callable[[timedelta], None],
    ahead: bool,
) -> None:
    """The children of a topic notification are routed by the relay that fans them out: a
    send_at and a digest window are placed by the database's clock."""
    api.put(
        "/api/v1/recipients/sub-1",
        {"email": "sub-1@example.com", "phone": "+14155550100"},
        format="json",
    )
    api.put("/api/v1/topics/news", {"name": "News"}, format="json")
    api.post("/api/v1/topics/news/subscribers", {"recipients": ["sub-1"]}, format="json")
    send_at = database_clock() + timedelta(seconds=20)
    topic = {"topic": "news", "data": {"order_id": "T-1"}}
    later = accepted(
        api.post(
            URL,
            {**topic, "template": "order_shipped", "channels": ["email"], "send_at": send_at},
            format="json",
        )
    )
    digest = accepted(api.post(URL, {**topic, "template": "digested"}, format="json"))
    skewed(SKEW if ahead else -SKEW)
    before = database_clock()
    assert topic_fanout_step() is True
    assert topic_fanout_step() is True
    after = database_clock()

    children = Delivery.objects.filter(notification__parent__isnull=False)
    email = children.get(notification__parent_id=later["id"])
    assert (email.status, email.next_attempt_at) == ("scheduled", send_at)
    sms = children.get(notification__parent_id=digest["id"])
    assert (sms.status, sms.skip_reason) == ("scheduled", "digest")
    assert sms.next_attempt_at is not None
    assert before - SLACK <= sms.next_attempt_at - DIGEST_WINDOW <= after + SLACK


@pytest.mark.django_db
@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "behind"])
def test_a_worker_30s_off_gives_up_waiting_for_a_delivery_on_the_database_clock(
    api: Any,
    template: Any,
    skewed: Callable[[timedelta], None],
    settings: Any,
    ahead: bool,
) -> None:
    """An event about a delivery still unsettled is applied anyway once it has waited
    PROVIDER_EVENTS_WAIT_SECONDS, by the database's clock: 10 s short of it, it waits; 10 s
    past it, it is applied."""
    delivery = accept(api, 1)
    wait = timedelta(seconds=settings.PROVIDER_EVENTS_WAIT_SECONDS)
    for n, age in enumerate([wait - timedelta(seconds=10), wait + timedelta(seconds=10)]):
        event = ProviderEvent.objects.create(
            provider="sendgrid",
            event_id=f"event-{n}",
            kind="delivered",
            raw_status="delivered",
            delivery_id=delivery.pk,
            occurred_at=timezone.now(),
        )
        ProviderEvent.objects.filter(pk=event.pk).update(received_at=Now() - age)
    skewed(SKEW if ahead else -SKEW)

    assert provider_events_apply() == 1
    assert list(ProviderEvent.objects.order_by("event_id").values_list("tries", "result")) == [
        (1, ""),
        (0, "delivered recorded, stays queued"),
    ]


@pytest.fixture
def failing_receiver(settings: Any) -> Iterator[WebhookReceiver]:
    settings.WEBHOOK_ALLOW_PRIVATE = True
    settings.CIRCUIT_FAILURE_THRESHOLD = 100
    endpoint = WebhookReceiver().start()
    endpoint.fail_always(Response(500, {"error": "down"}))
    yield endpoint
    endpoint.stop()


@pytest.mark.django_db
@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "behind"])
def test_a_webhook_sender_30s_off_gives_up_and_disables_on_the_database_clock(
    api: Any,
    failing_receiver: WebhookReceiver,
    skewed: Callable[[timedelta], None],
    settings: Any,
    ahead: bool,
) -> None:
    """A message failing for WEBHOOK_RETRY_FOR_SECONDS is dead and an endpoint failing for
    WEBHOOK_DISABLE_AFTER_SECONDS is disabled, by the database's clock: 10 s short of either,
    not yet; 10 s past, so."""
    answer = api.post(
        "/api/v1/webhooks",
        {"url": f"{failing_receiver.url}/hook", "event_types": ["delivery.sent"]},
        format="json",
    )
    assert answer.status_code == 201, answer.content
    webhook = Webhook.objects.get(pk=answer.json()["id"])
    retry_for = timedelta(seconds=settings.WEBHOOK_RETRY_FOR_SECONDS)
    ten = timedelta(seconds=10)
    for key, age in (("young", retry_for - ten), ("old", retry_for + ten)):
        WebhookMessage.objects.create(
            webhook=webhook,
            msg_id=f"msg_{key}",
            event_type="delivery.sent",
            event_key=key,
            payload={},
        )
        WebhookMessage.objects.filter(event_key=key).update(created_at=Now() - age)
    # Ahead: failing 10 s short of the limit (a clock ahead would disable it). Behind: 10 s
    # past it (a clock behind would not).
    failing_for = timedelta(seconds=settings.WEBHOOK_DISABLE_AFTER_SECONDS) + (
        -ten if ahead else ten
    )
    Webhook.objects.filter(pk=webhook.pk).update(failing_since=Now() - failing_for)
    skewed(SKEW if ahead else -SKEW)

    assert webhooks_send_due() == 0
    assert dict(WebhookMessage.objects.values_list("event_key", "status")) == {
        "young": "pending",
        "old": "dead",
    }
    webhook.refresh_from_db()
    assert (webhook.disabled_at is None) is ahead
    assert len(failing_receiver.requests()) == 2


@pytest.mark.django_db
def test_webhook_wakes_are_asked_for_on_the_database_clock(
    api: Any,
    failing_receiver: WebhookReceiver,
    on_postgresql: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A webhooks worker asks for a wake at a retry's due time and remembers it in Redis, and
    another worker, on another host, skips asking when that wake comes soon enough. Were the
    remembered time on the first host's wall clock (10 s behind here), the second would take
    a wake 25 s away for one 15 s away, and its retry due in 20 s would wait 5 s longer."""
    answer = api.post(
        "/api/v1/webhooks",
        {"url": f"{failing_receiver.url}/hook", "event_types": ["delivery.sent"]},
        format="json",
    )
    webhook = Webhook.objects.get(pk=answer.json()["id"])

    def pending(key: str, due_in: float) -> None:
        WebhookMessage.objects.create(
            webhook=webhook,
            msg_id=f"msg_{key}",
            event_type="delivery.sent",
            event_key=key,
            payload={},
            next_attempt_at=Now() + timedelta(seconds=due_in),
        )

    real_time = time.time
    pending("later", 25)
    monkeypatch.setattr(time, "time", lambda: real_time() - 10)  # a host 10 s behind
    webhooks_wake_when_due()
    monkeypatch.setattr(time, "time", real_time)  # another host, its clock right
    pending("sooner", 20)
    webhooks_wake_when_due()

    asked = float(redis_client().get(NEXT_WAKE_KEY) or 0)
    due = database_clock().timestamp() + 20
    assert abs(asked - due) < 1, asked - due


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
            # The age rule alone: `published` below has no message in the broker, which the
            # broker's rule (SWEEPER_LOST_SECONDS) would hand back whatever the clocks.
            SWEEPER_LOST_SECONDS="45",
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


# --- Real API processes 30 s ahead and 30 s behind under libfaketime --------------------------


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_api_processes_30s_ahead_and_behind_schedule_on_the_database_clock(
    api: Any,
    owner: Any,
    template: Any,
    digest_template: Any,
    spawn: Callable[..., Process],
    tmp_path: Path,
    celery_worker_process: Callable[..., Process],
    smtp_server: SmtpSink,
) -> None:
    """A send_at 20 s ahead is `scheduled` on both and goes out at its time by the database's
    clock, once; escalation steps, digest windows and quiet-hours ends are placed by it."""
    if connection.vendor != "postgresql":
        pytest.skip("the database's clock is this host's clock on SQLite: nothing to skew")
    offsets = {"ahead": SKEW, "behind": -SKEW}
    servers = {}
    for label, offset in offsets.items():
        env = skewed_env(int(offset.total_seconds()))
        process, servers[label] = start_api_server(spawn, tmp_path, name=f"api-{label}", **env)
        # The server read the database's clock as it started, before any request, and found
        # its own wall clock 30 s off it.
        wait_until(
            lambda process=process: "database clock read" in process.log(),
            timeout=10,
            message=f"the {label} server's reading of the database's clock",
        )
        read = re.search(r"database clock read: ([+-]\d+\.\d+) s", process.log())
        assert read is not None and abs(float(read.group(1)) + offset.total_seconds()) < 1
        # The skew took hold in the server's interpreter.
        off = subprocess.run(
            [sys.executable, "-c", "import time; print(time.time())"],
            env={**os.environ, **env},
            capture_output=True,
            check=True,
            text=True,
        )
        assert abs(float(off.stdout) - time.time() - offset.total_seconds()) < 5
    # The relay and the worker keep a true clock: what they do is judged elsewhere.
    celery_worker_process(
        "email",
        concurrency=1,
        EMAIL_PROVIDER="smtp",
        SMTP_HOST=smtp_server.host,
        SMTP_PORT=smtp_server.port,
        EMAIL_FROM="clarion@example.com",
    )
    key = api_key_for(owner)

    def post_to(base: str) -> Post:
        def post(body: dict[str, Any]) -> dict[str, Any]:
            answer = http("POST", base + URL, body=body, headers={"Authorization": f"Bearer {key}"})
            assert answer.status == 202, answer.body
            return dict(answer.json())

        return post

    send_at = {
        label: accept_and_check_due_times(
            api, post_to(base), label=label, ahead=offsets[label] > timedelta(0)
        )
        for label, base in servers.items()
    }

    def sent_to() -> Counter[str]:
        return Counter(m["To"] for m in smtp_server.received())

    # Nothing before its time by the database's clock (the relay polls every second)...
    first_due = min(send_at.values())
    while database_clock() < first_due - timedelta(seconds=1):
        assert not sent_to(), "a send_at still ahead went out early"
        time.sleep(0.25)
    # ...and each once it is due, once.
    wait_until(
        lambda: sum(sent_to().values()) == 2, timeout=30, message="both scheduled emails sent"
    )
    assert sent_to() == {"mail-ahead@example.com": 1, "mail-behind@example.com": 1}
    scheduled = Delivery.objects.filter(channel="email")
    wait_until(
        lambda: set(scheduled.values_list("status", flat=True)) == {"sent"},
        timeout=10,
        message="both marked sent",
    )
    for label, due in send_at.items():
        delivery = scheduled.get(notification__recipient__external_id=f"mail-{label}")
        # Released by the relay (a true clock) once due, and sent once.
        released = DeliveryEvent.objects.get(delivery=delivery, status="queued", detail="due")
        assert released.at >= due, (label, released.at, due)
        assert (delivery.status, delivery.attempts) == ("sent", 1)
