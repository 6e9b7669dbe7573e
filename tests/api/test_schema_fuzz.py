"""Bad input: Schemathesis generates valid and invalid requests for every operation that
/api/schema/ documents and sends them, with a real API key (or recipient token), through the
in-process WSGI application. No answer may be a server error or break the schema."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rest_framework.test import APIClient
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from notifications.models import Delivery, DeliveryStatus, Suppression, Topic, TopicSubscription
from notifications.sending import notification_create
from notifications.suppressions import suppression_add
from notifications.tokens import recipient_token_issue
from notifications.webhooks import webhook_create
from tests.factories import DeviceFactory, RecipientFactory, TemplateFactory, api_key_for
from workers.transitions import dead_letter_create

# Examples per operation and generation mode; `make chaos` raises it (FUZZ_MAX_EXAMPLES).
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "20"))

# A server error, or an answer the schema does not describe (status, content type, headers,
# body): what the API promises to every client.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def _operations() -> list[tuple[str, str, str, bool]]:
    """(operation id, method, path, needs a recipient token) for every documented operation,
    read from the same generator that serves /api/schema/, so a new endpoint is fuzzed too."""
    document = SchemaGenerator().get_schema(request=None, public=True)
    found = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            schemes = {name for s in operation.get("security", []) for name in s}
            found.append(
                (operation["operationId"], method.upper(), path, "RecipientToken" in schemes)
            )
    return sorted(found)


OPERATIONS = _operations()


@pytest.fixture
def wsgi_app() -> Iterator[Any]:
    """The real WSGI application, sharing the test's database transaction: as Django's own
    test client does, connections are not closed between requests."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield get_wsgi_application()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def known(owner: Any) -> dict[str, Any]:
    """Objects that exist for the caller, so that generated requests also reach past the 404s
    of unknown ids into the code that reads and writes real rows."""
    recipient = RecipientFactory(owner=owner, external_id="user-1", phone="+14155550100")
    DeviceFactory(recipient=recipient)
    TemplateFactory(owner=owner, key="order_shipped")
    body = notification_create(
        owner=owner, recipient="user-1", template_key="order_shipped", data={"order_id": "A-1"}
    )
    delivery = Delivery.objects.get(notification_id=body["id"], channel="sms")
    Delivery.objects.filter(pk=delivery.pk).update(status=DeliveryStatus.DEAD)
    delivery.refresh_from_db()
    letter = dead_letter_create(delivery=delivery, provider="twilio", error="21211 bad number")
    suppression_add(
        owner_id=owner.pk, channel="sms", address="+14155550100", reason="stopped", source="twilio"
    )
    topic = Topic.objects.create(owner=owner, key="order_shipped")
    TopicSubscription.objects.create(topic=topic, recipient=recipient)
    return {
        "api_key": api_key_for(owner),
        "recipient_token": recipient_token_issue(
            owner_id=owner.pk, recipient_id=recipient.pk
        ).token,
        "path_parameters": {
            "rid": "user-1",
            "key": "order_shipped",
            "notification_id": body["id"],
            "dead_letter_id": letter.pk,
            "suppression_id": Suppression.objects.get(owner=owner).pk,
            "webhook_id": webhook_create(
                owner=owner, url="https://93.184.216.34/hook", event_types=["delivery.sent"]
            ).pk,
        },
    }


def _fuzz(
    operation_id: str, operation: Any, strategy: st.SearchStrategy[Any], headers: dict[str, str]
) -> tuple[int, list[str]]:
    """Send `MAX_EXAMPLES` generated cases; return how many were sent and each distinct
    failure (the check's title, the request, the answer) once."""
    sent = 0
    failures: dict[str, str] = {}

    @hypothesis_settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        nonlocal sent
        sent += 1
        response = case.call(headers=headers)
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Failure, FailureGroup) as exc:
            found = exc.exceptions if isinstance(exc, FailureGroup) else [exc]
            for failure in found:
                key = f"{operation.label}: {failure.title}"
                failures.setdefault(
                    key,
                    f"{key}\n  {case.method} {case.formatted_path} query={case.query} "
                    f"body={case.body!r:.300}\n  -> {response.status_code} "
                    f"{response.text[:300]}",
                )

    run()
    return sent, sorted(failures.values())


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("operation_id", "method", "path", "recipient_token"),
    OPERATIONS,
    ids=[op[0] for op in OPERATIONS],
)
def test_operation_answers_generated_input_within_its_schema(
    operation_id: str,
    method: str,
    path: str,
    recipient_token: bool,
    wsgi_app: Any,
    known: dict[str, Any],
) -> None:
    schema = schemathesis.openapi.from_wsgi("/api/schema/", wsgi_app)
    operation = schema[path][method]
    credential = known["recipient_token"] if recipient_token else known["api_key"]
    headers = {"Authorization": f"Bearer {credential}"}
    wanted = {
        name: value for name, value in known["path_parameters"].items() if f"{{{name}}}" in path
    }
    strategies = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    ]
    if wanted:
        # The same, on ids that exist: past the lookup into the handler itself.
        strategies += [
            operation.as_strategy(GenerationMode.POSITIVE, path_parameters=wanted),
            operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=wanted),
        ]
    sent = 0
    failures: list[str] = []
    for strategy in strategies:
        count, found = _fuzz(operation_id, operation, strategy, headers)
        sent += count
        failures += found
    print(f"{operation_id}: {sent} requests, {len(failures)} failures")
    assert sent > 0
    assert failures == [], "\n".join(failures)


# --- The failures the fuzzer found, pinned -------------------------------------------------


def _documented_statuses(operation_id: str) -> set[int]:
    document = SchemaGenerator().get_schema(request=None, public=True)
    for item in document["paths"].values():
        for operation in item.values():
            if operation["operationId"] == operation_id:
                return {int(code) for code in operation["responses"]}
    raise KeyError(operation_id)


@pytest.mark.django_db
def test_dead_letter_age_filters_past_the_calendar(api: Any) -> None:
    """An age older than year 1 is a 400 naming the field, not a 500."""
    seconds = 10**12
    answers = [
        api.get("/api/v1/dead-letters", {"older_than": seconds}),
        api.get("/api/v1/dead-letters", {"newer_than": seconds}),
        api.post("/api/v1/dead-letters/replay", {"older_than": seconds}, format="json"),
    ]
    assert [(r.status_code, sorted(r.json().get("fields", {}))) for r in answers] == [
        (400, ["older_than"]),
        (400, ["newer_than"]),
        (400, ["older_than"]),
    ]


@pytest.mark.django_db
def test_inbox_list_documents_its_400_and_404(owner: Any) -> None:
    recipient = RecipientFactory(owner=owner, external_id="user-1")
    token = recipient_token_issue(owner_id=owner.pk, recipient_id=recipient.pk).token
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    answered = {
        client.get("/api/v1/inbox", {"archived": "maybe"}).status_code,
        client.get("/api/v1/inbox", {"cursor": "not-a-cursor"}).status_code,
    }
    assert answered == {400, 404}
    assert answered <= _documented_statuses("inbox_list")
