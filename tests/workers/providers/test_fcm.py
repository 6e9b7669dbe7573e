"""The FCM adapter through the real pyfcm SDK and google-auth against the FCM emulator: one
request per device token, the answers folded into one result, dead tokens reported."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from django.core.exceptions import ImproperlyConfigured

from notifications.models import Delivery, Device
from tests.conftest import free_port
from tests.emulators.base import Response
from tests.emulators.fcm import FcmEmulator, rate_limited, server_error
from tests.factories import DeviceFactory
from workers import services
from workers.providers import OutboundMessage, Outcome, SendResult, provider_for
from workers.providers.fcm import FcmProvider
from workers.services import ProcessOutcome

NOTIFICATION_ID = "7d0f3c1e-5b2a-4c8e-9f41-2a6b8c0d9e13"


@pytest.fixture(autouse=True)
def no_google_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """google-auth must take its token from the file's token_uri, never from Google."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(("google.com", "googleapis.com")):
            raise AssertionError(f"a test tried to reach {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture
def fcm() -> Iterator[FcmEmulator]:
    emulator = FcmEmulator()
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def make_provider(fcm: FcmEmulator, tmp_path: Path) -> Callable[..., FcmProvider]:
    def make(timeout: float = 5.0) -> FcmProvider:
        return FcmProvider(
            service_account_file=str(fcm.write_service_account(tmp_path)),
            project_id=fcm.project_id,
            base_url=fcm.url,
            timeout=timeout,
        )

    return make


def push(*tokens: str, data: dict[str, Any] | None = None) -> OutboundMessage:
    return OutboundMessage(
        delivery_id=42,
        notification_id=NOTIFICATION_ID,
        owner_id=1,
        channel="push",
        to=list(tokens),
        content={"title": "Shipped", "body": "Order A-1"},
        data=data or {},
    )


def sent_tokens(fcm: FcmEmulator) -> list[str]:
    return [r.json()["message"]["token"] for r in fcm.requests()]


def test_one_token_is_one_request_with_the_trace_ids_as_strings(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider]
) -> None:
    message = push("tok-a", data={"order_id": "A-1", "items": 2, "gift": True, "from": "x"})

    result = make_provider().send(message)

    [name] = fcm.accepted_ids
    assert name.startswith("projects/clarion-test/messages/0:")
    assert result == SendResult(Outcome.OK, provider_message_id=name, status_code=200)
    [token_request] = fcm.token_requests
    assert token_request.form()["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    [request] = fcm.requests()
    assert (request.method, request.path) == ("POST", "/v1/projects/clarion-test/messages:send")
    assert request.headers["authorization"] == f"Bearer {fcm.issued_tokens[0]}"
    # "from" is reserved by FCM (it would refuse the whole message), so it is dropped.
    assert request.json() == {
        "message": {
            "token": "tok-a",
            "notification": {"title": "Shipped", "body": "Order A-1"},
            "data": {
                "order_id": "A-1",
                "items": "2",
                "gift": "true",
                "notification_id": NOTIFICATION_ID,
                "delivery_id": "42",
            },
        },
        "validate_only": False,
    }
    assert fcm.trace_id(request, "notification_id") == NOTIFICATION_ID


def test_two_tokens_are_two_requests_on_one_access_token(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider]
) -> None:
    result = make_provider().send(push("tok-a", "tok-b"))

    assert sent_tokens(fcm) == ["tok-a", "tok-b"]
    assert len(fcm.accepted_ids) == 2
    assert result == SendResult(
        Outcome.OK, provider_message_id=",".join(fcm.accepted_ids), status_code=200
    )
    assert len(fcm.token_requests) == 1
    assert {r.headers["authorization"] for r in fcm.requests()} == {
        f"Bearer {fcm.issued_tokens[0]}"
    }


def test_an_unregistered_token_beside_a_good_one_is_reported_and_the_push_is_sent(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider]
) -> None:
    fcm.unregistered.add("tok-gone")

    result = make_provider().send(push("tok-a", "tok-gone"))

    assert sent_tokens(fcm) == ["tok-a", "tok-gone"]
    assert result == SendResult(
        Outcome.OK,
        provider_message_id=fcm.accepted_ids[0],
        status_code=200,
        invalid_tokens=("tok-gone",),
    )


