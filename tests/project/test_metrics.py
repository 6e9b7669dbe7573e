"""Prometheus metrics: counters written by real API and worker processes add up in one
/metrics, the scrape-time gauges read the broker, the database and Redis, and /metrics
answers even when one of those is down."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from django.test import Client
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from core import metrics
from notifications import metrics_scrape
from notifications.models import Delivery, DeliveryStatus, Notification, Recipient
from tests.conftest import Process, free_port, wait_until
from tests.factories import TemplateFactory, api_key_for
from tests.project.api_server import http, start_api_server
from workers import circuit_breaker, selectors
from workers.dispatch import batches_publish_rollback_unsafe
from workers.models import DeadLetter, DeadLetterStatus

EMAIL_AND_SMS = {
    "email": {"subject": "Order {{ order_id }}", "body": "Order {{ order_id }} is on its way."},
    "sms": {"body": "Order {{ order_id }} shipped"},
}


# Label names of each sample, in the order the tests key samples by.
LABELS = {
    "clarion_api_requests_total": ("route", "method", "status"),
    "clarion_api_request_duration_seconds_count": ("route", "method"),
    "clarion_notifications_accepted_total": ("channel",),
    "clarion_deliveries_total": ("channel", "provider", "outcome"),
    "clarion_delivery_latency_seconds_count": ("channel",),
    "clarion_rate_limiter_waits_total": ("channel", "provider"),
    "clarion_websocket_connections": (),
    "clarion_queue_depth": ("queue",),
    "clarion_queue_oldest_age_seconds": ("queue",),
    "clarion_dead_letters_open": ("channel",),
    "clarion_circuit_state": ("provider",),
}


def samples(text: str, name: str) -> dict[tuple[str, ...], float]:
    """The samples called `name` in an exposition, keyed by their label values."""
    found: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                assert set(sample.labels) == set(LABELS[name])
                found[tuple(sample.labels[label] for label in LABELS[name])] = sample.value
    return found


def families(text: str) -> set[str]:
    return {family.name for family in text_string_to_metric_families(text)}


# --- Counters across real processes ---------------------------------------------------------


class _Mailbox:
    """SMTP server behaviour by address: bounce-* refused for good (550), flaky-* refused once
    for now (451) and accepted on the retry, anything else accepted."""

    def __init__(self) -> None:
        self.refused_once: set[str] = set()
        self.accepted: list[str] = []

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        if address.startswith("bounce-"):
            return "550 5.1.1 mailbox unavailable"
        if address.startswith("flaky-") and address not in self.refused_once:
            self.refused_once.add(address)
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.accepted.extend(envelope.rcpt_tos)
        return "250 OK"


@pytest.fixture
def mailbox() -> Iterator[tuple[_Mailbox, int]]:
    handler = _Mailbox()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def _address(n: int) -> str:
    if n % 5 == 0:
        return f"bounce-{n}@example.com"
    if n in (1, 2, 3):
        return f"flaky-{n}@example.com"
    return f"user-{n}@example.com"


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_metrics_add_up_across_api_and_worker_processes(
    owner: Any,
    mailbox: tuple[_Mailbox, int],
    spawn: Callable[..., Process],
    celery_worker_process: Callable[..., Process],
    tmp_path: Path,
) -> None:
    smtp, smtp_port = mailbox
    directory = tmp_path / "prometheus"
    directory.mkdir()
    shared = {
        "PROMETHEUS_MULTIPROC_DIR": directory,
        "EMAIL_PROVIDER": "smtp",
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": smtp_port,
        # Email and SMS unlimited: no delivery waits for a token, so none is deferred.
        "RATE_LIMITS": "push=5000/s",
        "RETRY_BACKOFF_BASE_SECONDS": "0.2",
    }
    TemplateFactory(owner=owner, key="order", content=EMAIL_AND_SMS)
    key = api_key_for(owner)
    # Two worker processes (each a main process and two pool children) and one API server,
    # all writing into the same directory.
    worker_port = free_port()
    celery_worker_process(
        "email",
        name="email-worker",
        WORKER_METRICS_PORT=worker_port,
        WORKER_METRICS_ADDR="127.0.0.1",
        **shared,
    )
    celery_worker_process("sms", name="sms-worker", **shared)
    _, base = start_api_server(spawn, tmp_path, **shared)
    auth = {"Authorization": f"Bearer {key}"}

    ids = []
    for n in range(50):
        answer = http(
            "POST",
            f"{base}/api/v1/notifications",
            body={
                "recipient": {"id": f"r-{n}", "email": _address(n), "phone": "+14155550100"},
                "template": "order",
                "data": {"order_id": f"A-{n}"},
            },
            headers=auth,
        )
        assert answer.status == 202, answer.body
        ids.append(answer.json()["id"])
    for notification_id in ids[:2]:
        detail = http("GET", f"{base}/api/v1/notifications/{notification_id}", headers=auth)
        assert detail.status == 200
    wait_until(
        lambda: (
            Delivery.objects.filter(status__in=[DeliveryStatus.SENT, DeliveryStatus.DEAD])
            .values("id")
            .count()
            == 100
        ),
        timeout=90,
        interval=0.25,
        message="100 deliveries sent or dead",
    )
    expected_outcomes = {
        ("email", "smtp", "sent"): 40.0,
        ("email", "smtp", "retried"): 3.0,
        ("email", "smtp", "dead"): 10.0,
        ("sms", "sandbox", "sent"): 50.0,
    }

    def scrape() -> str:
        answer = http("GET", f"{base}/metrics")
        assert answer.status == 200
        return answer.body.decode()

    # A worker counts right after it writes the row: give the last one a moment.
    deadline = time.monotonic() + 10
    text = scrape()
    while samples(text, "clarion_deliveries_total") != expected_outcomes:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
        text = scrape()
    assert samples(text, "clarion_deliveries_total") == expected_outcomes
    assert samples(text, "clarion_notifications_accepted_total") == {
        ("email",): 50.0,
        ("sms",): 50.0,
    }
    assert samples(text, "clarion_rate_limiter_waits_total") == {}
    assert samples(text, "clarion_delivery_latency_seconds_count") == {
        ("email",): 40.0,
        ("sms",): 50.0,
    }
    requests = samples(text, "clarion_api_requests_total")
    assert requests[("/api/v1/notifications", "POST", "202")] == 50.0
    assert requests[("/api/v1/notifications/{notification_id}", "GET", "200")] == 2.0
    # Routes are URL patterns, never raw paths; /metrics does not count itself.
    assert {route for route, _, _ in requests} == {
        "/api/v1/notifications",
        "/api/v1/notifications/{notification_id}",
        "/healthz",
    }
    assert samples(text, "clarion_api_request_duration_seconds_count")[
        ("/api/v1/notifications", "POST")
    ] == (50.0)
    assert samples(text, "clarion_dead_letters_open") == {
        ("email",): 10.0,
        ("sms",): 0.0,
        ("push",): 0.0,
        ("web",): 0.0,
    }
    assert samples(text, "clarion_queue_depth") == {
        (queue,): 0.0 for queue in ("email", "sms", "push", "web", "maintenance", "webhooks")
    }
    assert samples(text, "clarion_queue_oldest_age_seconds") == {
        (channel,): 0.0 for channel in ("email", "sms", "push", "web")
    }
    assert samples(text, "clarion_circuit_state") == {("sandbox",): 0.0, ("smtp",): 0.0}
    assert samples(text, "clarion_websocket_connections") == {(): 0.0}
    assert sorted(smtp.accepted) == sorted(_address(n) for n in range(50) if n % 5)
    # A worker host's own endpoint serves the same directory, without the scrape-time gauges
    # (those are the API's: it reads the broker and the database for every host).
    worker_text = http("GET", f"http://127.0.0.1:{worker_port}/metrics").body.decode()
    assert samples(worker_text, "clarion_deliveries_total") == expected_outcomes
    assert "clarion_queue_depth" not in families(worker_text)
    # The counters came from several processes' files: the API's and each pool child's.
    assert len(list(directory.glob("counter_*.db"))) >= 3


# --- Scrape-time gauges ---------------------------------------------------------------------


def _delivery(recipient: Recipient, channel: str, **fields: Any) -> Delivery:
    notification = Notification.objects.create(
        owner=recipient.owner, recipient=recipient, template_key="t"
    )
    return Delivery.objects.create(notification=notification, channel=channel, **fields)


@pytest.fixture
def breakers(settings: Any) -> None:
    """smtp open, twilio half-open, sandbox closed (but known); fcm never called."""
    settings.CIRCUIT_FAILURE_THRESHOLD = 2
    for _ in range(2):
        circuit_breaker.circuit_record(provider="smtp", outcome="transient")
        circuit_breaker.circuit_record(provider="twilio", outcome="transient")
    circuit_breaker.circuit_record(provider="sandbox", outcome="ok")
    settings.CIRCUIT_OPEN_SECONDS = 0
    assert circuit_breaker.circuit_allow(provider="twilio") == 0.0
    settings.CIRCUIT_OPEN_SECONDS = 60


@pytest.mark.django_db
def test_scrape_time_gauges_read_broker_database_and_redis(
    owner: Any, breakers: None, settings: Any
) -> None:
    # Broker: messages published while no worker consumes, one delivery id per message.
    settings.DISPATCH_BATCH_SIZE = 1
    batches_publish_rollback_unsafe(
        {"email": [1000 + n for n in range(7)], "sms": [2000 + n for n in range(3)]}
    )
    # Database: the queue lag counts queued, due deliveries only.
    now = timezone.now()
    recipient = Recipient.objects.create(owner=owner, external_id="r-1")
    queued = DeliveryStatus.QUEUED
    _delivery(recipient, "email", status=queued, enqueued_at=now - timedelta(seconds=30))
    _delivery(recipient, "email", status=queued, enqueued_at=now - timedelta(seconds=5))
    _delivery(recipient, "sms", status=queued, next_attempt_at=now - timedelta(seconds=12))
    _delivery(recipient, "sms", status=queued, next_attempt_at=now + timedelta(seconds=99))
    _delivery(recipient, "push", status=queued, next_attempt_at=now + timedelta(seconds=50))
    old_sent = _delivery(recipient, "web", status=DeliveryStatus.SENT)
    Delivery.objects.filter(pk=old_sent.pk).update(enqueued_at=now - timedelta(hours=1))
    # Dead letters: two open on email, one on sms, one discarded on push.
    for channel, status in (
        ("email", DeadLetterStatus.OPEN),
        ("email", DeadLetterStatus.OPEN),
        ("sms", DeadLetterStatus.OPEN),
        ("push", DeadLetterStatus.DISCARDED),
    ):
        dead = _delivery(recipient, channel, status=DeliveryStatus.DEAD)
        DeadLetter.objects.create(
            owner=owner,
            notification=dead.notification,
            delivery=dead,
            channel=channel,
            attempts=1,
            status=status,
        )

    assert metrics_scrape.queue_depths() == {
        "email": 7,
        "sms": 3,
        "push": 0,
        "web": 0,
        "maintenance": 0,
        "webhooks": 0,
    }
    assert metrics_scrape.queue_oldest_ages(now=now) == {
        "email": 30.0,
        "sms": 12.0,
        "push": 0.0,
        "web": 0.0,
    }
    assert metrics_scrape.dead_letters_open() == {"email": 2, "sms": 1, "push": 0, "web": 0}
    assert metrics_scrape.circuit_states() == {
        "sandbox": "closed",
        "smtp": "open",
        "twilio": "half_open",
    }

    text = Client().get("/metrics").content.decode()
    assert samples(text, "clarion_queue_depth") == {
        ("email",): 7.0,
        ("sms",): 3.0,
        ("push",): 0.0,
        ("web",): 0.0,
        ("maintenance",): 0.0,
        ("webhooks",): 0.0,
    }
    lag = samples(text, "clarion_queue_oldest_age_seconds")
    assert set(lag) == {("email",), ("sms",), ("push",), ("web",)}
    # Read a moment after `now`: older by the time the test took, not by more.
    assert 30.0 <= lag[("email",)] < 40.0
    assert 12.0 <= lag[("sms",)] < 22.0
    assert (lag[("push",)], lag[("web",)]) == (0.0, 0.0)
    assert samples(text, "clarion_dead_letters_open") == {
        ("email",): 2.0,
        ("sms",): 1.0,
        ("push",): 0.0,
        ("web",): 0.0,
    }
    assert samples(text, "clarion_circuit_state") == {
        ("sandbox",): 0.0,
        ("smtp",): 2.0,
        ("twilio",): 1.0,
    }


@pytest.mark.skipif(
    not os.environ.get("TEST_RABBITMQ_URL"),
    reason="TEST_RABBITMQ_URL is not set (CI sets it to the local RabbitMQ)",
)
def test_queue_depth_on_rabbitmq_is_a_passive_declare() -> None:
    from kombu import Connection, Exchange, Producer, Queue

    # Queues of this test's own: the broker's vhost may be shared.
    name = f"clarion-test-depth-{uuid.uuid4().hex}"
    missing = f"clarion-test-missing-{uuid.uuid4().hex}"
    with Connection(os.environ["TEST_RABBITMQ_URL"]) as conn:
        queue = Queue(name, Exchange(name, type="direct"), routing_key=name, auto_delete=False)
        producer = Producer(conn.default_channel)
        try:
            for n in range(4):
                producer.publish(
                    {"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue]
                )
            # Published without confirms: the broker counts them a moment later.
            wait_until(
                lambda: (
                    selectors._amqp_queue_depths(conn, [name, missing]) == {name: 4, missing: 0}
                ),
                timeout=10,
                message="RabbitMQ to count four messages",
            )
        finally:
            queue(conn.default_channel).delete()
            queue.exchange(conn.default_channel).delete()


@pytest.mark.django_db
def test_a_source_that_is_down_is_left_out_and_the_scrape_still_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broker_down() -> dict[str, int]:
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(metrics_scrape, "queue_depths", broker_down)
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    names = families(response.content.decode())
    assert "clarion_queue_depth" not in names
    assert {
        "clarion_queue_oldest_age_seconds",
        "clarion_dead_letters_open",
        "clarion_circuit_state",
    } <= names


# --- The endpoint ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_metrics_allowed_ips_with_the_client_address_behind_proxies(settings: Any) -> None:
    settings.METRICS_ALLOWED_IPS = ["10.0.0.0/8", "192.0.2.7"]
    settings.NUM_PROXIES = 1
    client = Client()
    refused = client.get("/metrics", REMOTE_ADDR="127.0.0.1")
    assert refused.status_code == 403
    assert refused.json() == {"error": "forbidden", "detail": "Not allowed to read metrics."}
    # The address the trusted proxy saw, not one the client wrote further left.
    assert (
        client.get(
            "/metrics", REMOTE_ADDR="172.16.0.2", HTTP_X_FORWARDED_FOR="10.9.9.9, 203.0.113.5"
        ).status_code
        == 403
    )
    assert (
        client.get(
            "/metrics", REMOTE_ADDR="172.16.0.2", HTTP_X_FORWARDED_FOR="203.0.113.5, 10.1.2.3"
        ).status_code
        == 200
    )
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.7").status_code == 200
    settings.METRICS_ALLOWED_IPS = []
    assert client.get("/metrics", REMOTE_ADDR="198.51.100.1").status_code == 200


def _own(name: str, labels: dict[str, str]) -> float:
    """This process's own value of a sample (the default registry is per process)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.django_db
