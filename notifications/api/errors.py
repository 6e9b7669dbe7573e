"""One JSON error shape for every failure: {"error": code, "detail": text, "fields": {...}}."""

from __future__ import annotations

import logging
from typing import Any

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, JsonResponse
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def error_body(code: str, detail: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": code, "detail": detail}
    if fields:
        body["fields"] = fields
    return body


def _flatten(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested error detail as {"a.b": ["message"]}."""
    if isinstance(detail, dict):
        out: dict[str, list[str]] = {}
        for key, value in detail.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(detail, list) and detail and all(isinstance(d, (dict, list)) for d in detail):
        out = {}
        for index, value in enumerate(detail):
            out.update(_flatten(value, f"{prefix}.{index}" if prefix else str(index)))
        return out
    messages = detail if isinstance(detail, list) else [detail]
    return {prefix or "non_field_errors": [str(m) for m in messages]}


class FieldErrors(exceptions.APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_code = "validation_error"

    def __init__(self, fields: dict[str, list[str]], detail: str = "Invalid request."):
        super().__init__(detail)
        self.fields = fields


class Conflict(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"
    default_detail = "A request with this Idempotency-Key is still being processed."


class IdempotencyMismatch(exceptions.APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "idempotency_key_reused"
    default_detail = (
        "This Idempotency-Key was used with another request: a different body or endpoint."
    )


_CODES = {
    400: "validation_error",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "request_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def describe(exc: exceptions.APIException) -> dict[str, Any]:
    """The JSON body for an API error."""
    if isinstance(exc, FieldErrors):
        return error_body("validation_error", str(exc.detail), exc.fields)
    if isinstance(exc, exceptions.ValidationError):
        return error_body("validation_error", "Invalid request.", _flatten(exc.detail))
    if isinstance(exc, exceptions.ParseError):
        return error_body("malformed_json", str(exc.detail))
    if isinstance(exc, (Conflict, IdempotencyMismatch)):
        return error_body(exc.default_code, str(exc.detail))
    code = _CODES.get(exc.status_code, str(getattr(exc, "default_code", "error")))
    return error_body(code, str(exc.detail))


log = logging.getLogger(__name__)

# Seconds a client is asked to wait when the database does not answer (a restart, a failover).
DATABASE_RETRY_AFTER_SECONDS = 5


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, OperationalError | InterfaceError):
        # The database is down or restarting: nothing was written (the transaction did not
        # commit), so the client may simply try again.
        log.warning("database unavailable: %s", exc)
        return Response(
            error_body("database_unavailable", "The database is not answering; try again."),
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
        )
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(exc, exceptions.APIException):
        response.data = describe(exc)
    elif response is not None and response.status_code == 404:
        response.data = error_body("not_found", "Not found.")
    return response


def not_found(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse(error_body("not_found", "Not found."), status=404)


def server_error(request: HttpRequest) -> JsonResponse:
    return JsonResponse(error_body("server_error", "Internal server error."), status=500)


def bad_request(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse(error_body("bad_request", "Bad request."), status=400)


def forbidden(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return JsonResponse(error_body("forbidden", "Forbidden."), status=403)