def test_all_tokens_unregistered_is_permanent(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider]
) -> None:
    fcm.unregistered.update({"tok-gone", "tok-lost"})

    result = make_provider().send(push("tok-gone", "tok-lost"))

    assert result == SendResult(
        Outcome.PERMANENT,
        status_code=404,
        error="FCM 404 UNREGISTERED: Requested entity was not found.",
        invalid_tokens=("tok-gone", "tok-lost"),
    )
    assert fcm.accepted_ids == []


def test_a_malformed_token_is_reported_as_invalid(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider]
) -> None:
    fcm.accept_unknown = False
    fcm.registered.add("tok-a")

    result = make_provider().send(push("not-a-token", "tok-a"))

    assert result == SendResult(
        Outcome.OK,
        provider_message_id=fcm.accepted_ids[0],
        status_code=200,
        invalid_tokens=("not-a-token",),
    )


def test_a_404_without_fcms_error_code_does_not_condemn_the_token(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider]
) -> None:
    # A proxy or a wrong FCM_BASE_URL: deactivating devices on this would lose them all.
    fcm.fail_next(Response(404, b"<html>Not Found</html>", headers={"Content-Type": "text/html"}))

    result = make_provider().send(push("tok-a"))

    assert result == SendResult(
        Outcome.PERMANENT, status_code=404, error="FCM 404 : <html>Not Found</html>"
    )


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, "FCM 500 INTERNAL: Internal error encountered."),
        (503, "FCM 503 UNAVAILABLE: The service is currently unavailable."),
    ],
)
def test_server_error_is_transient_and_not_retried_inside_the_attempt(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider], status: int, error: str
) -> None:
    fcm.fail_always(server_error(status))

    result = make_provider().send(push("tok-a"))

    assert result == SendResult(Outcome.TRANSIENT, status_code=status, error=error)
    # pyfcm's default transport would resend a 503 up to ten times.
    assert len(fcm.requests()) == 1


def test_rate_limited_is_transient_with_retry_after_and_no_sleep(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider]
) -> None:
    fcm.fail_next(rate_limited(retry_after=3))
    provider = make_provider()

    started = time.monotonic()
    result = provider.send(push("tok-a"))

    # pyfcm alone would sleep the 3 s and resend; waiting belongs to the retry policy.
    assert time.monotonic() - started < 2
    assert result == SendResult(
        Outcome.TRANSIENT,
        status_code=429,
        error="FCM 429 QUOTA_EXCEEDED: Quota exceeded for quota metric 'Send requests'.",
        retry_after=3.0,
    )
    assert len(fcm.requests()) == 1


def test_a_transient_failure_beside_a_sent_token_is_ok(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider]
) -> None:
    fcm.fail_next(server_error(500))

    result = make_provider().send(push("tok-a", "tok-b"))

    assert sent_tokens(fcm) == ["tok-a", "tok-b"]
    assert result == SendResult(
        Outcome.OK, provider_message_id=fcm.accepted_ids[0], status_code=200
    )


def test_slow_fcm_is_a_transient_timeout_and_the_other_tokens_are_not_tried(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider]
) -> None:
    fcm.fail_always(Response(200, {"name": "projects/clarion-test/messages/late"}, delay=3))
    provider = make_provider(timeout=0.5)

    started = time.monotonic()
    result = provider.send(push("tok-a", "tok-b"))

    assert time.monotonic() - started < 1.5
    assert result.outcome is Outcome.TRANSIENT
    assert result.status_code is None
    assert result.error.startswith("FCM unreachable: ReadTimeout: ")
    assert sent_tokens(fcm) == ["tok-a"]


def test_connection_refused_is_transient(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider]
) -> None:
    provider = make_provider()
    fcm.stop()

    result = provider.send(push("tok-a"))

    # The OAuth token is fetched first, from the same (now closed) emulator.
    assert result.outcome is Outcome.TRANSIENT
    assert result.status_code is None
    assert result.error.startswith("OAuth token endpoint unreachable: ")
    assert "Connection refused" in result.error


def test_connection_refused_by_fcm_with_a_token_in_hand_is_transient(
    fcm: FcmEmulator, tmp_path: Path
) -> None:
    # The token endpoint answers; nothing listens where messages:send should be.
    provider = FcmProvider(
        service_account_file=str(fcm.write_service_account(tmp_path)),
        project_id=fcm.project_id,
        base_url=f"http://127.0.0.1:{free_port()}",
        timeout=5,
    )

    result = provider.send(push("tok-a", "tok-b"))

    assert len(fcm.issued_tokens) == 1
    assert result.outcome is Outcome.TRANSIENT
    assert result.status_code is None
    assert result.error.startswith("FCM unreachable: ConnectionError: ")
    assert "Connection refused" in result.error


