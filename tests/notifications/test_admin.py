"""The Django admin: every page renders for staff, and edits made there (preferences,
templates, API key revocation) take effect on the very next API request."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from notifications.models import ApiKey, Delivery, Preference, Recipient
from tests.factories import DeviceFactory

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


def test_template_edit_in_admin_applies_to_the_next_request(
    api: Any, template: Any, staff: Client
) -> None:
    import json

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
            "_save": "Save",
        },
    )
    assert response.status_code == 302
    created = api.post("/api/v1/notifications", BODY, format="json").json()
    sms = Delivery.objects.get(notification_id=created["id"], channel="sms")
    assert sms.content == {"body": "Your order A-1 left the warehouse"}


def test_admin_refuses_an_invalid_template(template: Any, staff: Client) -> None:
    import json

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


def test_every_admin_page_renders(api: Any, template: Any, staff: Client) -> None:
    from django.contrib import admin
    from django.test import RequestFactory

    from workers.services import delivery_process

    api.post("/api/v1/notifications", BODY, format="json")
    recipient = Recipient.objects.get(external_id="user-42")
    DeviceFactory(recipient=recipient)
    Preference.objects.create(recipient=recipient, channel="push", enabled=False)
    for delivery in Delivery.objects.filter(status="queued"):
        delivery_process(delivery_id=delivery.pk)
    request = RequestFactory().get("/")
    request.user = get_user_model().objects.get(username="ops")

    rendered = []
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
            assert staff.get(url).status_code == 200, url
            rendered.append(url)
    # 11 models (9 of Clarion's, users and groups): every changelist, a change page for the 9
    # with a row (no group, no dead letter here), an add page for the 6 that allow adding
    # (API keys, notifications, deliveries, sandbox messages and dead letters do not).
    assert len(rendered) == 11 + 9 + 6
