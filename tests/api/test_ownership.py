"""Every object endpoint, called by another owner with the first owner's ids and with random
ids: a 404 everywhere, nothing changed, and no answer carries any of the first owner's data.
The inbox endpoints are swept the same way with another recipient's token."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from rest_framework.test import APIClient

from notifications import webhooks
from notifications.models import (
    Delivery,
    DeliveryStatus,
    Device,
    Preference,
    Recipient,
    Suppression,
    Template,
    TopicSubscription,
    Webhook,
)
from notifications.suppressions import suppression_add
from notifications.tokens import recipient_token_issue
from tests.factories import RecipientFactory
from workers.models import DeadLetter, DeadLetterStatus
from workers.transitions import dead_letter_create

pytestmark = pytest.mark.django_db

# Values only the first owner's objects hold: none may appear in an answer to anyone else.
SECRETS = (
    "user-acme-7",
    "secret-acme@example.com",
    "+14155550199",
    "device-token-acme-secret",
    "acme_secret_template",
    "ACME-SECRET-CONTENT",
    "ACME-ORDER-4242",
    "acme-secret-category",
    "acme-secret",
)
NOT_FOUND = {"error": "not_found", "detail": "Not found."}


@pytest.fixture
def acme(owner: Any, api: APIClient) -> dict[str, Any]:
    """The first owner's objects, created through the API as a client would."""
    rid, key = SECRETS[0], SECRETS[4]
    response = api.put(
        f"/api/v1/recipients/{rid}",
        {"email": SECRETS[1], "phone": SECRETS[2]},
        format="json",
    )
    assert response.status_code == 201, response.content
    response = api.put(
        f"/api/v1/recipients/{rid}/preferences",
        {"categories": {SECRETS[7]: {"email": False}}},
        format="json",
    )
    assert response.status_code == 200, response.content
    response = api.post(
        f"/api/v1/recipients/{rid}/devices",
        {"platform": "fcm", "token": SECRETS[3]},
        format="json",
    )
    assert response.status_code == 201, response.content
    content = {
        channel: {"title": SECRETS[5], "body": f"{SECRETS[5]} {{{{ order_id }}}}"}
        for channel in ("push", "web")
    }
    content["sms"] = {"body": f"{SECRETS[5]} {{{{ order_id }}}}"}
    response = api.post(
        "/api/v1/templates",
        {"key": key, "category": "orders", "content": content},
        format="json",
    )
    assert response.status_code == 201, response.content
    response = api.post(
        "/api/v1/notifications",
        {"recipient": rid, "template": key, "data": {"order_id": SECRETS[6]}},
        format="json",
    )
    assert response.status_code == 202, response.content
    notification_id = response.json()["id"]
    sms = Delivery.objects.select_related("notification__recipient").get(
        notification_id=notification_id, channel="sms"
    )
    Delivery.objects.filter(pk=sms.pk).update(status=DeliveryStatus.DEAD, attempts=1)
    sms.refresh_from_db()
    letter = dead_letter_create(delivery=sms, provider="twilio", error=f"{SECRETS[2]} refused")
    # A topic under the same key as the template, with the recipient subscribed.
    response = api.put(f"/api/v1/topics/{key}", {"name": SECRETS[5]}, format="json")
    assert response.status_code == 201, response.content
    response = api.post(f"/api/v1/topics/{key}/subscribers", {"recipients": [rid]}, format="json")
    assert response.json()["added"] == 1, response.content
    recipient = Recipient.objects.get(owner=owner, external_id=rid)
    suppression_add(
        owner_id=owner.pk,
        channel="email",
        address=SECRETS[1],
        reason="bounced",
        source="sendgrid",
        detail=f"{SECRETS[1]} does not exist",
    )
    return {
        "rid": rid,
        "key": key,
        "notification_id": notification_id,
        "dead_letter_id": letter.pk,
        "suppression_id": Suppression.objects.get(owner=owner).pk,
        "webhook_id": webhooks.webhook_create(
            owner=owner, url="https://93.184.216.34/acme-secret", event_types=["delivery.sent"]
        ).pk,
        "recipient": recipient,
    }