def test_an_expired_access_token_is_renewed_once(
    fcm: FcmEmulator, make_provider: Callable[..., FcmProvider]
) -> None:
    provider = make_provider()
    assert provider.send(push("tok-a")).ok
    fcm.expire_access_tokens()

    result = provider.send(push("tok-b"))

    assert result == SendResult(
        Outcome.OK, provider_message_id=fcm.accepted_ids[1], status_code=200
    )
    assert len(fcm.issued_tokens) == 2
    assert [r.headers["authorization"] for r in fcm.requests()] == [
        f"Bearer {fcm.issued_tokens[0]}",
        f"Bearer {fcm.issued_tokens[0]}",
        f"Bearer {fcm.issued_tokens[1]}",
    ]


def test_a_key_google_does_not_know_is_a_permanent_failure(
    fcm: FcmEmulator, tmp_path: Path
) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info = fcm.service_account_info()
    info["private_key"] = stranger.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = tmp_path / "stranger.json"
    path.write_text(json.dumps(info))
    provider = FcmProvider(
        service_account_file=str(path), project_id=fcm.project_id, base_url=fcm.url, timeout=5
    )

    result = provider.send(push("tok-a"))

    assert result.outcome is Outcome.PERMANENT
    assert result.status_code is None
    assert result.error.startswith("OAuth token refused: ('invalid_grant: Invalid JWT Signature.'")
    assert len(fcm.token_requests) == 1
    assert fcm.requests() == []


def test_fcm_selected_without_its_service_account_file_is_named(settings: Any) -> None:
    settings.PUSH_PROVIDER = "fcm"
    settings.FCM_SERVICE_ACCOUNT_FILE = ""
    settings.FCM_PROJECT_ID = "clarion-test"
    provider_for.cache_clear()
    try:
        with pytest.raises(ImproperlyConfigured) as raised:
            provider_for("push")
        assert str(raised.value) == "FCM_SERVICE_ACCOUNT_FILE must be set for the selected provider"

        settings.FCM_SERVICE_ACCOUNT_FILE = "/nonexistent/service-account.json"
        provider_for.cache_clear()
        with pytest.raises(
            ImproperlyConfigured,
            match=r"^FCM_SERVICE_ACCOUNT_FILE='/nonexistent/service-account.json' is not a "
            r"readable service account file: ",
        ):
            provider_for("push")
    finally:
        provider_for.cache_clear()


def test_an_unregistered_token_deactivates_its_device(
    fcm: FcmEmulator, settings: Any, tmp_path: Path, api: Any, template: Any
) -> None:
    for name, value in fcm.settings_overrides(tmp_path).items():
        setattr(settings, name, value)
    provider_for.cache_clear()
    good = DeviceFactory(
        recipient__owner=template.owner, recipient__external_id="user-1", token="tok-good"
    )
    gone = DeviceFactory(recipient=good.recipient, token="tok-gone")
    fcm.unregistered.add("tok-gone")
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": "user-1",
            "template": "order_shipped",
            "data": {"order_id": "A-1"},
            "channels": ["push"],
        },
        format="json",
    )
    assert response.status_code == 202
    delivery = Delivery.objects.get(channel="push")

    try:
        assert services.delivery_process(delivery_id=delivery.pk) == ProcessOutcome.SENT
    finally:
        provider_for.cache_clear()

    assert sent_tokens(fcm) == ["tok-good", "tok-gone"]
    assert [fcm.trace_id(r, "notification_id") for r in fcm.requests()] == [
        str(delivery.notification_id)
    ] * 2
    assert [fcm.trace_id(r, "delivery_id") for r in fcm.requests()] == [str(delivery.pk)] * 2
    delivery.refresh_from_db()
    assert (delivery.status, delivery.provider, delivery.provider_message_id) == (
        "sent",
        "fcm",
        fcm.accepted_ids[0],
    )
    assert dict(Device.objects.values_list("token", "active")) == {
        "tok-good": True,
        "tok-gone": False,
    }
    assert gone.pk != good.pk
