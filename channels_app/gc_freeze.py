"""Keeps the WebSocket server's long-lived objects out of Python's full garbage collections,
which were the p99 tail of live delivery (0.4 s pauses at 2,000 open sockets, 1.6 s at
10,000), and collects what that keeps alive on a fixed, logged schedule instead."""

from __future__ import annotations

import gc
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

log = logging.getLogger(__name__)

# Every open socket holds hundreds of objects (consumer, scope, tasks, buffers) for as long as
# it lives, and a full collection walks all of them to find nothing. gc.freeze() moves every
# object tracked so far to the permanent generation, which no collection scans; doing it every
# few seconds keeps the generations the collector does scan down to what is recent. 0 is off.
FREEZE_SECONDS = settings.WS_GC_FREEZE_SECONDS
# The cost of freezing: a reference cycle that becomes garbage after it was frozen (a closed
# socket's consumer and its tasks) is never collected. So, at most this often, the server
# unfreezes, collects everything once (a pause as long as the old full collections, logged with
# its duration, but once per period instead of whenever the collector decided), and refreezes.
FULL_COLLECT_SECONDS = settings.WS_GC_FULL_COLLECT_SECONDS
# ... and sooner when the frozen objects grew by this many since the last time, so garbage
# that freezing keeps alive is bounded in size (about 100 MB of small objects) as well as age.
FULL_COLLECT_GROWTH = settings.WS_GC_FULL_COLLECT_GROWTH
# ... but not while fewer than this many objects were frozen since the last one: only what was
# frozen can have died frozen, and an idle server freezes next to nothing, so its collection
# would find nothing at the price of a pause (0.1 s of CPU a minute at 140,000 frozen objects).
FULL_COLLECT_MIN_GROWTH = settings.WS_GC_FULL_COLLECT_MIN_GROWTH

# Processes started by these commands serve project.asgi; anything else that imports it (tests
# driving the application in-process, management commands) keeps the collector as it is.
ASGI_SERVERS = frozenset({"uvicorn", "gunicorn", "daphne", "hypercorn"})
THREAD_NAME = "clarion-gc-freeze"


def gc_collect_frozen() -> tuple[int, float]:
    """Collect everything once, frozen objects included, then freeze what survived. Returns
    the number of unreachable objects found and the seconds the pause took."""
    started = time.perf_counter()
    gc.unfreeze()
    collected = gc.collect()
    gc.freeze()
    seconds = time.perf_counter() - started
    log.info(
        "gc: full collection of frozen objects found %d unreachable in %.3f s; %d frozen",
        collected,
        seconds,
        gc.get_freeze_count(),
    )
    return collected, seconds


@dataclass
class GcFreezer:
    full_collect_seconds: float = FULL_COLLECT_SECONDS
    full_collect_growth: int = FULL_COLLECT_GROWTH
    full_collect_min_growth: int = FULL_COLLECT_MIN_GROWTH
    # Frozen objects and time at the first freeze or the last full collection.
    frozen_since: int | None = None
    collected_at: float = 0.0

    def tick(self, now: float) -> tuple[int, float] | None:
        """Freeze what is alive now; run the full collection when it is due. Returns that
        collection's (unreachable objects, seconds), or None when it did not run."""
        # A young collection first (cheap: it scans only what was born since the last one), so
        # cycles that are already garbage are freed now rather than frozen for minutes.
        gc.collect(1)
        gc.freeze()
        frozen = gc.get_freeze_count()
        if self.frozen_since is None:
            self.frozen_since, self.collected_at = frozen, now
            log.info("gc: %d objects frozen after warm-up", frozen)
            return None
        grown = frozen - self.frozen_since
        due = now - self.collected_at >= self.full_collect_seconds
        if grown <= self.full_collect_growth and (not due or grown < self.full_collect_min_growth):
            return None
        result = gc_collect_frozen()
        self.frozen_since, self.collected_at = gc.get_freeze_count(), now
        return result


def asgi_server_process() -> bool:
    """Whether this process was started as an ASGI server (`uvicorn project.asgi:application`,
    also `python -m uvicorn`, and uvicorn's --workers, which hand their argv to each worker)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    name = program.parent.name if program.name == "__main__.py" else program.name
    return name in ASGI_SERVERS


def gc_freezer_start(*, interval: float = FREEZE_SECONDS) -> threading.Thread | None:
    """Freeze every `interval` seconds from a daemon thread: gc.freeze() itself takes
    microseconds, so it needs nothing from the event loop and works under any server. The first
    freeze comes one interval after start, once the application has loaded."""
    if interval <= 0:
        return None
    freezer = GcFreezer()

    def run() -> None:
        while True:
            time.sleep(interval)
            freezer.tick(time.monotonic())

    thread = threading.Thread(target=run, name=THREAD_NAME, daemon=True)
    thread.start()
    log.info(
        "gc: freezing every %s s; full collection every %s s or after %d new frozen objects",
        interval,
        freezer.full_collect_seconds,
        freezer.full_collect_growth,
    )
    return thread


def gc_freezer_start_in_server() -> threading.Thread | None:
    """What the ASGI entry calls: start the freezer in a server process, and only there."""
    if not asgi_server_process():
        return None
    return gc_freezer_start()
