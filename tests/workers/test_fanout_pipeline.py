"""Topic notifications on the real pipeline (relay and worker processes, the broker): every
subscribed, opted-in recipient gets exactly one message; and a relay killed (SIGKILL) in the
middle of a fan-out leaves the next one to carry on where it stopped, with no subscriber
reached twice or missed."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from notifications.models import (
    Delivery,
    DeliveryStatus,
    Notification,
    Preference,
    Recipient,
    Topic,
    TopicSubscription,
)
from tests.conftest import Process, wait_until
from workers.models import SandboxMessage

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

PENDING = (DeliveryStatus.SCHEDULED, DeliveryStatus.QUEUED, DeliveryStatus.RETRYING)
# Fast enough that the provider's pace does not make the runs long.
FAST_SMS = {"RATE_LIMITS": "sms=50000/s", "RATE_LIMIT_BURST": 1000}


def subscribers(owner: Any, count: int) -> tuple[Topic, list[Recipient]]:
    recipients = Recipient.objects.bulk_create(
        [
            Recipient(owner=owner, external_id=f"sub-{n:05d}", phone="+14155550100")
            for n in range(count)
        ]
    )
    topic = Topic.objects.create(owner=owner, key="release-notes")
    TopicSubscription.objects.bulk_create(
        [TopicSubscription(topic=topic, recipient=r) for r in recipients]
    )
    return topic, recipients


def send(api: Any) -> str:
    response = api.post(
        "/api/v1/notifications",
        {
            "topic": "release-notes",
            "template": "order_shipped",
            "data": {"order_id": "v2"},
            "channels": ["sms"],
        },
        format="json",
    )
    assert response.status_code == 202, response.content
    return str(response.json()["id"])


def fanned_out(parent_id: str) -> bool:
    return Notification.objects.filter(pk=parent_id, fanout_finished_at__isnull=False).exists()


def settled(parent_id: str) -> bool:
    return fanned_out(parent_id) and not Delivery.objects.filter(status__in=PENDING).exists()


def messages_by_recipient() -> Counter[str]:
    return Counter(
        SandboxMessage.objects.values_list("notification__recipient__external_id", flat=True)
    )


def test_every_subscribed_opted_in_recipient_gets_one_message(
    api: Any, owner: Any, template: Any, celery_worker_process: Callable[..., Process]
) -> None:
    topic, recipients = subscribers(owner, 2000)
    opted_out = recipients[::20]  # 100
    Preference.objects.bulk_create(
        [
            Preference(recipient=r, category="orders", channel="sms", enabled=False)
            for r in opted_out
        ]
    )
    unsubscribed = recipients[7::20]  # 100
    TopicSubscription.objects.filter(topic=topic, recipient__in=unsubscribed).delete()
    celery_worker_process("sms", concurrency=2, FANOUT_CHUNK_SIZE=200, **FAST_SMS)

    parent_id = send(api)
    wait_until(lambda: settled(parent_id), timeout=240, message="the fan-out to be delivered")

    expected = {r.external_id for r in recipients} - {
        r.external_id for r in [*opted_out, *unsubscribed]
    }
    received = messages_by_recipient()
    assert set(received) == expected
    assert set(received.values()) == {1}
    parent = Notification.objects.get(pk=parent_id)
    assert (parent.recipients_total, parent.recipients_done) == (1900, 1900)
    children = Notification.objects.filter(parent_id=parent_id)
    assert children.count() == 1900
    skipped = Delivery.objects.filter(notification__parent_id=parent_id, status="skipped")
    assert sorted(skipped.values_list("notification__recipient__external_id", flat=True)) == sorted(
        r.external_id for r in opted_out
    )
    assert set(skipped.values_list("skip_reason", flat=True)) == {"opted_out"}
    detail = api.get(f"/api/v1/notifications/{parent_id}").json()
    assert (detail["status"], detail["recipients_total"], detail["recipients_done"]) == (
        "fanned_out",
        1900,
        1900,
    )


def test_a_relay_killed_mid_fan_out_is_taken_over_with_every_subscriber_once(
    api: Any,
    owner: Any,
    template: Any,
    relay_process: Callable[..., Process],
    celery_worker_process: Callable[..., Process],
) -> None:
    total = 1500
    _, recipients = subscribers(owner, total)
    # Chunks of 5: the fan-out takes many transactions, so the kill lands in its middle.
    first = relay_process(name="relay-killed", FANOUT_CHUNK_SIZE=5)
    parent_id = send(api)

    def mid_way() -> bool:
        done = Notification.objects.get(pk=parent_id).recipients_done
        if done >= total:
            pytest.fail("the fan-out ended before the relay could be killed in its middle")
        return 0 < done

    wait_until(mid_way, timeout=60, interval=0.01, message="the fan-out to start")
    first.stop(signal.SIGKILL)
    done_at_kill = Notification.objects.get(pk=parent_id).recipients_done
    assert 0 < done_at_kill < total
    assert Notification.objects.filter(parent_id=parent_id).count() == done_at_kill

    celery_worker_process("sms", concurrency=2, FANOUT_CHUNK_SIZE=50, **FAST_SMS)
    wait_until(lambda: settled(parent_id), timeout=240, message="the fan-out to be delivered")

    children = Counter(
        Notification.objects.filter(parent_id=parent_id).values_list(
            "recipient__external_id", flat=True
        )
    )
    assert set(children) == {r.external_id for r in recipients}
    assert set(children.values()) == {1}
    received = messages_by_recipient()
    assert set(received) == {r.external_id for r in recipients}
    assert set(received.values()) == {1}
    parent = Notification.objects.get(pk=parent_id)
    assert (parent.recipients_total, parent.recipients_done) == (total, total)
