"""Push through Firebase Cloud Messaging HTTP v1 with the pyfcm SDK. HTTP v1 takes exactly one
device token per request (the legacy multicast endpoint is gone), so a recipient's tokens are
sent one by one on one HTTP session and the answers folded into one result."""

from __future__ import annotations

import functools
import json
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import requests
from django.core.exceptions import ImproperlyConfigured
from google.oauth2 import service_account
from pyfcm import FCMNotification
from pyfcm.errors import (
    AuthenticationError,
    FCMNotRegisteredError,
    FCMSenderIdMismatchError,
    FCMServerError,
    InvalidDataError,
)
from requests.adapters import HTTPAdapter

from workers.providers.base import OutboundMessage, Outcome, SendResult
from workers.retry import classify_http_status, retry_after_seconds

SCOPES = ["https://www.googleapis.com/auth/firebase.messaging"]
# Keys FCM refuses in `data` (400 for the whole message), dropped rather than failing the push.
RESERVED_DATA_KEYS = frozenset({"from", "message_type"})
RESERVED_DATA_PREFIXES = ("google", "gcm")


class _FcmClient(FCMNotification):
    """pyfcm with two changes: the OAuth token fetch gets our timeout and keeps google-auth's
    exceptions, and a request goes out once. pyfcm itself sleeps through any Retry-After and
    resends in place, which would hold a worker for as long as FCM asks; waiting is the retry
    policy's decision."""

    def __init__(self, *, token_timeout: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.token_timeout = token_timeout

    def _get_access_token(self) -> str:
        # pyfcm's own fetch has no timeout (google-auth then waits 120 s) and wraps every
        # failure, a refused connection included, in InvalidDataError.
        request = functools.partial(
            google.auth.transport.requests.Request(), timeout=self.token_timeout
        )
        self.credentials.refresh(request)
        return str(self.credentials.token)

    def send_request(self, payload: bytes | None = None, timeout: float | None = None) -> Any:
        response = self.requests_session.post(self.fcm_end_point, data=payload, timeout=timeout)
        if self._is_access_token_expired(response):
            # One fresh token, once: pyfcm would recurse for as long as FCM says expired.
            self.thread_local.token_expiry = 0
            response = self.requests_session.post(self.fcm_end_point, data=payload, timeout=timeout)
        return response


class FcmProvider:
    name = "fcm"

    def __init__(
        self, *, service_account_file: str, project_id: str, base_url: str, timeout: float
    ):
        try:
            credentials = service_account.Credentials.from_service_account_file(
                service_account_file, scopes=SCOPES
            )
        except (OSError, ValueError) as exc:
            raise ImproperlyConfigured(
                f"FCM_SERVICE_ACCOUNT_FILE={service_account_file!r} is not a readable service "
                f"account file: {exc}"
            ) from exc
        self.timeout = timeout
        self.client = _FcmClient(
            credentials=credentials,
            project_id=project_id,
            token_timeout=timeout,
            # No transport retries: pyfcm's default adapter retries 502/503 and refused
            # connections up to ten times with backoff, inside one attempt.
            adapter=HTTPAdapter(max_retries=0),
        )
        # pyfcm builds the endpoint from a fixed Google host and caches it here; setting it
        # lets an emulator or a proxy stand in, and uses the configured project id.
        self.client._fcm_end_point = (
            f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        )

    def send(self, message: OutboundMessage) -> SendResult:
        tokens = [message.to] if isinstance(message.to, str) else list(dict.fromkeys(message.to))
        if not tokens:
            return SendResult(Outcome.PERMANENT, error="no device token")
        data = _data_payload(message)
        results: list[SendResult] = []
        for token in tokens:
            result = self._send_one(token, message, data)
            results.append(result)
            if result.status_code is None:
                # No answer from FCM (timeout, refused, no OAuth token): the next token would
                # meet the same failure, after waiting out the same timeout.
                break
        return _aggregate(results)

    def _send_one(self, token: str, message: OutboundMessage, data: dict[str, str]) -> SendResult:
        try:
            payload = self.client.parse_payload(
                fcm_token=token,
                notification_title=message.content.get("title", ""),
                notification_body=message.content.get("body", ""),
                data_payload=data,
            )
            response = self.client.send_request(payload, self.timeout)
        except InvalidDataError as exc:
            return SendResult(Outcome.PERMANENT, error=f"FCM payload refused by pyfcm: {exc}")
        except (requests.Timeout, requests.ConnectionError) as exc:
            return SendResult(Outcome.TRANSIENT, error=f"FCM unreachable: {_describe(exc)}")
        except google.auth.exceptions.TransportError as exc:
            return SendResult(Outcome.TRANSIENT, error=f"OAuth token endpoint unreachable: {exc}")
        except google.auth.exceptions.RefreshError as exc:
            outcome = Outcome.TRANSIENT if exc.retryable else Outcome.PERMANENT
            return SendResult(outcome, error=f"OAuth token refused: {exc}")
        except requests.RequestException as exc:
            # An invalid URL or scheme in FCM_BASE_URL: retrying cannot help.
            return SendResult(Outcome.PERMANENT, error=f"FCM request failed: {_describe(exc)}")
        try:
            answer = self.client.parse_response(response)
        except (
            AuthenticationError,
            FCMNotRegisteredError,
            FCMSenderIdMismatchError,
            FCMServerError,
            InvalidDataError,
        ):
            # pyfcm's exceptions carry neither the status, the FCM error code nor Retry-After.
            return _refused(token, response)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("name"), str):
            return SendResult(
                Outcome.TRANSIENT,
                status_code=response.status_code,
                error=f"FCM {response.status_code} without a message name",
            )
        return SendResult(Outcome.OK, provider_message_id=answer["name"], status_code=200)


