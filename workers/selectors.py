"""Reads for the delivery side."""

from __future__ import annotations

from django.db.models import QuerySet

from notifications.models import Owner
from workers.models import SandboxMessage

SANDBOX_LIST_LIMIT = 500


def sandbox_messages_list(
    *, owner: Owner, notification_id: str | None = None, channel: str | None = None
) -> QuerySet[SandboxMessage]:
    messages = SandboxMessage.objects.filter(owner=owner)
    if notification_id:
        messages = messages.filter(notification_id=notification_id)
    if channel:
        messages = messages.filter(channel=channel)
    return messages[:SANDBOX_LIST_LIMIT]
