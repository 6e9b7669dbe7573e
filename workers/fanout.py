"""The worker half of topic fan-out (notifications/fanout.py accepts a topic notification):
the relay's steps, each one chunk of subscribers of one unfinished topic notification, their
children written with their deliveries and the cursor moved in one transaction, then the
children due now published as the relay's round would, but by id."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import transaction

from core import db_clock
from notifications.accepting import (
    NotificationRequest,
    PreparedNotification,
    caps_apply,
    notification_prepare,
    notifications_write,
)
from notifications.frequency_caps import CapCheck, caps_give_back
from notifications.models import DeliveryStatus, Notification, Owner
from notifications.selectors import RecipientContext, TemplateSnapshot, topic_subscriber_contexts
from notifications.services import ValidationFailed
from workers.transitions import deliveries_publish

log = logging.getLogger(__name__)


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
    if due:
        with transaction.atomic():
            deliveries_publish(due)
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
                # Published by topic_fanout_step once committed, in-app ones included.
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
