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
    # Celery reads CELERY_BROKER_URL from the environment before its own configuration.
    monkeypatch.setenv("CELERY_BROKER_URL", closed)
    monkeypatch.setattr(celery_app.conf, "broker_url", closed)
    monkeypatch.setattr(celery_app.conf, "broker_write_url", None)
    response = Client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"] == "ok"
    assert body["checks"]["broker"].startswith("error: ")
