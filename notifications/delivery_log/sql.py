"""Delivery log on the relational database (DeliveryAttempt and DeliveryEvent rows)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

from notifications.delivery_log.records import AttemptRecord, StatusEvent
from notifications.models import DeliveryAttempt, DeliveryEvent


class SqlDeliveryLog:
    def record_attempt(self, attempt: AttemptRecord) -> None:
        DeliveryAttempt.objects.create(
            delivery_id=attempt.delivery_id,
            number=attempt.number,
            provider=attempt.provider,
            outcome=attempt.outcome,
            status_code=attempt.status_code,
            provider_message_id=attempt.provider_message_id,
            error=attempt.error,
            started_at=attempt.started_at,
            latency_ms=attempt.latency_ms,
        )

    def record_attempts(self, attempts: list[AttemptRecord]) -> None:
        DeliveryAttempt.objects.bulk_create(
            [
                DeliveryAttempt(
                    delivery_id=a.delivery_id,
                    number=a.number,
                    provider=a.provider,
                    outcome=a.outcome,
                    status_code=a.status_code,
                    provider_message_id=a.provider_message_id,
                    error=a.error,
                    started_at=a.started_at,
                    latency_ms=a.latency_ms,
                )
                for a in attempts
            ]
        )

    def recipient_anonymise(
        self,
        *,
        owner_id: int,
        recipient_id: str,
        anonymous_id: str,
        deliveries: dict[str, list[int]],
    ) -> None:
        # The recipient's id is not in these rows (it is read through the Recipient, which the
        # caller renames): only the free text goes.
        ids = [pk for pks in deliveries.values() for pk in pks]
        DeliveryAttempt.objects.filter(delivery_id__in=ids).update(error="", provider_message_id="")
        DeliveryEvent.objects.filter(delivery_id__in=ids).update(detail="")

    def record_statuses(self, events: list[StatusEvent]) -> None:
        DeliveryEvent.objects.bulk_create(
            [
                DeliveryEvent(delivery_id=e.delivery_id, status=e.status, detail=e.detail, at=e.at)
                for e in events
            ]
        )

    def attempts_for_deliveries(
        self, *, notification_id: str, delivery_ids: list[int]
    ) -> dict[int, list[AttemptRecord]]:
        out: dict[int, list[AttemptRecord]] = {}
        rows = (
            DeliveryAttempt.objects.filter(delivery_id__in=delivery_ids)
            .select_related("delivery__notification__recipient")
            .order_by("delivery_id", "number", "id")
        )
        for row in rows:
            notification = row.delivery.notification
            out.setdefault(row.delivery_id, []).append(
                AttemptRecord(
                    delivery_id=row.delivery_id,
                    notification_id=str(notification.pk),
                    owner_id=notification.owner_id,
                    recipient_id=notification.addressee.external_id,
                    channel=row.delivery.channel,
                    number=row.number,
                    provider=row.provider,
                    outcome=row.outcome,
                    status_code=row.status_code,
                    provider_message_id=row.provider_message_id,
                    error=row.error,
                    started_at=row.started_at,
                    latency_ms=row.latency_ms,
                )
            )
        return out

    def _events(self, rows: object) -> list[StatusEvent]:
        return [
            StatusEvent(
                delivery_id=row.delivery_id,
                notification_id=str(row.delivery.notification_id),
                owner_id=row.delivery.notification.owner_id,
                recipient_id=row.delivery.notification.recipient.external_id,
                channel=row.delivery.channel,
                status=row.status,
                at=row.at,
                detail=row.detail,
            )
            for row in rows  # type: ignore[attr-defined]
        ]

    def events_for_notification(self, *, notification_id: str) -> list[StatusEvent]:
        rows = (
            DeliveryEvent.objects.filter(delivery__notification_id=notification_id)
            .select_related("delivery__notification__recipient")
            .order_by("at", "id")
        )
        return self._events(rows)

    def events_for_recipient_day(
        self, *, owner_id: int, recipient_id: str, day: date
    ) -> list[StatusEvent]:
        start = datetime.combine(day, time.min, tzinfo=UTC)
        rows = (
            DeliveryEvent.objects.filter(
                delivery__notification__owner_id=owner_id,
                delivery__notification__recipient__external_id=recipient_id,
                at__gte=start,
                at__lt=start + timedelta(days=1),
            )
            .select_related("delivery__notification__recipient")
            .order_by("at", "id")
        )
        return self._events(rows)
