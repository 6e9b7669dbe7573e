"""Flower, as `make run` starts it: basic auth from FLOWER_BASIC_AUTH, every channel queue of
a running worker visible through its API, and the Procfile's workers online with their
tasks."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.procs import procfile_commands
from tests.conftest import (
    BIN,
    PRODUCTION_BROKER_POLL_SECONDS,
    ROOT,
    Process,
    free_port,
    process_env,
    wait_until,
)

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


def test_flower_shows_the_procfiles_workers_online_and_their_tasks(
    api: Any, template: Any, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    """The worker pools and Flower exactly as the Procfile starts them (no gossip, no mingle,
    a heartbeat every 10 s, an idle BRPOP of 10 s: what keeps an idle service idle): Flower
    shows every worker online, still after two heartbeat periods, and the tasks they ran."""
    port = free_port()
    env = process_env(
        tmp_path,
        FLOWER_PORT=port,
        FLOWER_BASIC_AUTH="ops:s3cret",
        BROKER_POLL_SECONDS=PRODUCTION_BROKER_POLL_SECONDS,
    )
    pools = {"email", "sms", "push", "inapp", "maintenance", "webhooks"}
    started = [
        spawn(name, argv, env)
        for name, argv in procfile_commands(ROOT / "Procfile", env)
        if name in pools | {"relay", "flower"}
    ]
    assert len(started) == len(pools) + 2
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: fetch(f"{base}/healthcheck")[0] == 200, timeout=60, message="Flower")

    def online() -> dict[str, bool]:
        status, body = fetch(f"{base}/api/workers?status=1", auth="ops:s3cret")
        return json.loads(body) if status == 200 else {}

    expected = {"email", "sms", "push", "web", "maintenance", "webhooks"}
    names = wait_until(
        lambda: {n.split("@")[0] for n, alive in online().items() if alive} == expected,
        timeout=60,
        interval=1,
        message="every worker online in Flower",
    )
    assert names
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": {"id": "u1", "email": "u1@example.com", "phone": "+14155550100"},
            "template": "order_shipped",
            "data": {"order_id": "A-1"},
        },
        format="json",
    )
    assert response.status_code == 202, response.content

    def tasks() -> set[tuple[str, str]]:
        status, body = fetch(f"{base}/api/tasks", auth="ops:s3cret")
        if status != 200:
            return set()
        return {(t["name"], t["state"]) for t in json.loads(body).values()}

    wait_until(
        lambda: (
            {("clarion.deliver.email", "SUCCESS"), ("clarion.deliver.sms", "SUCCESS")} <= tasks()
        ),
        timeout=60,
        interval=1,
        message="the delivery tasks in Flower",
    )
    # Two heartbeat periods later, with nothing to do, every worker is still online.
    time.sleep(25)
    assert {n.split("@")[0]: alive for n, alive in online().items()} == dict.fromkeys(
        expected, True
    )
