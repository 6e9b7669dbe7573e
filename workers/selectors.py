"""Reads for the delivery side: sandbox messages, and what waits on the broker's queues or is
held by its consumers (the sweeper, the workers' stall watchdog and the /metrics scrape read
it)."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from kombu import Connection

from notifications.models import Owner
from project.celery import app
from workers.models import SandboxMessage

SANDBOX_LIST_LIMIT = 500
# Messages the broker holds for its consumers past which reading them all is not worth a sweep
# (the sweeper then falls back on the age of a delivery alone).
HELD_MESSAGES_READ_LIMIT = 10_000

log = logging.getLogger(__name__)


def sandbox_messages_list(
    *, owner: Owner, notification_id: str | None = None, channel: str | None = None
) -> QuerySet[SandboxMessage]:
    messages = SandboxMessage.objects.filter(owner=owner)
    if notification_id:
        messages = messages.filter(notification_id=notification_id)
    if channel:
        messages = messages.filter(channel=channel)
    return messages[:SANDBOX_LIST_LIMIT]


def queue_depths(
    queues: Iterable[str] | None = None, *, connection: Connection | None = None
) -> dict[str, int]:
    """Messages waiting on the broker in each Celery queue (or in the ones given), through a
    connection of its own or the one given (kept by a caller that asks often)."""
    names = list(settings.CELERY_QUEUES if queues is None else queues)
    with nullcontext(connection) if connection is not None else app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=settings.METRICS_SOURCE_TIMEOUT_SECONDS)
        if conn.transport.driver_type == "redis":
            return _redis_queue_depths(conn.default_channel, names)
        return _amqp_queue_depths(conn, names)


@dataclass(frozen=True)
class BrokerHoldings:
    """Where a Redis broker has delivery ids now: `held`, in messages consumers took off a
    queue and have not acknowledged yet (prefetched or running, taken less than the asked
    time ago); `heads`, per queue that has messages waiting, the ids of the one a consumer
    takes next (its oldest). None per queue whose head cannot be read."""

    held: set[int]
    heads: dict[str, list[int] | None]


def broker_holdings(*, queues: Iterable[str], held_younger_than: float) -> BrokerHoldings | None:
    """What the sweeper needs to tell a lost delivery from one still on its way, on a Redis
    broker; None when the broker cannot say so cheaply (RabbitMQ keeps unacknowledged messages
    per consumer and has no peek, or too many messages are held to read).

    kombu's Redis transport moves a message from its queue list (BRPOP) into the `unacked`
    hash (HSET) in two commands; a consumer whose connection fails between the two has lost
    the message for good, and so has one whose BRPOP the server answered into a connection
    that had gone silent. Queues are first in, first out: a delivery published before the
    message at a queue's head is no longer in that queue. Such a delivery, held by no
    consumer, is lost."""
    names = list(queues)
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=settings.METRICS_SOURCE_TIMEOUT_SECONDS)
        if conn.transport.driver_type != "redis":
            return None
        channel = conn.default_channel
        with channel.conn_or_acquire() as client:
            if int(client.hlen(channel.unacked_key)) > HELD_MESSAGES_READ_LIMIT:
                return None
            since = time.time() - held_younger_than
            tags = client.zrangebyscore(channel.unacked_index_key, since, "+inf")
            pipe = client.pipeline(transaction=False)
            if tags:
                pipe.hmget(channel.unacked_key, tags)
            for name in names:
                # kombu pops from the right: the list's last element is the oldest message.
                pipe.lindex(name, -1)
            replies = pipe.execute()
    held_entries = replies.pop(0) if tags else []
    held: set[int] = set()
    for entry in held_entries:
        if entry is not None:
            # kombu keeps [message, exchange, routing key] for each unacknowledged one.
            held.update(_delivery_ids_of(_json_or_none(entry, index=0)))
    heads: dict[str, list[int] | None] = {}
    for name, head in zip(names, replies, strict=True):
        heads[name] = _delivery_ids_of(_json_or_none(head)) if head is not None else None
    return BrokerHoldings(held=held, heads=heads)


def _json_or_none(text: bytes, *, index: int | None = None) -> Any:
    try:
        value = json.loads(text)
        return value[index] if index is not None else value
    except (ValueError, IndexError, TypeError, KeyError):
        return None


def _delivery_ids_of(raw: Any) -> list[int]:
    """The delivery ids a kombu message carries: its body is a base64 JSON of Celery's
    [args, kwargs, embed], and a delivery task's one argument a list of ids (a single id in
    messages of older releases). Anything else (a maintenance task) carries none."""
    if not isinstance(raw, dict):
        return []
    try:
        body = raw["body"]
        if raw.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
    except (ValueError, KeyError, IndexError, TypeError):
        log.debug("a message that is not a task's: %r", str(raw)[:200])
        return []
    if not args or not str(raw.get("headers", {}).get("task", "")).startswith("clarion.deliver"):
        return []
    first = args[0]
    if isinstance(first, int):
        return [first]
    return [pk for pk in first if isinstance(pk, int)] if isinstance(first, list) else []


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
