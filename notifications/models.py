"""Clarion's data model. The database is the truth: a Delivery row, not a broker message,
says what still has to be sent."""

from __future__ import annotations

import uuid

from django.db import models

from core import db_clock
from core.db_clock import db_now


class Channel(models.TextChoices):
    EMAIL = "email", "Email"
    SMS = "sms", "SMS"
    PUSH = "push", "Push"
    WEB = "web", "In-app"


CHANNEL_ORDER = [c.value for c in Channel]


class Priority(models.TextChoices):
    LOW = "low", "Low"
    NORMAL = "normal", "Normal"
    HIGH = "high", "High"
    CRITICAL = "critical", "Critical"


class DeliveryStatus(models.TextChoices):
    SCHEDULED = "scheduled", "Scheduled"
    QUEUED = "queued", "Queued"
    SENT = "sent", "Sent"
    DELIVERED = "delivered", "Delivered"
    READ = "read", "Read"
    RETRYING = "retrying", "Retrying"
    DEAD = "dead", "Dead"
    SKIPPED = "skipped", "Skipped"
    CANCELLED = "cancelled", "Cancelled"
    # After `sent`, as the provider reported it: the address rejected the message (bounced),
    # or the provider could not deliver it (failed: an SMS undelivered, an email dropped).
    BOUNCED = "bounced", "Bounced"
    FAILED = "failed", "Failed"


# A web delivery is in the recipient's inbox from acceptance on, whether or not the worker
# has pushed it yet: the database is the inbox, the WebSocket push only makes it instant.
INBOX_STATUSES = (
    DeliveryStatus.QUEUED,
    DeliveryStatus.RETRYING,
    DeliveryStatus.SENT,
    DeliveryStatus.DELIVERED,
    DeliveryStatus.READ,
)
# No socket has acknowledged (acked or read) these yet.
UNACKNOWLEDGED_STATUSES = (DeliveryStatus.QUEUED, DeliveryStatus.RETRYING, DeliveryStatus.SENT)
UNREAD_STATUSES = (*UNACKNOWLEDGED_STATUSES, DeliveryStatus.DELIVERED)

# Statuses in which a delivery still waits for a worker; every other status is final for the
# worker (delivered/read only move forward through client acknowledgements).
PENDING_STATUSES = (DeliveryStatus.QUEUED, DeliveryStatus.RETRYING)
FINAL_STATUSES = (
    DeliveryStatus.SENT,
    DeliveryStatus.DELIVERED,
    DeliveryStatus.READ,
    DeliveryStatus.DEAD,
    DeliveryStatus.SKIPPED,
    DeliveryStatus.CANCELLED,
    DeliveryStatus.BOUNCED,
    DeliveryStatus.FAILED,
)


class ProviderEventKind(models.TextChoices):
    """What a provider told us of a message after accepting it (workers/provider_events.py).
    The first three are also delivery statuses; the others are events in the delivery log
    only."""

    DELIVERED = "delivered", "Delivered"
    BOUNCED = "bounced", "Bounced"
    FAILED = "failed", "Failed"
    OPENED = "opened", "Opened"
    CLICKED = "clicked", "Clicked"
    COMPLAINED = "complained", "Complained"


# What the delivery log records: a status entered, or a provider's event.
DELIVERY_EVENT_CHOICES = [
    *DeliveryStatus.choices,
    *[(k.value, k.label) for k in ProviderEventKind if k.value not in DeliveryStatus.values],
]


class SkipReason(models.TextChoices):
    OPTED_OUT = "opted_out", "Opted out"
    NO_ADDRESS = "no_address", "No address"
    NOT_IN_TEMPLATE = "not_in_template", "Not in template"
    FREQUENCY_CAPPED = "frequency_capped", "Frequency capped"
    # Not a skip: a scheduled delivery held until the recipient's quiet hours end.
    QUIET_HOURS = "quiet_hours", "Held by quiet hours"
    # Not a skip: a scheduled delivery collected into a digest, sent when the window ends.
    DIGEST = "digest", "Collected for a digest"
    # The event went out inside a digest notification (the status event names it).
    DIGESTED = "digested", "Sent in a digest"
    # The address is on the owner's suppression list for the channel (Suppression).
    SUPPRESSED = "suppressed", "Suppressed"


