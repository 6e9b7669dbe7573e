"""Django admin for operators: templates, recipients with preferences and devices,
notifications with their deliveries and attempts, API keys. Saves go through the services
so caches are invalidated exactly as the API does."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest

from notifications import services, templating
from notifications.models import (
    ApiKey,
    Delivery,
    DeliveryAttempt,
    Device,
    Notification,
    Owner,
    Preference,
    Recipient,
    Template,
)


@admin.register(Owner)
class OwnerAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    search_fields = ["name"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "owner", "prefix", "created_at", "revoked_at"]
    list_filter = ["owner", "revoked_at"]
    search_fields = ["name", "prefix", "owner__name"]
    readonly_fields = ["owner", "name", "prefix", "key_hash", "created_at", "revoked_at"]
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Keys are created with `manage.py create_api_key`, which shows the raw key once.
        return False

    @admin.action(description="Revoke selected API keys")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = 0
        for api_key in queryset.filter(revoked_at__isnull=True):
            services.api_key_revoke(api_key=api_key)
            count += 1
        self.message_user(request, f"Revoked {count} API key(s).", messages.SUCCESS)


class PreferenceInline(admin.TabularInline):
    model = Preference
    extra = 1


class DeviceInline(admin.TabularInline):
    model = Device
    extra = 0
    fields = ["platform", "token", "active", "created_at"]
    readonly_fields = ["created_at"]


@admin.register(Recipient)
class RecipientAdmin(admin.ModelAdmin):
    list_display = ["external_id", "owner", "email", "phone", "locale", "timezone", "updated_at"]
    list_filter = ["owner", "locale"]
    search_fields = ["external_id", "email", "phone"]
    list_select_related = ["owner"]
    inlines = [PreferenceInline, DeviceInline]

    def save_related(
        self, request: HttpRequest, form: ModelForm, formsets: Any, change: bool
    ) -> None:
        super().save_related(request, form, formsets, change)
        services.recipient_invalidate(recipient=form.instance)

    def save_model(
        self, request: HttpRequest, obj: Recipient, form: ModelForm, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        services.recipient_invalidate(recipient=obj)

    def delete_model(self, request: HttpRequest, obj: Recipient) -> None:
        services.recipient_invalidate(recipient=obj)
        super().delete_model(request, obj)


@admin.register(Preference)
class PreferenceAdmin(admin.ModelAdmin):
    list_display = ["recipient", "channel", "category", "enabled"]
    list_filter = ["channel", "enabled"]
    search_fields = ["recipient__external_id", "category"]
    list_select_related = ["recipient"]
    autocomplete_fields = ["recipient"]

    def save_model(
        self, request: HttpRequest, obj: Preference, form: ModelForm, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        services.recipient_invalidate(recipient=obj.recipient)

    def delete_model(self, request: HttpRequest, obj: Preference) -> None:
        services.recipient_invalidate(recipient=obj.recipient)
        super().delete_model(request, obj)


class TemplateAdminForm(ModelForm):
    class Meta:
        model = Template
        fields = ["owner", "key", "category", "locale", "content", "translations"]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        for field, check in (
            ("content", templating.validate_content),
            ("translations", templating.validate_translations),
        ):
            if field in cleaned:
                try:
                    check(cleaned[field] if cleaned[field] is not None else {})
                except templating.TemplateError as exc:
                    self.add_error(field, [f"{k}: {' '.join(v)}" for k, v in exc.fields.items()])
        return cleaned


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    form = TemplateAdminForm
    list_display = ["key", "owner", "category", "locale", "updated_at"]
    list_filter = ["owner", "category", "locale"]
    search_fields = ["key", "category"]
    list_select_related = ["owner"]

    def save_model(
        self, request: HttpRequest, obj: Template, form: ModelForm, change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        services.template_invalidate(template=obj)

    def delete_model(self, request: HttpRequest, obj: Template) -> None:
        services.template_invalidate(template=obj)
        super().delete_model(request, obj)


class DeliveryInline(admin.TabularInline):
    model = Delivery
    extra = 0
    can_delete = False
    show_change_link = True
    fields = (
        "channel",
        "status",
        "skip_reason",
        "provider",
        "attempts",
        "last_error",
        "sent_at",
        "delivered_at",
        "read_at",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = ["id", "owner", "recipient", "template_key", "priority", "created_at"]
    list_filter = ["owner", "priority", "category", "created_at"]
    search_fields = ["=id", "recipient__external_id", "template_key", "idempotency_key"]
    list_select_related = ["owner", "recipient"]
    date_hierarchy = "created_at"
    readonly_fields = [
        "id",
        "owner",
        "recipient",
        "template",
        "template_key",
        "category",
        "priority",
        "locale",
        "data",
        "send_at",
        "idempotency_key",
        "created_at",
    ]
    inlines = [DeliveryInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


class AttemptInline(admin.TabularInline):
    model = DeliveryAttempt
    extra = 0
    can_delete = False
    fields = (
        "number",
        "provider",
        "outcome",
        "status_code",
        "provider_message_id",
        "error",
        "started_at",
        "latency_ms",
    )
    readonly_fields = fields

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "notification_id",
        "channel",
        "status",
        "skip_reason",
        "provider",
        "attempts",
        "updated_at",
    ]
    list_filter = ["channel", "status", "skip_reason", "provider"]
    search_fields = ["=notification__id", "provider_message_id", "address"]
    readonly_fields = [f.name for f in Delivery._meta.fields]
    inlines = [AttemptInline]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
