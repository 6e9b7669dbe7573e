"""Request validation and the documented response shapes of the v1 API."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from notifications.models import (
    CHANNEL_ORDER,
    AttemptOutcome,
    DevicePlatform,
    Priority,
    SuppressionReason,
    WebhookEventType,
)
from notifications.schedules import (
    ESCALATION_CONDITIONS,
    EscalationStep,
    QuietHours,
    RuleError,
    escalation_parse,
    quiet_hours_parse,
)
from notifications.services import RECIPIENT_FIELDS, PreferencesChange
from notifications.suppressions import SUPPRESSIBLE_CHANNELS

CHANNEL_CHOICES = [(c, c) for c in CHANNEL_ORDER]
# The channels whose addresses can be suppressed (notifications.suppressions).
SUPPRESSIBLE_CHOICES = [(c.value, c.value) for c in SUPPRESSIBLE_CHANNELS]


class RecipientContactSerializer(serializers.Serializer):
    email = serializers.EmailField(required=False, allow_blank=True, allow_null=True)
    phone = serializers.CharField(
        required=False,
        allow_blank=True,
        allow_null=True,
        max_length=32,
        help_text="E.164, e.g. +14155550100",
    )
    locale = serializers.RegexField(
        r"^[A-Za-z]{2,8}([-_][A-Za-z0-9]{1,8})*$",
        required=False,
        allow_blank=True,
        allow_null=True,
        max_length=35,
    )
    timezone = serializers.CharField(
        required=False,
        allow_blank=True,
        allow_null=True,
        max_length=64,
        help_text="IANA name, e.g. Europe/Paris",
    )


class InlineRecipientSerializer(RecipientContactSerializer):
    """A recipient to upsert before sending: its id and contact data."""

    id = serializers.CharField(max_length=255)


class RecipientRefField(serializers.Field):
    default_error_messages = {"invalid": "Must be a recipient id or an object with an 'id'."}

    def to_internal_value(self, data: Any) -> str | dict[str, Any]:
        if isinstance(data, str):
            if not data.strip() or len(data) > 255:
                raise serializers.ValidationError("A recipient id is 1 to 255 characters.")
            return data
        if isinstance(data, dict):
            unknown = set(data) - {"id", *RECIPIENT_FIELDS}
            if unknown:
                raise serializers.ValidationError(
                    {name: ["Unknown field."] for name in sorted(unknown)}
                )
            inline = InlineRecipientSerializer(data=data)
            inline.is_valid(raise_exception=True)
            return {k: v for k, v in inline.validated_data.items()}
        self.fail("invalid")
        raise AssertionError("unreachable")

    def to_representation(self, value: Any) -> Any:
        return value


class RecipientRefFieldSchema(OpenApiSerializerFieldExtension):
    """A recipient id, or the InlineRecipient component (a named class in generated clients
    rather than an anonymous `...RecipientType1`)."""

    target_class = RecipientRefField

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> dict[str, Any]:
        inline = auto_schema.resolve_serializer(InlineRecipientSerializer, direction)
        # RecipientRefField refuses unknown fields.
        inline.schema["additionalProperties"] = False
        return {
            "oneOf": [
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "description": "A recipient id",
                },
                inline.ref,
            ]
        }


class NotificationCreateSerializer(serializers.Serializer):
    recipient = RecipientRefField(required=False, help_text="Give this or `topic`.")
    topic = serializers.SlugField(
        required=False,
        max_length=100,
        help_text="A topic's key instead of `recipient`: one notification to every subscriber, "
        "fanned out in the background.",
    )
    template = serializers.SlugField(max_length=100)
    # DRF moves declared fields off the class, so `data` does not shadow Serializer.data.
    data = serializers.DictField(required=False, default=dict)  # type: ignore[assignment]
    channels = serializers.ListField(
        child=serializers.ChoiceField(choices=CHANNEL_CHOICES),
        required=False,
        allow_empty=False,
        max_length=len(CHANNEL_ORDER),
        help_text="Default: every channel the template has.",
    )
    priority = serializers.ChoiceField(choices=Priority.choices, default=Priority.NORMAL)
    send_at = serializers.DateTimeField(required=False, allow_null=True, default=None)
    # No default: an empty key is refused, and the schema's default must be a valid value.
    cancel_key = serializers.CharField(
        required=False,
        max_length=255,
        help_text="A key of the caller's choosing; POST /notifications/cancel with it cancels "
        "every notification created with it that has not gone out yet.",
    )
    digest = serializers.BooleanField(
        required=False,
        default=True,
        help_text="false: this notification goes out at once, not collected into its "
        "template's digest (its content is still rendered as a digest of one). true (the "
        "default) follows the template.",
    )
    escalation = serializers.ListField(
        child=serializers.DictField(),
        required=False,
        allow_null=True,
        default=None,
        help_text="This notification's escalation steps instead of the template's, in the "
        'template\'s shape ([{"after": "15m", "unless": "read", "channel": "sms"}]); [] '
        "for none. Each step's channel must be one the template has.",
    )

    def validate_channels(self, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    def validate_escalation(self, value: list[Any] | None) -> list[EscalationStep] | None:
        if value is None:
            return None
        try:
            return escalation_parse(value)
        except RuleError as exc:
            raise serializers.ValidationError(
                [f"{path}: {' '.join(messages)}" for path, messages in exc.fields.items()]
            ) from exc

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("recipient" in attrs) == ("topic" in attrs):
            raise serializers.ValidationError(
                {"recipient": ["Give exactly one of recipient and topic."]}
            )
        if "topic" in attrs and (attrs.get("escalation") is not None or not attrs["digest"]):
            raise serializers.ValidationError(
                {
                    "topic": [
                        "A topic notification follows its template's digest and escalation: "
                        "digest and escalation cannot be overridden for a topic."
                    ]
                }
            )
        return attrs


class BulkItemSerializer(NotificationCreateSerializer):
    recipient = RecipientRefField()
    # Refused in a bulk item (to_internal_value says why): not part of its documented shape.
    topic = None  # type: ignore[assignment]
    idempotency_key = serializers.CharField(required=False, max_length=255)

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict) and "topic" in data:
            raise serializers.ValidationError(
                {"topic": ["A topic notification is sent alone: POST /api/v1/notifications."]}
            )
        return super().to_internal_value(data)


@extend_schema_field(BulkItemSerializer(many=True))
class BulkItemsField(serializers.ListField):
    """The view validates each item on its own (a bad item is a result, not a 400 for all), so
    this takes any objects; the schema documents what an item must be."""


class BulkCreateSerializer(serializers.Serializer):
    notifications = BulkItemsField(child=serializers.DictField(), max_length=1000)


class DeliveryAcceptedSerializer(serializers.Serializer):
    channel = serializers.ChoiceField(choices=CHANNEL_CHOICES)
    status = serializers.CharField()
    reason = serializers.CharField(
        required=False,
        help_text="Why it was skipped (opted_out, no_address, not_in_template, frequency_capped,"
        " suppressed) or held (quiet_hours).",
    )
    scheduled_for = serializers.DateTimeField(
        required=False,
        help_text="For a scheduled delivery: when it falls due (send_at, the end of the "
        "recipient's quiet hours, or an escalation's deadline).",
    )
    unless = serializers.ChoiceField(
        choices=ESCALATION_CONDITIONS,
        required=False,
        help_text="An escalation step: sent at scheduled_for unless another delivery of the "
        "notification was read (or delivered) by then.",
    )


class NotificationAcceptedSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.CharField()
    deliveries = DeliveryAcceptedSerializer(
        many=True, help_text="Empty for a topic notification: its children have the deliveries."
    )
    topic = serializers.CharField(required=False, help_text="Topic notifications only.")
    recipients_total = serializers.IntegerField(
        required=False, help_text="Topic notifications only: the subscribers it will reach."
    )


class CancelledDeliverySerializer(serializers.Serializer):
    channel = serializers.ChoiceField(choices=CHANNEL_CHOICES)
    status = serializers.CharField()
    reason = serializers.CharField(
        required=False, help_text="`being_sent`: a worker holds it; it goes to its provider."
    )


class NotificationCancelledSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    cancelled = CancelledDeliverySerializer(
        many=True, help_text="The deliveries this request cancelled."
    )
    not_cancelled = CancelledDeliverySerializer(
        many=True, help_text="The others: already sent, final, or being sent."
    )
    children_cancelled = serializers.IntegerField(
        required=False,
        help_text="A topic notification: its fan-out stops, and this many deliveries of its "
        "children written so far were cancelled.",
    )


class CancelByKeySerializer(serializers.Serializer):
    cancel_key = serializers.CharField(required=False, max_length=255)
    idempotency_key = serializers.CharField(required=False, max_length=255)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if len(attrs) != 1:
            raise serializers.ValidationError(
                {"non_field_errors": ["Give exactly one of cancel_key and idempotency_key."]}
            )
        return attrs


class CancelByKeyAnswerSerializer(serializers.Serializer):
    notifications = NotificationCancelledSerializer(many=True)


# errors.error_body's shape; the schema gives it to each 4xx answer
# (notifications.api.schema.document_errors).
class ErrorSerializer(serializers.Serializer):
    """The body of every error answer."""

    error = serializers.CharField(help_text="A stable code: validation_error, not_found, …")
    detail = serializers.CharField()
    # DRF's metaclass takes declared fields off the class, so this does not shadow
    # Serializer.fields.
    fields = serializers.DictField(  # type: ignore[assignment]
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text='Invalid fields and their messages: {"data.order_id": ["Missing."]}.',
    )


class BulkItemResultSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    status = serializers.IntegerField(help_text="The status this item alone would have had.")
    id = serializers.UUIDField(required=False)
    deliveries = DeliveryAcceptedSerializer(many=True, required=False)
    error = ErrorSerializer(required=False)


class BulkResultSerializer(serializers.Serializer):
    accepted = serializers.IntegerField()
    rejected = serializers.IntegerField()
    results = BulkItemResultSerializer(many=True)


class AttemptSerializer(serializers.Serializer):
    number = serializers.IntegerField()
    provider = serializers.CharField()
    outcome = serializers.ChoiceField(choices=AttemptOutcome.values)
    status_code = serializers.IntegerField(allow_null=True)
    provider_message_id = serializers.CharField(allow_null=True)
    error = serializers.CharField(allow_null=True)
    started_at = serializers.DateTimeField()
    latency_ms = serializers.FloatField()


class DeliveryDetailSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    channel = serializers.ChoiceField(choices=CHANNEL_CHOICES)
    status = serializers.CharField()
    reason = serializers.CharField(allow_null=True)
    unless = serializers.CharField(
        allow_null=True, help_text="An escalation step's condition: read or delivered."
    )
    provider = serializers.CharField(allow_null=True)
    provider_message_id = serializers.CharField(allow_null=True)
    attempt_count = serializers.IntegerField()
    last_error = serializers.CharField(allow_null=True)
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    sent_at = serializers.DateTimeField(allow_null=True)
    delivered_at = serializers.DateTimeField(allow_null=True)
    read_at = serializers.DateTimeField(allow_null=True)
    attempts = AttemptSerializer(many=True)


class NotificationDetailSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.CharField(
        help_text="From the deliveries; for a topic notification `fanning_out` or `fanned_out`."
    )
    recipient = serializers.CharField(allow_null=True, help_text="NULL for a topic notification.")
    topic = serializers.CharField(allow_null=True, help_text="A topic notification's topic.")
    parent = serializers.UUIDField(  # type: ignore[assignment]
        allow_null=True, help_text="The topic notification this one was fanned out from."
    )
    recipients_total = serializers.IntegerField(
        allow_null=True,
        help_text="Topic notifications: the subscribers at acceptance; once fanned out, the "
        "number reached.",
    )
    recipients_done = serializers.IntegerField(
        allow_null=True, help_text="Topic notifications: the subscribers fanned out so far."
    )
    template = serializers.CharField()
    category = serializers.CharField()
    priority = serializers.CharField()
    locale = serializers.CharField()
    data = serializers.DictField()  # type: ignore[assignment]
    send_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    deliveries = DeliveryDetailSerializer(many=True)


class RecipientSerializer(serializers.Serializer):
    id = serializers.CharField(source="external_id", read_only=True)
    email = serializers.CharField(read_only=True)
    phone = serializers.CharField(read_only=True)
    locale = serializers.CharField(read_only=True)
    timezone = serializers.CharField(read_only=True)
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)


class QuietHoursSerializer(serializers.Serializer):
    start = serializers.RegexField(r"^([01]\d|2[0-3]):[0-5]\d$", help_text="HH:MM, local time")
    end = serializers.RegexField(r"^([01]\d|2[0-3]):[0-5]\d$", help_text="HH:MM, local time")
    channels = serializers.ListField(
        child=serializers.ChoiceField(choices=CHANNEL_CHOICES),
        required=False,
        help_text="The channels held; every channel when absent.",
    )


class PreferencesSerializer(serializers.Serializer):
    channels = serializers.DictField(child=serializers.BooleanField(), required=False)
    categories = serializers.DictField(
        child=serializers.DictField(child=serializers.BooleanField()), required=False
    )
    quiet_hours = QuietHoursSerializer(
        required=False,
        allow_null=True,
        help_text="In the recipient's timezone (UTC when it has none): a non-critical delivery "
        "due inside the window is held until it ends. null removes them.",
    )

    def run_validation(self, data: Any = serializers.empty) -> PreferencesChange:
        # The document is checked whole by to_internal_value, a null body included.
        return self.to_internal_value({} if data is serializers.empty else data)

    def to_internal_value(self, data: Any) -> PreferencesChange:
        """The partial document as a PreferencesChange. The fields above document it; this
        checks it, keeping unknown names refused and every message on its own path
        (`categories.<category>.<channel>`, `quiet_hours.start`)."""
        if not isinstance(data, dict):
            raise serializers.ValidationError({"non_field_errors": ["Must be an object."]})
        errors: dict[str, list[str]] = {}
        for name in data:
            if name not in ("channels", "categories", "quiet_hours"):
                errors[name] = ["Unknown field; use channels, categories and quiet_hours."]
        switches: dict[tuple[str, str], bool] = {}
        quiet: QuietHours | None = None
        if "quiet_hours" in data:
            try:
                quiet = quiet_hours_parse(data["quiet_hours"])
            except RuleError as exc:
                errors.update(exc.fields)

        def take(given: Any, category: str, path: str) -> None:
            if not isinstance(given, dict):
                errors[path] = ["Must be an object of channel: true|false."]
                return
            for channel, enabled in given.items():
                if channel not in CHANNEL_ORDER:
                    errors[f"{path}.{channel}"] = [
                        f"Unknown channel; use {', '.join(CHANNEL_ORDER)}."
                    ]
                elif not isinstance(enabled, bool):
                    errors[f"{path}.{channel}"] = ["Must be true or false."]
                else:
                    switches[(category, channel)] = enabled

        take(data.get("channels", {}), "", "channels")
        categories = data.get("categories", {})
        if not isinstance(categories, dict):
            errors["categories"] = ["Must be an object keyed by category."]
        else:
            for category, given in categories.items():
                if not category or len(category) > 100:
                    errors[f"categories.{category}"] = ["A category name is 1 to 100 characters."]
                    continue
                take(given, category, f"categories.{category}")
        if errors:
            raise serializers.ValidationError(errors)
        return PreferencesChange(
            switches=switches, quiet_hours=quiet, quiet_hours_given="quiet_hours" in data
        )


class InboxPreferencesSerializer(PreferencesSerializer):
    template_categories = serializers.ListField(
        child=serializers.CharField(),
        read_only=True,
        help_text="The categories of the owner's templates, for a preferences page to offer "
        "(read only; a category with no rule is enabled).",
    )


# What an iOS app should register instead of its raw APNs device token.
APNS_REFUSED = (
    "APNs device tokens cannot be used: Clarion sends push through FCM, which reaches iOS "
    "through APNs itself. Register the FCM registration token of the iOS app (Firebase "
    'Messaging\'s token) with "platform": "fcm".'
)


class DeviceCreateSerializer(serializers.Serializer):
    platform = serializers.ChoiceField(choices=DevicePlatform.choices)
    token = serializers.CharField(max_length=512, trim_whitespace=True)

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict) and data.get("platform") == "apns":
            raise serializers.ValidationError({"platform": [APNS_REFUSED]})
        return super().to_internal_value(data)


class DeviceSerializer(serializers.Serializer):
    id = serializers.IntegerField(read_only=True)
    platform = serializers.CharField(read_only=True)
    token = serializers.CharField(read_only=True)
    active = serializers.BooleanField(read_only=True)
    created_at = serializers.DateTimeField(read_only=True)


class TemplateSerializer(serializers.Serializer):
    key = serializers.SlugField(max_length=100)
    category = serializers.CharField(max_length=100, required=False, allow_blank=True, default="")
    locale = serializers.RegexField(
        r"^[A-Za-z]{2,8}([-_][A-Za-z0-9]{1,8})*$", max_length=35, required=False, default="en"
    )
    content = serializers.DictField(
        help_text="Per channel: email {subject, body, html}, sms {body}, push {title, body, url},"
        " web {title, body, url}; values are Jinja templates over the notification's data."
    )
    translations = serializers.DictField(
        child=serializers.DictField(),
        required=False,
        default=dict,
        help_text="Other locales: {locale: content}. A recipient's locale falls back along "
        "its chain (pt-BR, then pt, then the template's locale); pt_BR and pt-br are one locale.",
    )
    frequency_caps = serializers.DictField(
        child=serializers.CharField(),
        required=False,
        default=dict,
        help_text='Per channel, at most N deliveries per recipient per window: {"email": "3/1h",'
        ' "sms": "1/1d"}. Over the cap a delivery is skipped (frequency_capped); critical '
        "notifications are counted, never capped.",
    )
    frequency_cap_scope = serializers.ChoiceField(
        choices=["template", "category"],
        required=False,
        default="template",
        help_text="What the caps count: this template, or every template of its category.",
    )
    escalation = serializers.ListField(
        child=serializers.DictField(),
        required=False,
        default=list,
        help_text='[{"after": "15m", "unless": "read", "channel": "sms"}]: that channel is '
        "sent after the delay only if no other delivery of the notification was read "
        "(or delivered) by then.",
    )
    digest = serializers.DictField(
        required=False,
        default=dict,
        help_text='{"window": "1h", "key": "{{ project_id }}", "web_at_once": true}: the '
        "notifications of one recipient (and key) in the window go out as one delivery per "
        "channel, whose content sees {{ events }} (every event's data) and {{ count }}; the "
        "in-app one still shows at once unless web_at_once is false. {} for none.",
    )
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)


class TemplateUpdateSerializer(TemplateSerializer):
    key = serializers.SlugField(max_length=100, required=False)


class SandboxMessageSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    channel = serializers.CharField()
    notification_id = serializers.UUIDField()
    delivery_id = serializers.IntegerField()
    to = serializers.JSONField()
    content = serializers.DictField()
    created_at = serializers.DateTimeField()


class DeadLetterSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    notification_id = serializers.UUIDField()
    delivery_id = serializers.IntegerField()
    recipient = serializers.CharField(source="notification.recipient.external_id")
    channel = serializers.CharField()
    provider = serializers.CharField()
    error = serializers.CharField()
    attempts = serializers.IntegerField()
    attempt_history = serializers.ListField(child=serializers.DictField())
    payload = serializers.DictField()
    status = serializers.CharField()
    created_at = serializers.DateTimeField()
    resolved_at = serializers.DateTimeField(allow_null=True)


# A dead letter's status, or any (one enum in the schema for the list and the bulk replay).
DEAD_LETTER_FILTER_STATUSES = ["open", "replayed", "discarded", "any"]


class DeadLetterFilterSerializer(serializers.Serializer):
    channel = serializers.ChoiceField(choices=CHANNEL_CHOICES, required=False)
    error = serializers.CharField(required=False, max_length=200, help_text="Substring")
    # Ten years bounds the ages: past it, "now minus the age" falls before the calendar.
    older_than = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=10 * 366 * 86400,
        help_text="Dead for at least this many seconds",
    )
    newer_than = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=10 * 366 * 86400,
        help_text="Dead for at most this many seconds",
    )
    status = serializers.ChoiceField(
        choices=DEAD_LETTER_FILTER_STATUSES, required=False, default="open"
    )


class DeadLetterReplaySerializer(serializers.Serializer):
    lift_suppression = serializers.BooleanField(
        required=False,
        default=False,
        help_text="When the address is on the suppression list: lift that suppression and "
        "replay, rather than answer 409.",
    )


class DeadLetterBulkReplaySerializer(DeadLetterFilterSerializer):
    lift_suppression = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Lift the suppressions of the matching dead letters' addresses and replay "
        "them all, rather than leave those open.",
    )


class DeadLetterCountsSerializer(serializers.Serializer):
    channels = serializers.DictField(child=serializers.IntegerField())
    threshold = serializers.IntegerField()
    over_threshold = serializers.ListField(child=serializers.CharField())


class CountSerializer(serializers.Serializer):
    count = serializers.IntegerField()


class SuppressionSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    channel = serializers.ChoiceField(choices=SUPPRESSIBLE_CHOICES)
    address = serializers.CharField()
    reason = serializers.ChoiceField(
        choices=SuppressionReason.values,
        help_text="bounced: a hard bounce (the address does not exist); complained: a spam "
        "report; stopped: the number replied STOP.",
    )
    # DRF's metaclass takes declared fields off the class, so this does not shadow Field.source.
    source = serializers.CharField(help_text="Who said so: sendgrid, twilio, smtp.")  # type: ignore[assignment]
    detail = serializers.CharField(help_text="The provider's own words.")
    delivery_id = serializers.IntegerField(allow_null=True)
    created_at = serializers.DateTimeField()


class DeadLetterReplayedSerializer(DeadLetterSerializer):
    lifted_suppression = SuppressionSerializer(
        allow_null=True, help_text="The suppression of the address this replay lifted."
    )


class DeadLetterConflictSerializer(serializers.Serializer):
    error = serializers.CharField(help_text="conflict, or suppressed")
    detail = serializers.CharField()
    suppression = SuppressionSerializer(
        required=False, help_text="With `suppressed`: the suppression that stops the replay."
    )


class DeadLetterReplayItemSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.ChoiceField(
        choices=["replayed", "suppressed"],
        help_text="suppressed: not replayed, the dead letter stays open.",
    )
    lifted_suppression = SuppressionSerializer(
        required=False, allow_null=True, help_text="replayed: the suppression lifted, if any."
    )
    suppression = SuppressionSerializer(
        required=False, help_text="suppressed: the suppression in the way."
    )


class DeadLetterBulkReplayedSerializer(serializers.Serializer):
    count = serializers.IntegerField(help_text="How many were replayed.")
    results = DeadLetterReplayItemSerializer(many=True, help_text="Each open match, by id.")


class SuppressionFilterSerializer(serializers.Serializer):
    channel = serializers.ChoiceField(choices=SUPPRESSIBLE_CHOICES, required=False)
    address = serializers.CharField(required=False, max_length=254, help_text="Substring")
    reason = serializers.ChoiceField(choices=SuppressionReason.values, required=False)


class HookReceivedSerializer(serializers.Serializer):
    received = serializers.IntegerField(help_text="Events in the post (repeats included).")


class RecipientTokenSerializer(serializers.Serializer):
    token = serializers.CharField(
        help_text="For the recipient's browser: `Authorization: Bearer <token>` on /inbox, and "
        'the first WebSocket frame `{"type": "auth", "token": ...}` (or `?token=`).'
    )
    expires_at = serializers.DateTimeField()
    recipient = serializers.CharField(help_text="The recipient id")


class InboxFilterSerializer(serializers.Serializer):
    unread = serializers.BooleanField(
        required=False, allow_null=True, default=None, help_text="true: unread only; false: read"
    )
    archived = serializers.BooleanField(
        required=False, default=False, help_text="true: the archived entries instead"
    )


class InboxEntrySerializer(serializers.Serializer):
    id = serializers.UUIDField(help_text="The notification id")
    title = serializers.CharField()
    body = serializers.CharField()
    data = serializers.DictField()  # type: ignore[assignment]
    created_at = serializers.DateTimeField()
    status = serializers.ChoiceField(choices=["queued", "retrying", "sent", "delivered", "read"])
    read_at = serializers.DateTimeField(allow_null=True)


class InboxReadAllSerializer(serializers.Serializer):
    marked_read = serializers.IntegerField(help_text="How many entries this request marked read")


# --- Topics ---------------------------------------------------------------------------------

# Recipient ids one subscribers call takes: one short transaction, one bounded body.
MAX_SUBSCRIBERS_PER_CALL = 1000


class TopicUpsertSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")


class TopicSerializer(serializers.Serializer):
    key = serializers.SlugField()
    name = serializers.CharField()
    subscribers_count = serializers.IntegerField()
    created_at = serializers.DateTimeField()


class TopicSubscribersSerializer(serializers.Serializer):
    recipients = serializers.ListField(
        child=serializers.CharField(max_length=255),
        allow_empty=False,
        max_length=MAX_SUBSCRIBERS_PER_CALL,
        error_messages={
            "max_length": f"At most {MAX_SUBSCRIBERS_PER_CALL} recipient ids per call; "
            "send the rest in further calls.",
            "empty": "Give at least one recipient id.",
        },
        help_text=f"1 to {MAX_SUBSCRIBERS_PER_CALL} recipient ids.",
    )


class TopicSubscribersAddedSerializer(serializers.Serializer):
    added = serializers.IntegerField(help_text="Subscriptions this call created.")
    unknown = serializers.ListField(
        child=serializers.CharField(), help_text="Ids of no recipient of yours: not subscribed."
    )
    subscribers_count = serializers.IntegerField()


class TopicSubscribersRemovedSerializer(serializers.Serializer):
    removed = serializers.IntegerField(help_text="Subscriptions this call removed.")
    unknown = serializers.ListField(
        child=serializers.CharField(), help_text="Ids of no recipient of yours."
    )
    subscribers_count = serializers.IntegerField()


class WebhookCreateSerializer(serializers.Serializer):
    url = serializers.URLField(max_length=2000, help_text="https:// and a public address.")
    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=WebhookEventType.values),
        allow_empty=False,
        max_length=len(WebhookEventType.values),
    )


class WebhookSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    url = serializers.CharField()
    event_types = serializers.ListField(child=serializers.CharField())
    created_at = serializers.DateTimeField()
    disabled_at = serializers.DateTimeField(allow_null=True)
    disabled_reason = serializers.CharField()
    failing_since = serializers.DateTimeField(allow_null=True)
    pending = serializers.IntegerField(help_text="Messages waiting to be sent.")
    dead = serializers.IntegerField(help_text="Messages that failed for good (replayable).")


class WebhookWithSecretSerializer(WebhookSerializer):
    secret = serializers.CharField(
        help_text="whsec_…: shown on creation and rotation only; verify `webhook-signature` "
        "with it (Standard Webhooks)."
    )