@pytest.fixture
def globex_token(other_owner: Any) -> str:
    """A recipient token of the other owner's own recipient, for the inbox endpoints."""
    recipient = RecipientFactory(owner=other_owner, external_id="user-globex-1")
    return recipient_token_issue(owner_id=other_owner.pk, recipient_id=recipient.pk).token


def _snapshot(acme: dict[str, Any]) -> dict[str, Any]:
    """Everything about the first owner's objects that a stray write could change."""
    recipient = Recipient.objects.get(pk=acme["recipient"].pk)
    return {
        "recipient": (recipient.email, recipient.phone, recipient.locale, recipient.timezone),
        "preferences": sorted(
            Preference.objects.filter(recipient=recipient).values_list(
                "category", "channel", "enabled"
            )
        ),
        "devices": sorted(
            Device.objects.filter(recipient=recipient).values_list("platform", "token", "active")
        ),
        "template": list(
            Template.objects.filter(owner=recipient.owner, key=acme["key"]).values_list(
                "category", "content"
            )
        ),
        "deliveries": sorted(
            Delivery.objects.filter(notification_id=acme["notification_id"]).values_list(
                "channel", "status", "read_at", "archived_at"
            )
        ),
        "dead_letter": DeadLetter.objects.get(pk=acme["dead_letter_id"]).status,
        "webhooks": sorted(
            Webhook.objects.filter(owner=recipient.owner).values_list("url", "secret")
        ),
        "suppressions": sorted(
            Suppression.objects.filter(owner=recipient.owner).values_list("address", "reason")
        ),
        "topics": sorted(
            TopicSubscription.objects.filter(topic__owner=recipient.owner).values_list(
                "topic__key", "topic__name", "recipient__external_id"
            )
        ),
    }


