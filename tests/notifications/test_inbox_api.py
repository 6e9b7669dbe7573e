"""The recipient token endpoint and the inbox API it opens: who may call what, the list with
its cursor pages and filters, the unread count, read, read-all and archive."""

from __future__ import annotations

import time
import uuid
from typing import Any
from unittest import mock

import pytest
from django.utils.dateparse import parse_datetime
from rest_framework.test import APIClient

from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Notification
from notifications.tokens import recipient_token_claims, recipient_token_issue
from tests.factories import api_key_for

pytestmark = pytest.mark.django_db


def browser(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def token_for(api: APIClient, rid: str) -> str:
    response = api.post(f"/api/v1/recipients/{rid}/token")
    assert response.status_code == 200, response.content
    return str(response.json()["token"])


def notify(api: APIClient, rid: str, order_id: str, **extra: Any) -> str:
    response = api.post(
        "/api/v1/notifications",
        {"recipient": rid, "template": "order_shipped", "data": {"order_id": order_id}, **extra},
        format="json",
    )
    assert response.status_code == 202, response.content
    return str(response.json()["id"])


def entry(notification_id: str, order_id: str, status: str = "queued") -> dict[str, Any]:
    notification = Notification.objects.get(pk=notification_id)
    read_at = Delivery.objects.get(notification=notification, channel="web").read_at
    return {
        "id": notification_id,
        "title": "Shipped",
        "body": f"Order {order_id} is on its way",
        "data": {"order_id": order_id},
        "created_at": notification.created_at.isoformat().replace("+00:00", "Z"),
        "status": status,
        "read_at": read_at.isoformat().replace("+00:00", "Z") if read_at else None,
    }


@pytest.fixture
def inbox(api: APIClient, template: Any) -> APIClient:
    api.put("/api/v1/recipients/user-a", {}, format="json")
    return browser(token_for(api, "user-a"))


# --- The token endpoint ---------------------------------------------------------------------


def test_token_endpoint_issues_a_token_for_that_recipient(
    api: APIClient, owner: Any, settings: Any
) -> None:
    settings.RECIPIENT_TOKEN_TTL_SECONDS = 600
    api.put("/api/v1/recipients/user-a", {}, format="json")
    before = time.time()
    response = api.post("/api/v1/recipients/user-a/token")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token", "expires_at", "recipient"}
    assert body["recipient"] == "user-a"
    expires_at = parse_datetime(body["expires_at"])
    assert expires_at is not None
    assert before + 599 <= expires_at.timestamp() <= time.time() + 601
    claims = recipient_token_claims(body["token"])
    recipient = owner.recipients.get(external_id="user-a")
    assert claims is not None
    assert (claims.owner_id, claims.recipient_id) == (owner.pk, recipient.pk)


def test_token_endpoint_is_scoped_to_the_api_keys_owner(
    api: APIClient, other_api: APIClient
) -> None:
    api.put("/api/v1/recipients/user-a", {}, format="json")
    assert other_api.post("/api/v1/recipients/user-a/token").status_code == 404
    assert api.post("/api/v1/recipients/nobody/token").status_code == 404
    assert APIClient().post("/api/v1/recipients/user-a/token").status_code == 401


def test_recipient_tokens_and_api_keys_do_not_open_each_others_api(
    api: APIClient, owner: Any, inbox: APIClient
) -> None:
    token = inbox._credentials["HTTP_AUTHORIZATION"].split()[1]  # type: ignore[attr-defined]
    assert inbox.get("/api/v1/inbox").status_code == 200
    # A recipient token is not an API key...
    for path in ("/api/v1/templates", "/api/v1/recipients/user-a", "/api/v1/dead-letters"):
        response = inbox.get(path)
        assert (response.status_code, response.json()["error"]) == (401, "unauthenticated")
    assert inbox.post("/api/v1/recipients/user-a/token").status_code == 401
    # ...and an API key is not a recipient token.
    key_client = browser(api_key_for(owner))
    for method, path in (
        ("get", "/api/v1/inbox"),
        ("get", "/api/v1/inbox/unread-count"),
        ("post", "/api/v1/inbox/read-all"),
        ("get", "/api/v1/inbox/preferences"),
        ("put", "/api/v1/inbox/preferences"),
        ("post", f"/api/v1/inbox/{uuid.uuid4()}/read"),
    ):
        response = getattr(key_client, method)(path)
        assert (response.status_code, response.json()["error"]) == (401, "unauthenticated")
    assert APIClient().get("/api/v1/inbox").status_code == 401
    # Expired, or its recipient deleted: refused.
    recipient = owner.recipients.get(external_id="user-a")
    with mock.patch("django.core.signing.time.time", return_value=time.time() - 3601):
        expired = recipient_token_issue(owner_id=owner.pk, recipient_id=recipient.pk).token
    assert browser(expired).get("/api/v1/inbox").status_code == 401
    recipient.delete()
    assert browser(token).get("/api/v1/inbox").status_code == 401


# --- Reading the inbox ----------------------------------------------------------------------


def test_list_is_newest_first_with_cursor_pages_and_only_this_recipients_web_entries(
    api: APIClient, inbox: APIClient, settings: Any
) -> None:
    settings.INBOX_PAGE_SIZE = 2
    api.put("/api/v1/recipients/user-b", {}, format="json")
    ids = [notify(api, "user-a", f"A-{n}") for n in range(5)]
    notify(api, "user-b", "B-1")
    notify(api, "user-a", "A-email", channels=["email"])  # no web delivery: not in the inbox
    notify(api, "user-a", "A-later", send_at="2099-01-01T00:00:00Z")  # scheduled: not yet
    pages = []
    response = inbox.get("/api/v1/inbox")
    while True:
        assert response.status_code == 200
        body = response.json()
        pages.append(body["results"])
        if not body["next"]:
            break
        response = inbox.get(body["next"])
    assert pages == [
        [entry(ids[4], "A-4"), entry(ids[3], "A-3")],
        [entry(ids[2], "A-2"), entry(ids[1], "A-1")],
        [entry(ids[0], "A-0")],
    ]
    assert inbox.get("/api/v1/inbox?page_size=10").json()["results"] == [
        entry(i, f"A-{n}") for n, i in reversed(list(enumerate(ids)))
    ]


def test_unread_count_read_read_all_and_archive(api: APIClient, inbox: APIClient) -> None:
    ids = [notify(api, "user-a", f"A-{n}") for n in range(4)]
    assert inbox.get("/api/v1/inbox/unread-count").json() == {"count": 4}

    response = inbox.post(f"/api/v1/inbox/{ids[1]}/read")
    assert response.status_code == 200
    assert response.json() == entry(ids[1], "A-1", status="read")
    assert response.json()["read_at"] is not None
    again = inbox.post(f"/api/v1/inbox/{ids[1]}/read")
    assert again.json() == response.json()  # idempotent: read_at unchanged
    assert inbox.get("/api/v1/inbox/unread-count").json() == {"count": 3}

    archived = inbox.post(f"/api/v1/inbox/{ids[2]}/archive")
    assert (archived.status_code, archived.json()) == (200, entry(ids[2], "A-2"))
    assert inbox.post(f"/api/v1/inbox/{ids[2]}/archive").status_code == 200
    assert inbox.get("/api/v1/inbox/unread-count").json() == {"count": 2}
    listed = inbox.get("/api/v1/inbox").json()["results"]
    assert [e["id"] for e in listed] == [ids[3], ids[1], ids[0]]
    assert [e["id"] for e in inbox.get("/api/v1/inbox?unread=true").json()["results"]] == [
        ids[3],
        ids[0],
    ]
    assert [e["id"] for e in inbox.get("/api/v1/inbox?unread=false").json()["results"]] == [ids[1]]
    assert [e["id"] for e in inbox.get("/api/v1/inbox?archived=true").json()["results"]] == [ids[2]]

    response = inbox.post("/api/v1/inbox/read-all")
    assert (response.status_code, response.json()) == (200, {"marked_read": 3})
    assert inbox.post("/api/v1/inbox/read-all").json() == {"marked_read": 0}
    assert inbox.get("/api/v1/inbox/unread-count").json() == {"count": 0}
    assert {e["status"] for e in inbox.get("/api/v1/inbox?archived=true").json()["results"]} == {
        "read"
    }
    # Every change is in the delivery log, once.
    reads = DeliveryEvent.objects.filter(status=DeliveryStatus.READ)
    assert sorted(str(e.delivery.notification_id) for e in reads) == sorted(ids)
    assert {e.detail for e in reads} == {"inbox api"}


def test_another_recipients_entry_is_404_and_unchanged(api: APIClient, inbox: APIClient) -> None:
    api.put("/api/v1/recipients/user-b", {}, format="json")
    theirs = notify(api, "user-b", "B-1")
    email_only = notify(api, "user-a", "A-email", channels=["email"])
    for notification_id in (theirs, email_only, str(uuid.uuid4()), "not-a-uuid"):
        for action in ("read", "archive"):
            response = inbox.post(f"/api/v1/inbox/{notification_id}/{action}")
            assert (response.status_code, response.json()["error"]) == (404, "not_found")
    assert inbox.post("/api/v1/inbox/read-all").json() == {"marked_read": 0}
    delivery = Delivery.objects.get(notification_id=theirs, channel="web")
    assert (delivery.status, delivery.read_at, delivery.archived_at) == ("queued", None, None)


def test_bad_filters_are_400(inbox: APIClient) -> None:
    response = inbox.get("/api/v1/inbox?unread=maybe")
    assert response.status_code == 400
    assert response.json()["fields"] == {"unread": ["Must be a valid boolean."]}


def test_schema_documents_the_inbox_and_the_token_endpoint(api: APIClient) -> None:
    response = APIClient().get("/api/schema/?format=json")
    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    assert {
        "/api/v1/recipients/{rid}/token": ["post"],
        "/api/v1/inbox": ["get"],
        "/api/v1/inbox/unread-count": ["get"],
        "/api/v1/inbox/read-all": ["post"],
        "/api/v1/inbox/preferences": ["get", "put"],
        "/api/v1/inbox/{notification_id}/read": ["post"],
        "/api/v1/inbox/{notification_id}/archive": ["post"],
    } == {p: sorted(paths[p]) for p in paths if "inbox" in p or p.endswith("/token")}
    assert paths["/api/v1/inbox"]["get"]["security"] == [{"RecipientToken": []}]
    assert paths["/api/v1/recipients/{rid}/token"]["post"]["security"] == [{"ApiKey": []}]
    listed = paths["/api/v1/inbox"]["get"]["responses"]["200"]["content"]["application/json"]
    assert listed["schema"] == {"$ref": "#/components/schemas/PaginatedInboxEntryList"}
    assert {p["name"] for p in paths["/api/v1/inbox"]["get"]["parameters"]} == {
        "archived",
        "cursor",
        "page_size",
        "unread",
    }


# --- The recipient's own preferences --------------------------------------------------------


def test_a_recipient_reads_and_changes_its_own_preferences(
    api: APIClient, owner: Any, inbox: APIClient
) -> None:
    from tests.factories import TemplateFactory

    TemplateFactory(owner=owner, key="newsletter", category="marketing")
    api.put("/api/v1/recipients/user-b", {}, format="json")
    response = inbox.get("/api/v1/inbox/preferences")
    assert response.status_code == 200
    assert response.json() == {
        "channels": {"email": True, "sms": True, "push": True, "web": True},
        "categories": {},
        "quiet_hours": None,
        "template_categories": ["marketing", "orders"],
    }

    response = inbox.put(
        "/api/v1/inbox/preferences",
        {
            "channels": {"sms": False},
            "categories": {"marketing": {"email": False}},
            "quiet_hours": {"start": "22:00", "end": "07:00"},
        },
        format="json",
    )
    assert response.status_code == 200, response.content
    changed = response.json()
    assert changed["channels"]["sms"] is False
    assert changed["categories"] == {"marketing": {"email": False}}
    assert changed["quiet_hours"] == {
        "start": "22:00",
        "end": "07:00",
        "channels": ["email", "sms", "push", "web"],  # every channel, as none was named
    }
    # What the owner's services see is the same document, and the other recipient is untouched.
    owners_view = api.get("/api/v1/recipients/user-a/preferences").json()
    assert owners_view == {k: v for k, v in changed.items() if k != "template_categories"}
    assert api.get("/api/v1/recipients/user-b/preferences").json()["channels"]["sms"] is True
    # And the next send follows it.
    api.put("/api/v1/recipients/user-a", {"phone": "+14155550100"}, format="json")
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": "user-a",
            "template": "order_shipped",
            "data": {"order_id": "P-2"},
            "channels": ["sms"],
        },
        format="json",
    )
    assert response.json()["deliveries"][0] == {
        "channel": "sms",
        "status": "skipped",
        "reason": "opted_out",
    }
    # Removing the quiet hours, and a bad document.
    assert (
        inbox.put("/api/v1/inbox/preferences", {"quiet_hours": None}, format="json").json()[
            "quiet_hours"
        ]
        is None
    )
    bad = inbox.put("/api/v1/inbox/preferences", {"channels": {"fax": False}}, format="json")
    assert bad.status_code == 400
    assert bad.json()["fields"] == {"channels.fax": ["Unknown channel; use email, sms, push, web."]}
