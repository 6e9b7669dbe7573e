"""Celery tasks: thin adapters that take ids and call the delivery services. One delivery
task per channel queue, built by one factory, each taking a batch of delivery ids; the
sweeper and housekeeping on maintenance."""

from __future__ import annotations

from celery import Task

from notifications.idempotency import records_purge
from notifications.models import CHANNEL_ORDER
from project.celery import app
from workers import services
from workers.dispatch import deliver_task_name


def _deliver_task(channel: str) -> Task:
    @app.task(name=deliver_task_name(channel), ignore_result=True)
    def deliver(delivery_ids: list[int] | int) -> dict[str, int]:
        # A single id is what messages published before batching carried.
        ids = [delivery_ids] if isinstance(delivery_ids, int) else list(delivery_ids)
        outcomes = services.deliveries_process(delivery_ids=ids)
        counts: dict[str, int] = {}
        for outcome in outcomes.values():
            counts[outcome.value] = counts.get(outcome.value, 0) + 1
        return counts

    return deliver


DELIVER_TASKS: dict[str, Task] = {channel: _deliver_task(channel) for channel in CHANNEL_ORDER}


@app.task(name="clarion.sweep_deliveries", ignore_result=True)
def sweep_deliveries() -> int:
    return services.deliveries_sweep()


@app.task(name="clarion.purge_idempotency_records", ignore_result=True)
def purge_idempotency_records() -> int:
    return records_purge()


@app.task(name="clarion.provider_events_apply", ignore_result=True)
def provider_events_apply() -> int:
    from workers.provider_events import provider_events_apply as apply

    return apply()


@app.task(name="clarion.webhooks.send_due", ignore_result=True)
def webhooks_send_due() -> int:
    from workers.webhook_sender import webhooks_send_due as send_due

    return send_due()
