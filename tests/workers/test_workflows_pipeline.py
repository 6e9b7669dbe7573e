"""Quiet hours, frequency caps and escalation on the real pipeline (API, relay, broker,
worker processes): a held delivery goes out once when its window ends; a cap holds across a
bulk request; an unread notification escalates exactly once; and a read racing the
escalation deadline leaves each escalation sent once or cancelled, never both."""

from __future__ import annotations

import threading
import time
import zoneinfo
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from notifications.models import Delivery, DeliveryEvent, DeliveryStatus
from tests.conftest import Process, wait_until
from tests.factories import TemplateFactory
from workers.models import SandboxMessage

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

URL = "/api/v1/notifications"
PENDING = (DeliveryStatus.SCHEDULED, DeliveryStatus.QUEUED, DeliveryStatus.RETRYING)
ALERT = {"web": {"title": "Alert", "body": "{{ n }}"}, "sms": {"body": "Alert {{ n }}"}}


def _messages(notification_id: str) -> int:
    return SandboxMessage.objects.filter(notification_id=notification_id).count()


def test_a_delivery_held_by_quiet_hours_goes_out_once_when_they_end(
    api: Any, template: Any, celery_worker_process: Callable[..., Process]
) -> None:
    celery_worker_process("sms", concurrency=1)
    api.put(
        "/api/v1/recipients/user-1",
        {"phone": "+14155550100", "timezone": "Pacific/Auckland"},
        format="json",
    )
    local = timezone.now().astimezone(zoneinfo.ZoneInfo("Pacific/Auckland"))
    window = {
        "start": (local - timedelta(hours=1)).strftime("%H:%M"),
        "end": (local + timedelta(hours=2)).strftime("%H:%M"),
        "channels": ["sms"],
    }
    api.put("/api/v1/recipients/user-1/preferences", {"quiet_hours": window}, format="json")
    body = {"recipient": "user-1", "template": "order_shipped", "channels": ["sms"]}
    held = api.post(URL, {**body, "data": {"order_id": "H-1"}}, format="json").json()
    urgent = api.post(
        URL, {**body, "data": {"order_id": "U-1"}, "priority": "critical"}, format="json"
    ).json()
    assert held["deliveries"][0]["reason"] == "quiet_hours"
    assert urgent["deliveries"][0]["status"] == "queued"

    wait_until(lambda: _messages(urgent["id"]) == 1, timeout=30, message="the critical SMS")
    time.sleep(1)  # the relay polls every second: a held one had its chances
    assert _messages(held["id"]) == 0
    # The window ends (its end moved to now, as the clock would).
    Delivery.objects.filter(notification_id=held["id"]).update(next_attempt_at=timezone.now())
    wait_until(lambda: _messages(held["id"]) == 1, timeout=30, message="the held SMS")
    time.sleep(1)
    assert _messages(held["id"]) == 1
    sms = Delivery.objects.get(notification_id=held["id"])
    assert (sms.status, sms.skip_reason) == ("sent", "")
    assert list(DeliveryEvent.objects.filter(delivery=sms).values_list("status", "detail"))[:2] == [
        ("scheduled", "quiet_hours"),
        ("queued", "due"),
    ]


def test_a_frequency_cap_holds_across_a_bulk_request_on_the_pipeline(
    api: Any, owner: Any, celery_worker_process: Callable[..., Process]
) -> None:
    TemplateFactory(owner=owner, key="digestless", content=ALERT, frequency_caps={"sms": "3/1h"})
    celery_worker_process("sms", concurrency=1)
    items = [
        {
            "recipient": {"id": f"user-{n % 2}", "phone": "+14155550100"},
            "template": "digestless",
            "data": {"n": n},
            "channels": ["sms"],
        }
        for n in range(10)
    ]
    answer = api.post(URL + "/bulk", {"notifications": items}, format="json").json()
    assert answer["accepted"] == 10
    wait_until(
        lambda: not Delivery.objects.filter(status__in=PENDING).exists(),
        timeout=30,
        message="every delivery to end",
    )
    time.sleep(0.5)
    sent = Counter(
        SandboxMessage.objects.values_list(
            "delivery__notification__recipient__external_id", flat=True
        )
    )
    assert sent == {"user-0": 3, "user-1": 3}
    assert Delivery.objects.filter(skip_reason="frequency_capped").count() == 4


