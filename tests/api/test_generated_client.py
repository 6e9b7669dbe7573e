"""A Python client generated from the served schema (openapi-python-client, offline) drives the
core flow against a real API server: template, recipient, a send with an Idempotency-Key and
its replay, the status, preferences and a bulk send. Every answer must parse into the
generated model the schema names for it, and match that schema exactly, which is where a
wrong `required` or `nullable` shows."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import schemathesis

from notifications.models import Delivery, Notification, Recipient, Template
from tests.conftest import BIN, Process
from tests.factories import api_key_for
from tests.project.api_server import http, start_api_server

pytestmark = pytest.mark.django_db(transaction=True)

PACKAGE = "clarion_client"
# No post hooks: the generator would run `ruff` from PATH to tidy the code; the test only
# imports it.
GENERATOR_CONFIG = "post_hooks: []\n"


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[Callable[[bytes], ModuleType]]:
    """Generate the client package from a schema document into tmp_path and import it; the
    package leaves sys.modules and sys.path afterwards."""
    root = tmp_path / "client"

    def generate(schema: bytes) -> ModuleType:
        root.mkdir()
        (root / "openapi.json").write_bytes(schema)
        (root / "config.yaml").write_text(GENERATOR_CONFIG)
        done = subprocess.run(
            [
                str(BIN / "openapi-python-client"),
                "generate",
                "--path",
                str(root / "openapi.json"),
                "--config",
                str(root / "config.yaml"),
                "--meta",
                "none",
                "--output-path",
                str(root / PACKAGE),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        # Any warning means part of the schema was left out of the client.
        assert (done.returncode, done.stderr, done.stdout.strip()) == (
            0,
            "",
            f"Generating {root / PACKAGE}",
        )
        sys.path.insert(0, str(root))
        return importlib.import_module(PACKAGE)

    yield generate
    if str(root) in sys.path:
        sys.path.remove(str(root))
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


class Caller:
    """Calls an operation through the generated client and checks the answer: parsed into the
    model the schema documents for its status, the model giving back the same JSON, no field
    the schema does not name, and the answer valid against the served schema (Schemathesis,
    as in test_schema_fuzz)."""

    def __init__(self, schema: dict[str, Any], package: ModuleType, base: str, token: str):
        self.schema = schemathesis.openapi.from_dict(schema)
        self.operations = {
            operation["operationId"]: (path, method, operation["tags"])
            for path, item in schema["paths"].items()
            for method, operation in item.items()
        }
        self.answers: list[httpx.Response] = []
        self.client = package.AuthenticatedClient(
            base_url=base, token=token, httpx_args={"event_hooks": {"response": [self._keep]}}
        )

    def _keep(self, response: httpx.Response) -> None:
        response.read()
        self.answers.append(response)

    def __call__(
        self, operation_id: str, status: int, model: type, **arguments: Any
    ) -> tuple[Any, Any]:
        """The client's Response and the JSON body."""
        path, method, [tag] = self.operations[operation_id]
        module = importlib.import_module(f"{PACKAGE}.api.{tag.replace('-', '_')}.{operation_id}")
        answer = module.sync_detailed(client=self.client, **arguments)
        body = json.loads(answer.content)
        assert (answer.status_code, type(answer.parsed)) == (status, model), body
        assert _same(answer.parsed.to_dict(), body)
        _no_unknown_fields(answer.parsed)
        self.schema[path][method].validate_response(self.answers[-1])
        return answer, body


def _same(generated: Any, served: Any) -> bool:
    """Equal JSON, with a timestamp equal to the same instant in another ISO form (the client
    writes +00:00 where the server wrote Z)."""
    if isinstance(generated, dict) and isinstance(served, dict):
        return generated.keys() == served.keys() and all(
            _same(generated[k], served[k]) for k in served
        )
    if isinstance(generated, list) and isinstance(served, list):
        return len(generated) == len(served) and all(
            _same(g, s) for g, s in zip(generated, served, strict=True)
        )
    if isinstance(generated, str) and isinstance(served, str) and generated != served:
        try:
            return datetime.fromisoformat(generated) == datetime.fromisoformat(served)
        except ValueError:
            return False
    return bool(generated == served) and type(generated) is type(served)


