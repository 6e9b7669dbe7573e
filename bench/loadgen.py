"""The bench's own asyncio load generators: a keep-alive HTTP/1.1 client (closed loop for its
ceiling, open loop at a fixed rate for latency, free of coordinated omission because latency
counts from each request's scheduled time) and a pool of WebSocket clients spread over
several loopback source addresses."""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import websockets
from websockets.asyncio.client import ClientConnection, connect

# --- HTTP -----------------------------------------------------------------------------------


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self.parser.get_status_code(), body))

    def connection_lost(self, exc: Exception | None) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("connection lost"))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def http_request(
    method: str, path: str, *, host: str, headers: dict[str, str], body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def http_once(
    host: str, port: int, raw: bytes, *, timeout: float = 300.0
) -> tuple[int, bytes]:
    conn = await HttpConnection.open(host, port)
    try:
        return await asyncio.wait_for(conn.request(raw), timeout)
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class HttpRun:
    """What one load run measured; latencies in milliseconds."""

    requests: int = 0
    elapsed: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    # Open loop only: how late the generator itself put requests out (its own health).
    send_lag_ms: list[float] = field(default_factory=list)
    client_cpu_seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    @property
    def client_cpu_share(self) -> float:
        return self.client_cpu_seconds / self.elapsed if self.elapsed else 0.0

    def ok(self, accepted: tuple[int, ...] = (200, 201, 202)) -> int:
        return sum(n for status, n in self.statuses.items() if status in accepted)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "elapsed_s": round(self.elapsed, 3),
            "rate_per_s": round(self.rate, 1),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "p50_ms": round(percentile(self.latencies_ms, 50), 2),
            "p90_ms": round(percentile(self.latencies_ms, 90), 2),
            "p99_ms": round(percentile(self.latencies_ms, 99), 2),
            "max_ms": round(max(self.latencies_ms, default=float("nan")), 2),
            "generator_lag_p99_ms": round(percentile(self.send_lag_ms, 99), 2)
            if self.send_lag_ms
            else None,
            "client_cpu_share": round(self.client_cpu_share, 3),
        }


async def closed_loop(
    host: str, port: int, make: Callable[[int], bytes], *, connections: int, duration: float
) -> HttpRun:
    """As fast as the server answers, `connections` requests in flight: the ceiling."""
    conns = [await HttpConnection.open(host, port) for _ in range(connections)]
    run = HttpRun()
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + duration

    async def worker(conn: HttpConnection) -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            try:
                status, _ = await conn.request(make(next(counter)))
            except ConnectionError:
                run.errors += 1
                return
            run.latencies_ms.append((time.perf_counter() - t0) * 1000)
            run.statuses[status] += 1
            run.requests += 1

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    run.elapsed = time.perf_counter() - t0
    run.client_cpu_seconds = cpu_seconds() - cpu0
    for conn in conns:
        conn.close()
    return run


async def open_loop(
    host: str,
    port: int,
    make: Callable[[int], bytes],
    *,
    rate: float,
    duration: float,
    connections: int,
    on_sent: Callable[[int, float], None] | None = None,
    drain_timeout: float = 30.0,
) -> HttpRun:
    """Requests scheduled at a fixed rate whatever the answers do; a request that finds every
    connection busy waits, and its latency counts from when it was due."""
    conns = [await HttpConnection.open(host, port) for _ in range(connections)]
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    run = HttpRun()

    async def worker(conn: HttpConnection) -> None:
        while True:
            item = await queue.get()
            if item is None:
                return
            index, due = item
            raw = make(index)
            if on_sent is not None:
                on_sent(index, due)
            try:
                status, _ = await conn.request(raw)
            except ConnectionError:
                run.errors += 1
                return
            run.latencies_ms.append((time.perf_counter() - due) * 1000)
            run.statuses[status] += 1
            run.requests += 1

    workers = [asyncio.ensure_future(worker(c)) for c in conns]
    total = int(rate * duration)
    cpu0 = cpu_seconds()
    start = time.perf_counter() + 0.05
    for index in range(total):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        run.send_lag_ms.append(max(0.0, (time.perf_counter() - due) * 1000))
        queue.put_nowait((index, due))
    for _ in workers:
        queue.put_nowait(None)
    _, pending = await asyncio.wait(workers, timeout=drain_timeout)
    for task in pending:
        task.cancel()
    run.elapsed = time.perf_counter() - start
    run.client_cpu_seconds = cpu_seconds() - cpu0
    run.errors += sum(1 for _ in pending)
    for conn in conns:
        conn.close()
    return run