def _data_payload(message: OutboundMessage) -> dict[str, str]:
    """FCM takes only string values in `data`; the trace ids go last so no caller key hides
    them."""
    data = {
        key: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        for key, value in message.data.items()
        if key not in RESERVED_DATA_KEYS and not key.lower().startswith(RESERVED_DATA_PREFIXES)
    }
    data["notification_id"] = message.notification_id
    data["delivery_id"] = str(message.delivery_id)
    return data


def _refused(token: str, response: Any) -> SendResult:
    """A non-2xx answer. The token is reported dead only when FCM's body says so about the
    token: a bare 404 from a misrouted proxy must not deactivate every device."""
    status = int(response.status_code)
    try:
        error = response.json().get("error", {})
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {}
    details = [d for d in error.get("details", []) if isinstance(d, dict)]
    code = next((d["errorCode"] for d in details if "errorCode" in d), error.get("status", ""))
    text = f"FCM {status} {code}: {error.get('message') or response.text[:200]}".strip()
    dead = status == 404 and code == "UNREGISTERED"
    if status == 400 and code == "INVALID_ARGUMENT":
        dead = any(
            v.get("field") == "message.token"
            for d in details
            for v in d.get("fieldViolations", [])
            if isinstance(v, dict)
        )
    outcome = classify_http_status(status)
    if outcome is Outcome.OK:
        # pyfcm refuses a 200 with an empty body: nothing says the message was accepted.
        outcome = Outcome.TRANSIENT
    return SendResult(
        outcome,
        status_code=status,
        error=text,
        retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        invalid_tokens=(token,) if dead else (),
    )


def _aggregate(results: list[SendResult]) -> SendResult:
    """One result for the recipient: sent if any device took it; otherwise retry if any
    failure was transient; otherwise permanent."""
    invalid = tuple(t for r in results for t in r.invalid_tokens)
    accepted = [r.provider_message_id for r in results if r.ok]
    if accepted:
        return SendResult(
            Outcome.OK,
            provider_message_id=",".join(accepted),
            status_code=200,
            invalid_tokens=invalid,
        )
    transient = [r for r in results if r.outcome is Outcome.TRANSIENT]
    failures = transient or results
    waits = [r.retry_after for r in transient if r.retry_after is not None]
    return SendResult(
        Outcome.TRANSIENT if transient else Outcome.PERMANENT,
        status_code=failures[0].status_code,
        error="; ".join(dict.fromkeys(r.error for r in failures)),
        retry_after=max(waits) if waits else None,
        invalid_tokens=invalid,
    )


def _describe(exc: Exception) -> str:
    return f"{exc.__class__.__name__}: {exc}"
