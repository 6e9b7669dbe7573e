"""Thin views of the v1 API: validate with a serializer, call one service, shape the answer."""

from __future__ import annotations

import uuid
from typing import Any

from django.http import Http404
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import APIException, Throttled, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications import accepting, idempotency, selectors, sending, services
from notifications.api import serializers as s
from notifications.api import throttling
from notifications.api.common import recipient_or_404, request_owner, validated
from notifications.api.errors import FieldErrors, describe, error_body
from notifications.api.idempotent import documented, idempotent, key_of, refusal, replayed
from notifications.models import Owner, Recipient
from workers import erasure, transitions

ERRORS = {
    400: OpenApiResponse(description="Invalid body: {error, detail, fields}"),
    401: OpenApiResponse(description="Missing or invalid API key"),
    404: OpenApiResponse(description="Not found for this API key's owner"),
}
# The answer headers of an accepted notification (documented, so clients and the fuzz test
# see them).
ACCEPTED_HEADERS = [
    OpenApiParameter(
        "Location",
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        response=[200, 202],
        required=True,
        description="The notification's status: GET /api/v1/notifications/{id}.",
    ),
    OpenApiParameter(
        "Idempotent-Replayed",
        OpenApiTypes.STR,
        OpenApiParameter.HEADER,
        response=[200],
        required=True,
        enum=["true"],
        description="An Idempotency-Key replay: the original answer, nothing new sent.",
    ),
]


def _notification_request(payload: dict[str, Any]) -> accepting.NotificationRequest:
    return accepting.NotificationRequest(
        recipient=payload.get("recipient", ""),
        template_key=payload["template"],
        data=payload["data"],
        channels=payload.get("channels"),
        priority=payload["priority"],
        send_at=payload["send_at"],
        cancel_key=payload.get("cancel_key", ""),
        topic=payload.get("topic", ""),
        digest=payload.get("digest", True),
        escalation=payload.get("escalation"),
    )


def _api_error(exc: Exception) -> APIException:
    """The API's answer for an error of the accept services."""
    if isinstance(exc, services.ValidationFailed):
        return FieldErrors(exc.fields)
    if isinstance(exc, (idempotency.Mismatch, idempotency.InFlight)):
        return refusal(exc)
    raise exc


class NotificationCreateView(APIView):
    # With an Idempotency-Key, the API key's rate-limit token is taken in the same Redis
    # round trip as the key (throttling.deferred_limit). The key's protocol runs in
    # sending.notification_accept_once rather than through @idempotent: there the record
    # is written in the notification's own statement, not in a transaction of its own.
    rate_limit_with_claim = True

    @documented
    @extend_schema(
        operation_id="notifications_create",
        request=s.NotificationCreateSerializer,
        parameters=ACCEPTED_HEADERS,
        responses={
            202: s.NotificationAcceptedSerializer,
            200: OpenApiResponse(s.NotificationAcceptedSerializer, "Idempotent replay"),
            413: OpenApiResponse(description="Body too large"),
            **ERRORS,
        },
        description="To one recipient (`recipient`), or to every subscriber of a topic "
        "(`topic`, exactly one of the two): a topic notification is one row answered at once, "
        "fanned out in the background into one child notification per subscriber, routed and "
        "rendered as a single send to it would be. An unknown topic is a 400.",
    )
    def post(self, request: Request) -> Response:
        idem_key = key_of(request)
        limit = throttling.deferred_limit(request, self)
        try:
            payload = validated(s.NotificationCreateSerializer, request.data)
        except ValidationError:
            if limit is not None:
                throttling.take_or_throttle(limit)
            raise
        try:
            accepted = sending.notification_accept_once(
                owner=request_owner(request),
                request=_notification_request(payload),
                idempotency_key=idem_key,
                fingerprint=idempotency.fingerprint(
                    method="POST", path=request.path, body=request.data
                ),
                limit=limit,
            )
        except idempotency.RateLimited as exc:
            raise Throttled(wait=max(exc.wait, 0.001)) from exc
        except (services.ValidationFailed, idempotency.InFlight, idempotency.Mismatch) as exc:
            raise _api_error(exc) from exc
        headers = {"Location": f"/api/v1/notifications/{accepted.body['id']}"}
        if accepted.replayed:
            return replayed(accepted.body, accepted.status_code, headers)
        return Response(accepted.body, status=accepted.status_code, headers=headers)


