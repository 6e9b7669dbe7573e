"""JSON logs: one object per line with the request's and the notification's ids bound to every
line, in the API server and in the Celery worker alike, and credentials never written."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from core.logs import REDACTED, Redactor, formatter, scoped_log_context
from notifications.models import Delivery, DeliveryStatus
from notifications.tokens import recipient_token_issue
from tests.conftest import Process, wait_until
from tests.factories import api_key_for
from tests.project.api_server import http, start_api_server

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
LEADING_KEYS = ["timestamp", "level", "logger", "event"]
RAW_KEY = "clr_" + "Zk3" * 14 + "q"


@pytest.fixture(autouse=True)
def empty_log_context() -> Iterator[None]:
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def json_log() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Everything logged to the root logger during the test, as parsed JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter("json"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --- Redaction ------------------------------------------------------------------------------


class _Thing:
    def __repr__(self) -> str:
        return f"<Thing holding {RAW_KEY}>"


def test_redactor_replaces_credentials_wherever_they_are() -> None:
    token = recipient_token_issue(owner_id=1, recipient_id=2).token
    redact = Redactor(secrets=["smtp-pa55word", "short"])
    event = {
        "event": f"calling with Bearer {RAW_KEY} and {token}",
        "authorization": "Bearer abc",
        "headers": {
            "X-Api-Key": "k",
            "Accept": "application/json",
            "nested": (f"/ws/notifications/?token={token}&since=4", "login smtp-pa55word ok"),
        },
        "url": "redis://user:hunter2@redis:6379/0",
        "note": "a short word stays",
        "count": 3,
        "ok": True,
        "missing": None,
        "password": "",
        "thing": _Thing(),
    }
    assert redact(None, "info", event) == {
        "event": f"calling with Bearer {REDACTED} and {REDACTED}",
        "authorization": REDACTED,
        "headers": {
            "X-Api-Key": REDACTED,
            "Accept": "application/json",
            "nested": [
                f"/ws/notifications/?token={REDACTED}&since=4",
                f"login {REDACTED} ok",
            ],
        },
        "url": f"redis://user:{REDACTED}@redis:6379/0",
        "note": "a short word stays",
        "count": 3,
        "ok": True,
        "missing": None,
        "password": "",
        "thing": f"<Thing holding clr_{REDACTED}>",
    }


def test_the_secrets_in_settings_are_searched_for(settings: Any) -> None:
    # core.logs.configure (Django's LOGGING_CONFIG, in every process) hands these to
    # the redactor.
    from core.logs import configured_secrets

    settings.SECRET_KEY = "k" * 50
    settings.SMTP_PASSWORD = "smtp-secret"
    settings.SENDGRID_API_KEY = "SG.sendgrid-key"
    settings.TWILIO_AUTH_TOKEN = "twilio-token"
    settings.FLOWER_BASIC_AUTH = "ops:flower-pw"
    assert {
        "k" * 50,
        "smtp-secret",
        "SG.sendgrid-key",
        "twilio-token",
        "ops:flower-pw",
    } <= set(configured_secrets())


# --- The JSON lines -------------------------------------------------------------------------


def test_json_lines_carry_the_bound_context_and_extras() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter("json"))
    logger = logging.getLogger("tests.logging.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    structlog.contextvars.bind_contextvars(request_id="req-1", delivery_id=1)
    logger.info("delivery %s sent", 7, extra={"delivery_id": 7, "notification_id": "n-7"})
    structlog.get_logger("tests.logging.json").warning("native", attempt=2)
    try:
        raise ValueError(f"refused {RAW_KEY}")
    except ValueError:
        logger.exception("send failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]

    assert [list(line)[:4] for line in lines] == [LEADING_KEYS] * 3
    assert all(TIMESTAMP.match(line.pop("timestamp")) for line in lines)
    exception = lines[2].pop("exception")
    assert lines == [
        {
            "level": "info",
            "logger": "tests.logging.json",
            "event": "delivery 7 sent",
            # An explicit extra wins over the bound context.
            "delivery_id": 7,
            "notification_id": "n-7",
            "request_id": "req-1",
        },
        {
            "level": "warning",
            "logger": "tests.logging.json",
            "event": "native",
            "attempt": 2,
            "delivery_id": 1,
            "request_id": "req-1",
        },
        {
            "level": "error",
            "logger": "tests.logging.json",
            "event": "send failed",
            "delivery_id": 1,
            "request_id": "req-1",
        },
    ]
    assert exception.startswith("Traceback (most recent call last):")
    assert exception.endswith(f"ValueError: refused clr_{REDACTED}")
    assert RAW_KEY not in stream.getvalue()


def test_console_format_is_redacted_too() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key %s", (RAW_KEY,), None)
    line = formatter("console").format(record)
    assert f"key clr_{REDACTED}" in line
    assert RAW_KEY not in line


def test_uvicorns_per_socket_lines_are_debug_lines() -> None:
    """uvicorn.error (configured by settings.LOGGING) writes its server lines at INFO, and the
    per-WebSocket ones (accepted, refused, opened, closed) only when it is at DEBUG."""
    server = logging.getLogger("uvicorn.error")
    assert server.filters, "settings.LOGGING puts the per-socket filter on uvicorn.error"
    level = server.level
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter("json"))
    # uvicorn.error propagates to uvicorn, which has the console handler and stops there.
    logging.getLogger("uvicorn").addHandler(handler)
    try:
        server.setLevel(logging.INFO)
        server.info('%s - "WebSocket %s" [accepted]', "127.0.0.1:5000", "/ws/notifications/")
        server.info("connection open")
        server.info("Uvicorn running on %s", "http://127.0.0.1:8000")
        server.setLevel(logging.DEBUG)
        server.info("connection closed")
    finally:
        server.setLevel(level)
        logging.getLogger("uvicorn").removeHandler(handler)
    assert [(line["level"], line["event"]) for line in _json_lines(stream.getvalue())] == [
        ("info", "Uvicorn running on http://127.0.0.1:8000"),
        ("debug", "connection closed"),
    ]


def test_scoped_log_context_unbinds_what_the_function_bound() -> None:
    @scoped_log_context
    def handle() -> None:
        structlog.contextvars.bind_contextvars(delivery_id=5, request_id="inner")
        raise RuntimeError("boom")

    structlog.contextvars.bind_contextvars(request_id="outer")
    with pytest.raises(RuntimeError):
        handle()
    assert structlog.contextvars.get_contextvars() == {"request_id": "outer"}


# --- The API's request context --------------------------------------------------------------


@pytest.mark.django_db
def test_api_request_lines_carry_request_id_and_notification_id(
    api: Any, template: Any, json_log: Callable[[], list[dict[str, Any]]]
) -> None:
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": {"id": "user-1", "email": "u1@example.com"},
            "template": "order_shipped",
            "data": {"order_id": "A-1"},
            "channels": ["email"],
        },
        format="json",
        HTTP_X_REQUEST_ID="req-42",
    )
    assert response.status_code == 202
    assert response["X-Request-ID"] == "req-42"
    notification_id = response.json()["id"]
    lines = json_log()
    [accepted] = [line for line in lines if line["logger"] == "notifications.accepting"]
    assert accepted["event"] == f"notification {notification_id} accepted: email queued"
    assert accepted["notification_id"] == notification_id
    assert (accepted["request_id"], accepted["client_ip"]) == ("req-42", "127.0.0.1")
    assert {"owner_id", "api_key_id"} <= set(accepted)
    [request] = [line for line in lines if line["logger"] == "notifications.api.middleware"]
    assert {k: request[k] for k in ("event", "method", "path", "route", "status")} == {
        "event": "POST /api/v1/notifications 202",
        "method": "POST",
        "path": "/api/v1/notifications",
        "route": "/api/v1/notifications",
        "status": 202,
    }
    assert request["request_id"] == "req-42"
    # Nothing from this request stays bound to whatever the process logs next.
    assert "notification_id" not in structlog.contextvars.get_contextvars()


@pytest.mark.django_db
def test_an_unusable_request_id_is_replaced() -> None:
    from django.test import Client

    response = Client().get("/healthz", HTTP_X_REQUEST_ID="bad id\r\n<script>")
    assert re.fullmatch(r"[0-9a-f]{32}", response["X-Request-ID"])
    generated = Client().get("/healthz")["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


# --- Real processes -------------------------------------------------------------------------


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_api_and_worker_processes_log_json_lines_with_the_notification_id(
    owner: Any,
    template: Any,
    spawn: Callable[..., Process],
    celery_worker_process: Callable[..., Process],
    tmp_path: Path,
) -> None:
    raw_key = api_key_for(owner)
    worker = celery_worker_process("email", LOG_FORMAT="json")
    server, base = start_api_server(spawn, tmp_path, LOG_FORMAT="json")
    auth = {"Authorization": f"Bearer {raw_key}"}
    # A client that sends its key where a request id belongs: every line of that request
    # carries it, redacted.
    leaky = http("GET", f"{base}/api/v1/templates", headers={**auth, "X-Request-ID": raw_key})
    assert leaky.status == 200
    answer = http(
        "POST",
        f"{base}/api/v1/notifications",
        body={
            "recipient": {"id": "user-9", "email": "u9@example.com"},
            "template": "order_shipped",
            "data": {"order_id": "L-9"},
            "channels": ["email"],
        },
        headers={**auth, "X-Request-ID": "req-e2e-9"},
    )
    assert answer.status == 202
    assert answer.headers["x-request-id"] == "req-e2e-9"
    notification_id = answer.json()["id"]
    wait_until(
        lambda: Delivery.objects.filter(status=DeliveryStatus.SENT).count() == 1,
        timeout=30,
        message="the delivery sent",
    )
    delivery_id = Delivery.objects.get().pk
    # The worker logs "sent" right after writing the row.
    wait_until(lambda: "sent via sandbox" in worker.log(), timeout=10, message="the sent line")
    server.stop()
    worker.stop()

    api_text, worker_text = server.log(), worker.log()
    assert raw_key not in api_text
    assert raw_key not in worker_text
    # The API server writes nothing but JSON lines.
    api_lines = [json.loads(line) for line in api_text.splitlines() if line.strip()]
    # The worker also prints Celery's start-up banner on stdout; everything it logs is JSON.
    worker_lines = _json_lines(worker_text)
    for line in api_lines + worker_lines:
        assert list(line)[:4] == LEADING_KEYS
        assert TIMESTAMP.match(line["timestamp"])
    assert any(line["logger"] == "uvicorn.error" for line in api_lines)
    assert any(line["event"].endswith(" ready.") for line in worker_lines)

    [leaked] = [line for line in api_lines if line.get("path") == "/api/v1/templates"]
    assert leaked["request_id"] == f"clr_{REDACTED}"
    accepted = [line for line in api_lines if line.get("notification_id") == notification_id]
    assert [line["event"] for line in accepted] == [
        f"notification {notification_id} accepted: email queued"
    ]
    assert accepted[0]["request_id"] == "req-e2e-9"
    sent = [
        line
        for line in worker_lines
        if line.get("notification_id") == notification_id and "sent via" in line["event"]
    ]
    assert [(line["event"], line["delivery_id"]) for line in sent] == [
        (f"delivery {delivery_id} sent via sandbox", delivery_id)
    ]
    assert sent[0]["task"] == "clarion.deliver.email"


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_a_web_notification_is_traced_through_the_api_its_push_and_the_websocket_server(
    owner: Any,
    template: Any,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    """Accepted, pushed by the accepting process (workers/web_push.py: no relay, no worker),
    sent to the socket and acknowledged: each line carries the notification's id. The
    per-frame lines are DEBUG, so the server logs at DEBUG here."""
    import asyncio

    import websockets
    from asgiref.sync import async_to_sync

    from tests.channels_app.support import recipient_with_token

    raw_key = api_key_for(owner)
    _, token = recipient_with_token(owner, "user-w")
    server, base = start_api_server(
        spawn, tmp_path, LOG_FORMAT="json", LOG_LEVEL="DEBUG", WEB_PROVIDER="websocket"
    )

    async def scenario() -> str:
        socket = await websockets.connect(
            base.replace("http", "ws") + "/ws/notifications/", origin=base, open_timeout=5
        )
        await socket.send(json.dumps({"type": "auth", "token": token}))
        assert (json.loads(await asyncio.wait_for(socket.recv(), 5)))["type"] == "ready"
        answer = await asyncio.to_thread(
            http,
            "POST",
            f"{base}/api/v1/notifications",
            body={
                "recipient": "user-w",
                "template": "order_shipped",
                "data": {"order_id": "W-1"},
                "channels": ["web"],
            },
            headers={"Authorization": f"Bearer {raw_key}"},
        )
        assert answer.status == 202
        notification_id = str(answer.json()["id"])
        frame = json.loads(await asyncio.wait_for(socket.recv(), 20))
        assert (frame["type"], frame["id"]) == ("notification", notification_id)
        await socket.send(json.dumps({"type": "ack", "id": notification_id}))
        await asyncio.sleep(0.5)
        await socket.close()
        return notification_id

    notification_id = async_to_sync(scenario)()
    wait_until(
        lambda: Delivery.objects.filter(status=DeliveryStatus.DELIVERED).count() == 1,
        timeout=15,
        message="the delivery acknowledged",
    )
    server.stop()
    api_text = server.log()
    assert token not in api_text
    mine = [
        (line["logger"], line["event"])
        for line in _json_lines(api_text)
        if line.get("notification_id") == notification_id
    ]
    delivery_id = Delivery.objects.get().pk
    group = f"recipient.{_recipient_pk()}"
    # Three threads write these (the request's, the pusher's, the event loop's), so only
    # their set is fixed, not their order.
    assert sorted(mine) == sorted(
        [
            ("notifications.accepting", f"notification {notification_id} accepted: web queued"),
            ("channels_app.consumers", f"notification pushed to {group}"),
            ("channels_app.consumers", f"client ack on {group}"),
            ("workers.services", f"delivery {delivery_id} sent via websocket"),
        ]
    )


def _recipient_pk() -> int:
    from notifications.models import Recipient

    return int(Recipient.objects.get(external_id="user-w").pk)
