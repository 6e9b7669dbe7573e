"""A worker's stall watchdog: finds a consumer that stopped taking messages while its queue
holds them (the family of Celery/kombu stalls after a broker reconnect, celery #8082, #9054,
#10205, #10302) or an event loop that stopped turning, and heals it without a person.

A thread of its own, not the event loop, does the looking, so that a loop blocked on a
socket cannot hide its own stall. Every WORKER_STALL_SECONDS / 6 it reads the depth of the
worker's queues through a connection of its own. The worker is stalled when, for
WORKER_STALL_SECONDS on end, its queues held messages, it had room for more (fewer messages
reserved than its prefetch allows) and it received none. Then:

1. the consumer reconnects: the next turn of the event loop raises a connection error, and
   Celery's consumer does what it does when the broker drops it (closes the connection, puts
   back what it had prefetched, connects and consumes anew);
2. if that did not help within WORKER_STALL_SECONDS more, or if the event loop has not turned
   for WORKER_STALL_SECONDS at all, the process exits (status 70) so that its supervisor
   (compose's restart policy, systemd, Kubernetes) starts a fresh one. Nothing is lost: every
   delivery is a database row, and the sweeper hands back what the dead process held.

Each action is logged, counted in clarion_worker_stalls_total and shown by the
ClarionWorkerStalled alert; clarion_worker_stalled is 1 while a stall lasts, and the worker's
/healthz (workers/liveness.py) answers 503 meanwhile, as it does while the event loop is
blocked or the broker has not been reached for WORKER_STALL_SECONDS."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import bootsteps
from celery.signals import task_received
from celery.worker import state as worker_state
from django.conf import settings

from core import metrics
from workers.liveness import liveness_check_register
from workers.selectors import queue_depths

log = logging.getLogger(__name__)

# The status a worker exits with when it gives up on itself (EX_SOFTWARE).
EXIT_STATUS = 70
# How often the thread looks, as a share of WORKER_STALL_SECONDS: a stall is acted on within
# WORKER_STALL_SECONDS plus one look (5 s at the default). A look is one Redis round trip on a
# connection the thread keeps.
LOOKS_PER_PERIOD = 12


class ConsumerStalled(ConnectionError):
    """Raised on the event loop to make Celery's consumer reconnect. A ConnectionError (an
    OSError) is one of every kombu transport's connection errors, so the consumer treats it
    as a lost broker connection."""


@dataclass
class Watch:
    """What the watchdog knows of its worker; written by the event loop, the task_received
    signal and the watchdog thread. Times are monotonic."""

    stall_seconds: float
    queues: list[str] = field(default_factory=list)
    prefetch: Callable[[], int] = lambda: 0
    last_received: float = field(default_factory=time.monotonic)
    last_tick: float = field(default_factory=time.monotonic)
    # Since when the queues have held messages while the worker had room and received none.
    waiting_since: float | None = None
    # Whether a silent event loop is a stall: with the prefork pool the loop only dispatches,
    # while a solo or threads pool runs tasks on it (and a long task is not a stall).
    loop_checked: bool = True
    reconnect_requested: bool = False
    reconnected_at: float | None = None
    stalled: bool = False
    # The last look that reached the broker.
    broker_seen: float = field(default_factory=time.monotonic)

    def received(self) -> None:
        self.last_received = time.monotonic()
        self.waiting_since = None
        if self.stalled:
            log.warning("worker on %s consumes again", ",".join(self.queues))
            self._recovered()

    def tick(self) -> None:
        """The event loop turned. Raises ConsumerStalled when a reconnect is due."""
        self.last_tick = time.monotonic()
        if self.reconnect_requested:
            self.reconnect_requested = False
            raise ConsumerStalled(
                f"no message taken from {','.join(self.queues)} for {self.stall_seconds:.0f}s "
                "while it held some: reconnecting"
            )

    def look(self, depth: int | None, *, now: float | None = None) -> str | None:
        """One look: `depth` is what the queues hold (None: the broker did not answer).
        Returns the action to take ("reconnect" or "exit"), if any."""
        now = time.monotonic() if now is None else now
        if depth is None:
            # The broker does not answer this thread either: an outage, not a stall, and the
            # consumer's own reconnect loop (which keeps the event loop from turning) is the
            # remedy.
            return None
        self.broker_seen = now
        if self.loop_checked and now - self.last_tick > self.stall_seconds:
            return "exit"
        prefetch = self.prefetch()
        has_room = prefetch <= 0 or len(worker_state.reserved_requests) < prefetch
        if not depth or not has_room:
            self.waiting_since = None
            if not depth and self.stalled:
                # The queue drained (other workers took it); nothing to judge this one by.
                self._recovered()
            return None
        if self.waiting_since is None:
            self.waiting_since = now
        if now - self.waiting_since < self.stall_seconds:
            return None
        if now - self.last_received < self.stall_seconds:
            return None
        if self.reconnected_at is None:
            self.stalled = True
            self.reconnected_at = now
            return "reconnect"
        if now - self.reconnected_at >= self.stall_seconds:
            return "exit"
        return None

    def problem(self, *, now: float | None = None) -> str | None:
        """What keeps this worker from its work now, for its liveness check (/healthz)."""
        now = time.monotonic() if now is None else now
        queues = ",".join(self.queues)
        if self.stalled:
            return f"consumer on {queues} stalled: took no waiting message"
        if self.loop_checked and now - self.last_tick > self.stall_seconds:
            return f"event loop has not turned for {now - self.last_tick:.0f}s"
        if now - self.broker_seen > self.stall_seconds:
            return f"broker not reached for {now - self.broker_seen:.0f}s"
        return None

    def _recovered(self) -> None:
        self.stalled = False
        self.reconnected_at = None
        metrics.worker_stalled(queues=self.queues, stalled=False)


WATCH: Watch | None = None
SWEEP_TASK = "clarion.sweep_deliveries"


def sweep_soon(app: Any) -> None:
    """Ask for a sweep once a delivery lost just now counts as lost (SWEEPER_LOST_SECONDS)."""
    try:
        app.send_task(
            SWEEP_TASK,
            queue="maintenance",
            countdown=settings.SWEEPER_LOST_SECONDS + 1,
            retry=False,
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure: the schedule sweeps anyway
        log.warning("could not ask for a sweep after a reconnect: %s", exc)


@task_received.connect
def _task_received(**kwargs: object) -> None:
    if WATCH is not None:
        WATCH.received()


class StallWatchdog(bootsteps.StartStopStep):
    """The consumer's bootstep: a timer on the event loop that marks each turn and carries out
    a requested reconnect, and (once per process) the thread that looks."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        self.enabled = settings.WORKER_STALL_SECONDS > 0 and consumer.hub is not None
        self.timer_entry: Any = None

    def start(self, consumer: Any) -> None:
        global WATCH
        stall = settings.WORKER_STALL_SECONDS
        if WATCH is not None:
            # A restart: the consumer lost its connection. A message it had just taken off
            # the queue (BRPOP) but not yet recorded as unacknowledged is gone with it (kombu's
            # Redis transport does the two in separate commands), so a sweep shortly after
            # finds such deliveries, instead of the next scheduled one up to
            # SWEEPER_INTERVAL_SECONDS later.
            sweep_soon(consumer.app)
        else:
            WATCH = Watch(stall_seconds=stall)
            thread = threading.Thread(
                target=_watch_forever,
                args=(WATCH, consumer.app),
                name="stall-watchdog",
                daemon=True,
            )
            WATCH.queues = sorted(q.name for q in consumer.task_consumer.queues)
            liveness_check_register(WATCH.problem)
            metrics.worker_stalls_known(queues=WATCH.queues)
            thread.start()
            log.info(
                "stall watchdog on %s: reconnects after %.0fs without taking a waiting message",
                ",".join(WATCH.queues),
                stall,
            )
        WATCH.queues = sorted(q.name for q in consumer.task_consumer.queues)
        WATCH.prefetch = lambda: int(consumer.qos.value or 0)
        WATCH.loop_checked = type(consumer.pool).__module__ == "celery.concurrency.prefork"
        WATCH.tick()
        # As often as the thread looks: a requested reconnect waits at most one look.
        self.timer_entry = consumer.timer.call_repeatedly(stall / LOOKS_PER_PERIOD, WATCH.tick)

    def stop(self, consumer: Any) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None

    def shutdown(self, consumer: Any) -> None:
        self.stop(consumer)


