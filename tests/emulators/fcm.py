"""An emulator of FCM HTTP v1 `messages:send` and of Google's OAuth2 token endpoint, with a
generated service account whose `token_uri` points here, so google-auth never calls Google."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.emulators.base import Emulator, Request, Response

GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # google-auth's fixed `aud`
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"


def google_error(
    status: int,
    grpc_status: str,
    message: str,
    *,
    error_code: str = "",
    field: str = "",
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A response in Google's API error format, with FCM's error code when it has one."""
    details = list(details or [])
    if error_code:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": error_code})
    if field:
        details.append(
            {
                "@type": BAD_REQUEST_TYPE,
                "fieldViolations": [{"field": field, "description": message}],
            }
        )
    error: dict[str, Any] = {"code": status, "message": message, "status": grpc_status}
    if details:
        error["details"] = details
    return Response(status, {"error": error}, headers=dict(headers or {}))


def server_error(status: int = 500) -> Response:
    if status == 503:
        return google_error(
            503, "UNAVAILABLE", "The service is currently unavailable.", error_code="UNAVAILABLE"
        )
    return google_error(status, "INTERNAL", "Internal error encountered.", error_code="INTERNAL")


def rate_limited(retry_after: int) -> Response:
    return google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Send requests'.",
        error_code="QUOTA_EXCEEDED",
        headers={"Retry-After": str(retry_after)},
    )


def unregistered() -> Response:
    return google_error(
        404, "NOT_FOUND", "Requested entity was not found.", error_code="UNREGISTERED"
    )


def invalid_token() -> Response:
    """What FCM answers for a token it no longer knows: 404 UNREGISTERED."""
    return unregistered()


