"""The WebSocket server's garbage-collection plan: what is frozen stays out of collections, the
scheduled full collection frees a frozen cycle, and only a server process freezes at all."""

from __future__ import annotations

import gc
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
    assert "gc: freezing every 5.0 s; full collection every 60.0 s" in server.log()
    frozen = int(line.split("gc: ")[1].split(" objects")[0])
    assert frozen > 10_000  # Django, DRF, Channels and the app: all long-lived
