"""Dead-letter queue endpoints: list with filters, replay or discard one, replay in bulk by
filter, and the open count per channel for alerting."""

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
from notifications.api.views import ERRORS, _owner, _validated
from workers import dead_letters
from workers.models import DeadLetter

LIST_LIMIT = 500


def _filter(params: Any) -> dead_letters.DeadLetterFilter:
    values = _validated(s.DeadLetterFilterSerializer, params)
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
        dead_letters.dead_letters_list(owner=_owner(request), where=where)
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
            owner=_owner(request), where=_filter(request.query_params)
        )[:LIST_LIMIT]
        return Response(s.DeadLetterSerializer(letters, many=True).data)


class DeadLetterReplayView(APIView):
    @extend_schema(
        operation_id="dead_letters_replay",
        request=None,
        responses={
            202: s.DeadLetterSerializer,
            409: OpenApiResponse(description="Already replayed or discarded"),
            **ERRORS,
        },
    )
    def post(self, request: Request, dead_letter_id: int) -> Response:
        letter = _letter(request, dead_letter_id)
        if not dead_letters.dead_letter_replay(dead_letter=letter):
            return _not_open(letter)
        letter.refresh_from_db()
        return Response(s.DeadLetterSerializer(letter).data, status=202)


class DeadLetterDiscardView(APIView):
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
    from notifications.api.errors import error_body

    return Response(
        error_body("conflict", f"This dead letter is already {letter.status}."), status=409
    )


class DeadLetterBulkReplayView(APIView):
    @extend_schema(
        operation_id="dead_letters_replay_bulk",
        request=s.DeadLetterFilterSerializer,
        responses={202: s.CountSerializer, **ERRORS},
        description="Replay every open dead letter that matches the filter.",
    )
    def post(self, request: Request) -> Response:
        where = _filter(request.data)
        count = dead_letters.dead_letters_replay(
            letters=dead_letters.dead_letters_list(owner=_owner(request), where=where)
        )
        return Response({"count": count}, status=202)


class DeadLetterCountsView(APIView):
    @extend_schema(
        operation_id="dead_letters_counts",
        responses={200: s.DeadLetterCountsSerializer, **ERRORS},
        description="Open dead letters per channel, and the channels over the alert threshold.",
    )
    def get(self, request: Request) -> Response:
        return Response(dead_letters.dead_letter_counts(owner=_owner(request)))
