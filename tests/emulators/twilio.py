"""Twilio's Messages API (`POST /2010-04-01/Accounts/{AccountSid}/Messages.json`) as far as
Clarion uses it: Basic auth, form fields, Twilio's error codes and Message resource, faults;
and its signed status callbacks and inbound messages, posted to a URL as Twilio posts them."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
import secrets
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from tests.emulators.base import Emulator, Request, Response

MESSAGES_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<sid>[^/]+)/Messages\.json$")
E164_RE = re.compile(r"^\+[1-9]\d{1,14}$")
# Twilio's magic test number that always fails with 21211, as with test credentials.
INVALID_TO_NUMBER = "+15005550001"
MAX_BODY_LENGTH = 1600


def twilio_error(status: int, code: int, message: str, **extra: Any) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
        **extra,
    }


class TwilioEmulator(Emulator):
    name = "twilio"

    def __init__(self) -> None:
        super().__init__()
        self.account_sid = "AC" + secrets.token_hex(16)
        self.auth_token = secrets.token_hex(16)
        self.from_number = "+15005550006"
        self._accepted_ids: list[str] = []

    # --- what Clarion needs to point at it -----------------------------------------------

    def settings_env(self) -> dict[str, str]:
        return {
            "SMS_PROVIDER": "twilio",
            "TWILIO_ACCOUNT_SID": self.account_sid,
            "TWILIO_AUTH_TOKEN": self.auth_token,
            "TWILIO_FROM_NUMBER": self.from_number,
            "TWILIO_BASE_URL": self.url,
        }

    def settings_overrides(self) -> dict[str, Any]:
        return dict(self.settings_env())

    # --- what it accepted ----------------------------------------------------------------

    def accepted_ids(self) -> list[str]:
        """The sid of every Message answered with 201, in order."""
        with self._lock:
            return list(self._accepted_ids)

    def reset(self) -> None:
        super().reset()
        with self._lock:
            self._accepted_ids.clear()

    def trace_id(self, request: Request, key: str) -> str:
        """Twilio takes no custom arguments, so a request is traced by its form fields: key
        "to" gives the `To` number, "body" the `Body` text (which carries whatever the
        template put in it). "" when the field is absent."""
        field = {"to": "To", "body": "Body"}.get(key)
        if field is None:
            raise KeyError(f"Twilio requests are traced by 'to' or 'body', not {key!r}")
        return request.form().get(field, [""])[0]

    # --- faults in Twilio's formats ------------------------------------------------------

    @staticmethod
    def server_error(status: int = 500) -> Response:
        return Response(status, twilio_error(status, 20000 + status, HTTPStatus(status).phrase))

    @staticmethod
    def rate_limited(retry_after: int) -> Response:
        return Response(
            429,
            twilio_error(429, 20429, "Too Many Requests"),
            headers={"Retry-After": str(retry_after)},
        )

    @staticmethod
    def bad_number(to: str = INVALID_TO_NUMBER) -> Response:
        return Response(400, _invalid_to(to))

    @staticmethod
    def unsubscribed() -> Response:
        """The number replied STOP to ours: Twilio refuses every message to it."""
        return Response(400, twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"))

    # --- callbacks -----------------------------------------------------------------------

    def sign(self, url: str, params: dict[str, str]) -> str:
        """X-Twilio-Signature as Twilio computes it: base64 HMAC-SHA1, keyed by the auth
        token, over the URL followed by each form field's name and value, sorted by name."""
        data = url + "".join(f"{name}{params[name]}" for name in sorted(params))
        digest = hmac.new(self.auth_token.encode(), data.encode(), hashlib.sha1).digest()
        return base64.b64encode(digest).decode()

    def post(self, url: str, params: dict[str, str]) -> tuple[int, bytes]:
        body = urllib.parse.urlencode(params).encode()
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": self.sign(url, params),
        }
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=15) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def status_params(
        self, sid: str, status: str, *, to: str, error_code: str = ""
    ) -> dict[str, str]:
        """A status callback's form fields, as Twilio sends them."""
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "From": self.from_number,
            "MessageSid": sid,
            "MessageStatus": status,
            "SmsSid": sid,
            "SmsStatus": status,
            "To": to,
        }
        if error_code:
            params["ErrorCode"] = error_code
        return params

    def inbound_params(self, *, from_: str, body: str) -> dict[str, str]:
        """An inbound message's form fields (with Advanced Opt-Out's OptOutType on STOP)."""
        sid = "SM" + secrets.token_hex(16)
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "Body": body,
            "From": from_,
            "MessageSid": sid,
            "NumMedia": "0",
            "SmsMessageSid": sid,
            "SmsSid": sid,
            "SmsStatus": "received",
            "To": self.from_number,
        }
        if body.strip().upper() == "STOP":
            params["OptOutType"] = "STOP"
        return params

    # --- the API -------------------------------------------------------------------------

    def answer(self, request: Request) -> Response:
        if not self._authenticated(request):
            return Response(
                401,
                twilio_error(
                    401, 20003, "Authenticate", detail="Your AccountSid or AuthToken was incorrect."
                ),
                headers={"WWW-Authenticate": 'Basic realm="Twilio API"'},
            )
        match = MESSAGES_PATH.match(request.path)
        if match is None or match["sid"] != self.account_sid:
            return Response(
                404,
                twilio_error(404, 20404, f"The requested resource {request.path} was not found"),
            )
        if request.method != "POST":
            return Response(405, twilio_error(405, 20004, "Method not allowed"))
        form = {name: values[0] for name, values in request.form().items()}
        error = self._validate(form)
        if error is not None:
            return Response(400, error)
        return Response(201, self._message(form))

    def _authenticated(self, request: Request) -> bool:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(decoded, f"{self.account_sid}:{self.auth_token}")

    def _validate(self, form: dict[str, str]) -> dict[str, Any] | None:
        """Twilio's checks on the fields Clarion sends, in Twilio's order, first error wins."""
        to, sender, body = form.get("To", ""), form.get("From", ""), form.get("Body", "")
        if not to:
            return twilio_error(400, 21604, "A 'To' phone number is required.")
        if not sender:
            return twilio_error(400, 21603, "A 'From' phone number is required.")
        if not body:
            return twilio_error(400, 21602, "Message body is required.")
        if len(body) > MAX_BODY_LENGTH:
            return twilio_error(
                400, 21617, "The concatenated message body exceeds the 1600 character limit."
            )
        if not E164_RE.match(to) or to == INVALID_TO_NUMBER:
            return _invalid_to(to)
        if sender != self.from_number:
            return twilio_error(
                400,
                21606,
                f"The From phone number {sender} is not a valid, SMS-capable inbound phone "
                "number or short code for your account.",
            )
        return None

    def _message(self, form: dict[str, str]) -> dict[str, Any]:
        sid = "SM" + secrets.token_hex(16)
        with self._lock:
            self._accepted_ids.append(sid)
        now = datetime.now(UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")
        body = form["Body"]
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json"
        return {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": form["From"],
            "messaging_service_sid": None,
            "num_media": "0",
            "num_segments": str(1 if len(body) <= 160 else math.ceil(len(body) / 153)),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {"media": uri.removesuffix(".json") + "/Media.json"},
            "to": form["To"],
            "uri": uri,
        }


def _invalid_to(to: str) -> dict[str, Any]:
    return twilio_error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
