"""The Celery application: at-least-once transport settings and the per-channel queues."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery
from celery.signals import (
    setup_logging,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_shutdown,
    worker_ready,
)
from kombu import Connection, Exchange, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from django.conf import settings

# Every queue has a direct exchange of its own, of the same name, bound by its own name as
# routing key: whatever publishes by exchange and key (a custom route, another client, a
# RabbitMQ shovel) reaches one queue. Celery itself publishes to a queue's name through the
# default exchange, which reaches that queue only as well.
DEFAULT_QUEUE = "maintenance"
QUEUES = tuple(
    Queue(name, Exchange(name, type="direct"), routing_key=name) for name in settings.CELERY_QUEUES
)


def broker_transport_options(url: str, *, consumer: bool = False) -> dict[str, Any]:
    """kombu's options for the broker at `url`. On Redis, every connection (the consumer's
    BRPOP, publishes, acks, the event dispatcher, remote control) gets a deadline, TCP
    keepalive and a health check, as kombu's Redis transport documentation advises for a
    broker that can disappear without closing the connection: without a socket timeout a
    publish on a half-open connection waits forever, and kombu's own checks of the consumer's
    connections never run (kombu/transport/redis.py, "socket_timeout" and
    "health_check_interval"). RabbitMQ finds dead connections by heartbeats instead
    (broker_heartbeat).

    A `consumer` (a worker process) also has its idle BRPOP wait BROKER_POLL_SECONDS on the
    server instead of kombu's 1 s. Only workers: kombu's synchronous drain_events (Flower's
    event capture) sleeps that long after an empty read."""
    options: dict[str, Any] = {"visibility_timeout": settings.BROKER_VISIBILITY_TIMEOUT}
    if url.startswith(("redis", "rediss", "sentinel")):
        options.update(
            socket_timeout=settings.REDIS_SOCKET_TIMEOUT_SECONDS,
            socket_connect_timeout=settings.REDIS_CONNECT_TIMEOUT_SECONDS,
            # TCP keepalive finds a peer that vanished (host down, cable cut) while the
            # connection is idle; it cannot see a middlebox that still acknowledges, which is
            # what the timeout and the health check are for. kombu drops it on Unix sockets.
            socket_keepalive=True,
            health_check_interval=settings.REDIS_HEALTH_CHECK_SECONDS,
        )
        if consumer:
            # kombu 5.6+: the BRPOP's server-side timeout (how often an idle consumer asks).
            options["polling_interval"] = settings.BROKER_POLL_SECONDS
    return options


app = Celery("clarion")
app.conf.update(
    broker_url=settings.CELERY_BROKER_URL,
    broker_connection_retry_on_startup=True,
    broker_transport_options=broker_transport_options(settings.CELERY_BROKER_URL),
    # RabbitMQ only (Redis has no heartbeats; its deadlines are in the transport options).
    broker_heartbeat=settings.BROKER_HEARTBEAT_SECONDS,
    # At-least-once: a message is acknowledged only after its task finished, and comes back
    # if the worker process dies; tasks are idempotent so redelivery is harmless.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_ignore_result=True,
    result_backend=None,
    task_queues=QUEUES,
    task_default_queue=DEFAULT_QUEUE,
    task_default_exchange=DEFAULT_QUEUE,
    task_default_exchange_type="direct",
    task_default_routing_key=DEFAULT_QUEUE,
    # One delivery task per channel, each on its channel's queue; housekeeping on maintenance.
    task_routes={
        **{f"clarion.deliver.{name}": {"queue": name} for name in settings.CHANNEL_QUEUES},
        "clarion.webhooks.*": {"queue": "webhooks"},
        "clarion.*": {"queue": DEFAULT_QUEUE},
    },
    task_create_missing_queues=False,
    # Celery's Django fixup closes every database connection before and after each task, and
    # in a prefork child with a connection pool it closes the whole pool: two new PostgreSQL
    # connections per task. Reuse them instead (they are closed after this many tasks x 2);
    # a connection broken by an error is dropped before the next task (_database_checked).
    CELERY_DB_REUSE_MAX=1_000_000,
    worker_hijack_root_logger=False,
    worker_send_task_events=True,
    # No task-sent events: each would be one more broker publish on the API's hot path;
    # Flower still sees every task from the workers' received/started/succeeded events.
    task_send_sent_event=False,
    beat_schedule={
        "sweep-deliveries": {
            "task": "clarion.sweep_deliveries",
            "schedule": settings.SWEEPER_INTERVAL_SECONDS,
            "options": {"queue": "maintenance", "expires": settings.SWEEPER_INTERVAL_SECONDS},
        },
        "apply-provider-events": {
            "task": "clarion.provider_events_apply",
            "schedule": settings.PROVIDER_EVENTS_INTERVAL_SECONDS,
            "options": {
                "queue": "maintenance",
                "expires": settings.PROVIDER_EVENTS_INTERVAL_SECONDS,
            },
        },
        "send-webhooks": {
            "task": "clarion.webhooks.send_due",
            "schedule": settings.WEBHOOK_SWEEP_SECONDS,
            "options": {"queue": "webhooks", "expires": settings.WEBHOOK_SWEEP_SECONDS},
        },
        "purge-idempotency-records": {
            "task": "clarion.purge_idempotency_records",
            "schedule": 3600.0,
            "options": {"queue": "maintenance", "expires": 3600},
        },
    },
    beat_schedule_filename=str(settings.VAR_DIR / "celerybeat-schedule"),
    timezone="UTC",
)
app.autodiscover_tasks(["workers"])
# Each worker watches itself for a consumer that stopped taking messages (workers/watchdog.py).
app.steps["consumer"].add("workers.watchdog:StallWatchdog")


@worker_init.connect
def _consume_at_rest(**kwargs: object) -> None:
    """Before the worker's consumer connects: its idle BRPOP waits BROKER_POLL_SECONDS."""
    app.conf.broker_transport_options = broker_transport_options(
        settings.CELERY_BROKER_URL, consumer=True
    )