def _object_calls(ids: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """(method, path, body) of every endpoint that names one object, on the given ids."""
    rid, key = ids["rid"], ids["key"]
    nid, dl = ids["notification_id"], ids["dead_letter_id"]
    return [
        ("get", f"/api/v1/notifications/{nid}", None),
        ("get", f"/api/v1/recipients/{rid}", None),
        ("delete", f"/api/v1/recipients/{rid}", None),
        ("get", f"/api/v1/recipients/{rid}/preferences", None),
        ("put", f"/api/v1/recipients/{rid}/preferences", {"channels": {"email": True}}),
        ("post", f"/api/v1/recipients/{rid}/devices", {"platform": "fcm", "token": "t-globex"}),
        ("post", f"/api/v1/recipients/{rid}/token", None),
        ("get", f"/api/v1/templates/{key}", None),
        ("delete", f"/api/v1/templates/{key}", None),
        ("post", f"/api/v1/dead-letters/{dl}/replay", None),
        ("post", f"/api/v1/dead-letters/{dl}/discard", None),
        ("delete", f"/api/v1/suppressions/{ids['suppression_id']}", None),
        ("delete", f"/api/v1/webhooks/{ids['webhook_id']}", None),
        ("post", f"/api/v1/webhooks/{ids['webhook_id']}/rotate-secret", None),
        ("post", f"/api/v1/webhooks/{ids['webhook_id']}/replay", None),
        ("get", f"/api/v1/topics/{key}", None),
        ("post", f"/api/v1/topics/{key}/subscribers", {"recipients": [rid]}),
        ("delete", f"/api/v1/topics/{key}/subscribers", {"recipients": [rid]}),
    ]


def _inbox_calls(notification_id: str) -> list[tuple[str, str, Any]]:
    return [
        ("post", f"/api/v1/inbox/{notification_id}/read", None),
        ("post", f"/api/v1/inbox/{notification_id}/archive", None),
    ]


def _random_ids() -> dict[str, Any]:
    return {
        "rid": f"user-{uuid.uuid4().hex}",
        "key": f"tpl-{uuid.uuid4().hex}",
        "notification_id": str(uuid.uuid4()),
        "dead_letter_id": 2_000_000_000,
        "suppression_id": 2_000_000_000,
        "webhook_id": 2_000_000_000,
    }


def _call(client: APIClient, method: str, path: str, body: Any) -> Any:
    return (
        getattr(client, method)(path, body, format="json")
        if body
        else getattr(client, method)(path)
    )


def _assert_no_secret(response: Any) -> None:
    text = response.content.decode()
    assert [s for s in SECRETS if s in text] == [], text


def test_another_owner_gets_404_for_every_object_and_changes_nothing(
    acme: dict[str, Any], other_api: APIClient
) -> None:
    before = _snapshot(acme)
    answers = []
    for ids in (acme, _random_ids()):
        for method, path, body in _object_calls(ids):
            response = _call(other_api, method, path, body)
            _assert_no_secret(response)
            answers.append((method, path, response.status_code, response.json()))
    assert answers == [(m, p, 404, NOT_FOUND) for m, p, _, _ in answers]
    assert len(answers) == 36
    assert _snapshot(acme) == before


def test_another_recipients_inbox_gets_404_for_the_notification_and_changes_nothing(
    acme: dict[str, Any], globex_token: str
) -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {globex_token}")
    before = _snapshot(acme)
    answers = []
    for notification_id in (acme["notification_id"], str(uuid.uuid4()), "not-a-uuid"):
        for method, path, body in _inbox_calls(notification_id):
            response = _call(client, method, path, body)
            _assert_no_secret(response)
            answers.append((path, response.status_code, response.json()))
    assert answers == [(p, 404, NOT_FOUND) for p, _, _ in answers]
    assert len(answers) == 6
    listing = client.get("/api/v1/inbox")
    _assert_no_secret(listing)
    assert (listing.status_code, listing.json()["results"]) == (200, [])
    unread = client.get("/api/v1/inbox/unread-count")
    assert (unread.status_code, unread.json()) == (200, {"count": 0})
    read_all = client.post("/api/v1/inbox/read-all")
    assert (read_all.status_code, read_all.json()) == (200, {"marked_read": 0})
    # Its own preferences: none of the first owner's categories offered, and a change (even
    # naming the first owner's category) lands on its own recipient only.
    preferences = client.get("/api/v1/inbox/preferences")
    _assert_no_secret(preferences)
    assert preferences.json()["template_categories"] == []
    changed = client.put(
        "/api/v1/inbox/preferences",
        {"channels": {"email": False}, "categories": {"acme-secret-category": {"sms": False}}},
        format="json",
    )
    assert changed.status_code == 200
    globex = Recipient.objects.get(external_id="user-globex-1")
    assert Preference.objects.filter(recipient=globex).count() == 2
    assert _snapshot(acme) == before


def test_the_owner_itself_sees_its_objects(acme: dict[str, Any], api: APIClient) -> None:
    """The control: the same sweep with the owner's own key finds every object, so the 404s
    above are about ownership, not about broken ids."""
    reads = [c for c in _object_calls(acme) if c[0] == "get"]
    assert [_call(api, m, p, b).status_code for m, p, b in reads] == [200] * 5
    owner_token = recipient_token_issue(
        owner_id=acme["recipient"].owner_id, recipient_id=acme["recipient"].pk
    ).token
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {owner_token}")
    [entry] = client.get("/api/v1/inbox").json()["results"]
    assert entry["id"] == acme["notification_id"]


def test_lists_and_filters_of_another_owner_show_none_of_the_first_owners_objects(
    acme: dict[str, Any], other_api: APIClient
) -> None:
    before = _snapshot(acme)
    nid = acme["notification_id"]
    answers = {}
    for path in (
        "/api/v1/templates",
        "/api/v1/dead-letters?status=any",
        f"/api/v1/sandbox/messages?notification={nid}",
        "/api/v1/suppressions",
        "/api/v1/suppressions?address=secret-acme",
        "/api/v1/webhooks",
    ):
        response = other_api.get(path)
        _assert_no_secret(response)
        answers[path] = (response.status_code, response.json())
    counts = other_api.get("/api/v1/dead-letters/counts").json()
    bulk = other_api.post("/api/v1/dead-letters/replay", {"channel": "sms"}, format="json")
    assert answers == {
        "/api/v1/templates": (200, []),
        "/api/v1/dead-letters?status=any": (200, []),
        f"/api/v1/sandbox/messages?notification={nid}": (200, []),
        "/api/v1/suppressions": (200, {"next": None, "previous": None, "results": []}),
        "/api/v1/suppressions?address=secret-acme": (
            200,
            {"next": None, "previous": None, "results": []},
        ),
        "/api/v1/webhooks": (200, []),
    }
    assert sum(counts["channels"].values()) == 0
    assert (bulk.status_code, bulk.json()) == (202, {"count": 0, "results": []})
    assert DeadLetter.objects.get(pk=acme["dead_letter_id"]).status == DeadLetterStatus.OPEN
    assert _snapshot(acme) == before


def test_another_owner_cannot_reach_the_first_owners_objects_from_a_body(
    acme: dict[str, Any], other_api: APIClient, other_owner: Any
) -> None:
    """Ids inside a body are scoped too: a notification to the first owner's recipient or
    from its template is refused, and an upsert on the same id makes the caller's own row."""
    before = _snapshot(acme)
    own = other_api.put(
        "/api/v1/templates/globex_tpl", {"content": {"sms": {"body": "hi"}}}, format="json"
    )
    assert own.status_code == 201
    RecipientFactory(owner=other_owner, external_id="user-globex-2")
    refused = {}
    for recipient, template in ((acme["rid"], "globex_tpl"), ("user-globex-2", acme["key"])):
        response = other_api.post(
            "/api/v1/notifications",
            {"recipient": recipient, "template": template, "data": {"order_id": "x"}},
            format="json",
        )
        _assert_no_secret_but_key(response, recipient if recipient == acme["rid"] else template)
        refused[(recipient, template)] = (response.status_code, sorted(response.json()["fields"]))
    assert refused == {
        (acme["rid"], "globex_tpl"): (400, ["recipient"]),
        ("user-globex-2", acme["key"]): (400, ["template"]),
    }
    upsert = other_api.put(f"/api/v1/recipients/{acme['rid']}", {"locale": "fr"}, format="json")
    assert upsert.status_code == 201
    assert {k: v for k, v in upsert.json().items() if not k.endswith("_at")} == {
        "id": acme["rid"],
        "email": "",
        "phone": "",
        "locale": "fr",
        "timezone": "",
    }
    template = other_api.put(
        f"/api/v1/templates/{acme['key']}", {"content": {"sms": {"body": "hi"}}}, format="json"
    )
    _assert_no_secret_but_key(template, acme["key"])
    assert template.status_code == 201
    assert Recipient.objects.filter(external_id=acme["rid"]).count() == 2
    assert Template.objects.filter(owner=other_owner, key=acme["key"]).count() == 1
    assert _snapshot(acme) == before


def _assert_no_secret_but_key(response: Any, key: str) -> None:
    """The caller named the key itself, so only that may come back."""
    text = response.content.decode().replace(key, "")
    assert [s for s in SECRETS if s in text] == [], text


def test_credentials_do_not_cross_between_the_api_and_the_inbox(
    acme: dict[str, Any], api: APIClient, globex_token: str
) -> None:
    """A recipient token is not an API key, and an API key does not open an inbox."""
    inbox_with_key = api.get("/api/v1/inbox")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {globex_token}")
    api_with_token = client.get(f"/api/v1/notifications/{acme['notification_id']}")
    for response in (inbox_with_key, api_with_token):
        _assert_no_secret(response)
    assert (inbox_with_key.status_code, inbox_with_key.json()["error"]) == (401, "unauthenticated")
    assert (api_with_token.status_code, api_with_token.json()["error"]) == (401, "unauthenticated")
