"""What the sandbox providers would have sent, kept so the whole pipeline can be seen
working without an account at any provider."""

from __future__ import annotations

from django.db import models


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
