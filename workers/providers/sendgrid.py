"""Email through SendGrid's v3 Mail Send API with the official SDK: one request per message,
an explicit timeout, and the HTTP status classified into ok, transient or permanent."""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import time
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import (
    Content,
    CustomArg,
    From,
    Header,
    Mail,
    Personalization,
    Substitution,
    To,
)

from notifications.models import ProviderEventKind, SuppressionReason
from workers.providers.base import (
    HookRefused,
    OutboundMessage,
    Outcome,
    ProviderEventIn,
    SendResult,
)
from workers.retry import classify_http_status, retry_after_seconds

# SendGrid's own limits: personalizations per request, and bytes of substitutions in one.
MAX_PERSONALIZATIONS = 1000
MAX_SUBSTITUTION_BYTES = 10_000
# Placeholders in the shared content that each personalization fills with its own text.
BODY_TAG = "-clarion-body-"
HTML_TAG = "-clarion-html-"


class SendGridProvider:
    name = "sendgrid"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        from_email: str,
        timeout: float,
        max_batch: int = MAX_PERSONALIZATIONS,
    ):
        self.from_email = from_email
        self.max_batch = max(1, min(max_batch, MAX_PERSONALIZATIONS))
        self.timeout = timeout
        self.client = SendGridAPIClient(api_key=api_key, host=base_url.rstrip("/"))
        # python_http_client's Client copies `timeout` into every child client it builds for
        # `client.mail.send` and hands it to urlopen; without it a stalled API blocks forever.
        self.client.client.timeout = timeout

    def send(self, message: OutboundMessage) -> SendResult:
        return self._post(self._mail(message))

    def send_batch(self, messages: list[OutboundMessage]) -> list[SendResult]:
        """Many emails in as few requests as SendGrid takes: one personalization each, its
        subject and text carried by substitutions into shared content. A batch SendGrid
        refuses as a whole (one bad address fails every personalization) is sent one by one,
        so only the bad message fails."""
        results: dict[int, SendResult] = {}
        groups: dict[bool, list[int]] = {}
        for index, message in enumerate(messages):
            if _substitution_bytes(message) > MAX_SUBSTITUTION_BYTES:
                results[index] = self.send(message)
            else:
                groups.setdefault(bool(message.content.get("html")), []).append(index)
        for with_html, indexes in groups.items():
            for start in range(0, len(indexes), self.max_batch):
                chunk = indexes[start : start + self.max_batch]
                if len(chunk) == 1:
                    results[chunk[0]] = self.send(messages[chunk[0]])
                    continue
                result = self._post(self._batch_mail([messages[i] for i in chunk], with_html))
                if result.outcome is Outcome.PERMANENT and result.status_code == 400:
                    for i in chunk:
                        results[i] = self.send(messages[i])
                else:
                    results.update(dict.fromkeys(chunk, result))
        return [results[i] for i in range(len(messages))]

    def _post(self, mail: Mail) -> SendResult:
        try:
            response = self.client.send(mail)
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
        mail.custom_arg = _trace_args(message)
        if message.headers:
            mail.header = [Header(name, value) for name, value in message.headers.items()]
        return mail

    def _batch_mail(self, messages: list[OutboundMessage], with_html: bool) -> Mail:
        mail = Mail()
        mail.from_email = From(self.from_email)
        mail.add_content(Content("text/plain", BODY_TAG))
        if with_html:
            mail.add_content(Content("text/html", HTML_TAG))
        for message in messages:
            personalization = Personalization()
            to = To()
            to.email = str(message.to)
            personalization.add_to(to)
            personalization.subject = message.content.get("subject", "")
            personalization.add_substitution(
                Substitution(BODY_TAG, message.content.get("body", ""))
            )
            if with_html:
                personalization.add_substitution(Substitution(HTML_TAG, message.content["html"]))
            for arg in _trace_args(message):
                personalization.add_custom_arg(arg)
            for name, value in message.headers.items():
                personalization.add_header(Header(name, value))
            # The SDK inserts at the front unless told where: keep the callers' order.
            mail.add_personalization(personalization, index=len(mail.personalizations or []))
        return mail


def _trace_args(message: OutboundMessage) -> list[CustomArg]:
    # SendGrid echoes custom_args in its event webhooks: the way back to our rows.
    return [
        CustomArg("notification_id", str(message.notification_id)),
        CustomArg("delivery_id", str(message.delivery_id)),
    ]


