"""The served /api/schema/ is a valid OpenAPI document (openapi-spec-validator) that reads well:
one tag per resource, unique operation ids, named enums, and the error body on every error."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from openapi_spec_validator import OpenAPIV30SpecValidator
from rest_framework.test import APIClient

from notifications.api.schema import (
    require_answered_fields,
    share_parameter_enums,
    tag_by_resource,
)

METHODS = {"get", "put", "post", "delete", "patch"}


@pytest.fixture(scope="module")
def served() -> dict[str, Any]:
    answer = APIClient().get("/api/schema/?format=json")
    assert answer.status_code == 200
    document: dict[str, Any] = answer.json()
    return document


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def test_the_served_schema_is_valid_openapi(served: dict[str, Any]) -> None:
    assert served["openapi"] == "3.0.3"
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in OpenAPIV30SpecValidator(served).iter_errors()
    ]
    assert errors == []


def test_the_validator_refuses_a_default_its_own_schema_refuses(served: dict[str, Any]) -> None:
    """What the schema once had (cancel_key: default '' with minLength 1) fails the check."""
    assert (
        "default"
        not in served["components"]["schemas"]["NotificationCreateRequest"]["properties"][
            "cancel_key"
        ]
    )
    broken = {**served, "components": {**served["components"]}}
    schemas = broken["components"]["schemas"] = dict(served["components"]["schemas"])
    request = schemas["NotificationCreateRequest"] = dict(schemas["NotificationCreateRequest"])
    request["properties"] = {
        **request["properties"],
        "cancel_key": {**request["properties"]["cancel_key"], "default": ""},
    }
    messages = [e.message for e in OpenAPIV30SpecValidator(broken).iter_errors()]
    assert messages == ["'' should be non-empty"]


TAGGED = {
    "notifications": [
        "notifications_bulk_create",
        "notifications_cancel",
        "notifications_cancel_by_key",
        "notifications_create",
        "notifications_retrieve",
    ],
    "templates": [
        "templates_create",
        "templates_destroy",
        "templates_list",
        "templates_retrieve",
        "templates_upsert",
    ],
    "recipients": [
        "devices_register",
        "preferences_retrieve",
        "preferences_update",
        "recipients_erase",
        "recipients_retrieve",
        "recipients_token_create",
        "recipients_upsert",
    ],
    "topics": [
        "topics_retrieve",
        "topics_subscribers_add",
        "topics_subscribers_remove",
        "topics_upsert",
    ],
    "inbox": [
        "inbox_archive",
        "inbox_list",
        "inbox_preferences_retrieve",
        "inbox_preferences_update",
        "inbox_read",
        "inbox_read_all",
        "inbox_unread_count",
    ],
    "webhooks": [
        "webhooks_create",
        "webhooks_delete",
        "webhooks_list",
        "webhooks_replay",
        "webhooks_rotate_secret",
    ],
    "suppressions": ["suppressions_delete", "suppressions_list"],
    "dead-letters": [
        "dead_letters_counts",
        "dead_letters_discard",
        "dead_letters_list",
        "dead_letters_replay",
        "dead_letters_replay_bulk",
    ],
    "sandbox": ["sandbox_messages_list"],
    "provider-hooks": ["hooks_sendgrid", "hooks_twilio"],
    "unsubscribe": ["unsubscribe", "unsubscribe_confirm"],
}


def test_every_operation_has_exactly_one_declared_tag(served: dict[str, Any]) -> None:
    declared = [tag["name"] for tag in served["tags"]]
    assert declared == list(TAGGED)
    assert all(tag["description"] for tag in served["tags"])
    found: dict[str, list[str]] = {}
    for _, _, operation in _operations(served):
        [tag] = operation["tags"]
        found.setdefault(tag, []).append(operation["operationId"])
    assert {tag: sorted(ids) for tag, ids in found.items()} == TAGGED


def test_operation_ids_are_unique_and_named(served: dict[str, Any]) -> None:
    ids = [operation["operationId"] for _, _, operation in _operations(served)]
    assert len(ids) == len(set(ids)) == 45
    # drf-spectacular numbers a colliding id (…_2) and derives one from the path
    # (api_v1_…); every id here is given by its view.
    assert [i for i in ids if re.search(r"_\d+$|^api_", i)] == []


def test_enum_components_are_named_for_what_they_are(served: dict[str, Any]) -> None:
    enums = {
        name: schema["enum"]
        for name, schema in served["components"]["schemas"].items()
        if "enum" in schema
    }
    assert enums == {
        "AttemptOutcomeEnum": ["ok", "transient", "permanent"],
        "ChannelEnum": ["email", "sms", "push", "web"],
        "DeadLetterFilterStatusEnum": ["open", "replayed", "discarded", "any"],
        "DeadLetterReplayItemStatusEnum": ["replayed", "suppressed"],
        "DevicePlatformEnum": ["fcm"],
        "EscalationConditionEnum": ["read", "delivered"],
        "FrequencyCapScopeEnum": ["template", "category"],
        "InboxEntryStatusEnum": ["queued", "retrying", "sent", "delivered", "read"],
        "PriorityEnum": ["low", "normal", "high", "critical"],
        "SuppressionChannelEnum": ["email", "sms"],
        "SuppressionReasonEnum": ["bounced", "complained", "stopped"],
        "WebhookEventTypeEnum": [
            "delivery.sent",
            "delivery.delivered",
            "delivery.read",
            "delivery.failed",
            "delivery.bounced",
            "delivery.dead",
            "notification.completed",
        ],
    }


def test_query_parameters_use_the_enum_components(served: dict[str, Any]) -> None:
    schemas = {
        (operation["operationId"], parameter["name"]): parameter["schema"]
        for _, _, operation in _operations(served)
        for parameter in operation.get("parameters", [])
        if "enum" in str(parameter["schema"]) or "Enum" in str(parameter["schema"])
    }
    assert schemas == {
        ("dead_letters_list", "channel"): {"$ref": "#/components/schemas/ChannelEnum"},
        ("dead_letters_list", "status"): {
            "allOf": [{"$ref": "#/components/schemas/DeadLetterFilterStatusEnum"}],
            "default": "open",
        },
        ("suppressions_list", "channel"): {"$ref": "#/components/schemas/SuppressionChannelEnum"},
        ("suppressions_list", "reason"): {"$ref": "#/components/schemas/SuppressionReasonEnum"},
    }


def test_every_error_answer_has_a_body_schema(served: dict[str, Any]) -> None:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    bodies = {
        (operation["operationId"], status): response.get("content")
        for _, _, operation in _operations(served)
        for status, response in operation["responses"].items()
        if status.startswith("4")
    }
    assert len(bodies) > 150
    others = {key: content for key, content in bodies.items() if content != error}
    # The unsubscribe page answers a bad link with a page, not JSON; a dead letter's replay
    # held back by a suppression answers the error body with that suppression.
    assert others == {
        ("dead_letters_replay", "409"): {
            "application/json": {"schema": {"$ref": "#/components/schemas/DeadLetterConflict"}}
        },
        ("unsubscribe", "400"): {"text/html": {"schema": {"type": "string"}}},
        ("unsubscribe_confirm", "400"): {"text/html": {"schema": {"type": "string"}}},
    }
    assert served["components"]["schemas"]["Error"] == {
        "type": "object",
        "description": "The body of every error answer.",
        "properties": {
            "error": {
                "type": "string",
                "description": "A stable code: validation_error, not_found, …",
            },
            "detail": {"type": "string"},
            "fields": {
                "type": "object",
                "additionalProperties": {"type": "array", "items": {"type": "string"}},
                "description": 'Invalid fields and their messages: {"data.order_id": '
                '["Missing."]}.',
            },
        },
        "required": ["detail", "error"],
    }


def test_the_bulk_items_and_the_inline_recipient_are_named_components(
    served: dict[str, Any],
) -> None:
    schemas = served["components"]["schemas"]
    assert schemas["BulkCreateRequest"]["properties"]["notifications"] == {
        "type": "array",
        "items": {"$ref": "#/components/schemas/BulkItemRequest"},
        "maxItems": 1000,
    }
    assert "topic" not in schemas["BulkItemRequest"]["properties"]
    recipient = {
        "oneOf": [
            {"type": "string", "minLength": 1, "maxLength": 255, "description": "A recipient id"},
            {"$ref": "#/components/schemas/InlineRecipientRequest"},
        ]
    }
    assert schemas["BulkItemRequest"]["properties"]["recipient"] == recipient
    assert schemas["NotificationCreateRequest"]["properties"]["recipient"] == {
        **recipient,
        "description": "Give this or `topic`.",
    }
    assert schemas["InlineRecipientRequest"]["required"] == ["id"]
    assert schemas["InlineRecipientRequest"]["additionalProperties"] is False


# --- The hooks on their own -------------------------------------------------------------------


def test_a_path_of_an_undeclared_resource_fails_the_schema() -> None:
    result = {
        "tags": [{"name": "templates", "description": "Templates."}],
        "paths": {
            "/api/v1/templates": {"get": {"operationId": "templates_list"}},
            "/api/v1/widgets/{id}": {"get": {"operationId": "widgets_retrieve"}},
        },
    }
    with pytest.raises(ImproperlyConfigured) as raised:
        tag_by_resource(result)
    assert str(raised.value) == (
        "/api/v1/widgets/{id}: its tag 'widgets' is not in SPECTACULAR_SETTINGS['TAGS'] "
        "(templates); declare it there with a description."
    )


def test_a_parameter_enum_without_a_component_stays_inline() -> None:
    inline = {"type": "string", "enum": ["a", "b"]}
    result = {
        "components": {"schemas": {"ChannelEnum": {"type": "string", "enum": ["sms", "email"]}}},
        "paths": {
            "/x": {
                "get": {
                    "parameters": [
                        {"name": "channel", "schema": {"type": "string", "enum": ["email", "sms"]}},
                        {"name": "other", "schema": dict(inline)},
                        {"name": "free", "schema": {"type": "string"}},
                    ]
                }
            }
        },
    }
    share_parameter_enums(result)
    assert [p["schema"] for p in result["paths"]["/x"]["get"]["parameters"]] == [
        {"$ref": "#/components/schemas/ChannelEnum"},
        inline,
        {"type": "string"},
    ]


def test_answer_fields_are_optional_only_where_an_answer_may_leave_them_out(
    served: dict[str, Any],
) -> None:
    optional = {
        name: [p for p in schema["properties"] if p not in schema.get("required", [])]
        for name, schema in served["components"]["schemas"].items()
        if not name.endswith("Request") and "properties" in schema
    }
    assert {name: fields for name, fields in optional.items() if fields} == {
        "BulkItemResult": ["id", "deliveries", "error"],
        "CancelledDelivery": ["reason"],
        "DeadLetterConflict": ["suppression"],
        "DeadLetterReplayItem": ["lifted_suppression", "suppression"],
        "DeliveryAccepted": ["reason", "scheduled_for", "unless"],
        "Error": ["fields"],
        "NotificationAccepted": ["topic", "recipients_total"],
        "NotificationCancelled": ["children_cancelled"],
        "QuietHours": ["channels"],
    }


def test_an_always_answered_field_the_component_lacks_fails_the_schema() -> None:
    result = {"components": {"schemas": {"Template": {"properties": {"key": {}}}}}}
    with pytest.raises(ImproperlyConfigured) as raised:
        require_answered_fields(result)
    assert str(raised.value) == (
        "ALWAYS_ANSWERED names what the Template component does not have: category, digest, "
        "escalation, frequency_cap_scope, frequency_caps, locale, translations."
    )
