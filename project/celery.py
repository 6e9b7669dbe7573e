"""The Celery application: at-least-once transport settings and the per-channel queues."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_init
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from django.conf import settings

app = Celery("clarion")
app.conf.update(
    broker_url=settings.CELERY_BROKER_URL,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": settings.BROKER_VISIBILITY_TIMEOUT},
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
    task_queues=[Queue(name) for name in settings.CELERY_QUEUES],
    task_default_queue="maintenance",
    # One delivery task per channel, each on its channel's queue; housekeeping on maintenance.
    task_routes={
        **{f"clarion.deliver.{name}": {"queue": name} for name in settings.CHANNEL_QUEUES},
        "clarion.*": {"queue": "maintenance"},
    },
    task_create_missing_queues=False,
    worker_hijack_root_logger=False,
    worker_send_task_events=True,
    task_send_sent_event=True,
    beat_schedule={
        "sweep-deliveries": {
            "task": "clarion.sweep_deliveries",
            "schedule": settings.SWEEPER_INTERVAL_SECONDS,
            "options": {"queue": "maintenance", "expires": settings.SWEEPER_INTERVAL_SECONDS},
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


@worker_init.connect
def _check_providers(**kwargs: object) -> None:
    """A worker whose selected provider lacks its settings refuses to start."""
    from workers import providers

    providers.check()
