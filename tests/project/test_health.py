"""Liveness and readiness endpoints of the API (the workers' and the relay's are in
tests/workers/test_watchdog.py and tests/workers/test_relay.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import Client

from project.celery import app as celery_app
from tests.chaos.forwarder import forwarding, port_of
from tests.conftest import Process, free_port
from tests.project.api_server import http, start_api_server


def test_healthz() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
def test_readyz_checks_database_redis_and_broker() -> None:
    response = Client().get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "redis": "ok", "broker": "ok"},
    }


@pytest.mark.django_db
def test_readyz_is_503_when_the_broker_does_not_answer(monkeypatch: Any) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    # Only the readiness check's connection points at the closed port: changing the app's
    # configuration would leak into every later test that publishes.
    connect = celery_app.connection_for_write
    monkeypatch.setattr(
        celery_app, "connection_for_write", lambda url=None, **kwargs: connect(closed, **kwargs)
    )
    response = Client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"] == "ok"
    assert body["checks"]["broker"].startswith("error: ")


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_readyz_of_an_api_whose_redis_connections_went_silent_says_so_then_recovers(
    spawn: Callable[..., Process], tmp_path: Path
) -> None:
    """Every Redis connection the API process holds goes half-open (a forwarder swallows what
    is sent; new connections still work): /readyz answers 503 naming Redis within its 2 s
    deadline instead of hanging, the silent connection is dropped, and the next answers are
    200 on new ones."""
    redis_db = int(settings.REDIS_URL.rsplit("/", 1)[1])
    with forwarding(port_of(settings.REDIS_URL)) as forwarder:
        _, base = start_api_server(
            spawn,
            tmp_path,
            REDIS_URL=forwarder.url(redis_db),
            CELERY_BROKER_URL=forwarder.url(redis_db),
        )
        assert _readyz(base)[0] == 200
        assert forwarder.silence() > 0
        answers = []
        started = time.monotonic()
        while time.monotonic() - started < 30:
            answers.append(_readyz(base))
            if answers[-1][0] == 200:
                break
        assert answers[-1][0] == 200, answers
        assert answers[0][0] == 503
        assert answers[0][1]["redis"].startswith("error: ")
        assert answers[0][1]["database"] == "ok"
        assert answers[0][2] < 5  # the cache's 2 s deadline (and the connect), not a hang


def _readyz(base: str) -> tuple[int, dict[str, str], float]:
    started = time.monotonic()
    answer = http("GET", f"{base}/readyz")
    return answer.status, json.loads(answer.body)["checks"], time.monotonic() - started