class NotificationBulkView(APIView):
    @idempotent
    @extend_schema(
        operation_id="notifications_bulk_create",
        request=s.BulkCreateSerializer,
        responses={
            200: s.BulkResultSerializer,
            413: OpenApiResponse(description="Too large"),
            **ERRORS,
        },
        description="Up to 1000 notifications; each item is validated and accepted on its "
        "own and may carry its own `idempotency_key`, which works as the header does for a "
        "single send. The `Idempotency-Key` header keys the whole request and its answer.",
    )
    def post(self, request: Request) -> Response:
        items = validated(s.BulkCreateSerializer, request.data)["notifications"]
        results: list[dict[str, Any] | None] = [None] * len(items)
        valid: list[tuple[int, sending.BulkItem]] = []
        for index, item in enumerate(items):
            try:
                payload = validated(s.BulkItemSerializer, item)
            except APIException as exc:
                results[index] = _bulk_refused(index, exc)
                continue
            key = payload.get("idempotency_key")
            fp = idempotency.fingerprint(method="POST", path="bulk-item", body=item) if key else ""
            valid.append(
                (index, sending.BulkItem(_notification_request(payload), key, fingerprint=fp))
            )
        answers = sending.notifications_accept_bulk(
            owner=request_owner(request), items=[item for _, item in valid]
        )
        for (index, _), answer in zip(valid, answers, strict=True):
            if answer.accepted is not None:
                body = answer.accepted.body
                results[index] = {
                    "index": index,
                    "status": answer.accepted.status_code,
                    "id": body["id"],
                    "deliveries": body["deliveries"],
                }
            else:
                results[index] = _bulk_refused(index, _api_error(answer.error or Exception()))
        accepted = sum(1 for r in results if r is not None and r["status"] in (200, 202))
        return Response(
            {"accepted": accepted, "rejected": len(results) - accepted, "results": results}
        )


def _bulk_refused(index: int, exc: APIException) -> dict[str, Any]:
    return {"index": index, "status": exc.status_code, "error": describe(exc)}


class NotificationDetailView(APIView):
    @extend_schema(
        operation_id="notifications_retrieve",
        responses={200: s.NotificationDetailSerializer, **ERRORS},
    )
    def get(self, request: Request, notification_id: str) -> Response:
        try:
            pk = uuid.UUID(notification_id)
        except ValueError:
            raise Http404 from None
        notification = selectors.notification_get(owner=request_owner(request), notification_id=pk)
        if notification is None:
            raise Http404
        return Response(selectors.notification_detail(notification=notification))


class NotificationCancelView(APIView):
    @idempotent
    @extend_schema(
        operation_id="notifications_cancel",
        description="Cancel every delivery of the notification that has not been handed to a "
        "provider yet (scheduled, queued, retrying or deferred, and held by no worker). "
        "Answers which this request cancelled and where the others stand; repeating it "
        "cancels nothing more.",
        request=None,
        responses={200: s.NotificationCancelledSerializer, **ERRORS},
    )
    def post(self, request: Request, notification_id: str) -> Response:
        try:
            pk = uuid.UUID(notification_id)
        except ValueError:
            raise Http404 from None
        owner = request_owner(request)
        notification = selectors.notification_get(owner=owner, notification_id=pk)
        if notification is None:
            raise Http404
        [answer] = transitions.notifications_cancel(
            owner=owner, notifications=[notification], detail="cancelled by request"
        )
        return Response(answer)


class NotificationCancelByKeyView(APIView):
    @idempotent
    @extend_schema(
        operation_id="notifications_cancel_by_key",
        description="Cancel, as POST /notifications/{id}/cancel does, every notification "
        "created with this `cancel_key`, or the one created with this `Idempotency-Key`.",
        request=s.CancelByKeySerializer,
        responses={200: s.CancelByKeyAnswerSerializer, **ERRORS},
    )
    def post(self, request: Request) -> Response:
        payload = validated(s.CancelByKeySerializer, request.data)
        owner = request_owner(request)
        if "cancel_key" in payload:
            found = selectors.notifications_by_key(owner=owner, cancel_key=payload["cancel_key"])
            detail = f"cancel_key {payload['cancel_key']}"
        else:
            found = selectors.notifications_by_key(
                owner=owner, idempotency_key=payload["idempotency_key"]
            )
            detail = "cancelled by Idempotency-Key"
        answers = transitions.notifications_cancel(owner=owner, notifications=found, detail=detail)
        return Response({"notifications": answers})


