"""Flower, as `make run` starts it: basic auth from FLOWER_BASIC_AUTH, and every channel
queue of a running worker visible through its API."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, Process, free_port, process_env, wait_until

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]


def fetch(url: str, auth: str | None = None) -> tuple[int, Any]:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=10
        ) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def test_flower_behind_basic_auth_lists_every_queue(
    spawn: Callable[..., Process],
    celery_worker_process: Callable[..., Process],
    tmp_path: Path,
) -> None:
    worker = celery_worker_process(
        "email,sms,push,web,maintenance", concurrency=1, name="all-queues"
    )
    port = free_port()
    flower = spawn(
        "flower",
        [str(BIN / "celery"), "-A", "project", "flower", "--address=127.0.0.1", f"--port={port}"],
        process_env(tmp_path, FLOWER_BASIC_AUTH="ops:s3cret"),
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if flower.popen.poll() is not None:
            pytest.fail(flower.log())
        return fetch(f"{base}/healthcheck")[0] == 200

    wait_until(up, timeout=60, message="Flower")
    assert fetch(f"{base}/api/workers")[0] == 401
    assert fetch(f"{base}/api/workers", auth="ops:wrong")[0] == 401

    def queues() -> set[str] | None:
        status, body = fetch(f"{base}/api/workers?refresh=1", auth="ops:s3cret")
        if status != 200:
            return None
        for name, info in json.loads(body).items():
            if name.startswith("all-queues") and info.get("active_queues"):
                return {q["name"] for q in info["active_queues"]}
        return None

    assert wait_until(queues, timeout=30, interval=1, message="the worker in Flower") == {
        "email",
        "sms",
        "push",
        "web",
        "maintenance",
    }
    assert worker.popen.poll() is None
