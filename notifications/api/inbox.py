"""The in-app inbox API for a recipient's browser, authenticated by a recipient token (never an
API key), and the API-key endpoint that issues such tokens."""

from __future__ import annotations

import uuid
from typing import Any, cast

from django.conf import settings
from django.http import Http404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.exceptions import NotAuthenticated
from rest_framework.generics import ListAPIView
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications import selectors
from notifications.api import serializers as s
from notifications.api.common import recipient_or_404, request_owner, validated
from notifications.api.idempotent import idempotent
from notifications.api.views import ERRORS, preferences_apply
from notifications.auth import RecipientTokenAuthentication
from notifications.models import Recipient
from notifications.selectors import InboxRecipient
from notifications.tokens import recipient_token_issue
from workers import transitions

INBOX_ERRORS = {
    401: OpenApiResponse(description="Missing, invalid or expired recipient token"),
    404: OpenApiResponse(description="Not in this recipient's inbox"),
}


class RecipientTokenView(APIView):
    @idempotent
    @extend_schema(
        operation_id="recipients_token_create",
        request=None,
        responses={200: s.RecipientTokenSerializer, **ERRORS},
        description="A short-lived signed token for this recipient's browser (WebSocket and "
        "inbox API). It grants access to this recipient's inbox only, until `expires_at`.",
    )
    def post(self, request: Request, rid: str) -> Response:
        recipient = recipient_or_404(request_owner(request), rid)
        issued = recipient_token_issue(owner_id=recipient.owner_id, recipient_id=recipient.pk)
        return Response(
            {
                "token": issued.token,
                "expires_at": issued.expires_at,
                "recipient": recipient.external_id,
            }
        )


class InboxPagination(CursorPagination):
    # Newest first; the primary key orders entries created within one clock tick.
    ordering = ("-created_at", "-pk")
    page_size_query_param = "page_size"
    max_page_size = 200

    def get_page_size(self, request: Request) -> int | None:
        self.page_size = settings.INBOX_PAGE_SIZE
        return super().get_page_size(request)


class _InboxView(APIView):
    authentication_classes = [RecipientTokenAuthentication]
    permission_classes = [IsAuthenticated]


def _recipient(request: Request) -> InboxRecipient:
    # RecipientTokenAuthentication puts the verified recipient in request.auth.
    return cast(InboxRecipient, request.auth)


def _entry_or_404(request: Request, notification_id: str) -> dict[str, Any]:
    try:
        pk = uuid.UUID(notification_id)
    except ValueError:
        raise Http404 from None
    entry = selectors.inbox_entry_get(
        recipient_id=_recipient(request).recipient_id, notification_id=pk
    )
    if entry is None:
        raise Http404
    return selectors.inbox_entry(entry)


class InboxListView(_InboxView, ListAPIView):
    pagination_class = InboxPagination
    serializer_class = s.InboxEntrySerializer

    @extend_schema(
        operation_id="inbox_list",
        parameters=[s.InboxFilterSerializer],
        responses={
            200: s.InboxEntrySerializer(many=True),
            400: OpenApiResponse(description="A filter that is not true or false"),
            401: INBOX_ERRORS[401],
            404: OpenApiResponse(description="A cursor that does not belong to this list"),
        },
        description="The recipient's in-app notifications, newest first, by cursor pages.",
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        # A plain dict: from a QueryDict, DRF reads an absent boolean as false (a checkbox).
        filters = validated(s.InboxFilterSerializer, request.query_params.dict())
        entries = selectors.inbox_list(
            recipient_id=_recipient(request).recipient_id,
            unread=filters["unread"],
            archived=filters["archived"],
        )
        page = self.paginate_queryset(entries) or []
        body = s.InboxEntrySerializer([selectors.inbox_entry(d) for d in page], many=True).data
        return self.get_paginated_response(body)


class InboxUnreadCountView(_InboxView):
    @extend_schema(
        operation_id="inbox_unread_count",
        responses={200: s.CountSerializer, 401: INBOX_ERRORS[401]},
        description="Unread, not archived entries.",
    )
    def get(self, request: Request) -> Response:
        count = selectors.inbox_unread_count(recipient_id=_recipient(request).recipient_id)
        return Response({"count": count})


class InboxReadView(_InboxView):
    @extend_schema(
        operation_id="inbox_read",
        request=None,
        responses={200: s.InboxEntrySerializer, **INBOX_ERRORS},
        description="Mark one entry read (idempotent); answers the entry.",
    )
    def post(self, request: Request, notification_id: str) -> Response:
        entry = _entry_or_404(request, notification_id)
        transitions.inbox_mark_read(
            recipient_id=_recipient(request).recipient_id,
            notification_id=uuid.UUID(entry["id"]),
            source="inbox api",
        )
        return Response(_entry_or_404(request, notification_id))


class InboxReadAllView(_InboxView):
    @extend_schema(
        operation_id="inbox_read_all",
        request=None,
        responses={200: s.InboxReadAllSerializer, 401: INBOX_ERRORS[401]},
        description="Mark every unread entry read, archived ones included.",
    )
    def post(self, request: Request) -> Response:
        count = transitions.inbox_mark_all_read(
            recipient_id=_recipient(request).recipient_id, source="inbox api"
        )
        return Response({"marked_read": count})


class InboxPreferencesView(_InboxView):
    """The recipient's own preferences, as `/recipients/{id}/preferences` gives them to the
    owner's services, for a preferences page in the recipient's browser."""

    def _answer(self, recipient: Recipient, document: dict[str, Any]) -> Response:
        categories = selectors.template_categories(owner_id=recipient.owner_id)
        return Response({**document, "template_categories": categories})

    @extend_schema(
        operation_id="inbox_preferences_retrieve",
        responses={200: s.InboxPreferencesSerializer, 401: INBOX_ERRORS[401]},
        description="The recipient's channel and category opt-outs and quiet hours, and the "
        "categories of the owner's templates.",
    )
    def get(self, request: Request) -> Response:
        recipient = _inbox_recipient_row(request)
        return self._answer(recipient, selectors.preferences_document(recipient=recipient))

    @extend_schema(
        operation_id="inbox_preferences_update",
        request=s.PreferencesSerializer,
        responses={
            200: s.InboxPreferencesSerializer,
            400: OpenApiResponse(description="Invalid preferences document"),
            401: INBOX_ERRORS[401],
        },
        description="Partial update, as `PUT /recipients/{id}/preferences`: channels, "
        "categories and quiet_hours not named keep their value; quiet_hours null removes them.",
    )
    def put(self, request: Request) -> Response:
        recipient = _inbox_recipient_row(request)
        return self._answer(recipient, preferences_apply(recipient, request.data))


def _inbox_recipient_row(request: Request) -> Recipient:
    verified = _recipient(request)
    recipient = Recipient.objects.filter(
        pk=verified.recipient_id, owner_id=verified.owner_id
    ).first()
    if recipient is None:  # erased since the token was issued
        raise NotAuthenticated("This recipient no longer exists.")
    return recipient


class InboxArchiveView(_InboxView):
    @extend_schema(
        operation_id="inbox_archive",
        request=None,
        responses={200: s.InboxEntrySerializer, **INBOX_ERRORS},
        description="Move one entry to the archive (idempotent): it leaves the inbox and the "
        "unread count, and is listed under `?archived=true`. Answers the entry.",
    )
    def post(self, request: Request, notification_id: str) -> Response:
        entry = _entry_or_404(request, notification_id)
        transitions.inbox_archive(
            recipient_id=_recipient(request).recipient_id, notification_id=uuid.UUID(entry["id"])
        )
        return Response(entry)
