"""Chaos on the live channel: the Redis that carries in-app frames is killed and started again
while sockets are open and notifications keep coming. Pub/sub keeps nothing, so the server
process must notice it lost its subscription, subscribe again by itself, and have every socket
fetch from the database what was published meanwhile: each accepted notification shown once
on its recipient's socket, none lost, none twice, no socket dropped."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from notifications import services
from notifications.tokens import recipient_token_issue
from tests.chaos.harness import RESULTS, PrivateRedis, http, scale, start_api
from tests.conftest import Process
from tests.factories import TemplateFactory, api_key_for

pytestmark = [pytest.mark.chaos, pytest.mark.django_db(transaction=True)]

RATE = 25.0  # POSTs a second, as the bench's ws phase


class Socket:
    """One recipient's browser: answers pings, acks what it is shown, counts every frame."""

    def __init__(self, external_id: str, url: str, origin: str):
        self.external_id, self.url, self.origin = external_id, url, origin
        self.shown: Counter[str] = Counter()
        self.closed_by_server = False
        self.ws: ClientConnection | None = None

    async def open(self) -> None:
        self.ws = await connect(self.url, origin=self.origin, open_timeout=30, ping_interval=None)  # type: ignore[arg-type]
        assert (json.loads(await asyncio.wait_for(self.ws.recv(), 30)))["type"] == "ready"

    async def read(self) -> None:
        assert self.ws is not None
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                if frame["type"] == "notification":
                    self.shown[frame["id"]] += 1
                    await self.ws.send(json.dumps({"type": "ack", "id": frame["id"]}))
                elif frame["type"] == "ping":
                    await self.ws.send('{"type": "pong"}')
        except websockets.ConnectionClosed:
            pass
        self.closed_by_server = True


def test_redis_restarted_under_open_sockets_loses_and_doubles_no_frame(
    owner: Any, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    count = scale(200, 2000)
    layer_redis = PrivateRedis(spawn, tmp_path / "layer")
    layer_redis.start()
    TemplateFactory(
        owner=owner, key="live", content={"web": {"title": "Live", "body": "{{ ref }}"}}
    )
    api_key = api_key_for(owner)
    # The API's Redis (channel layer, caches, limits) is the scenario's own; the server pushes
    # the in-app deliveries it accepts itself, so no worker is involved.
    server = start_api(spawn, tmp_path, REDIS_URL=layer_redis.url, REDIS_HEALTH_CHECK_SECONDS="2")
    origin = server.url
    ws_base = server.url.replace("http://", "ws://") + "/ws/notifications/?token="
    sockets = []
    for n in range(count):
        recipient, _ = services.recipient_upsert(owner=owner, external_id=f"live-{n}")
        token = recipient_token_issue(owner_id=owner.pk, recipient_id=recipient.pk).token
        sockets.append(Socket(f"live-{n}", ws_base + token, origin))
    accepted: dict[str, Socket] = {}
    refused: Counter[int] = Counter()

    def post(n: int) -> None:
        target = random.choice(sockets)
        status, _, body = http(
            "POST",
            server.url + "/api/v1/notifications",
            {
                "recipient": target.external_id,
                "template": "live",
                "data": {"ref": f"live-{n}"},
                "channels": ["web"],
            },
            api_key,
            timeout=10,
        )
        if status == 202:
            accepted[json.loads(body)["id"]] = target
        else:
            refused[status] += 1

    async def posting(seconds: float, first: int) -> int:
        n = first
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            await asyncio.to_thread(post, n)
            n += 1
            await asyncio.sleep(max(0.0, 1 / RATE - (time.monotonic() - started)))
        return n

    async def scenario() -> dict[str, Any]:
        for start in range(0, count, 100):
            await asyncio.gather(*(s.open() for s in sockets[start : start + 100]))
        readers = [asyncio.ensure_future(s.read()) for s in sockets]
        n = await posting(4, 0)
        before = len(accepted)
        layer_redis.kill()
        n = await posting(2, n)
        during = len(accepted) - before
        layer_redis.start()
        n = await posting(4, n)

        def missing() -> list[str]:
            return [i for i, s in accepted.items() if s.shown[i] == 0]

        end = time.monotonic() + 60
        while missing() and time.monotonic() < end:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # time for a second copy to show, if one were coming
        closed = sum(s.closed_by_server for s in sockets)
        for s in sockets:
            assert s.ws is not None
            await s.ws.close()
        await asyncio.gather(*readers, return_exceptions=True)
        return {"posted": n, "during": during, "missing": missing(), "closed": closed}

    outcome = asyncio.run(scenario())
    shown_twice = sum(1 for i, s in accepted.items() if s.shown[i] > 1)
    foreign = sum(1 for s in sockets for i in s.shown if accepted.get(i) is not s)
    line = (
        f"live Redis restarted under {count} sockets: posted={outcome['posted']} "
        f"accepted={len(accepted)} ({outcome['during']} while Redis was down; refused "
        f"{dict(refused)}) shown={len(accepted) - len(outcome['missing'])} "
        f"shown_twice={shown_twice} lost={len(outcome['missing'])} "
        f"sockets_closed_by_server={outcome['closed']}"
    )
    RESULTS.append(line)
    print(line)
    log = server.process.log()
    assert "channel layer subscription restored" in log, log[-3000:]
    assert (len(outcome["missing"]), shown_twice, foreign) == (0, 0, 0), line
    assert outcome["closed"] == 0, line