def _substitution_bytes(message: OutboundMessage) -> int:
    body = message.content.get("body", "")
    html = message.content.get("html", "")
    return len(BODY_TAG) + len(body) + (len(HTML_TAG) + len(html) if html else 0)


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


# --- The Event Webhook: what SendGrid says of the messages afterwards -------------------------

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"

# SendGrid's event → ours. Events not named here (processed, deferred, unsubscribes) are
# kept for the record and change nothing.
_EVENT_KIND = {
    "delivered": ProviderEventKind.DELIVERED,
    "bounce": ProviderEventKind.BOUNCED,
    "dropped": ProviderEventKind.FAILED,
    "open": ProviderEventKind.OPENED,
    "click": ProviderEventKind.CLICKED,
    "spamreport": ProviderEventKind.COMPLAINED,
}
# A drop for one of these reasons means SendGrid itself has the address on its bounce list.
_DROPPED_AS_BOUNCED = ("Bounced Address", "Invalid")


def events_verify(
    *, public_key: str, body: bytes, signature: str, timestamp: str, tolerance: float
) -> None:
    """Check a post's ECDSA signature (over the timestamp header and the raw body) with the
    verification key from SendGrid's Mail Settings (base64 DER, as SendGrid shows it), and
    that it was signed within `tolerance` seconds. Raises HookRefused."""
    if not signature or not timestamp:
        raise HookRefused(401, f"{SIGNATURE_HEADER} and {TIMESTAMP_HEADER} are required.")
    try:
        signed_at = int(timestamp)
    except ValueError:
        raise HookRefused(400, f"{TIMESTAMP_HEADER} is not a Unix time.") from None
    if abs(time.time() - signed_at) > tolerance:
        raise HookRefused(400, f"The post was signed {int(time.time() - signed_at)} s ago.")
    try:
        key = load_der_public_key(base64.b64decode(public_key))
        decoded = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error):
        raise HookRefused(401, "The signature is not valid.") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise HookRefused(401, "SENDGRID_WEBHOOK_PUBLIC_KEY is not an ECDSA key.")
    try:
        key.verify(decoded, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise HookRefused(401, "The signature is not valid.") from None


def events_parse(body: bytes) -> list[ProviderEventIn]:
    """The events of one (verified) post. Raises ValueError on a body that is not SendGrid's
    list of events."""
    events = json.loads(body)
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ValueError("expected a JSON array of event objects")
    return [_event(event) for event in events]


def _event(event: dict[str, Any]) -> ProviderEventIn:
    name = str(event.get("event", ""))
    event_id = str(event.get("sg_event_id") or "")
    if not name or not event_id:
        raise ValueError("every event needs `event` and `sg_event_id`")
    kind = _EVENT_KIND.get(name, "ignored")
    suppress = ""
    reason = str(event.get("reason") or event.get("response") or "")
    hard = False
    detail = reason
    if name == "bounce":
        # `type`: "bounce" (the receiving server refused the address) or "blocked" (it
        # refused this message, for now: a soft bounce).
        hard = event.get("type", "bounce") == "bounce"
        detail = f"{'hard' if hard else 'soft'}: {reason}"
    elif name == "dropped":
        hard = any(word in reason for word in _DROPPED_AS_BOUNCED)
    elif name == "spamreport":
        suppress = SuppressionReason.COMPLAINED.value
    elif name == "click":
        detail = str(event.get("url") or "")
    if hard:
        suppress = SuppressionReason.BOUNCED.value
    try:
        delivery_id: int | None = int(event["delivery_id"])
    except (KeyError, TypeError, ValueError):
        delivery_id = None
    try:
        occurred_at = datetime.fromtimestamp(int(event["timestamp"]), tz=UTC)
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        occurred_at = datetime.now(tz=UTC)
    return ProviderEventIn(
        provider="sendgrid",
        event_id=event_id[:255],
        kind=kind,
        raw_status=name[:50],
        occurred_at=occurred_at,
        payload=event,
        detail=detail[:2000],
        suppress=suppress,
        delivery_id=delivery_id,
        # SendGrid's sg_message_id is the X-Message-Id we kept, then a dot and its own suffix.
        message_id=str(event.get("sg_message_id") or "").partition(".")[0][:255],
        address=str(event.get("email") or "")[:254],
    )
