"""Erasure of a recipient: its contact data, preferences, devices, topic subscriptions, the
suppressions of its addresses, its inbox content, its dead letters and the kept
Idempotency-Key answers that name it go, and its pending deliveries are cancelled. Its
notifications and deliveries stay only as anonymous counts (channel, status, template,
times), in the database and in the delivery log, under an id that names nobody. Audited in
the admin log."""

from __future__ import annotations

import functools
import json
import logging
import uuid
from dataclasses import dataclass

from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from core import cache as keys
from notifications import idempotency
from notifications.models import (
    Channel,
    Delivery,
    Device,
    IdempotencyRecord,
    Notification,
    Preference,
    Recipient,
    Suppression,
    TopicSubscription,
)
from notifications.services import ERASED_PREFIX
from notifications.suppressions import address_normalize

log = logging.getLogger(__name__)

# The account the admin log names for erasures made through the API (it cannot log in).
API_ACTOR_USERNAME = "clarion-api"


@dataclass(frozen=True)
class Erased:
    recipient_pk: int
    notifications: int
    deliveries: int
    cancelled: int


def recipient_erase(
    *, recipient: Recipient, actor: str, user_id: int | None = None
) -> Erased | None:
    """Erase the recipient (see the module); None when it was erased meanwhile. `actor` says
    who asked (an API key, an admin user) and `user_id` is the admin user, for the audit
    entry."""
    from notifications.delivery_log import get_delivery_log
    from workers.models import DeadLetter, SandboxMessage
    from workers.transitions import deliveries_cancel

    now = timezone.now()
    with transaction.atomic():
        locked = (
            Recipient.objects.select_for_update()
            .filter(pk=recipient.pk, erased_at__isnull=True)
            .first()
        )
        if locked is None:
            return None
        notifications = Notification.objects.filter(recipient=locked)
        notification_ids = list(notifications.values_list("pk", flat=True))
        cancelled = (
            deliveries_cancel(notification_ids=notification_ids, detail="recipient erased")
            if notification_ids
            else set()
        )
        deliveries: dict[str, list[int]] = {}
        for notification_id, delivery_id in Delivery.objects.filter(
            notification__recipient=locked
        ).values_list("notification_id", "pk"):
            deliveries.setdefault(str(notification_id), []).append(delivery_id)
        anonymous_id = f"{ERASED_PREFIX}{uuid.uuid4().hex}"
        get_delivery_log().recipient_anonymise(
            owner_id=locked.owner_id,
            recipient_id=locked.external_id,
            anonymous_id=anonymous_id,
            deliveries=deliveries,
        )
        addresses = Q(pk__in=[])
        if locked.email:
            email = address_normalize(channel=Channel.EMAIL, address=locked.email)
            addresses |= Q(channel=Channel.EMAIL, address=email)
        if locked.phone:
            addresses |= Q(channel=Channel.SMS, address=locked.phone)
        Suppression.objects.filter(addresses, owner_id=locked.owner_id).delete()
        Preference.objects.filter(recipient=locked).delete()
        Device.objects.filter(recipient=locked).delete()
        TopicSubscription.objects.filter(recipient=locked).delete()
        DeadLetter.objects.filter(notification__recipient=locked).delete()
        SandboxMessage.objects.filter(notification__recipient=locked).delete()
        records = IdempotencyRecord.objects.filter(
            _answers_naming(locked, notification_ids), owner_id=locked.owner_id
        )
        forgotten = list(records.values_list("key", flat=True))
        records.delete()
        if forgotten:
            transaction.on_commit(
                functools.partial(idempotency.forget, owner_id=locked.owner_id, keys=forgotten)
            )
        Delivery.objects.filter(notification__recipient=locked).update(
            address="", content={}, provider_message_id="", last_error="", updated_at=now
        )
        notifications.update(data={}, idempotency_key="", cancel_key="")
        Recipient.objects.filter(pk=locked.pk).update(
            external_id=anonymous_id,
            email="",
            phone="",
            locale="",
            timezone="",
            quiet_hours=None,
            erased_at=now,
            updated_at=now,
        )
        keys.invalidate_on_commit(
            keys.recipient_key(locked.owner_id, locked.external_id), keys.devices_key(locked.pk)
        )
        erased = Erased(
            recipient_pk=locked.pk,
            notifications=len(notification_ids),
            deliveries=sum(len(ids) for ids in deliveries.values()),
            cancelled=len(cancelled),
        )
        _audit(erased, owner_name=locked.owner.name, actor=actor, user_id=user_id)
    log.info(
        "recipient %s of owner %s erased: %s notifications, %s deliveries (%s cancelled)",
        erased.recipient_pk,
        locked.owner_id,
        erased.notifications,
        erased.deliveries,
        erased.cancelled,
    )
    return erased


def _answers_naming(recipient: Recipient, notification_ids: list[uuid.UUID]) -> Q:
    """The kept Idempotency-Key answers that name the recipient: its notifications' 202s, and
    any answer holding its id, email address or phone number as a JSON string (a recipient
    token's, a dead letter's, a lifted suppression's; case aside, as addresses are kept)."""
    named = Q(response__id__in=[str(pk) for pk in notification_ids])
    for value in (recipient.external_id, recipient.email, recipient.phone):
        if value:
            named |= Q(response__icontains=json.dumps(value, ensure_ascii=False))
    return named


def _audit(erased: Erased, *, owner_name: str, actor: str, user_id: int | None) -> None:
    """One admin log entry, naming nobody: the row's number, the owner, who asked (an admin
    user, or the API's own account)."""
    if user_id is not None:
        return _log_entry(erased, owner_name=owner_name, actor=actor, user_id=user_id)
    user, _ = get_user_model().objects.get_or_create(
        username=API_ACTOR_USERNAME,
        defaults={"is_active": False, "password": make_password(None)},
    )
    return _log_entry(erased, owner_name=owner_name, actor=actor, user_id=user.pk)


def _log_entry(erased: Erased, *, owner_name: str, actor: str, user_id: int) -> None:
    LogEntry.objects.log_actions(
        user_id=user_id,
        queryset=Recipient.objects.filter(pk=erased.recipient_pk),
        action_flag=DELETION,
        change_message=(
            f"Erased by {actor} for owner {owner_name}: contact data, preferences, devices, "
            f"subscriptions, suppressions and inbox content; {erased.notifications} "
            f"notifications and {erased.deliveries} deliveries kept as anonymous counts, "
            f"{erased.cancelled} pending deliveries cancelled."
        ),
        single_object=True,
    )
