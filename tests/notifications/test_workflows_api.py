"""Quiet hours, frequency caps, escalation and the locale chain through the API: what is
answered, what is written, and how bad settings are refused."""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.core.cache import cache
from django.utils import timezone
from redis.exceptions import RedisError
from rest_framework.test import APIClient

from notifications import accepting, frequency_caps
from notifications.models import Delivery, DeliveryEvent, Recipient
from tests.factories import TemplateFactory

pytestmark = pytest.mark.django_db

URL = "/api/v1/notifications"


def send(api: Any, rid: str = "user-1", **fields: Any) -> Any:
    body = {
        "recipient": {"id": rid, "email": f"{rid}@example.com", "phone": "+14155550100"},
        "template": "order_shipped",
        "data": {"order_id": "A-1"},
        **fields,
    }
    return api.post(URL, body, format="json")


def statuses(response: Any) -> dict[str, Any]:
    assert response.status_code == 202, response.content
    return {d["channel"]: d for d in response.json()["deliveries"]}


# --- Quiet hours ------------------------------------------------------------------------------


def test_quiet_hours_are_a_preference(api: Any, template: Any) -> None:
    send(api)
    url = "/api/v1/recipients/user-1/preferences"
    assert api.get(url).json()["quiet_hours"] is None
    window = {"start": "22:00", "end": "07:00", "channels": ["push", "sms"]}
    answer = api.put(url, {"quiet_hours": window}, format="json")
    assert answer.status_code == 200
    assert answer.json()["quiet_hours"] == {
        "start": "22:00",
        "end": "07:00",
        "channels": ["sms", "push"],
    }
    # A partial update leaves them; null removes them.
    api.put(url, {"channels": {"email": False}}, format="json")
    assert api.get(url).json()["quiet_hours"]["start"] == "22:00"
    assert api.put(url, {"quiet_hours": None}, format="json").json()["quiet_hours"] is None

    bad = api.put(url, {"quiet_hours": {"start": "9pm", "end": "07:00"}}, format="json")
    assert bad.status_code == 400
    assert "quiet_hours.start" in bad.json()["fields"]
    bad = api.put(url, {"quiet_hours": {"start": "21:00", "end": "21:00"}}, format="json")
    assert bad.status_code == 400


def test_a_bad_preferences_document_names_every_bad_path_and_changes_nothing(
    api: Any, template: Any
) -> None:
    send(api)
    url = "/api/v1/recipients/user-1/preferences"
    before = api.get(url).json()
    bad = api.put(
        url,
        {
            "channels": {"email": False, "fax": True, "sms": "no"},
            "categories": {"billing": {"push": 1}, "news": [], "x" * 101: {"sms": False}},
            "quiet_hours": {"start": "9pm", "end": "07:00", "channels": ["carrier-pigeon"]},
            "colour": "blue",
        },
        format="json",
    )
    assert bad.status_code == 400
    assert bad.json()["fields"] == {
        "colour": ["Unknown field; use channels, categories and quiet_hours."],
        "channels.fax": ["Unknown channel; use email, sms, push, web."],
        "channels.sms": ["Must be true or false."],
        "categories.billing.push": ["Must be true or false."],
        "categories.news": ["Must be an object of channel: true|false."],
        f"categories.{'x' * 101}": ["A category name is 1 to 100 characters."],
        "quiet_hours.start": ["A time of day HH:MM, 00:00 to 23:59."],
        "quiet_hours.channels": ["Unknown channel; use email, sms, push, web."],
    }
    # channels.email was valid, but nothing of a refused document is applied.
    assert api.get(url).json() == before
    for body, fields in (
        ([1, 2], {"non_field_errors": ["Must be an object."]}),
        ({"categories": "billing"}, {"categories": ["Must be an object keyed by category."]}),
    ):
        answer = api.put(url, body, format="json")
        assert answer.status_code == 400
        assert answer.json()["fields"] == fields


def _window_around_now(zone: str) -> tuple[dict[str, str], datetime]:
    """A window from an hour ago to an hour ahead on the zone's wall clock, and when it ends."""
    local = timezone.now().astimezone(zoneinfo.ZoneInfo(zone))
    start = local - timedelta(hours=1)
    end = (local + timedelta(hours=1)).replace(second=0, microsecond=0)
    return {"start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")}, end.astimezone(UTC)