class Owner(models.Model):
    """A tenant: the service (or team) that owns API keys and every object they create."""

    name = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class ApiKey(models.Model):
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    # The first characters of the raw key, enough for an operator to tell keys apart.
    prefix = models.CharField(max_length=16)
    key_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # The API gateway's limit for this key (notifications.api.throttling).
    rate_limit_per_second = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Requests per second; empty: the API_RATE_LIMIT_PER_SECOND setting; 0: no limit.",
    )

    class Meta:
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class Recipient(models.Model):
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="recipients")
    external_id = models.CharField(max_length=255)
    email = models.EmailField(max_length=254, blank=True)
    phone = models.CharField(max_length=20, blank=True, help_text="E.164, e.g. +14155550100")
    locale = models.CharField(max_length=35, blank=True)
    timezone = models.CharField(max_length=64, blank=True)
    # {"start": "22:00", "end": "07:00", "channels": ["sms", "push"]} in `timezone` (UTC when
    # blank): a non-critical delivery due inside the window is held until it ends.
    quiet_hours = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Erased (workers.erasure): no contact data left, `external_id` replaced by an
    # anonymous one; the row stays so that its notifications remain as anonymous counts.
    erased_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["owner", "external_id"], name="recipient_owner_id")
        ]

    def __str__(self) -> str:
        return self.external_id


class InboxCounter(models.Model):
    """The last inbox position given to one recipient's in-app deliveries (DESIGN.md: the
    `since` of a WebSocket). Positions are given when a delivery is first pushed, under this
    row's lock and in the pushing transaction, so per recipient they are dense (1, 2, 3, …)
    and commit in order: a socket that has seen every position up to N misses nothing by
    resuming from N. A row of its own, so no save of a Recipient can write back an old value
    and no recipient update waits for a push."""

    recipient = models.OneToOneField(
        Recipient, on_delete=models.CASCADE, primary_key=True, related_name="inbox_counter"
    )
    position = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.recipient_id}: {self.position}"


class Preference(models.Model):
    """One opt-out (or explicit opt-in) switch: a channel, for all categories when `category`
    is blank, or for one category."""

    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="preferences")
    category = models.CharField(max_length=100, blank=True, help_text="Blank: every category")
    channel = models.CharField(max_length=10, choices=Channel.choices)
    enabled = models.BooleanField(default=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["recipient", "category", "channel"], name="preference_unique"
            )
        ]

    def __str__(self) -> str:
        scope = self.category or "all categories"
        return f"{self.channel} / {scope}: {'on' if self.enabled else 'off'}"


class DevicePlatform(models.TextChoices):
    """Push goes through FCM for Android, iOS and the web alike: an iOS app registers the FCM
    token that Firebase Messaging gives it (FCM speaks to APNs on its behalf). Raw APNs
    tokens are refused, since no provider here can use one (README, "Push")."""

    FCM = "fcm", "Firebase Cloud Messaging"


class Device(models.Model):
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="devices")
    platform = models.CharField(max_length=10, choices=DevicePlatform.choices)
    token = models.CharField(max_length=512)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["recipient", "platform", "token"], name="device_unique")
        ]

    def __str__(self) -> str:
        return f"{self.platform}:{self.token[:12]}…"


