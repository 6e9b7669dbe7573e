"""Celery tasks: thin adapters that take ids and call the delivery services. One delivery
task per channel queue, built by one factory; the sweeper and housekeeping on maintenance."""

from __future__ import annotations

from celery import Task

from notifications.models import CHANNEL_ORDER
from project.celery import app
from workers import services


def _deliver_task(channel: str) -> Task:
    @app.task(name=f"clarion.deliver.{channel}", ignore_result=True)
    def deliver(delivery_id: int) -> str:
        return services.delivery_process(delivery_id=delivery_id).value

    return deliver


DELIVER_TASKS: dict[str, Task] = {channel: _deliver_task(channel) for channel in CHANNEL_ORDER}


@app.task(name="clarion.sweep_deliveries", ignore_result=True)
def sweep_deliveries() -> int:
    return services.deliveries_sweep()


@app.task(name="clarion.purge_idempotency_records", ignore_result=True)
def purge_idempotency_records() -> int:
    from notifications.services import idempotency_records_purge

    return idempotency_records_purge()
