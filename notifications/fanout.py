"""Topic notifications: accepting one (a single row, answered at once) and fanning it out in
the background, one child notification per subscriber, through the same routing, rendering
and batch write as a single send.

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
from collections import defaultdict
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Max
from django.utils import timezone

from core import db_clock
from notifications import idempotency, templating, unsubscribe
from notifications.accepting import (
    NotificationRequest,
    PreparedNotification,
    caps_apply,
    notification_prepare,
    notifications_write,
)
from notifications.frequency_caps import CapCheck, caps_give_back
from notifications.models import (
    CHANNEL_ORDER,
    Delivery,
    DeliveryStatus,
    IdempotencyRecord,
    Notification,
    Owner,
    Topic,
    TopicSubscription,
)
from notifications.selectors import (
    RecipientContext,
    TemplateSnapshot,
    template_snapshot_get,
    topic_subscriber_contexts,
)
from notifications.services import ValidationFailed
from workers.dispatch import batches_publish_rollback_unsafe

log = logging.getLogger(__name__)

# A topic notification's `status` in the API and the admin.
FANNING_OUT = "fanning_out"
FANNED_OUT = "fanned_out"
FANOUT_CANCELLED = "cancelled"


def topic_notification_status(notification: Notification) -> str:
    if notification.fanout_cancelled_at is not None:
        return FANOUT_CANCELLED
    return FANNING_OUT if notification.fanout_finished_at is None else FANNED_OUT


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
                IdempotencyRecord.objects.create(
                    owner=owner,
                    key=request.idempotency.key,
                    fingerprint=request.idempotency.fingerprint,
                    status_code=202,
                    response=body,
                )
            if subscribers["count"]:
                outbox_wake_on_commit()
    except IntegrityError as exc:
        claim = request.idempotency
        if (
            claim is not None
            and IdempotencyRecord.objects.filter(owner=owner, key=claim.key).exists()
        ):
            raise idempotency.RecordExists from exc
        raise
    log.info(
        "topic notification %s accepted for %s subscribers of %s",
        notification.pk,
        subscribers["count"],
        topic.key,
    )
    return body


def _children_prepare(
    *, parent: Notification, owner: Owner, subscribers: list[RecipientContext], now: datetime
) -> list[PreparedNotification]:
    """One child per subscriber, routed and rendered as a single send to it would be. A
    subscriber the send cannot reach now (the template was deleted or changed since and misses
    a variable) is logged and passed over."""
    contexts = {context.external_id: context for context in subscribers}
    templates: dict[str, TemplateSnapshot | None] = {}
    # Every child carries the parent's template and data: each locale renders once a chunk.
    renders: dict[tuple[str, str], Any] = {}
    prepared = []
    for context in subscribers:
        request = NotificationRequest(
            recipient=context.external_id,
            template_key=parent.template_key,
            data=parent.data,
            channels=parent.fanout_channels,
            priority=parent.priority,
            send_at=parent.send_at,
            cancel_key=parent.cancel_key,
        )
        try:
            child = notification_prepare(
                owner=owner,
                request=request,
                now=now,
                templates=templates,
                contexts=contexts,
                renders=renders,
            )
        except ValidationFailed as exc:
            log.warning(
                "topic notification %s: subscriber %s passed over: %s",
                parent.pk,
                context.external_id,
                exc.fields,
            )
            continue
        child.notification.parent_id = parent.pk
        prepared.append(child)
    return prepared


def _children_publish(due: list[int]) -> None:
    """Publish the children's deliveries due now once their chunk has committed, as the
    relay's outbox round does but by their ids (no scan of the outbox): mark them published
    and publish them in one transaction, so a crash before its commit leaves them in the
    outbox, and a refused publish rolls the mark back. Rows another relay took meanwhile are
    not published twice. The published mark is the database's time, as the relay's is: the
    sweeper compares it with that clock (core/db_clock.py)."""
    if not due:
        return
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(
                    f"UPDATE {connection.ops.quote_name(Delivery._meta.db_table)} "  # noqa: S608
                    # STATEMENT_TIMESTAMP(): what Now() is on PostgreSQL.
                    "SET enqueued_at = STATEMENT_TIMESTAMP() "
                    "WHERE id = ANY(%s) AND enqueued_at IS NULL RETURNING id, channel",
                    [due],
                )
                marked = cursor.fetchall()
        else:
            rows = Delivery.objects.filter(pk__in=due, enqueued_at__isnull=True)
            marked = list(rows.select_for_update().values_list("pk", "channel"))
            Delivery.objects.filter(pk__in=[pk for pk, _ in marked]).update(
                enqueued_at=db_clock.db_now()
            )
        by_channel: dict[str, list[int]] = defaultdict(list)
        for pk, channel in sorted(marked):
            by_channel[channel].append(pk)
        batches_publish_rollback_unsafe(by_channel)


def topic_fanout_step(*, chunk_size: int | None = None) -> bool:
    """Fan out the next chunk of one unfinished topic notification, in one transaction: its
    children with their deliveries, and its cursor; then publish the children due now.
    Returns False when no topic notification was waiting (or all were being fanned out by
    other processes)."""
    chunk_size = chunk_size or settings.FANOUT_CHUNK_SIZE
    # The children are routed here, on the relay's host: their due times (send_at,
    # escalation, digest, quiet hours) on the database's clock, as an API host's are.
    now = db_clock.now()
    taken: list[CapCheck] = []
    due: list[int] = []
    try:
        stepped = _fanout_step(chunk_size=chunk_size, now=now, taken=taken, due=due)
    except BaseException:
        caps_give_back(taken)  # the chunk was rolled back: its places under the caps too
        raise
    # Committed: should this fail, the children wait in the outbox for the relay's round.
    _children_publish(due)
    return stepped


def _fanout_step(*, chunk_size: int, now: datetime, taken: list[CapCheck], due: list[int]) -> bool:
    with transaction.atomic():
        parent = (
            Notification.objects.filter(
                recipients_total__isnull=False, fanout_finished_at__isnull=True
            )
            .order_by("created_at")
            .select_for_update(skip_locked=True)
            .first()
        )
        if parent is None:
            return False
        subscribers: list[RecipientContext] = []
        if parent.topic_id is not None and parent.fanout_until is not None:
            subscribers = topic_subscriber_contexts(
                topic_id=parent.topic_id,
                after=parent.fanout_after or 0,
                until=parent.fanout_until,
                limit=chunk_size,
            )
        if subscribers:
            owner = Owner.objects.get(pk=parent.owner_id)
            prepared = _children_prepare(
                parent=parent, owner=owner, subscribers=subscribers, now=now
            )
            if prepared:
                # Each child under the template's frequency caps, as a single send would be.
                caps_apply(prepared)
                taken.extend(check for child in prepared for check in child.caps)
                # Published by _children_publish below, in-app ones included.
                notifications_write(owner=owner, prepared=prepared, now=now, push_web=False)
                due += [
                    d.pk
                    for child in prepared
                    for d in child.deliveries
                    if d.status == DeliveryStatus.QUEUED and d.next_attempt_at is None
                ]
            parent.fanout_after = subscribers[-1].id
            parent.recipients_done += len(subscribers)
        if len(subscribers) < chunk_size:
            parent.fanout_finished_at = now
            parent.recipients_total = parent.recipients_done
        parent.save(
            update_fields=[
                "fanout_after",
                "recipients_done",
                "recipients_total",
                "fanout_finished_at",
            ]
        )
    log.info(
        "topic notification %s: %s of %s subscribers fanned out",
        parent.pk,
        parent.recipients_done,
        parent.recipients_total,
    )
    return True
