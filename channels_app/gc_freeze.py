"""Keeps the WebSocket server's long-lived objects out of Python's full garbage collections,
which were the p99 tail of live delivery (0.4 s pauses at 2,000 open sockets, 1.6 s at
10,000), and collects what that keeps alive on a fixed, logged schedule instead."""

from __future__ import annotations

import functools
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
    # Objects frozen so far (those that died frozen included, until a full collection).
    frozen: int = 0
    # Frozen objects and time at the first freeze or the last full collection.
    frozen_since: int | None = None
    collected_at: float = 0.0

    def tick(self, now: float) -> tuple[int, float] | None:
        """Freeze what is alive now; run the full collection when it is due. Returns that
        collection's (unreachable objects, seconds), or None when it did not run."""
        # A young collection first (cheap: it scans only what was born since the last one), so
        # cycles that are already garbage are freed now rather than frozen for minutes.
        gc.collect(1)
        # What the young collection left is all in the oldest generation now: the objects this
        # freeze adds. Counted there, not with gc.get_freeze_count(), which walks every frozen
        # object (at 10,000 sockets that walk was a third of the idle server's CPU).
        self.frozen += len(gc.get_objects(generation=2))
        gc.freeze()
        frozen = self.frozen
        if self.frozen_since is None:
            self.frozen_since, self.collected_at = frozen, now
            log.info("gc: %d objects frozen after warm-up", frozen)
            return None
        grown = frozen - self.frozen_since
        # Each trigger is off at 0 (the default: closed sockets free themselves, see
        # connection_cycles_break; make bench's soak shows memory levelling off without any).
        by_time = (
            self.full_collect_seconds > 0
            and now - self.collected_at >= self.full_collect_seconds
            and grown >= self.full_collect_min_growth
        )
        by_growth = self.full_collect_growth > 0 and grown > self.full_collect_growth
        if not (by_time or by_growth):
            return None
        result = gc_collect_frozen()
        # Once per full collection, which walks every object anyway.
        self.frozen = gc.get_freeze_count()
        self.frozen_since, self.collected_at = self.frozen, now
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
        "gc: freezing every %s s; full collections: %s",
        interval,
        " or ".join(
            [f"every {freezer.full_collect_seconds} s"] * (freezer.full_collect_seconds > 0)
            + [f"after {freezer.full_collect_growth} new frozen objects"]
            * (freezer.full_collect_growth > 0)
        )
        or "none",
    )
    return thread


def gc_freezer_start_in_server() -> threading.Thread | None:
    """What the ASGI entry calls: start the freezer in a server process, and only there."""
    if not asgi_server_process():
        return None
    connection_cycles_break()
    return gc_freezer_start()


def connection_cycles_break() -> None:
    """Make uvicorn let go of a WebSocket connection by reference counting once it closed.

    Two reference cycles outlived every closed socket, freed only by a full collection, which
    a frozen heap does not run (the WebSocket soak kept 37 KiB per closed socket, its
    compression contexts mostly, and grew without bound):

    - uvicorn's httptools protocol and its parser, which calls back into it through bound
      methods; through the protocol's transport the cycle held the upgraded connection;
    - the websockets library's protocol object and the parser generator it keeps running,
      whose frame refers back to it.

    Each is cut where its owner is done with it: the HTTP parser once the connection changed
    protocols, the WebSocket parser once the connection is lost."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn runs h11, which keeps no such cycle
        pass
    else:
        upgrade = HttpToolsProtocol.handle_websocket_upgrade
        if not getattr(upgrade, "breaks_cycle", False):

            @functools.wraps(upgrade)
            def handle_websocket_upgrade(self: HttpToolsProtocol) -> None:
                upgrade(self)
                # The transport now feeds the WebSocket protocol.
                self.parser = None  # type: ignore[assignment]

            handle_websocket_upgrade.breaks_cycle = True  # type: ignore[attr-defined]
            HttpToolsProtocol.handle_websocket_upgrade = handle_websocket_upgrade  # type: ignore[method-assign]

    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    lost = WebSocketsSansIOProtocol.connection_lost
    if not getattr(lost, "breaks_cycle", False):

        @functools.wraps(lost)
        def connection_lost(self: WebSocketsSansIOProtocol, exc: Exception | None) -> None:
            lost(self, exc)
            # Nothing feeds this connection any more; sends do not use the parser.
            self.conn.parser = None  # type: ignore[assignment]

        connection_lost.breaks_cycle = True  # type: ignore[attr-defined]
        WebSocketsSansIOProtocol.connection_lost = connection_lost  # type: ignore[method-assign]