def malformed_token() -> Response:
    """What FCM answers for a string that is not a registration token at all."""
    return google_error(
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
        error_code="INVALID_ARGUMENT",
        field="message.token",
    )


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class FcmEmulator(Emulator):
    """Tokens in `unregistered` answer 404 UNREGISTERED; tokens in `registered` are accepted;
    any other token is accepted while `accept_unknown` holds, else refused as malformed.
    `requests()` holds the messages:send requests only; token fetches are in
    `token_requests`, and faults from `fail_next` / `fail_always` never touch them."""

    name = "fcm"

    def __init__(self, project_id: str = "clarion-test") -> None:
        super().__init__()
        self.project_id = project_id
        self.client_email = f"clarion-push@{project_id}.iam.gserviceaccount.com"
        self.private_key_id = secrets.token_hex(20)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.registered: set[str] = set()
        self.unregistered: set[str] = set()
        self.accept_unknown = True
        self.accepted_ids: list[str] = []
        self.token_requests: list[Request] = []
        self.issued_tokens: list[str] = []  # access tokens, in the order they were issued
        self._token_faults: list[Response] = []
        self._access_tokens: set[str] = set()
        self._expired_tokens: set[str] = set()

    # --- the service account a Clarion process is configured with ------------------------

    @property
    def send_path(self) -> str:
        return f"/v1/projects/{self.project_id}/messages:send"

    def service_account_info(self) -> dict[str, str]:
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": pem,
            "client_email": self.client_email,
            "client_id": "100000000000000000001",
            "token_uri": f"{self.url}/token",
        }

    def write_service_account(self, tmp_path: Path) -> Path:
        path = tmp_path / f"fcm-service-account-{self.port}.json"
        path.write_text(json.dumps(self.service_account_info()))
        return path

    def settings_env(self, tmp_path: Path) -> dict[str, str]:
        return {k: str(v) for k, v in self.settings_overrides(tmp_path).items()}

    def settings_overrides(self, tmp_path: Path) -> dict[str, Any]:
        return {
            "PUSH_PROVIDER": "fcm",
            "FCM_SERVICE_ACCOUNT_FILE": str(self.write_service_account(tmp_path)),
            "FCM_PROJECT_ID": self.project_id,
            "FCM_BASE_URL": self.url,
        }

    # --- faults and state ----------------------------------------------------------------

    def fail_token_next(self, *responses: Response) -> None:
        """Answer the next token fetches with these (the token endpoint is healthy otherwise)."""
        with self._lock:
            self._token_faults.extend(responses)

    def expire_access_tokens(self) -> None:
        """Every access token issued so far now answers 401 ACCESS_TOKEN_EXPIRED."""
        with self._lock:
            self._expired_tokens |= self._access_tokens
            self._access_tokens.clear()

    def reset(self) -> None:
        # Issued access tokens stay valid: running workers keep their cached ones.
        super().reset()
        with self._lock:
            self.token_requests.clear()
            self._token_faults.clear()
            self.accepted_ids.clear()

    def trace_id(self, request: Request, key: str) -> str:
        return str(request.json()["message"]["data"][key])

    # --- answering -----------------------------------------------------------------------

    def _respond(self, request: Request) -> Response:
        if request.path == "/token":
            with self._lock:
                self.token_requests.append(request)
                if self._token_faults:
                    return self._token_faults.pop(0)
            return self._issue_token(request)
        return super()._respond(request)

    def _issue_token(self, request: Request) -> Response:
        if request.method != "POST":
            return Response(405, {"error": "invalid_request", "error_description": "POST only"})
        form = request.form()
        if form.get("grant_type") != [JWT_BEARER]:
            return Response(
                400,
                {"error": "unsupported_grant_type", "error_description": "Invalid grant_type."},
            )
        problem = self._assertion_problem((form.get("assertion") or [""])[0])
        if problem:
            return Response(400, {"error": "invalid_grant", "error_description": problem})
        token = f"ya29.emulated-{secrets.token_urlsafe(24)}"
        with self._lock:
            self._access_tokens.add(token)
            self.issued_tokens.append(token)
        return Response(200, {"access_token": token, "expires_in": 3600, "token_type": "Bearer"})

    def _assertion_problem(self, assertion: str) -> str:
        """Why Google would refuse this signed JWT, or "" when it is good."""
        try:
            header_part, claims_part, signature_part = assertion.split(".")
            header = json.loads(_b64decode(header_part))
            claims = json.loads(_b64decode(claims_part))
            self._key.public_key().verify(
                _b64decode(signature_part),
                f"{header_part}.{claims_part}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (ValueError, binascii.Error, InvalidSignature):
            return "Invalid JWT Signature."
        if header.get("alg") != "RS256" or header.get("kid") != self.private_key_id:
            return "Invalid JWT Signature."
        if claims.get("iss") != self.client_email:
            return "Invalid issuer."
        if claims.get("aud") != GOOGLE_TOKEN_AUDIENCE:
            return "Invalid JWT audience."
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            return "Invalid OAuth scope or ID token audience provided."
        if not claims.get("iat", 0) - 300 <= time.time() < claims.get("exp", 0):
            return "Invalid JWT: Token must be a short-lived token and in a reasonable timeframe."
        return ""

    def answer(self, request: Request) -> Response:
        if request.path != self.send_path:
            return google_error(404, "NOT_FOUND", "Requested entity was not found.")
        if request.method != "POST":
            return google_error(405, "INVALID_ARGUMENT", "Method not allowed.")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        with self._lock:
            known = scheme == "Bearer" and token in self._access_tokens
            expired = scheme == "Bearer" and token in self._expired_tokens
        if not known:
            return self._unauthenticated(expired=expired)
        try:
            body = request.json()
        except ValueError:
            return google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict):
            return google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")
        problem = _message_problem(message)
        if problem is not None:
            return problem
        device_token = message.get("token")
        if not isinstance(device_token, str) or not device_token:
            return google_error(
                400,
                "INVALID_ARGUMENT",
                "Exactly one of token, topic or condition must be set.",
                error_code="INVALID_ARGUMENT",
                field="message",
            )
        if device_token in self.unregistered:
            return unregistered()
        if device_token not in self.registered and not self.accept_unknown:
            return malformed_token()
        if body.get("validate_only"):
            return Response(200, {"name": f"projects/{self.project_id}/messages/fake_message_id"})
        name = f"projects/{self.project_id}/messages/0:{time.time_ns() // 1000}%{uuid.uuid4().hex}"
        with self._lock:
            self.accepted_ids.append(name)
        return Response(200, {"name": name})

    def _unauthenticated(self, *, expired: bool) -> Response:
        details = [{"@type": ERROR_INFO_TYPE, "reason": "ACCESS_TOKEN_EXPIRED"}] if expired else []
        return google_error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, "
            "login cookie or other valid authentication credential.",
            details=details,
        )


def _message_problem(message: dict[str, Any]) -> Response | None:
    """FCM's own validation of `data` and `notification`: string values, no reserved keys."""
    data = message.get("data", {})
    if not isinstance(data, dict):
        return google_error(400, "INVALID_ARGUMENT", "Invalid value at 'message.data'.")
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            field = f"message.data[{index}].value"
            return google_error(
                400,
                "INVALID_ARGUMENT",
                f"Invalid value at '{field}' (TYPE_STRING), {json.dumps(value)}",
                field=field,
            )
        if key in ("from", "message_type") or key.lower().startswith(("google", "gcm")):
            return google_error(
                400,
                "INVALID_ARGUMENT",
                f"Invalid data payload key: {key}",
                error_code="INVALID_ARGUMENT",
                field=f"message.data[{index}].key",
            )
    notification = message.get("notification", {})
    if not isinstance(notification, dict) or not all(
        isinstance(v, str) for v in notification.values()
    ):
        return google_error(400, "INVALID_ARGUMENT", "Invalid value at 'message.notification'.")
    return None
