"""A TCP forwarder that can turn the connections it carries half-open: bytes keep arriving
at both ends and are swallowed, nothing is closed, no error is raised, while new connections
go through as before. This is what a NAT or firewall that forgot a flow, a load balancer
failing over, or a VM paused and resumed does to a long-lived Redis connection, and what TCP
itself never reports (the forwarder's own end keeps acknowledging)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _Flow:
    """One client connection and its connection to the target."""

    client: asyncio.StreamWriter
    target: asyncio.StreamWriter
    silent: bool = False


@dataclass
class Forwarder:
    """Forwards 127.0.0.1:<port> to host:target_port from a thread of its own."""

    target_port: int
    host: str = "127.0.0.1"
    port: int = 0
    # Seconds every chunk from a client waits before it goes on to the target (a slow path).
    lag: float = 0.0
    flows: list[_Flow] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Forwarder:
        ready: Future[None] = Future()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._listen(ready))
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="forwarder", daemon=True)
        self._thread.start()
        ready.result(10)
        return self

    async def _listen(self, ready: Future[None]) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        ready.set_result(None)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection(
                self.host, self.target_port
            )
        except OSError:
            writer.close()
            return
        flow = _Flow(writer, target_writer)
        self.flows.append(flow)
        await asyncio.gather(
            self._pump(reader, target_writer, flow, upstream=True),
            self._pump(target_reader, writer, flow, upstream=False),
            return_exceptions=True,
        )

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        flow: _Flow,
        upstream: bool,
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                if not flow.silent:
                    writer.close()
                return
            if flow.silent:
                continue  # swallowed: the sender's TCP saw it acknowledged
            if upstream and self.lag:
                await asyncio.sleep(self.lag)
            writer.write(data)
            await writer.drain()

    def _call(self, fn: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(10)

    def silence(self) -> int:
        """Turn every connection open now half-open; returns how many there were."""

        async def silence() -> int:
            live = [flow for flow in self.flows if not flow.silent]
            for flow in live:
                flow.silent = True
            return len(live)

        count: int = self._call(silence)
        return count

    def live(self) -> int:
        """Connections that still carry bytes."""

        async def live() -> int:
            return sum(1 for flow in self.flows if not flow.silent and not flow.client.is_closing())

        count: int = self._call(live)
        return count

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for flow in self.flows:
                for writer in (flow.client, flow.target):
                    writer.transport.abort()

        self._call(close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@contextmanager
def forwarding(target_port: int) -> Iterator[Forwarder]:
    forwarder = Forwarder(target_port).start()
    try:
        yield forwarder
    finally:
        forwarder.stop()


def port_of(url: str) -> int:
    """The TCP port of a redis:// URL (6379 when it names none)."""
    from urllib.parse import urlsplit

    return urlsplit(url).port or 6379


def can_reach(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0
