"""Django admin for operators: templates (live preview, send a test), recipients with
preferences and devices, notifications with their delivery timeline, and API keys. Saves
go through the services, or invalidate the caches exactly as they do."""

from __future__ import annotations

from functools import partial
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Exists, OuterRef, Prefetch, QuerySet
from django.forms import ModelForm
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from core import cache as keys
from notifications import admin_views, services, templating, webhooks
from notifications.models import (
    ApiKey,
    Channel,
    Delivery,
    DeliveryStatus,
    Device,
    Notification,
    Owner,
    Preference,
    Recipient,
    Suppression,
    Template,
    Topic,
    TopicSubscription,
    Webhook,
    WebhookMessage,
)
from notifications.schedules import RuleError, quiet_hours_parse
from notifications.selectors import notification_summary_status, topic_notification_status
from notifications.suppressions import suppression_delete
from workers import erasure, transitions


@admin.register(Owner)
class OwnerAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    search_fields = ["name"]


class ApiKeyCreateForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ["owner", "name"]
        help_texts = {"name": "What uses this key, e.g. orders-service (production)."}


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "owner",
        "prefix",
        "rate_limit_per_second",
        "created_at",
        "revoked_at",
    ]
    list_filter = ["owner", "revoked_at"]
    search_fields = ["name", "prefix", "owner__name"]
    list_select_related = ["owner"]
    actions = ["revoke"]

    def get_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[Any]:
        if obj is None:
            return ["owner", "name"]
        return ["owner", "name", "prefix", "rate_limit_per_second", "created_at", "revoked_at"]

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> list[str]:
        if obj is None:
            return []
        return ["owner", "name", "prefix", "created_at", "revoked_at"]

    def get_form(
        self, request: HttpRequest, obj: ApiKey | None = None, change: bool = False, **kwargs: Any
    ) -> type[ModelForm]:
        if obj is None:
            kwargs["form"] = ApiKeyCreateForm
        return super().get_form(request, obj, change, **kwargs)

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # A valid POST creates the key through the service (which hashes it) and answers
        # with the raw key right away; anything else is the stock add form.
        if request.method == "POST":
            if not self.has_add_permission(request):
                raise PermissionDenied
            form = self.get_form(request, None, change=False)(request.POST)
            if form.is_valid():
                api_key, raw_key = services.api_key_create(
                    owner_name=form.cleaned_data["owner"].name, name=form.cleaned_data["name"]
                )
                self.log_addition(request, api_key, [{"added": {}}])
                return admin_views.api_key_created_response(request, self, api_key, raw_key)
        return super().add_view(request, form_url, extra_context)

    def save_model(self, request: HttpRequest, obj: ApiKey, form: ModelForm, change: bool) -> None:
        super().save_model(request, obj, form, change)
        # The authentication cache holds the key's rate limit; an edit applies at once.
        keys.invalidate_on_commit(keys.api_key_key(obj.key_hash))

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
    verbose_name = "channel switch"
    verbose_name_plural = "preferences (untick 'enabled' to opt out; blank category: all)"


class DeviceInline(admin.TabularInline):
    model = Device
    extra = 0
    fields = ["platform", "token", "active", "created_at"]
    readonly_fields = ["created_at"]


class RecipientAdminForm(ModelForm):
    quiet_hours = admin_views.PrettyJSONField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 90, "spellcheck": "false"}),
        help_text='In the recipient\'s time zone, e.g. {"start": "22:00", "end": "07:00", '
        '"channels": ["sms", "push"]} (every channel when "channels" is left out). A '
        "non-critical delivery due inside is held until the end. Empty: none.",
    )

    class Meta:
        model = Recipient
        fields = ["owner", "external_id", "email", "phone", "locale", "timezone", "quiet_hours"]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        # The same checks as the API: a phone the SMS provider accepts, a real time zone.
        contact = {f: cleaned[f] for f in services.RECIPIENT_FIELDS if f in cleaned}
        try:
            cleaned.update(services.recipient_contact_normalise(values=contact))
        except services.ValidationFailed as exc:
            for field, problems in exc.fields.items():
                self.add_error(field, problems)
        if "quiet_hours" in cleaned:
            try:
                quiet = quiet_hours_parse(cleaned["quiet_hours"])
            except RuleError as exc:
                problems = [f"{k}: {' '.join(v)}" for k, v in exc.fields.items()]
                self.add_error("quiet_hours", problems)
            else:
                cleaned["quiet_hours"] = quiet.document() if quiet is not None else None
        return cleaned


