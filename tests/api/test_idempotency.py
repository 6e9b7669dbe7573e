"""Idempotency-Key on every write endpoint that is not idempotent by nature: a retry answers
the first answer again and does nothing twice; the key on another request is a 422, a key in
flight a 409; past the TTL, or with no key, a request behaves as it always did. The send
endpoints have their own tests (tests/notifications/test_api_notifications.py)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from notifications import idempotency, webhooks
from notifications.models import (
    Delivery,
    DeliveryStatus,
    IdempotencyRecord,
    Notification,
    Owner,
    Template,
    Webhook,
    WebhookMessage,
)
from workers.models import DeadLetter
from workers.transitions import dead_letter_create

pytestmark = pytest.mark.django_db

KEY = "retry-after-timeout-1"
PUBLIC_URL = "https://93.184.216.34/hooks/clarion"
REUSED = {
    "error": "idempotency_key_reused",
    "detail": "This Idempotency-Key was used with another request: a different body or endpoint.",
}
IN_FLIGHT = {
    "error": "conflict",
    "detail": "A request with this Idempotency-Key is still being processed.",
}


@dataclass
class Case:
    """One endpoint: its request, the same key's other request (422), what it changes (a
    replay changes none of it), and what a second run answers (without the key, or past its
    TTL): `again(first, second)` checks it."""

    path: str
    body: dict[str, Any] | None
    status: int
    other: tuple[str, dict[str, Any] | None]
    state: Callable[[], Any]
    again: Callable[[Any, Any], None]


def _post(api: APIClient, path: str, body: dict[str, Any] | None, key: str | None = KEY) -> Any:
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return api.post(path, body, format="json", **headers)


def _notification(api: APIClient, n: int, **extra: Any) -> str:
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": {"id": f"user-{n}", "email": f"u{n}@example.com", "phone": "+14155550100"},
            "template": "order_shipped",
            "data": {"order_id": f"A-{n}"},
            "channels": ["email", "sms"],
            **extra,
        },
        format="json",
    )
    assert response.status_code == 202, response.content
    return str(response.json()["id"])


def _dead_letter(api: APIClient, n: int) -> int:
    """An SMS that died, to an address no suppression holds."""
    notification_id = _notification(api, n)
    sms = Delivery.objects.select_related("notification__recipient").get(
        notification_id=notification_id, channel="sms"
    )
    Delivery.objects.filter(pk=sms.pk).update(status=DeliveryStatus.DEAD, attempts=1)
    sms.refresh_from_db()
    return dead_letter_create(delivery=sms, provider="twilio", error="refused").pk


def _letter_state(letter_id: int) -> tuple[str, str, int]:
    letter = DeadLetter.objects.select_related("delivery").get(pk=letter_id)
    return (letter.status, letter.delivery.status, letter.delivery.events.count())


def _conflict(detail: str) -> Callable[[Any, Any], None]:
    def again(first: Any, second: Any) -> None:
        assert (second.status_code, second.json()) == (
            409,
            {"error": "conflict", "detail": detail},
        )

    return again


def _webhooks_create(api: APIClient, owner: Owner) -> Case:
    def again(first: Any, second: Any) -> None:
        assert second.status_code == 201
        assert second.json()["id"] != first.json()["id"]
        assert second.json()["secret"] != first.json()["secret"]
        assert Webhook.objects.count() == 2  # the receiver would get every event twice

    return Case(
        path="/api/v1/webhooks",
        body={"url": PUBLIC_URL, "event_types": ["delivery.sent"]},
        status=201,
        other=("/api/v1/webhooks", {"url": PUBLIC_URL, "event_types": ["delivery.dead"]}),
        state=lambda: list(Webhook.objects.values_list("pk", "url", "secret")),
        again=again,
    )


def _webhook(owner: Owner, path: str = "") -> Webhook:
    return webhooks.webhook_create(
        owner=owner, url=f"{PUBLIC_URL}{path}", event_types=["delivery.sent"]
    )


def _webhooks_rotate(api: APIClient, owner: Owner) -> Case:
    hook, other = _webhook(owner), _webhook(owner, "/other")

    def again(first: Any, second: Any) -> None:
        assert second.status_code == 200
        # The secret the caller deployed after the first answer is the previous one now.
        assert second.json()["secret"] != first.json()["secret"]
        assert Webhook.objects.get(pk=hook.pk).previous_secret == first.json()["secret"]

    return Case(
        path=f"/api/v1/webhooks/{hook.pk}/rotate-secret",
        body=None,
        status=200,
        other=(f"/api/v1/webhooks/{other.pk}/rotate-secret", None),
        state=lambda: list(Webhook.objects.order_by("pk").values_list("secret", "previous_secret")),
        again=again,
    )


def _webhooks_replay(api: APIClient, owner: Owner) -> Case:
    hook, other = _webhook(owner), _webhook(owner, "/other")
    WebhookMessage.objects.create(
        webhook=hook,
        msg_id="msg_dead_1",
        event_type="delivery.sent",
        event_key="d1",
        payload={},
        status="dead",
        attempts=7,
    )

    def again(first: Any, second: Any) -> None:
        assert (second.status_code, second.json()) == (202, {"count": 0})

    return Case(
        path=f"/api/v1/webhooks/{hook.pk}/replay",
        body=None,
        status=202,
        other=(f"/api/v1/webhooks/{other.pk}/replay", None),
        state=lambda: list(WebhookMessage.objects.values_list("status", "attempts", "created_at")),
        again=again,
    )


def _dead_letter_replay(api: APIClient, owner: Owner) -> Case:
    letter = _dead_letter(api, 1)
    path = f"/api/v1/dead-letters/{letter}/replay"
    return Case(
        path=path,
        body=None,
        status=202,
        other=(path, {"lift_suppression": True}),
        state=lambda: _letter_state(letter),
        again=_conflict("This dead letter is already replayed."),
    )


def _dead_letter_discard(api: APIClient, owner: Owner) -> Case:
    letter = _dead_letter(api, 1)
    return Case(
        path=f"/api/v1/dead-letters/{letter}/discard",
        body=None,
        status=200,
        # The same key on the other endpoint of the same dead letter.
        other=(f"/api/v1/dead-letters/{letter}/replay", None),
        state=lambda: _letter_state(letter),
        again=_conflict("This dead letter is already discarded."),
    )


def _dead_letters_replay_bulk(api: APIClient, owner: Owner) -> Case:
    letters = [_dead_letter(api, n) for n in (1, 2)]

    def again(first: Any, second: Any) -> None:
        assert (second.status_code, second.json()) == (202, {"count": 0, "results": []})

    return Case(
        path="/api/v1/dead-letters/replay",
        body={"channel": "sms"},
        status=202,
        other=("/api/v1/dead-letters/replay", {"channel": "sms", "error": "refused"}),
        state=lambda: [_letter_state(letter) for letter in letters],
        again=again,
    )


def _cancel_state() -> list[tuple[Any, ...]]:
    return list(Delivery.objects.order_by("pk").values_list("pk", "status", "updated_at"))


def _nothing_more_cancelled(first: Any, second: Any) -> None:
    assert second.status_code == 200
    answers = second.json().get("notifications", [second.json()])
    assert [a["cancelled"] for a in answers] == [[]]
    assert [len(a["not_cancelled"]) for a in answers] == [2]


def _notifications_cancel(api: APIClient, owner: Owner) -> Case:
    first, other = _notification(api, 1), _notification(api, 2)
    return Case(
        path=f"/api/v1/notifications/{first}/cancel",
        body=None,
        status=200,
        other=(f"/api/v1/notifications/{other}/cancel", None),
        state=_cancel_state,
        again=_nothing_more_cancelled,
    )


def _notifications_cancel_by_key(api: APIClient, owner: Owner) -> Case:
    _notification(api, 1, cancel_key="order-1")
    _notification(api, 2, cancel_key="order-2")
    return Case(
        path="/api/v1/notifications/cancel",
        body={"cancel_key": "order-1"},
        status=200,
        other=("/api/v1/notifications/cancel", {"cancel_key": "order-2"}),
        state=_cancel_state,
        again=_nothing_more_cancelled,
    )


def _recipients_token(api: APIClient, owner: Owner) -> Case:
    for rid in ("user-1", "user-2"):
        assert api.put(f"/api/v1/recipients/{rid}", {}, format="json").status_code == 201

    def again(first: Any, second: Any) -> None:
        assert second.status_code == 200
        assert second.json()["expires_at"] != first.json()["expires_at"]

    return Case(
        path="/api/v1/recipients/user-1/token",
        body=None,
        status=200,
        other=("/api/v1/recipients/user-2/token", None),
        state=lambda: None,  # a token is signed, not stored
        again=again,
    )


def _templates_create(api: APIClient, owner: Owner) -> Case:
    body = {"key": "welcome", "content": {"sms": {"body": "Welcome, {{ name }}"}}}
    return Case(
        path="/api/v1/templates",
        body=body,
        status=201,
        other=("/api/v1/templates", {**body, "key": "welcome-2"}),
        state=lambda: list(Template.objects.values_list("pk", "key", "updated_at")),
        again=_conflict("Template 'welcome' already exists; PUT it."),
    )


def _notifications_bulk(api: APIClient, owner: Owner) -> Case:
    item = {"recipient": "user-1", "template": "order_shipped", "data": {"order_id": "B-1"}}
    response = api.put("/api/v1/recipients/user-1", {"phone": "+14155550100"}, format="json")
    assert response.status_code == 201

    def again(first: Any, second: Any) -> None:
        assert second.status_code == 200
        assert second.json()["results"][0]["id"] != first.json()["results"][0]["id"]
        assert Notification.objects.count() == 2

    return Case(
        path="/api/v1/notifications/bulk",
        body={"notifications": [item]},
        status=200,
        other=(
            "/api/v1/notifications/bulk",
            {"notifications": [{**item, "data": {"order_id": "B-2"}}]},
        ),
        state=lambda: list(Notification.objects.values_list("pk", flat=True)),
        again=again,
    )


CASES: dict[str, Callable[[APIClient, Owner], Case]] = {
    "webhooks_create": _webhooks_create,
    "webhooks_rotate_secret": _webhooks_rotate,
    "webhooks_replay": _webhooks_replay,
    "dead_letters_replay": _dead_letter_replay,
    "dead_letters_discard": _dead_letter_discard,
    "dead_letters_replay_bulk": _dead_letters_replay_bulk,
    "notifications_cancel": _notifications_cancel,
    "notifications_cancel_by_key": _notifications_cancel_by_key,
    "recipients_token_create": _recipients_token,
    "templates_create": _templates_create,
    "notifications_bulk_create": _notifications_bulk,
}


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest, api: APIClient, owner: Owner, template: Any) -> Case:
    return CASES[request.param](api, owner)


def test_a_retry_answers_the_first_answer_and_does_nothing_again(
    api: APIClient, owner: Owner, case: Case
) -> None:
    first = _post(api, case.path, case.body)
    assert first.status_code == case.status, first.content
    assert "Idempotent-Replayed" not in first
    after = case.state()
    retry = _post(api, case.path, case.body)
    assert (retry.status_code, retry.json()) == (case.status, first.json())
    assert retry["Idempotent-Replayed"] == "true"
    assert case.state() == after
    record = IdempotencyRecord.objects.get()
    assert (record.owner_id, record.key, record.status_code, record.response) == (
        owner.pk,
        KEY,
        case.status,
        first.json(),
    )


def test_the_same_key_on_another_request_is_a_422(api: APIClient, case: Case) -> None:
    first = _post(api, case.path, case.body)
    assert first.status_code == case.status
    after = case.state()
    path, body = case.other
    reused = _post(api, path, body)
    assert (reused.status_code, reused.json()) == (422, REUSED)
    assert case.state() == after


def test_a_key_in_flight_is_a_409(api: APIClient, owner: Owner, case: Case) -> None:
    before = case.state()
    fp = idempotency.fingerprint(
        method="POST", path=case.path, body=json.loads(json.dumps(case.body or {}))
    )
    held = idempotency.begin(owner_id=owner.pk, key=KEY, fp=fp)
    assert isinstance(held, idempotency.Proceed)
    busy = _post(api, case.path, case.body)
    assert (busy.status_code, busy.json()) == (409, IN_FLIGHT)
    assert case.state() == before
    assert IdempotencyRecord.objects.count() == 0


def test_without_a_key_a_second_request_runs_again(api: APIClient, case: Case) -> None:
    first = _post(api, case.path, case.body, key=None)
    assert first.status_code == case.status
    second = _post(api, case.path, case.body, key=None)
    assert "Idempotent-Replayed" not in second
    case.again(first, second)
    assert IdempotencyRecord.objects.count() == 0


def test_past_the_ttl_the_key_runs_again(api: APIClient, case: Case) -> None:
    first = _post(api, case.path, case.body)
    assert first.status_code == case.status
    IdempotencyRecord.objects.update(
        created_at=timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS + 1)
    )
    cache.clear()  # Redis forgets it after the same TTL
    second = _post(api, case.path, case.body)
    assert "Idempotent-Replayed" not in second
    case.again(first, second)


def test_after_redis_lost_the_key_the_database_record_answers(api: APIClient, case: Case) -> None:
    first = _post(api, case.path, case.body)
    after = case.state()
    cache.clear()
    retry = _post(api, case.path, case.body)
    assert (retry.status_code, retry.json()) == (case.status, first.json())
    assert retry["Idempotent-Replayed"] == "true"
    assert case.state() == after
    cache.clear()
    path, body = case.other
    assert (_post(api, path, body).status_code, case.state()) == (422, after)


def test_every_such_operation_documents_the_header_409_and_422(api: APIClient) -> None:
    schema = api.get("/api/schema/", {"format": "json"}).json()
    documented = {}
    for item in schema["paths"].values():
        for operation in item.values():
            headers = [
                p["name"] for p in operation.get("parameters", []) if p.get("in") == "header"
            ]
            if "Idempotency-Key" in headers:
                responses = operation["responses"]
                documented[operation["operationId"]] = (
                    sorted(code for code in responses if code in ("409", "422")),
                    # The replay's answer header, on every success the operation answers.
                    all(
                        "Idempotent-Replayed" in answer.get("headers", {})
                        for code, answer in responses.items()
                        if code.startswith("2")
                    ),
                )
    assert documented == {
        name: (["409", "422"], name != "notifications_create")
        for name in [*CASES, "notifications_create"]
    }
    replay = schema["paths"]["/api/v1/dead-letters/{dead_letter_id}/replay"]["post"]
    assert replay["responses"]["409"]["description"] == (
        "Already replayed or discarded ({error: conflict}); or its address is on the "
        "suppression list ({error: suppressed, suppression}), the dead letter stays open; or "
        "the same Idempotency-Key is still in flight"
    )


def test_a_refusal_leaves_the_key_free_for_the_corrected_request(
    api: APIClient, owner: Owner, settings: Any
) -> None:
    settings.WEBHOOK_ALLOW_PRIVATE = False
    refused = _post(api, "/api/v1/webhooks", {"url": "http://example.com/x", "event_types": []})
    assert refused.status_code == 400
    missing = _post(api, "/api/v1/webhooks/999999/rotate-secret", None)
    assert missing.status_code == 404
    assert IdempotencyRecord.objects.count() == 0
    created = _post(api, "/api/v1/webhooks", {"url": PUBLIC_URL, "event_types": ["delivery.sent"]})
    assert created.status_code == 201
    assert Webhook.objects.count() == 1


def test_a_409_answer_is_not_kept(api: APIClient, template: Any) -> None:
    """An answer that refuses (here: the template exists) changed nothing: the key is free."""
    body = {"key": "order_shipped", "content": {"sms": {"body": "x"}}}
    assert _post(api, "/api/v1/templates", body).status_code == 409
    body = {"key": "welcome", "content": {"sms": {"body": "x"}}}
    assert _post(api, "/api/v1/templates", body).status_code == 201


def test_keys_are_per_owner(api: APIClient, other_api: APIClient) -> None:
    body = {"url": PUBLIC_URL, "event_types": ["delivery.sent"]}
    mine, theirs = _post(api, "/api/v1/webhooks", body), _post(other_api, "/api/v1/webhooks", body)
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert "Idempotent-Replayed" not in theirs
    assert Webhook.objects.count() == 2


def test_with_redis_unreachable_the_database_record_keeps_the_key(
    api: APIClient, settings: Any
) -> None:
    settings.CACHES = {
        "default": {
            **settings.CACHES["default"],
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
        }
    }
    body = {"url": PUBLIC_URL, "event_types": ["delivery.sent"]}
    first = _post(api, "/api/v1/webhooks", body)
    retry = _post(api, "/api/v1/webhooks", body)
    other = _post(api, "/api/v1/webhooks", {**body, "event_types": ["delivery.dead"]})
    assert (first.status_code, retry.status_code, other.status_code) == (201, 201, 422)
    assert retry.json() == first.json()
    assert retry["Idempotent-Replayed"] == "true"
    assert Webhook.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_retries_create_one_webhook(api: APIClient) -> None:
    body = {"url": PUBLIC_URL, "event_types": ["delivery.sent"]}
    start = threading.Barrier(20)
    answers: list[tuple[int, Any, str | None]] = []
    lock = threading.Lock()

    def create() -> None:
        try:
            start.wait()
            response = _post(api, "/api/v1/webhooks", body)
            with lock:
                answers.append(
                    (response.status_code, response.json(), response.get("Idempotent-Replayed"))
                )
        finally:
            connection.close()

    threads = [threading.Thread(target=create) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(answers) == 20
    webhook = Webhook.objects.get()
    created = [a for a in answers if a[0] == 201 and a[2] is None]
    assert len(created) == 1
    for status, answer, replayed in answers:
        if status == 201:
            assert (answer["id"], answer["secret"]) == (webhook.pk, webhook.secret)
        else:
            assert (status, answer, replayed) == (409, IN_FLIGHT, None)


@pytest.mark.django_db(transaction=True)
def test_a_keyed_bulk_rolled_back_leaves_no_item_answer_behind(
    api: APIClient, template: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a key on the whole request, the items' own keys are remembered only once the
    request's transaction commits: one that rolls back leaves no answer naming a notification
    that was never written."""
    assert api.put("/api/v1/recipients/user-1", {}, format="json").status_code == 201
    item = {
        "recipient": "user-1",
        "template": "order_shipped",
        "data": {"order_id": "B-1"},
        "idempotency_key": "item-1",
    }

    def fail(**kwargs: Any) -> None:
        raise RuntimeError("the database went away before the commit")

    monkeypatch.setattr(idempotency, "record_answer", fail)
    with pytest.raises(RuntimeError):
        _post(api, "/api/v1/notifications/bulk", {"notifications": [item]})
    monkeypatch.undo()
    assert Notification.objects.count() == 0
    assert IdempotencyRecord.objects.count() == 0
    # The item's key is held until IDEMPOTENCY_LOCK_SECONDS end, never answered from Redis.
    retry = _post(api, "/api/v1/notifications/bulk", {"notifications": [item]}, key="another")
    assert [r["status"] for r in retry.json()["results"]] == [409]
    cache.clear()  # the lock ran out
    retry = _post(api, "/api/v1/notifications/bulk", {"notifications": [item]}, key="a-third")
    assert [r["status"] for r in retry.json()["results"]] == [202]
    assert Notification.objects.count() == 1


