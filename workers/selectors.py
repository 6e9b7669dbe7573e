"""Reads for the delivery side: sandbox messages, and what waits on the broker's queues (the
sweeper and the /metrics scrape read it)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db.models import QuerySet

from notifications.models import Owner
from project.celery import app
from workers.models import SandboxMessage

SANDBOX_LIST_LIMIT = 500


def sandbox_messages_list(
    *, owner: Owner, notification_id: str | None = None, channel: str | None = None
) -> QuerySet[SandboxMessage]:
    messages = SandboxMessage.objects.filter(owner=owner)
    if notification_id:
        messages = messages.filter(notification_id=notification_id)
    if channel:
        messages = messages.filter(channel=channel)
    return messages[:SANDBOX_LIST_LIMIT]


def queue_depths() -> dict[str, int]:
    """Messages waiting on the broker in each Celery queue."""
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=settings.METRICS_SOURCE_TIMEOUT_SECONDS)
        if conn.transport.driver_type == "redis":
            return _redis_queue_depths(conn.default_channel, settings.CELERY_QUEUES)
        return _amqp_queue_depths(conn, settings.CELERY_QUEUES)


def _redis_queue_depths(channel: Any, queues: Iterable[str]) -> dict[str, int]:
    # kombu's Redis transport keeps a queue as one list per priority step: the queue's name
    # for step 0, name + sep + step for the others (kombu/transport/redis.py, _q_for_pri).
    queues = list(queues)
    steps = list(channel.priority_steps)
    with channel.conn_or_acquire() as client:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for step in steps:
                pipe.llen(f"{queue}{channel.sep}{step}" if step else queue)
        lengths = pipe.execute()
    return {
        queue: int(sum(lengths[i * len(steps) : (i + 1) * len(steps)]))
        for i, queue in enumerate(queues)
    }


def _amqp_queue_depths(conn: Any, queues: Iterable[str]) -> dict[str, int]:
    from amqp.exceptions import NotFound

    depths = {}
    for queue in queues:
        # A passive declare of a missing queue closes the channel: one channel per queue.
        channel = conn.channel()
        try:
            _, message_count, _ = channel.queue_declare(queue=queue, passive=True)
            depths[queue] = int(message_count)
        except NotFound:
            depths[queue] = 0
        finally:
            if getattr(channel, "is_open", True):
                channel.close()
    return depths
