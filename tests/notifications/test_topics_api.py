"""Topics through the API: create and rename, subscribers added and removed by id (1 to 1000
a call, idempotent, unknown ids answered back), owner isolation, and a send with `topic`:
validation, the one topic row, its detail, and Idempotency-Key."""

from __future__ import annotations

from typing import Any

import pytest

from notifications.models import IdempotencyRecord, Notification, Recipient, TopicSubscription
from tests.factories import RecipientFactory

pytestmark = pytest.mark.django_db

TOPICS = "/api/v1/topics"


def subscribers(api: Any, key: str, ids: list[str], *, method: str = "post") -> Any:
    return getattr(api, method)(f"{TOPICS}/{key}/subscribers", {"recipients": ids}, format="json")


@pytest.fixture
def users(owner: Any) -> list[Recipient]:
    return [RecipientFactory(owner=owner, external_id=f"user-{n}") for n in range(5)]


class TestTopics:
    def test_put_creates_then_renames(self, api: Any) -> None:
        created = api.put(f"{TOPICS}/release-notes", {"name": "Release notes"}, format="json")
        assert created.status_code == 201
        body = created.json()
        assert body == {
            "key": "release-notes",
            "name": "Release notes",
            "subscribers_count": 0,
            "created_at": body["created_at"],
        }
        renamed = api.put(f"{TOPICS}/release-notes", {"name": "Releases"}, format="json")
        assert renamed.status_code == 200
        assert renamed.json()["name"] == "Releases"
        assert api.get(f"{TOPICS}/release-notes").json() == {**body, "name": "Releases"}

    def test_a_key_that_is_not_a_slug_is_a_400(self, api: Any) -> None:
        response = api.put(f"{TOPICS}/release notes", {"name": "x"}, format="json")
        assert response.status_code == 400
        assert list(response.json()["fields"]) == ["key"]

    def test_unknown_topic_is_a_404(self, api: Any) -> None:
        assert api.get(f"{TOPICS}/nope").status_code == 404
        assert subscribers(api, "nope", ["user-1"]).status_code == 404
        assert subscribers(api, "nope", ["user-1"], method="delete").status_code == 404

    def test_another_owners_topic_is_a_404_and_stays_as_it_is(
        self, api: Any, other_api: Any, users: list[Recipient]
    ) -> None:
        api.put(f"{TOPICS}/release-notes", {"name": "Release notes"}, format="json")
        subscribers(api, "release-notes", ["user-1"])
        assert other_api.get(f"{TOPICS}/release-notes").status_code == 404
        assert subscribers(other_api, "release-notes", ["user-2"]).status_code == 404
        assert (
            subscribers(other_api, "release-notes", ["user-1"], method="delete").status_code == 404
        )
        # Its own topic of the same key is another topic, and cannot reach acme's recipients.
        assert other_api.put(f"{TOPICS}/release-notes", {}, format="json").status_code == 201
        assert subscribers(other_api, "release-notes", ["user-1"]).json() == {
            "added": 0,
            "unknown": ["user-1"],
            "subscribers_count": 0,
        }
        assert api.get(f"{TOPICS}/release-notes").json()["subscribers_count"] == 1


class TestSubscribers:
    def test_add_is_idempotent_and_answers_unknown_ids(
        self, api: Any, users: list[Recipient]
    ) -> None:
        api.put(f"{TOPICS}/release-notes", {}, format="json")
        first = subscribers(api, "release-notes", ["user-1", "user-2", "ghost", "user-1"])
        assert first.status_code == 200
        assert first.json() == {"added": 2, "unknown": ["ghost"], "subscribers_count": 2}
        again = subscribers(api, "release-notes", ["user-2", "user-3"])
        assert again.json() == {"added": 1, "unknown": [], "subscribers_count": 3}
        assert TopicSubscription.objects.count() == 3

    def test_remove(self, api: Any, users: list[Recipient]) -> None:
        api.put(f"{TOPICS}/release-notes", {}, format="json")
        subscribers(api, "release-notes", ["user-1", "user-2"])
        removed = subscribers(api, "release-notes", ["user-1", "user-3", "ghost"], method="delete")
        assert removed.status_code == 200
        assert removed.json() == {"removed": 1, "unknown": ["ghost"], "subscribers_count": 1}
        assert subscribers(api, "release-notes", ["user-1"], method="delete").json() == {
            "removed": 0,
            "unknown": [],
            "subscribers_count": 1,
        }

    def test_one_to_a_thousand_ids_a_call(self, api: Any, owner: Any) -> None:
        Recipient.objects.bulk_create(
            [Recipient(owner=owner, external_id=f"r-{n}") for n in range(1001)]
        )
        api.put(f"{TOPICS}/all", {}, format="json")
        too_many = subscribers(api, "all", [f"r-{n}" for n in range(1001)])
        assert too_many.status_code == 400
        assert too_many.json()["fields"] == {
            "recipients": ["At most 1000 recipient ids per call; send the rest in further calls."]
        }
        assert TopicSubscription.objects.count() == 0
        empty = subscribers(api, "all", [])
        assert empty.status_code == 400
        assert empty.json()["fields"] == {"recipients": ["Give at least one recipient id."]}
        assert api.post(f"{TOPICS}/all/subscribers", {}, format="json").status_code == 400
        thousand = subscribers(api, "all", [f"r-{n}" for n in range(1000)])
        assert thousand.json() == {"added": 1000, "unknown": [], "subscribers_count": 1000}


