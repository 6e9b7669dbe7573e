"""Digests: members wait in the outbox until their window ends; the relay turns each group
(recipient and key) into one notification with one delivery per channel that sees every
event; the in-app one shows at once; a cancel reaches a waiting member; and on the real
pipeline a relay killed in the middle of the window neither loses nor doubles an event."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Notification
from tests.conftest import Process, wait_until
from tests.factories import TemplateFactory
from workers.models import SandboxMessage
from workers.relay import outbox_publish_due

URL = "/api/v1/notifications"
DIGEST_CONTENT = {
    "email": {
        "subject": "{{ count }} updates on {{ project_id }}",
        "body": "{% for e in events %}{{ e.what }};{% endfor %}",
    },
    "sms": {"body": "{{ count }} updates: {% for e in events %}{{ e.what }} {% endfor %}"},
    "web": {"title": "{{ project_id }}", "body": "{{ what }}"},
}


@pytest.fixture
def digest_template(owner: Any) -> Any:
    return TemplateFactory(
        owner=owner,
        key="project_update",
        category="projects",
        content=DIGEST_CONTENT,
        digest={"window": "1h", "key": "{{ project_id }}"},
    )


def notify(api: Any, rid: str, project: str, what: str, **fields: Any) -> dict[str, Any]:
    answer = api.post(
        URL,
        {
            "recipient": {"id": rid, "email": f"{rid}@example.com", "phone": "+14155550100"},
            "template": "project_update",
            "data": {"project_id": project, "what": what},
            **fields,
        },
        format="json",
    )
    assert answer.status_code == 202, answer.content
    return dict(answer.json())


def window_ends() -> None:
    """Move every waiting member's due time to now, as the clock would an hour later."""
    Delivery.objects.filter(status="scheduled").exclude(digest_key="").update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )


@pytest.mark.django_db
class TestOnTheRelay:
    def test_members_wait_and_the_web_one_shows_at_once(
        self, api: Any, digest_template: Any
    ) -> None:
        answer = notify(api, "u1", "apollo", "build 1")
        by_channel = {d["channel"]: d for d in answer["deliveries"]}
        assert by_channel["web"] == {"channel": "web", "status": "queued"}
        assert (by_channel["email"]["status"], by_channel["email"]["reason"]) == (
            "scheduled",
            "digest",
        )
        assert "scheduled_for" in by_channel["sms"]
        web = Delivery.objects.get(channel="web")
        # The in-app entry is rendered for a digest of one.
        assert web.content == {"title": "apollo", "body": "build 1"}
        # Due at once, not held for the digest: published at accept, for this process to
        # push after the commit (workers/web_push.py), so not the relay's; the members wait.
        assert web.enqueued_at is not None and web.next_attempt_at is None
        assert outbox_publish_due() == 0

    def test_a_group_becomes_one_delivery_per_channel(self, api: Any, digest_template: Any) -> None:
        for what in ("build 1", "build 2", "build 3"):
            notify(api, "u1", "apollo", what, channels=["email", "sms"])
        notify(api, "u1", "gemini", "deploy", channels=["email", "sms"])
        notify(api, "u2", "apollo", "other person", channels=["email", "sms"])
        window_ends()
        assert outbox_publish_due() == 10  # every member handled

        digests = Notification.objects.filter(data__has_key="events").order_by("created_at")
        assert digests.count() == 3
        apollo = next(
            n for n in digests if n.data["digest_key"] == "apollo" and n.data["count"] == 3
        )
        email = Delivery.objects.get(notification=apollo, channel="email")
        sms = Delivery.objects.get(notification=apollo, channel="sms")
        assert email.content == {
            "subject": "3 updates on apollo",
            "body": "build 1;build 2;build 3;",
        }
        assert sms.content == {"body": "3 updates: build 1 build 2 build 3 "}
        assert email.enqueued_at is not None and email.status == "queued"
        members = Delivery.objects.filter(digest_key="project_update:apollo")
        assert set(members.values_list("status", "skip_reason")) == {("skipped", "digested")}
        assert (
            DeliveryEvent.objects.filter(
                delivery__in=members, detail=f"digested into {apollo.pk}"
            ).count()
            == 6
        )
        assert DeliveryEvent.objects.get(delivery=email).detail == "digest of 3 notifications"
        # Nothing is left to flush, and a second round sends nothing again.
        assert outbox_publish_due() == 0

    def test_a_cancelled_member_is_left_out(self, api: Any, digest_template: Any) -> None:
        keep = notify(api, "u1", "apollo", "kept", channels=["sms"])
        drop = notify(api, "u1", "apollo", "dropped", channels=["sms"])
        cancelled = api.post(f"{URL}/{drop['id']}/cancel").json()
        assert cancelled["cancelled"] == [{"channel": "sms", "status": "cancelled"}]
        window_ends()
        outbox_publish_due()
        digest = Notification.objects.get(data__has_key="events")
        assert digest.data["count"] == 1
        assert Delivery.objects.get(notification=digest).content == {"body": "1 updates: kept "}
        assert Delivery.objects.get(notification_id=keep["id"]).skip_reason == "digested"

    def test_critical_is_not_digested_and_a_missing_key_variable_is_a_400(
        self, api: Any, digest_template: Any
    ) -> None:
        answer = notify(api, "u1", "apollo", "outage", priority="critical", channels=["sms"])
        assert answer["deliveries"] == [{"channel": "sms", "status": "queued"}]
        bad = api.post(
            URL,
            {"recipient": "u1", "template": "project_update", "data": {"what": "x"}},
            format="json",
        )
        assert bad.status_code == 400
        assert "data.project_id" in bad.json()["fields"]

    def test_a_request_can_send_at_once_instead_of_into_the_digest(
        self, api: Any, digest_template: Any
    ) -> None:
        answer = notify(api, "u1", "apollo", "release 2.0", channels=["sms"], digest=False)
        assert answer["deliveries"] == [{"channel": "sms", "status": "queued"}]
        sms = Delivery.objects.get(notification_id=answer["id"])
        # Not a member of any group, and rendered as a digest of one.
        assert (sms.digest_key, sms.next_attempt_at) == ("", None)
        assert sms.content == {"body": "1 updates: release 2.0 "}
        # The next one without the override waits for the window as the template says.
        later = notify(api, "u1", "apollo", "build 3", channels=["sms"])
        assert later["deliveries"][0]["reason"] == "digest"

    def test_web_can_be_digested_too(self, api: Any, owner: Any) -> None:
        TemplateFactory(
            owner=owner,
            key="project_update",
            content=DIGEST_CONTENT,
            digest={"window": "10m", "key": "", "web_at_once": False},
        )
        answer = notify(api, "u1", "apollo", "a", channels=["web"])
        assert answer["deliveries"][0]["reason"] == "digest"

    def test_bad_digest_rules_are_refused(self, api: Any) -> None:
        answer = api.post(
            "/api/v1/templates",
            {
                "key": "t",
                "content": {"sms": {"body": "x"}},
                "digest": {"window": "forever", "key": "{{ broken", "batch": 1},
            },
            format="json",
        )
        assert answer.status_code == 400
        assert {"digest", "digest.window"} <= set(answer.json()["fields"])


