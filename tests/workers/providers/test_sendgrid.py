"""The SendGrid adapter through the official SDK against the SendGrid emulator: the exact
request it makes, and the normalised result for success and for each kind of failure."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from tests.emulators.base import Response
from tests.emulators.sendgrid import SendGridEmulator
from workers.providers import OutboundMessage, Outcome, SendResult, provider_for
from workers.providers.sendgrid import SendGridProvider

MESSAGE = OutboundMessage(
    delivery_id=41,
    notification_id="0b6c8f0e-5f0e-4a7e-9d43-2c1d7d9b1f10",
    owner_id=7,
    channel="email",
    to="bob@example.com",
    content={"subject": "Your order shipped", "body": "Order A-1 is on its way."},
)


@pytest.fixture
def emulator() -> Iterator[SendGridEmulator]:
    emulator = SendGridEmulator()
    emulator.start()
    yield emulator
    emulator.stop()


def adapter(emulator: SendGridEmulator, **overrides: Any) -> SendGridProvider:
    options: dict[str, Any] = {
        "api_key": emulator.api_key,
        "base_url": emulator.url,
        "from_email": "clarion@example.com",
        "timeout": 5.0,
        **overrides,
    }
    return SendGridProvider(**options)


def test_success_returns_the_message_id_sendgrid_issued(emulator: SendGridEmulator) -> None:
    message = replace(MESSAGE, content={**MESSAGE.content, "html": "<p>On its way.</p>"})

    result = adapter(emulator).send(message)

    [message_id] = emulator.accepted_ids()
    assert result == SendResult(Outcome.OK, provider_message_id=message_id, status_code=202)
    [request] = emulator.requests()
    assert (request.method, request.path) == ("POST", "/v3/mail/send")
    assert request.headers["authorization"] == f"Bearer {emulator.api_key}"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "from": {"email": "clarion@example.com"},
        "subject": "Your order shipped",
        "personalizations": [{"to": [{"email": "bob@example.com"}]}],
        "content": [
            {"type": "text/plain", "value": "Order A-1 is on its way."},
            {"type": "text/html", "value": "<p>On its way.</p>"},
        ],
        "custom_args": {
            "notification_id": "0b6c8f0e-5f0e-4a7e-9d43-2c1d7d9b1f10",
            "delivery_id": "41",
        },
    }
    assert emulator.trace_id(request, "notification_id") == MESSAGE.notification_id
    assert emulator.trace_id(request, "delivery_id") == "41"


def test_plain_text_only_sends_one_content_block(emulator: SendGridEmulator) -> None:
    result = adapter(emulator).send(MESSAGE)

    assert result.outcome is Outcome.OK
    [request] = emulator.requests()
    assert request.json()["content"] == [
        {"type": "text/plain", "value": "Order A-1 is on its way."}
    ]


def test_server_error_is_transient(emulator: SendGridEmulator) -> None:
    emulator.fail_next(emulator.server_error(500))

    result = adapter(emulator).send(MESSAGE)

    assert result == SendResult(
        Outcome.TRANSIENT, status_code=500, error="SendGrid 500: An internal server error occurred."
    )
    assert len(emulator.requests()) == 1
    assert emulator.accepted_ids() == []


def test_rate_limited_is_transient_with_retry_after(emulator: SendGridEmulator) -> None:
    emulator.fail_next(emulator.rate_limited(retry_after=3))

    result = adapter(emulator).send(MESSAGE)

    assert result == SendResult(
        Outcome.TRANSIENT,
        status_code=429,
        error="SendGrid 429: too many requests",
        retry_after=3.0,
    )


def test_address_sendgrid_rejects_is_permanent(emulator: SendGridEmulator) -> None:
    result = adapter(emulator).send(replace(MESSAGE, to="not-an-address"))

    assert result == SendResult(
        Outcome.PERMANENT,
        status_code=400,
        error="SendGrid 400: Does not contain a valid address. (personalizations.0.to.0.email)",
    )
    [request] = emulator.requests()
    assert request.json()["personalizations"] == [{"to": [{"email": "not-an-address"}]}]
    assert emulator.accepted_ids() == []


def test_bad_address_fault_is_permanent(emulator: SendGridEmulator) -> None:
    emulator.fail_next(emulator.bad_address())

    result = adapter(emulator).send(MESSAGE)

    assert result == SendResult(
        Outcome.PERMANENT,
        status_code=400,
        error="SendGrid 400: Does not contain a valid address. (personalizations.0.to.0.email)",
    )


def test_slow_answer_times_out_as_transient(emulator: SendGridEmulator) -> None:
    emulator.fail_next(Response(202, b"", headers={"X-Message-Id": "too-late"}, delay=3.0))

    started = time.monotonic()
    result = adapter(emulator, timeout=0.5).send(MESSAGE)
    elapsed = time.monotonic() - started

    assert result == SendResult(Outcome.TRANSIENT, error="TimeoutError: timed out")
    assert 0.4 < elapsed < 1.5
    assert len(emulator.requests()) == 1


def test_connection_refused_is_transient(emulator: SendGridEmulator) -> None:
    emulator.stop()

    result = adapter(emulator).send(MESSAGE)

    assert result == SendResult(
        Outcome.TRANSIENT, error="URLError: <urlopen error [Errno 111] Connection refused>"
    )


def test_wrong_api_key_is_permanent(emulator: SendGridEmulator) -> None:
    result = adapter(emulator, api_key="SG.wrong.key").send(MESSAGE)

    assert result == SendResult(
        Outcome.PERMANENT,
        status_code=401,
        error="SendGrid 401: The provided authorization grant is invalid, expired, or revoked",
    )
    [request] = emulator.requests()
    assert request.headers["authorization"] == "Bearer SG.wrong.key"
    assert emulator.accepted_ids() == []


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    provider_for.cache_clear()
    yield
    provider_for.cache_clear()


def test_registry_builds_it_from_the_emulators_settings(
    settings: Any, emulator: SendGridEmulator, fresh_registry: None
) -> None:
    for name, value in emulator.settings_overrides().items():
        setattr(settings, name, value)

    provider = provider_for("email")
    result = provider.send(MESSAGE)

    assert isinstance(provider, SendGridProvider)
    assert provider.name == "sendgrid"
    assert result == SendResult(
        Outcome.OK, provider_message_id=emulator.accepted_ids()[0], status_code=202
    )
    assert emulator.settings_env() == {
        "EMAIL_PROVIDER": "sendgrid",
        "SENDGRID_API_KEY": emulator.api_key,
        "SENDGRID_BASE_URL": emulator.url,
        "EMAIL_FROM": "clarion@example.com",
        # The Event Webhook's verification key, for /hooks/sendgrid.
        "SENDGRID_WEBHOOK_PUBLIC_KEY": emulator.event_public_key,
    }


@pytest.mark.parametrize(
    ("blank", "message"),
    [
        (("SENDGRID_API_KEY",), "SENDGRID_API_KEY must be set for the selected provider"),
        (("EMAIL_FROM",), "EMAIL_FROM must be set for the selected provider"),
        (
            ("SENDGRID_API_KEY", "EMAIL_FROM"),
            "SENDGRID_API_KEY and EMAIL_FROM must be set for the selected provider",
        ),
    ],
)
def test_selected_without_credentials_refuses_naming_the_variable(
    settings: Any,
    emulator: SendGridEmulator,
    fresh_registry: None,
    blank: tuple[str, ...],
    message: str,
) -> None:
    for name, value in emulator.settings_overrides().items():
        setattr(settings, name, value)
    for name in blank:
        setattr(settings, name, "")

    with pytest.raises(ImproperlyConfigured) as raised:
        provider_for("email")

    assert str(raised.value) == message
    assert emulator.requests() == []


# --- Batches: many emails in one request ----------------------------------------------------


def _batch(count: int, *, html: bool = False, first: int = 0) -> list[OutboundMessage]:
    return [
        replace(
            MESSAGE,
            delivery_id=100 + n,
            notification_id=f"n-{n}",
            to=f"user-{n}@example.com",
            content={"subject": f"Order {n}", "body": f"Order {n} is on its way."}
            | ({"html": f"<p>Order {n}</p>"} if html else {}),
        )
        for n in range(first, first + count)
    ]


def test_a_batch_is_one_request_with_one_personalization_per_email(
    emulator: SendGridEmulator,
) -> None:
    messages = _batch(3, html=True)

    results = adapter(emulator).send_batch(messages)

    [message_id] = emulator.accepted_ids()
    assert results == [SendResult(Outcome.OK, provider_message_id=message_id, status_code=202)] * 3
    [request] = emulator.requests()
    assert request.json() == {
        "from": {"email": "clarion@example.com"},
        "content": [
            {"type": "text/plain", "value": "-clarion-body-"},
            {"type": "text/html", "value": "-clarion-html-"},
        ],
        "personalizations": [
            {
                "to": [{"email": f"user-{n}@example.com"}],
                "subject": f"Order {n}",
                "substitutions": {
                    "-clarion-body-": f"Order {n} is on its way.",
                    "-clarion-html-": f"<p>Order {n}</p>",
                },
                "custom_args": {"notification_id": f"n-{n}", "delivery_id": str(100 + n)},
            }
            for n in range(3)
        ],
    }
    assert emulator.count_by("notification_id") == {"n-0": 1, "n-1": 1, "n-2": 1}


def test_batches_are_cut_at_max_batch_and_split_by_html(emulator: SendGridEmulator) -> None:
    messages = _batch(5) + _batch(2, html=True, first=5)

    results = adapter(emulator, max_batch=2).send_batch(messages)

    assert [r.outcome for r in results] == [Outcome.OK] * 7
    sizes = [len(r.json()["personalizations"]) for r in emulator.requests()]
    # Plain: 2 + 2 + 1 (the single one goes as an ordinary message); html: 2.
    assert sizes == [2, 2, 1, 2]
    assert sorted(emulator.count_by("notification_id").values()) == [1] * 7


def test_a_batch_refused_for_one_bad_address_is_resent_one_by_one(
    emulator: SendGridEmulator,
) -> None:
    messages = _batch(3)
    messages[1] = replace(messages[1], to="not-an-address")

    results = adapter(emulator).send_batch(messages)

    assert [r.outcome for r in results] == [Outcome.OK, Outcome.PERMANENT, Outcome.OK]
    assert results[1].status_code == 400
    assert "Does not contain a valid address." in results[1].error
    # The batch (refused), then each message alone.
    assert [len(r.json()["personalizations"]) for r in emulator.requests()] == [3, 1, 1, 1]
    assert emulator.count_by("notification_id", accepted_only=True) == {"n-0": 1, "n-2": 1}


def test_a_transient_batch_failure_is_every_message_s_result(emulator: SendGridEmulator) -> None:
    emulator.fail_next(SendGridEmulator.server_error(503))

    results = adapter(emulator).send_batch(_batch(3))

    assert [(r.outcome, r.status_code) for r in results] == [(Outcome.TRANSIENT, 503)] * 3
    assert len(emulator.requests()) == 1


def test_an_email_too_long_for_substitutions_goes_alone(emulator: SendGridEmulator) -> None:
    messages = _batch(3)
    messages[0] = replace(messages[0], content={"subject": "Long", "body": "x" * 10_000})

    results = adapter(emulator).send_batch(messages)

    assert [r.outcome for r in results] == [Outcome.OK] * 3
    bodies = [r.json() for r in emulator.requests()]
    assert [len(b["personalizations"]) for b in bodies] == [1, 2]
    assert bodies[0]["content"] == [{"type": "text/plain", "value": "x" * 10_000}]