def _recipient_body(recipient: Recipient) -> dict[str, Any]:
    return dict(s.RecipientSerializer(recipient).data)


class RecipientView(APIView):
    @extend_schema(
        operation_id="recipients_retrieve", responses={200: s.RecipientSerializer, **ERRORS}
    )
    def get(self, request: Request, rid: str) -> Response:
        return Response(_recipient_body(recipient_or_404(request_owner(request), rid)))

    @extend_schema(
        operation_id="recipients_upsert",
        request=s.RecipientContactSerializer,
        responses={200: s.RecipientSerializer, 201: s.RecipientSerializer, **ERRORS},
    )
    def put(self, request: Request, rid: str) -> Response:
        if len(rid) > 255:
            raise FieldErrors({"id": ["A recipient id is at most 255 characters."]})
        if isinstance(request.data, dict):
            unknown = set(request.data) - set(services.RECIPIENT_FIELDS) - {"id"}
            if unknown:
                raise FieldErrors({name: ["Unknown field."] for name in sorted(unknown)})
        contact = validated(s.RecipientContactSerializer, request.data)
        try:
            recipient, created = services.recipient_upsert(
                owner=request_owner(request), external_id=rid, **contact
            )
        except services.ValidationFailed as exc:
            raise FieldErrors(exc.fields) from exc
        return Response(_recipient_body(recipient), status=201 if created else 200)

    @extend_schema(
        operation_id="recipients_erase",
        responses={204: OpenApiResponse(description="Erased"), **ERRORS},
        description="Erase the recipient: contact data, preferences, devices, topic "
        "subscriptions, the suppressions of its addresses, its inbox content and dead letters "
        "go; deliveries not yet handed to a provider are cancelled. Its notifications and "
        "deliveries remain only as anonymous counts (channel, status, template, times), in the "
        "delivery log too. The id may then be used for a new recipient; a second DELETE is a "
        "404. Recorded in the admin log.",
    )
    def delete(self, request: Request, rid: str) -> Response:
        recipient = recipient_or_404(request_owner(request), rid)
        principal = request.user
        actor = f"API key #{getattr(principal, 'api_key_id', '?')}"
        if erasure.recipient_erase(recipient=recipient, actor=actor) is None:
            raise Http404
        return Response(status=204)


class PreferencesView(APIView):
    @extend_schema(
        operation_id="preferences_retrieve", responses={200: s.PreferencesSerializer, **ERRORS}
    )
    def get(self, request: Request, rid: str) -> Response:
        recipient = recipient_or_404(request_owner(request), rid)
        return Response(selectors.preferences_document(recipient=recipient))

    @extend_schema(
        operation_id="preferences_update",
        request=s.PreferencesSerializer,
        responses={200: s.PreferencesSerializer, **ERRORS},
        description="Partial update: channels, categories and quiet_hours not named keep their "
        "value; quiet_hours null removes them.",
    )
    def put(self, request: Request, rid: str) -> Response:
        recipient = recipient_or_404(request_owner(request), rid)
        return Response(preferences_apply(recipient, request.data))


def preferences_apply(recipient: Recipient, document: Any) -> dict[str, Any]:
    """Apply a partial preferences document (400 with the fields for a bad one); returns the
    recipient's whole preferences document after it."""
    change = s.PreferencesSerializer().run_validation(document)
    services.preferences_update(recipient=recipient, change=change)
    return selectors.preferences_document(recipient=recipient)


class DevicesView(APIView):
    @extend_schema(
        operation_id="devices_register",
        description=(
            "Register (or reactivate) a push token: 201 when new, 200 when known. Push goes "
            "through FCM for every platform; an iOS app registers its FCM registration token. "
            'A raw APNs token ("platform": "apns") is refused with 400.'
        ),
        request=s.DeviceCreateSerializer,
        responses={201: s.DeviceSerializer, 200: s.DeviceSerializer, **ERRORS},
    )
    def post(self, request: Request, rid: str) -> Response:
        recipient = recipient_or_404(request_owner(request), rid)
        payload = validated(s.DeviceCreateSerializer, request.data)
        device, created = services.device_register(
            recipient=recipient, platform=payload["platform"], token=payload["token"]
        )
        return Response(s.DeviceSerializer(device).data, status=201 if created else 200)