def test_a_delivery_due_in_quiet_hours_is_held_until_they_end(api: Any, template: Any) -> None:
    window, ends = _window_around_now("Asia/Kolkata")
    api.put(
        "/api/v1/recipients/user-1",
        {"email": "u1@example.com", "phone": "+14155550100", "timezone": "Asia/Kolkata"},
        format="json",
    )
    api.put(
        "/api/v1/recipients/user-1/preferences",
        {"quiet_hours": {**window, "channels": ["sms"]}},
        format="json",
    )
    answer = statuses(
        api.post(
            URL,
            {"recipient": "user-1", "template": "order_shipped", "data": {"order_id": "A-1"}},
            format="json",
        )
    )
    assert answer["email"] == {"channel": "email", "status": "queued"}
    assert answer["sms"] == {
        "channel": "sms",
        "status": "scheduled",
        "reason": "quiet_hours",
        "scheduled_for": ends.isoformat().replace("+00:00", "Z"),
    }
    sms = Delivery.objects.get(channel="sms")
    assert (sms.status, sms.next_attempt_at, sms.skip_reason) == ("scheduled", ends, "quiet_hours")
    assert DeliveryEvent.objects.get(delivery=sms).detail == "quiet_hours"

    # Critical goes through.
    critical = statuses(
        api.post(
            URL,
            {
                "recipient": "user-1",
                "template": "order_shipped",
                "data": {"order_id": "A-2"},
                "priority": "critical",
            },
            format="json",
        )
    )
    assert critical["sms"] == {"channel": "sms", "status": "queued"}


def test_a_scheduled_send_inside_quiet_hours_waits_for_their_end(api: Any, template: Any) -> None:
    api.put(
        "/api/v1/recipients/user-1",
        {"phone": "+14155550100", "timezone": "America/New_York"},
        format="json",
    )
    api.put(
        "/api/v1/recipients/user-1/preferences",
        {"quiet_hours": {"start": "15:00", "end": "17:00"}},
        format="json",
    )
    # 20:00 UTC on 15 June 2030 is 16:00 EDT: held until 17:00 EDT, 21:00 UTC.
    answer = api.post(
        URL,
        {
            "recipient": "user-1",
            "template": "order_shipped",
            "data": {"order_id": "A-1"},
            "channels": ["sms"],
            "send_at": "2030-06-15T20:00:00Z",
        },
        format="json",
    )
    assert statuses(answer)["sms"]["scheduled_for"] == "2030-06-15T21:00:00Z"
    # Outside the window the time asked for stands.
    answer = api.post(
        URL,
        {
            "recipient": "user-1",
            "template": "order_shipped",
            "data": {"order_id": "A-2"},
            "channels": ["sms"],
            "send_at": "2030-06-15T22:00:00Z",
        },
        format="json",
    )
    assert statuses(answer)["sms"] == {
        "channel": "sms",
        "status": "scheduled",
        "scheduled_for": "2030-06-15T22:00:00Z",
    }


# --- Frequency caps ---------------------------------------------------------------------------


@pytest.fixture
def capped(owner: Any) -> Any:
    return TemplateFactory(
        owner=owner, frequency_caps={"sms": "2/1h"}, content={"sms": {"body": "{{ order_id }}"}}
    )


def test_over_the_cap_a_delivery_is_skipped(api: Any, capped: Any) -> None:
    answers = [statuses(send(api))["sms"] for _ in range(3)]
    assert answers == [
        {"channel": "sms", "status": "queued"},
        {"channel": "sms", "status": "queued"},
        {"channel": "sms", "status": "skipped", "reason": "frequency_capped"},
    ]
    # Per recipient: another one is not capped.
    assert statuses(send(api, "user-2"))["sms"]["status"] == "queued"
    # Critical is counted but never capped.
    assert statuses(send(api, priority="critical"))["sms"]["status"] == "queued"
    assert Delivery.objects.filter(skip_reason="frequency_capped").count() == 1


def test_a_bulk_request_counts_its_own_items(api: Any, capped: Any) -> None:
    item = {
        "recipient": {"id": "user-1", "phone": "+14155550100"},
        "template": "order_shipped",
        "data": {"order_id": "A-1"},
    }
    answer = api.post(URL + "/bulk", {"notifications": [item] * 4}, format="json").json()
    assert [r["deliveries"][0]["status"] for r in answer["results"]] == [
        "queued",
        "queued",
        "skipped",
        "skipped",
    ]


