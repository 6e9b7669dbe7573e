"""Status webhooks on the real pipeline: an email worker process and an SMS worker process
settle the two channels of many notifications at the same moments, in their own
transactions, and a webhooks worker process turns their completion checks into
`notification.completed`: every notification completes once, signed, with both statuses."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from notifications.models import (
    CompletionCheck,
    Delivery,
    DeliveryStatus,
    WebhookMessage,
    WebhookMessageStatus,
)
from tests.conftest import Process, wait_until
from tests.emulators.base import Response
from tests.emulators.webhook_receiver import WebhookReceiver

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

COMPLETED = "notification.completed"


def test_two_workers_settling_two_channels_at_once_complete_each_notification_once(
    api: Any, template: Any, celery_worker_process: Callable[..., Process], settings: Any
) -> None:
    total = 300
    settings.WEBHOOK_ALLOW_PRIVATE = True
    receiver = WebhookReceiver().start()
    try:
        registered = api.post(
            "/api/v1/webhooks",
            {"url": f"{receiver.url}/hooks", "event_types": [COMPLETED]},
            format="json",
        )
        assert registered.status_code == 201, registered.content
        secret = registered.json()["secret"]
        env = {
            "WEBHOOK_ALLOW_PRIVATE": "true",
            "EMAIL_PROVIDER": "sandbox",
            "SMS_PROVIDER": "sandbox",
            # Small batches, no pacing: the two pools take the same notifications' channels
            # in the same order and settle them side by side.
            "DISPATCH_BATCH_SIZE": "5",
            "RATE_LIMITS": "email=100000/s,sms=100000/s",
        }
        celery_worker_process("email", name="email", concurrency=2, **env)
        celery_worker_process("sms", name="sms", concurrency=2, relay=False, **env)
        celery_worker_process("webhooks", name="webhooks", concurrency=2, relay=False, **env)
        answer = api.post(
            "/api/v1/notifications/bulk",
            {
                "notifications": [
                    {
                        "recipient": {
                            "id": f"user-{n}",
                            "email": f"user-{n}@example.com",
                            "phone": "+14155550100",
                        },
                        "template": "order_shipped",
                        "data": {"order_id": f"A-{n}"},
                        "channels": ["email", "sms"],
                    }
                    for n in range(total)
                ]
            },
            format="json",
        )
        assert answer.json()["accepted"] == total, answer.content
        recipient_of = {r["id"]: f"user-{n}" for n, r in enumerate(answer.json()["results"])}

        def every_one_arrived() -> bool:
            return (
                len(receiver.ids()) >= total
                and not CompletionCheck.objects.exists()
                and not WebhookMessage.objects.exclude(status=WebhookMessageStatus.SENT).exists()
            )

        wait_until(every_one_arrived, timeout=120, interval=0.2, message="every completion")
        assert Delivery.objects.filter(status=DeliveryStatus.SENT).count() == 2 * total
        got = receiver.verified(secret)
        assert Counter(g["type"] for g in got) == Counter({COMPLETED: total})
        assert Counter(g["data"]["notification_id"] for g in got) == Counter(
            dict.fromkeys(recipient_of, 1)
        )
        assert {g["data"]["notification_id"]: g["data"] for g in got} == {
            nid: {
                "notification_id": nid,
                "recipient": rid,
                "deliveries": {"email": "sent", "sms": "sent"},
            }
            for nid, rid in recipient_of.items()
        }
        assert max(receiver.ids().values()) == 1
        assert WebhookMessage.objects.count() == total
    finally:
        receiver.stop()


def test_a_retry_goes_out_at_its_backoff_without_the_schedule(
    api: Any, template: Any, celery_worker_process: Callable[..., Process], settings: Any
) -> None:
    """No beat runs (an idle service sweeps only every WEBHOOK_SWEEP_SECONDS): a message that
    failed twice is sent again at each backoff step, because the sender asks for a wake when
    the retry falls due, once per due time."""
    settings.WEBHOOK_ALLOW_PRIVATE = True
    receiver = WebhookReceiver().start()
    try:
        registered = api.post(
            "/api/v1/webhooks",
            {"url": f"{receiver.url}/hooks", "event_types": ["delivery.sent"]},
            format="json",
        )
        assert registered.status_code == 201, registered.content
        receiver.fail_next(Response(503, {}), Response(503, {}))
        env = {
            "WEBHOOK_ALLOW_PRIVATE": "true",
            "EMAIL_PROVIDER": "sandbox",
            "RETRY_BACKOFF_BASE_SECONDS": "1",
            "WEBHOOK_SWEEP_SECONDS": "3600",
        }
        celery_worker_process("email", name="email", **env)
        celery_worker_process("webhooks", name="webhooks", relay=False, **env)
        answer = api.post(
            "/api/v1/notifications",
            {
                "recipient": {"id": "u1", "email": "u1@example.com"},
                "template": "order_shipped",
                "data": {"order_id": "A-1"},
                "channels": ["email"],
            },
            format="json",
        )
        assert answer.status_code == 202, answer.content
        wait_until(
            lambda: sum(receiver.ids().values()) == 1,
            timeout=30,
            message="the third try answered 200",
        )
        tries = [request.at for request in receiver.requests()]
        assert len(tries) == 3
        # Backoff 1 s then 2 s (with jitter): each retry went out near its due time, not after
        # a sweep an hour away.
        assert 0.5 <= tries[1] - tries[0] <= 4
        assert 1 <= tries[2] - tries[1] <= 6
        # The receiver records the request before its 200 reaches the sender, which then writes
        # the outcome: wait for that write rather than race it.
        wait_until(
            lambda: WebhookMessage.objects.get().status == WebhookMessageStatus.SENT,
            timeout=10,
            message="the message recorded as sent",
        )
        message = WebhookMessage.objects.get()
        assert (message.status, message.attempts) == (WebhookMessageStatus.SENT, 3)
    finally:
        receiver.stop()
