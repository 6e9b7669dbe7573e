"""The cluster's WebSocket clients, run on their own host: one socket per recipient token
through the load balancer, each acking what it gets as the browser client does, and coming
back with `since` (the inbox position up to which it has seen every notification) whenever its
socket drops, as clarion.js does.
Every notification frame is written as one JSON line to the output file, with `again` true
when this client had already seen its position (clarion.js does not show such a frame: a
retry may push again a frame the catch-up carried); a notification shown twice would be one
that came under two positions. `connected N` is printed each time
the count of open sockets reaches a new high.

    python -m tests.cluster.ws_clients CONFIG.json

CONFIG: {"url": "ws://10.77.0.2:8000/ws/notifications/", "origin": "...", "tokens": [...],
"out": "/path/frames.jsonl"}."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

import websockets
from websockets.asyncio.client import connect

from channels_app.positions import SeenPositions

RECONNECT_SECONDS = 0.5


class Clients:
    def __init__(self, config: dict[str, Any]) -> None:
        self.url = config["url"]
        self.origin = config["origin"]
        self.tokens: list[str] = config["tokens"]
        self.out: IO[str] = Path(config["out"]).open("a", buffering=1)
        self.open = 0
        self.most = 0
        self.stopping = asyncio.Event()

    async def client(self, index: int, token: str) -> None:
        positions = SeenPositions()
        while not self.stopping.is_set():
            since = positions.mark
            url = f"{self.url}?token={token}" + (f"&since={since}" if since else "")
            try:
                async with connect(
                    url, origin=self.origin, open_timeout=10, ping_interval=None, proxy=None
                ) as ws:
                    self.open += 1
                    if self.open > self.most:
                        self.most = self.open
                        print(f"connected {self.most}", flush=True)
                    try:
                        async for message in ws:
                            frame = json.loads(message)
                            if frame.get("type") == "notification":
                                line = {
                                    "client": index,
                                    "id": frame["id"],
                                    "again": not positions.add(frame["position"]),
                                    "at": time.time(),
                                }
                                self.out.write(json.dumps(line) + "\n")
                                await ws.send(json.dumps({"type": "ack", "id": frame["id"]}))
                            elif frame.get("type") == "ready":
                                positions.advance(frame["position"])
                            elif frame.get("type") == "ping":
                                await ws.send('{"type": "pong"}')
                    finally:
                        self.open -= 1
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                print(f"client {index}: {type(exc).__name__}: {exc}", flush=True)
            await asyncio.sleep(RECONNECT_SECONDS)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        tasks = [asyncio.ensure_future(self.client(i, t)) for i, t in enumerate(self.tokens)]
        await self.stopping.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.out.close()


if __name__ == "__main__":
    asyncio.run(Clients(json.loads(Path(sys.argv[1]).read_text())).run())
