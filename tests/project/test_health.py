"""Liveness and readiness endpoints."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from project.celery import app as celery_app
from tests.conftest import free_port


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