# --- WebSocket ------------------------------------------------------------------------------


@dataclass
class WsPool:
    """Many idle WebSocket clients. Each takes the server's application pings without an
    answer and answers the protocol's own (as a browser does), acks the notifications it
    gets (as clarion.js does), and stamps when each one arrived."""

    received: dict[int, list[float]] = field(default_factory=dict)
    connections: list[ClientConnection] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    closed: int = 0
    connect_errors: Counter[str] = field(default_factory=Counter)
    ack: bool = True

    async def _handle(self, ws: ClientConnection, message: str | bytes) -> str | None:
        """Take one server frame as clarion.js does; returns its type."""
        now = time.perf_counter()
        frame = json.loads(message)
        kind = frame.get("type")
        if kind == "notification":
            seq = (frame.get("data") or {}).get("seq")
            if isinstance(seq, int):
                self.received.setdefault(seq, []).append(now)
            if self.ack and "id" in frame:
                await ws.send(json.dumps({"type": "ack", "id": frame["id"]}))
        return kind if isinstance(kind, str) else None

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                await self._handle(ws, message)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed += 1

    async def connect_many(
        self,
        urls: list[str],
        *,
        origin: str,
        source_addresses: list[str],
        parallel: int = 100,
        wait_ready: bool = False,
        open_timeout: float = 30.0,
    ) -> int:
        """Open one client per URL, `parallel` handshakes at a time; returns how many opened."""
        semaphore = asyncio.Semaphore(parallel)
        opened = 0
        self.failed_urls: list[str] = []

        async def one(index: int, url: str) -> None:
            nonlocal opened
            source = source_addresses[index % len(source_addresses)]
            async with semaphore:
                try:
                    ws = await connect(
                        url,
                        origin=origin,  # type: ignore[arg-type]
                        open_timeout=open_timeout,
                        # Browsers send no protocol-level pings; neither do these clients.
                        ping_interval=None,
                        proxy=None,
                        local_addr=(source, 0),
                    )
                    # `ready` follows what the recipient missed (its unread notifications).
                    while wait_ready:
                        message = await asyncio.wait_for(ws.recv(), open_timeout)
                        kind = await self._handle(ws, message)
                        if kind == "ready":
                            break
                        if kind != "notification":
                            raise RuntimeError(f"before ready: {message!r}")
                except (OSError, TimeoutError, websockets.WebSocketException, RuntimeError) as exc:
                    self.connect_errors[type(exc).__name__] += 1
                    self.failed_urls.append(url)
                    return
            self.connections.append(ws)
            self.readers.append(asyncio.ensure_future(self._read(ws)))
            opened += 1

        await asyncio.gather(*(one(i, url) for i, url in enumerate(urls)))
        return opened

    @property
    def open_count(self) -> int:
        return len(self.connections) - self.closed

    async def close_all(self) -> None:
        async def close(ws: ClientConnection) -> None:
            try:
                await asyncio.wait_for(ws.close(), 5)
            except (TimeoutError, OSError, websockets.WebSocketException):
                ws.transport.abort()

        for start in range(0, len(self.connections), 500):
            await asyncio.gather(*(close(ws) for ws in self.connections[start : start + 500]))
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        self.connections.clear()
        self.readers.clear()
