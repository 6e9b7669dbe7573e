"""The shared token bucket on real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from core import rate_limiter
from core.rate_limiter import Rate, parse_rate_limits, rate_limit_take


@pytest.fixture
def ten_per_second(settings: Any) -> None:
    settings.RATE_LIMITS = "sms=10/s"
    settings.RATE_LIMIT_BURST = 1
    rate_limiter._rates.cache_clear()
    yield
    rate_limiter._rates.cache_clear()


def test_parse(settings: Any) -> None:
    settings.RATE_LIMIT_BURST = 1
    assert parse_rate_limits("email=1000/m, sms=100/s,push=5000/s,web=36000/h") == {
        "email": Rate(1000 / 60, 1.0),
        "sms": Rate(100.0, 1.0),
        "push": Rate(5000.0, 1.0),
        "web": Rate(10.0, 1.0),
    }
    for bad in ("sms=100", "fax=1/s", "sms=0/s", "sms=ten/s"):
        with pytest.raises(ImproperlyConfigured, match="RATE_LIMITS entry"):
            parse_rate_limits(bad)


def test_first_token_now_then_reservations_a_tenth_apart(ten_per_second: None) -> None:
    assert rate_limit_take(channel="sms", provider="p", max_wait=1) == 0
    waits = [rate_limit_take(channel="sms", provider="p", max_wait=1) for _ in range(3)]
    assert [round(w, 1) for w in waits] == [0.1, 0.2, 0.3]


def test_refuses_without_reserving_past_max_wait(ten_per_second: None) -> None:
    assert rate_limit_take(channel="sms", provider="p", max_wait=0.05) == 0
    refused = rate_limit_take(channel="sms", provider="p", max_wait=0.05)
    assert -0.11 < refused < -0.09
    # Nothing was reserved: the next caller is told the same.
    assert -0.11 < rate_limit_take(channel="sms", provider="p", max_wait=0.05) < -0.09


def test_buckets_are_per_provider_and_unlimited_channels_pass(ten_per_second: None) -> None:
    assert rate_limit_take(channel="sms", provider="a", max_wait=1) == 0
    assert rate_limit_take(channel="sms", provider="b", max_wait=1) == 0
    assert rate_limit_take(channel="email", provider="a", max_wait=1) == 0
    assert rate_limit_take(channel="email", provider="a", max_wait=1) == 0