class TemplateListView(APIView):
    @extend_schema(
        operation_id="templates_list", responses={200: s.TemplateSerializer(many=True), **ERRORS}
    )
    def get(self, request: Request) -> Response:
        templates = selectors.template_list(owner=request_owner(request))
        return Response(s.TemplateSerializer(templates, many=True).data)

    @idempotent
    @extend_schema(
        operation_id="templates_create",
        request=s.TemplateSerializer,
        responses={
            201: s.TemplateSerializer,
            409: OpenApiResponse(description="Key already exists"),
            **ERRORS,
        },
    )
    def post(self, request: Request) -> Response:
        payload = validated(s.TemplateSerializer, request.data)
        owner = request_owner(request)
        if selectors.template_get(owner=owner, key=payload["key"]) is not None:
            return Response(
                error_body("conflict", f"Template '{payload['key']}' already exists; PUT it."),
                status=status.HTTP_409_CONFLICT,
            )
        template = _template_save(owner, payload, create_only=True)
        return Response(s.TemplateSerializer(template).data, status=201)


def _template_save(owner: Owner, payload: dict[str, Any], *, create_only: bool) -> Any:
    try:
        template, _ = services.template_save(
            owner=owner,
            key=payload["key"],
            category=payload.get("category", ""),
            locale=payload.get("locale", "en"),
            content=payload["content"],
            translations=payload.get("translations") or {},
            frequency_caps=payload.get("frequency_caps") or {},
            frequency_cap_scope=payload.get("frequency_cap_scope", "template"),
            escalation=payload.get("escalation") or [],
            digest=payload.get("digest") or {},
            create_only=create_only,
        )
    except services.ValidationFailed as exc:
        raise FieldErrors(exc.fields) from exc
    return template


class TemplateDetailView(APIView):
    @extend_schema(
        operation_id="templates_retrieve", responses={200: s.TemplateSerializer, **ERRORS}
    )
    def get(self, request: Request, key: str) -> Response:
        template = selectors.template_get(owner=request_owner(request), key=key)
        if template is None:
            raise Http404
        return Response(s.TemplateSerializer(template).data)

    @extend_schema(
        operation_id="templates_upsert",
        request=s.TemplateUpdateSerializer,
        responses={200: s.TemplateSerializer, 201: s.TemplateSerializer, **ERRORS},
    )
    def put(self, request: Request, key: str) -> Response:
        payload = validated(s.TemplateUpdateSerializer, request.data)
        if payload.get("key", key) != key:
            raise FieldErrors({"key": ["Does not match the key in the URL."]})
        owner = request_owner(request)
        existed = selectors.template_get(owner=owner, key=key) is not None
        template = _template_save(owner, {**payload, "key": key}, create_only=False)
        return Response(s.TemplateSerializer(template).data, status=200 if existed else 201)

    @extend_schema(operation_id="templates_destroy", responses={204: None, **ERRORS})
    def delete(self, request: Request, key: str) -> Response:
        template = selectors.template_get(owner=request_owner(request), key=key)
        if template is None:
            raise Http404
        services.template_delete(template=template)
        return Response(status=204)


class SandboxMessagesView(APIView):
    @extend_schema(
        operation_id="sandbox_messages_list",
        parameters=[
            OpenApiParameter("notification", OpenApiTypes.UUID, description="Filter"),
            OpenApiParameter("channel", OpenApiTypes.STR, description="Filter"),
        ],
        responses={200: s.SandboxMessageSerializer(many=True), **ERRORS},
        description="What the sandbox providers would have sent (newest first, at most 500).",
    )
    def get(self, request: Request) -> Response:
        from workers.selectors import sandbox_messages_list

        notification = request.query_params.get("notification")
        if notification:
            try:
                uuid.UUID(notification)
            except ValueError:
                raise FieldErrors({"notification": ["Must be a UUID."]}) from None
        messages = sandbox_messages_list(
            owner=request_owner(request),
            notification_id=notification or None,
            channel=request.query_params.get("channel") or None,
        )
        return Response(s.SandboxMessageSerializer(messages, many=True).data)
