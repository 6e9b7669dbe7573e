"""The suppression list over the API: the addresses not sent to (bounced, complained,
STOPped), and lifting one."""

from __future__ import annotations

from typing import Any

from django.http import Http404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.generics import ListAPIView
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications import suppressions
from notifications.api import serializers as s
from notifications.api.common import request_owner, validated
from notifications.api.views import ERRORS


class SuppressionPagination(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 500


class SuppressionListView(ListAPIView):
    pagination_class = SuppressionPagination
    serializer_class = s.SuppressionSerializer

    @extend_schema(
        operation_id="suppressions_list",
        parameters=[s.SuppressionFilterSerializer],
        responses={200: s.SuppressionSerializer(many=True), **ERRORS},
        description="Suppressed addresses, newest first, by cursor pages. A delivery to one of "
        "them is `skipped` with reason `suppressed` (a `critical` one too, except after a "
        "spam complaint).",
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        filters = validated(s.SuppressionFilterSerializer, request.query_params.dict())
        found = suppressions.suppressions_list(owner=request_owner(request), **filters)
        page = self.paginate_queryset(found) or []
        return self.get_paginated_response(s.SuppressionSerializer(page, many=True).data)


class SuppressionDetailView(APIView):
    @extend_schema(
        operation_id="suppressions_delete",
        responses={204: OpenApiResponse(description="Lifted"), **ERRORS},
        description="Lift a suppression: the address is sent to again.",
    )
    def delete(self, request: Request, suppression_id: int) -> Response:
        suppression = (
            suppressions.suppressions_list(owner=request_owner(request))
            .filter(pk=suppression_id)
            .first()
        )
        if suppression is None:
            raise Http404
        suppressions.suppression_delete(suppression=suppression)
        return Response(status=204)
