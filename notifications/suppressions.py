"""The suppression list: an address that bounced hard, complained of spam or replied STOP is
not sent to again on that channel for that owner, until an operator or the API lifts it."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.db import transaction
from django.db.models import Q, QuerySet

from core import cache as keys
from notifications.models import (
    Channel,
    Owner,
    Priority,
    Recipient,
    Suppression,
    SuppressionReason,
)

log = logging.getLogger(__name__)

# The channels whose address is a person's own (an email address, a phone number).
SUPPRESSIBLE_CHANNELS = (Channel.EMAIL, Channel.SMS)
# What a `critical` notification still respects: the address does not exist, or the number's
# owner said STOP (the carrier refuses it anyway). A spam complaint does not stop a password
# reset.
BINDING_FOR_CRITICAL = (SuppressionReason.BOUNCED, SuppressionReason.STOPPED)


def address_normalize(*, channel: str, address: str) -> str:
    """How an address is kept and compared: email case-insensitively, phones as given."""
    address = address.strip()
    return address.lower() if channel == Channel.EMAIL else address


def suppression_add(
    *,
    owner_id: int,
    channel: str,
    address: str,
    reason: str,
    source: str,
    detail: str = "",
    delivery_id: int | None = None,
) -> bool:
    """Suppress the address; True when it was not suppressed before (the first reason
    stays)."""
    address = address_normalize(channel=channel, address=address)
    if channel not in SUPPRESSIBLE_CHANNELS or not address:
        return False
    _, created = Suppression.objects.get_or_create(
        owner_id=owner_id,
        channel=channel,
        address=address,
        defaults={
            "reason": reason,
            "source": source,
            "detail": detail[:2000],
            "delivery_id": delivery_id,
        },
    )
    if created:
        _contexts_invalidate(owner_id=owner_id, channel=channel, address=address)
        log.info("suppressed %s address for owner %s: %s (%s)", channel, owner_id, reason, source)
    return created


def suppressions_lift(*, channel: str, address: str, reason: str) -> int:
    """Lift the suppressions of one reason on an address, for every owner (an SMS START
    undoes a STOP wherever it applied)."""
    address = address_normalize(channel=channel, address=address)
    with transaction.atomic():
        lifted = Suppression.objects.filter(channel=channel, address=address, reason=reason)
        owners = set(lifted.values_list("owner_id", flat=True))
        deleted, _ = lifted.delete()
        for owner_id in owners:
            _contexts_invalidate(owner_id=owner_id, channel=channel, address=address)
    return deleted


def suppression_delete(*, suppression: Suppression) -> None:
    with transaction.atomic():
        suppression.delete()
        _contexts_invalidate(
            owner_id=suppression.owner_id, channel=suppression.channel, address=suppression.address
        )
    log.info(
        "suppression of %s address lifted for owner %s",
        suppression.channel,
        suppression.owner_id,
    )


def suppressions_delete(*, suppressions: list[Suppression]) -> None:
    """suppression_delete() for several at once; the objects keep their ids, so a caller can
    still say which it lifted."""
    if not suppressions:
        return
    with transaction.atomic():
        Suppression.objects.filter(pk__in=[s.pk for s in suppressions]).delete()
        for suppression in suppressions:
            _contexts_invalidate(
                owner_id=suppression.owner_id,
                channel=suppression.channel,
                address=suppression.address,
            )
    for suppression in suppressions:
        log.info(
            "suppression of %s address lifted for owner %s",
            suppression.channel,
            suppression.owner_id,
        )


def suppressions_list(
    *,
    owner: Owner,
    channel: str | None = None,
    address: str | None = None,
    reason: str | None = None,
) -> QuerySet[Suppression]:
    found = Suppression.objects.filter(owner=owner)
    if channel:
        found = found.filter(channel=channel)
    if address:
        found = found.filter(address__icontains=address.strip())
    if reason:
        found = found.filter(reason=reason)
    return found.order_by("-created_at", "-id")


def suppressed_reasons(
    wanted: Iterable[tuple[int, str, str]],
) -> dict[tuple[int, str, str], str]:
    """(owner id, channel, address) → the reason it is suppressed, for those that are; one
    query for all of them."""
    where = _matching(wanted)
    if where is None:
        return {}
    return {
        (owner_id, channel, address): reason
        for owner_id, channel, address, reason in Suppression.objects.filter(where).values_list(
            "owner_id", "channel", "address", "reason"
        )
    }


def suppressions_matching(
    wanted: Iterable[tuple[int, str, str]],
) -> dict[tuple[int, str, str], Suppression]:
    """(owner id, channel, address) → its suppression, for those that are suppressed; one
    query for all of them."""
    where = _matching(wanted)
    if where is None:
        return {}
    return {(s.owner_id, s.channel, s.address): s for s in Suppression.objects.filter(where)}


def _matching(wanted: Iterable[tuple[int, str, str]]) -> Q | None:
    """The filter of the suppressions of these (owner id, channel, address); None when no
    address among them can be suppressed."""
    keys = {
        (owner_id, channel, address_normalize(channel=channel, address=address))
        for owner_id, channel, address in wanted
        if channel in SUPPRESSIBLE_CHANNELS and address
    }
    if not keys:
        return None
    by_scope: dict[tuple[int, str], list[str]] = {}
    for owner_id, channel, address in keys:
        by_scope.setdefault((owner_id, channel), []).append(address)
    where = Q()
    for (owner_id, channel), addresses in by_scope.items():
        where |= Q(owner_id=owner_id, channel=channel, address__in=addresses)
    return where


def suppression_binds(*, reason: str, priority: str) -> bool:
    """Whether a suppression of this reason stops a notification of this priority."""
    return priority != Priority.CRITICAL or reason in BINDING_FOR_CRITICAL


def recipient_suppressions(recipient: Recipient) -> dict[str, str]:
    """channel → reason, for the recipient's own addresses that are suppressed (part of the
    routing context the create path caches)."""
    wanted = [
        (recipient.owner_id, Channel.EMAIL, recipient.email),
        (recipient.owner_id, Channel.SMS, recipient.phone),
    ]
    return {channel: reason for (_, channel, _), reason in suppressed_reasons(wanted).items()}


def _contexts_invalidate(*, owner_id: int, channel: str, address: str) -> None:
    """Drop the cached routing contexts of the owner's recipients at this address."""
    field = "email__iexact" if channel == Channel.EMAIL else "phone"
    external_ids = Recipient.objects.filter(owner_id=owner_id, **{field: address}).values_list(
        "external_id", flat=True
    )
    found = [keys.recipient_key(owner_id, external_id) for external_id in external_ids]
    if found:
        keys.invalidate_on_commit(*found)
