"""The fan-out of a topic notification, step by step in this process: a chunk of subscribers
per step in recipient order, one child each routed as a single send (opt-outs skip), the
cursor moved with the children, a failed step leaving nothing behind, and who is reached when
subscribers come and go during the fan-out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from notifications.accepting import NotificationRequest
from notifications.models import (
    Delivery,
    Notification,
    Preference,
    Recipient,
    Topic,
    TopicSubscription,
)
from notifications.sending import notification_send
from notifications.topics import topic_subscribers_add, topic_subscribers_remove
from workers import dispatch, fanout

pytestmark = pytest.mark.django_db


@pytest.fixture
def topic(owner: Any, template: Any) -> Topic:
    recipients = Recipient.objects.bulk_create(
        [
            Recipient(owner=owner, external_id=f"sub-{n:03d}", phone="+14155550100")
            for n in range(25)
        ]
    )
    topic = Topic.objects.create(owner=owner, key="release-notes")
    TopicSubscription.objects.bulk_create(
        [TopicSubscription(topic=topic, recipient=r) for r in recipients]
    )
    return topic


def send(owner: Any, **fields: Any) -> Notification:
    body = notification_send(
        owner=owner,
        request=NotificationRequest(
            recipient="",
            topic="release-notes",
            template_key="order_shipped",
            data={"order_id": "v2"},
            channels=["sms"],
            **fields,
        ),
    )
    return Notification.objects.get(pk=body["id"])


def children(parent: Notification) -> list[str]:
    return list(
        Notification.objects.filter(parent=parent)
        .order_by("recipient_id")
        .values_list("recipient__external_id", flat=True)
    )


def test_each_step_fans_out_one_chunk_in_recipient_order(owner: Any, topic: Topic) -> None:
    parent = send(owner)
    assert (parent.recipients_total, parent.recipients_done) == (25, 0)
    progress = []
    while fanout.topic_fanout_step(chunk_size=10):
        parent.refresh_from_db()
        progress.append((parent.recipients_done, parent.fanout_finished_at is not None))
    assert progress == [(10, False), (20, False), (25, True)]
    assert children(parent) == [f"sub-{n:03d}" for n in range(25)]
    child = Notification.objects.filter(parent=parent).first()
    assert child is not None
    assert (child.template_key, child.data, child.owner_id) == (
        "order_shipped",
        {"order_id": "v2"},
        owner.pk,
    )
    assert (
        Delivery.objects.filter(notification__parent=parent, channel="sms", status="queued").count()
        == 25
    )
    assert Delivery.objects.get(notification=child).content == {"body": "Order v2 shipped"}
    assert parent.recipients_total == 25
    assert fanout.topic_fanout_step(chunk_size=10) is False


def test_an_opted_out_subscriber_gets_a_skipped_delivery(owner: Any, topic: Topic) -> None:
    opted_out = Recipient.objects.get(external_id="sub-004")
    Preference.objects.create(recipient=opted_out, category="orders", channel="sms", enabled=False)
    parent = send(owner)
    while fanout.topic_fanout_step(chunk_size=10):
        pass
    skipped = Delivery.objects.get(notification__parent=parent, notification__recipient=opted_out)
    assert (skipped.status, skipped.skip_reason) == ("skipped", "opted_out")
    assert Delivery.objects.filter(notification__parent=parent, status="queued").count() == 24


def test_a_failed_step_leaves_nothing_and_the_next_resumes_at_the_cursor(
    owner: Any, topic: Topic, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = send(owner)
    assert fanout.topic_fanout_step(chunk_size=10)
    write = fanout.notifications_write

    def write_then_crash(**kwargs: Any) -> None:
        write(**kwargs)
        raise RuntimeError("process died after writing the children")

    monkeypatch.setattr(fanout, "notifications_write", write_then_crash)
    with pytest.raises(RuntimeError):
        fanout.topic_fanout_step(chunk_size=10)
    parent.refresh_from_db()
    assert parent.recipients_done == 10
    assert len(children(parent)) == 10

    monkeypatch.setattr(fanout, "notifications_write", write)
    while fanout.topic_fanout_step(chunk_size=10):
        pass
    assert children(parent) == [f"sub-{n:03d}" for n in range(25)]


def test_who_is_reached_when_subscribers_come_and_go(owner: Any, topic: Topic) -> None:
    parent = send(owner)
    assert fanout.topic_fanout_step(chunk_size=10)
    # Leaving after acceptance: passed over if its turn has not come yet.
    topic_subscribers_remove(topic=topic, external_ids=["sub-001", "sub-020"])
    # A recipient created (and subscribed) after acceptance has a higher id: not reached.
    Recipient.objects.create(owner=owner, external_id="late", phone="+14155550100")
    assert topic_subscribers_add(topic=topic, external_ids=["late"]).changed == 1
    while fanout.topic_fanout_step(chunk_size=10):
        pass
    parent.refresh_from_db()
    reached = children(parent)
    assert "sub-001" in reached  # its chunk had gone out before it left
    assert "sub-020" not in reached
    assert "late" not in reached
    assert len(reached) == 24
    assert (parent.recipients_total, parent.recipients_done) == (24, 24)


def test_the_childs_detail_names_its_parent(owner: Any, topic: Topic, api: Any) -> None:
    parent = send(owner)
    while fanout.topic_fanout_step():
        pass
    child = Notification.objects.filter(parent=parent).order_by("recipient_id").first()
    assert child is not None
    detail = api.get(f"/api/v1/notifications/{child.pk}").json()
    assert (detail["parent"], detail["recipient"], detail["topic"], detail["status"]) == (
        str(parent.pk),
        "sub-000",
        None,
        "in_progress",
    )
    parent_detail = api.get(f"/api/v1/notifications/{parent.pk}").json()
    assert (parent_detail["status"], parent_detail["recipients_done"]) == ("fanned_out", 25)


def test_a_cancel_stops_the_fan_out_and_cancels_the_children_so_far(
    owner: Any, topic: Topic, api: Any
) -> None:
    parent = send(owner)
    assert fanout.topic_fanout_step(chunk_size=10)
    response = api.post(f"/api/v1/notifications/{parent.pk}/cancel")
    assert response.status_code == 200
    assert response.json() == {
        "id": str(parent.pk),
        "cancelled": [],
        "not_cancelled": [],
        "children_cancelled": 10,
    }
    assert fanout.topic_fanout_step(chunk_size=10) is False
    assert len(children(parent)) == 10
    assert set(
        Delivery.objects.filter(notification__parent=parent).values_list("status", flat=True)
    ) == {"cancelled"}
    detail = api.get(f"/api/v1/notifications/{parent.pk}").json()
    assert (detail["status"], detail["recipients_total"], detail["recipients_done"]) == (
        "cancelled",
        25,
        10,
    )
    again = api.post(f"/api/v1/notifications/{parent.pk}/cancel").json()
    assert again["children_cancelled"] == 0


def test_a_cancel_by_key_reaches_the_topic_notification_and_its_children(
    owner: Any, topic: Topic, api: Any
) -> None:
    parent = send(owner, cancel_key="release-2.0")
    assert fanout.topic_fanout_step(chunk_size=10)
    response = api.post(
        "/api/v1/notifications/cancel", {"cancel_key": "release-2.0"}, format="json"
    )
    answers = response.json()["notifications"]
    # The topic notification and the ten children written so far, which share its key.
    assert len(answers) == 11
    [topic_answer] = [a for a in answers if a["id"] == str(parent.pk)]
    assert topic_answer["children_cancelled"] == 10
    # Each child's own answer lists its cancelled delivery too.
    assert sum(len(a["cancelled"]) for a in answers) == 10
    assert fanout.topic_fanout_step(chunk_size=10) is False
    assert Delivery.objects.filter(notification__parent=parent, status="cancelled").count() == 10


def test_a_topic_send_wakes_the_relay_after_commit_and_an_empty_one_does_not(
    owner: Any, topic: Topic, django_capture_on_commit_callbacks: Any
) -> None:
    from core import outbox

    Topic.objects.create(owner=owner, key="empty")
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        send(owner)
    assert [c for c in callbacks if c is outbox.outbox_wake] == [outbox.outbox_wake]
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        notification_send(
            owner=owner,
            request=NotificationRequest(
                recipient="", topic="empty", template_key="order_shipped", data={"order_id": "1"}
            ),
        )
    assert [c for c in callbacks if c is outbox.outbox_wake] == []


def test_children_pass_the_frequency_caps_and_quiet_hours(
    owner: Any, template: Any, topic: Topic
) -> None:
    """Each child is routed as a single send: a subscriber at its cap is skipped
    (frequency_capped), one inside its quiet hours is held until they end; the others go."""
    template.frequency_caps = {"sms": "1/1h"}
    template.save()
    capped = Recipient.objects.get(external_id="sub-001")
    notification_send(
        owner=owner,
        request=NotificationRequest(
            recipient="sub-001", template_key="order_shipped", data={"order_id": "v1"}
        ),
    )
    now = timezone.now()
    Recipient.objects.filter(external_id="sub-002").update(
        quiet_hours={
            "start": (now - timedelta(hours=1)).strftime("%H:%M"),
            "end": (now + timedelta(hours=1)).strftime("%H:%M"),
        },
        timezone="UTC",
    )
    parent = send(owner)
    while fanout.topic_fanout_step(chunk_size=10):
        pass
    rows = {
        d.notification.recipient.external_id: d
        for d in Delivery.objects.filter(notification__parent=parent).select_related(
            "notification__recipient"
        )
    }
    assert len(rows) == 25
    assert (rows["sub-001"].status, rows["sub-001"].skip_reason) == ("skipped", "frequency_capped")
    assert (rows["sub-002"].status, rows["sub-002"].skip_reason) == ("scheduled", "quiet_hours")
    assert rows["sub-003"].status == "queued"
    assert capped.pk == rows["sub-001"].notification.recipient_id


def test_the_children_due_now_are_published_once_their_chunk_commits(
    owner: Any, topic: Topic, monkeypatch: pytest.MonkeyPatch
) -> None:
    published: list[dict[str, list[int]]] = []

    def publish(by_channel: dict[str, list[int]]) -> int:
        # What a worker receiving the message would find: the committed rows.
        ids = by_channel["sms"]
        assert Delivery.objects.filter(pk__in=ids, enqueued_at__isnull=False).count() == len(ids)
        published.append(by_channel)
        return 1

    monkeypatch.setattr(dispatch, "batches_publish_rollback_unsafe", publish)
    parent = send(owner)
    while fanout.topic_fanout_step(chunk_size=10):
        pass
    queued = Delivery.objects.filter(notification__parent=parent, status="queued")
    assert [len(p["sms"]) for p in published] == [10, 10, 5]
    assert sorted(pk for p in published for pk in p["sms"]) == sorted(
        queued.values_list("pk", flat=True)
    )
    # Published by the fan-out: none is left in the outbox for the relay's round.
    assert not Delivery.objects.outbox().filter(notification__parent=parent).exists()


def test_children_the_broker_refused_stay_in_the_outbox_for_the_relay(
    owner: Any, topic: Topic, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.exceptions import OperationalError

    from workers import relay

    def refuse(by_channel: dict[str, list[int]]) -> int:
        raise OperationalError("broker down")

    monkeypatch.setattr(dispatch, "batches_publish_rollback_unsafe", refuse)
    parent = send(owner)
    with pytest.raises(OperationalError):  # the relay's loop backs off and goes on
        fanout.topic_fanout_step(chunk_size=10)
    parent.refresh_from_db()
    assert parent.recipients_done == 10  # the chunk itself committed
    outbox = Delivery.objects.outbox().filter(notification__parent=parent)
    assert outbox.count() == 10

    published: list[int] = []
    monkeypatch.setattr(
        dispatch, "batches_publish_rollback_unsafe", lambda by: published.extend(by["sms"]) or 1
    )
    assert relay.outbox_publish_due() == 10
    assert sorted(published) == sorted(
        outbox.model.objects.filter(notification__parent=parent).values_list("pk", flat=True)
    )
    assert not outbox.exists()
