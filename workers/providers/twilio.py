"""SMS through Twilio's Messages API with the official SDK: one request per message, an
explicit timeout, and the HTTP status classified into ok, transient or permanent."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import requests
from twilio.base.exceptions import TwilioRestException, TwilioServiceException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from workers.providers.base import OutboundMessage, Outcome, SendResult
from workers.retry import classify_http_status, retry_after_seconds

_SDK_PREFIX = "Unable to create record"


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
            return self._failure(exc.status, f"Twilio {exc.status} (code {exc.code}): {said}")
        except TwilioServiceException as exc:
            detail = f"{exc.title}: {exc.detail}" if exc.detail else exc.title
            return self._failure(exc.status, f"Twilio {exc.status} (code {exc.code}): {detail}")
        except requests.RequestException as exc:
            # Connection refused, read and connect timeouts, resets: all worth another try.
            return SendResult(Outcome.TRANSIENT, error=f"{exc.__class__.__name__}: {exc}")
        status = int(response.status_code)
        return SendResult(
            classify_http_status(status),
            provider_message_id=response.data.sid or "",
            status_code=status,
        )

    def _failure(self, status: int, error: str) -> SendResult:
        status = int(status)
        return SendResult(
            classify_http_status(status),
            status_code=status,
            error=error,
            retry_after=retry_after_seconds(self.http_client.last_headers().get("Retry-After")),
        )
