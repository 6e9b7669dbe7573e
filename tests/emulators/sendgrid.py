"""SendGrid's v3 Mail Send API (`POST /v3/mail/send`) as far as Clarion uses it: bearer-key
auth, SendGrid's validation and error bodies, 202 with `X-Message-Id`, plus its fault formats;
and its signed Event Webhook: events about the messages it accepted, posted as SendGrid posts
them, signed with an ECDSA key of its own."""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import urllib.error
import urllib.request
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.emulators.base import Emulator, Request, Response

MAIL_SEND_PATH = "/v3/mail/send"
MAX_PERSONALIZATIONS = 1000
MAX_SUBSTITUTION_BYTES = 10_000
# Loose on purpose: SendGrid rejects what has no local part, "@" or dotted domain.
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _errors(*errors: tuple[str, str | None]) -> dict[str, Any]:
    return {"errors": [{"message": m, "field": f, "help": None} for m, f in errors]}


class SendGridEmulator(Emulator):
    name = "sendgrid"

    def __init__(self) -> None:
        super().__init__()
        self.api_key = f"SG.{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(32)}"
        self.from_email = "clarion@example.com"
        self._accepted_ids: list[str] = []
        # The Event Webhook's signing key; Clarion is given the public half, as SendGrid's
        # Mail Settings show it (base64 of the DER SubjectPublicKeyInfo).
        self.event_key = ec.generate_private_key(ec.SECP256R1())
        self.event_public_key = base64.b64encode(
            self.event_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).decode()

    # --- what Clarion needs to point at it -----------------------------------------------

    def settings_env(self) -> dict[str, str]:
        return {
            "EMAIL_PROVIDER": "sendgrid",
            "SENDGRID_API_KEY": self.api_key,
            "SENDGRID_BASE_URL": self.url,
            "EMAIL_FROM": self.from_email,
            "SENDGRID_WEBHOOK_PUBLIC_KEY": self.event_public_key,
        }

    def settings_overrides(self) -> dict[str, Any]:
        return dict(self.settings_env())

    # --- what it accepted ----------------------------------------------------------------

    def accepted_ids(self) -> list[str]:
        """The X-Message-Id of every message answered with 202, in order."""
        with self._lock:
            return list(self._accepted_ids)

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self._accepted_ids.clear()

    def trace_id(self, request: Request, key: str) -> str:
        """The `custom_args[key]` of the request's first personalization."""
        return (self.trace_ids(request, key) or [""])[0]

    def trace_ids(self, request: Request, key: str) -> list[str]:
        """`custom_args[key]` for each personalization (one email each); a personalization's
        own custom_args win over the message-wide ones, as at SendGrid. [] when not JSON."""
        try:
            body = request.json()
        except ValueError:
            return []
        if not isinstance(body, dict):
            return []
        shared = dict(body.get("custom_args") or {})
        return [
            str({**shared, **(p.get("custom_args") or {})}.get(key, ""))
            for p in body.get("personalizations") or []
            if isinstance(p, dict)
        ]

    # --- the Event Webhook -------------------------------------------------------------

    def events_for(self, request: Request, event: str, **fields: Any) -> list[dict[str, Any]]:
        """One event of this kind per personalization of an accepted request, shaped as
        SendGrid's: its custom args at the top level, `sg_message_id` the request's
        X-Message-Id and a suffix of SendGrid's own."""
        body = request.json()
        message_id = self._message_id_of(request)
        shared = dict(body.get("custom_args") or {})
        return [
            {
                "email": p["to"][0]["email"],
                "timestamp": int(time.time()),
                "event": event,
                "sg_event_id": base64.urlsafe_b64encode(secrets.token_bytes(16)).decode(),
                "sg_message_id": f"{message_id}.recvd-{secrets.token_hex(4)}-{i}",
                "smtp-id": f"<{message_id}@ismtpd0001p1las1.sendgrid.net>",
                **shared,
                **(p.get("custom_args") or {}),
                **fields,
            }
            for i, p in enumerate(body["personalizations"])
        ]

    def _message_id_of(self, request: Request) -> str:
        index = self.accepted_requests().index(request)
        return self.accepted_ids()[index]

    def sign(self, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The headers SendGrid signs a post with: ECDSA P-256 / SHA-256 over the timestamp
        and the body, base64 DER."""
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        signature = self.event_key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {
            "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        }

    def post_events(self, url: str, events: list[dict[str, Any]]) -> tuple[int, bytes]:
        """POST the events to a hook as SendGrid does (a JSON array, signed)."""
        body = json.dumps(events).encode()
        headers = {"Content-Type": "application/json", **self.sign(body)}
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=15) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    # --- faults in SendGrid's formats ----------------------------------------------------

    @staticmethod
    def server_error(status: int = 500) -> Response:
        return Response(status, _errors(("An internal server error occurred.", None)))

    @staticmethod
    def rate_limited(retry_after: int) -> Response:
        return Response(
            429,
            _errors(("too many requests", None)),
            headers={
                "Retry-After": str(retry_after),
                "X-RateLimit-Limit": "600",
                "X-RateLimit-Remaining": "0",
            },
        )

    @staticmethod
    def bad_address() -> Response:
        return Response(
            400,
            _errors(("Does not contain a valid address.", "personalizations.0.to.0.email")),
        )

    # --- the API -------------------------------------------------------------------------

    def answer(self, request: Request) -> Response:
        if request.path != MAIL_SEND_PATH:
            return Response(404, _errors(("resource not found", None)))
        if request.method != "POST":
            return Response(405, _errors(("method not allowed", None)))
        authorization = request.headers.get("authorization", "")
        if not authorization:
            return Response(401, _errors(("authorization required", None)))
        if authorization != f"Bearer {self.api_key}":
            return Response(
                401,
                _errors(("The provided authorization grant is invalid, expired, or revoked", None)),
            )
        try:
            body = json.loads(request.body)
        except ValueError:
            return Response(400, _errors(("Bad Request", None)))
        if not isinstance(body, dict):
            return Response(400, _errors(("Bad Request", None)))
        errors = _validate(body)
        if errors:
            return Response(400, _errors(*errors))
        message_id = secrets.token_urlsafe(16)[:22]
        with self._lock:
            self._accepted_ids.append(message_id)
        return Response(202, b"", headers={"X-Message-Id": message_id})


def _validate(body: dict[str, Any]) -> list[tuple[str, str | None]]:
    """SendGrid's checks on the parts Clarion sends, with SendGrid's messages and fields."""
    errors: list[tuple[str, str | None]] = []
    personalizations = body.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        errors.append(
            (
                "The personalizations field is required and must have at least one "
                "personalization.",
                "personalizations",
            )
        )
        personalizations = []
    if len(personalizations) > MAX_PERSONALIZATIONS:
        errors.append(
            (
                f"The personalizations field must have at most {MAX_PERSONALIZATIONS} items.",
                "personalizations",
            )
        )
    for i, personalization in enumerate(personalizations):
        tos = personalization.get("to") if isinstance(personalization, dict) else None
        if not isinstance(tos, list) or not tos:
            errors.append(
                (
                    "The to array is required for all personalization objects, and must have "
                    "at least one email object with a valid email address.",
                    f"personalizations.{i}.to",
                )
            )
            continue
        substitutions = personalization.get("substitutions") or {}
        size = sum(len(str(k)) + len(str(v)) for k, v in substitutions.items())
        if size > MAX_SUBSTITUTION_BYTES:
            errors.append(
                (
                    f"The total size of substitutions may not exceed {MAX_SUBSTITUTION_BYTES} "
                    "bytes per personalization object.",
                    f"personalizations.{i}.substitutions",
                )
            )
        for j, to in enumerate(tos):
            address = to.get("email") if isinstance(to, dict) else None
            if not isinstance(address, str) or not EMAIL_RE.match(address):
                errors.append(
                    ("Does not contain a valid address.", f"personalizations.{i}.to.{j}.email")
                )

    sender = body.get("from")
    if not isinstance(sender, dict) or not sender.get("email"):
        errors.append(
            (
                "The from object must be provided for every email send. It is an object that "
                "requires the email parameter, but may also contain a name parameter.  "
                'e.g. {"email" : "example@example.com"}  or '
                '{"email" : "example@example.com", "name" : "Example Recipient"}',
                "from.email",
            )
        )
    elif not EMAIL_RE.match(str(sender["email"])):
        errors.append(("The from email does not contain a valid address.", "from.email"))

    every_personalization_has_subject = bool(personalizations) and all(
        isinstance(p, dict) and p.get("subject") for p in personalizations
    )
    subject = body.get("subject")
    if not every_personalization_has_subject and (not isinstance(subject, str) or not subject):
        errors.append(
            (
                "The subject is required. You can get around this requirement if you use a "
                "template with a subject defined or if every personalization has a subject "
                "defined.",
                "subject",
            )
        )

    content = body.get("content")
    if not isinstance(content, list) or not content:
        errors.append(
            (
                "Unless a valid template_id is provided, the content parameter is required. "
                "There must be at least one defined content block. We typically suggest both "
                "text/plain and text/html blocks are included, but only one block is required.",
                "content",
            )
        )
        content = []
    for i, block in enumerate(content):
        if not isinstance(block, dict) or not block.get("type"):
            errors.append(("The content type must be provided.", f"content.{i}.type"))
        elif not isinstance(block.get("value"), str) or not block["value"]:
            errors.append(
                (
                    "The content value must be a string at least one character in length.",
                    f"content.{i}.value",
                )
            )
    types = [block.get("type") for block in content if isinstance(block, dict)]
    if "text/plain" in types and types[0] != "text/plain":
        errors.append(
            (
                "If present, text/plain must be first, followed by text/html, followed by any "
                "other content.",
                "content.0.type",
            )
        )

    custom_args = body.get("custom_args") or {}
    if not isinstance(custom_args, dict):
        given = _json_type(custom_args)
        errors.append((f"Invalid type. Expected: object, given: {given}.", "custom_args"))
        custom_args = {}
    for key, value in custom_args.items():
        if not isinstance(value, str):
            given = _json_type(value)
            errors.append(
                (f"Invalid type. Expected: string, given: {given}.", f"custom_args.{key}")
            )
    return errors


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null" if value is None else "string"
