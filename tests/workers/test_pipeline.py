"""End to end on real processes: the API accepts, a real Celery worker on the real broker
takes the delivery, and the email arrives at a real SMTP server; nothing is lost when the
broker loses its messages."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from notifications.models import Delivery, DeliveryStatus
from project.celery import app as celery_app
from tests.conftest import BIN, Process, SmtpSink, free_port, process_env, wait_until
from tests.factories import TemplateFactory
from workers.models import SandboxMessage
from workers.relay import outbox_publish_due

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

EMAIL_ONLY = {
    "email": {
        "subject": "Order {{ order_id }} shipped",
        "body": "Hi, {{ order_id }} is on its way.",
    }
}


def smtp_env(smtp: SmtpSink) -> dict[str, Any]:
    return {
        "EMAIL_PROVIDER": "smtp",
        "SMTP_HOST": smtp.host,
        "SMTP_PORT": smtp.port,
        "EMAIL_FROM": "clarion@example.com",
    }


def test_email_reaches_the_smtp_server_and_the_status_api_shows_sent(
    api: Any, template: Any, smtp_server: SmtpSink, celery_worker_process: Callable[..., Process]
) -> None:
    celery_worker_process("email", **smtp_env(smtp_server))
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": {"id": "user-42", "email": "user-42@example.com"},
            "template": "order_shipped",
            "data": {"order_id": "A-1001"},
            "channels": ["email"],
        },
        format="json",
    )
    assert response.status_code == 202
    notification_id = response.json()["id"]

    wait_until(smtp_server.received, timeout=30, message="the email at the SMTP server")
    [message] = smtp_server.received()
    assert message["Subject"] == "Order A-1001 shipped"
    assert message["To"] == "user-42@example.com"
    assert message["From"] == "clarion@example.com"
    assert message["X-Clarion-Notification-Id"] == notification_id
    assert message.get_body(("plain",)).get_content().strip() == "Hi, A-1001 is on its way."
    assert message.get_body(("html",)).get_content().strip() == ("<p>Hi, A-1001 is on its way.</p>")

    def detail() -> dict[str, Any] | None:
        body = api.get(f"/api/v1/notifications/{notification_id}").json()
        return body if body["deliveries"][0]["status"] == "sent" else None

    body = wait_until(detail, timeout=15, message="the delivery to be marked sent")
    assert body["status"] == "sent"
    [email] = body["deliveries"]
    assert email["channel"] == "email"
    assert email["provider"] == "smtp"
    assert email["provider_message_id"] == message["Message-ID"].strip("<>")
    assert email["attempt_count"] == 1
    assert len(email["attempts"]) == 1
    attempt = email["attempts"][0]
    assert (attempt["number"], attempt["outcome"], attempt["status_code"], attempt["error"]) == (
        1,
        "ok",
        250,
        None,
    )


def test_every_channel_runs_to_sent_through_the_sandbox_providers(
    api: Any, template: Any, celery_worker_process: Callable[..., Process], settings: Any
) -> None:
    # Every channel through the worker pools, the in-app one too (not pushed by this
    # accepting process, workers/web_push.py).
    settings.WEB_PUSH_AT_ACCEPT = False
    celery_worker_process("email,sms,push,web", concurrency=2, WEB_PROVIDER="sandbox")
    api.put(
        "/api/v1/recipients/user-7",
        {"email": "u7@example.com", "phone": "+14155550101"},
        format="json",
    )
    assert (
        api.post(
            "/api/v1/recipients/user-7/devices",
            {"platform": "fcm", "token": "tok-1"},
            format="json",
        ).status_code
        == 201
    )
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": "user-7",
            "template": "order_shipped",
            "data": {"order_id": "B-7"},
        },
        format="json",
    )
    assert response.status_code == 202
    notification_id = response.json()["id"]

    def all_sent() -> bool:
        return Delivery.objects.filter(status=DeliveryStatus.SENT).count() == 4

    wait_until(all_sent, timeout=30, message="four sandbox deliveries")
    sandbox = api.get(f"/api/v1/sandbox/messages?notification={notification_id}").json()
    assert sorted((m["channel"], str(m["to"])) for m in sandbox) == [
        ("email", "u7@example.com"),
        ("push", "['tok-1']"),
        ("sms", "+14155550101"),
        ("web", "user-7"),
    ]
    by_channel = {m["channel"]: m["content"] for m in sandbox}
    assert by_channel["sms"] == {"body": "Order B-7 shipped"}
    assert by_channel["push"] == {"title": "Shipped", "body": "Order B-7"}
    assert api.get(f"/api/v1/notifications/{notification_id}").json()["status"] == "sent"


def test_broker_flush_loses_nothing_the_sweeper_hands_back_to_the_relay(
    api: Any, owner: Any, smtp_server: SmtpSink, celery_worker_process: Callable[..., Process]
) -> None:
    TemplateFactory(owner=owner, key="receipt", content=EMAIL_ONLY)
    total = 200
    ids = []
    for n in range(total):
        response = api.post(
            "/api/v1/notifications",
            {
                "recipient": {"id": f"user-{n}", "email": f"user-{n}@example.com"},
                "template": "receipt",
                "data": {"order_id": f"R-{n}"},
            },
            format="json",
        )
        assert response.status_code == 202
        ids.append(response.json()["id"])

    # The relay publishes them (four batches of DISPATCH_BATCH_SIZE), then the broker loses
    # every message (a restart without persistence, a flushed queue).
    assert outbox_publish_due() == total
    assert Delivery.objects.outbox().count() == 0
    purged = celery_app.control.purge()
    assert purged == total // settings.DISPATCH_BATCH_SIZE
    assert Delivery.objects.filter(status=DeliveryStatus.QUEUED).count() == total

    celery_worker_process(
        "email,maintenance",
        concurrency=4,
        beat=True,
        SWEEPER_INTERVAL_SECONDS="1",
        SWEEPER_STALE_SECONDS="1",
        **smtp_env(smtp_server),
    )

    def all_sent() -> bool:
        return Delivery.objects.filter(status=DeliveryStatus.SENT).count() == total

    wait_until(all_sent, timeout=120, interval=0.5, message="all 200 deliveries sent")
    # A few more sweeps (one a second) must not send anything again.
    time.sleep(3)
    counts = Counter(m["X-Clarion-Notification-Id"] for m in smtp_server.received())
    assert len(counts) == total
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1
    assert Delivery.objects.filter(attempts=1).count() == total


@pytest.mark.skipif(
    not os.environ.get("TEST_RABBITMQ_URL"),
    reason="TEST_RABBITMQ_URL is not set (CI sets it to the local RabbitMQ)",
)
def test_rabbitmq_broker_end_to_end(
    owner: Any,
    template: Any,
    smtp_server: SmtpSink,
    spawn: Callable[..., Process],
    celery_worker_process: Callable[..., Process],
    tmp_path: Path,
) -> None:
    """The API server and the worker both on RabbitMQ, as CELERY_BROKER_URL=amqp://… does."""
    from tests.factories import api_key_for

    amqp = os.environ["TEST_RABBITMQ_URL"]
    celery_worker_process("email", CELERY_BROKER_URL=amqp, **smtp_env(smtp_server))
    port = free_port()
    server = spawn(
        "api",
        [
            str(BIN / "uvicorn"),
            "project.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            "off",
        ],
        process_env(tmp_path, CELERY_BROKER_URL=amqp),
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if server.popen.poll() is not None:
            pytest.fail(server.log())
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    wait_until(ready, timeout=30, message="the API server")
    request = urllib.request.Request(
        f"{base}/api/v1/notifications",
        method="POST",
        data=json.dumps(
            {
                "recipient": {"id": "r-1", "email": "r1@example.com"},
                "template": "order_shipped",
                "data": {"order_id": "Q-1"},
                "channels": ["email"],
            }
        ).encode(),
        headers={
            "Authorization": f"Bearer {api_key_for(owner)}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 202
        notification_id = json.loads(answer.read())["id"]
    wait_until(smtp_server.received, timeout=30, message="the email over RabbitMQ")
    [message] = smtp_server.received()
    assert message["X-Clarion-Notification-Id"] == notification_id
    assert message["Subject"] == "Order Q-1 shipped"
    wait_until(
        lambda: Delivery.objects.filter(status=DeliveryStatus.SENT).count() == 1,
        timeout=15,
        message="the delivery marked sent",
    )
    assert SandboxMessage.objects.count() == 0
