"""Admin for the delivery side: the sandbox outbox and the dead-letter queue, the latter
summarised per channel and error above its list."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse

from notifications import admin_views
from workers.dead_letters import (
    DeadLetterReplay,
    dead_letter_groups,
    dead_letters_discard,
    dead_letters_replay,
)
from workers.models import DeadLetter, DeadLetterStatus, ProviderEvent, SandboxMessage

# Groups shown above the dead-letter list; the rest stay reachable through the filters.
DEAD_LETTER_SUMMARY_GROUPS = 20


@admin.register(SandboxMessage)
class SandboxMessageAdmin(admin.ModelAdmin):
    list_display = ["id", "channel", "to", "recipient", "notification_link", "created_at"]
    list_filter = ["channel", "owner", "created_at"]
    search_fields = ["=notification__id", "notification__recipient__external_id", "to"]
    search_help_text = "Notification id, recipient id, or an address the message went to."
    list_select_related = ["notification__recipient"]
    readonly_fields = [
        "owner",
        "notification",
        "delivery",
        "channel",
        "to",
        "content",
        "created_at",
    ]

    @admin.display(description="recipient", ordering="notification__recipient__external_id")
    def recipient(self, obj: SandboxMessage) -> str:
        return obj.notification.addressee.external_id

    @admin.display(description="notification", ordering="notification_id")
    def notification_link(self, obj: SandboxMessage) -> str:
        return admin_views.notification_link(obj.notification_id)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "channel",
        "provider",
        "short_error",
        "recipient",
        "notification_link",
        "attempts",
        "status",
        "created_at",
    ]
    list_filter = ["status", "channel", "provider", "owner", "created_at"]
    search_fields = ["error", "=notification__id", "notification__recipient__external_id"]
    search_help_text = "Error text, notification id or recipient id."
    list_select_related = ["owner", "notification__recipient"]
    date_hierarchy = "created_at"
    change_list_template = "admin/workers/deadletter/change_list.html"
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

    class Media:
        css = {"all": ["clarion_admin/admin.css"]}

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        base = reverse("admin:workers_deadletter_changelist")
        groups = [
            {
                **group,
                "url": base
                + "?"
                + urlencode(
                    {
                        "status__exact": DeadLetterStatus.OPEN,
                        "channel": group["channel"],
                        "error": group["error"],
                    }
                ),
            }
            for group in dead_letter_groups(limit=DEAD_LETTER_SUMMARY_GROUPS)
        ]
        context = {"dead_letter_groups": groups, **(extra_context or {})}
        return super().changelist_view(request, context)

    @admin.display(description="error")
    def short_error(self, obj: DeadLetter) -> str:
        return obj.error if len(obj.error) <= 80 else obj.error[:79] + "…"

    @admin.display(description="recipient", ordering="notification__recipient__external_id")
    def recipient(self, obj: DeadLetter) -> str:
        return obj.notification.addressee.external_id

    @admin.display(description="notification", ordering="notification_id")
    def notification_link(self, obj: DeadLetter) -> str:
        return admin_views.notification_link(obj.notification_id)

    @admin.action(description="Replay selected dead letters")
    def replay(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        done = dead_letters_replay(letters=queryset)
        replayed = sum(1 for d in done if d.replayed)
        self.message_user(request, f"Replayed {replayed} dead letter(s).", messages.SUCCESS)
        held = [d for d in done if not d.replayed]
        if held:
            self.message_user(
                request,
                f"{len(held)} not replayed, their address is suppressed: "
                + ", ".join(f"#{d.dead_letter_id} ({_held_by(d)})" for d in held)
                + ". Lift the suppression first (Suppressions), then replay.",
                messages.WARNING,
            )

    @admin.action(description="Discard selected dead letters")
    def discard(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        count = dead_letters_discard(letters=queryset)
        self.message_user(request, f"Discarded {count} dead letter(s).", messages.SUCCESS)


def _held_by(done: DeadLetterReplay) -> str:
    suppression = done.suppression
    if suppression is None:
        return "suppressed"
    return f"suppression #{suppression.pk}, {suppression.reason}"


@admin.register(ProviderEvent)
class ProviderEventAdmin(admin.ModelAdmin):
    """What SendGrid and Twilio posted, as it came, and what applying it did."""

    list_display = [
        "id",
        "provider",
        "raw_status",
        "kind",
        "delivery_id",
        "address",
        "suppress",
        "occurred_at",
        "processed_at",
        "result",
    ]
    list_filter = ["provider", "kind", "raw_status", "received_at"]
    search_fields = ["=event_id", "=message_id", "=delivery_id", "address"]
    search_help_text = "Event id, provider message id, delivery id, or address."
    date_hierarchy = "received_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
