"""Sandbox provider for any channel: records what it would have sent (admin and API show it)
and always succeeds, so the whole pipeline runs without an account anywhere."""

from __future__ import annotations

from workers.models import SandboxMessage
from workers.providers.base import OutboundMessage, Outcome, SendResult


class SandboxProvider:
    name = "sandbox"

    def send(self, message: OutboundMessage) -> SendResult:
        record = SandboxMessage.objects.create(
            owner_id=message.owner_id,
            notification_id=message.notification_id,
            delivery_id=message.delivery_id,
            channel=message.channel,
            to=message.to,
            content=message.content,
        )
        return SendResult(Outcome.OK, provider_message_id=f"sandbox-{record.pk}")