class Template(models.Model):
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="templates")
    key = models.SlugField(max_length=100)
    category = models.CharField(max_length=100, blank=True)
    locale = models.CharField(max_length=35, default="en", help_text="Default locale")
    # {"email": {"subject", "body", "html"}, "sms": {"body"}, "push": {...}, "web": {...}}
    content = models.JSONField(default=dict)
    # {"fr": {<channel content as above>}, ...}: other locales of the same template.
    translations = models.JSONField(default=dict, blank=True)
    # Example `data` for the admin's live preview and "send a test"; never used for real sends.
    sample_data = models.JSONField(default=dict, blank=True)
    # {"email": "3/1h", "sms": "1/1d"}: at most N deliveries of a channel per recipient per
    # window, counted over this template or over every template of its category.
    frequency_caps = models.JSONField(default=dict, blank=True)
    frequency_cap_scope = models.CharField(
        max_length=10,
        choices=[("template", "This template"), ("category", "Every template of the category")],
        default="template",
    )
    # [{"after": "15m", "unless": "read", "channel": "sms"}]: send that channel later only if
    # no delivery of the notification was read (or delivered) by then.
    escalation = models.JSONField(default=list, blank=True)
    # {"window": "1h", "key": "{{ project_id }}", "web_at_once": true}: the notifications of
    # one recipient (and key) in the window go out as one delivery per channel.
    digest = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "key"], name="template_owner_key")]

    def __str__(self) -> str:
        return self.key


class Notification(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="notifications")
    # NULL for a topic notification: its children, one per subscriber, have a recipient.
    recipient = models.ForeignKey(
        Recipient,
        on_delete=models.CASCADE,
        related_name="notifications",
        null=True,
        blank=True,
    )
    template = models.ForeignKey(Template, on_delete=models.SET_NULL, null=True, blank=True)
    template_key = models.CharField(max_length=100)
    category = models.CharField(max_length=100, blank=True)
    priority = models.CharField(max_length=10, choices=Priority.choices, default=Priority.NORMAL)
    locale = models.CharField(max_length=35, blank=True)
    data = models.JSONField(default=dict, blank=True)
    send_at = models.DateTimeField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=255, blank=True)
    # Set by the caller to cancel several notifications at once ("every reminder of order
    # A-1001": POST /notifications/cancel with this key).
    cancel_key = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    # --- Topics (notifications/fanout.py) ---
    # A topic notification: sent to the topic's subscribers, fanned out in the background.
    topic = models.ForeignKey(
        "Topic", on_delete=models.SET_NULL, null=True, blank=True, related_name="notifications"
    )
    # A child of a topic notification: the one for one subscriber.
    parent = models.ForeignKey(
        "self", on_delete=models.CASCADE, null=True, blank=True, related_name="children"
    )
    # The subscribers when the topic notification was accepted; on completion, the number
    # actually reached (subscribers who left before their turn are not counted).
    recipients_total = models.PositiveIntegerField(null=True, blank=True)
    recipients_done = models.PositiveIntegerField(default=0)
    # The fan-out's cursor: the last recipient (primary key) handled, and the last one it will
    # handle (the highest subscribed recipient at acceptance).
    fanout_after = models.BigIntegerField(null=True, blank=True)
    fanout_until = models.BigIntegerField(null=True, blank=True)
    fanout_finished_at = models.DateTimeField(null=True, blank=True)
    # Set with fanout_finished_at when a cancel stopped the fan-out before its end.
    fanout_cancelled_at = models.DateTimeField(null=True, blank=True)
    # The channels the topic notification asked for, for its children; NULL: the template's.
    fanout_channels = models.JSONField(null=True, blank=True)

    class Meta:
        constraints = [
            # The backstop of exactly-once fan-out: one child per parent and recipient.
            models.UniqueConstraint(
                fields=["parent", "recipient"],
                name="notification_parent_recipient",
                condition=models.Q(parent__isnull=False),
            )
        ]
        indexes = [
            # The fan-out's claim: partial, so it holds only topic notifications not done yet.
            models.Index(
                fields=["created_at"],
                name="notification_fanout_pending",
                condition=models.Q(recipients_total__isnull=False, fanout_finished_at__isnull=True),
            ),
            models.Index(fields=["owner", "-created_at"], name="notification_owner_recent"),
            models.Index(
                fields=["owner", "cancel_key"],
                name="notification_cancel_key",
                condition=~models.Q(cancel_key=""),
            ),
            models.Index(
                fields=["owner", "idempotency_key"],
                name="notification_idempotency_key",
                condition=~models.Q(idempotency_key=""),
            ),
        ]

    def __str__(self) -> str:
        if self.recipient_id is None and self.topic_id is not None:
            return f"{self.template_key} → topic {self.topic_id}"
        return f"{self.template_key} → {self.recipient_id}"

    @property
    def addressee(self) -> Recipient:
        """The recipient of a notification that has deliveries: every one but a topic
        notification, which has none (its children do)."""
        if self.recipient is None:
            raise ValueError(f"topic notification {self.pk} has no recipient")
        return self.recipient

    @property
    def addressee_id(self) -> int:
        if self.recipient_id is None:
            raise ValueError(f"topic notification {self.pk} has no recipient")
        return self.recipient_id


