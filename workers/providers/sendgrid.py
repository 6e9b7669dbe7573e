"""Email through SendGrid's v3 Mail Send API with the official SDK: one request per message,
an explicit timeout, and the HTTP status classified into ok, transient or permanent."""

from __future__ import annotations

import http.client
import json
from typing import Any

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Content, CustomArg, From, Mail, To

from workers.providers.base import OutboundMessage, Outcome, SendResult
from workers.retry import classify_http_status, retry_after_seconds


class SendGridProvider:
    name = "sendgrid"

    def __init__(self, *, api_key: str, base_url: str, from_email: str, timeout: float):
        self.from_email = from_email
        self.timeout = timeout
        self.client = SendGridAPIClient(api_key=api_key, host=base_url.rstrip("/"))
        # python_http_client's Client copies `timeout` into every child client it builds for
        # `client.mail.send` and hands it to urlopen; without it a stalled API blocks forever.
        self.client.client.timeout = timeout

    def send(self, message: OutboundMessage) -> SendResult:
        try:
            response = self.client.send(self._mail(message))
        except HTTPError as exc:
            status = int(exc.status_code)
            return SendResult(
                classify_http_status(status),
                status_code=status,
                error=f"SendGrid {status}: {_error_text(exc.body)}",
                retry_after=retry_after_seconds(
                    exc.headers.get("Retry-After") if exc.headers else None
                ),
            )
        except (OSError, http.client.HTTPException) as exc:
            # URLError (connection refused, DNS), socket timeouts and resets are all OSError;
            # HTTPException covers a server that hung up mid-answer. All worth another try.
            return SendResult(Outcome.TRANSIENT, error=f"{exc.__class__.__name__}: {exc}")
        status = int(response.status_code)
        return SendResult(
            classify_http_status(status),
            provider_message_id=response.headers.get("X-Message-Id") or "",
            status_code=status,
        )

    def _mail(self, message: OutboundMessage) -> Mail:
        # Set the address verbatim: the SDK's own parsing turns a string without "@" into a
        # display name and then crashes building the body, instead of letting SendGrid say why.
        to = To()
        to.email = str(message.to)
        mail = Mail(
            from_email=From(self.from_email),
            to_emails=to,
            subject=message.content.get("subject", ""),
        )
        mail.add_content(Content("text/plain", message.content.get("body", "")))
        if message.content.get("html"):
            mail.add_content(Content("text/html", message.content["html"]))
        # SendGrid echoes custom_args in its event webhooks: the way back to our rows.
        mail.custom_arg = [
            CustomArg("notification_id", str(message.notification_id)),
            CustomArg("delivery_id", str(message.delivery_id)),
        ]
        return mail


def _error_text(body: bytes | str | None) -> str:
    """SendGrid's own words: every `errors[].message`, else the raw body."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not body:
        return "(empty response)"
    try:
        payload: Any = json.loads(body)
        messages = [
            f"{error['message']} ({error['field']})" if error.get("field") else error["message"]
            for error in payload["errors"]
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:500]
    return "; ".join(messages) or body[:500]
