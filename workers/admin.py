"""Admin for the delivery side: the sandbox outbox and the dead-letter queue."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from workers.dead_letters import dead_letters_discard, dead_letters_replay
from workers.models import DeadLetter, SandboxMessage


@admin.register(SandboxMessage)
class SandboxMessageAdmin(admin.ModelAdmin):
    list_display = ["id", "channel", "to", "notification_id", "created_at"]
    list_filter = ["channel", "owner"]
    search_fields = ["=notification__id"]
    readonly_fields = [
        "owner",
        "notification",
        "delivery",
        "channel",
        "to",
        "content",
        "created_at",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    list_display = ["id", "channel", "provider", "short_error", "attempts", "status", "created_at"]
    list_filter = ["status", "channel", "provider", "owner"]
    search_fields = ["error", "=notification__id"]
    list_select_related = ["owner"]
    date_hierarchy = "created_at"
    readonly_fields = [
        "owner",
        "notification",
        "delivery",
        "channel",
        "provider",
        "error",
        "attempts",
        "attempt_history",
        "payload",
        "status",
        "created_at",
        "resolved_at",
    ]
    actions = ["replay", "discard"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="error")
    def short_error(self, obj: DeadLetter) -> str:
        return obj.error if len(obj.error) <= 80 else obj.error[:79] + "…"

    @admin.action(description="Replay selected dead letters")
    def replay(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        count = dead_letters_replay(letters=queryset)
        self.message_user(request, f"Replayed {count} dead letter(s).", messages.SUCCESS)

    @admin.action(description="Discard selected dead letters")
    def discard(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        count = dead_letters_discard(letters=queryset)
        self.message_user(request, f"Discarded {count} dead letter(s).", messages.SUCCESS)
