"""B_celery's application: a no-op task with Clarion's transport settings (acks_late,
reject_on_worker_lost, prefetch 1, JSON, no results, worker events on, no task-sent events)
on the same broker URL, pool and concurrency as the channel workers.

With BENCH_NOOP_STOCK=1 (in the workers' environment) the workers run Celery's stock
settings instead: early ack, prefetch multiplier 4, no events; a reference for what those
choices cost, not a target. The publishing side is the same either way (B_publish)."""

from __future__ import annotations

import os

from celery import Celery
from kombu import Queue

QUEUES = ("bench_noop_a", "bench_noop_b")
# Workers start on this empty queue and are switched to QUEUES once every task is published,
# so the clock measures consumption, not the publisher.
IDLE_QUEUE = "bench_noop_idle"
STOCK = os.environ.get("BENCH_NOOP_STOCK", "") not in ("", "0", "false")

app = Celery("clarion_bench_noop")
app.conf.update(
    broker_url=os.environ["BENCH_BROKER_URL"],
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": int(os.environ.get("BROKER_VISIBILITY_TIMEOUT", "3600"))
    },
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    result_backend=None,
    task_queues=[Queue(name) for name in (*QUEUES, IDLE_QUEUE)],
    task_create_missing_queues=False,
    worker_hijack_root_logger=False,
    # As project/celery.py: no task-sent events (the relay publishes none either).
    task_send_sent_event=False,
)
if STOCK:
    # Celery's defaults: acknowledged when received, 4 messages prefetched per process, no
    # task events.
    app.conf.update(
        task_acks_late=False,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=4,
        worker_send_task_events=False,
    )
else:
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Clarion's workers send task events (Flower); the baseline pays the same.
        worker_send_task_events=True,
    )


@app.task(name="bench.noop", ignore_result=True)
def noop(n: int) -> None:
    return None