@worker_init.connect
def _check_providers(**kwargs: object) -> None:
    """A worker whose selected provider lacks its settings refuses to start."""
    from workers import providers

    providers.check()


def queues_declare(connection: Connection) -> None:
    """Declare every queue with its exchange and binding, and remove the bindings that
    releases before this one made: each channel queue was also bound to the exchange
    `maintenance` by the key `maintenance`, so a message published there by exchange and
    key was copied into all five queues. Idempotent; the workers call it as they start."""
    # Typed as the AMQP channel; on Redis it is kombu's virtual channel, with its client.
    channel: Any = connection.default_channel
    for queue in QUEUES:
        queue(channel).declare()
    stale = [queue for queue in QUEUES if queue.name != DEFAULT_QUEUE]
    if connection.transport.driver_type == "redis":
        # kombu's virtual queue_unbind edits a copy of the binding table, not Redis's set.
        client = channel.client
        for key in (channel.keyprefix_queue, channel.keyprefix_binding_permanent):
            members = [
                member
                for member in client.smembers(key % DEFAULT_QUEUE)
                if member.decode().split(channel.sep)[-1] in {q.name for q in stale}
            ]
            if members:
                client.srem(key % DEFAULT_QUEUE, *members)
    else:
        legacy = Exchange(DEFAULT_QUEUE, type="direct")
        for queue in stale:
            queue(channel).unbind_from(legacy, routing_key=DEFAULT_QUEUE)


@worker_ready.connect
def _declare_queues(**kwargs: object) -> None:
    with app.connection_for_write() as connection:
        queues_declare(connection)


@setup_logging.connect
def _configure_logging(**kwargs: object) -> None:
    """A receiver here stops Celery from installing its own text handlers: workers and beat
    log through settings.LOGGING, one JSON object per line like the API (LOG_LEVEL applies,
    not `-l`)."""
    from core.logs import configure

    configure(settings.LOGGING)


@task_prerun.connect
def _database_checked(**kwargs: object) -> None:
    """Connections are kept across tasks: drop one that an error left unusable (a restarted
    PostgreSQL), as Django does at the start of each request."""
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if connection.errors_occurred:
            connection.close_if_unusable_or_obsolete()


@task_prerun.connect
def _bind_task_log_context(task_id: str = "", task: object = None, **kwargs: object) -> None:
    """Each task's lines carry its id and name, and nothing bound by the task before it."""
    import structlog

    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", ""))


@task_postrun.connect
def _clear_task_log_context(**kwargs: object) -> None:
    import structlog

    structlog.contextvars.clear_contextvars()


@worker_init.connect
def _start_worker_metrics(**kwargs: object) -> None:
    """Metrics in the multiprocess directory: forget the live gauges of processes that died
    without a clean exit, then, on a host with workers but no API server (multi-host
    deployments), serve this host's directory on WORKER_METRICS_PORT from the main process."""
    from core import metrics
    from workers.liveness import liveness_server_start

    metrics.multiprocess_dir_cleanup()
    liveness_server_start()


@worker_process_shutdown.connect
def _pool_process_exited(pid: int | None = None, **kwargs: object) -> None:
    from core import metrics

    metrics.process_exited(pid or os.getpid())
