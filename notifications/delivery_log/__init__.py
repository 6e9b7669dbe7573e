"""The delivery log: every provider attempt and every delivery status change is recorded
through this one interface. Backends: `sql` (default) and `cassandra`
(DELIVERY_LOG_BACKEND, CASSANDRA_HOSTS, CASSANDRA_KEYSPACE)."""

from __future__ import annotations

from datetime import date
from functools import cache
from typing import TYPE_CHECKING, Protocol

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from notifications.delivery_log.records import AttemptRecord, StatusEvent

if TYPE_CHECKING:
    from collections.abc import Iterable

    from notifications.models import Delivery


def delivery_status_events(
    deliveries: Iterable[Delivery], status: str, *, detail: str = ""
) -> list[StatusEvent]:
    """Status events, stamped now, for deliveries loaded with notification__recipient."""
    from django.utils import timezone

    now = timezone.now()
    return [
        StatusEvent(
            delivery_id=d.pk,
            notification_id=str(d.notification_id),
            owner_id=d.notification.owner_id,
            recipient_id=d.notification.addressee.external_id,
            channel=d.channel,
            status=status,
            at=now,
            detail=detail,
        )
        for d in deliveries
    ]


class DeliveryLog(Protocol):
    def record_attempt(self, attempt: AttemptRecord) -> None: ...

    def record_attempts(self, attempts: list[AttemptRecord]) -> None:
        """record_attempt() of many, in as few writes as the backend allows."""
        ...

    def record_statuses(self, events: list[StatusEvent]) -> None: ...

    def attempts_for_deliveries(
        self, *, notification_id: str, delivery_ids: list[int]
    ) -> dict[int, list[AttemptRecord]]: ...

    def events_for_notification(self, *, notification_id: str) -> list[StatusEvent]:
        """Every status event of a notification's deliveries, oldest first."""
        ...

    def events_for_recipient_day(
        self, *, owner_id: int, recipient_id: str, day: date
    ) -> list[StatusEvent]:
        """Every status event of one recipient's deliveries on one UTC day, oldest first."""
        ...

    def recipient_anonymise(
        self,
        *,
        owner_id: int,
        recipient_id: str,
        anonymous_id: str,
        deliveries: dict[str, list[int]],
    ) -> None:
        """Erasure: the log of one recipient's deliveries (delivery ids by notification id)
        keeps every attempt and event as a count (channel, status, outcome, provider, times)
        under `anonymous_id`, with the free text that may name the person (errors, details,
        provider message ids) emptied."""
        ...


@cache
def get_delivery_log() -> DeliveryLog:
    backend = settings.DELIVERY_LOG_BACKEND
    if backend == "sql":
        from notifications.delivery_log.sql import SqlDeliveryLog

        return SqlDeliveryLog()
    if backend == "cassandra":
        if not settings.CASSANDRA_HOSTS:
            raise ImproperlyConfigured(
                "CASSANDRA_HOSTS must be set for DELIVERY_LOG_BACKEND=cassandra"
            )
        from notifications.delivery_log.cassandra import CassandraDeliveryLog

        return CassandraDeliveryLog(
            hosts=settings.CASSANDRA_HOSTS,
            keyspace=settings.CASSANDRA_KEYSPACE,
            connect_timeout=settings.CASSANDRA_CONNECT_TIMEOUT_SECONDS,
            request_timeout=settings.CASSANDRA_REQUEST_TIMEOUT_SECONDS,
        )
    raise ImproperlyConfigured(
        f"DELIVERY_LOG_BACKEND={backend!r} is not a backend; use sql or cassandra"
    )