@pytest.fixture
def escalating(owner: Any) -> Any:
    return TemplateFactory(
        owner=owner,
        key="alert",
        content=ALERT,
        escalation=[{"after": "3s", "unless": "read", "channel": "sms"}],
    )


def _alert(api: Any, n: int, rid: str = "user-1") -> str:
    answer = api.post(
        URL,
        {
            "recipient": {"id": rid, "phone": "+14155550100"},
            "template": "alert",
            "data": {"n": n},
        },
        format="json",
    )
    assert answer.status_code == 202, answer.content
    return str(answer.json()["id"])


def _browser(api: Any, rid: str) -> APIClient:
    client = APIClient()
    token = api.post(f"/api/v1/recipients/{rid}/token").json()["token"]
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def test_an_unread_notification_escalates_once_and_a_read_one_does_not(
    api: Any, escalating: Any, celery_worker_process: Callable[..., Process]
) -> None:
    celery_worker_process("sms,web", concurrency=2)
    unread = _alert(api, 1)
    read = _alert(api, 2)
    assert _browser(api, "user-1").post(f"/api/v1/inbox/{read}/read").status_code in (200, 204)
    started = time.monotonic()
    wait_until(lambda: _messages(unread) == 1, timeout=30, message="the escalation SMS")
    assert time.monotonic() - started >= 2  # not before its deadline (3 s after creation)
    time.sleep(1.5)  # the read one's deadline has passed too, by the relay's poll
    assert _messages(unread) == 1
    assert _messages(read) == 0
    assert Delivery.objects.get(notification_id=read, channel="sms").status == "cancelled"


def test_a_read_racing_the_escalation_deadline_leaves_each_sent_once_or_cancelled(
    api: Any, escalating: Any, celery_worker_process: Callable[..., Process]
) -> None:
    celery_worker_process("sms", concurrency=2)
    total = 40
    for n in range(total):
        api.put(f"/api/v1/recipients/user-{n}", {"phone": "+14155550100"}, format="json")
    browsers = {n: _browser(api, f"user-{n}") for n in range(total)}
    # One bulk request: every escalation has the same deadline, 3 s from now.
    items = [
        {"recipient": f"user-{n}", "template": "alert", "data": {"n": n}} for n in range(total)
    ]
    answer = api.post(URL + "/bulk", {"notifications": items}, format="json").json()
    ids = [result["id"] for result in answer["results"]]
    deadline = Delivery.objects.filter(channel="sms").order_by("next_attempt_at").first()
    assert deadline is not None and deadline.next_attempt_at is not None
    # Read them one after another from 0.5 s before the deadline on, for about 1.5 s: some
    # reads come first, the rest after the relay released the SMS.
    time.sleep(max(0.0, (deadline.next_attempt_at - timezone.now()).total_seconds() - 0.5))
    errors: list[Any] = []

    def read_all(numbers: list[int]) -> None:
        try:
            for n in numbers:
                answer = browsers[n].post(f"/api/v1/inbox/{ids[n]}/read")
                if answer.status_code not in (200, 204):
                    errors.append(answer.content)
                time.sleep(0.04)
        finally:
            connection.close()

    threads = [threading.Thread(target=read_all, args=(list(range(i, total, 2)),)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    wait_until(
        lambda: not Delivery.objects.filter(status__in=PENDING, channel="sms").exists(),
        timeout=30,
        message="every escalation to end",
    )
    time.sleep(1)
    statuses = dict(Delivery.objects.filter(channel="sms").values_list("pk", "status"))
    messages = Counter(SandboxMessage.objects.values_list("delivery_id", flat=True))
    sent = {pk for pk, status in statuses.items() if status == DeliveryStatus.SENT}
    cancelled = {pk for pk, status in statuses.items() if status == DeliveryStatus.CANCELLED}
    assert sent | cancelled == set(statuses)  # never neither
    assert set(messages) == sent  # a sent one went out, a cancelled one never did
    assert not messages or max(messages.values()) == 1  # and once
    # Every cancelled one says why.
    assert DeliveryEvent.objects.filter(
        delivery_id__in=cancelled,
        status="cancelled",
        detail="escalation not needed: web read in time",
    ).count() == len(cancelled)
    # The race was real: both outcomes happened.
    assert sent and cancelled, (len(sent), len(cancelled))
