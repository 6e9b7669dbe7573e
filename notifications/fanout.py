"""Topic notifications: accepting one (a single row, answered at once) and stopping its
fan-out. The fan-out itself, one child notification per subscriber in the background through
the same routing, rendering and batch write as a single send, is the relay's
(workers/fanout.py):

The fan-out is durable and exactly-once per subscriber: a step claims one unfinished topic
notification (FOR UPDATE SKIP LOCKED, so several relays share the work), takes the next
FANOUT_CHUNK_SIZE subscribers in recipient order after its cursor, writes their children with
their deliveries and moves the cursor in the same transaction, then publishes the deliveries
due now as the relay's outbox round would, but by id. A crash rolls the whole chunk back, and
the next step starts again at the cursor; a crash before the publish commits leaves the
deliveries in the outbox for the next round.

Who is reached: the subscribers whose recipient id is at most the highest subscribed id at
acceptance (`fanout_until`), and who are still subscribed when their chunk is reached.
`recipients_total` is the subscriber count at acceptance, set to the number reached once the
fan-out ends."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Count, Max
from django.utils import timezone

from notifications import idempotency, templating, unsubscribe
from notifications.accepting import (
    NotificationRequest,
)
from notifications.models import (
    CHANNEL_ORDER,
    Notification,
    Owner,
    Topic,
    TopicSubscription,
)
from notifications.selectors import (
    TemplateSnapshot,
    template_snapshot_get,
)
from notifications.services import ValidationFailed

log = logging.getLogger(__name__)


def topic_fanouts_stop(*, notification_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """Stop the fan-out of the unfinished topic notifications among these; returns their ids.
    The row lock waits for a chunk being written to commit, so once this returns no further
    child is written, and the children written so far are all there to be cancelled."""
    now = timezone.now()
    with transaction.atomic():
        stopped = list(
            Notification.objects.filter(
                pk__in=notification_ids,
                recipients_total__isnull=False,
                fanout_finished_at__isnull=True,
            )
            .select_for_update()
            .values_list("pk", flat=True)
        )
        Notification.objects.filter(pk__in=stopped).update(
            fanout_finished_at=now, fanout_cancelled_at=now
        )
    return stopped


def _template_check(template: TemplateSnapshot, data: dict[str, Any]) -> None:
    """Render every channel of every locale of the template with `data`: a variable missing
    in any of them refuses the send now, rather than one child at a time later."""
    errors: dict[str, list[str]] = {}
    if template.digest is not None:  # written for a list of events: check a digest of one
        data = templating.digest_data([data])
    for content in [template.content, *template.translations.values()]:
        for channel in CHANNEL_ORDER:
            if channel in content:
                try:
                    templating.render_channel(
                        channel,
                        content[channel],
                        unsubscribe.render_data(
                            channel=channel,
                            fields=content[channel],
                            data=data,
                            owner_id=0,
                            recipient_id=None,
                            category=template.category,
                        ),
                    )
                except templating.TemplateError as exc:
                    errors.update(exc.fields)
    if errors:
        raise ValidationFailed(errors)


def _topic_body(notification: Notification, topic_key: str) -> dict[str, Any]:
    """The 202 body of a topic notification."""
    return {
        "id": str(notification.pk),
        "status": "accepted",
        "topic": topic_key,
        "recipients_total": notification.recipients_total,
        "deliveries": [],
    }


def topic_notification_accept(*, owner: Owner, request: NotificationRequest) -> dict[str, Any]:
    """Accept a notification to a topic's subscribers: check the topic and the template, then
    write the one topic notification (and its idempotency record) and wake the relay, which
    fans it out. Returns the 202 body; raises ValidationFailed for an unknown topic or
    template or a missing variable, idempotency.RecordExists when the key was recorded."""
    from core.outbox import outbox_wake_on_commit

    topic = Topic.objects.filter(owner=owner, key=request.topic).first()
    if topic is None:
        raise ValidationFailed({"topic": [f"Unknown topic '{request.topic}'."]})
    template = template_snapshot_get(owner_id=owner.pk, key=request.template_key)
    if template is None:
        raise ValidationFailed({"template": [f"Unknown template '{request.template_key}'."]})
    _template_check(template, request.data)

    now = timezone.now()
    try:
        with transaction.atomic():
            # One statement, one snapshot: the count and the last id agree.
            subscribers = TopicSubscription.objects.filter(topic=topic).aggregate(
                count=Count("id"), until=Max("recipient_id")
            )
            notification = Notification.objects.create(
                owner=owner,
                recipient=None,
                topic=topic,
                template_id=template.id,
                template_key=template.key,
                category=template.category,
                priority=request.priority,
                locale=template.locale,
                data=request.data,
                send_at=request.send_at,
                idempotency_key=request.idempotency.key if request.idempotency else "",
                cancel_key=request.cancel_key,
                recipients_total=subscribers["count"],
                recipients_done=0,
                fanout_after=0,
                fanout_until=subscribers["until"],
                fanout_finished_at=now if not subscribers["count"] else None,
                fanout_channels=request.channels,
            )
            body = _topic_body(notification, topic.key)
            if request.idempotency is not None:
                idempotency.accepted_record(
                    owner_id=owner.pk,
                    key=request.idempotency.key,
                    fingerprint=request.idempotency.fingerprint,
                    body=body,
                ).save(force_insert=True)
            if subscribers["count"]:
                outbox_wake_on_commit()
    except IntegrityError as exc:
        claim = request.idempotency
        if claim is not None and idempotency.records_exist(owner_id=owner.pk, keys=[claim.key]):
            raise idempotency.RecordExists from exc
        raise
    log.info(
        "topic notification %s accepted for %s subscribers of %s",
        notification.pk,
        subscribers["count"],
        topic.key,
    )
    return body
