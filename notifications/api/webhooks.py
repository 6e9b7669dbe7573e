"""Status webhook endpoints over the API: register (the secret is shown this once), list,
delete, rotate the secret, replay the dead messages, switch a disabled endpoint back on."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, Q
from django.http import Http404
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications import webhooks
from notifications.api import serializers as s
from notifications.api.common import request_owner, validated
from notifications.api.errors import FieldErrors
from notifications.api.idempotent import idempotent
from notifications.api.views import ERRORS
from notifications.models import Owner, Webhook, WebhookMessageStatus


def _with_counts(owner: Owner) -> Any:
    return webhooks.webhooks_list(owner=owner).annotate(
        pending=Count("messages", filter=Q(messages__status=WebhookMessageStatus.PENDING)),
        dead=Count("messages", filter=Q(messages__status=WebhookMessageStatus.DEAD)),
    )


def _body(webhook: Webhook, *, secret: bool = False) -> dict[str, Any]:
    body = {
        "id": webhook.pk,
        "url": webhook.url,
        "event_types": webhook.event_types,
        "created_at": webhook.created_at,
        "disabled_at": webhook.disabled_at,
        "disabled_reason": webhook.disabled_reason,
        "failing_since": webhook.failing_since,
        "pending": getattr(webhook, "pending", 0),
        "dead": getattr(webhook, "dead", 0),
    }
    if secret:
        body["secret"] = webhook.secret
    return body


def _webhook(request: Request, webhook_id: int) -> Webhook:
    webhook = _with_counts(request_owner(request)).filter(pk=webhook_id).first()
    if webhook is None:
        raise Http404
    return webhook


class WebhookListView(APIView):
    @extend_schema(
        operation_id="webhooks_list",
        responses={200: s.WebhookSerializer(many=True), **ERRORS},
        description="The owner's status webhook endpoints, newest first (secrets not shown).",
    )
    def get(self, request: Request) -> Response:
        return Response([_body(w) for w in _with_counts(request_owner(request))])

    @idempotent
    @extend_schema(
        operation_id="webhooks_create",
        request=s.WebhookCreateSerializer,
        responses={201: s.WebhookWithSecretSerializer, **ERRORS},
        description="Register an endpoint for status events. Each message is a POST signed "
        "the Standard Webhooks way (`webhook-id`, `webhook-timestamp`, `webhook-signature`: "
        "`v1,` and base64 HMAC-SHA256 with the secret's bytes over `id.timestamp.body`). The "
        "secret is in this answer only. Only https:// URLs of public addresses are accepted "
        "(unless WEBHOOK_ALLOW_PRIVATE).",
    )
    def post(self, request: Request) -> Response:
        values = validated(s.WebhookCreateSerializer, request.data)
        try:
            webhook = webhooks.webhook_create(
                owner=request_owner(request), url=values["url"], event_types=values["event_types"]
            )
        except webhooks.UnsafeUrl as exc:
            raise FieldErrors({"url": [str(exc)]}) from exc
        return Response(_body(webhook, secret=True), status=201)


class WebhookDetailView(APIView):
    @extend_schema(
        operation_id="webhooks_delete",
        responses={204: OpenApiResponse(description="Deleted, with its messages"), **ERRORS},
    )
    def delete(self, request: Request, webhook_id: int) -> Response:
        webhooks.webhook_delete(webhook=_webhook(request, webhook_id))
        return Response(status=204)


class WebhookRotateView(APIView):
    @idempotent
    @extend_schema(
        operation_id="webhooks_rotate_secret",
        request=None,
        responses={200: s.WebhookWithSecretSerializer, **ERRORS},
        description="A new secret, shown in this answer only. The previous one keeps signing "
        "(both signatures are sent) for WEBHOOK_SECRET_ROLLOVER_SECONDS.",
    )
    def post(self, request: Request, webhook_id: int) -> Response:
        webhook = webhooks.webhook_rotate_secret(webhook=_webhook(request, webhook_id))
        return Response(_body(webhook, secret=True))


class WebhookReplayView(APIView):
    @idempotent
    @extend_schema(
        operation_id="webhooks_replay",
        request=None,
        responses={202: s.CountSerializer, **ERRORS},
        description="Send the endpoint's dead messages again (same `webhook-id`s); a disabled "
        "endpoint is switched back on.",
    )
    def post(self, request: Request, webhook_id: int) -> Response:
        webhook = _webhook(request, webhook_id)
        if webhook.disabled_at is not None:
            webhooks.webhook_enable(webhook=webhook)
        return Response({"count": webhooks.webhook_messages_replay(webhook=webhook)}, status=202)
