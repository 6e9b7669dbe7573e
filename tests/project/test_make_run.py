"""`make run` on a fresh var/ with no server configured: the embedded SQLite and Redis, the
API, one worker per channel, beat and Flower come up, and a notification runs to `sent`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from project import embedded_redis
from tests.conftest import ROOT, free_port, wait_until

pytestmark = pytest.mark.pipeline

CONFIGURED = (
    "DATABASE_URL",
    "REDIS_URL",
    "CELERY_BROKER_URL",
    "SECRET_KEY",
    "DJANGO_SETTINGS_MODULE",
    "TEST_RABBITMQ_URL",
)


def get(url: str, **headers: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=3) as answer:
            body = answer.read()
            kind = answer.headers.get("Content-Type", "")
            return answer.status, json.loads(body) if "json" in kind else body
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:
        return 0, None


def test_make_run_serves_the_whole_pipeline(tmp_path: Path) -> None:
    var = tmp_path / "var"
    port, flower = free_port(), free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in CONFIGURED and not k.startswith("PYTEST_")
    }
    env.update(
        CLARION_VAR_DIR=str(var), PORT=str(port), FLOWER_PORT=str(flower), PYTHONUNBUFFERED="1"
    )
    log_path = tmp_path / "make-run.log"
    process = subprocess.Popen(
        ["make", "run"],
        cwd=ROOT,
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def log() -> str:
            if process.poll() is not None:
                pytest.fail(f"make run exited:\n{log_path.read_text()}")
            return log_path.read_text(errors="replace")

        key = wait_until(
            lambda: re.search(r"API key\s+(clr_\S+)", log()), timeout=120, message="the banner"
        ).group(1)
        wait_until(lambda: get(f"{base}/readyz")[0] == 200, timeout=60, message="readyz")
        request = urllib.request.Request(
            f"{base}/api/v1/notifications",
            method="POST",
            data=json.dumps(
                {
                    "recipient": "user-42",
                    "template": "order_shipped",
                    "data": {"order_id": "A-1001"},
                }
            ).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 202
            created = json.loads(answer.read())
        assert created["deliveries"] == [
            {"channel": "email", "status": "queued"},
            {"channel": "sms", "status": "queued"},
            {"channel": "push", "status": "skipped", "reason": "no_address"},
            {"channel": "web", "status": "queued"},
        ]

        def sent() -> Any:
            status, body = get(
                f"{base}/api/v1/notifications/{created['id']}", Authorization=f"Bearer {key}"
            )
            return body if status == 200 and body["status"] == "sent" else None

        body = wait_until(sent, timeout=90, interval=0.5, message="every channel sent")
        assert [(d["channel"], d["status"], d["provider"]) for d in body["deliveries"]] == [
            ("email", "sent", "sandbox"),
            ("sms", "sent", "sandbox"),
            ("push", "skipped", None),
            ("web", "sent", "websocket"),
        ]
        # The banner's inbox page, and the browser client it loads, served by the ASGI server.
        inbox = wait_until(
            lambda: re.search(r"Inbox\s+(http://\S+/inbox/)#token=(\S+)", log()), timeout=5
        )
        assert inbox.group(1) == f"{base}/inbox/"
        status, page = get(inbox.group(1))
        assert status == 200 and b"/static/clarion/clarion.js" in page
        status, script = get(f"{base}/static/clarion/clarion.js")
        assert status == 200 and b"Clarion browser client" in script
        status, unread = get(
            f"{base}/api/v1/inbox/unread-count", Authorization=f"Bearer {inbox.group(2)}"
        )
        assert (status, unread) == (200, {"count": 1})
        assert (var / "clarion.sqlite3").exists()
        wait_until(
            lambda: get(f"http://127.0.0.1:{flower}/healthcheck")[0] == 200,
            timeout=60,
            message="Flower",
        )
        for name in ("email@", "sms@", "push@", "web@", "maintenance@", "webhooks@", "beat"):
            assert name in log(), name
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        embedded_redis.stop(var)
