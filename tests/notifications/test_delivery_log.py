"""One contract for every delivery log backend: the same records in, the same records out, in
the same order (SQL always; Cassandra when CASSANDRA_HOSTS names a server)."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from django.core.management import call_command

from notifications.delivery_log import AttemptRecord, DeliveryLog, StatusEvent
from notifications.delivery_log.cassandra import CassandraDeliveryLog, cluster_connect
from notifications.delivery_log.sql import SqlDeliveryLog
from notifications.models import Delivery, Notification, Recipient
from tests.factories import OwnerFactory, RecipientFactory

NO_CASSANDRA = "CASSANDRA_HOSTS is not set: no Cassandra server to run the contract suite against"
DAY = date(2024, 5, 1)


def at(day: int, hour: int, minute: int, second: int = 0, microsecond: int = 0) -> datetime:
    return datetime(2024, 5, day, hour, minute, second, microsecond, tzinfo=UTC)


def to_ms(record: Any) -> Any:
    """The record with its timestamp cut to milliseconds, the precision Cassandra keeps."""
    field = "started_at" if isinstance(record, AttemptRecord) else "at"
    value: datetime = getattr(record, field)
    return dataclasses.replace(
        record, **{field: value.replace(microsecond=value.microsecond // 1000 * 1000)}
    )


@pytest.fixture(
    params=[
        "sql",
        pytest.param(
            "cassandra",
            marks=pytest.mark.skipif(not os.environ.get("CASSANDRA_HOSTS"), reason=NO_CASSANDRA),
        ),
    ]
)
def delivery_log(request: pytest.FixtureRequest, db: None, settings: Any) -> Iterator[DeliveryLog]:
    if request.param == "sql":
        yield SqlDeliveryLog()
        return
    keyspace = f"clarion_contract_{uuid4().hex[:12]}"
    settings.CASSANDRA_KEYSPACE = keyspace
    call_command("delivery_log_schema", stdout=io.StringIO())
    log = CassandraDeliveryLog(hosts=settings.CASSANDRA_HOSTS, keyspace=keyspace)
    try:
        yield log
    finally:
        log.close()
        cluster, session = cluster_connect(settings.CASSANDRA_HOSTS)
        try:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        finally:
            cluster.shutdown()


def deliveries(owner: Any, external_id: str, *channels: str) -> list[Delivery]:
    recipient = Recipient.objects.filter(
        owner=owner, external_id=external_id
    ).first() or RecipientFactory(owner=owner, external_id=external_id)
    notification = Notification.objects.create(
        owner=owner, recipient=recipient, template_key="order_shipped"
    )
    return [
        Delivery.objects.create(notification=notification, channel=channel, status="queued")
        for channel in channels
    ]


def event(delivery: Delivery, status: str, when: datetime, detail: str = "") -> StatusEvent:
    notification = delivery.notification
    return StatusEvent(
        delivery_id=delivery.pk,
        notification_id=str(notification.pk),
        owner_id=notification.owner_id,
        recipient_id=notification.recipient.external_id,
        channel=delivery.channel,
        status=status,
        at=when,
        detail=detail,
    )


def attempt(
    delivery: Delivery,
    number: int,
    outcome: str,
    status_code: int | None,
    started_at: datetime,
    latency_ms: float,
    *,
    provider_message_id: str = "",
    error: str = "",
) -> AttemptRecord:
    notification = delivery.notification
    return AttemptRecord(
        delivery_id=delivery.pk,
        notification_id=str(notification.pk),
        owner_id=notification.owner_id,
        recipient_id=notification.recipient.external_id,
        channel=delivery.channel,
        number=number,
        provider={"email": "smtp", "sms": "twilio", "push": "fcm"}[delivery.channel],
        outcome=outcome,
        status_code=status_code,
        provider_message_id=provider_message_id,
        error=error,
        started_at=started_at,
        latency_ms=latency_ms,
    )


def test_delivery_log_contract(delivery_log: DeliveryLog) -> None:
    check_delivery_log_contract(delivery_log)


def test_records_come_back_in_utc(delivery_log: DeliveryLog) -> None:
    check_records_come_back_in_utc(delivery_log)


def check_delivery_log_contract(delivery_log: DeliveryLog) -> None:
    """Two deliveries of one notification and one of another for the same recipient, plus
    neighbours that must stay out of that recipient's day."""
    acme = OwnerFactory(name="acme")
    globex = OwnerFactory(name="globex")
    a_email, a_sms = deliveries(acme, "user-1", "email", "sms")
    (b_push,) = deliveries(acme, "user-1", "push")
    # Same external id under another owner, and another recipient of the same owner: neither
    # belongs to acme/user-1's day.
    (c_email,) = deliveries(globex, "user-1", "email")
    (e_email,) = deliveries(acme, "user-2", "email")

    a_attempts = [
        attempt(a_email, 2, "ok", 250, at(1, 9, 15, 30, 1), 80.25, provider_message_id="m-2"),
        attempt(a_email, 1, "transient", 503, at(1, 9, 15, 0, 250750), 120.5, error="503"),
        attempt(a_sms, 1, "transient", None, at(1, 9, 15, 1), 10000.0, error="timeout"),
        attempt(a_sms, 2, "permanent", 400, at(1, 9, 15, 31, 400000), 42.125, error="invalid"),
    ]
    b_attempts = [
        attempt(b_push, 1, "ok", 200, at(1, 9, 15, 30, 999999), 12.0, provider_message_id="p1")
    ]
    for record in a_attempts + b_attempts:
        delivery_log.record_attempt(record)

    midnight = at(1, 0, 0)
    a_queued = [event(a_email, "queued", midnight), event(a_sms, "queued", midnight)]
    a_sent_delivered = [
        event(a_email, "sent", at(1, 9, 15, 30, 123456), "smtp"),
        event(a_email, "delivered", at(1, 9, 15, 30, 123456)),
    ]
    a_failed = [
        event(a_sms, "retrying", at(1, 9, 15, 1, 500000), "timeout"),
        event(a_sms, "dead", at(1, 9, 20), "invalid"),
    ]
    b_day_before = event(b_push, "queued", datetime(2024, 4, 30, 23, 59, 59, 999000, tzinfo=UTC))
    b_sent = event(b_push, "sent", at(1, 9, 15, 31), "fcm")
    b_last_instant = event(b_push, "delivered", at(1, 23, 59, 59, 999999))
    b_day_after = event(b_push, "read", at(2, 0, 0))
    c_queued = event(c_email, "queued", at(1, 12, 0))
    e_queued = event(e_email, "queued", at(1, 12, 0))
    # Recorded out of time order: every read orders by the instant, not by arrival.
    delivery_log.record_statuses(a_failed)
    delivery_log.record_statuses([b_day_after, b_last_instant, c_queued])
    delivery_log.record_statuses(a_sent_delivered)
    delivery_log.record_statuses([e_queued, b_sent])
    delivery_log.record_statuses(a_queued)
    delivery_log.record_statuses([b_day_before])
    delivery_log.record_statuses([])

    def attempts_ms(notification: Delivery, ids: list[int]) -> list[tuple[int, list[Any]]]:
        found = delivery_log.attempts_for_deliveries(
            notification_id=str(notification.notification_id), delivery_ids=ids
        )
        return [(k, [to_ms(a) for a in v]) for k, v in found.items()]

    a_email_attempts = [to_ms(a_attempts[1]), to_ms(a_attempts[0])]
    a_sms_attempts = [to_ms(a_attempts[2]), to_ms(a_attempts[3])]
    assert attempts_ms(a_email, [a_sms.pk, a_email.pk]) == [
        (a_email.pk, a_email_attempts),
        (a_sms.pk, a_sms_attempts),
    ]
    assert attempts_ms(a_email, [a_sms.pk]) == [(a_sms.pk, a_sms_attempts)]
    assert attempts_ms(b_push, [b_push.pk]) == [(b_push.pk, [to_ms(b_attempts[0])])]
    assert attempts_ms(e_email, [e_email.pk]) == []
    assert attempts_ms(a_email, []) == []

    def events_ms(found: list[StatusEvent]) -> list[StatusEvent]:
        return [to_ms(e) for e in found]

    a_events = [*a_queued, a_failed[0], *a_sent_delivered, a_failed[1]]
    assert events_ms(
        delivery_log.events_for_notification(notification_id=str(a_email.notification_id))
    ) == events_ms(a_events)
    assert events_ms(
        delivery_log.events_for_notification(notification_id=str(b_push.notification_id))
    ) == events_ms([b_day_before, b_sent, b_last_instant, b_day_after])
    assert delivery_log.events_for_notification(notification_id=str(uuid4())) == []

    def day_ms(owner: Any, recipient_id: str, day: date) -> list[StatusEvent]:
        return events_ms(
            delivery_log.events_for_recipient_day(
                owner_id=owner.pk, recipient_id=recipient_id, day=day
            )
        )

    assert day_ms(acme, "user-1", DAY) == events_ms(
        [*a_queued, a_failed[0], *a_sent_delivered, b_sent, a_failed[1], b_last_instant]
    )
    assert day_ms(acme, "user-1", date(2024, 4, 30)) == events_ms([b_day_before])
    assert day_ms(acme, "user-1", date(2024, 5, 2)) == events_ms([b_day_after])
    assert day_ms(globex, "user-1", DAY) == events_ms([c_queued])
    assert day_ms(acme, "user-2", DAY) == events_ms([e_queued])
    assert day_ms(acme, "user-3", DAY) == []


