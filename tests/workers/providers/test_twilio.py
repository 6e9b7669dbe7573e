"""The Twilio adapter through the official SDK against the Twilio emulator: the exact request
it makes, and the normalised result for success and for each kind of failure."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from tests.emulators.base import Response
from tests.emulators.twilio import TwilioEmulator
from workers.providers import OutboundMessage, Outcome, SendResult, provider_for
from workers.providers.twilio import TwilioProvider

MESSAGE = OutboundMessage(
    delivery_id=41,
    notification_id="0b6c8f0e-5f0e-4a7e-9d43-2c1d7d9b1f10",
    owner_id=7,
    channel="sms",
    to="+15551234567",
    content={"body": "Order A-1 is on its way."},
)


@pytest.fixture
def emulator() -> Iterator[TwilioEmulator]:
    emulator = TwilioEmulator()
    emulator.start()
    yield emulator
    emulator.stop()


def adapter(emulator: TwilioEmulator, **overrides: Any) -> TwilioProvider:
    options: dict[str, Any] = {
        "account_sid": emulator.account_sid,
        "auth_token": emulator.auth_token,
        "from_number": "+15005550006",
        "base_url": emulator.url,
        "timeout": 5.0,
        **overrides,
    }
    return TwilioProvider(**options)


def basic_auth(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def test_success_returns_the_message_sid_twilio_issued(emulator: TwilioEmulator) -> None:
    result = adapter(emulator).send(MESSAGE)

    [sid] = emulator.accepted_ids()
    assert sid.startswith("SM") and len(sid) == 34
    assert result == SendResult(Outcome.OK, provider_message_id=sid, status_code=201)
    [request] = emulator.requests()
    assert (request.method, request.path) == (
        "POST",
        f"/2010-04-01/Accounts/{emulator.account_sid}/Messages.json",
    )
    assert request.headers["authorization"] == basic_auth(emulator.account_sid, emulator.auth_token)
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.form() == {
        "To": ["+15551234567"],
        "From": ["+15005550006"],
        "Body": ["Order A-1 is on its way."],
    }
    assert emulator.trace_id(request, "to") == "+15551234567"
    assert emulator.trace_id(request, "body") == "Order A-1 is on its way."


def test_server_error_is_transient(emulator: TwilioEmulator) -> None:
    emulator.fail_next(emulator.server_error(500))

    result = adapter(emulator).send(MESSAGE)

    assert result == SendResult(
        Outcome.TRANSIENT,
        status_code=500,
        error="Twilio 500 (code 20500): Internal Server Error",
    )
    assert len(emulator.requests()) == 1
    assert emulator.accepted_ids() == []


def test_rate_limited_is_transient_with_retry_after(emulator: TwilioEmulator) -> None:
    emulator.fail_next(emulator.rate_limited(retry_after=3))

    result = adapter(emulator).send(MESSAGE)

    assert result == SendResult(
        Outcome.TRANSIENT,
        status_code=429,
        error="Twilio 429 (code 20429): Too Many Requests",
        retry_after=3.0,
    )


def test_retry_after_does_not_leak_into_the_next_failure(emulator: TwilioEmulator) -> None:
    emulator.fail_next(emulator.rate_limited(retry_after=3), emulator.server_error(503))
    provider = adapter(emulator)

    first, second = provider.send(MESSAGE), provider.send(MESSAGE)

    assert (first.status_code, first.retry_after) == (429, 3.0)
    assert second == SendResult(
        Outcome.TRANSIENT, status_code=503, error="Twilio 503 (code 20503): Service Unavailable"
    )


def test_number_twilio_rejects_is_permanent(emulator: TwilioEmulator) -> None:
    result = adapter(emulator).send(replace(MESSAGE, to="555-1234"))

    assert result == SendResult(
        Outcome.PERMANENT,
        status_code=400,
        error="Twilio 400 (code 21211): The 'To' number 555-1234 is not a valid phone number.",
    )
    [request] = emulator.requests()
    assert request.form()["To"] == ["555-1234"]
    assert emulator.accepted_ids() == []


def test_bad_number_fault_is_permanent(emulator: TwilioEmulator) -> None:
    emulator.fail_next(emulator.bad_number())

    result = adapter(emulator).send(MESSAGE)

    assert result == SendResult(
        Outcome.PERMANENT,
        status_code=400,
        error="Twilio 400 (code 21211): The 'To' number +15005550001 is not a valid phone number.",
    )


def test_slow_answer_times_out_as_transient(emulator: TwilioEmulator) -> None:
    emulator.fail_next(Response(201, {"sid": "SM" + "0" * 32}, delay=3.0))

    started = time.monotonic()
    result = adapter(emulator, timeout=0.5).send(MESSAGE)
    elapsed = time.monotonic() - started

    assert result == SendResult(
        Outcome.TRANSIENT,
        error=(
            f"ReadTimeout: HTTPConnectionPool(host='{emulator.host}', port={emulator.port}): "
            "Read timed out. (read timeout=0.5)"
        ),
    )
    assert 0.4 < elapsed < 1.5
    assert len(emulator.requests()) == 1


def test_connection_refused_is_transient(emulator: TwilioEmulator) -> None:
    emulator.stop()

    result = adapter(emulator).send(MESSAGE)

    assert result.outcome is Outcome.TRANSIENT
    assert (result.status_code, result.retry_after) == (None, None)
    assert result.error.startswith("ConnectionError: ")
    assert "[Errno 111] Connection refused" in result.error


def test_wrong_auth_token_is_permanent(emulator: TwilioEmulator) -> None:
    result = adapter(emulator, auth_token="0" * 32).send(MESSAGE)

    assert result == SendResult(
        Outcome.PERMANENT, status_code=401, error="Twilio 401 (code 20003): Authenticate"
    )
    [request] = emulator.requests()
    assert request.headers["authorization"] == basic_auth(emulator.account_sid, "0" * 32)
    assert emulator.accepted_ids() == []


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    provider_for.cache_clear()
    yield
    provider_for.cache_clear()


def test_registry_builds_it_from_the_emulators_settings(
    settings: Any, emulator: TwilioEmulator, fresh_registry: None
) -> None:
    for name, value in emulator.settings_overrides().items():
        setattr(settings, name, value)

    provider = provider_for("sms")
    result = provider.send(MESSAGE)

    assert isinstance(provider, TwilioProvider)
    assert provider.name == "twilio"
    assert result == SendResult(
        Outcome.OK, provider_message_id=emulator.accepted_ids()[0], status_code=201
    )
    assert emulator.settings_env() == {
        "SMS_PROVIDER": "twilio",
        "TWILIO_ACCOUNT_SID": emulator.account_sid,
        "TWILIO_AUTH_TOKEN": emulator.auth_token,
        "TWILIO_FROM_NUMBER": "+15005550006",
        "TWILIO_BASE_URL": emulator.url,
    }


@pytest.mark.parametrize(
    ("blank", "message"),
    [
        (("TWILIO_ACCOUNT_SID",), "TWILIO_ACCOUNT_SID must be set for the selected provider"),
        (("TWILIO_AUTH_TOKEN",), "TWILIO_AUTH_TOKEN must be set for the selected provider"),
        (("TWILIO_FROM_NUMBER",), "TWILIO_FROM_NUMBER must be set for the selected provider"),
    ],
)
def test_selected_without_credentials_refuses_naming_the_variable(
    settings: Any,
    emulator: TwilioEmulator,
    fresh_registry: None,
    blank: tuple[str, ...],
    message: str,
) -> None:
    for name, value in emulator.settings_overrides().items():
        setattr(settings, name, value)
    for name in blank:
        setattr(settings, name, "")

    with pytest.raises(ImproperlyConfigured) as raised:
        provider_for("sms")

    assert str(raised.value) == message
    assert emulator.requests() == []
