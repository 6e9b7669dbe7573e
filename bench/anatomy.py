"""What one accepted notification costs, counted rather than timed: the real ASGI application
(project.asgi) is called in-process, request after request, while SQL statements, Redis round
trips, new Redis connections, redis.Redis clients built and broker publishes are counted, and
the process's CPU time is taken. The counts do not depend on how busy the machine is, so they
tell a regression from noise where req/s cannot.

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
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


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
    per = {name: round(n / requests, 2) for name, n in sorted(counter.items())}
    per["sql statements"] = round(
        sum(n for name, n in counter.items() if name.startswith("sql ")) / requests, 2
    )
    return {
        "requests": requests,
        "statuses": {str(k): v for k, v in statuses.items()},
        "per_request": per,
        "cpu_ms_per_request": round(cpu * 1000 / requests, 2),
        "wall_ms_per_request": round(wall * 1000 / requests, 2),
    }


def measure_delivery(*, deliveries: int) -> dict[str, Any]:
    """What a channel worker does per delivery: delivery_process() on queued deliveries (the
    ones the accepts above created), in-process, one after another, counted like an accept."""
    from notifications.models import Delivery
    from workers.services import delivery_process

    ids = list(
        Delivery.objects.filter(status="queued")
        .order_by("id")
        .values_list("id", flat=True)[: deliveries + 20]
    )
    if len(ids) < deliveries + 20:
        return {"error": f"only {len(ids)} queued deliveries to work on"}
    for delivery_id in ids[:20]:
        delivery_process(delivery_id=delivery_id)
    counter: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with _counting(counter):
        for delivery_id in ids[20:]:
            outcomes[delivery_process(delivery_id=delivery_id).value] += 1
    cpu = time.process_time() - cpu0
    wall = time.perf_counter() - wall0
    per = {name: round(n / deliveries, 2) for name, n in sorted(counter.items())}
    per["sql statements"] = round(
        sum(n for name, n in counter.items() if name.startswith("sql ")) / deliveries, 2
    )
    return {
        "deliveries": deliveries,
        "outcomes": dict(outcomes),
        "per_delivery": per,
        "cpu_ms_per_delivery": round(cpu * 1000 / deliveries, 2),
        "wall_ms_per_delivery": round(wall * 1000 / deliveries, 2),
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
    result["delivery"] = measure_delivery(deliveries=requests)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