def check_records_come_back_in_utc(delivery_log: DeliveryLog) -> None:
    """An instant given in another zone is stored as that instant and read back in UTC."""
    from zoneinfo import ZoneInfo

    (push,) = deliveries(OwnerFactory(name="acme"), "user-1", "push")
    late_evening = datetime(2024, 4, 30, 22, 30, 0, 250000, tzinfo=ZoneInfo("America/New_York"))
    delivery_log.record_statuses([event(push, "queued", late_evening)])
    delivery_log.record_attempt(attempt(push, 1, "ok", 200, late_evening, 5.0))

    utc = datetime(2024, 5, 1, 2, 30, 0, 250000, tzinfo=UTC)
    (found,) = delivery_log.events_for_recipient_day(
        owner_id=push.notification.owner_id, recipient_id="user-1", day=DAY
    )
    assert found == event(push, "queued", utc)
    assert found.at.utcoffset() == timedelta(0)
    attempts = delivery_log.attempts_for_deliveries(
        notification_id=str(push.notification_id), delivery_ids=[push.pk]
    )
    assert attempts == {push.pk: [attempt(push, 1, "ok", 200, utc, 5.0)]}
    assert attempts[push.pk][0].started_at.utcoffset() == timedelta(0)
    assert (
        delivery_log.events_for_recipient_day(
            owner_id=push.notification.owner_id, recipient_id="user-1", day=date(2024, 4, 30)
        )
        == []
    )