# Statuses of a delivery the outbox relay may still have to publish (workers/relay.py): new
# or retrying ones, and scheduled ones once they fall due.
OUTBOX_STATUSES = (DeliveryStatus.SCHEDULED, *PENDING_STATUSES)


class DeliveryQuerySet(models.QuerySet["Delivery"]):
    # Due and leased are judged by the database's clock, never the caller's: the times they
    # compare were written by other processes on other hosts (core/db_clock.py).
    def due(self) -> DeliveryQuerySet:
        return self.filter(
            models.Q(next_attempt_at__isnull=True) | models.Q(next_attempt_at__lte=db_now())
        )

    def unleased(self) -> DeliveryQuerySet:
        return self.filter(
            models.Q(lease_expires_at__isnull=True) | models.Q(lease_expires_at__lt=db_now())
        )

    def claimable(self) -> DeliveryQuerySet:
        """Pending, due, and held by no worker: a worker may lease these."""
        return self.filter(status__in=PENDING_STATUSES).due().unleased()

    def outbox(self) -> DeliveryQuerySet:
        """Rows the relay still has to hand to the broker (enqueued_at NULL), due or not."""
        return self.filter(status__in=OUTBOX_STATUSES, enqueued_at__isnull=True)


class Delivery(models.Model):
    notification = models.ForeignKey(
        Notification, on_delete=models.CASCADE, related_name="deliveries"
    )
    channel = models.CharField(max_length=10, choices=Channel.choices)
    status = models.CharField(max_length=10, choices=DeliveryStatus.choices)
    skip_reason = models.CharField(max_length=20, choices=SkipReason.choices, blank=True)
    # An escalation step: this scheduled delivery goes out at its due time only if no other
    # delivery of the notification is `read` (or `delivered`) by then; blank for the others.
    escalate_unless = models.CharField(
        max_length=10, choices=[("read", "Read"), ("delivered", "Delivered")], blank=True
    )
    # A digest member: scheduled until its window ends, then flushed by the relay together
    # with every other member of the same recipient, template, key and channel.
    digest_key = models.CharField(max_length=255, blank=True)
    # The address snapshot taken at acceptance: an email or phone; push resolves devices
    # when it sends, so a token registered or revoked meanwhile is honoured.
    address = models.CharField(max_length=254, blank=True)
    # Rendered content for this channel, fixed at acceptance.
    content = models.JSONField(default=dict, blank=True)
    provider = models.CharField(max_length=30, blank=True)
    # Several ids joined by commas when one send went to several devices.
    provider_message_id = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    # When the relay last handed the delivery to the broker. NULL is the outbox: the relay
    # publishes such a row once it is due, and the sweeper puts back here a pending delivery
    # whose message has not been taken for too long.
    enqueued_at = models.DateTimeField(null=True, blank=True)
    # A worker's claim: while it holds, no other worker sends this delivery.
    lease_token = models.UUIDField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    read_at = models.DateTimeField(null=True, blank=True)
    # In-app only: the recipient archived this entry of its inbox (it is not a status: an
    # archived notification may still be unread).
    archived_at = models.DateTimeField(null=True, blank=True)
    # In-app only: the recipient's inbox position (InboxCounter), given when first pushed.
    inbox_position = models.BigIntegerField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = DeliveryQuerySet.as_manager()

    class Meta:
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(fields=["notification", "channel"], name="delivery_unique")
        ]
        indexes = [
            models.Index(fields=["status", "next_attempt_at"], name="delivery_status_due"),
            # The queue-lag gauge (notifications.metrics_scrape.queue_oldest_ages): the oldest due
            # queued delivery per channel in two seeks; partial, so it holds only the backlog.
            models.Index(
                fields=["channel", "next_attempt_at", "enqueued_at"],
                condition=models.Q(status="queued"),
                name="delivery_queued_lag",
            ),
            # The outbox: partial, so it holds only rows still to publish, and the relay's
            # claim and its "when is the next one due" read stay small seeks however large
            # the table grows.
            models.Index(
                fields=["next_attempt_at", "id"],
                condition=models.Q(
                    enqueued_at__isnull=True, status__in=["scheduled", "queued", "retrying"]
                ),
                name="delivery_outbox",
            ),
            # A Twilio status callback names the message by its sid only; partial, so email,
            # push and in-app rows (push ids can be long lists) stay out of it.
            models.Index(
                fields=["provider_message_id"],
                condition=models.Q(channel="sms") & ~models.Q(provider_message_id=""),
                name="delivery_sms_message_id",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.channel} #{self.pk} ({self.status})"


class AttemptOutcome(models.TextChoices):
    OK = "ok", "OK"
    TRANSIENT = "transient", "Transient failure"
    PERMANENT = "permanent", "Permanent failure"


class DeliveryAttempt(models.Model):
    """One provider call for one delivery, as the SQL delivery log records it."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="attempt_log")
    number = models.PositiveIntegerField()
    provider = models.CharField(max_length=30)
    outcome = models.CharField(max_length=10, choices=AttemptOutcome.choices)
    status_code = models.IntegerField(null=True, blank=True)
    # Several ids joined by commas when one send went to several devices.
    provider_message_id = models.TextField(blank=True)
    error = models.TextField(blank=True)
    started_at = models.DateTimeField()
    latency_ms = models.FloatField()

    class Meta:
        ordering = ["delivery_id", "number"]
        indexes = [models.Index(fields=["delivery", "number"], name="attempt_delivery_number")]

    def __str__(self) -> str:
        return f"attempt {self.number} of delivery {self.delivery_id}: {self.outcome}"


class DeliveryEvent(models.Model):
    """A delivery entering a status, as the SQL delivery log records it."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="events")
    status = models.CharField(max_length=10, choices=DELIVERY_EVENT_CHOICES)
    detail = models.TextField(blank=True)
    at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["at", "id"]
        indexes = [models.Index(fields=["delivery", "at"], name="event_delivery_at")]

    def __str__(self) -> str:
        return f"delivery {self.delivery_id} → {self.status}"


class IdempotencyRecord(models.Model):
    """The database backstop for Idempotency-Key: unique per owner and key, written in the
    same transaction as the notification, so a lost Redis entry cannot cause a duplicate."""

    owner = models.ForeignKey(Owner, on_delete=models.CASCADE)
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    status_code = models.PositiveSmallIntegerField()
    response = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["owner", "key"], name="idempotency_owner_key")
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.status_code})"


