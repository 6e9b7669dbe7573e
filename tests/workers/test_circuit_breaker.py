"""The shared circuit breaker on real Redis, and deliveries deferred while it is open."""

from __future__ import annotations

import time
from typing import Any

import pytest

from notifications.models import Delivery, DeliveryStatus
from workers.circuit_breaker import CircuitState, circuit_allow, circuit_record, circuit_state
from workers.services import ProcessOutcome, delivery_process


@pytest.fixture
def breaker(settings: Any) -> str:
    settings.CIRCUIT_FAILURE_THRESHOLD = 5
    settings.CIRCUIT_OPEN_SECONDS = 1
    settings.CIRCUIT_SUCCESS_THRESHOLD = 3
    return "test-provider"


def trip(provider: str) -> None:
    for _ in range(5):
        assert circuit_allow(provider=provider) == 0
        circuit_record(provider=provider, outcome="transient")


def test_opens_after_five_consecutive_transient_failures(breaker: str) -> None:
    for _ in range(4):
        assert circuit_record(provider=breaker, outcome="transient") == CircuitState.CLOSED
    assert circuit_record(provider=breaker, outcome="transient") == CircuitState.OPEN
    wait = circuit_allow(provider=breaker)
    assert 0.9 < wait <= 1.0


def test_a_success_resets_the_consecutive_count(breaker: str) -> None:
    for _ in range(4):
        circuit_record(provider=breaker, outcome="transient")
    circuit_record(provider=breaker, outcome="ok")
    for _ in range(4):
        assert circuit_record(provider=breaker, outcome="transient") == CircuitState.CLOSED


def test_permanent_errors_do_not_trip_it(breaker: str) -> None:
    for _ in range(20):
        assert circuit_record(provider=breaker, outcome="permanent") == CircuitState.CLOSED
    assert circuit_allow(provider=breaker) == 0


def test_half_open_lets_one_trial_at_a_time_and_closes_after_three(breaker: str) -> None:
    trip(breaker)
    time.sleep(1.05)
    assert circuit_allow(provider=breaker) == 0  # the trial
    assert circuit_state(provider=breaker) == CircuitState.HALF_OPEN
    assert circuit_allow(provider=breaker) > 0  # a second caller waits for the trial
    for expected in (CircuitState.HALF_OPEN, CircuitState.HALF_OPEN, CircuitState.CLOSED):
        assert circuit_record(provider=breaker, outcome="ok") == expected
        if expected is CircuitState.HALF_OPEN:
            assert circuit_allow(provider=breaker) == 0
    assert circuit_allow(provider=breaker) == 0
    assert circuit_allow(provider=breaker) == 0


def test_a_failed_trial_opens_it_again(breaker: str) -> None:
    trip(breaker)
    time.sleep(1.05)
    assert circuit_allow(provider=breaker) == 0
    assert circuit_record(provider=breaker, outcome="transient") == CircuitState.OPEN
    assert circuit_allow(provider=breaker) > 0.9


def test_breakers_are_per_provider(breaker: str) -> None:
    trip(breaker)
    assert circuit_allow(provider="another-provider") == 0


@pytest.mark.django_db
def test_open_breaker_defers_without_spending_an_attempt(
    api: Any, template: Any, breaker: str, settings: Any
) -> None:
    from workers.providers import provider_for

    provider_for.cache_clear()
    trip("sandbox")
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": {"id": "u", "email": "u@example.com"},
            "template": "order_shipped",
            "data": {"order_id": "1"},
            "channels": ["email"],
        },
        format="json",
    )
    delivery = Delivery.objects.get(notification_id=response.json()["id"])
    assert delivery_process(delivery_id=delivery.pk) == ProcessOutcome.DEFERRED
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.lease_token) == (
        DeliveryStatus.QUEUED,
        0,
        None,
    )
    assert delivery.next_attempt_at is not None
    assert delivery.attempt_log.count() == 0
    # Once the breaker lets a trial through, the delivery goes.
    time.sleep(2.1)
    assert delivery_process(delivery_id=delivery.pk) == ProcessOutcome.SENT
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.SENT, 1)
