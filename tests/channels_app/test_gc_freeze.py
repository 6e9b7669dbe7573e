"""The WebSocket server's garbage-collection plan: what is frozen stays out of collections, the
scheduled full collection frees a frozen cycle, and only a server process freezes at all."""

from __future__ import annotations

import gc
import json
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from channels_app import gc_freeze
from channels_app.gc_freeze import GcFreezer, gc_collect_frozen
from tests.channels_app.support import start_server
from tests.conftest import Process, wait_until


class Node:
    other: Node | None = None


def cycle() -> weakref.ref[Node]:
    """A two-object reference cycle that nothing else refers to once this returns."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """The test process's collector is left as it was: nothing frozen."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_the_full_collection_frees_a_cycle_that_was_frozen(unfrozen: None) -> None:
    a, b = Node(), Node()
    a.other, b.other = b, a
    ref = weakref.ref(a)
    gc.freeze()
    del a, b
    gc.collect()
    assert ref() is not None  # frozen: even a full collection does not look at it
    assert gc.get_freeze_count() > 0

    collected, seconds = gc_collect_frozen()

    assert ref() is None
    assert collected >= 2
    assert 0 <= seconds < 5
    assert gc.get_freeze_count() > 0  # what survived is frozen again


def test_the_freezer_keeps_survivors_frozen_and_collects_them_when_due(unfrozen: None) -> None:
    freezer = GcFreezer(
        full_collect_seconds=600, full_collect_growth=10**9, full_collect_min_growth=0
    )
    assert freezer.tick(now=0.0) is None  # the first freeze: after warm-up
    assert freezer.frozen_since is not None and freezer.frozen_since > 10_000

    # Garbage born between two ticks is freed by the young collection, not frozen.
    died_young = cycle()
    assert freezer.tick(now=5.0) is None
    assert died_young() is None

    # An object alive at a tick is frozen; when it becomes garbage, only the full collection
    # that falls due frees it.
    a, b = Node(), Node()
    a.other, b.other = b, a
    long_lived = weakref.ref(a)
    assert freezer.tick(now=10.0) is None
    del a, b
    gc.collect()
    assert freezer.tick(now=599.0) is None
    assert long_lived() is not None

    result = freezer.tick(now=600.0)

    assert result is not None and result[0] >= 2
    assert long_lived() is None
    assert freezer.collected_at == 600.0
    assert freezer.frozen_since is not None and freezer.frozen_since > 10_000


def test_an_idle_server_skips_the_full_collection_until_something_was_frozen(
    unfrozen: None,
) -> None:
    """Due, but next to nothing frozen since the last one: nothing can have died frozen, so
    the pause is skipped; once enough was frozen, the next tick collects."""
    freezer = GcFreezer(
        full_collect_seconds=60, full_collect_growth=10**9, full_collect_min_growth=1000
    )
    freezer.tick(now=0.0)
    assert freezer.tick(now=60.0) is None
    assert freezer.tick(now=120.0) is None
    assert freezer.collected_at == 0.0
    held = [Node() for _ in range(1500)]

    result = freezer.tick(now=125.0)

    assert result is not None
    assert freezer.collected_at == 125.0
    assert len(held) == 1500


def test_the_freezer_collects_early_when_frozen_objects_grew_too_much(unfrozen: None) -> None:
    freezer = GcFreezer(full_collect_seconds=600, full_collect_growth=1000)
    freezer.tick(now=0.0)
    held = [Node() for _ in range(500)]  # 500 objects: under the limit
    assert freezer.tick(now=5.0) is None
    a, b = Node(), Node()
    a.other, b.other = b, a
    long_lived = weakref.ref(a)
    held += [Node() for _ in range(1000)]  # now over it
    del a, b

    result = freezer.tick(now=10.0)

    assert result is not None
    assert long_lived() is None
    assert len(held) == 1500
    assert freezer.collected_at == 10.0


@pytest.mark.parametrize(
    ("argv0", "server"),
    [
        ("/srv/clarion/.venv/bin/uvicorn", True),
        ("/usr/lib/python3.11/site-packages/uvicorn/__main__.py", True),
        ("gunicorn", True),
        ("/srv/clarion/.venv/bin/pytest", False),
        ("manage.py", False),
        ("/srv/clarion/.venv/bin/celery", False),
        ("", False),
    ],
)
def test_only_an_asgi_server_process_freezes(
    argv0: str, server: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", [argv0])
    assert gc_freeze.asgi_server_process() is server


def test_importing_the_asgi_entry_outside_a_server_leaves_the_collector_alone() -> None:
    import project.asgi  # noqa: F401  (the tests' WebSocket clients import it too)

    assert gc_freeze.THREAD_NAME not in {t.name for t in threading.enumerate()}


@pytest.mark.django_db(transaction=True)
def test_the_server_entry_freezes(spawn: Callable[..., Process], tmp_path: Path) -> None:
    """A real uvicorn on project.asgi freezes once warmed up (the default 5 s interval)."""
    _, server = start_server(spawn, tmp_path, "ws")

    line: Any = wait_until(
        lambda: next((x for x in server.log().splitlines() if "objects frozen after" in x), None),
        timeout=30,
        message="the server's first gc.freeze",
    )
    assert "gc: freezing every 5.0 s; full collections: none" in server.log()
    frozen = int(line.split("gc: ")[1].split(" objects")[0])
    assert frozen > 10_000  # Django, DRF, Channels and the app: all long-lived


@pytest.mark.django_db(transaction=True)
def test_a_closed_socket_on_a_real_uvicorn_leaves_no_reference_cycle(owner: Any) -> None:
    """The heap is frozen and never fully collected, so whatever a closed socket leaves in a
    reference cycle stays for good. uvicorn (httptools, websockets) on uvloop, in this process:
    sockets opened and closed with the collector off leave no cycle of theirs behind."""
    import asyncio
    import collections

    import uvicorn
    import uvloop
    import websockets

    from project.asgi import application
    from tests.channels_app.support import recipient_with_token
    from tests.conftest import free_port

    gc_freeze.connection_cycles_break()
    tokens = [recipient_with_token(owner, f"user-{n}")[1] for n in range(20)]
    port = free_port()

    async def scenario() -> collections.Counter[str]:
        config = uvicorn.Config(
            application, port=port, lifespan="off", log_level="warning", http="httptools"
        )
        server = uvicorn.Server(config)
        serving = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        url = f"ws://127.0.0.1:{port}/ws/notifications/?token="
        origin = f"http://127.0.0.1:{port}"
        # One socket first, so what is made once per process is made before counting.
        for batch in (tokens[:1], tokens[1:]):
            gc.collect()
            gc.disable()
            clients = [await websockets.connect(url + t, origin=origin) for t in batch]  # type: ignore[arg-type]
            for client in clients:
                assert (json.loads(await client.recv()))["type"] == "ready"
            for client in clients:
                await client.close()
            del clients
            await asyncio.sleep(0.5)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = collections.Counter(
            f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
        )
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        server.should_exit = True
        await serving
        return left

    try:
        left = uvloop.run(scenario())
    finally:
        gc.set_debug(0)
        gc.enable()
    ours = {
        name: count
        for name, count in left.items()
        if name.split(".")[0] in ("uvicorn", "websockets", "httptools", "uvloop", "channels")
        or "Consumer" in name
    }
    assert ours == {}, left
