"""Cancel on the real pipeline (relay, broker, worker processes): a scheduled notification
cancelled before its time never goes out; and a cancel racing workers that are sending the
same notifications leaves each delivery sent once or cancelled, never both, never neither."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from notifications.models import Delivery, DeliveryStatus
from tests.conftest import Process, wait_until
from workers.models import SandboxMessage

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

PENDING = (DeliveryStatus.SCHEDULED, DeliveryStatus.QUEUED, DeliveryStatus.RETRYING)


def _item(n: int, **fields: Any) -> dict[str, Any]:
    return {
        "recipient": {"id": f"user-{n}", "phone": "+14155550100"},
        "template": "order_shipped",
        "data": {"order_id": f"A-{n}"},
        "channels": ["sms"],
        **fields,
    }


def test_a_scheduled_notification_cancelled_in_time_never_goes_out(
    api: Any, template: Any, celery_worker_process: Callable[..., Process]
) -> None:
    celery_worker_process("sms", concurrency=1)
    send_at = (timezone.now() + timedelta(seconds=3)).isoformat()
    cancelled = api.post("/api/v1/notifications", _item(1, send_at=send_at), format="json")
    kept = api.post("/api/v1/notifications", _item(2, send_at=send_at), format="json")
    answer = api.post(f"/api/v1/notifications/{cancelled.json()['id']}/cancel").json()
    assert answer["cancelled"] == [{"channel": "sms", "status": "cancelled"}]

    # The other one of the same time goes out: the cancelled one had every chance to.
    wait_until(
        lambda: SandboxMessage.objects.filter(notification_id=kept.json()["id"]).exists(),
        timeout=30,
        message="the notification that was not cancelled to go out",
    )
    time.sleep(1)
    assert not SandboxMessage.objects.filter(notification_id=cancelled.json()["id"]).exists()
    assert Delivery.objects.get(notification_id=cancelled.json()["id"]).status == "cancelled"


def test_a_cancel_racing_the_workers_leaves_each_delivery_sent_or_cancelled(
    api: Any, template: Any, celery_worker_process: Callable[..., Process]
) -> None:
    total = 300
    # 75 SMS a second in small batches: the run lasts about 4 s, so the cancel lands while
    # batches are claimed, paced and settled.
    celery_worker_process(
        "sms", concurrency=2, DISPATCH_BATCH_SIZE=5, RATE_LIMITS="sms=75/s", RATE_LIMIT_BURST=5
    )
    answer = api.post(
        "/api/v1/notifications/bulk",
        {"notifications": [_item(n, cancel_key="campaign-7") for n in range(total)]},
        format="json",
    )
    assert answer.json()["accepted"] == total, answer.content
    wait_until(
        lambda: SandboxMessage.objects.count() >= 30,
        timeout=30,
        message="the first messages to go out",
    )
    cancel = api.post("/api/v1/notifications/cancel", {"cancel_key": "campaign-7"}, format="json")
    assert cancel.status_code == 200
    said_cancelled = sum(len(n["cancelled"]) for n in cancel.json()["notifications"])

    wait_until(
        lambda: not Delivery.objects.filter(status__in=PENDING).exists(),
        timeout=60,
        message="every delivery to end",
    )
    statuses = dict(Delivery.objects.values_list("pk", "status"))
    messages = Counter(SandboxMessage.objects.values_list("delivery_id", flat=True))
    sent = {pk for pk, status in statuses.items() if status == DeliveryStatus.SENT}
    cancelled = {pk for pk, status in statuses.items() if status == DeliveryStatus.CANCELLED}
    assert len(statuses) == total
    assert sent | cancelled == set(statuses)  # never neither
    assert set(messages) == sent  # a sent one went out; a cancelled one never did
    assert max(messages.values()) == 1  # and once
    assert len(cancelled) == said_cancelled
    # The race was real: some went out before the cancel and some were cancelled.
    assert sent and cancelled, (len(sent), len(cancelled))
