"""Accepting notifications, single and bulk: render, route, write the notification with its
deliveries (the outbox), their first events and the idempotency record in one transaction,
and the Idempotency-Key around it (notifications.idempotency's protocol, with the record
written in the notification's own statement). The API views, the admin and the management
commands call these; the views only adapt HTTP."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from django.conf import settings
from django.db import IntegrityError, connection, connections, models, transaction

from core import db_clock, metrics, outbox
from core.logs import scoped_log_context
from notifications import idempotency, routing, templating, unsubscribe
from notifications.frequency_caps import CapCheck, caps_give_back, caps_take
from notifications.models import (
    CHANNEL_ORDER,
    FINAL_STATUSES,
    Channel,
    Delivery,
    DeliveryStatus,
    IdempotencyRecord,
    Notification,
    Owner,
    Priority,
    SkipReason,
)
from notifications.schedules import EscalationStep
from notifications.selectors import (
    RecipientContext,
    TemplateSnapshot,
    recipient_context_get,
    recipient_contexts_get_many,
    template_snapshot_get,
)
from notifications.services import ValidationFailed, recipient_upsert
from notifications.webhooks import completion_checks_add

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IdempotencyClaim:
    """The key a creation writes its backstop record under, in its own transaction."""

    key: str
    fingerprint: str


@dataclass
class PreparedNotification:
    """A notification rendered and routed, not yet written."""

    notification: Notification
    deliveries: list[Delivery]
    routes: list[routing.Route]
    recipient_external_id: str
    idempotency: IdempotencyClaim | None
    # Frequency-cap places this notification's deliveries take (or took).
    caps: list[CapCheck] = field(default_factory=list)

    @property
    def body(self) -> dict[str, Any]:
        """The 202 body: each delivery's status, why it was skipped or held, and when a
        scheduled one falls due."""
        return {
            "id": str(self.notification.pk),
            "status": "accepted",
            "deliveries": [routing.route_answer(route) for route in self.routes],
        }


@dataclass(frozen=True)
class NotificationRequest:
    """One notification as the API asks for it."""

    recipient: str | dict[str, Any]
    template_key: str
    data: dict[str, Any]
    channels: list[str] | None = None
    priority: str = Priority.NORMAL
    send_at: datetime | None = None
    idempotency: IdempotencyClaim | None = None
    cancel_key: str = ""
    # A topic's key instead of a recipient: the notification fans out (notifications/fanout.py).
    topic: str = ""
    # Per-request overrides of the template's rules: False sends at once rather than into the
    # template's digest; steps (or none) instead of the template's escalation.
    digest: bool = True
    escalation: list[EscalationStep] | None = None


def notification_prepare(
    *,
    owner: Owner,
    request: NotificationRequest,
    now: datetime,
    templates: dict[str, TemplateSnapshot | None],
    contexts: dict[str, RecipientContext] | None = None,
    renders: dict[tuple[str, str], Any] | None = None,
) -> PreparedNotification:
    """Render and route one notification (ValidationFailed for bad input). `templates` memoises
    snapshots across the items of one bulk request; `contexts` holds the recipients (by id)
    it read at once; `renders`, given only by callers whose every request carries the same
    template and data (a topic's fan-out), memoises each locale's rendered channels."""
    template_key = request.template_key
    if template_key not in templates:
        templates[template_key] = template_snapshot_get(owner_id=owner.pk, key=template_key)
    template = templates[template_key]
    if template is None:
        raise ValidationFailed({"template": [f"Unknown template '{template_key}'."]})

    if isinstance(request.recipient, dict):
        external_id = request.recipient["id"]
        contact = {k: v for k, v in request.recipient.items() if k != "id"}
        recipient_upsert(owner=owner, external_id=external_id, **contact)
        if contexts is not None:
            contexts.pop(external_id, None)  # read before this change
        context = recipient_context_get(owner_id=owner.pk, external_id=external_id)
    else:
        external_id = request.recipient
        context = (contexts or {}).get(external_id) or recipient_context_get(
            owner_id=owner.pk, external_id=external_id
        )
    if context is None:
        raise ValidationFailed(
            {"recipient": [f"Unknown recipient '{external_id}'; send its contact data."]}
        )

    send_at = request.send_at
    if request.escalation is not None:
        routing.escalation_check(template, request.escalation)
    routes = routing.channels_route(
        requested=request.channels,
        template=template,
        recipient=context,
        priority=request.priority,
        now=now,
        send_at=send_at,
        digest_wanted=request.digest,
        escalation=request.escalation,
    )
    locale, content = templating.pick_locale_content(
        default_locale=template.locale,
        content=template.content,
        translations=template.translations,
        wanted=context.locale,
    )
    rendered: dict[str, dict[str, str]] = {}
    errors: dict[str, list[str]] = {}
    # A digest template is written for a list of events: one notification is a digest of one.
    data = templating.digest_data([request.data]) if template.digest else request.data
    # Every channel of the template is rendered, even the ones this recipient skips, so a
    # missing variable fails the request the same way whoever the recipient is.
    for channel in CHANNEL_ORDER:
        if channel in content:
            # An email that places the recipient's unsubscribe link is rendered for each.
            shared = renders is not None and not unsubscribe.personal(
                channel=channel, fields=content[channel]
            )
            memo = renders.get((locale, channel)) if renders is not None and shared else None
            try:
                if isinstance(memo, templating.TemplateError):
                    raise memo
                if memo is None:
                    channel_data = unsubscribe.render_data(
                        channel=channel,
                        fields=content[channel],
                        data=data,
                        owner_id=owner.pk,
                        recipient_id=context.id,
                        category=template.category,
                    )
                    memo = templating.render_channel(channel, content[channel], channel_data)
                rendered[channel] = memo
            except templating.TemplateError as exc:
                memo = exc
                errors.update(exc.fields)
            if renders is not None and shared:
                renders[(locale, channel)] = memo
    digest_key = ""
    if template.digest is not None:
        try:
            # Every member of a group shares this: the template and the rendered key.
            key = templating.render_key(template.digest.key, request.data, where="digest.key")
            digest_key = f"{template.key}:{key}"[:255]
        except templating.TemplateError as exc:
            errors.update(exc.fields)
    if errors:
        raise ValidationFailed(errors)

    notification = Notification(
        owner=owner,
        recipient_id=context.id,
        template_id=template.id,
        template_key=template.key,
        category=template.category,
        priority=request.priority,
        locale=locale,
        data=request.data,
        send_at=send_at,
        idempotency_key=request.idempotency.key if request.idempotency else "",
        cancel_key=request.cancel_key,
    )
    deliveries = [
        Delivery(
            notification=notification,
            channel=route.channel,
            status=route.status,
            skip_reason=route.reason,
            address=route.address,
            content=rendered.get(route.channel, {}),
            next_attempt_at=route.due_at if route.status == DeliveryStatus.SCHEDULED else None,
            escalate_unless=route.escalate_unless,
            digest_key=digest_key if route.digest else "",
        )
        for route in routes
    ]
    return PreparedNotification(
        notification=notification,
        deliveries=deliveries,
        routes=routes,
        recipient_external_id=context.external_id,
        idempotency=request.idempotency,
        caps=routing.cap_checks(
            owner_id=owner.pk,
            template=template,
            recipient_id=context.id,
            priority=request.priority,
            member=str(notification.pk),
            routes=routes,
        ),
    )


def caps_apply(prepared: list[PreparedNotification]) -> None:
    """Take each routed delivery's place under its cap (one Redis round trip for all); a
    delivery over its cap is skipped with reason `frequency_capped`. What is taken is kept
    on the prepared notification, to be given back should the write fail."""
    checks = [check for p in prepared for check in p.caps]
    if not checks:
        return
    allowed = iter(caps_take(checks))
    for p in prepared:
        capped = set()
        taken = []
        for check in p.caps:
            if next(allowed):
                taken.append(check)
            else:
                capped.add(check.channel)
        p.caps = taken
        if not capped:
            continue
        p.routes = routing.routes_capped(p.routes, capped)
        for delivery in p.deliveries:
            if delivery.channel in capped:
                delivery.status = DeliveryStatus.SKIPPED
                delivery.skip_reason = SkipReason.FREQUENCY_CAPPED
                delivery.next_attempt_at = None
                delivery.escalate_unless = ""


# A single accept (and a small bulk) on PostgreSQL writes all its rows in one statement; a
# bulk request of many items stays on bulk_create, one INSERT per table, well inside
# PostgreSQL's limit of 65,535 parameters a statement.
ONE_STATEMENT_MAX_NOTIFICATIONS = 20


def _one_statement_fits(prepared: list[PreparedNotification]) -> bool:
    return (
        connection.vendor == "postgresql"
        and settings.DELIVERY_LOG_BACKEND == "sql"
        and len(prepared) <= ONE_STATEMENT_MAX_NOTIFICATIONS
    )


def _insert_rows(model: type[models.Model], objects: list[Any]) -> tuple[str, list[Any]]:
    """`INSERT INTO table (columns) VALUES (…), (…)` of every concrete field but an automatic
    primary key, with its parameters, as the ORM would prepare them (auto_now_add, JSON)."""
    fields = [f for f in model._meta.concrete_fields if not f.auto_created]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.get_attname_column()[1] or f.attname) for f in fields)
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    params = [
        f.get_db_prep_save(f.pre_save(obj, True), connection) for obj in objects for f in fields
    ]
    rows = ", ".join([row] * len(objects))
    # Names from the models' metadata and placeholders only: no value is in the text.
    sql = f"INSERT INTO {quote(model._meta.db_table)} ({columns}) VALUES {rows}"  # noqa: S608
    return sql, params


def _idempotency_records(
    owner: Owner, prepared: list[PreparedNotification]
) -> list[IdempotencyRecord]:
    """The database backstop of each keyed notification: its key and its 202 answer."""
    return [
        idempotency.accepted_record(
            owner_id=owner.pk,
            key=p.idempotency.key,
            fingerprint=p.idempotency.fingerprint,
            body=p.body,
        )
        for p in prepared
        if p.idempotency is not None
    ]


def _write_in_one_statement(
    *, owner: Owner, prepared: list[PreparedNotification], now: datetime
) -> list[Delivery]:
    """PostgreSQL: the notifications, their deliveries, the deliveries' first status events
    and the idempotency records in one INSERT with writable CTEs, one round trip where the
    ORM makes four. The foreign keys are checked when the statement ends, with every row in."""
    from notifications.models import DeliveryEvent

    quote = connection.ops.quote_name
    deliveries = [d for p in prepared for d in p.deliveries]
    records = _idempotency_records(owner, prepared)
    notification_sql, notification_params = _insert_rows(
        Notification, [p.notification for p in prepared]
    )
    delivery_sql, delivery_params = _insert_rows(Delivery, deliveries)
    event = DeliveryEvent._meta
    parts = [
        f"n AS ({notification_sql})",
        f"d AS ({delivery_sql} RETURNING id, notification_id, channel, status, skip_reason)",
        f"e AS (INSERT INTO {quote(event.db_table)} "  # noqa: S608 - names, not values
        f"({quote(event.get_field('delivery').column)}, status, detail, {quote('at')}) "
        "SELECT id, status, skip_reason, %s FROM d)",
    ]
    params: list[Any] = [*notification_params, *delivery_params, now]
    if records:
        record_sql, record_params = _insert_rows(IdempotencyRecord, records)
        parts.append(f"i AS ({record_sql})")
        params += record_params
    sql = "WITH " + ", ".join(parts) + " SELECT id, notification_id, channel FROM d"  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        numbered = {(str(nid), channel): pk for pk, nid, channel in cursor.fetchall()}
    for delivery in deliveries:
        delivery.pk = numbered[(str(delivery.notification_id), delivery.channel)]
        delivery._state.adding = False
        delivery._state.db = connection.alias
    return deliveries


def _copy_fits() -> bool:
    return connection.vendor == "postgresql" and settings.DELIVERY_LOG_BACKEND == "sql"


def _copy_value(field: Any) -> Any:
    """How COPY gets a field's value from an object, for the objects of one COPY: psycopg
    adapts strings, numbers, UUIDs and aware datetimes itself, so only JSON (encoded) and the
    auto_now dates (stamped) need the field; anything else goes through the ORM's own
    preparation."""
    if isinstance(field, models.JSONField):
        # COPY's text format takes JSON as text. Rows of one batch often share one document
        # (a fan-out's data, a locale's rendered content): each is encoded once.
        encoded: dict[int, str] = {}

        def json_text(obj: Any) -> str | None:
            value = getattr(obj, field.attname)
            if value is None:
                return None
            text = encoded.get(id(value))
            if text is None:
                text = encoded[id(value)] = json.dumps(value, cls=field.encoder)
            return text

        return json_text
    if getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
        return lambda obj: field.pre_save(obj, True)
    if isinstance(
        field,
        (
            models.CharField,
            models.TextField,
            models.IntegerField,
            models.BooleanField,
            models.UUIDField,
            models.DateTimeField,
            models.ForeignKey,
        ),
    ):
        return lambda obj: getattr(obj, field.attname)
    db = connections[connection.alias]
    return lambda obj: field.get_db_prep_save(field.pre_save(obj, True), db)


def _copy_rows(
    cursor: Any, model: type[models.Model], objects: list[Any], *, with_pk: bool = False
) -> None:
    """COPY every concrete field of `objects` (the primary key too when `with_pk`) into the
    model's table."""
    fields = [f for f in model._meta.concrete_fields if with_pk or not f.auto_created]
    values = [_copy_value(f) for f in fields]
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column or f.attname) for f in fields)
    # Names from the models' metadata only: no value is in the text.
    with cursor.copy(f"COPY {quote(model._meta.db_table)} ({columns}) FROM STDIN") as copy:
        for obj in objects:
            copy.write_row([value(obj) for value in values])


