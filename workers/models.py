"""What the sandbox providers would have sent, kept so the whole pipeline can be seen
working without an account at any provider."""

from __future__ import annotations

from django.db import models

from core import db_clock


class SandboxMessage(models.Model):
    owner = models.ForeignKey("notifications.Owner", on_delete=models.CASCADE)
    notification = models.ForeignKey("notifications.Notification", on_delete=models.CASCADE)
    delivery = models.ForeignKey("notifications.Delivery", on_delete=models.CASCADE)
    channel = models.CharField(max_length=10)
    to = models.JSONField()
    content = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.channel} to {self.to}"


class DeadLetterStatus(models.TextChoices):
    OPEN = "open", "Open"
    REPLAYED = "replayed", "Replayed"
    DISCARDED = "discarded", "Discarded"


class DeadLetter(models.Model):
    """A delivery that failed for good: its last error, its attempt history and its payload,
    kept until an operator replays or discards it."""

    owner = models.ForeignKey("notifications.Owner", on_delete=models.CASCADE)
    notification = models.ForeignKey("notifications.Notification", on_delete=models.CASCADE)
    delivery = models.ForeignKey(
        "notifications.Delivery", on_delete=models.CASCADE, related_name="dead_letters"
    )
    channel = models.CharField(max_length=10, db_index=True)
    provider = models.CharField(max_length=30, blank=True)
    error = models.TextField(blank=True)
    attempts = models.PositiveIntegerField()
    # The attempts as the delivery log had them when the delivery died.
    attempt_history = models.JSONField(default=list)
    # What would be sent: address and rendered content.
    payload = models.JSONField(default=dict)
    status = models.CharField(
        max_length=10, choices=DeadLetterStatus.choices, default=DeadLetterStatus.OPEN
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "channel"], name="deadletter_status_channel")]

    def __str__(self) -> str:
        return f"dead {self.channel} delivery {self.delivery_id}"


class ProviderEvent(models.Model):
    """One event a provider posted (SendGrid's event webhook, Twilio's status callbacks and
    inbound messages), kept as it came and applied in the background. Unique per provider and
    event id, so a post the provider repeats changes nothing."""

    provider = models.CharField(max_length=20)
    event_id = models.CharField(max_length=255)
    # What it means for us: a ProviderEventKind, "stop" / "start" (an SMS opt-out or back in),
    # or "ignored" (an event Clarion does not act on, kept for the record).
    kind = models.CharField(max_length=12)
    # The provider's own word for it ("bounce", "undelivered", "STOP") and its explanation.
    raw_status = models.CharField(max_length=50)
    detail = models.TextField(blank=True)
    # The address must not be sent to again (a SuppressionReason: hard bounce, complaint,
    # STOP), or blank.
    suppress = models.CharField(max_length=12, blank=True)
    delivery_id = models.BigIntegerField(null=True, blank=True)
    message_id = models.CharField(max_length=255, blank=True)
    # The address it concerns (an inbound STOP names no delivery, only the number).
    address = models.CharField(max_length=254, blank=True)
    payload = models.JSONField(default=dict)
    occurred_at = models.DateTimeField()
    # On the database's clock: the event is applied anyway PROVIDER_EVENTS_WAIT_SECONDS after
    # it, judged on that clock (core/db_clock.py).
    received_at = models.DateTimeField(default=db_clock.now, editable=False)
    # Not applied yet while NULL; `result` says what applying it did.
    processed_at = models.DateTimeField(null=True, blank=True)
    result = models.CharField(max_length=200, blank=True)
    # An event that came before its delivery was settled waits and is tried again.
    tries = models.PositiveIntegerField(default=0)
    not_before = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["provider", "event_id"], name="provider_event_unique")
        ]
        indexes = [
            models.Index(
                fields=["id"],
                condition=models.Q(processed_at__isnull=True),
                name="provider_event_pending",
            )
        ]

    def __str__(self) -> str:
        return f"{self.provider} {self.raw_status} ({self.event_id})"
