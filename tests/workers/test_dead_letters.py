"""The dead-letter queue: a bounced email lands there with its history and payload, and is
listed, replayed (back to `sent` once the address works) or discarded through the API, the
admin actions and the management command."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from notifications.models import Delivery, DeliveryStatus, Notification, Suppression
from tests.conftest import Process, SmtpSink, wait_until
from workers.models import DeadLetter
from workers.providers import provider_for
from workers.services import ProcessOutcome, delivery_process

pytestmark = pytest.mark.django_db


@pytest.fixture
def smtp(settings: Any, smtp_server: SmtpSink) -> Iterator[SmtpSink]:
    settings.EMAIL_PROVIDER = "smtp"
    settings.SMTP_HOST = smtp_server.host
    settings.SMTP_PORT = smtp_server.port
    provider_for.cache_clear()
    yield smtp_server
    provider_for.cache_clear()


def bounce(api: Any, smtp: SmtpSink, n: int, channel_user: str = "user") -> list[int]:
    """Accept n emails and let the SMTP server refuse each: n dead letters."""
    smtp.refuse_recipients = True
    ids = []
    for i in range(n):
        response = api.post(
            "/api/v1/notifications",
            {
                "recipient": {
                    "id": f"{channel_user}-{i}",
                    "email": f"{channel_user}-{i}@example.com",
                },
                "template": "order_shipped",
                "data": {"order_id": f"D-{i}"},
                "channels": ["email"],
            },
            format="json",
        )
        delivery = Delivery.objects.get(notification_id=response.json()["id"])
        assert delivery_process(delivery_id=delivery.pk) == ProcessOutcome.DEAD
        ids.append(DeadLetter.objects.get(delivery=delivery).pk)
    smtp.refuse_recipients = False
    return ids


def test_a_bounce_becomes_a_dead_letter_with_history(
    api: Any, template: Any, smtp: SmtpSink
) -> None:
    [letter_id] = bounce(api, smtp, 1)
    [listed] = api.get("/api/v1/dead-letters").json()
    assert listed["id"] == letter_id
    assert listed["channel"] == "email"
    assert listed["provider"] == "smtp"
    assert listed["error"] == "SMTP 550: 5.1.1 mailbox unavailable"
    assert listed["attempts"] == 1
    assert listed["status"] == "open"
    assert listed["recipient"] == "user-0"
    assert listed["payload"] == {
        "to": "user-0@example.com",
        "content": {
            "subject": "Order D-0 shipped",
            "body": "Hi, D-0 is on its way.",
            "html": "<p>Hi, D-0 is on its way.</p>",
        },
    }
    [attempt] = listed["attempt_history"]
    assert (attempt["number"], attempt["outcome"], attempt["status_code"]) == (1, "permanent", 550)
    assert api.get("/api/v1/dead-letters/counts").json() == {
        "channels": {"email": 1, "sms": 0, "push": 0, "web": 0},
        "threshold": 10000,
        "over_threshold": [],
    }


def test_replay_through_the_api_sends_once_the_address_works(
    api: Any, template: Any, smtp: SmtpSink, django_capture_on_commit_callbacks: Any
) -> None:
    [letter_id] = bounce(api, smtp, 1)
    # The 550 5.1.1 put the address on the suppression list; the operator lifts it first.
    [suppression] = api.get("/api/v1/suppressions").json()["results"]
    assert (suppression["address"], suppression["reason"]) == ("user-0@example.com", "bounced")
    assert api.delete(f"/api/v1/suppressions/{suppression['id']}").status_code == 204
    with django_capture_on_commit_callbacks(execute=False):
        response = api.post(f"/api/v1/dead-letters/{letter_id}/replay")
    assert response.status_code == 202
    assert response.json()["status"] == "replayed"
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_error) == ("queued", 0, "")
    assert delivery_process(delivery_id=delivery.pk) == ProcessOutcome.SENT
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.SENT, 1)
    assert len(smtp.received()) == 1
    again = api.post(f"/api/v1/dead-letters/{letter_id}/replay")
    assert again.status_code == 409
    assert again.json() == {"error": "conflict", "detail": "This dead letter is already replayed."}
    status = api.get(f"/api/v1/notifications/{delivery.notification_id}").json()
    assert status["deliveries"][0]["status"] == "sent"


def _suppression_of(api: Any, address: str) -> dict[str, Any]:
    [suppression] = api.get(f"/api/v1/suppressions?address={address}").json()["results"]
    return dict(suppression)


def test_a_replay_to_a_suppressed_address_is_a_409_that_names_the_suppression(
    api: Any, template: Any, smtp: SmtpSink
) -> None:
    [letter_id] = bounce(api, smtp, 1)
    suppression = _suppression_of(api, "user-0@example.com")
    response = api.post(f"/api/v1/dead-letters/{letter_id}/replay")
    assert response.status_code == 409
    assert response.json() == {
        "error": "suppressed",
        "detail": "Not replayed: the email address is on the suppression list (suppression "
        f"{suppression['id']}, bounced), so the delivery would be skipped. Lift it with "
        f"DELETE /api/v1/suppressions/{suppression['id']}, or replay with "
        '{"lift_suppression": true}.',
        "suppression": suppression,
    }
    # Nothing changed: the dead letter is open, the delivery dead, the suppression in place.
    assert DeadLetter.objects.get().status == "open"
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.DEAD, 1)
    assert _suppression_of(api, "user-0@example.com") == suppression
    # Once lifted through the suppressions API, the replay goes through.
    assert api.delete(f"/api/v1/suppressions/{suppression['id']}").status_code == 204
    again = api.post(f"/api/v1/dead-letters/{letter_id}/replay")
    assert again.status_code == 202
    assert (again.json()["status"], again.json()["lifted_suppression"]) == ("replayed", None)


def test_lift_suppression_lifts_it_and_replays_in_one_call(
    api: Any, template: Any, smtp: SmtpSink, django_capture_on_commit_callbacks: Any
) -> None:
    [letter_id] = bounce(api, smtp, 1)
    suppression = _suppression_of(api, "user-0@example.com")
    with django_capture_on_commit_callbacks(execute=False):
        response = api.post(
            f"/api/v1/dead-letters/{letter_id}/replay", {"lift_suppression": True}, format="json"
        )
    assert response.status_code == 202
    body = response.json()
    assert (body["id"], body["status"]) == (letter_id, "replayed")
    assert body["lifted_suppression"] == suppression
    assert api.get("/api/v1/suppressions").json()["results"] == []
    delivery = Delivery.objects.get()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.QUEUED, 0)
    assert delivery_process(delivery_id=delivery.pk) == ProcessOutcome.SENT
    [message] = smtp.received()
    assert message["To"] == "user-0@example.com"
    # New notifications to the address are no longer skipped either.
    follow_up = api.post(
        "/api/v1/notifications",
        {
            "recipient": "user-0",
            "template": "order_shipped",
            "data": {"order_id": "D-9"},
            "channels": ["email"],
        },
        format="json",
    )
    assert follow_up.json()["deliveries"] == [{"channel": "email", "status": "queued"}]


def test_a_complaint_does_not_hold_back_a_critical_notifications_replay(
    api: Any, template: Any, smtp: SmtpSink
) -> None:
    """The replay holds back exactly what the worker would skip: a spam complaint does not
    stop a critical notification, so its dead letter is replayed without lifting anything."""
    [letter_id] = bounce(api, smtp, 1)
    Notification.objects.update(priority="critical")
    Suppression.objects.update(reason="complained")
    response = api.post(f"/api/v1/dead-letters/{letter_id}/replay")
    assert response.status_code == 202
    assert response.json()["lifted_suppression"] is None
    assert Suppression.objects.count() == 1
    assert delivery_process(delivery_id=Delivery.objects.get().pk) == ProcessOutcome.SENT


def test_discard_and_filters(api: Any, template: Any, smtp: SmtpSink) -> None:
    first, second = bounce(api, smtp, 2)
    assert [d["id"] for d in api.get("/api/v1/dead-letters?channel=email").json()] == [
        second,
        first,
    ]
    assert api.get("/api/v1/dead-letters?channel=sms").json() == []
    assert len(api.get("/api/v1/dead-letters?error=mailbox").json()) == 2
    assert api.get("/api/v1/dead-letters?error=timeout").json() == []
    assert api.get("/api/v1/dead-letters?older_than=3600").json() == []
    assert len(api.get("/api/v1/dead-letters?newer_than=3600").json()) == 2
    assert api.get("/api/v1/dead-letters?channel=fax").status_code == 400
    response = api.post(f"/api/v1/dead-letters/{first}/discard")
    assert response.status_code == 200
    assert response.json()["status"] == "discarded"
    assert [d["id"] for d in api.get("/api/v1/dead-letters").json()] == [second]
    assert [d["id"] for d in api.get("/api/v1/dead-letters?status=discarded").json()] == [first]
    assert Delivery.objects.get(dead_letters__pk=first).status == DeliveryStatus.DEAD


def test_bulk_replay_says_per_dead_letter_what_it_did(
    api: Any, template: Any, smtp: SmtpSink
) -> None:
    first, second, third = bounce(api, smtp, 3)
    lifted = _suppression_of(api, "user-0@example.com")
    assert api.delete(f"/api/v1/suppressions/{lifted['id']}").status_code == 204
    held = [_suppression_of(api, f"user-{i}@example.com") for i in (1, 2)]
    response = api.post(
        "/api/v1/dead-letters/replay", {"channel": "email", "error": "mailbox"}, format="json"
    )
    assert response.status_code == 202
    assert response.json() == {
        "count": 1,
        "results": [
            {"id": first, "status": "replayed", "lifted_suppression": None},
            {"id": second, "status": "suppressed", "suppression": held[0]},
            {"id": third, "status": "suppressed", "suppression": held[1]},
        ],
    }
    assert dict(DeadLetter.objects.values_list("pk", "status")) == {
        first: "replayed",
        second: "open",
        third: "open",
    }
    assert Delivery.objects.filter(status=DeliveryStatus.QUEUED).count() == 1
    lifting = api.post("/api/v1/dead-letters/replay", {"lift_suppression": True}, format="json")
    assert lifting.json() == {
        "count": 2,
        "results": [
            {"id": second, "status": "replayed", "lifted_suppression": held[0]},
            {"id": third, "status": "replayed", "lifted_suppression": held[1]},
        ],
    }
    assert api.get("/api/v1/suppressions").json()["results"] == []
    assert Delivery.objects.filter(status=DeliveryStatus.QUEUED).count() == 3
    assert api.post("/api/v1/dead-letters/replay", {}, format="json").json() == {
        "count": 0,
        "results": [],
    }


def test_other_owners_cannot_see_or_touch_dead_letters(
    api: Any, other_api: Any, template: Any, smtp: SmtpSink
) -> None:
    [letter_id] = bounce(api, smtp, 1)
    assert other_api.get("/api/v1/dead-letters").json() == []
    assert other_api.post(f"/api/v1/dead-letters/{letter_id}/replay").status_code == 404
    assert other_api.post(f"/api/v1/dead-letters/{letter_id}/discard").status_code == 404
    lifting = {"lift_suppression": True}
    assert other_api.post("/api/v1/dead-letters/replay", lifting, format="json").json() == {
        "count": 0,
        "results": [],
    }
    assert DeadLetter.objects.get().status == "open"
    assert len(api.get("/api/v1/suppressions").json()["results"]) == 1


def test_admin_actions(api: Any, template: Any, smtp: SmtpSink) -> None:
    first, second, third = bounce(api, smtp, 3)
    suppression = _suppression_of(api, "user-0@example.com")
    assert api.delete(f"/api/v1/suppressions/{suppression['id']}").status_code == 204
    held = _suppression_of(api, "user-1@example.com")
    staff = Client()
    staff.force_login(get_user_model().objects.create_superuser("ops", "o@example.com", "pw"))
    url = reverse("admin:workers_deadletter_changelist")
    assert staff.get(url).status_code == 200
    assert staff.get(reverse("admin:workers_deadletter_change", args=[first])).status_code == 200
    response = staff.post(
        url, {"action": "replay", "_selected_action": [first, second]}, follow=True
    )
    assert [str(m) for m in response.context["messages"]] == [
        "Replayed 1 dead letter(s).",
        f"1 not replayed, their address is suppressed: #{second} (suppression #{held['id']}, "
        "bounced). Lift the suppression first (Suppressions), then replay.",
    ]
    response = staff.post(url, {"action": "discard", "_selected_action": [third]})
    assert response.status_code == 302
    assert dict(DeadLetter.objects.values_list("pk", "status")) == {
        first: "replayed",
        second: "open",
        third: "discarded",
    }
    assert Delivery.objects.get(dead_letters__pk=first).status == DeliveryStatus.QUEUED
    assert Delivery.objects.get(dead_letters__pk=second).status == DeliveryStatus.DEAD


def test_management_command(api: Any, template: Any, smtp: SmtpSink) -> None:
    first, second, third = bounce(api, smtp, 3)
    out = StringIO()
    call_command("deadletters", "list", "--channel", "email", stdout=out)
    rows = [line.split("\t") for line in out.getvalue().splitlines()]
    assert [int(r[0]) for r in rows] == [third, second, first]
    assert {r[5] for r in rows} == {"SMTP 550: 5.1.1 mailbox unavailable"}
    held = _suppression_of(api, "user-0@example.com")
    out = StringIO()
    call_command("deadletters", "replay", str(first), stdout=out)
    assert out.getvalue() == (
        "Replayed 0 dead letter(s)\n"
        f"{first}\tnot replayed, its address has suppression {held['id']} (email bounced)\n"
        "Lift those suppressions, or replay with --lift-suppression.\n"
    )
    out = StringIO()
    call_command("deadletters", "replay", str(first), "--lift-suppression", stdout=out)
    assert out.getvalue() == (
        f"Replayed 1 dead letter(s)\n{first}\tlifted suppression {held['id']} (email bounced)\n"
    )
    out = StringIO()
    call_command("deadletters", "discard", "--all", "--channel", "email", stdout=out)
    assert out.getvalue() == "Discarded 2 dead letter(s)\n"
    out = StringIO()
    call_command("deadletters", "counts", stdout=out)
    assert out.getvalue() == "email\t0\nsms\t0\npush\t0\nweb\t0\n"
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="pass --all"):
        call_command("deadletters", "replay")


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_a_lifted_replay_is_delivered_by_the_real_worker(
    api: Any,
    template: Any,
    smtp_server: SmtpSink,
    celery_worker_process: Callable[..., Process],
) -> None:
    """On real processes: the SMTP server refuses the address (dead, and suppressed); the
    replay answers 409 until it lifts the suppression, then the worker sends the email."""
    celery_worker_process(
        "email", EMAIL_PROVIDER="smtp", SMTP_HOST=smtp_server.host, SMTP_PORT=smtp_server.port
    )
    smtp_server.refuse_recipients = True
    accepted = api.post(
        "/api/v1/notifications",
        {
            "recipient": {"id": "user-0", "email": "user-0@example.com"},
            "template": "order_shipped",
            "data": {"order_id": "P-1"},
            "channels": ["email"],
        },
        format="json",
    )
    assert accepted.status_code == 202
    letter = wait_until(DeadLetter.objects.first, timeout=30, message="the dead letter")
    suppression = _suppression_of(api, "user-0@example.com")
    smtp_server.refuse_recipients = False
    held = api.post(f"/api/v1/dead-letters/{letter.pk}/replay", {}, format="json")
    assert (held.status_code, held.json()["suppression"]) == (409, suppression)
    lifted = api.post(
        f"/api/v1/dead-letters/{letter.pk}/replay", {"lift_suppression": True}, format="json"
    )
    assert (lifted.status_code, lifted.json()["lifted_suppression"]) == (202, suppression)
    wait_until(smtp_server.received, timeout=30, message="the replayed email")
    [message] = smtp_server.received()
    assert (message["To"], message["Subject"]) == ("user-0@example.com", "Order P-1 shipped")

    def sent() -> Delivery | None:
        delivery = Delivery.objects.get()
        return delivery if delivery.status == DeliveryStatus.SENT else None

    delivery = wait_until(sent, timeout=15, message="the delivery to be marked sent")
    assert delivery.attempts == 1
    assert api.get("/api/v1/suppressions").json()["results"] == []
