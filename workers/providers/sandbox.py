"""Sandbox provider for any channel: records what it would have sent (admin and API show it)
and always succeeds, so the whole pipeline runs without an account anywhere. A batch is one
INSERT, made on the worker's own thread and connection."""

from __future__ import annotations

from django.conf import settings

from workers.models import SandboxMessage
from workers.providers.base import OutboundMessage, Outcome, SendResult


class SandboxProvider:
    name = "sandbox"

    @property
    def max_batch(self) -> int:
        return max(1, settings.DISPATCH_BATCH_SIZE)

    def send(self, message: OutboundMessage) -> SendResult:
        return self.send_batch([message])[0]

    def send_batch(self, messages: list[OutboundMessage]) -> list[SendResult]:
        records = SandboxMessage.objects.bulk_create(
            [
                SandboxMessage(
                    owner_id=m.owner_id,
                    notification_id=m.notification_id,
                    delivery_id=m.delivery_id,
                    channel=m.channel,
                    to=m.to,
                    content={**m.content, "headers": m.headers} if m.headers else m.content,
                )
                for m in messages
            ]
        )
        return [
            SendResult(Outcome.OK, provider_message_id=f"sandbox-{record.pk}") for record in records
        ]