def _write_with_copy(
    *, owner: Owner, prepared: list[PreparedNotification], now: datetime
) -> list[Delivery]:
    """PostgreSQL, a large batch (a bulk request, a fan-out chunk): the deliveries' ids taken
    from their sequence in one query, then each table written with COPY, which costs a
    fraction of a multi-row INSERT's parameter handling. Same rows, same transaction."""
    from notifications.models import DeliveryEvent

    deliveries = [d for p in prepared for d in p.deliveries]
    # COPY runs on the driver's cursor: its errors are turned into Django's (IntegrityError
    # for a duplicate idempotency key) as the ORM's own statements' are.
    with connection.wrap_database_errors, connection.cursor() as cursor:
        cursor.execute(
            "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
            [Delivery._meta.db_table, len(deliveries)],
        )
        for delivery, (pk,) in zip(deliveries, cursor.fetchall(), strict=True):
            delivery.pk = pk
        raw = cursor.cursor  # psycopg's own cursor, for COPY
        _copy_rows(raw, Notification, [p.notification for p in prepared])
        _copy_rows(raw, Delivery, deliveries, with_pk=True)
        event = DeliveryEvent._meta
        quote = connection.ops.quote_name
        with raw.copy(
            f"COPY {quote(event.db_table)} "  # names from the metadata, no values
            f"({quote(event.get_field('delivery').column)}, status, detail, {quote('at')}) "
            "FROM STDIN"
        ) as copy:
            for d in deliveries:
                copy.write_row((d.pk, d.status, d.skip_reason, now))
        _copy_rows(raw, IdempotencyRecord, _idempotency_records(owner, prepared))
    for delivery in deliveries:
        delivery._state.adding = False
        delivery._state.db = connection.alias
    return deliveries