class Topic(models.Model):
    """A list of recipients that one notification reaches all at once."""

    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="topics")
    key = models.SlugField(max_length=100)
    name = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "key"], name="topic_owner_key")]

    def __str__(self) -> str:
        return self.key


class TopicSubscription(models.Model):
    topic = models.ForeignKey(Topic, on_delete=models.CASCADE, related_name="subscriptions")
    recipient = models.ForeignKey(
        Recipient, on_delete=models.CASCADE, related_name="topic_subscriptions"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        # Also the fan-out's index: a topic's subscribers in recipient order.
        constraints = [
            models.UniqueConstraint(fields=["topic", "recipient"], name="topic_subscription_unique")
        ]

    def __str__(self) -> str:
        return f"{self.recipient_id} → {self.topic_id}"


class SuppressionReason(models.TextChoices):
    BOUNCED = "bounced", "Hard bounce"
    COMPLAINED = "complained", "Spam complaint"
    STOPPED = "stopped", "SMS STOP"


class Suppression(models.Model):
    """An address that is not sent to again on a channel, for one owner: it bounced hard,
    its owner reported spam, or it replied STOP. Lifted by an operator or the API."""

    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="suppressions")
    channel = models.CharField(max_length=10, choices=Channel.choices)
    # An email address (lower case) or an E.164 phone number.
    address = models.CharField(max_length=254)
    reason = models.CharField(max_length=12, choices=SuppressionReason.choices)
    # Who said so ("sendgrid", "twilio", "smtp") and in their own words.
    source = models.CharField(max_length=30)
    detail = models.TextField(blank=True)
    # The delivery that brought it, when there was one.
    delivery = models.ForeignKey(
        Delivery, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "channel", "address"], name="suppression_unique"
            )
        ]
        indexes = [models.Index(fields=["owner", "-created_at"], name="suppression_owner_recent")]

    def __str__(self) -> str:
        return f"{self.channel}:{self.address} ({self.reason})"


