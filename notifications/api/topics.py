"""Topic endpoints: create or rename a topic, read it, add and remove its subscribers. A send
to a topic goes through POST /notifications with `topic`."""

from __future__ import annotations

import re

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from notifications import selectors, topics
from notifications.api import serializers as s
from notifications.api.common import request_owner, validated
from notifications.api.errors import FieldErrors
from notifications.api.views import ERRORS
from notifications.models import Topic

TOPIC_KEY_MAX_LENGTH = 100
SLUG = re.compile(r"[-a-zA-Z0-9_]+")


def _topic_or_404(request: Request, key: str) -> Topic:
    topic = selectors.topic_get(owner=request_owner(request), key=key)
    if topic is None:
        raise Http404
    return topic


class TopicView(APIView):
    @extend_schema(operation_id="topics_retrieve", responses={200: s.TopicSerializer, **ERRORS})
    def get(self, request: Request, key: str) -> Response:
        return Response(selectors.topic_detail(topic=_topic_or_404(request, key)))

    @extend_schema(
        operation_id="topics_upsert",
        request=s.TopicUpsertSerializer,
        responses={201: s.TopicSerializer, 200: s.TopicSerializer, **ERRORS},
        description="Create the topic (201) or rename it (200).",
    )
    def put(self, request: Request, key: str) -> Response:
        if len(key) > TOPIC_KEY_MAX_LENGTH or not SLUG.fullmatch(key):
            raise FieldErrors(
                {"key": [f"A slug (letters, digits, - and _), 1 to {TOPIC_KEY_MAX_LENGTH} long."]}
            )
        payload = validated(s.TopicUpsertSerializer, request.data)
        topic, created = topics.topic_upsert(
            owner=request_owner(request), key=key, name=payload["name"]
        )
        return Response(selectors.topic_detail(topic=topic), status=201 if created else 200)


class TopicSubscribersView(APIView):
    @extend_schema(
        operation_id="topics_subscribers_add",
        request=s.TopicSubscribersSerializer,
        responses={200: s.TopicSubscribersAddedSerializer, **ERRORS},
        description="Subscribe 1 to 1000 recipients by id. Adding a subscriber twice adds it "
        "once; ids of no recipient are answered in `unknown`, the others are still added.",
    )
    def post(self, request: Request, key: str) -> Response:
        topic = _topic_or_404(request, key)
        ids = validated(s.TopicSubscribersSerializer, request.data)["recipients"]
        change = topics.topic_subscribers_add(topic=topic, external_ids=ids)
        return Response(
            {
                "added": change.changed,
                "unknown": change.unknown,
                "subscribers_count": topic.subscriptions.count(),
            }
        )

    @extend_schema(
        operation_id="topics_subscribers_remove",
        request=s.TopicSubscribersSerializer,
        responses={200: s.TopicSubscribersRemovedSerializer, **ERRORS},
        description="Unsubscribe 1 to 1000 recipients by id; one not subscribed is no error.",
    )
    def delete(self, request: Request, key: str) -> Response:
        topic = _topic_or_404(request, key)
        ids = validated(s.TopicSubscribersSerializer, request.data)["recipients"]
        change = topics.topic_subscribers_remove(topic=topic, external_ids=ids)
        return Response(
            {
                "removed": change.changed,
                "unknown": change.unknown,
                "subscribers_count": topic.subscriptions.count(),
            }
        )