def _write_with_the_orm(
    *, owner: Owner, prepared: list[PreparedNotification], now: datetime
) -> list[Delivery]:
    """Any database, any delivery-log backend: one INSERT per table."""
    from notifications.delivery_log import StatusEvent, get_delivery_log

    Notification.objects.bulk_create([p.notification for p in prepared])
    deliveries = Delivery.objects.bulk_create([d for p in prepared for d in p.deliveries])
    external_ids = {p.notification.pk: p.recipient_external_id for p in prepared}
    get_delivery_log().record_statuses(
        [
            StatusEvent(
                delivery_id=d.pk,
                notification_id=str(d.notification_id),
                owner_id=owner.pk,
                recipient_id=external_ids[d.notification_id],
                channel=d.channel,
                status=d.status,
                at=now,
                detail=d.skip_reason,
            )
            for d in deliveries
        ]
    )
    IdempotencyRecord.objects.bulk_create(_idempotency_records(owner, prepared))
    return deliveries


def notifications_write(
    *,
    owner: Owner,
    prepared: list[PreparedNotification],
    now: datetime,
    push_web: bool = True,
) -> None:
    """Write notifications with their deliveries, first status events and idempotency records
    in one transaction; publish the queued deliveries once it commits: the in-app ones from
    this process (workers/web_push.py) when `push_web` and WEB_PUSH_AT_ACCEPT, the others
    through the relay."""
    pushed: list[Delivery] = []
    if push_web and settings.WEB_PUSH_AT_ACCEPT and outbox.web_pusher_registered():
        pushed = [
            d
            for p in prepared
            for d in p.deliveries
            if d.channel == Channel.WEB and d.status == DeliveryStatus.QUEUED
        ]
        for delivery in pushed:
            # Published already, as far as the relay is concerned (`now` is the database's
            # clock, which the sweeper compares this mark with).
            delivery.enqueued_at = now
    with transaction.atomic():
        if _one_statement_fits(prepared):
            deliveries = _write_in_one_statement(owner=owner, prepared=prepared, now=now)
        elif _copy_fits():
            deliveries = _write_with_copy(owner=owner, prepared=prepared, now=now)
        else:
            deliveries = _write_with_the_orm(owner=owner, prepared=prepared, now=now)
        # Nothing is published here: the queued rows are the outbox, and the relay publishes
        # them once woken after commit.
        if any(d.status == DeliveryStatus.QUEUED and d.enqueued_at is None for d in deliveries):
            outbox.outbox_wake_on_commit()
        outbox.web_push_on_commit([d.pk for d in pushed])
        # A notification accepted with every delivery skipped is complete already: no
        # worker will ever touch it, so its completion is checked from here.
        finished = [
            p.notification.pk
            for p in prepared
            if p.deliveries and all(d.status in FINAL_STATUSES for d in p.deliveries)
        ]
        if finished:
            completion_checks_add(owner_id=owner.pk, notification_ids=finished)
        metrics.notifications_accepted_on_commit(
            d.channel
            for d in deliveries
            if d.status in (DeliveryStatus.QUEUED, DeliveryStatus.SCHEDULED)
        )


