"""The delivery log: every provider attempt and every delivery status change is recorded
through this one interface. Backends: `sql` (default) and `cassandra`
(DELIVERY_LOG_BACKEND, CASSANDRA_HOSTS, CASSANDRA_KEYSPACE)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from collections.abc import Iterable

    from notifications.models import Delivery


@dataclass(frozen=True)
class AttemptRecord:
    """One provider call for one delivery."""

    delivery_id: int
    notification_id: str
    owner_id: int
    recipient_id: str
    channel: str
    number: int
    provider: str
    outcome: str
    status_code: int | None
    provider_message_id: str
    error: str
    started_at: datetime
    latency_ms: float

    def as_api(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "provider": self.provider,
            "outcome": self.outcome,
            "status_code": self.status_code,
            "provider_message_id": self.provider_message_id or None,
            "error": self.error or None,
            "started_at": self.started_at,
            "latency_ms": round(self.latency_ms, 3),
        }


@dataclass(frozen=True)
class StatusEvent:
    """A delivery entering a status (queued, sent, retrying, dead, delivered, read, …)."""

    delivery_id: int
    notification_id: str
    owner_id: int
    recipient_id: str
    channel: str
    status: str
    at: datetime
    detail: str = ""


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
        from workers.delivery_log.sql import SqlDeliveryLog

        return SqlDeliveryLog()
    if backend == "cassandra":
        if not settings.CASSANDRA_HOSTS:
            raise ImproperlyConfigured(
                "CASSANDRA_HOSTS must be set for DELIVERY_LOG_BACKEND=cassandra"
            )
        from workers.delivery_log.cassandra import CassandraDeliveryLog

        return CassandraDeliveryLog(
            hosts=settings.CASSANDRA_HOSTS,
            keyspace=settings.CASSANDRA_KEYSPACE,
            connect_timeout=settings.CASSANDRA_CONNECT_TIMEOUT_SECONDS,
            request_timeout=settings.CASSANDRA_REQUEST_TIMEOUT_SECONDS,
        )
    raise ImproperlyConfigured(
        f"DELIVERY_LOG_BACKEND={backend!r} is not a backend; use sql or cassandra"
    )