def test_an_answer_echoing_a_nul_character_is_kept_and_replayed_as_sent(
    api: APIClient, template: Any
) -> None:
    """PostgreSQL's JSON holds no NUL: an answer that echoes one (a bulk item's error naming
    the client's field) is sent and kept with U+FFFD in its place, and replayed the same."""
    assert api.put("/api/v1/recipients/user-1", {}, format="json").status_code == 201
    items = [
        {"recipient": "user-1", "template": "order_shipped", "data": {"order_id": "N-1"}},
        {"recipient": {"id": "user-1", "to\x00": 1}, "template": "order_shipped", "data": {}},
    ]
    first = _post(api, "/api/v1/notifications/bulk", {"notifications": items})
    assert first.status_code == 200
    assert [r["status"] for r in first.json()["results"]] == [202, 400]
    assert first.json()["results"][1]["error"]["fields"] == {
        "recipient.to\ufffd": ["Unknown field."]
    }
    retry = _post(api, "/api/v1/notifications/bulk", {"notifications": items})
    assert (retry.json(), retry["Idempotent-Replayed"]) == (first.json(), "true")
    assert IdempotencyRecord.objects.get().response == first.json()
    assert Notification.objects.count() == 1


def test_the_purge_deletes_the_records_past_the_ttl_and_keeps_the_others(owner: Owner) -> None:
    from workers.tasks import purge_idempotency_records

    for key in ("old", "fresh"):
        idempotency.accepted_record(
            owner_id=owner.pk, key=key, fingerprint="f" * 64, body={"id": key}
        ).save(force_insert=True)
    ttl = settings.IDEMPOTENCY_TTL_SECONDS
    IdempotencyRecord.objects.filter(key="old").update(
        created_at=timezone.now() - timedelta(seconds=ttl + 60)
    )
    IdempotencyRecord.objects.filter(key="fresh").update(
        created_at=timezone.now() - timedelta(seconds=ttl - 60)
    )
    assert purge_idempotency_records() == 1
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["fresh"]
