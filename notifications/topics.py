"""Topics and their subscribers: create or rename a topic, add and remove subscribers by
recipient id. Sending to a topic is notifications/fanout.py."""

from __future__ import annotations

from dataclasses import dataclass

from django.db import transaction

from notifications.models import Owner, Recipient, Topic, TopicSubscription


def topic_upsert(*, owner: Owner, key: str, name: str) -> tuple[Topic, bool]:
    """Create the topic, or rename it; returns it and whether it was created."""
    topic, created = Topic.objects.update_or_create(owner=owner, key=key, defaults={"name": name})
    return topic, created


@dataclass(frozen=True)
class SubscribersChange:
    """How many subscriptions a call added or removed, and the ids it did not know."""

    changed: int
    unknown: list[str]


def _recipients(owner: Owner, external_ids: list[str]) -> tuple[dict[str, int], list[str]]:
    wanted = list(dict.fromkeys(external_ids))
    known = dict(
        Recipient.objects.filter(owner=owner, external_id__in=wanted).values_list(
            "external_id", "pk"
        )
    )
    return known, [external_id for external_id in wanted if external_id not in known]


def topic_subscribers_add(*, topic: Topic, external_ids: list[str]) -> SubscribersChange:
    """Subscribe these recipients (of the topic's owner); an existing subscription stays as
    it is, and an unknown id is answered back rather than refusing the others."""
    known, unknown = _recipients(topic.owner, external_ids)
    with transaction.atomic():
        existing = set(
            TopicSubscription.objects.filter(
                topic=topic, recipient_id__in=known.values()
            ).values_list("recipient_id", flat=True)
        )
        new = [pk for pk in known.values() if pk not in existing]
        # ignore_conflicts: a concurrent call that subscribed the same recipient wins quietly.
        TopicSubscription.objects.bulk_create(
            [TopicSubscription(topic=topic, recipient_id=pk) for pk in new],
            ignore_conflicts=True,
        )
    return SubscribersChange(changed=len(new), unknown=unknown)


def topic_subscribers_remove(*, topic: Topic, external_ids: list[str]) -> SubscribersChange:
    """Unsubscribe these recipients; one that was not subscribed is no error."""
    known, unknown = _recipients(topic.owner, external_ids)
    removed, _ = TopicSubscription.objects.filter(
        topic=topic, recipient_id__in=known.values()
    ).delete()
    return SubscribersChange(changed=removed, unknown=unknown)