@admin.register(Recipient)
class RecipientAdmin(admin.ModelAdmin):
    form = RecipientAdminForm
    list_display = [
        "external_id",
        "owner",
        "email",
        "phone",
        "locale",
        "timezone",
        "quiet",
        "updated_at",
    ]
    list_filter = ["owner", "locale", ("erased_at", admin.EmptyFieldListFilter)]
    search_fields = ["external_id", "email", "phone"]
    list_select_related = ["owner"]
    inlines = [PreferenceInline, DeviceInline]
    actions = ["erase"]

    @admin.action(description="Erase the selected recipients (keeps anonymous counts only)")
    def erase(self, request: HttpRequest, queryset: QuerySet[Recipient]) -> None:
        count = 0
        for recipient in queryset.filter(erased_at__isnull=True):
            actor = f"admin user {request.user.get_username()}"
            if erasure.recipient_erase(recipient=recipient, actor=actor, user_id=request.user.pk):
                count += 1
        self.message_user(request, f"Erased {count} recipient(s).", messages.SUCCESS)

    @admin.display(description="quiet hours")
    def quiet(self, obj: Recipient) -> str:
        q = obj.quiet_hours
        if not isinstance(q, dict):
            return "-"
        return f"{q.get('start')}-{q.get('end')} ({', '.join(q.get('channels') or [])})"

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
    list_filter = ["channel", "enabled", "recipient__owner"]
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


_JSON_BOX = forms.Textarea(attrs={"rows": 14, "cols": 90, "spellcheck": "false"})


class TemplateAdminForm(ModelForm):
    content = admin_views.PrettyJSONField(
        arrange=admin_views.content_in_channel_order,
        widget=_JSON_BOX,
        help_text=(
            'One entry per channel: "email" (subject, body, html), "sms" (body), "push" and '
            '"web" (title, body, url). Write variables as {{ order_id }}.'
        ),
    )
    translations = admin_views.PrettyJSONField(
        required=False,
        arrange=admin_views.translations_in_channel_order,
        widget=forms.Textarea(attrs={"rows": 6, "cols": 90, "spellcheck": "false"}),
        help_text='Other locales, e.g. {"fr": {"sms": {"body": "Commande {{ order_id }}"}}}.',
    )
    sample_data = admin_views.PrettyJSONField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 6, "cols": 90, "spellcheck": "false"}),
        help_text='Example variables for the preview and "Send a test", e.g. '
        '{"order_id": "A-1001"}.',
    )

    frequency_caps = admin_views.PrettyJSONField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 4, "cols": 90, "spellcheck": "false"}),
        help_text='At most N per recipient per window, per channel, e.g. {"email": "3/1h", '
        '"sms": "1/1d"} (units s, m, h, d). Over the cap a delivery is skipped '
        "(frequency_capped); critical notifications are never capped.",
    )
    escalation = admin_views.PrettyJSONField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 7, "cols": 90, "spellcheck": "false"}),
        help_text='E.g. [{"after": "15m", "unless": "read", "channel": "sms"}]: that channel '
        "goes out after the delay only if no other delivery was read (or delivered) by then.",
    )

    digest = admin_views.PrettyJSONField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 5, "cols": 90, "spellcheck": "false"}),
        help_text='E.g. {"window": "1h", "key": "{{ project_id }}", "web_at_once": true}: one '
        "delivery per channel for all of a recipient's notifications of the window; the content "
        "sees {{ events }} and {{ count }}. Empty: no digest.",
    )

    class Meta:
        model = Template
        fields = [
            "owner",
            "key",
            "category",
            "locale",
            "content",
            "translations",
            "sample_data",
            "frequency_caps",
            "frequency_cap_scope",
            "escalation",
            "digest",
        ]

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
        if cleaned.get("translations") is None and "translations" in cleaned:
            cleaned["translations"] = {}
        for field, empty in (("frequency_caps", {}), ("escalation", []), ("digest", {})):
            if field in cleaned and cleaned[field] is None:
                cleaned[field] = empty
        if {"frequency_caps", "escalation", "frequency_cap_scope"} <= cleaned.keys():
            problems = services.template_rules_validate(
                frequency_caps=cleaned["frequency_caps"],
                frequency_cap_scope=cleaned["frequency_cap_scope"],
                escalation=cleaned["escalation"],
                digest=cleaned.get("digest") or {},
            )
            for path, messages in problems.items():
                field = "escalation" if path.startswith("escalation") else path.split(".")[0]
                self.add_error(field, [f"{path}: {' '.join(messages)}"])
        sample = cleaned.get("sample_data")
        if sample is None and "sample_data" in cleaned:
            cleaned["sample_data"] = {}
        elif sample is not None and not isinstance(sample, dict):
            self.add_error("sample_data", 'Must be a JSON object, e.g. {"order_id": "A-1"}.')
        return cleaned


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    form = TemplateAdminForm
    list_display = ["key", "owner", "category", "locale", "channels", "updated_at"]
    list_filter = ["owner", "category", "locale"]
    search_fields = ["key", "category"]
    list_select_related = ["owner"]
    fieldsets = [
        (None, {"fields": ["owner", "key", "category", "locale"]}),
        ("Content", {"fields": ["content", "translations", "sample_data"]}),
        (
            "Delivery rules",
            {"fields": ["frequency_caps", "frequency_cap_scope", "escalation", "digest"]},
        ),
    ]

    class Media:
        css = {"all": ["clarion_admin/admin.css"]}
        js = ["clarion_admin/template_preview.js"]

    @admin.display(description="channels")
    def channels(self, obj: Template) -> str:
        return ", ".join(c for c in Channel.values if c in obj.content)

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path(
                "preview/",
                wrap(partial(admin_views.template_preview_view, model_admin=self)),
                name="notifications_template_preview",
            ),
            path(
                "<path:object_id>/send-test/",
                wrap(partial(admin_views.template_send_test_view, model_admin=self)),
                name="notifications_template_send_test",
            ),
            *super().get_urls(),
        ]

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        extra = {
            "preview_url": reverse("admin:notifications_template_preview"),
            "preview_channels": Channel.choices,
            **(extra_context or {}),
        }
        if object_id is not None:
            extra["send_test_url"] = reverse(
                "admin:notifications_template_send_test", args=[object_id]
            )
        return super().changeform_view(request, object_id, form_url, extra)

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
        "address",
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