@pytest.mark.pipeline
@pytest.mark.django_db(transaction=True)
def test_a_relay_killed_during_the_window_neither_loses_nor_doubles_an_event(
    api: Any,
    owner: Any,
    relay_process: Callable[..., Process],
    celery_worker_process: Callable[..., Process],
) -> None:
    TemplateFactory(
        owner=owner,
        key="project_update",
        content=DIGEST_CONTENT,
        digest={"window": "4s", "key": "{{ project_id }}"},
    )
    celery_worker_process("sms", concurrency=1, relay=False)
    first = relay_process(name="relay-1")
    for n in range(5):
        notify(api, "u1", "apollo", f"e{n}", channels=["sms"])
    for n in range(3):
        notify(api, "u2", "apollo", f"f{n}", channels=["sms"])
    first.stop(signal.SIGKILL)  # in the middle of the window
    time.sleep(1)
    for n in range(5, 7):
        notify(api, "u1", "apollo", f"e{n}", channels=["sms"])
    relay_process(name="relay-2")
    wait_until(lambda: SandboxMessage.objects.count() >= 2, timeout=40, message="the two digests")
    wait_until(
        lambda: (
            not Delivery.objects.filter(
                status__in=(DeliveryStatus.SCHEDULED, DeliveryStatus.QUEUED)
            ).exists()
        ),
        timeout=30,
        message="every member and digest to end",
    )
    time.sleep(1)
    bodies = [
        content["body"] for content in SandboxMessage.objects.values_list("content", flat=True)
    ]
    # Every event exactly once over the digests of each recipient (one or, if the late ones
    # came after the first window closed, two per recipient).
    events = [word for body in bodies for word in body.split(": ", 1)[1].split()]
    assert sorted(events) == sorted([f"e{n}" for n in range(7)] + [f"f{n}" for n in range(3)])
    assert Delivery.objects.filter(skip_reason="digested").count() == 10
