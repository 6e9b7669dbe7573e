"""Every Redis and broker connection of every Clarion process has a deadline and a health
check (docs/operations.md, "Connections that go silent"): no call can wait for ever on a
connection that went half-open. tests/chaos/test_stall.py proves the whole under load."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.cache import cache

from core.shared_state import redis_client
from project.celery import app, broker_transport_options
from workers.relay import Relay


def test_the_broker_connections_have_deadlines_keepalive_and_a_health_check() -> None:
    options = broker_transport_options("redis://broker:6379/0")
    assert options == {
        "visibility_timeout": settings.BROKER_VISIBILITY_TIMEOUT,
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 10,
    }
    # A worker's idle consumer waits BROKER_POLL_SECONDS on the server between asks.
    assert broker_transport_options("redis://broker:6379/0", consumer=True) == {
        **options,
        "polling_interval": 10.0,
    }
    # RabbitMQ takes no Redis options (py-amqp would refuse them) and finds dead connections
    # by its heartbeats.
    assert broker_transport_options("amqp://guest@rabbit//") == {
        "visibility_timeout": settings.BROKER_VISIBILITY_TIMEOUT
    }
    assert app.conf.broker_heartbeat == 30
    if settings.CELERY_BROKER_URL.startswith("redis"):
        with app.connection_for_write() as connection:
            client = connection.default_channel.client
            kwargs = client.connection_pool.connection_kwargs
            assert kwargs["socket_timeout"] == 5.0
            assert kwargs["health_check_interval"] == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(
            lambda: cache._cache.get_client().connection_pool.connection_kwargs, id="cache"
        ),
        pytest.param(lambda: redis_client().connection_pool.connection_kwargs, id="shared-state"),
        pytest.param(
            lambda: Relay(poll_seconds=1).signals.connection_pool.connection_kwargs,
            id="relay-signal",
        ),
        pytest.param(lambda: settings.CHANNEL_LAYERS["default"]["CONFIG"]["hosts"][0], id="layer"),
    ],
)
def test_every_redis_client_has_a_deadline_and_a_health_check(kwargs: object) -> None:
    found = kwargs()  # type: ignore[operator]
    assert 0 < found["socket_timeout"] <= 15
    assert 0 < found["socket_connect_timeout"] <= 5
    assert found["health_check_interval"] == settings.REDIS_HEALTH_CHECK_SECONDS
