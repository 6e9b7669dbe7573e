"""The one-click unsubscribe link of an email (RFC 8058): a GET shows a small page that asks to
confirm (mail scanners follow links; they must not unsubscribe anyone), a POST unsubscribes.
No login: the signed token in the URL is the authority."""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse
from django.template.loader import render_to_string
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.views import APIView

from notifications import unsubscribe

# A signed token: base64url and the signer's ":" separators.
_TOKEN = OpenApiParameter(
    "token",
    OpenApiTypes.STR,
    OpenApiParameter.PATH,
    pattern=r"^[A-Za-z0-9_\-:.]+$",
    description="The signed token of an email's unsubscribe link.",
)
_RESPONSES = {
    (200, "text/html"): OpenApiTypes.STR,
    (400, "text/html"): OpenApiTypes.STR,
}


def _page(status: int, title: str, message: str, *, confirm: bool = False) -> HttpResponse:
    body = render_to_string(
        "unsubscribe/page.html", {"title": title, "message": message, "confirm": confirm}
    )
    return HttpResponse(body, status=status, content_type="text/html; charset=utf-8")


def _what(category: str) -> str:
    return f"“{category}” emails" if category else "all emails"


_INVALID = (
    400,
    "Link not valid",
    "This unsubscribe link is not valid (it may be cut short, or its recipient is gone).",
)


class UnsubscribeView(APIView):
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    throttle_classes: list[Any] = []

    @extend_schema(
        operation_id="unsubscribe_confirm",
        auth=[],
        parameters=[_TOKEN],
        responses=_RESPONSES,
        description="The page an email's unsubscribe link opens: it asks to confirm. Nothing "
        "changes on a GET.",
    )
    def get(self, request: Request, token: str) -> HttpResponse:
        target = unsubscribe.unsubscribe_target(token)
        if target is None:
            return _page(*_INVALID)
        return _page(
            200,
            "Unsubscribe",
            f"Stop receiving {_what(target.category)} from this sender?",
            confirm=True,
        )

    @extend_schema(
        operation_id="unsubscribe",
        auth=[],
        parameters=[_TOKEN],
        request={"application/x-www-form-urlencoded": {"type": "object"}},
        responses=_RESPONSES,
        description="One-click unsubscribe (RFC 8058: the body `List-Unsubscribe=One-Click`, or "
        "the confirmation page's form): the recipient stops receiving the link's category by "
        "email. Repeating it changes nothing.",
    )
    def post(self, request: Request, token: str) -> HttpResponse:
        target = unsubscribe.unsubscribe_target(token)
        if target is None:
            return _page(*_INVALID)
        unsubscribe.unsubscribe_apply(target=target)
        return _page(
            200,
            "Unsubscribed",
            f"You will no longer receive {_what(target.category)} from this sender.",
        )
