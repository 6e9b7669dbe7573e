"""Failover end to end: 1,000 emails through a real worker with EMAIL_PROVIDERS=sendgrid,smtp.
SendGrid's emulator is killed during the run and brought back: every email is sent exactly
once, those sent while SendGrid is down go over SMTP, and traffic returns to SendGrid once
its breaker closes."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from notifications.models import Delivery
from tests.conftest import Process, SmtpSink, wait_until
from tests.emulators.sendgrid import SendGridEmulator
from tests.factories import TemplateFactory

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

CONTENT = {"email": {"subject": "Order {{ n }}", "body": "Order {{ n }} shipped."}}


def test_a_thousand_emails_survive_the_primary_going_down_and_coming_back(
    api: Any,
    owner: Any,
    smtp_server: SmtpSink,
    celery_worker_process: Callable[..., Process],
) -> None:
    TemplateFactory(owner=owner, key="shipped", category="orders", content=CONTENT)
    sendgrid = SendGridEmulator().start()
    try:
        env = {
            **sendgrid.settings_env(),
            "EMAIL_PROVIDERS": "sendgrid,smtp",
            "SMTP_HOST": smtp_server.host,
            "SMTP_PORT": str(smtp_server.port),
            "SENDGRID_MAX_BATCH": "25",
            "CIRCUIT_FAILURE_THRESHOLD": "3",
            "CIRCUIT_OPEN_SECONDS": "3",
            "CIRCUIT_SUCCESS_THRESHOLD": "1",
            "RATE_LIMITS": "email=1000000/m,sms=100/s,push=5000/s,web=10000/s",
        }
        celery_worker_process("email", **env)

        def accept(first: int, count: int) -> list[str]:
            ids: list[str] = []
            for start in range(first, first + count, 250):
                items = [
                    {
                        "recipient": {"id": f"u{n}", "email": f"u{n}@example.com"},
                        "template": "shipped",
                        "data": {"n": n},
                    }
                    for n in range(start, min(start + 250, first + count))
                ]
                answer = api.post(
                    "/api/v1/notifications/bulk", {"notifications": items}, format="json"
                )
                assert answer.status_code == 200, answer.content
                ids += [r["id"] for r in answer.json()["results"]]
            return ids

        def all_sent(ids: list[str]) -> Callable[[], bool]:
            return lambda: (
                Delivery.objects.filter(notification_id__in=ids, status="sent").count() == len(ids)
            )

        before = accept(0, 250)
        wait_until(all_sent(before), timeout=60, message="the first 250 to be sent")
        sendgrid.stop()  # connection refused from now on
        down = accept(250, 500)
        wait_until(all_sent(down), timeout=120, message="500 sent while SendGrid is down")
        sendgrid.start()  # same port, answering again
        time.sleep(3.5)  # CIRCUIT_OPEN_SECONDS: the breaker lets a trial through
        after = accept(750, 250)
        wait_until(all_sent(after), timeout=60, message="the last 250 to be sent")

        providers = {
            str(notification_id): provider
            for notification_id, provider in Delivery.objects.values_list(
                "notification_id", "provider"
            )
        }
        by_provider = {
            name: Counter(providers[i] for i in ids)
            for name, ids in (("before", before), ("down", down), ("after", after))
        }
        assert by_provider["before"] == Counter({"sendgrid": 250})
        assert by_provider["down"] == Counter({"smtp": 500})
        # While SendGrid's breaker lets its one trial through, another worker process's batch
        # (DISPATCH_BATCH_SIZE, 50) may still go over SMTP; the rest is SendGrid's again.
        assert by_provider["after"]["sendgrid"] >= 200, by_provider["after"]
        # Exactly once, across both providers.
        through_sendgrid = sendgrid.count_by("notification_id", accepted_only=True)
        through_smtp = Counter(m["X-Clarion-Notification-Id"] for m in smtp_server.received())
        sent = through_sendgrid + through_smtp
        assert set(sent) == set(before + down + after)
        assert set(sent.values()) == {1}
        assert len(through_smtp) == sum(p == "smtp" for p in providers.values())
    finally:
        sendgrid.stop()