def test_a_category_cap_counts_every_template_of_the_category(api: Any, owner: Any) -> None:
    for key in ("order_shipped", "order_delayed"):
        TemplateFactory(
            owner=owner,
            key=key,
            category="orders",
            frequency_caps={"sms": "2/1d"},
            frequency_cap_scope="category",
            content={"sms": {"body": "{{ order_id }}"}},
        )
    assert statuses(send(api))["sms"]["status"] == "queued"
    assert statuses(send(api, template="order_delayed"))["sms"]["status"] == "queued"
    assert statuses(send(api))["sms"]["reason"] == "frequency_capped"


def test_the_database_is_the_truth_when_redis_lost_the_counts(api: Any, capped: Any) -> None:
    send(api)
    send(api)
    cache.clear()  # a Redis flush
    assert statuses(send(api))["sms"]["reason"] == "frequency_capped"


def test_with_redis_down_the_database_count_decides(
    api: Any, capped: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(checks: Any) -> Any:
        raise RedisError("connection refused")

    monkeypatch.setattr(frequency_caps, "_take_in_redis", down)
    assert statuses(send(api))["sms"]["status"] == "queued"
    assert statuses(send(api))["sms"]["status"] == "queued"
    assert statuses(send(api))["sms"]["reason"] == "frequency_capped"
    assert statuses(send(api, priority="critical"))["sms"]["status"] == "queued"


def test_a_write_that_fails_gives_its_place_back(
    api: Any, capped: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    send(api)
    real_write = accepting.notifications_write

    def failing(**kwargs: Any) -> None:
        raise RuntimeError("database went away")

    monkeypatch.setattr(accepting, "notifications_write", failing)
    with pytest.raises(RuntimeError):
        send(api)
    monkeypatch.setattr(accepting, "notifications_write", real_write)
    assert statuses(send(api))["sms"]["status"] == "queued"
    assert statuses(send(api))["sms"]["reason"] == "frequency_capped"


# --- Template rules through the API -----------------------------------------------------------


def test_templates_carry_caps_and_escalation(api: Any) -> None:
    body = {
        "key": "alert",
        "content": {"web": {"title": "Alert", "body": "{{ what }}"}, "sms": {"body": "{{ what }}"}},
        "frequency_caps": {"sms": "1/1d"},
        "frequency_cap_scope": "category",
        "escalation": [{"after": "15m", "unless": "read", "channel": "sms"}],
    }
    created = api.post("/api/v1/templates", body, format="json")
    assert created.status_code == 201, created.content
    got = api.get("/api/v1/templates/alert").json()
    assert got["frequency_caps"] == {"sms": "1/1d"}
    assert got["frequency_cap_scope"] == "category"
    assert got["escalation"] == body["escalation"]

    bad = api.put(
        "/api/v1/templates/alert",
        {
            **body,
            "frequency_caps": {"sms": "lots"},
            "escalation": [{"after": "15m", "channel": "email"}],
        },
        format="json",
    )
    assert bad.status_code == 400
    assert set(bad.json()["fields"]) == {"frequency_caps.sms", "escalation.0.channel"}
    assert (
        api.put(
            "/api/v1/templates/alert", {**body, "frequency_cap_scope": "owner"}, format="json"
        ).status_code
        == 400
    )


# --- Escalation -------------------------------------------------------------------------------


@pytest.fixture
def escalating(owner: Any) -> Any:
    return TemplateFactory(
        owner=owner,
        key="order_shipped",
        content={
            "web": {"title": "Alert", "body": "{{ order_id }}"},
            "sms": {"body": "{{ order_id }}"},
        },
        escalation=[{"after": "15m", "unless": "read", "channel": "sms"}],
    )


def test_an_escalation_step_is_scheduled_and_a_read_cancels_it(api: Any, escalating: Any) -> None:
    before = timezone.now()
    answer = send(api)
    deliveries = statuses(answer)
    assert deliveries["web"] == {"channel": "web", "status": "queued"}
    sms = deliveries["sms"]
    assert (sms["status"], sms["unless"]) == ("scheduled", "read")
    due = datetime.fromisoformat(sms["scheduled_for"].replace("Z", "+00:00"))
    assert before + timedelta(minutes=15) <= due <= timezone.now() + timedelta(minutes=15)
    detail = api.get(f"{URL}/{answer.json()['id']}").json()
    assert {d["channel"]: d["unless"] for d in detail["deliveries"]} == {"web": None, "sms": "read"}

    token = api.post("/api/v1/recipients/user-1/token").json()["token"]
    browser = APIClient()
    browser.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert browser.post(f"/api/v1/inbox/{answer.json()['id']}/read").status_code in (200, 204)
    sms_row = Delivery.objects.get(channel="sms")
    assert sms_row.status == "cancelled"
    assert (
        DeliveryEvent.objects.filter(delivery=sms_row).last().detail
        == "escalation not needed: web read in time"
    )


def test_a_channel_that_is_escalated_to_is_not_sent_at_first(api: Any, escalating: Any) -> None:
    answer = statuses(send(api, channels=["sms"]))
    assert answer["sms"]["status"] == "scheduled"
    # An opted-out channel is not escalated to.
    api.put("/api/v1/recipients/user-1/preferences", {"channels": {"sms": False}}, format="json")
    assert statuses(send(api))["sms"] == {
        "channel": "sms",
        "status": "skipped",
        "reason": "opted_out",
    }


def test_a_request_brings_its_own_escalation_or_none(api: Any, escalating: Any) -> None:
    # None: the channel goes at once.
    assert statuses(send(api, escalation=[]))["sms"] == {"channel": "sms", "status": "queued"}
    # Its own steps instead of the template's.
    before = timezone.now()
    answer = statuses(
        send(api, escalation=[{"after": "2m", "unless": "delivered", "channel": "sms"}])
    )
    assert (answer["sms"]["status"], answer["sms"]["unless"]) == ("scheduled", "delivered")
    due = datetime.fromisoformat(answer["sms"]["scheduled_for"].replace("Z", "+00:00"))
    assert before + timedelta(minutes=2) <= due <= timezone.now() + timedelta(minutes=2)
    # Refused, and nothing written: a channel the template does not have, a bad step.
    written = Delivery.objects.count()
    bad = send(api, escalation=[{"after": "2m", "channel": "email"}])
    assert bad.status_code == 400
    assert bad.json()["fields"] == {"escalation.0.channel": ["The template has no email content."]}
    bad = send(api, escalation=[{"after": "soon", "channel": "sms"}])
    assert bad.status_code == 400
    assert "escalation" in bad.json()["fields"]
    assert Delivery.objects.count() == written


def test_a_topic_send_cannot_override_digest_or_escalation(api: Any, escalating: Any) -> None:
    for override in ({"escalation": []}, {"digest": False}):
        bad = api.post(
            URL,
            {"topic": "release-notes", "template": "order_shipped", **override},
            format="json",
        )
        assert bad.status_code == 400
        assert "topic" in bad.json()["fields"]


# --- Locales on the send path -----------------------------------------------------------------


def test_the_send_path_follows_the_locale_chain(api: Any, owner: Any) -> None:
    TemplateFactory(
        owner=owner,
        content={
            "email": {"subject": "Shipped {{ order_id }}", "body": "en"},
            "sms": {"body": "Order {{ order_id }} shipped"},
            "web": {"title": "Shipped", "body": "en"},
        },
        translations={
            "pt": {"email": {"subject": "Enviado {{ order_id }}", "body": "pt"}},
            "pt-BR": {"sms": {"body": "Pedido {{ order_id }} enviado"}},
        },
    )
    for n, locale in enumerate(["pt_BR", "pt-br", "pt-PT", "de"]):
        rid = f"user-{n}"
        answer = send(
            api,
            recipient={
                "id": rid,
                "email": "a@example.com",
                "phone": "+14155550100",
                "locale": locale,
            },
        )
        assert answer.status_code == 202
        rows = {
            d.channel: d
            for d in Delivery.objects.filter(notification_id=answer.json()["id"]).select_related(
                "notification"
            )
        }
        used = rows["sms"].notification.locale
        if locale in ("pt_BR", "pt-br"):
            assert used == "pt-BR"
            assert rows["sms"].content == {"body": "Pedido A-1 enviado"}
            assert rows["email"].content["subject"] == "Enviado A-1"
            assert rows["web"].content["body"] == "en"
        elif locale == "pt-PT":
            assert used == "pt"
            assert rows["sms"].content == {"body": "Order A-1 shipped"}
            assert rows["email"].content["subject"] == "Enviado A-1"
        else:
            assert used == "en"
            assert rows["email"].content["subject"] == "Shipped A-1"
    assert Recipient.objects.count() == 4


def test_two_spellings_of_one_locale_are_refused(api: Any) -> None:
    answer = api.post(
        "/api/v1/templates",
        {
            "key": "t",
            "content": {"sms": {"body": "x"}},
            "translations": {"pt-BR": {"sms": {"body": "a"}}, "pt_br": {"sms": {"body": "b"}}},
        },
        format="json",
    )
    assert answer.status_code == 400
    assert "Same locale as 'pt-BR'" in str(answer.json()["fields"])