class _DeliveryExistsFilter(admin.SimpleListFilter):
    """Notifications with at least one delivery whose `field` has the chosen value; an
    EXISTS keeps one row per notification however many deliveries match."""

    field = ""

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if not value:
            return queryset
        match = Delivery.objects.filter(notification=OuterRef("pk"), **{self.field: value})
        return queryset.filter(Exists(match))


class DeliveryStatusFilter(_DeliveryExistsFilter):
    title = "delivery status"
    parameter_name = "delivery_status"
    field = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(DeliveryStatus.choices)


class DeliveryChannelFilter(_DeliveryExistsFilter):
    title = "channel"
    parameter_name = "channel"
    field = "channel"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return list(Channel.choices)


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    list_display = [
        "short_id",
        "created_at",
        "recipient",
        "template_key",
        "priority",
        "status",
        "deliveries_summary",
        "owner",
    ]
    list_filter = [
        DeliveryStatusFilter,
        DeliveryChannelFilter,
        "priority",
        "owner",
        "created_at",
        "category",
    ]
    search_fields = [
        "=id",
        "recipient__external_id",
        "template_key",
        "idempotency_key",
        "=cancel_key",
    ]
    search_help_text = (
        "Notification id, recipient id, template key, idempotency key or cancel key (exact)."
    )
    actions = ["cancel"]
    list_select_related = ["owner", "recipient"]
    date_hierarchy = "created_at"
    ordering = ["-created_at"]
    # Everything is read-only: a notification is a record of what was asked and done.
    _fields: list[str] = [
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
        "cancel_key",
        "created_at",
    ]
    # A topic notification's fan-out, and a child's topic notification.
    _topic_fields: list[str] = ["topic", "parent", "fanout_progress"]
    fieldsets = [
        (None, {"fields": tuple(_fields)}),
        ("Topic", {"fields": tuple(_topic_fields)}),
        ("Timeline: every status change and provider attempt", {"fields": ["timeline"]}),
    ]
    readonly_fields = [*_fields, *_topic_fields, "timeline"]
    inlines = [DeliveryInline]

    class Media:
        css = {"all": ["clarion_admin/admin.css"]}

    def get_queryset(self, request: HttpRequest) -> QuerySet[Notification]:
        # One query for the deliveries of a whole page, not one per row.
        deliveries = Delivery.objects.only("id", "notification_id", "channel", "status")
        return (
            super()
            .get_queryset(request)
            .prefetch_related(Prefetch("deliveries", queryset=deliveries.order_by("id")))
        )

    @admin.action(description="Cancel what has not gone out of the selected notifications")
    def cancel(self, request: HttpRequest, queryset: QuerySet[Notification]) -> None:
        cancelled = kept = 0
        by_owner: dict[int, list[Notification]] = {}
        for notification in queryset.select_related("owner"):
            by_owner.setdefault(notification.owner_id, []).append(notification)
        for notifications in by_owner.values():
            answers = transitions.notifications_cancel(
                owner=notifications[0].owner,
                notifications=notifications,
                detail=f"cancelled in the admin by {request.user}",
            )
            cancelled += sum(len(a["cancelled"]) for a in answers)
            kept += sum(len(a["not_cancelled"]) for a in answers)
        self.message_user(
            request,
            f"Cancelled {cancelled} delivery(ies); {kept} had already gone out or ended.",
            messages.SUCCESS,
        )

    @admin.display(description="id", ordering="id")
    def short_id(self, obj: Notification) -> str:
        # The whole id is in the tooltip, on the change page and searchable; eight characters
        # tell the rows apart and keep the list readable.
        return format_html('<span title="{}">{}…</span>', obj.pk, str(obj.pk)[:8])

    @admin.display(description="status")
    def status(self, obj: Notification) -> str:
        if obj.recipients_total is not None:
            return f"{topic_notification_status(obj)} ({self.fanout_progress(obj)})"
        return notification_summary_status([d.status for d in obj.deliveries.all()])

    @admin.display(description="fan-out")
    def fanout_progress(self, obj: Notification) -> str:
        if obj.recipients_total is None:
            return "-"
        finished = obj.fanout_finished_at is not None
        return f"{obj.recipients_done} of {obj.recipients_total} subscribers" + (
            f", finished {obj.fanout_finished_at:%Y-%m-%d %H:%M:%S}" if finished else ""
        )

    @admin.display(description="deliveries")
    def deliveries_summary(self, obj: Notification) -> SafeString:
        return format_html_join(
            "",
            '<span class="clarion-status clarion-status-{}">{}: {}</span>',
            ((d.status, d.channel, d.status) for d in obj.deliveries.all()),
        )

    @admin.display(description="timeline")
    def timeline(self, obj: Notification) -> str:
        deliveries = list(obj.deliveries.all())
        return admin_views.timeline_html(
            admin_views.delivery_timeline(notification_id=str(obj.pk), deliveries=deliveries)
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "notification_link",
        "channel",
        "status",
        "skip_reason",
        "provider",
        "attempts",
        "short_error",
        "updated_at",
    ]
    list_filter = ["status", "channel", "provider", "skip_reason", "notification__owner"]
    search_fields = [
        "=notification__id",
        "notification__recipient__external_id",
        "address",
        "provider_message_id",
    ]
    search_help_text = "Notification id, recipient id, address or provider message id."
    ordering = ["-id"]
    readonly_fields = [*(f.name for f in Delivery._meta.fields), "timeline"]

    class Media:
        css = {"all": ["clarion_admin/admin.css"]}

    @admin.display(description="notification", ordering="notification_id")
    def notification_link(self, obj: Delivery) -> str:
        return admin_views.notification_link(obj.notification_id)

    @admin.display(description="last error")
    def short_error(self, obj: Delivery) -> str:
        return obj.last_error if len(obj.last_error) <= 60 else obj.last_error[:59] + "…"

    @admin.display(description="timeline")
    def timeline(self, obj: Delivery) -> str:
        return admin_views.timeline_html(
            admin_views.delivery_timeline(
                notification_id=str(obj.notification_id), deliveries=[obj], only_delivery=obj.pk
            )
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


# --- Topics -----------------------------------------------------------------------------------


@admin.register(Topic)
class TopicAdmin(admin.ModelAdmin):
    list_display = ["key", "name", "owner", "subscribers", "created_at"]
    list_filter = ["owner"]
    search_fields = ["key", "name"]
    readonly_fields = ["created_at", "subscribers"]
    fields = ["owner", "key", "name", "created_at", "subscribers"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Topic]:
        return (
            super()
            .get_queryset(request)
            .select_related("owner")
            .annotate(subscribers_count=Count("subscriptions"))
        )

    @admin.display(description="subscribers", ordering="subscribers_count")
    def subscribers(self, obj: Topic) -> SafeString | str:
        if obj.pk is None:
            return "-"
        count = getattr(obj, "subscribers_count", None)
        if count is None:
            count = obj.subscriptions.count()
        url = reverse("admin:notifications_topicsubscription_changelist")
        return format_html('<a href="{}?topic__id__exact={}">{}</a>', url, obj.pk, count)

    def get_readonly_fields(self, request: HttpRequest, obj: Topic | None = None) -> list[str]:
        # The key is what senders name: fixed once the topic exists.
        return [*self.readonly_fields, "owner", "key"] if obj else list(self.readonly_fields)


class TopicSubscriptionForm(ModelForm):
    class Meta:
        model = TopicSubscription
        fields = ["topic", "recipient"]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        topic, recipient = cleaned.get("topic"), cleaned.get("recipient")
        if topic and recipient and topic.owner_id != recipient.owner_id:
            raise forms.ValidationError("The recipient and the topic belong to different owners.")
        return cleaned


@admin.register(TopicSubscription)
class TopicSubscriptionAdmin(admin.ModelAdmin):
    form = TopicSubscriptionForm
    list_display = ["recipient", "topic", "created_at"]
    list_filter = ["topic"]
    search_fields = ["recipient__external_id", "recipient__email", "topic__key"]
    search_help_text = "Recipient id, email or topic key."
    list_select_related = ["recipient", "topic"]
    autocomplete_fields = ["topic", "recipient"]
    readonly_fields = ["created_at"]


@admin.register(Suppression)
class SuppressionAdmin(admin.ModelAdmin):
    """The addresses not sent to. Lifting one (the action) lets it be sent to again."""

    list_display = [
        "id",
        "channel",
        "address",
        "reason",
        "source",
        "short_detail",
        "owner",
        "created_at",
    ]
    list_filter = ["reason", "channel", "source", "owner", "created_at"]
    search_fields = ["address", "detail"]
    search_help_text = "An address (or part of one), or the provider's words."
    list_select_related = ["owner"]
    date_hierarchy = "created_at"
    readonly_fields = [
        "owner",
        "channel",
        "address",
        "reason",
        "source",
        "detail",
        "delivery",
        "created_at",
    ]
    actions = ["lift"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="detail")
    def short_detail(self, obj: Suppression) -> str:
        return obj.detail if len(obj.detail) <= 80 else obj.detail[:79] + "…"

    @admin.action(description="Lift the selected suppressions (send to these addresses again)")
    def lift(self, request: HttpRequest, queryset: QuerySet[Suppression]) -> None:
        count = 0
        for suppression in queryset:
            suppression_delete(suppression=suppression)
            count += 1
        self.message_user(request, f"Lifted {count} suppression(s).", messages.SUCCESS)


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    """Status webhook endpoints: which are failing, since when, and which were disabled."""

    list_display = ["id", "url", "owner", "health", "failing_since", "disabled_at", "created_at"]
    list_filter = [("disabled_at", admin.EmptyFieldListFilter), "owner"]
    search_fields = ["url"]
    list_select_related = ["owner"]
    readonly_fields = [
        "owner",
        "url",
        "event_types",
        "created_at",
        "failing_since",
        "disabled_at",
        "disabled_reason",
    ]
    exclude = ["secret", "previous_secret", "previous_secret_expires_at"]
    actions = ["enable", "replay"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="health")
    def health(self, obj: Webhook) -> str:
        if obj.disabled_at is not None:
            return f"disabled: {obj.disabled_reason}"
        return "failing" if obj.failing_since is not None else "ok"

    @admin.action(description="Switch the selected endpoints back on")
    def enable(self, request: HttpRequest, queryset: QuerySet[Webhook]) -> None:
        for webhook in queryset:
            webhooks.webhook_enable(webhook=webhook)
        self.message_user(request, f"Enabled {queryset.count()} endpoint(s).", messages.SUCCESS)

    @admin.action(description="Replay the dead messages of the selected endpoints")
    def replay(self, request: HttpRequest, queryset: QuerySet[Webhook]) -> None:
        count = sum(webhooks.webhook_messages_replay(webhook=w) for w in queryset)
        self.message_user(request, f"Replayed {count} message(s).", messages.SUCCESS)


@admin.register(WebhookMessage)
class WebhookMessageAdmin(admin.ModelAdmin):
    list_display = [
        "msg_id",
        "event_type",
        "webhook",
        "status",
        "attempts",
        "last_status_code",
        "next_attempt_at",
        "created_at",
        "sent_at",
    ]
    list_filter = ["status", "event_type", "created_at"]
    search_fields = ["=msg_id", "webhook__url", "last_error"]
    list_select_related = ["webhook"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
