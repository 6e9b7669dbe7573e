"""Topics in the admin: the topic list with its subscriber counts linking to the subscribers,
the subscriber list's search, a subscription refused across owners, and a topic
notification's fan-out progress on its page."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse

from notifications.models import Notification, Topic, TopicSubscription
from tests.factories import OwnerFactory, RecipientFactory
from workers import fanout

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff() -> Client:
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def topic(owner: Any) -> Topic:
    topic = Topic.objects.create(owner=owner, key="release-notes", name="Release notes")
    for n in range(3):
        recipient = RecipientFactory(owner=owner, external_id=f"sub-{n}", phone="+14155550100")
        TopicSubscription.objects.create(topic=topic, recipient=recipient)
    return topic


def test_topic_list_counts_subscribers_and_links_to_them(topic: Topic, staff: Client) -> None:
    page = staff.get(reverse("admin:notifications_topic_changelist")).content.decode()
    subscribers = reverse("admin:notifications_topicsubscription_changelist")
    assert f'<a href="{subscribers}?topic__id__exact={topic.pk}">3</a>' in page
    listed = staff.get(subscribers, {"topic__id__exact": topic.pk, "q": "sub-1"})
    assert [s.recipient.external_id for s in listed.context["cl"].result_list] == ["sub-1"]


def test_a_subscription_across_owners_is_refused(topic: Topic, staff: Client) -> None:
    stranger = RecipientFactory(owner=OwnerFactory(name="globex"), external_id="stranger")
    response = staff.post(
        reverse("admin:notifications_topicsubscription_add"),
        {"topic": topic.pk, "recipient": stranger.pk},
    )
    assert response.status_code == 200
    assert "The recipient and the topic belong to different owners." in response.content.decode()
    assert TopicSubscription.objects.count() == 3


def test_a_topic_notification_shows_its_fan_out(
    api: Any, template: Any, topic: Topic, staff: Client
) -> None:
    response = api.post(
        "/api/v1/notifications",
        {"topic": "release-notes", "template": "order_shipped", "data": {"order_id": "v2"}},
        format="json",
    )
    parent = Notification.objects.get(pk=response.json()["id"])
    change = reverse("admin:notifications_notification_change", args=[parent.pk])
    assert "0 of 3 subscribers" in staff.get(change).content.decode()
    while fanout.topic_fanout_step():
        pass
    page = staff.get(change).content.decode()
    assert "3 of 3 subscribers, finished" in page
    listed = staff.get(reverse("admin:notifications_notification_changelist")).content.decode()
    assert "fanned_out (3 of 3 subscribers, finished" in listed
    child = Notification.objects.filter(parent=parent).first()
    assert child is not None
    child_page = staff.get(reverse("admin:notifications_notification_change", args=[child.pk]))
    assert child_page.status_code == 200
    assert str(parent) in child_page.content.decode()