def _watch_forever(watch: Watch, app: Any) -> None:
    interval = watch.stall_seconds / LOOKS_PER_PERIOD
    # The thread's own connection, with the broker transport's timeouts: it is not the
    # consumer's, so it can tell a consumer that stopped from a broker that did.
    connection = app.connection_for_read()
    while True:
        time.sleep(interval)
        try:
            depth: int | None = sum(queue_depths(watch.queues, connection=connection).values())
        except Exception as exc:  # noqa: BLE001 - any broker failure: this look cannot judge
            log.debug("stall watchdog: queue depth unavailable: %s", exc)
            depth = None
            connection.close()
            connection = app.connection_for_read()
        action = watch.look(depth)
        if action == "reconnect":
            log.error(
                "worker on %s took no message for %.0fs while its queue held %s and it had "
                "room: reconnecting its consumer",
                ",".join(watch.queues),
                watch.stall_seconds,
                depth,
            )
            metrics.worker_stall(queues=watch.queues, action="reconnect")
            metrics.worker_stalled(queues=watch.queues, stalled=True)
            watch.reconnect_requested = True
        elif action == "exit":
            blocked = time.monotonic() - watch.last_tick
            reason = (
                f"its event loop has not turned for {blocked:.0f}s"
                if blocked > watch.stall_seconds
                else "reconnecting did not help"
            )
            log.critical(
                "worker on %s is stalled and %s: exiting for its supervisor to start it again",
                ",".join(watch.queues),
                reason,
            )
            metrics.worker_stall(queues=watch.queues, action="exit")
            _exit()


def _exit() -> None:
    """Leave at once: the event loop cannot be trusted to shut down. Pool children go first,
    so that none is left running without its parent."""
    me = os.getpid()
    try:
        children = Path(f"/proc/{me}/task/{me}/children").read_text().split()
    except OSError:
        children = []
    for pid in children:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    logging.shutdown()
    os._exit(EXIT_STATUS)
