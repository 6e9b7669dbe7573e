"""The broadcast helper's one event loop per process: reused across calls, started again after a
fork, bounded by its timeout, and many frames published at once to real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import select
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from channels_app import broadcast
from channels_app.broadcast import recipient_broadcast, recipient_group, recipients_broadcast
from tests.channels_app.support import GroupListener, communicator, recipient_with_token


def frame(n: int) -> dict[str, Any]:
    return {
        "type": "notification",
        "id": str(uuid.UUID(int=n)),
        "position": n,
        "title": f"title {n}",
        "body": "",
        "data": {"n": n},
        "created_at": "2026-01-01T00:00:00Z",
    }


class SlowLayer:
    """A layer whose publishes to the recipients in `hanging` never finish."""

    def __init__(self, hanging: set[int]):
        self.hanging = {recipient_group(r) for r in hanging}
        self.sent: list[str] = []

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        if group in self.hanging:
            await asyncio.sleep(3600)
        self.sent.append(group)


@pytest.fixture
def own_runner(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., broadcast._LoopRunner]]:
    """Install a runner of the test's making as this process's broadcast loop; stopped after."""
    made: list[broadcast._LoopRunner] = []

    def install(**kwargs: Any) -> broadcast._LoopRunner:
        runner = broadcast._LoopRunner(**kwargs)
        made.append(runner)
        monkeypatch.setattr(broadcast, "_runner", runner)
        return runner

    yield install
    for runner in made:
        runner.stop()


def test_calls_reuse_one_loop_in_one_daemon_thread(
    own_runner: Callable[..., broadcast._LoopRunner],
) -> None:
    layer = SlowLayer(hanging=set())
    runner = own_runner(layer_factory=lambda: layer)

    recipient_broadcast(recipient_id=1, frame=frame(1), timeout=5)
    assert recipients_broadcast(frames=[(2, frame(2)), (3, frame(3))], timeout=5) == [None, None]

    assert broadcast._loop_runner() is runner
    assert runner.layer is layer
    assert runner.thread.is_alive() and runner.thread.daemon
    assert runner.loop.is_running() and not runner.loop.is_closed()
    assert sorted(layer.sent) == ["recipient.1", "recipient.2", "recipient.3"]
    assert recipients_broadcast(frames=[], timeout=5) == []


def test_a_changed_pid_starts_a_new_loop_with_a_new_layer(
    own_runner: Callable[..., broadcast._LoopRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a Celery prefork child sees: the runner it inherited was started by another pid."""
    inherited = own_runner()
    recipient_broadcast(recipient_id=1, frame=frame(1), timeout=5)
    inherited_layer = inherited.layer
    assert inherited_layer is not None
    monkeypatch.setattr(inherited, "pid", inherited.pid - 1)

    recipient_broadcast(recipient_id=1, frame=frame(2), timeout=5)

    current = broadcast._runner
    assert current is not None and current is not inherited
    try:
        assert current.pid == os.getpid()
        assert current.loop is not inherited.loop
        assert current.thread is not inherited.thread and current.thread.is_alive()
        assert current.layer is not None and current.layer is not inherited_layer
        # And the new one is kept: the next call finds it.
        recipient_broadcast(recipient_id=1, frame=frame(3), timeout=5)
        assert broadcast._runner is current
    finally:
        current.stop()


def test_a_forked_child_publishes_on_a_loop_of_its_own() -> None:
    """A real fork, as Celery's prefork pool does after the parent has published: the child
    has no loop thread (threads are not forked) and must not wait for the parent's."""
    listener = GroupListener(recipient_group(7))
    recipient_broadcast(recipient_id=7, frame=frame(1), timeout=5)
    parent = broadcast._runner
    assert parent is not None
    read_end, write_end = os.pipe()

    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any of pytest's teardown
        code = 1
        try:
            os.close(read_end)
            recipient_broadcast(recipient_id=7, frame=frame(2), timeout=5)
            child = broadcast._runner
            report = {
                "new_runner": child is not parent,
                "pid": child.pid if child else None,
                "thread_alive": bool(child and child.thread.is_alive()),
            }
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)

    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], 20)
        assert ready, "the child did not answer in 20 s"
        report = json.loads(os.read(read_end, 4096))
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == {"new_runner": True, "pid": pid, "thread_alive": True}
    assert broadcast._runner is parent and parent.thread.is_alive()

    with listener:
        assert listener.receive(2) == [
            {"type": "inbox.notification", "frame": frame(1)},
            {"type": "inbox.notification", "frame": frame(2)},
        ]


def test_a_publish_that_does_not_finish_raises_timeout_error(
    own_runner: Callable[..., broadcast._LoopRunner],
) -> None:
    layer = SlowLayer(hanging={1})
    own_runner(layer_factory=lambda: layer)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        recipient_broadcast(recipient_id=1, frame=frame(1), timeout=0.2)
    assert 0.2 <= time.monotonic() - started < 1

    # In a batch only the slow one fails, in its place.
    errors = recipients_broadcast(frames=[(2, frame(2)), (1, frame(1)), (3, frame(3))], timeout=0.2)
    assert [type(e) for e in errors] == [type(None), TimeoutError, type(None)]
    assert sorted(layer.sent) == ["recipient.2", "recipient.3"]


def test_a_loop_that_does_not_answer_fails_every_frame_with_timeout_error(
    own_runner: Callable[..., broadcast._LoopRunner],
) -> None:
    runner = own_runner(layer_factory=lambda: SlowLayer(hanging=set()))
    release = threading.Event()
    runner.loop.call_soon_threadsafe(release.wait, 5)  # blocks the loop itself

    try:
        started = time.monotonic()
        errors = recipients_broadcast(frames=[(1, frame(1)), (2, frame(2))], timeout=0.2)
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert [type(e) for e in errors] == [TimeoutError, TimeoutError]
    assert 0.2 + broadcast.LOOP_GRACE_SECONDS <= elapsed < 3


def test_async_code_is_told_to_use_sync_to_async() -> None:
    async def scenario() -> None:
        with pytest.raises(RuntimeError, match="sync_to_async"):
            recipient_broadcast(recipient_id=1, frame=frame(1), timeout=1)

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_recipients_broadcast_reaches_each_recipients_sockets(owner: Any) -> None:
    recipient_a, token_a = recipient_with_token(owner, "user-a")
    recipient_b, token_b = recipient_with_token(owner, "user-b")
    _, token_c = recipient_with_token(owner, "user-c")
    frames = [(recipient_a.pk, frame(1)), (recipient_b.pk, frame(2)), (recipient_a.pk, frame(3))]

    async def scenario() -> None:
        sockets = [communicator(token=t) for t in (token_a, token_a, token_b, token_c)]
        for ws in sockets:
            assert await ws.connect() == (True, None)
            assert (await ws.receive_json_from())["type"] == "ready"
        errors = await sync_to_async(recipients_broadcast)(frames=frames, timeout=5)
        assert errors == [None, None, None]
        a_first, a_second, b, _ = sockets
        for ws in (a_first, a_second):  # both of A's sockets; A's two frames in either order
            received = [await ws.receive_json_from(timeout=5) for _ in range(2)]
            assert sorted(received, key=lambda f: f["data"]["n"]) == [frame(1), frame(3)]
        assert await b.receive_json_from(timeout=5) == frame(2)
        for ws in sockets:
            assert await ws.receive_nothing(0.3)
            await ws.disconnect()

    async_to_sync(scenario)()
