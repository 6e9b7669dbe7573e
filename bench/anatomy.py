"""What one accepted notification and one delivery cost, counted rather than timed, along the
outbox pipeline:

- accept: the real ASGI application (project.asgi) called in-process, request after request;
  it writes the Notification and its Delivery rows (the outbox) and publishes nothing;
- relay: workers.relay.outbox_publish_due() run in-process on the outbox the accepts left,
  until it is empty (one task per DISPATCH_BATCH_SIZE ids of a channel); its share per delivery;
- delivery: workers.services.deliveries_process() on batches of DISPATCH_BATCH_SIZE ids of one
  channel, as a worker gets them from a task.

Each counts SQL statements, commits, Redis round trips, new Redis and database connections,
redis.Redis clients built and broker publishes, and takes the process's CPU time. The counts
do not depend on how busy the machine is, so they tell a regression from noise where req/s
cannot.

    python -m bench.anatomy API_KEY   (with the bench's environment; prints JSON)
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def _counting(counter: Counter[str]) -> Iterator[None]:
    import kombu.messaging
    import redis.connection
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.utils import CursorWrapper

    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: Callable[..., str]) -> None:
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            counter[label(*args, **kwargs)] += 1
            return original(*args, **kwargs)

        patched.append((owner, name, original))
        setattr(owner, name, counted)

    def sql_label(wrapper: Any, sql: Any, *args: Any, **kwargs: Any) -> str:
        if not wrapper.db.in_atomic_block:
            # Outside transaction.atomic: the statement commits (and flushes WAL) on its own.
            counter["db commits"] += 1
        text = sql if isinstance(sql, str) else str(sql)
        verb = text.lstrip().split(None, 1)[0].upper() if text.strip() else "?"
        return f"sql {verb}"

    def publish_label(producer: Any, body: Any, *args: Any, **kwargs: Any) -> str:
        exchange = kwargs.get("exchange") or getattr(producer.exchange, "name", "") or "default"
        if not isinstance(exchange, str):
            exchange = getattr(exchange, "name", "?")
        return f"broker publish ({exchange or 'default'})"

    wrap(CursorWrapper, "_execute", sql_label)
    wrap(CursorWrapper, "_executemany", sql_label)
    wrap(BaseDatabaseWrapper, "_commit", lambda *a, **k: "db commits")
    wrap(redis.connection.AbstractConnection, "send_packed_command", lambda *a, **k: "redis sends")
    for name in ("Connection", "UnixDomainSocketConnection"):
        wrap(getattr(redis.connection, name), "_connect", lambda *a, **k: "redis new connections")
    wrap(redis.Redis, "__init__", lambda *a, **k: "redis.Redis clients built")
    wrap(kombu.messaging.Producer, "publish", publish_label)
    # A checkout of a Django connection (from the pool, or a new one without a pool) ...
    wrap(BaseDatabaseWrapper, "connect", lambda *a, **k: "db connection checkouts")
    # ... and a new connection to the database server (psycopg 3, with or without the pool).
    restore_classmethod = _count_classmethod(counter, "psycopg", "Connection", "connect")
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
        restore_classmethod()


def _count_classmethod(
    counter: Counter[str], module: str, cls: str, name: str
) -> Callable[[], None]:
    try:
        owner = getattr(importlib.import_module(module), cls)
    except ImportError:
        return lambda: None
    descriptor = owner.__dict__[name]
    original = getattr(owner, name)

    def counted(klass: Any, *args: Any, **kwargs: Any) -> Any:
        counter["db new connections"] += 1
        return original(*args, **kwargs)

    setattr(owner, name, classmethod(counted))
    return lambda: setattr(owner, name, descriptor)


def _per_unit(counter: Counter[str], units: int) -> dict[str, float]:
    """Counts per unit, with the totals a reader looks for first always present."""
    per = {name: round(n / units, 4) for name, n in sorted(counter.items())}
    per["sql statements"] = round(
        sum(n for name, n in counter.items() if name.startswith("sql ")) / units, 4
    )
    per["broker publishes"] = round(
        sum(n for name, n in counter.items() if name.startswith("broker publish (")) / units, 4
    )
    for name in ("db commits", "redis sends", "db new connections", "db connection checkouts"):
        per.setdefault(name, 0.0)
    return per


async def _call(app: Any, body: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/notifications",
        "raw_path": b"/api/v1/notifications",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def measure(
    *,
    api_key: str,
    template: str,
    recipients: int,
    requests: int,
    tag: str,
    asgi_app: str = "project.asgi:application",
    rounds: int = 3,
) -> dict[str, Any]:
    """POST `requests` notifications through the ASGI application, one at a time; the CPU
    figure is the best of `rounds` rounds (the least disturbed by other processes)."""
    module, _, attribute = asgi_app.partition(":")
    application = getattr(importlib.import_module(module), attribute)

    headers = [
        (b"authorization", f"Bearer {api_key}".encode()),
        (b"content-type", b"application/json"),
    ]

    def body(i: int) -> bytes:
        return json.dumps(
            {
                "recipient": f"bench-user-{1 + i % recipients}",
                "template": template,
                "data": {"order_id": f"X-{i}"},
            }
        ).encode()

    async def run(start: int, count: int) -> Counter[int]:
        statuses: Counter[int] = Counter()
        for i in range(start, start + count):
            key = (b"idempotency-key", f"{tag}-{i}".encode())
            statuses[await _call(application, body(i), [*headers, key])] += 1
        return statuses

    # Warm up imports, URL resolvers, connection pools and caches.
    asyncio.run(run(0, 20))
    counter: Counter[str] = Counter()
    with _counting(counter):
        statuses = asyncio.run(run(100, requests))
    cpu = wall = float("inf")
    for n in range(rounds):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        asyncio.run(run(100 + (n + 1) * requests, requests))
        cpu = min(cpu, time.process_time() - cpu0)
        wall = min(wall, time.perf_counter() - wall0)
    return {
        "requests": requests,
        "statuses": {str(k): v for k, v in statuses.items()},
        "per_request": _per_unit(counter, requests),
        "cpu_ms_per_request": round(cpu * 1000 / requests, 2),
        "wall_ms_per_request": round(wall * 1000 / requests, 2),
    }


def measure_relay() -> dict[str, Any]:
    """The relay's share: outbox_publish_due() rounds until the outbox is empty (everything
    the accepts above left in it), counted; per delivery published."""
    from workers.relay import outbox_publish_due

    counter: Counter[str] = Counter()
    published = rounds = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with _counting(counter):
        while True:
            n = outbox_publish_due()
            if not n:
                break
            published += n
            rounds += 1
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    if not published:
        return {"error": "the outbox was empty"}
    return {
        "deliveries": published,
        "rounds": rounds,
        "per_delivery": _per_unit(counter, published),
        "cpu_ms_per_delivery": round(cpu * 1000 / published, 3),
        "wall_ms_per_delivery": round(wall * 1000 / published, 3),
    }


def measure_delivery(*, deliveries: int) -> dict[str, Any]:
    """What a channel worker does per delivery: deliveries_process() on batches of
    DISPATCH_BATCH_SIZE queued deliveries of one channel (the ones the accepts above created,
    as the relay batched them), in-process, one batch after another, counted like an accept.
    One batch per channel first, to warm up."""
    from django.conf import settings

    from notifications.models import Delivery
    from workers.services import deliveries_process

    size = max(1, settings.DISPATCH_BATCH_SIZE)
    by_channel: dict[str, list[int]] = {}
    for delivery_id, channel in (
        Delivery.objects.filter(status="queued").order_by("id").values_list("id", "channel")
    ):
        by_channel.setdefault(channel, []).append(delivery_id)
    warm = [ids[:size] for ids in by_channel.values()]
    rest = {channel: ids[size:] for channel, ids in by_channel.items()}
    # Batches of each channel in turn, as several queues feed their pools.
    batches: list[list[int]] = []
    offset = 0
    while sum(map(len, batches)) < deliveries and any(len(ids) > offset for ids in rest.values()):
        for ids in rest.values():
            if len(ids) > offset and sum(map(len, batches)) < deliveries:
                batches.append(ids[offset : offset + size])
        offset += size
    counted = sum(map(len, batches))
    if counted < min(deliveries, size):
        return {"error": f"only {counted} queued deliveries to work on"}
    for batch in warm:
        deliveries_process(delivery_ids=batch)
    counter: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with _counting(counter):
        for batch in batches:
            for outcome in deliveries_process(delivery_ids=batch).values():
                outcomes[outcome.value] += 1
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    return {
        "deliveries": counted,
        "batches": len(batches),
        "batch_size": size,
        "outcomes": dict(outcomes),
        "per_delivery": _per_unit(counter, counted),
        "per_batch_sql_statements": round(
            sum(n for name, n in counter.items() if name.startswith("sql ")) / len(batches), 2
        ),
        "cpu_ms_per_delivery": round(cpu * 1000 / counted, 3),
        "wall_ms_per_delivery": round(wall * 1000 / counted, 3),
    }


def main() -> None:
    import django

    from bench.variants import apply

    apply(os.environ.get("BENCH_VARIANT"))
    django.setup()
    # The request log lines are formatted as usual, then dropped: this process's stdout is
    # the JSON answer.
    sink = open(os.devnull, "w")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sink)
    requests = int(os.environ.get("BENCH_ANATOMY_REQUESTS", "200"))
    result = measure(
        api_key=sys.argv[1],
        template="bench_two",
        recipients=int(os.environ.get("BENCH_ANATOMY_RECIPIENTS", "1000")),
        requests=requests,
        tag=f"anatomy-{os.getpid()}-{time.time_ns()}",
    )
    # Everything the accepts (warm-up and CPU rounds included) left in the outbox.
    result["relay"] = measure_relay()
    result["delivery"] = measure_delivery(deliveries=2 * requests)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