class WebhookEventType(models.TextChoices):
    DELIVERY_SENT = "delivery.sent", "A delivery was handed to its provider"
    DELIVERY_DELIVERED = "delivery.delivered", "A delivery was confirmed delivered"
    DELIVERY_READ = "delivery.read", "An in-app delivery was read"
    DELIVERY_FAILED = "delivery.failed", "The provider could not deliver"
    DELIVERY_BOUNCED = "delivery.bounced", "The address bounced"
    DELIVERY_DEAD = "delivery.dead", "A delivery failed for good (dead letter)"
    NOTIFICATION_COMPLETED = "notification.completed", "Every delivery of a notification is final"


class Webhook(models.Model):
    """An owner's endpoint for status events, signed the Standard Webhooks way."""

    owner = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField(max_length=2000)
    event_types = models.JSONField(default=list)
    # whsec_<base64 of 32 random bytes>. The previous one keeps signing until it expires, so
    # a receiver can roll its secret over without missing a message.
    secret = models.CharField(max_length=100)
    previous_secret = models.CharField(max_length=100, blank=True)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # The first failure of the current run of failures; cleared by a success.
    failing_since = models.DateTimeField(null=True, blank=True)
    disabled_at = models.DateTimeField(null=True, blank=True)
    disabled_reason = models.CharField(max_length=200, blank=True)

    def __str__(self) -> str:
        return self.url


class WebhookMessageStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"
    DEAD = "dead", "Dead"


class WebhookMessage(models.Model):
    """One event for one endpoint: the outbox row the webhooks worker sends, retries and, when
    it fails for good, keeps as a dead letter to replay."""

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="messages")
    # The `webhook-id` header: the same on every retry, so a receiver can drop repeats.
    msg_id = models.CharField(max_length=40, unique=True)
    event_type = models.CharField(max_length=40, choices=WebhookEventType.choices)
    # What makes the event itself unique for the endpoint (one per delivery status change).
    event_key = models.CharField(max_length=200)
    payload = models.JSONField()
    status = models.CharField(
        max_length=10, choices=WebhookMessageStatus.choices, default=WebhookMessageStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    # Due again then (a retry, a breaker wait); while a worker sends it, its lease's end.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.IntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    # On the database's clock: the sender gives up WEBHOOK_RETRY_FOR_SECONDS after it, judged
    # on that clock (core/db_clock.py).
    created_at = models.DateTimeField(default=db_clock.now, editable=False)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["webhook", "event_key"], name="webhook_message_event")
        ]
        indexes = [
            models.Index(
                fields=["next_attempt_at", "id"],
                condition=models.Q(status="pending"),
                name="webhook_message_pending",
            )
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.msg_id} ({self.status})"


class CompletionCheck(models.Model):
    """A notification that may have just completed: a delivery of it reached a final status
    (or it was accepted with every delivery final), for an owner with an endpoint that wants
    `notification.completed`. Written in the same transaction as that status; the webhooks
    worker decides from the committed deliveries and deletes it (notifications/webhooks.py).
    Plain rows, several per notification at times: the check written by the last of several
    concurrent settling transactions is the one that sees every delivery final."""

    # No foreign key constraint and no index: the row is only ever claimed by its primary key
    # order and deleted, and a constraint would make every insert on the settle path look up
    # (and key-share lock) the notification row.
    notification = models.ForeignKey(
        Notification,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="+",
    )

    def __str__(self) -> str:
        return f"completion check of {self.notification_id}"
