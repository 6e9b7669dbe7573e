"""The outbox relay: the accept path publishes nothing; the relay publishes due rows in batches
of DISPATCH_BATCH_SIZE per channel, marks them published, releases scheduled ones when due,
leaves everything in the outbox when the broker fails, and wakes on the commit signal."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from core import outbox
from notifications.models import Delivery, DeliveryEvent, DeliveryStatus
from tests.conftest import Process, free_port, wait_until
from workers.relay import outbox_next_due, outbox_publish_due

pytestmark = pytest.mark.django_db


@pytest.fixture
def broker() -> redis.Redis:
    if not settings.CELERY_BROKER_URL.startswith(("redis://", "redis+socket://")):
        pytest.skip("inspects Redis broker lists; the broker here is not Redis")
    return redis.Redis.from_url(settings.CELERY_BROKER_URL.replace("redis+socket://", "unix://"))


def messages(broker: redis.Redis, queue: str) -> list[tuple[str, list[int]]]:
    """(task name, delivery ids) of each message in a queue, oldest first."""
    out = []
    for raw in reversed(broker.lrange(queue, 0, -1)):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"]["task"], body[0][0]))
    return out


def accept(api: Any, n: int, *, channels: list[str], **body: Any) -> list[str]:
    ids = []
    for i in range(n):
        response = api.post(
            "/api/v1/notifications",
            {
                "recipient": {"id": f"u{i}", "email": f"u{i}@example.com", "phone": "+14155550100"},
                "template": "order_shipped",
                "data": {"order_id": str(i)},
                "channels": channels,
                **body,
            },
            format="json",
        )
        assert response.status_code == 202, response.content
        ids.append(response.json()["id"])
    return ids


def test_accept_publishes_nothing_and_the_relay_publishes_batches_per_channel(
    api: Any, template: Any, broker: redis.Redis, settings: Any
) -> None:
    settings.DISPATCH_BATCH_SIZE = 2
    accept(api, 3, channels=["email", "sms"])
    assert broker.llen("email") == 0 and broker.llen("sms") == 0
    emails = list(
        Delivery.objects.filter(channel="email").order_by("pk").values_list("pk", flat=True)
    )
    sms = list(Delivery.objects.filter(channel="sms").order_by("pk").values_list("pk", flat=True))
    assert Delivery.objects.outbox().count() == 6

    assert outbox_publish_due() == 6

    assert messages(broker, "email") == [
        ("clarion.deliver.email", emails[:2]),
        ("clarion.deliver.email", emails[2:]),
    ]
    assert messages(broker, "sms") == [
        ("clarion.deliver.sms", sms[:2]),
        ("clarion.deliver.sms", sms[2:]),
    ]
    assert Delivery.objects.outbox().count() == 0
    assert Delivery.objects.filter(enqueued_at__isnull=True).count() == 0
    assert outbox_publish_due() == 0  # published once
    assert broker.llen("email") == 2


def test_the_commit_signal_wakes_the_relay_after_commit_only(
    api: Any, template: Any, broker: redis.Redis, django_capture_on_commit_callbacks: Any
) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(outbox.RELAY_WAKE_KEY)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        accept(api, 3, channels=["email"])
    assert client.llen(outbox.RELAY_WAKE_KEY) == 0  # nothing before commit
    wakes = [c for c in callbacks if c is outbox.outbox_wake]
    assert len(wakes) == 3  # one per accept transaction
    for wake in wakes:
        wake()
    # At most one wake-up waits, however many commits signalled.
    assert client.lrange(outbox.RELAY_WAKE_KEY, 0, -1) == [b"1"]


def test_a_failed_publish_leaves_every_row_in_the_outbox(
    api: Any, template: Any, broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.exceptions import OperationalError

    from project.celery import app

    accept(api, 3, channels=["email"])
    calls = []

    def broker_down(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs["args"][0])
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    with monkeypatch.context() as patch:
        patch.setattr(app, "send_task", broker_down)
        with pytest.raises(OperationalError):
            outbox_publish_due()
    assert len(calls) == 1
    assert Delivery.objects.outbox().count() == 3
    assert outbox_publish_due() == 3
    assert broker.llen("email") == 1


def test_scheduled_rows_are_released_when_due_and_not_before(
    api: Any, template: Any, broker: redis.Redis
) -> None:
    later = timezone.now() + timedelta(hours=1)
    [notification_id] = accept(api, 1, channels=["email"], send_at=later.isoformat())
    delivery = Delivery.objects.get(notification_id=notification_id)
    assert delivery.status == DeliveryStatus.SCHEDULED
    assert outbox_publish_due() == 0
    assert 3590 < (outbox_next_due() or 0) <= 3600

    Delivery.objects.filter(pk=delivery.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    assert outbox_publish_due() == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.next_attempt_at) == (DeliveryStatus.QUEUED, None)
    assert list(
        DeliveryEvent.objects.filter(delivery=delivery).values_list("status", "detail")
    ) == [("scheduled", ""), ("queued", "due")]
    assert messages(broker, "email") == [("clarion.deliver.email", [delivery.pk])]
    assert outbox_next_due() is None


def test_a_retry_waits_in_the_outbox_until_due(
    api: Any, template: Any, broker: redis.Redis
) -> None:
    accept(api, 1, channels=["email"])
    delivery = Delivery.objects.get()
    Delivery.objects.filter(pk=delivery.pk).update(
        status=DeliveryStatus.RETRYING, next_attempt_at=timezone.now() + timedelta(seconds=0.3)
    )
    assert outbox_publish_due() == 0
    assert 0 < (outbox_next_due() or 0) <= 0.3
    time.sleep(0.35)
    assert outbox_publish_due() == 1
    assert messages(broker, "email") == [("clarion.deliver.email", [delivery.pk])]


def test_a_crash_between_publish_and_commit_gives_a_duplicate_message_and_one_send(
    api: Any, template: Any, broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay published, then died before its commit: the rows are still in the outbox, the
    next round publishes them again, and the second message finds nothing to send."""
    from workers import dispatch
    from workers.models import SandboxMessage
    from workers.services import ProcessOutcome, deliveries_process

    accept(api, 2, channels=["email"])
    ids = sorted(Delivery.objects.values_list("pk", flat=True))
    publish = dispatch.batches_publish_rollback_unsafe

    def publish_then_die(by_channel: dict[str, list[int]]) -> int:
        publish(by_channel)
        raise ConnectionResetError("the relay's database connection dropped before commit")

    with monkeypatch.context() as patch:
        patch.setattr(dispatch, "batches_publish_rollback_unsafe", publish_then_die)
        with pytest.raises(ConnectionResetError):
            outbox_publish_due()
    assert Delivery.objects.outbox().count() == 2
    assert outbox_publish_due() == 2
    assert messages(broker, "email") == [("clarion.deliver.email", ids)] * 2

    first = deliveries_process(delivery_ids=ids)
    second = deliveries_process(delivery_ids=ids)
    assert set(first.values()) == {ProcessOutcome.SENT}
    assert set(second.values()) == {ProcessOutcome.NOT_CLAIMED}
    assert SandboxMessage.objects.count() == 2


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_the_relays_healthz_is_503_while_its_rounds_fail_and_200_again(
    api: Any, template: Any, relay_process: Callable[..., Process]
) -> None:
    """The relay answers /healthz beside its metrics on WORKER_METRICS_PORT: 503, with the
    last error, once its rounds have failed for RELAY_UNHEALTHY_SECONDS (its broker refuses
    connections and there is a row to publish); 200 again once a round succeeds (another
    relay published the row, so there is nothing left for it to publish)."""
    failing_port, healthy_port = free_port(), free_port()
    relay_process(
        name="failing",
        WORKER_METRICS_PORT=failing_port,
        RELAY_UNHEALTHY_SECONDS=1,
        CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0",
    )
    assert _healthz(failing_port) == (200, [])
    accept(api, 1, channels=["email"])
    wait_until(
        lambda: _healthz(failing_port)[0] == 503, timeout=30, message="the failing relay's 503"
    )
    status, problems = _healthz(failing_port)
    assert status == 503
    assert len(problems) == 1
    assert problems[0].startswith("no relay round succeeded for ")
    assert "Connection refused" in problems[0]

    relay_process(name="healthy", WORKER_METRICS_PORT=healthy_port, RELAY_UNHEALTHY_SECONDS=1)
    wait_until(
        lambda: not Delivery.objects.outbox().exists(), timeout=30, message="the row published"
    )
    assert _healthz(healthy_port) == (200, [])
    wait_until(
        lambda: _healthz(failing_port) == (200, []), timeout=30, message="the failing relay well"
    )


def _healthz(port: int) -> tuple[int, list[str]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())["problems"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["problems"]