def _no_unknown_fields(model: Any) -> None:
    """A model with declared fields kept nothing in additional_properties: the schema names
    every field the server sent (free-form objects, such as `data`, declare none)."""
    fields = [a.name for a in getattr(type(model), "__attrs_attrs__", ())]
    if fields == ["additional_properties"] or not fields:
        return
    assert getattr(model, "additional_properties", {}) == {}, type(model).__name__
    for name in fields:
        value = getattr(model, name)
        for item in value if isinstance(value, list) else [value]:
            _no_unknown_fields(item)


def test_a_generated_client_drives_the_core_flow(
    owner: Any,
    spawn: Callable[..., Process],
    tmp_path: Path,
    generated: Callable[[bytes], ModuleType],
) -> None:
    _, base = start_api_server(spawn, tmp_path)
    schema = http("GET", f"{base}/api/schema/?format=json")
    assert schema.status == 200
    package = generated(schema.body)
    models = importlib.import_module(f"{PACKAGE}.models")
    call = Caller(schema.json(), package, base, api_key_for(owner))

    # A template.
    answer, body = call(
        "templates_upsert",
        201,
        models.Template,
        key="order_shipped",
        body=models.TemplateUpdateRequest(
            category="orders",
            content=models.TemplateUpdateRequestContent.from_dict(
                {
                    "email": {"subject": "Order {{ order_id }} shipped", "body": "On its way."},
                    "sms": {"body": "Order {{ order_id }} shipped"},
                }
            ),
        ),
    )
    template = Template.objects.get(owner=owner, key="order_shipped")
    assert {k: v for k, v in body.items() if not k.endswith("_at")} == {
        "key": "order_shipped",
        "category": "orders",
        "locale": "en",
        "content": {
            "email": {"subject": "Order {{ order_id }} shipped", "body": "On its way."},
            "sms": {"body": "Order {{ order_id }} shipped"},
        },
        "translations": {},
        "frequency_caps": {},
        "frequency_cap_scope": "template",
        "escalation": [],
        "digest": {},
    }
    assert (answer.parsed.created_at, answer.parsed.updated_at) == (
        template.created_at,
        template.updated_at,
    )

    # A recipient.
    answer, body = call(
        "recipients_upsert",
        201,
        models.Recipient,
        rid="user-42",
        body=models.RecipientContactRequest(
            email="ada@example.com", phone="+14155550100", locale="en", timezone="Europe/Paris"
        ),
    )
    recipient = Recipient.objects.get(owner=owner, external_id="user-42")
    assert {k: v for k, v in body.items() if not k.endswith("_at")} == {
        "id": "user-42",
        "email": "ada@example.com",
        "phone": "+14155550100",
        "locale": "en",
        "timezone": "Europe/Paris",
    }
    assert (answer.parsed.created_at, answer.parsed.updated_at) == (
        recipient.created_at,
        recipient.updated_at,
    )

    # A send with an Idempotency-Key, then the same again: the original answer, replayed.
    send = models.NotificationCreateRequest(
        recipient="user-42",
        template="order_shipped",
        data=models.NotificationCreateRequestData.from_dict({"order_id": "A-1001"}),
    )
    first, accepted = call(
        "notifications_create",
        202,
        models.NotificationAccepted,
        body=send,
        idempotency_key="order-A-1001",
    )
    notification = Notification.objects.get(owner=owner)
    assert accepted == {
        "id": str(notification.pk),
        "status": "accepted",
        "deliveries": [
            {"channel": "email", "status": "queued"},
            {"channel": "sms", "status": "queued"},
        ],
    }
    assert first.headers["location"] == f"/api/v1/notifications/{notification.pk}"
    assert "idempotent-replayed" not in first.headers
    again, replayed = call(
        "notifications_create",
        200,
        models.NotificationAccepted,
        body=send,
        idempotency_key="order-A-1001",
    )
    assert (replayed, again.content) == (accepted, first.content)
    assert (again.headers["idempotent-replayed"], again.headers["location"]) == (
        "true",
        first.headers["location"],
    )
    assert Notification.objects.filter(owner=owner).count() == 1

    # Its status.
    answer, detail = call(
        "notifications_retrieve",
        200,
        models.NotificationDetail,
        notification_id=str(notification.pk),
    )
    deliveries = {d.channel: d for d in Delivery.objects.filter(notification=notification)}
    assert {k: v for k, v in detail.items() if k not in ("created_at", "deliveries")} == {
        "id": str(notification.pk),
        "status": "in_progress",
        "recipient": "user-42",
        "topic": None,
        "parent": None,
        "recipients_total": None,
        "recipients_done": None,
        "template": "order_shipped",
        "category": "orders",
        "priority": "normal",
        "locale": "en",
        "data": {"order_id": "A-1001"},
        "send_at": None,
    }
    assert answer.parsed.created_at == notification.created_at
    assert detail["deliveries"] == [
        {
            "id": deliveries[channel].pk,
            "channel": channel,
            "status": "queued",
            "reason": None,
            "unless": None,
            "provider": None,
            "provider_message_id": None,
            "attempt_count": 0,
            "last_error": None,
            "next_attempt_at": None,
            "sent_at": None,
            "delivered_at": None,
            "read_at": None,
            "attempts": [],
        }
        for channel in ("email", "sms")
    ]

    # Preferences: read, then SMS off and a category rule.
    _, body = call("preferences_retrieve", 200, models.Preferences, rid="user-42")
    assert body == {
        "channels": {"email": True, "sms": True, "push": True, "web": True},
        "categories": {},
        "quiet_hours": None,
    }
    _, body = call(
        "preferences_update",
        200,
        models.Preferences,
        rid="user-42",
        body=models.PreferencesRequest(
            channels=models.PreferencesRequestChannels.from_dict({"sms": False}),
            categories=models.PreferencesRequestCategories.from_dict(
                {"marketing": {"email": False}}
            ),
        ),
    )
    assert body == {
        "channels": {"email": True, "sms": False, "push": True, "web": True},
        "categories": {"marketing": {"email": False}},
        "quiet_hours": None,
    }

    # A bulk send: SMS now skipped for user-42, a new recipient given inline, and an item
    # missing its template variable refused on its own.
    answer, bulk = call(
        "notifications_bulk_create",
        200,
        models.BulkResult,
        body=models.BulkCreateRequest(
            notifications=[
                models.BulkItemRequest(
                    recipient="user-42",
                    template="order_shipped",
                    data=models.BulkItemRequestData.from_dict({"order_id": "A-1002"}),
                    idempotency_key="order-A-1002",
                ),
                models.BulkItemRequest(
                    recipient=models.InlineRecipientRequest(id="user-43", phone="+14155550101"),
                    template="order_shipped",
                    data=models.BulkItemRequestData.from_dict({"order_id": "A-1003"}),
                    channels=[models.ChannelEnum.SMS],
                ),
                models.BulkItemRequest(recipient="user-42", template="order_shipped"),
            ]
        ),
    )
    ids = {
        n.data["order_id"]: str(n.pk)
        for n in Notification.objects.filter(owner=owner).exclude(pk=notification.pk)
    }
    assert bulk == {
        "accepted": 2,
        "rejected": 1,
        "results": [
            {
                "index": 0,
                "status": 202,
                "id": ids["A-1002"],
                "deliveries": [
                    {"channel": "email", "status": "queued"},
                    {"channel": "sms", "status": "skipped", "reason": "opted_out"},
                ],
            },
            {
                "index": 1,
                "status": 202,
                "id": ids["A-1003"],
                "deliveries": [{"channel": "sms", "status": "queued"}],
            },
            {
                "index": 2,
                "status": 400,
                "error": {
                    "error": "validation_error",
                    "detail": "Invalid request.",
                    "fields": {"data.order_id": ["Missing template variable."]},
                },
            },
        ],
    }
    assert type(answer.parsed.results[2].error) is models.Error
    assert Recipient.objects.get(owner=owner, external_id="user-43").phone == "+14155550101"

    # An error answer parses too.
    _, body = call("notifications_retrieve", 404, models.Error, notification_id=str(uuid.uuid4()))
    assert body == {"error": "not_found", "detail": "Not found."}
