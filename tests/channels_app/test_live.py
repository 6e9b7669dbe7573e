"""End to end on real processes: the API accepts, a real Celery worker on the `web` queue
publishes on the real channel layer, and sockets on the ASGI application or on separate
uvicorn processes receive the frame; acks and reads show in the status API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import websockets
from asgiref.sync import async_to_sync, sync_to_async

from notifications.models import Delivery, DeliveryEvent, Notification
from tests.channels_app.support import (
    communicator,
    expected_frame,
    post_notification,
    recipient_with_token,
    start_server,
)
from tests.conftest import Process, wait_until

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]


def _web_status(notification_id: str) -> str:
    return Delivery.objects.get(notification_id=notification_id, channel="web").status


async def _until(predicate: Callable[[], Any], *, timeout: float, message: str) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await sync_to_async(predicate)()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.05)


def test_posted_notification_reaches_the_socket_and_ack_read_show_in_the_status_api(
    api: Any, owner: Any, template: Any, celery_worker_process: Callable[..., Process]
) -> None:
    celery_worker_process("web", concurrency=1)
    _, token = recipient_with_token(owner, "user-42")

    async def scenario() -> str:
        ws = communicator(token=token)
        assert await ws.connect() == (True, None)
        assert (await ws.receive_json_from())["type"] == "ready"
        notification_id = await sync_to_async(post_notification)(api, "user-42", "A-1001")
        frame = await ws.receive_json_from(timeout=20)
        notification = await sync_to_async(Notification.objects.get)(pk=notification_id)
        assert frame == expected_frame(notification)
        assert frame == {
            "type": "notification",
            "id": notification_id,
            "position": 1,
            "title": "Shipped",
            "body": "Order A-1001 is on its way",
            "data": {"order_id": "A-1001"},
            "created_at": frame["created_at"],
        }
        # The worker marks it sent once its publish returned; wait for that so the statuses
        # below follow one order (an ack that wins the race is covered in test_web.py).
        await _until(lambda: _web_status(notification_id) == "sent", timeout=10, message="sent")
        await ws.send_json_to({"type": "ack", "id": notification_id})
        await _until(
            lambda: _web_status(notification_id) == "delivered", timeout=5, message="delivered"
        )
        detail = (await sync_to_async(api.get)(f"/api/v1/notifications/{notification_id}")).json()
        assert detail["created_at"] == frame["created_at"]
        assert detail["status"] == "delivered"
        [web] = [d for d in detail["deliveries"] if d["channel"] == "web"]
        assert (web["status"], web["provider"], web["attempt_count"]) == (
            "delivered",
            "websocket",
            1,
        )
        assert web["sent_at"] is not None and web["delivered_at"] is not None
        assert web["read_at"] is None

        await ws.send_json_to({"type": "read", "id": notification_id})
        await _until(lambda: _web_status(notification_id) == "read", timeout=5, message="read")
        assert await ws.receive_nothing(0.3)
        await ws.disconnect()
        return notification_id

    notification_id = async_to_sync(scenario)()
    detail = api.get(f"/api/v1/notifications/{notification_id}").json()
    assert detail["status"] == "read"
    [web] = [d for d in detail["deliveries"] if d["channel"] == "web"]
    assert web["status"] == "read"
    assert web["sent_at"] <= web["delivered_at"] <= web["read_at"]
    assert [a["outcome"] for a in web["attempts"]] == ["ok"]
    events = DeliveryEvent.objects.filter(
        delivery__notification_id=notification_id, delivery__channel="web"
    ).order_by("at", "id")
    assert [(e.status, e.detail) for e in events] == [
        ("queued", ""),
        ("sent", "websocket"),
        ("delivered", "websocket"),
        ("read", "websocket"),
    ]


def test_a_worker_reaches_sockets_on_two_server_processes(
    api: Any,
    owner: Any,
    template: Any,
    spawn: Callable[..., Process],
    celery_worker_process: Callable[..., Process],
    tmp_path: Path,
) -> None:
    celery_worker_process("web", concurrency=1)
    servers = [start_server(spawn, tmp_path, f"uvicorn-{n}")[0] for n in (1, 2)]
    _, token_a = recipient_with_token(owner, "user-a")
    _, token_b = recipient_with_token(owner, "user-b")

    async def connect(base: str, token: str) -> Any:
        socket = await websockets.connect(
            base.replace("http", "ws") + "/ws/notifications/", origin=base, open_timeout=5
        )
        await socket.send(json.dumps({"type": "auth", "token": token}))
        assert (json.loads(await asyncio.wait_for(socket.recv(), 5)))["type"] == "ready"
        return socket

    async def next_frame(socket: Any) -> dict[str, Any]:
        return dict(json.loads(await asyncio.wait_for(socket.recv(), 20)))

    async def silent(socket: Any) -> bool:
        try:
            await asyncio.wait_for(socket.recv(), 0.5)
        except TimeoutError:
            return True
        return False

    async def scenario() -> None:
        # user-a has a tab on each process; user-b one tab, on the second.
        a1, a2 = await connect(servers[0], token_a), await connect(servers[1], token_a)
        b2 = await connect(servers[1], token_b)
        for_a = await sync_to_async(post_notification)(api, "user-a", "A-1")
        expected_a = expected_frame(await sync_to_async(Notification.objects.get)(pk=for_a))
        assert await next_frame(a1) == expected_a
        assert await next_frame(a2) == expected_a
        for_b = await sync_to_async(post_notification)(api, "user-b", "B-1")
        expected_b = expected_frame(await sync_to_async(Notification.objects.get)(pk=for_b))
        assert await next_frame(b2) == expected_b
        assert await silent(a1) and await silent(a2) and await silent(b2)
        for socket in (a1, a2, b2):
            await socket.close()

    async_to_sync(scenario)()


def test_a_client_that_stops_reading_delays_no_one_and_is_closed(
    owner: Any, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    """A socket whose client never reads fills its buffers, and the server's sends to it wait:
    only for that socket. Frames to another socket of the same process keep arriving at once,
    and the stalled one is closed once its ping cannot even be written."""
    import socket as sockets
    import time
    import uuid

    from channels_app.broadcast import recipients_broadcast
    from tests.project.api_server import start_api_server

    server, base = start_api_server(
        spawn, tmp_path, name="ws", WS_PING_INTERVAL_SECONDS="2", WS_PING_TIMEOUT_SECONDS="1"
    )
    stalled_recipient, token_a = recipient_with_token(owner, "user-a")
    _, token_b = recipient_with_token(owner, "user-b")
    host, port = base.removeprefix("http://").split(":")

    # The stalled client: a handshake by hand, then it never reads again.
    raw = sockets.socket()
    raw.setsockopt(sockets.SOL_SOCKET, sockets.SO_RCVBUF, 4096)
    raw.connect((host, int(port)))
    raw.sendall(
        (
            f"GET /ws/notifications/?token={token_a} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nOrigin: " + base + "\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert raw.recv(12) == b"HTTP/1.1 101"

    def big(n: int) -> dict[str, Any]:
        return {
            "type": "notification",
            "id": str(uuid.uuid4()),
            "position": n + 1,
            "title": f"big {n}",
            "body": "x" * 32_768,
            "data": {},
            "created_at": "2026-01-01T00:00:00Z",
        }

    async def scenario() -> list[float]:
        other = await websockets.connect(
            base.replace("http", "ws") + f"/ws/notifications/?token={token_b}",
            origin=base,
            open_timeout=5,
        )
        assert (json.loads(await asyncio.wait_for(other.recv(), 5)))["type"] == "ready"
        # 8 MiB for the stalled socket: far more than its buffers hold.
        flood = [(stalled_recipient.pk, big(n)) for n in range(256)]
        assert await sync_to_async(recipients_broadcast)(frames=flood, timeout=10) == [None] * 256
        other_id = (await sync_to_async(recipient_with_token)(owner, "user-b"))[0].pk
        waits = []
        for n in range(20):
            frame = {**big(n), "body": "small"}
            sent = time.perf_counter()
            [error] = await sync_to_async(recipients_broadcast)(
                frames=[(other_id, frame)], timeout=5
            )
            assert error is None
            while True:
                got = json.loads(await asyncio.wait_for(other.recv(), 5))
                if got["type"] == "notification":
                    break
                await other.send('{"type": "pong"}')
            assert got["id"] == frame["id"]
            waits.append(time.perf_counter() - sent)
            await asyncio.sleep(0.2)
        await other.close()
        return waits

    waits = async_to_sync(scenario)()
    assert max(waits) < 1.0, waits
    # Closed for not reading its ping: logged, and the connection ends (the close frame cannot
    # be written either, so the server gives up on the handshake and drops it).
    wait_until(
        lambda: "that does not read" in server.log(),
        timeout=30,
        interval=0.2,
        message="the server to close the socket that does not read",
    )
    assert "closing a WebSocket of recipient." in server.log(), server.log()[-2000:]
    raw.settimeout(30)
    try:
        while raw.recv(1 << 20):
            pass  # reading what was queued; the server's end closes
    except ConnectionResetError:
        pass
    raw.close()


def test_a_client_gone_silent_is_closed_by_the_protocols_pings_and_one_that_answers_stays(
    owner: Any, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    """The server's application pings await no answer (they cost no frame through the
    consumer); liveness is the WebSocket protocol's own ping, which browsers and client
    libraries answer by themselves and uvicorn checks (here every second, 1 s to answer)."""
    import socket as sockets
    import time

    from tests.project.api_server import start_api_server

    _, base = start_api_server(
        spawn,
        tmp_path,
        name="ws",
        WS_PING_INTERVAL_SECONDS="0.5",
        UVICORN_WS_PING_INTERVAL="1",
        UVICORN_WS_PING_TIMEOUT="1",
    )
    _, token_a = recipient_with_token(owner, "user-a")
    _, token_b = recipient_with_token(owner, "user-b")
    host, port = base.removeprefix("http://").split(":")

    # Gone silent: a handshake by hand, then it reads everything and answers nothing.
    raw = sockets.create_connection((host, int(port)))
    raw.sendall(
        (
            f"GET /ws/notifications/?token={token_a} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nOrigin: " + base + "\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    raw.settimeout(10)
    opened = time.monotonic()
    received = b""
    while chunk := raw.recv(1 << 16):
        received += chunk
    silent_for = time.monotonic() - opened
    raw.close()
    assert received.startswith(b"HTTP/1.1 101")
    assert b'{"type": "ping"}' in received  # the application's pings came all along
    assert silent_for < 6, f"closed after {silent_for:.1f} s"

    async def answering() -> list[str]:
        # websockets answers the protocol's pings, as a browser does; the application's get
        # no answer at all, and the socket stays for several ping rounds.
        async with websockets.connect(
            base.replace("http", "ws") + f"/ws/notifications/?token={token_b}",
            origin=base,  # type: ignore[arg-type]
            open_timeout=5,
            ping_interval=None,
        ) as ws:
            kinds = []
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                kinds.append(json.loads(await asyncio.wait_for(ws.recv(), 5))["type"])
            return kinds

    kinds = async_to_sync(answering)()
    assert kinds[0] == "ready" and kinds.count("ping") >= 5, kinds