def test_request_metrics_use_the_route_pattern_and_skip_metrics(api: Any) -> None:
    detail = {"route": "/api/v1/notifications/{notification_id}", "method": "GET"}
    missing = {**detail, "status": "404"}
    before = _own("clarion_api_requests_total", missing)
    before_count = _own("clarion_api_request_duration_seconds_count", detail)
    before_unmatched = _own(
        "clarion_api_requests_total", {"route": "unmatched", "method": "GET", "status": "404"}
    )
    assert api.get("/api/v1/notifications/6d1f3c1e-0000-4000-8000-000000000000").status_code == 404
    assert api.get("/no/such/page").status_code == 404
    Client().get("/metrics")
    assert _own("clarion_api_requests_total", missing) == before + 1
    assert _own("clarion_api_request_duration_seconds_count", detail) == before_count + 1
    assert (
        _own("clarion_api_requests_total", {"route": "unmatched", "method": "GET", "status": "404"})
        == before_unmatched + 1
    )
    assert (
        _own("clarion_api_requests_total", {"route": "/metrics", "method": "GET", "status": "200"})
        == 0
    )


def test_websocket_gauge_functions() -> None:
    before = _own("clarion_websocket_connections", {})
    metrics.websocket_connection_opened()
    metrics.websocket_connection_opened()
    metrics.websocket_connection_closed()
    assert _own("clarion_websocket_connections", {}) == before + 1
    metrics.websocket_connection_closed()
    assert _own("clarion_websocket_connections", {}) == before


def test_live_gauges_of_dead_processes_are_dropped(settings: Any, tmp_path: Path) -> None:
    settings.PROMETHEUS_MULTIPROC_DIR = str(tmp_path)
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead_pid = finished.pid
    live_pid = os.getpid()
    for name in (
        f"gauge_livesum_{dead_pid}.db",
        f"gauge_livesum_{live_pid}.db",
        f"counter_{dead_pid}.db",
    ):
        (tmp_path / name).write_bytes(b"")
    assert metrics.multiprocess_dir_cleanup() == [dead_pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{dead_pid}.db", f"gauge_livesum_{live_pid}.db"]
    )