def _log_accepted(prepared: PreparedNotification) -> None:
    log.info(
        "notification %s accepted: %s",
        prepared.notification.pk,
        ", ".join(f"{route.channel} {route.status}" for route in prepared.routes),
    )


@scoped_log_context
def notification_accept(*, owner: Owner, request: NotificationRequest) -> dict[str, Any]:
    """Accept one notification to one recipient: render it, route it, write it with its
    deliveries in one transaction, and enqueue the deliveries after commit. Returns the 202
    body. (A topic's is notifications.fanout's; notifications.sending picks.)"""
    # Routing sets due times (send_at, escalation, digest, quiet hours) that the relay will
    # judge on the database's clock: they are computed on it (core/db_clock.py).
    now = db_clock.now()
    prepared = notification_prepare(owner=owner, request=request, now=now, templates={})
    structlog.contextvars.bind_contextvars(notification_id=str(prepared.notification.pk))
    caps_apply([prepared])
    try:
        notifications_write(owner=owner, prepared=[prepared], now=now)
    except IntegrityError as exc:
        caps_give_back(prepared.caps)
        claim = request.idempotency
        if claim is not None and idempotency.records_exist(owner_id=owner.pk, keys=[claim.key]):
            raise idempotency.RecordExists from exc
        raise
    except BaseException:
        caps_give_back(prepared.caps)
        raise
    _log_accepted(prepared)
    return prepared.body


