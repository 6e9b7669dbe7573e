"""SMS through Twilio's Messages API with the official SDK: one request per message, an
explicit timeout, and the HTTP status classified into ok, transient or permanent."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import requests
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from notifications.models import ProviderEventKind, SuppressionReason
from workers.providers.base import (
    HookRefused,
    OutboundMessage,
    Outcome,
    ProviderEventIn,
    SendResult,
)
from workers.retry import classify_http_status, retry_after_seconds

_SDK_PREFIX = "Unable to create record"
# Twilio error codes that mean the number must not be texted again: 21610, the number
# replied STOP to ours (Twilio refuses every message until it replies START).
SUPPRESS_ON_ERROR = {"21610": SuppressionReason.STOPPED.value}


class _HeaderKeepingHttpClient(TwilioHttpClient):
    """TwilioHttpClient that remembers, per thread, the headers of the last response: the
    SDK's TwilioRestException carries no headers, and a 429's Retry-After is in them."""

    def __init__(self, *, timeout: float):
        super().__init__(timeout=timeout)
        self._last = threading.local()

    def request(self, *args: Any, **kwargs: Any) -> Response:
        self._last.headers = {}
        response = super().request(*args, **kwargs)
        self._last.headers = response.headers or {}
        return response

    def last_headers(self) -> Mapping[str, str]:
        return getattr(self._last, "headers", None) or {}


class TwilioProvider:
    name = "twilio"

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        from_number: str,
        base_url: str,
        timeout: float,
    ):
        self.from_number = from_number
        self.timeout = timeout
        self.http_client = _HeaderKeepingHttpClient(timeout=timeout)
        self.client = Client(account_sid, auth_token, http_client=self.http_client)
        # TWILIO_BASE_URL is the one setting that says where Twilio is; TWILIO_EDGE or
        # TWILIO_REGION in the environment would make the SDK rewrite the host behind it.
        self.client.edge = None
        self.client.region = None
        # The v2010 version builds its URLs from its domain's base_url, so this moves both.
        self.client.api.base_url = base_url.rstrip("/")

    def send(self, message: OutboundMessage) -> SendResult:
        try:
            response = self.client.messages.create_with_http_info(
                to=str(message.to),
                from_=self.from_number,
                body=message.content.get("body", ""),
            )
        except TwilioRestException as exc:
            # The SDK prefixes Twilio's own message with its own words; keep only Twilio's.
            said = str(exc.msg).removeprefix(f"{_SDK_PREFIX}: ")
            return self._failure(
                exc.status, f"Twilio {exc.status} (code {exc.code}): {said}", code=exc.code
            )
        except TwilioServiceException as exc:
            detail = f"{exc.title}: {exc.detail}" if exc.detail else exc.title
            return self._failure(
                exc.status, f"Twilio {exc.status} (code {exc.code}): {detail}", code=exc.code
            )
        except requests.RequestException as exc:
            # Connection refused, read and connect timeouts, resets: all worth another try.
            return SendResult(Outcome.TRANSIENT, error=f"{exc.__class__.__name__}: {exc}")
        status = int(response.status_code)
        return SendResult(
            classify_http_status(status),
            provider_message_id=response.data.sid or "",
            status_code=status,
        )

    def _failure(self, status: int, error: str, *, code: object) -> SendResult:
        status = int(status)
        return SendResult(
            classify_http_status(status),
            status_code=status,
            error=error,
            retry_after=retry_after_seconds(self.http_client.last_headers().get("Retry-After")),
            suppress=SUPPRESS_ON_ERROR.get(str(code), ""),
        )


# --- Status callbacks and inbound messages ---------------------------------------------------

SIGNATURE_HEADER = "X-Twilio-Signature"
# Twilio's default opt-out and opt-in keywords (Advanced Opt-Out names them in OptOutType).
STOP_WORDS = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
)
START_WORDS = frozenset({"START", "UNSTOP", "YES", "OPTIN"})
# Carrier errors that say the number cannot receive texts at all: as good as a hard bounce.
# 30005 unknown destination handset, 30006 landline or unreachable carrier.
_NUMBER_DOES_NOT_EXIST = frozenset({"30005", "30006"})
_STATUS_KIND = {
    "delivered": ProviderEventKind.DELIVERED,
    "undelivered": ProviderEventKind.FAILED,
    "failed": ProviderEventKind.FAILED,
    "read": ProviderEventKind.OPENED,
}


def callback_verify(
    *, auth_token: str, url: str, params: Mapping[str, str], signature: str
) -> None:
    """Check `X-Twilio-Signature` with the SDK's validator: HMAC-SHA1, keyed by the auth
    token, over the URL Twilio posted to and the form fields. Raises HookRefused."""
    if not signature:
        raise HookRefused(401, f"{SIGNATURE_HEADER} is required.")
    if not RequestValidator(auth_token).validate(url, dict(params), signature):
        raise HookRefused(401, "The signature is not valid.")


def callback_parse(params: Mapping[str, str]) -> ProviderEventIn:
    """A status callback (MessageStatus) or an inbound message (Body), in our terms. Raises
    ValueError when it is neither."""
    sid = params.get("MessageSid") or params.get("SmsSid") or ""
    if not sid:
        raise ValueError("MessageSid is required")
    now = datetime.now(tz=UTC)
    payload = dict(params)
    status = params.get("MessageStatus") or params.get("SmsStatus") or ""
    if "Body" in params and status in ("", "received", "receiving"):
        word = (params.get("OptOutType") or params.get("Body", "")).strip().upper()
        kind = "stop" if word in STOP_WORDS else "start" if word in START_WORDS else "ignored"
        return ProviderEventIn(
            provider="twilio",
            event_id=f"inbound:{sid}"[:255],
            kind=kind,
            raw_status=(word or "received")[:50],
            occurred_at=now,
            payload=payload,
            suppress=SuppressionReason.STOPPED.value if kind == "stop" else "",
            address=params.get("From", "")[:254],
        )
    if not status:
        raise ValueError("MessageStatus is required")
    code = params.get("ErrorCode") or ""
    kind = _STATUS_KIND.get(status, "ignored")
    hard = code in _NUMBER_DOES_NOT_EXIST
    if kind == ProviderEventKind.FAILED and hard:
        kind = ProviderEventKind.BOUNCED
    detail = f"error {code}" if code else ""
    suppress = SUPPRESS_ON_ERROR.get(code, SuppressionReason.BOUNCED.value if hard else "")
    return ProviderEventIn(
        provider="twilio",
        # Twilio numbers no callback: a status is said once per message (and code).
        event_id=f"{sid}:{status}:{code}"[:255],
        kind=kind,
        raw_status=status[:50],
        occurred_at=now,
        payload=payload,
        detail=detail,
        suppress=suppress,
        message_id=sid[:255],
        address=params.get("To", "")[:254],
    )
