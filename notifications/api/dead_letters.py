"""Dead-letter queue endpoints: list with filters, replay or discard one, replay in bulk by
filter, and the open count per channel for alerting. A replay whose address is suppressed
says so (409, or per item) instead of sending a delivery the worker would only skip."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.http import Http404
from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications.api import serializers as s
from notifications.api.common import request_owner, validated
from notifications.api.errors import error_body
from notifications.api.idempotent import idempotent
from notifications.api.views import ERRORS
from notifications.models import Suppression
from workers import dead_letters
from workers.models import DeadLetter

LIST_LIMIT = 500


def _filter(params: Any) -> dead_letters.DeadLetterFilter:
    return _where(validated(s.DeadLetterFilterSerializer, params))


def _where(values: dict[str, Any]) -> dead_letters.DeadLetterFilter:
    now = timezone.now()
    status = values.get("status", "open")
    return dead_letters.DeadLetterFilter(
        channel=values.get("channel"),
        error=values.get("error"),
        older_than=now - timedelta(seconds=values["older_than"])
        if "older_than" in values
        else None,
        newer_than=now - timedelta(seconds=values["newer_than"])
        if "newer_than" in values
        else None,
        status=None if status == "any" else status,
    )


def _letter(request: Request, dead_letter_id: int) -> DeadLetter:
    where = dead_letters.DeadLetterFilter(status=None)
    letter = (
        dead_letters.dead_letters_list(owner=request_owner(request), where=where)
        .filter(pk=dead_letter_id)
        .first()
    )
    if letter is None:
        raise Http404
    return letter


class DeadLetterListView(APIView):
    @extend_schema(
        operation_id="dead_letters_list",
        parameters=[s.DeadLetterFilterSerializer],
        responses={200: s.DeadLetterSerializer(many=True), **ERRORS},
        description=f"Newest first, at most {LIST_LIMIT}.",
    )
    def get(self, request: Request) -> Response:
        letters = dead_letters.dead_letters_list(
            owner=request_owner(request), where=_filter(request.query_params)
        )[:LIST_LIMIT]
        return Response(s.DeadLetterSerializer(letters, many=True).data)


def _suppression(suppression: Suppression | None) -> dict[str, Any] | None:
    return None if suppression is None else dict(s.SuppressionSerializer(suppression).data)


class DeadLetterReplayView(APIView):
    @idempotent
    @extend_schema(
        operation_id="dead_letters_replay",
        request=s.DeadLetterReplaySerializer,
        responses={
            202: s.DeadLetterReplayedSerializer,
            409: OpenApiResponse(
                s.DeadLetterConflictSerializer,
                "Already replayed or discarded ({error: conflict}); or its address is on the "
                "suppression list ({error: suppressed, suppression}), the dead letter stays open",
            ),
            **ERRORS,
        },
        description="Send the delivery again from scratch. When its address is on the "
        "suppression list (for its notification's priority), the answer is a 409 that names "
        'the suppression; `{"lift_suppression": true}` lifts it and replays in one call '
        "(`lifted_suppression` in the answer).",
    )
    def post(self, request: Request, dead_letter_id: int) -> Response:
        letter = _letter(request, dead_letter_id)
        lift = validated(s.DeadLetterReplaySerializer, request.data)["lift_suppression"]
        done = dead_letters.dead_letter_replay(dead_letter=letter, lift_suppression=lift)
        if done is None:
            return _not_open(letter)
        if not done.replayed:
            return _suppressed(done.suppression)
        letter.refresh_from_db()
        body = {
            **s.DeadLetterSerializer(letter).data,
            "lifted_suppression": _suppression(done.suppression),
        }
        return Response(body, status=202)


class DeadLetterDiscardView(APIView):
    @idempotent
    @extend_schema(
        operation_id="dead_letters_discard",
        request=None,
        responses={
            200: s.DeadLetterSerializer,
            409: OpenApiResponse(description="Already replayed or discarded"),
            **ERRORS,
        },
    )
    def post(self, request: Request, dead_letter_id: int) -> Response:
        letter = _letter(request, dead_letter_id)
        if not dead_letters.dead_letters_discard(letters=DeadLetter.objects.filter(pk=letter.pk)):
            return _not_open(letter)
        letter.refresh_from_db()
        return Response(s.DeadLetterSerializer(letter).data)


def _not_open(letter: DeadLetter) -> Response:
    return Response(
        error_body("conflict", f"This dead letter is already {letter.status}."), status=409
    )


def _suppressed(suppression: Suppression | None) -> Response:
    if suppression is None:  # a replay held back always names its suppression
        raise ValueError("a dead letter held back by no suppression")
    body = error_body(
        "suppressed",
        f"Not replayed: the {suppression.channel} address is on the suppression list "
        f"(suppression {suppression.pk}, {suppression.reason}), so the delivery would be "
        f"skipped. Lift it with DELETE /api/v1/suppressions/{suppression.pk}, or replay with "
        '{"lift_suppression": true}.',
    )
    return Response({**body, "suppression": _suppression(suppression)}, status=409)


class DeadLetterBulkReplayView(APIView):
    @idempotent
    @extend_schema(
        operation_id="dead_letters_replay_bulk",
        request=s.DeadLetterBulkReplaySerializer,
        responses={202: s.DeadLetterBulkReplayedSerializer, **ERRORS},
        description="Replay every open dead letter that matches the filter, but those whose "
        "address is on the suppression list, which stay open (`suppressed` in `results`, "
        "with the suppression) unless `lift_suppression` lifts their suppressions too.",
    )
    def post(self, request: Request) -> Response:
        values = validated(s.DeadLetterBulkReplaySerializer, request.data)
        done = dead_letters.dead_letters_replay(
            letters=dead_letters.dead_letters_list(
                owner=request_owner(request), where=_where(values)
            ),
            lift_suppression=values["lift_suppression"],
        )
        results = [
            {
                "id": d.dead_letter_id,
                "status": "replayed",
                "lifted_suppression": _suppression(d.suppression),
            }
            if d.replayed
            else {
                "id": d.dead_letter_id,
                "status": "suppressed",
                "suppression": _suppression(d.suppression),
            }
            for d in done
        ]
        return Response(
            {"count": sum(1 for d in done if d.replayed), "results": results}, status=202
        )


class DeadLetterCountsView(APIView):
    @extend_schema(
        operation_id="dead_letters_counts",
        responses={200: s.DeadLetterCountsSerializer, **ERRORS},
        description="Open dead letters per channel, and the channels over the alert threshold.",
    )
    def get(self, request: Request) -> Response:
        return Response(dead_letters.dead_letter_counts(owner=request_owner(request)))