@dataclass(frozen=True)
class BulkOutcome:
    """One item of a bulk request: its 202 body, why it was refused, or that its idempotency
    record was already in the database (the caller answers with what that record holds)."""

    body: dict[str, Any] | None = None
    error: ValidationFailed | None = None
    idempotency_record_exists: bool = False


def notifications_create_bulk(
    *, owner: Owner, requests: list[NotificationRequest]
) -> list[BulkOutcome]:
    """Accept many notifications at once: each is rendered and routed on its own (a bad one is
    refused alone), and all the good ones are written in one transaction and published on
    one broker connection after it commits. An item whose idempotency record is already in the
    database (Redis lost its key) makes the whole write fall back to one transaction per item;
    that item's outcome then says its record exists, for the caller to answer from it."""
    now = db_clock.now()  # as notification_accept() routes
    templates: dict[str, TemplateSnapshot | None] = {}
    contexts = recipient_contexts_get_many(
        owner_id=owner.pk,
        external_ids=list({r.recipient for r in requests if isinstance(r.recipient, str)}),
    )
    outcomes: list[BulkOutcome | None] = []
    prepared: list[tuple[int, PreparedNotification]] = []
    for index, request in enumerate(requests):
        try:
            prepared.append(
                (
                    index,
                    notification_prepare(
                        owner=owner,
                        request=request,
                        now=now,
                        templates=templates,
                        contexts=contexts,
                    ),
                )
            )
            outcomes.append(None)
        except ValidationFailed as exc:
            outcomes.append(BulkOutcome(error=exc))
    if prepared:
        caps_apply([p for _, p in prepared])
        try:
            notifications_write(owner=owner, prepared=[p for _, p in prepared], now=now)
        except IntegrityError:
            claimed = [p.idempotency.key for _, p in prepared if p.idempotency is not None]
            if not claimed or not idempotency.records_exist(owner_id=owner.pk, keys=claimed):
                caps_give_back([c for _, p in prepared for c in p.caps])
                raise
            log.info("an idempotency record already exists; writing the bulk one by one")
            for index, item in prepared:
                outcomes[index] = _bulk_write_one(owner, item, now)
        except BaseException:
            caps_give_back([c for _, p in prepared for c in p.caps])
            raise
        else:
            for index, item in prepared:
                outcomes[index] = BulkOutcome(body=item.body)
                _log_accepted(item)
    return [outcome or BulkOutcome() for outcome in outcomes]


def _bulk_write_one(owner: Owner, item: PreparedNotification, now: datetime) -> BulkOutcome:
    for delivery in item.deliveries:  # the rolled-back bulk insert numbered them
        delivery.pk = None
        delivery._state.adding = True
    try:
        notifications_write(owner=owner, prepared=[item], now=now)
    except IntegrityError:
        caps_give_back(item.caps)
        claim = item.idempotency
        if claim is not None and idempotency.records_exist(owner_id=owner.pk, keys=[claim.key]):
            return BulkOutcome(idempotency_record_exists=True)
        raise
    _log_accepted(item)
    return BulkOutcome(body=item.body)