def topic_send(api: Any, idempotency_key: str | None = None, **overrides: Any) -> Any:
    headers = {"HTTP_IDEMPOTENCY_KEY": idempotency_key} if idempotency_key else {}
    return api.post(
        "/api/v1/notifications",
        {"topic": "release-notes", "template": "order_shipped", "data": {"order_id": "v2"}}
        | overrides,
        format="json",
        **headers,
    )


class TestTopicSend:
    @pytest.fixture(autouse=True)
    def topic(self, api: Any, template: Any, users: list[Recipient]) -> None:
        api.put(f"{TOPICS}/release-notes", {"name": "Release notes"}, format="json")
        subscribers(api, "release-notes", ["user-1", "user-2", "user-3"])

    def test_accepted_as_one_row_with_its_progress(self, api: Any) -> None:
        response = topic_send(api)
        assert response.status_code == 202
        notification = Notification.objects.get()
        assert response.json() == {
            "id": str(notification.pk),
            "status": "accepted",
            "topic": "release-notes",
            "recipients_total": 3,
            "deliveries": [],
        }
        assert response["Location"] == f"/api/v1/notifications/{notification.pk}"
        assert notification.recipient is None
        detail = api.get(response["Location"]).json()
        assert {
            k: detail[k]
            for k in (
                "status",
                "recipient",
                "topic",
                "parent",
                "recipients_total",
                "recipients_done",
                "deliveries",
            )
        } == {
            "status": "fanning_out",
            "recipient": None,
            "topic": "release-notes",
            "parent": None,
            "recipients_total": 3,
            "recipients_done": 0,
            "deliveries": [],
        }

    def test_a_single_send_says_it_has_no_topic(self, api: Any) -> None:
        response = api.post(
            "/api/v1/notifications",
            {"recipient": "user-1", "template": "order_shipped", "data": {"order_id": "1"}},
            format="json",
        )
        detail = api.get(response["Location"]).json()
        assert (detail["topic"], detail["parent"], detail["recipients_total"]) == (
            None,
            None,
            None,
        )
        assert detail["recipient"] == "user-1"

    def test_recipient_and_topic_together_or_neither_is_a_400(self, api: Any) -> None:
        both = topic_send(api, recipient="user-1")
        neither = api.post(
            "/api/v1/notifications",
            {"template": "order_shipped", "data": {"order_id": "v2"}},
            format="json",
        )
        for response in (both, neither):
            assert response.status_code == 400
            assert response.json()["fields"] == {
                "recipient": ["Give exactly one of recipient and topic."]
            }
        assert not Notification.objects.exists()

    def test_unknown_topic_template_or_variable_is_a_400(self, api: Any, other_api: Any) -> None:
        unknown = topic_send(api, topic="nope")
        assert unknown.status_code == 400
        assert unknown.json()["fields"] == {"topic": ["Unknown topic 'nope'."]}
        # Another owner's topic is unknown to this one.
        assert topic_send(other_api).json()["fields"] == {
            "topic": ["Unknown topic 'release-notes'."]
        }
        assert topic_send(api, template="nope").json()["fields"] == {
            "template": ["Unknown template 'nope'."]
        }
        missing = topic_send(api, data={})
        assert missing.status_code == 400
        assert missing.json()["fields"] == {"data.order_id": ["Missing template variable."]}
        assert not Notification.objects.exists()

    def test_a_topic_is_refused_in_bulk(self, api: Any) -> None:
        response = api.post(
            "/api/v1/notifications/bulk",
            {
                "notifications": [
                    {"topic": "release-notes", "template": "order_shipped", "data": {}}
                ]
            },
            format="json",
        )
        assert response.status_code == 200
        [result] = response.json()["results"]
        assert result["status"] == 400
        assert result["error"]["fields"] == {
            "topic": ["A topic notification is sent alone: POST /api/v1/notifications."]
        }

    def test_idempotency_key_replays_the_first_answer(self, api: Any) -> None:
        first = topic_send(api, idempotency_key="release-2.0")
        again = topic_send(api, idempotency_key="release-2.0")
        assert first.status_code == 202
        assert again.status_code == 200
        assert again["Idempotent-Replayed"] == "true"
        assert again.json() == first.json()
        other_body = topic_send(api, data={"order_id": "v3"}, idempotency_key="release-2.0")
        assert other_body.status_code == 422
        assert Notification.objects.count() == 1
        assert IdempotencyRecord.objects.get().response == first.json()

    def test_idempotency_record_in_the_database_replays_when_redis_lost_the_key(
        self, api: Any
    ) -> None:
        import redis
        from django.conf import settings

        first = topic_send(api, idempotency_key="release-2.1")
        redis.Redis.from_url(settings.REDIS_URL).flushdb()
        again = topic_send(api, idempotency_key="release-2.1")
        assert again.status_code == 200
        assert again.json() == first.json()
        assert Notification.objects.count() == 1

    def test_a_topic_without_subscribers_is_fanned_out_at_once(self, api: Any) -> None:
        api.put(f"{TOPICS}/empty", {}, format="json")
        response = topic_send(api, topic="empty")
        assert response.json()["recipients_total"] == 0
        detail = api.get(response["Location"]).json()
        assert (detail["status"], detail["recipients_total"], detail["recipients_done"]) == (
            "fanned_out",
            0,
            0,
        )
