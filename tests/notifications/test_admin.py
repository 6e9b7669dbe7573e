"""The Django admin: every page renders for staff with a bounded number of queries; edits
made there (preferences, templates, API keys) take effect on the very next API request; the
template preview, "send a test", the delivery timeline, the dead-letter summary and the API
key shown once behave exactly as an operator expects."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from html import escape, unescape
from typing import Any
from urllib.parse import urlencode

import pytest
from django.contrib.admin.models import ADDITION, LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from notifications import sending
from notifications.delivery_log import AttemptRecord, StatusEvent
from notifications.models import (
    ApiKey,
    Delivery,
    DeliveryStatus,
    Notification,
    Preference,
    Recipient,
    Suppression,
    Template,
    Topic,
    TopicSubscription,
    Webhook,
    WebhookMessage,
)
from notifications.suppressions import suppression_add
from tests.factories import ORDER_SHIPPED, DeviceFactory, OwnerFactory, RecipientFactory
from workers.models import DeadLetter, ProviderEvent
from workers.transitions import dead_letter_create

pytestmark = pytest.mark.django_db

BODY = {
    "recipient": {"id": "user-42", "email": "u@example.com", "phone": "+14155550100"},
    "template": "order_shipped",
    "data": {"order_id": "A-1"},
    "channels": ["email", "sms"],
}


@pytest.fixture
def staff() -> Client:
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123")
    client = Client()
    client.force_login(user)
    return client


def test_preference_change_in_admin_applies_to_the_next_request(
    api: Any, template: Any, staff: Client
) -> None:
    # Warm the recipient cache: sms is queued.
    assert api.post("/api/v1/notifications", BODY, format="json").json()["deliveries"][1] == {
        "channel": "sms",
        "status": "queued",
    }
    recipient = Recipient.objects.get(external_id="user-42")
    url = reverse("admin:notifications_recipient_change", args=[recipient.pk])
    form = {
        "owner": recipient.owner_id,
        "external_id": "user-42",
        "email": "u@example.com",
        "phone": "+14155550100",
        "locale": "",
        "timezone": "",
        "preferences-TOTAL_FORMS": "1",
        "preferences-INITIAL_FORMS": "0",
        "preferences-MIN_NUM_FORMS": "0",
        "preferences-MAX_NUM_FORMS": "1000",
        "preferences-0-category": "",
        "preferences-0-channel": "sms",
        "preferences-0-recipient": recipient.pk,
        "devices-TOTAL_FORMS": "0",
        "devices-INITIAL_FORMS": "0",
        "devices-MIN_NUM_FORMS": "0",
        "devices-MAX_NUM_FORMS": "1000",
        "_save": "Save",
    }
    response = staff.post(url, form)
    assert response.status_code == 302, response.content.decode()[:2000]
    assert list(Preference.objects.values_list("channel", "category", "enabled")) == [
        ("sms", "", False)
    ]
    response = api.post("/api/v1/notifications", BODY, format="json")
    assert response.json()["deliveries"] == [
        {"channel": "email", "status": "queued"},
        {"channel": "sms", "status": "skipped", "reason": "opted_out"},
    ]


def test_recipient_contact_is_checked_as_the_api_does(owner: Any, staff: Client) -> None:
    url = reverse("admin:notifications_recipient_add")
    inlines = {
        f"{prefix}-{name}": value
        for prefix in ("preferences", "devices")
        for name, value in (
            ("TOTAL_FORMS", "0"),
            ("INITIAL_FORMS", "0"),
            ("MIN_NUM_FORMS", "0"),
            ("MAX_NUM_FORMS", "1000"),
        )
    }
    form = {
        **inlines,
        "owner": owner.pk,
        "external_id": "user-5",
        "email": "five@example.com",
        "locale": "fr",
    }
    response = staff.post(url, {**form, "phone": "555", "timezone": "Mars/Olympus"})
    assert response.status_code == 200
    assert response.context["adminform"].form.errors == {
        "phone": ["Enter a valid phone number in E.164 form, e.g. +14155550100."],
        "timezone": ["Unknown time zone; use an IANA name such as Europe/Paris."],
    }
    response = staff.post(url, {**form, "phone": " +1 415 555 0101", "timezone": "Europe/Paris"})
    assert response.status_code == 302
    assert Recipient.objects.filter(external_id="user-5").values_list(
        "phone", "timezone"
    ).get() == (
        "+14155550101",
        "Europe/Paris",
    )


def test_template_edit_in_admin_applies_to_the_next_request(
    api: Any, template: Any, staff: Client
) -> None:
    api.post("/api/v1/notifications", BODY, format="json")
    content = dict(template.content)
    content["sms"] = {"body": "Your order {{ order_id }} left the warehouse"}
    url = reverse("admin:notifications_template_change", args=[template.pk])
    response = staff.post(
        url,
        {
            "owner": template.owner_id,
            "key": "order_shipped",
            "category": "orders",
            "locale": "en",
            "content": json.dumps(content),
            "translations": "{}",
            "frequency_cap_scope": "template",
            "_save": "Save",
        },
    )
    assert response.status_code == 302
    created = api.post("/api/v1/notifications", BODY, format="json").json()
    sms = Delivery.objects.get(notification_id=created["id"], channel="sms")
    assert sms.content == {"body": "Your order A-1 left the warehouse"}


def test_admin_refuses_an_invalid_template(template: Any, staff: Client) -> None:
    url = reverse("admin:notifications_template_change", args=[template.pk])
    response = staff.post(
        url,
        {
            "owner": template.owner_id,
            "key": "order_shipped",
            "category": "orders",
            "locale": "en",
            "content": json.dumps({"sms": {"body": "{{ broken "}}),
            "translations": "{}",
            "_save": "Save",
        },
    )
    assert response.status_code == 200
    assert "content.sms.body: Template syntax error on line 1" in response.content.decode()


def test_revoking_a_key_in_admin_locks_it_out(api: Any, staff: Client, owner: Any) -> None:
    assert api.get("/api/v1/templates").status_code == 200
    response = staff.post(
        reverse("admin:notifications_apikey_changelist"),
        {
            "action": "revoke",
            "_selected_action": list(ApiKey.objects.values_list("pk", flat=True)),
        },
    )
    assert response.status_code == 302
    assert api.get("/api/v1/templates").status_code == 401


def test_cancelling_notifications_in_admin(api: Any, template: Any, staff: Client) -> None:
    later = (timezone.now() + timedelta(hours=1)).isoformat()
    scheduled = api.post(
        "/api/v1/notifications",
        {**BODY, "send_at": later, "cancel_key": "order-A-7"},
        format="json",
    )
    queued = api.post("/api/v1/notifications", BODY, format="json")
    first_sms = Delivery.objects.get(notification_id=queued.json()["id"], channel="sms")
    Delivery.objects.filter(pk=first_sms.pk).update(status=DeliveryStatus.SENT)
    response = staff.post(
        reverse("admin:notifications_notification_changelist"),
        {
            "action": "cancel",
            "_selected_action": [scheduled.json()["id"], queued.json()["id"]],
        },
        follow=True,
    )
    assert (
        "Cancelled 3 delivery(ies); 1 had already gone out or ended." in response.content.decode()
    )
    assert sorted(Delivery.objects.values_list("status", flat=True)) == [
        "cancelled",
        "cancelled",
        "cancelled",
        "sent",
    ]
    changelist = reverse("admin:notifications_notification_changelist")
    found = staff.get(changelist, {"q": "order-A-7"}).content.decode()
    assert scheduled.json()["id"][:8] in found
    assert queued.json()["id"][:8] not in found
    detail = reverse("admin:notifications_notification_change", args=[scheduled.json()["id"]])
    assert "order-A-7" in staff.get(detail).content.decode()


# --- Helpers ---------------------------------------------------------------------------------


def _dead_letters(owner: Any, channel: str, error: str, count: int) -> list[DeadLetter]:
    """`count` notifications of order_shipped on `channel` whose delivery died with `error`."""
    letters = []
    for _ in range(count):
        recipient = RecipientFactory(owner=owner)
        body = sending.notification_create(
            owner=owner,
            recipient=recipient.external_id,
            template_key="order_shipped",
            data={"order_id": "D-1"},
            channels=[channel],
        )
        delivery = Delivery.objects.select_related("notification__recipient").get(
            notification_id=body["id"]
        )
        delivery.status = DeliveryStatus.DEAD
        delivery.last_error = error
        delivery.save(update_fields=["status", "last_error"])
        letters.append(dead_letter_create(delivery=delivery, provider="sandbox", error=error))
    return letters


def _bulk_notifications(owner: Any, template: Any, count: int) -> list[Notification]:
    """`count` notifications, each to its own recipient, with an email and an sms delivery."""
    recipients = Recipient.objects.bulk_create(
        [
            Recipient(owner=owner, external_id=f"bulk-{i}", email=f"bulk-{i}@example.com")
            for i in range(count)
        ]
    )
    notifications = Notification.objects.bulk_create(
        [
            Notification(
                owner=owner,
                recipient=recipient,
                template=template,
                template_key=template.key,
                category=template.category,
                data={"order_id": f"B-{i}"},
            )
            for i, recipient in enumerate(recipients)
        ]
    )
    Delivery.objects.bulk_create(
        [
            Delivery(notification=n, channel=channel, status=status)
            for n in notifications
            for channel, status in (("email", DeliveryStatus.SENT), ("sms", DeliveryStatus.DEAD))
        ]
    )
    return notifications


def _rows(response: Any) -> list[Any]:
    return list(response.context["cl"].result_list)


# --- Every page -------------------------------------------------------------------------------


def test_every_admin_page_renders(api: Any, template: Any, owner: Any, staff: Client) -> None:
    from django.contrib import admin
    from django.test import RequestFactory

    from workers.services import delivery_process

    template.sample_data = {"order_id": "S-1"}
    template.save()
    accepted = api.post("/api/v1/notifications", BODY, format="json").json()
    recipient = Recipient.objects.get(external_id="user-42")
    DeviceFactory(recipient=recipient)
    Preference.objects.create(recipient=recipient, channel="push", enabled=False)
    for delivery in Delivery.objects.filter(status="queued"):
        delivery_process(delivery_id=delivery.pk)
    first_letter, second_letter = _dead_letters(owner, "sms", "Twilio 400: invalid number", 2)
    topic = Topic.objects.create(owner=owner, key="release-notes", name="Release notes")
    TopicSubscription.objects.create(topic=topic, recipient=recipient)
    topic_send = api.post(
        "/api/v1/notifications",
        {"topic": "release-notes", "template": "order_shipped", "data": {"order_id": "T-1"}},
        format="json",
    )
    assert topic_send.status_code == 202, topic_send.content
    suppression_add(
        owner_id=owner.pk,
        channel="email",
        address="user-42@example.com",
        reason="bounced",
        source="sendgrid",
        detail="sendgrid bounce: hard: 550 5.1.1 unknown user",
    )
    ProviderEvent.objects.create(
        provider="twilio",
        event_id="SM1:delivered:",
        kind="delivered",
        raw_status="delivered",
        message_id="SM1",
        payload={"MessageSid": "SM1", "MessageStatus": "delivered"},
        occurred_at=datetime.now(UTC),
    )
    hook = Webhook.objects.create(
        owner=owner, url="https://93.184.216.34/hook", event_types=["delivery.sent"], secret="s"
    )
    WebhookMessage.objects.create(
        webhook=hook,
        msg_id="msg_1",
        event_type="delivery.sent",
        event_key="delivery.sent:1",
        payload={"type": "delivery.sent"},
    )
    request = RequestFactory().get("/")
    request.user = get_user_model().objects.get(username="ops")

    def ok(url: str, response: Any, expected: int = 200) -> None:
        assert response.status_code == expected, (url, response.content.decode()[:2000])
        rendered.append(url)

    rendered: list[str] = []
    for model, model_admin in admin.site._registry.items():
        meta = model._meta
        prefix = f"admin:{meta.app_label}_{meta.model_name}"
        urls = [reverse(f"{prefix}_changelist")]
        obj = model.objects.first()
        if obj is not None:
            urls.append(reverse(f"{prefix}_change", args=[obj.pk]))
        if model_admin.has_add_permission(request):
            urls.append(reverse(f"{prefix}_add"))
        for url in urls:
            ok(url, staff.get(url))
    # 17 models (15 of Clarion's, users and groups): every changelist; a change page for the
    # 16 with a row (no group); an add page for the 9 that allow adding (notifications,
    # deliveries, sandbox messages, dead letters, suppressions, provider events, webhooks and
    # webhook messages do not).
    assert len(rendered) == 17 + 16 + 9

    # The filters and searches an operator uses, on every list that has them.
    notifications = reverse("admin:notifications_notification_changelist")
    deliveries = reverse("admin:notifications_delivery_changelist")
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    since = urlencode({"created_at__gte": midnight, "created_at__lt": midnight + timedelta(days=1)})
    for url in (
        f"{notifications}?delivery_status=sent&channel=email",
        f"{notifications}?q={accepted['id']}",
        f"{notifications}?q=user-42&priority__exact=normal&owner__id__exact={owner.pk}",
        f"{notifications}?{since}",
        f"{deliveries}?status__exact=sent&channel__exact=email&provider__exact=sandbox",
        f"{deliveries}?q=user-42",
        reverse("admin:workers_sandboxmessage_changelist") + "?channel__exact=email&q=user-42",
        reverse("admin:notifications_recipient_changelist")
        + f"?q=u@example.com&owner__id__exact={owner.pk}",
        reverse("admin:notifications_apikey_changelist") + "?q=acme",
    ):
        ok(url, staff.get(url))

    # The template's preview and "send a test".
    preview = reverse("admin:notifications_template_preview")
    ok(preview, staff.post(preview, {"content": json.dumps(template.content)}))
    send_test = reverse("admin:notifications_template_send_test", args=[template.pk])
    ok(send_test, staff.get(send_test))
    form = {"recipient": "user-42", "sample_data": json.dumps({"order_id": "S-1"})}
    ok(send_test, staff.post(send_test, form), expected=302)

    # The dead-letter summary, a group it links to, and both actions.
    letters = reverse("admin:workers_deadletter_changelist")
    [group] = staff.get(letters).context["dead_letter_groups"]
    ok(group["url"], staff.get(group["url"]))
    for action, letter in (("replay", first_letter), ("discard", second_letter)):
        ok(letters, staff.post(letters, {"action": action, "_selected_action": [letter.pk]}), 302)

    # An API key created (its one showing is the POST's own answer) and revoked.
    keys = reverse("admin:notifications_apikey_changelist")
    ok(
        keys,
        staff.post(reverse("admin:notifications_apikey_add"), {"owner": owner.pk, "name": "k"}),
    )
    created = ApiKey.objects.get(name="k")
    ok(keys, staff.post(keys, {"action": "revoke", "_selected_action": [created.pk]}), 302)
    # The suppression list searched by address, and a suppression lifted.
    suppressions = reverse("admin:notifications_suppression_changelist")
    found = staff.get(suppressions + "?q=user-42@")
    ok(suppressions, found)
    assert "user-42@example.com" in found.content.decode()
    assert "user-42@example.com" not in staff.get(suppressions + "?q=nobody").content.decode()
    [suppression] = Suppression.objects.all()
    lift = {"action": "lift", "_selected_action": [suppression.pk]}
    ok(suppressions, staff.post(suppressions, lift), 302)
    assert not Suppression.objects.exists()
    assert len(rendered) == 42 + 9 + 3 + 3 + 2 + 2
    assert dict(DeadLetter.objects.values_list("pk", "status")) == {
        first_letter.pk: "replayed",
        second_letter.pk: "discarded",
    }


# The notification changelist's queries, whatever the number of rows: session, user, the
# owner filter's choices, the filtered and the unfiltered counts, the page, the page's
# deliveries (one prefetch for all rows), the date hierarchy's range and its days, and the
# category filter's choices.
NOTIFICATION_CHANGELIST_QUERIES = 10


def test_notification_changelist_queries_do_not_grow_with_rows(
    owner: Any, template: Any, staff: Client
) -> None:
    notifications = _bulk_notifications(owner, template, 100)
    url = reverse("admin:notifications_notification_changelist")
    staff.get(url)  # the session's first read may touch more than later ones
    with CaptureQueriesContext(connection) as hundred:
        response = staff.get(url)
    assert response.status_code == 200
    assert len(_rows(response)) == 100
    page = response.content.decode()
    assert page.count('<span class="clarion-status clarion-status-sent">email: sent</span>') == 100
    assert page.count('<span class="clarion-status clarion-status-dead">sms: dead</span>') == 100
    assert page.count("partially_failed") == 100
    assert len(hundred) == NOTIFICATION_CHANGELIST_QUERIES, "\n".join(
        q["sql"][:150] for q in hundred
    )

    Notification.objects.filter(pk__in=[n.pk for n in notifications[10:]]).delete()
    with CaptureQueriesContext(connection) as ten:
        response = staff.get(url)
    assert len(_rows(response)) == 10
    assert len(ten) == NOTIFICATION_CHANGELIST_QUERIES, [q["sql"] for q in ten]


def test_notification_filters_and_search(owner: Any, template: Any, staff: Client) -> None:
    RecipientFactory(owner=owner, external_id="user-7", phone="")
    skipped = sending.notification_create(
        owner=owner, recipient="user-7", template_key="order_shipped", data={"order_id": "1"}
    )["id"]
    other = OwnerFactory(name="globex")
    Template.objects.create(
        owner=other, key="welcome", content={"web": {"title": "t", "body": "b"}}
    )
    RecipientFactory(owner=other, external_id="user-8")
    high = sending.notification_create(
        owner=other, recipient="user-8", template_key="welcome", data={}, priority="high"
    )["id"]
    url = reverse("admin:notifications_notification_changelist")

    def ids(query: str) -> list[str]:
        response = staff.get(f"{url}?{query}")
        assert response.status_code == 200
        return sorted(str(n.pk) for n in _rows(response))

    # user-7 has no phone and no device: sms and push are skipped, once each, and the
    # notification is listed once, not once per skipped delivery.
    assert list(
        Delivery.objects.filter(notification_id=skipped).values_list("channel", "status")
    ) == [("email", "queued"), ("sms", "skipped"), ("push", "skipped"), ("web", "queued")]
    assert ids("delivery_status=skipped") == [skipped]
    assert ids("delivery_status=queued") == sorted([skipped, high])
    assert ids("delivery_status=dead") == []
    assert ids("channel=email") == [skipped]
    assert ids("channel=web") == sorted([skipped, high])
    assert ids("priority__exact=high") == [high]
    assert ids(f"owner__id__exact={other.pk}") == [high]
    assert ids(f"q={skipped}") == [skipped]
    assert ids(f"q={skipped.upper()}") == [skipped]
    assert ids("q=user-8") == [high]
    assert ids("q=welcome") == [high]
    assert ids("q=no-such-thing") == []


def test_other_lists_search_and_filter(api: Any, owner: Any, template: Any, staff: Client) -> None:
    from workers.services import delivery_process

    api.post("/api/v1/notifications", BODY, format="json")
    other = OwnerFactory(name="globex")
    RecipientFactory(owner=other, external_id="user-99", email="z@example.org", phone="")
    for delivery in Delivery.objects.filter(status="queued"):
        delivery_process(delivery_id=delivery.pk)

    def rows(name: str, query: str) -> list[Any]:
        response = staff.get(reverse(f"admin:{name}_changelist") + f"?{query}")
        assert response.status_code == 200
        return _rows(response)

    recipients = "notifications_recipient"
    assert [r.external_id for r in rows(recipients, "q=user-42")] == ["user-42"]
    assert [r.external_id for r in rows(recipients, "q=z@example.org")] == ["user-99"]
    assert [r.external_id for r in rows(recipients, "q=+14155550100")] == ["user-42"]
    assert [r.external_id for r in rows(recipients, f"owner__id__exact={other.pk}")] == ["user-99"]
    sandbox = "workers_sandboxmessage"
    assert [(m.channel, m.to) for m in rows(sandbox, "channel__exact=sms")] == [
        ("sms", "+14155550100")
    ]
    assert sorted(m.channel for m in rows(sandbox, "q=user-42")) == ["email", "sms"]
    assert [m.channel for m in rows(sandbox, "q=u@example.com")] == ["email"]
    assert rows(sandbox, "q=user-99") == []
    deliveries = "notifications_delivery"
    assert [d.channel for d in rows(deliveries, "status__exact=sent&channel__exact=sms")] == ["sms"]
    assert sorted(d.channel for d in rows(deliveries, "provider__exact=sandbox")) == [
        "email",
        "sms",
    ]
    assert rows(deliveries, "status__exact=dead") == []
    assert sorted(d.channel for d in rows(deliveries, "q=user-42")) == ["email", "sms"]


# --- Template preview ---------------------------------------------------------------------------


def _preview(client: Client, **fields: Any) -> Any:
    return client.post(reverse("admin:notifications_template_preview"), fields)


def test_preview_renders_every_channel_exactly(template: Any, staff: Client) -> None:
    response = _preview(
        staff,
        content=json.dumps(template.content),
        sample_data=json.dumps({"order_id": "<A-1>"}),
        default_locale="en",
    )
    assert response.status_code == 200
    assert response.json() == {
        "ok": True,
        "locale": "en",
        "errors": {},
        "channels": {
            "email": {
                "ok": True,
                "fields": {
                    "subject": "Order <A-1> shipped",
                    "body": "Hi, <A-1> is on its way.",
                    # Email HTML is autoescaped, as when it is sent.
                    "html": "<p>Hi, &lt;A-1&gt; is on its way.</p>",
                },
            },
            "sms": {"ok": True, "fields": {"body": "Order <A-1> shipped"}},
            "push": {"ok": True, "fields": {"title": "Shipped", "body": "Order <A-1>"}},
            "web": {
                "ok": True,
                "fields": {"title": "Shipped", "body": "Order <A-1> is on its way"},
            },
        },
    }


def test_preview_one_channel_in_the_recipients_locale(staff: Client) -> None:
    response = _preview(
        staff,
        content=json.dumps({"sms": {"body": "Order {{ n }}"}, "web": {"title": "t", "body": "b"}}),
        translations=json.dumps({"fr": {"sms": {"body": "Commande {{ n }}"}}}),
        sample_data='{"n": 7}',
        default_locale="en",
        locale="fr-CA",
        channel="sms",
    )
    assert response.json() == {
        "ok": True,
        "locale": "fr",
        "errors": {},
        "channels": {"sms": {"ok": True, "fields": {"body": "Commande 7"}}},
    }


def test_preview_reports_mistakes_with_a_200(staff: Client) -> None:
    content = {
        "sms": {"body": "Order {{ order_id }} for {{ name }}"},
        "push": {"title": "{{ broken ", "body": "b"},
        "web": {"title": "Hi", "body": "ok"},
        "fax": {"body": "?"},
    }
    response = _preview(staff, content=json.dumps(content), sample_data='{"order_id": 1}')
    assert response.status_code == 200
    assert response.json() == {
        "ok": False,
        "locale": "en",
        "errors": {},
        "channels": {
            "sms": {"ok": False, "errors": {"data.name": ["Missing template variable."]}},
            "push": {
                "ok": False,
                "errors": {
                    "content.push.title": [
                        "Template syntax error on line 1: unexpected end of template, "
                        "expected 'end of print statement'."
                    ]
                },
            },
            "web": {"ok": True, "fields": {"title": "Hi", "body": "ok"}},
            "fax": {
                "ok": False,
                "errors": {"content.fax": ["Unknown channel; use one of email, sms, push, web."]},
            },
        },
    }

    response = _preview(staff, content='{"sms": {"body": "x"}', sample_data="[1]")
    assert response.status_code == 200
    assert response.json() == {
        "ok": False,
        "locale": None,
        "errors": {
            "content": ["Not valid JSON: Expecting ',' delimiter (line 1, column 22)."],
            "sample_data": ['Must be a JSON object, e.g. {"name": "Ada"}.'],
        },
        "channels": {},
    }
    response = _preview(staff, content="{}")
    assert response.json()["errors"] == {
        "content": ["Add at least one channel: email, sms, push or web."]
    }
    # A template that only fails while rendering (division by zero) is reported too.
    response = _preview(staff, content=json.dumps({"sms": {"body": "{{ 1 // 0 }}"}}))
    assert response.json()["channels"] == {
        "sms": {
            "ok": False,
            "errors": {
                "content.sms.body": [
                    "Template could not be rendered: integer division or modulo by zero"
                ]
            },
        }
    }


def test_preview_is_refused_to_anyone_but_staff_and_needs_csrf(
    template: Any, staff: Client
) -> None:
    url = reverse("admin:notifications_template_preview")
    fields = {"content": json.dumps(template.content), "sample_data": '{"order_id": "1"}'}
    anonymous = Client().post(url, fields)
    assert (anonymous.status_code, anonymous["Location"]) == (
        302,
        f"/admin/login/?next={url}",
    )
    clerk = Client()
    clerk.force_login(get_user_model().objects.create_user("clerk", password="pw-clerk-123"))
    refused = clerk.post(url, fields)
    assert (refused.status_code, refused["Location"]) == (302, f"/admin/login/?next={url}")
    # Staff without any right on templates.
    viewer = Client()
    viewer.force_login(
        get_user_model().objects.create_user("viewer", password="pw-viewer-123", is_staff=True)
    )
    assert viewer.post(url, fields).status_code == 403
    assert staff.get(url).status_code == 405

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(get_user_model().objects.get(username="ops"))
    assert strict.post(url, fields).status_code == 403
    page = strict.get(reverse("admin:notifications_template_change", args=[template.pk]))
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode())
    assert token is not None
    answer = strict.post(url, fields, headers={"X-CSRFToken": token.group(1)})
    assert answer.status_code == 200
    assert answer.json()["channels"]["sms"] == {"ok": True, "fields": {"body": "Order 1 shipped"}}


def test_change_form_has_the_preview_and_the_send_test_button(template: Any, staff: Client) -> None:
    page = staff.get(reverse("admin:notifications_template_change", args=[template.pk]))
    html = page.content.decode()
    preview = reverse("admin:notifications_template_preview")
    send_test = reverse("admin:notifications_template_send_test", args=[template.pk])
    assert f'data-preview-url="{preview}"' in html
    assert f'<a href="{send_test}" class="clarion-send-test">Send a test</a>' in html
    assert '<script src="/static/clarion_admin/template_preview.js"></script>' in html
    # Content is shown indented, channels and fields in the documented order (PostgreSQL's
    # jsonb keeps neither), so that a person can read and edit it.
    shown = re.search(r'<textarea name="content"[^>]*>\n?(.*?)</textarea>', html, re.S)
    assert shown is not None
    assert unescape(shown.group(1)) == json.dumps(ORDER_SHIPPED, indent=2)
    add = staff.get(reverse("admin:notifications_template_add")).content.decode()
    assert f'data-preview-url="{preview}"' in add
    assert "clarion-send-test" not in add


def test_sample_data_is_saved_with_the_template(template: Any, staff: Client) -> None:
    url = reverse("admin:notifications_template_change", args=[template.pk])
    form = {
        "owner": template.owner_id,
        "key": "order_shipped",
        "category": "orders",
        "locale": "en",
        "content": json.dumps(template.content),
        "translations": "",
        "sample_data": '{"order_id": "A-9"}',
        "frequency_cap_scope": "template",
        "_save": "Save",
    }
    assert staff.post(url, form).status_code == 302
    template.refresh_from_db()
    assert (template.sample_data, template.translations) == ({"order_id": "A-9"}, {})
    response = staff.post(url, {**form, "sample_data": "[1, 2]"})
    assert response.status_code == 200
    assert "Must be a JSON object, e.g. {&quot;order_id&quot;: &quot;A-1&quot;}." in (
        response.content.decode()
    )


# --- Send a test ------------------------------------------------------------------------------


def test_send_test_creates_one_notification_for_the_chosen_recipient(
    owner: Any, template: Any, staff: Client
) -> None:
    template.sample_data = {"order_id": "T-1"}
    template.save()
    RecipientFactory(owner=owner, external_id="user-42")
    RecipientFactory(owner=owner, external_id="user-43")
    url = reverse("admin:notifications_template_send_test", args=[template.pk])
    form = staff.get(url).content.decode()
    assert "{\n  &quot;order_id&quot;: &quot;T-1&quot;\n}</textarea>" in form

    response = staff.post(url, {"recipient": "user-42", "sample_data": '{"order_id": "T-1"}'})
    assert response.status_code == 302
    assert response["Location"] == reverse(
        "admin:notifications_template_change", args=[template.pk]
    )
    notification = Notification.objects.select_related("recipient").get()
    assert (
        notification.recipient.external_id,
        notification.template_key,
        notification.priority,
        notification.data,
    ) == ("user-42", "order_shipped", "normal", {"order_id": "T-1"})
    assert list(
        notification.deliveries.order_by("id").values_list("channel", "status", "content")
    ) == [
        (
            "email",
            "queued",
            {
                "subject": "Order T-1 shipped",
                "body": "Hi, T-1 is on its way.",
                "html": "<p>Hi, T-1 is on its way.</p>",
            },
        ),
        ("sms", "queued", {"body": "Order T-1 shipped"}),
        ("push", "skipped", {"title": "Shipped", "body": "Order T-1"}),
        ("web", "queued", {"title": "Shipped", "body": "Order T-1 is on its way"}),
    ]
    link = reverse("admin:notifications_notification_change", args=[notification.pk])
    shown = staff.get(response["Location"]).content.decode()
    assert (
        f'Test notification <a href="{link}">{notification.pk}</a> accepted: email queued, '
        "sms queued, push skipped (no address), web queued."
    ) in shown


def test_send_test_refuses_bad_input_without_sending(
    owner: Any, template: Any, staff: Client
) -> None:
    RecipientFactory(owner=owner, external_id="user-42")
    OwnerFactory(name="globex")
    RecipientFactory(owner__name="globex", external_id="stranger")
    url = reverse("admin:notifications_template_send_test", args=[template.pk])
    for form, errors in (
        ({"recipient": "nobody"}, {"recipient": ["No recipient 'nobody' belongs to acme."]}),
        ({"recipient": "stranger"}, {"recipient": ["No recipient 'stranger' belongs to acme."]}),
        (
            {"recipient": "user-42", "sample_data": "{}"},
            {"sample_data": ["data.order_id: Missing template variable."]},
        ),
        (
            {"recipient": "user-42", "sample_data": "[]"},
            {"sample_data": ['Must be a JSON object, e.g. {"order_id": "A-1"}.']},
        ),
        (
            {"recipient": "user-42", "sample_data": "{", "channels": ["sms", "fax"]},
            {
                "sample_data": ["Enter a valid JSON."],
                "channels": ["Select a valid choice. fax is not one of the available choices."],
            },
        ),
    ):
        response = staff.post(url, form)
        assert response.status_code == 200
        assert response.context["form"].errors == errors, form
    assert Notification.objects.count() == 0
    for missing in ("abc", "999999"):
        url = reverse("admin:notifications_template_send_test", args=[missing])
        assert staff.get(url).status_code == 404


# --- Notification timeline ----------------------------------------------------------------------


class _FakeDeliveryLog:
    """A delivery log that is not the SQL one (as with Cassandra): the admin must read it."""

    def __init__(self, attempts: list[AttemptRecord], events: list[StatusEvent]):
        self.attempts = attempts
        self.events = events

    def attempts_for_deliveries(
        self, *, notification_id: str, delivery_ids: list[int]
    ) -> dict[int, list[AttemptRecord]]:
        out: dict[int, list[AttemptRecord]] = {}
        for attempt in self.attempts:
            if attempt.delivery_id in delivery_ids:
                out.setdefault(attempt.delivery_id, []).append(attempt)
        return out

    def events_for_notification(self, *, notification_id: str) -> list[StatusEvent]:
        return [e for e in self.events if e.notification_id == notification_id]


def test_notification_page_shows_the_timeline_from_the_delivery_log(
    owner: Any, template: Any, staff: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    RecipientFactory(owner=owner, external_id="user-42", phone="")
    nid = sending.notification_create(
        owner=owner,
        recipient="user-42",
        template_key="order_shipped",
        data={"order_id": "1"},
        channels=["email", "sms"],
    )["id"]
    email, sms = Delivery.objects.filter(notification_id=nid).order_by("id")
    t0 = datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)
    common = {"notification_id": nid, "owner_id": owner.pk, "recipient_id": "user-42"}

    def attempt(n: int, outcome: str, code: int | None, error: str, at: timedelta) -> Any:
        return AttemptRecord(
            delivery_id=email.pk,
            channel="email",
            number=n,
            provider="sendgrid",
            outcome=outcome,
            status_code=code,
            provider_message_id="",
            error=error,
            started_at=t0 + at,
            latency_ms=12.345,
            **common,
        )

    def event(delivery: Delivery, status: str, at: timedelta, detail: str = "") -> Any:
        return StatusEvent(
            delivery_id=delivery.pk,
            channel=delivery.channel,
            status=status,
            at=t0 + at,
            detail=detail,
            **common,
        )

    log = _FakeDeliveryLog(
        attempts=[
            attempt(1, "transient", 503, "Service Unavailable", timedelta(seconds=1)),
            attempt(2, "ok", 202, "", timedelta(seconds=3)),
        ],
        events=[
            event(email, "queued", timedelta(0)),
            event(sms, "skipped", timedelta(0), "no_address"),
            event(email, "retrying", timedelta(seconds=1)),
            event(email, "sent", timedelta(seconds=3)),
        ],
    )
    monkeypatch.setattr("notifications.delivery_log.get_delivery_log", lambda: log)
    response = staff.get(reverse("admin:notifications_notification_change", args=[nid]))
    assert response.status_code == 200
    rows = re.findall(
        r'<tr class="clarion-timeline-(\w+)">(.*?)</tr>', response.content.decode(), re.S
    )
    cells = [(kind, re.findall(r"<td>(.*?)</td>", row)) for kind, row in rows]
    e, s = f"email #{email.pk}", f"sms #{sms.pk}"
    assert cells == [
        ("status", ["2026-01-02 03:04:05.006", e, "queued", "", "", ""]),
        ("status", ["2026-01-02 03:04:05.006", s, "skipped", "", "no_address", ""]),
        (
            "attempt",
            [
                "2026-01-02 03:04:06.006",
                e,
                "attempt 1: transient",
                "sendgrid",
                "HTTP 503 Service Unavailable",
                "12.3 ms",
            ],
        ),
        ("status", ["2026-01-02 03:04:06.006", e, "retrying", "", "", ""]),
        (
            "attempt",
            ["2026-01-02 03:04:08.006", e, "attempt 2: ok", "sendgrid", "HTTP 202", "12.3 ms"],
        ),
        ("status", ["2026-01-02 03:04:08.006", e, "sent", "", "", ""]),
    ]
    # The delivery's own page shows its part of the same timeline.
    response = staff.get(reverse("admin:notifications_delivery_change", args=[sms.pk]))
    rows = re.findall(
        r'<tr class="clarion-timeline-(\w+)">(.*?)</tr>', response.content.decode(), re.S
    )
    assert [re.findall(r"<td>(.*?)</td>", row) for _, row in rows] == [
        ["2026-01-02 03:04:05.006", s, "skipped", "", "no_address", ""]
    ]


def test_timeline_of_a_real_delivery_on_the_sql_log(api: Any, template: Any, staff: Client) -> None:
    from workers.services import delivery_process

    nid = api.post("/api/v1/notifications", {**BODY, "channels": ["sms"]}, format="json").json()[
        "id"
    ]
    [sms] = Delivery.objects.filter(notification_id=nid)
    delivery_process(delivery_id=sms.pk)
    html = staff.get(reverse("admin:notifications_notification_change", args=[nid])).content
    rows = re.findall(r'<tr class="clarion-timeline-(\w+)">(.*?)</tr>', html.decode(), re.S)
    summary = [(kind, re.findall(r"<td>(.*?)</td>", row)[1:5]) for kind, row in rows]
    assert summary == [
        ("status", [f"sms #{sms.pk}", "queued", "", ""]),
        ("attempt", [f"sms #{sms.pk}", "attempt 1: ok", "sandbox", ""]),
        ("status", [f"sms #{sms.pk}", "sent", "", "sandbox"]),
    ]


# --- Dead letters -------------------------------------------------------------------------------


def test_dead_letter_summary_groups_by_channel_and_error(
    owner: Any, template: Any, staff: Client
) -> None:
    bounced = "SMTP 550: 5.1.1 mailbox unavailable"
    timeout = "SMTP timeout after 10 s"
    invalid = "Twilio 400: invalid number"
    mailbox = _dead_letters(owner, "email", bounced, 3)
    _dead_letters(owner, "email", timeout, 1)
    numbers = _dead_letters(owner, "sms", invalid, 3)
    DeadLetter.objects.filter(pk=numbers[0].pk).update(status="discarded")
    url = reverse("admin:workers_deadletter_changelist")
    response = staff.get(url)
    assert response.status_code == 200
    groups = response.context["dead_letter_groups"]
    assert [(g["channel"], g["error"], g["count"]) for g in groups] == [
        ("email", bounced, 3),
        ("sms", invalid, 2),
        ("email", timeout, 1),
    ]
    html = response.content.decode()
    assert groups[0]["url"] == (
        f"{url}?status__exact=open&channel=email&error=SMTP+550%3A+5.1.1+mailbox+unavailable"
    )
    assert f'<a href="{escape(groups[0]["url"])}">{bounced}</a>' in html

    filtered = staff.get(groups[0]["url"])
    assert sorted(letter.pk for letter in _rows(filtered)) == sorted(m.pk for m in mailbox)
    assert [letter.pk for letter in _rows(staff.get(groups[1]["url"]))] == [
        numbers[2].pk,
        numbers[1].pk,
    ]
    # Replay the whole first group from its filtered list: its deliveries go back to queued.
    response = staff.post(
        groups[0]["url"], {"action": "replay", "_selected_action": [m.pk for m in mailbox]}
    )
    assert response.status_code == 302
    assert set(
        Delivery.objects.filter(dead_letters__in=mailbox).values_list("status", flat=True)
    ) == {"queued"}
    response = staff.post(url, {"action": "discard", "_selected_action": [numbers[1].pk]})
    assert response.status_code == 302
    assert [
        (g["channel"], g["error"], g["count"]) for g in staff.get(url).context["dead_letter_groups"]
    ] == [("email", timeout, 1), ("sms", invalid, 1)]


# --- API keys -----------------------------------------------------------------------------------


def test_api_key_created_in_admin_is_shown_once_and_works(
    owner: Any, template: Any, staff: Client
) -> None:
    add = reverse("admin:notifications_apikey_add")
    form = staff.get(add)
    assert form.status_code == 200
    assert list(form.context["adminform"].form.fields) == ["owner", "name"]

    response = staff.post(add, {"owner": owner.pk, "name": "orders-service"})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    html = response.content.decode()
    [raw_key] = re.findall(
        r'<code id="clarion-raw-key" class="clarion-raw-key">([^<]+)</code>', html
    )
    assert raw_key.startswith("clr_")
    assert html.count(raw_key) == 1
    api_key = ApiKey.objects.get(name="orders-service")
    assert (api_key.owner, api_key.prefix, api_key.key_hash, api_key.revoked_at) == (
        owner,
        raw_key[:12],
        hashlib.sha256(raw_key.encode()).hexdigest(),
        None,
    )
    # Only the hash is kept: no column, session or cookie holds the raw key.
    assert all(raw_key not in str(row) for row in ApiKey.objects.values_list())
    assert all(raw_key not in str(s.get_decoded()) for s in Session.objects.all())
    assert raw_key not in str(response.cookies)
    assert LogEntry.objects.get(object_id=str(api_key.pk)).action_flag == ADDITION
    # Never shown again.
    for url in (
        reverse("admin:notifications_apikey_change", args=[api_key.pk]),
        reverse("admin:notifications_apikey_changelist"),
        reverse("admin:index"),
    ):
        page = staff.get(url)
        assert page.status_code == 200
        assert raw_key not in page.content.decode()
        assert raw_key[:13] not in page.content.decode()

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    answer = client.get("/api/v1/templates")
    assert answer.status_code == 200
    assert [t["key"] for t in answer.json()] == ["order_shipped"]


def test_api_key_add_form_errors_and_permissions(owner: Any, staff: Client) -> None:
    add = reverse("admin:notifications_apikey_add")
    response = staff.post(add, {"owner": owner.pk, "name": ""})
    assert response.status_code == 200
    assert "This field is required." in response.content.decode()
    assert ApiKey.objects.count() == 0
    viewer = Client()
    user = get_user_model().objects.create_user("viewer", password="pw-viewer-123", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_apikey"))
    viewer.force_login(user)
    assert viewer.post(add, {"owner": owner.pk, "name": "x"}).status_code == 403
    assert ApiKey.objects.count() == 0


def test_api_key_rate_limit_is_edited_in_admin_and_applies_at_once(
    api: Any, owner: Any, staff: Client
) -> None:
    from django.core.cache import cache

    from core import cache as keys
    from notifications.api.throttling import api_key_bucket_capacity

    assert api.get("/api/v1/templates").status_code == 200  # caches the key as it was
    api_key = ApiKey.objects.get(owner=owner)
    url = reverse("admin:notifications_apikey_change", args=[api_key.pk])
    form = staff.get(url).context["adminform"].form
    assert list(form.fields) == ["rate_limit_per_second"]
    response = staff.post(url, {"rate_limit_per_second": "1", "_save": "Save"})
    assert response.status_code == 302
    api_key.refresh_from_db()
    assert (api_key.rate_limit_per_second, api_key.name) == (1, "acme-key")
    assert cache.get(keys.api_key_key(api_key.key_hash)) is None
    allowed = int(api_key_bucket_capacity(1))
    statuses = [api.get("/api/v1/templates").status_code for _ in range(allowed + 1)]
    assert statuses == [200] * allowed + [429]


def test_delivery_rules_are_edited_and_checked_in_admin(template: Any, staff: Client) -> None:
    url = reverse("admin:notifications_template_change", args=[template.pk])
    form = {
        "owner": template.owner_id,
        "key": "order_shipped",
        "category": "orders",
        "locale": "en",
        "content": json.dumps(template.content),
        "translations": "",
        "frequency_caps": '{"email": "3/1h", "sms": "1/1d"}',
        "frequency_cap_scope": "category",
        "escalation": '[{"after": "15m", "unless": "read", "channel": "sms"}]',
        "_save": "Save",
    }
    assert staff.post(url, form).status_code == 302
    template.refresh_from_db()
    assert template.frequency_caps == {"email": "3/1h", "sms": "1/1d"}
    assert template.frequency_cap_scope == "category"
    assert template.escalation == [{"after": "15m", "unless": "read", "channel": "sms"}]
    page = staff.get(url).content.decode()
    assert "Delivery rules" in page and "3/1h" in page

    response = staff.post(
        url,
        {
            **form,
            "frequency_caps": '{"email": "3 per hour", "fax": "1/1d"}',
            "escalation": '[{"after": "soon", "channel": "sms"}]',
        },
    )
    assert response.status_code == 200
    text = response.content.decode()
    assert "frequency_caps.email: A cap is N/window, e.g. 3/1h or 1/1d." in text
    assert "frequency_caps.fax: Unknown channel" in text
    assert "escalation.0.after: A duration is a number and a unit" in text
    template.refresh_from_db()
    assert template.frequency_caps == {"email": "3/1h", "sms": "1/1d"}


def test_quiet_hours_are_edited_and_checked_in_admin(owner: Any, staff: Client) -> None:
    recipient = RecipientFactory(owner=owner, external_id="night-owl", timezone="Europe/Paris")
    url = reverse("admin:notifications_recipient_change", args=[recipient.pk])
    form = {
        "owner": owner.pk,
        "external_id": "night-owl",
        "email": "",
        "phone": "",
        "locale": "",
        "timezone": "Europe/Paris",
        "quiet_hours": '{"start": "22:00", "end": "07:00", "channels": ["sms"]}',
        "preferences-TOTAL_FORMS": "0",
        "preferences-INITIAL_FORMS": "0",
        "devices-TOTAL_FORMS": "0",
        "devices-INITIAL_FORMS": "0",
        "_save": "Save",
    }
    assert staff.post(url, form).status_code == 302
    recipient.refresh_from_db()
    assert recipient.quiet_hours == {"start": "22:00", "end": "07:00", "channels": ["sms"]}
    listing = staff.get(reverse("admin:notifications_recipient_changelist")).content.decode()
    assert "22:00-07:00 (sms)" in listing
    response = staff.post(url, {**form, "quiet_hours": '{"start": "25:00", "end": "07:00"}'})
    assert response.status_code == 200
    assert "quiet_hours.start: A time of day HH:MM" in response.content.decode()
