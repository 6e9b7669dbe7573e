"""The HTTP side of Idempotency-Key, whose protocol is notifications.idempotency: the header,
the replayed answer, the 409 and 422, their OpenAPI description, and `idempotent`, which runs
any API-key write handler under the protocol."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any, cast

from django.db import transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.utils.encoders import JSONEncoder
from rest_framework.views import APIView

from notifications import idempotency
from notifications.api.common import idempotency_header
from notifications.api.errors import Conflict, FieldErrors, IdempotencyMismatch
from notifications.models import Owner

REPLAYED_HEADER = "Idempotent-Replayed"

HEADER = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="Up to 255 characters, one namespace per API key owner, kept "
    "IDEMPOTENCY_TTL_SECONDS (24 h). A retry with the same key and body answers the first "
    "answer's body again, with `Idempotent-Replayed: true` and nothing done twice: with the "
    "first status (a send's replay answers 200 where the first answer was 202). The same key "
    "with another body, or on another endpoint, is a 422; while the first request is still "
    "in flight, a 409. Only a success is kept: after a refusal (4xx) the key is free again.",
)
IN_FLIGHT = "the same Idempotency-Key is still in flight"
KEY_REUSED = OpenApiResponse(
    description="This Idempotency-Key was used with another body or on another endpoint"
)

Handler = Callable[..., Response]


def _replayed_header(statuses: list[int]) -> OpenApiParameter:
    return OpenApiParameter(
        REPLAYED_HEADER,
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        response=statuses,
        enum=["true"],
        description="Sent with an Idempotency-Key replay: the first answer again, nothing "
        "done twice.",
    )


def key_of(request: Request) -> str | None:
    """The request's Idempotency-Key; None without one, 400 for an empty or overlong one."""
    key = idempotency_header(request)
    if key is None:
        return None
    if not key or len(key) > idempotency.MAX_KEY_LENGTH:
        raise FieldErrors({"Idempotency-Key": ["Must be 1 to 255 characters."]})
    return key


def refusal(exc: idempotency.InFlight | idempotency.Mismatch) -> APIException:
    """The API's answer when the key cannot be used now (409) or not for this request (422)."""
    if isinstance(exc, idempotency.Mismatch):
        return IdempotencyMismatch()
    return Conflict()


def replayed(body: Any, status_code: int, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status=status_code, headers={**(headers or {}), REPLAYED_HEADER: "true"})


def _as_json(data: Any) -> Any:
    """The body as the JSON renderer writes it (datetimes, UUIDs, decimals as text), so the
    answer kept in Redis and the database reads back as the one first sent; a NUL character
    (an error echoing a client's field name), which PostgreSQL's JSON cannot hold, becomes
    U+FFFD in both."""
    return _without_nul(json.loads(json.dumps(data, cls=JSONEncoder)))


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    return value


def documented(handler: Handler) -> Handler:
    """Add the header, the 409 and the 422 to the handler's OpenAPI operation. Goes above
    @extend_schema, whose answers it extends (a 409 the handler documents already gets the
    in-flight case added to its description)."""
    kwargs = dict(getattr(handler, "kwargs", {}))
    base = kwargs.get("schema") or api_settings.DEFAULT_SCHEMA_CLASS
    if not inspect.isclass(base):
        base = base.__class__

    class IdempotentSchema(base):  # type: ignore[valid-type,misc]
        def get_override_parameters(self) -> list[Any]:
            parameters = [*super().get_override_parameters(), HEADER]
            if any(getattr(p, "name", "") == REPLAYED_HEADER for p in parameters):
                return parameters  # the handler documents it itself
            responses = super().get_response_serializers()
            successes = [
                code
                for code in (responses if isinstance(responses, dict) else {})
                if isinstance(code, int) and 200 <= code < 300
            ]
            return [*parameters, _replayed_header(successes)]

        def get_response_serializers(self) -> Any:
            responses = super().get_response_serializers()
            if not isinstance(responses, dict):
                return responses
            conflict = responses.get(409)
            if isinstance(conflict, OpenApiResponse):
                conflict = OpenApiResponse(
                    conflict.response, f"{conflict.description}; or {IN_FLIGHT}"
                )
            else:
                conflict = OpenApiResponse(description=IN_FLIGHT[0].upper() + IN_FLIGHT[1:])
            return {**responses, 409: conflict, 422: KEY_REUSED}

    kwargs["schema"] = IdempotentSchema
    handler.kwargs = kwargs  # type: ignore[attr-defined]
    return handler


class _Refused(Exception):
    """A handler's refusal (a 4xx it answered): its transaction, and the key's record in it,
    are rolled back, and the answer is sent as it is."""

    def __init__(self, response: Response, body: Any):
        super().__init__(response.status_code)
        self.response = response
        self.body = body


def idempotent(handler: Handler) -> Handler:
    """Run an API-key write handler (one that answers JSON) at most once per Idempotency-Key:
    without the header it runs as it is; with it, through idempotency.once(), in one
    transaction with the key's database record, which is inserted first, so a twin that Redis
    let through waits for it and is then answered from it. A success is kept and replayed
    with its status and body; any other answer, or an error, gives the key back.
    Goes above @extend_schema (see documented)."""

    @functools.wraps(handler)
    def run(view: APIView, request: Request, *args: Any, **kwargs: Any) -> Response:
        key = key_of(request)
        if key is None:
            return handler(view, request, *args, **kwargs)
        # ApiKeyAuthentication puts the key's owner in request.auth.
        owner_id = cast(Owner, request.auth).pk
        first: list[Response] = []

        def operation(claim: idempotency.Proceed) -> idempotency.Done:
            first.clear()
            try:
                with transaction.atomic():
                    record = idempotency.record_hold(owner_id=owner_id, claim=claim)
                    response = handler(view, request, *args, **kwargs)
                    body = _as_json(response.data)
                    if not idempotency.kept(response.status_code):
                        raise _Refused(response, body)  # the record goes with the rollback
                    idempotency.record_answer(
                        record=record, status_code=response.status_code, body=body
                    )
                    response.data = body  # sent as it is kept
            except _Refused as refused:
                response, body = refused.response, refused.body
            first.append(response)
            return idempotency.Done(response.status_code, body)

        fp = idempotency.fingerprint(
            method=request.method or "", path=request.path, body=request.data
        )
        try:
            done = idempotency.once(owner_id=owner_id, key=key, fp=fp, operation=operation)
        except (idempotency.InFlight, idempotency.Mismatch) as exc:
            raise refusal(exc) from exc
        if done.replayed:
            return replayed(done.body, done.status_code)
        return first[0]

    return documented(run)
