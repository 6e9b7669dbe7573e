"""Provider hooks: SendGrid's Event Webhook and Twilio's status callbacks and inbound messages.
Not the API: no API key, the provider's signature instead. Each post is verified, stored and
answered at once; a maintenance worker applies it (workers/provider_events.py)."""

from __future__ import annotations

import urllib.parse
from typing import Any

from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications.api import serializers as s
from notifications.api.errors import error_body
from workers.provider_events import provider_events_store
from workers.providers import sendgrid, twilio
from workers.providers.base import HookRefused

HOOK_ERRORS = {
    400: OpenApiResponse(description="Stale signature, or a body that is not the provider's"),
    401: OpenApiResponse(description="Unsigned, badly signed, or the hook is not configured"),
}
# An empty TwiML answer: Twilio sends no automatic reply to an inbound message.
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def _refused(exc: HookRefused) -> Response:
    code = "unauthenticated" if exc.status == 401 else "bad_request"
    return Response(error_body(code, exc.detail), status=exc.status)


class _HookView(APIView):
    # The provider's signature is the authentication; no API key, no per-key throttle.
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    throttle_classes: list[Any] = []


class SendGridHookView(_HookView):
    @extend_schema(
        operation_id="hooks_sendgrid",
        auth=[],
        request={"application/json": {"type": "array", "items": {"type": "object"}}},
        parameters=[
            OpenApiParameter(sendgrid.SIGNATURE_HEADER, OpenApiTypes.STR, OpenApiParameter.HEADER),
            OpenApiParameter(sendgrid.TIMESTAMP_HEADER, OpenApiTypes.STR, OpenApiParameter.HEADER),
        ],
        responses={200: s.HookReceivedSerializer, **HOOK_ERRORS},
        description="SendGrid's signed Event Webhook (SENDGRID_WEBHOOK_PUBLIC_KEY). Delivered, "
        "bounce, dropped, open, click and spamreport events update the delivery named by its "
        "`delivery_id` custom argument; bounces and spam reports suppress the address. A post "
        "repeated (same `sg_event_id`) changes nothing.",
    )
    def post(self, request: Request) -> Response:
        body = request._request.body
        if not settings.SENDGRID_WEBHOOK_PUBLIC_KEY:
            return _refused(HookRefused(401, "SENDGRID_WEBHOOK_PUBLIC_KEY is not set."))
        try:
            sendgrid.events_verify(
                public_key=settings.SENDGRID_WEBHOOK_PUBLIC_KEY,
                body=body,
                signature=request.headers.get(sendgrid.SIGNATURE_HEADER, ""),
                timestamp=request.headers.get(sendgrid.TIMESTAMP_HEADER, ""),
                tolerance=settings.PROVIDER_HOOK_TOLERANCE_SECONDS,
            )
            events = sendgrid.events_parse(body)
        except HookRefused as exc:
            return _refused(exc)
        except (ValueError, UnicodeDecodeError) as exc:
            return Response(error_body("bad_request", f"Not SendGrid events: {exc}"), status=400)
        provider_events_store(events=events)
        return Response({"received": len(events)})


class TwilioHookView(_HookView):
    @extend_schema(
        operation_id="hooks_twilio",
        auth=[],
        request={
            "application/x-www-form-urlencoded": {
                "type": "object",
                "additionalProperties": {"type": "string"},
            }
        },
        parameters=[
            OpenApiParameter(twilio.SIGNATURE_HEADER, OpenApiTypes.STR, OpenApiParameter.HEADER)
        ],
        responses={(200, "text/xml"): OpenApiTypes.STR, **HOOK_ERRORS},
        description="Twilio's status callbacks and inbound messages, signed with "
        "TWILIO_AUTH_TOKEN (`X-Twilio-Signature` over PUBLIC_BASE_URL and the path, or the "
        "request's own URL). delivered, undelivered and failed update the delivery sent as that "
        "MessageSid; an inbound STOP suppresses the number, START lifts it.",
    )
    def post(self, request: Request) -> Response | HttpResponse:
        if not settings.TWILIO_AUTH_TOKEN:
            return _refused(HookRefused(401, "TWILIO_AUTH_TOKEN is not set."))
        try:
            params = dict(
                urllib.parse.parse_qsl(
                    request._request.body.decode(), keep_blank_values=True, strict_parsing=False
                )
            )
        except UnicodeDecodeError:
            return Response(error_body("bad_request", "The body is not a form."), status=400)
        url = (
            settings.PUBLIC_BASE_URL + request._request.get_full_path()
            if settings.PUBLIC_BASE_URL
            else request._request.build_absolute_uri()
        )
        try:
            twilio.callback_verify(
                auth_token=settings.TWILIO_AUTH_TOKEN,
                url=url,
                params=params,
                signature=request.headers.get(twilio.SIGNATURE_HEADER, ""),
            )
            event = twilio.callback_parse(params)
        except HookRefused as exc:
            return _refused(exc)
        except ValueError as exc:
            return Response(error_body("bad_request", f"Not a Twilio callback: {exc}"), status=400)
        provider_events_store(events=[event])
        return HttpResponse(EMPTY_TWIML, content_type="text/xml")
