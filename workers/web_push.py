"""In-app deliveries due at accept go out from the process that committed them: no trip
through the relay, the broker and a `web` worker's task before the frame reaches the channel
layer. After the accept's commit, its web delivery ids are handed to this process's pusher
thread, which runs the worker's own batch path on them (workers.services.deliveries_process:
lease, publish, settle, events, webhooks, metrics), so a frame pushed here is recorded
exactly as one pushed by a worker.

The accept writes these rows already marked published (enqueued_at), so the relay leaves
them alone. Nothing is lost if the push never happens (the process dies after its commit, the
pusher fails): such a row is queued, unleased and published with no message in any queue,
which is what the sweeper hands back to the relay within SWEEPER_LOST_SECONDS; a publish the
channel layer refuses is retried by the usual retry path. The relay and the `web` pool stay
the path of scheduled, held, retried, escalated and digested deliveries."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterable

from django.conf import settings
from django.db import close_old_connections

log = logging.getLogger(__name__)


class _Pusher:
    """A daemon thread of one process taking batches of web delivery ids, in order."""

    def __init__(self) -> None:
        # A forked child (a Celery prefork pool) has no copy of this thread: it starts anew.
        self.pid = os.getpid()
        self.ids: queue.SimpleQueue[int] = queue.SimpleQueue()
        # Ids handed over and not yet through deliveries_process (see drain()).
        self.unfinished = 0
        self.idle = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="clarion-web-push", daemon=True)
        self.thread.start()

    def submit(self, delivery_ids: Iterable[int]) -> None:
        ids = list(delivery_ids)
        with self.idle:
            self.unfinished += len(ids)
        for pk in ids:
            self.ids.put(pk)

    def drain(self, timeout: float) -> bool:
        """Wait until every id handed over so far went through; False after `timeout`."""
        with self.idle:
            return self.idle.wait_for(lambda: self.unfinished == 0, timeout)

    def _run(self) -> None:
        from workers import services

        while True:
            batch = [self.ids.get()]
            # What came meanwhile goes in the same batch: one lease, one round of publishes,
            # one settle for all of it.
            while len(batch) < settings.DISPATCH_BATCH_SIZE:
                try:
                    batch.append(self.ids.get_nowait())
                except queue.Empty:
                    break
            try:
                services.deliveries_process(delivery_ids=sorted(batch))
            except Exception:
                # The rows stay queued and published: the sweeper hands them to the relay.
                log.exception(
                    "pushing %d in-app deliveries failed; the relay takes them", len(batch)
                )
            finally:
                close_old_connections()
                with self.idle:
                    self.unfinished -= len(batch)
                    if not self.unfinished:
                        self.idle.notify_all()


_pusher: _Pusher | None = None
_lock = threading.Lock()


def _this_process_pusher() -> _Pusher:
    global _pusher
    pusher = _pusher
    if pusher is not None and pusher.pid == os.getpid():
        return pusher
    with _lock:
        if _pusher is None or _pusher.pid != os.getpid():
            _pusher = _Pusher()
        return _pusher


def _renew_lock_after_fork() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_lock_after_fork)


def web_push_soon(delivery_ids: list[int]) -> None:
    """Push these web deliveries from this process now (committed ones: a socket found them
    unpushed in its recipient's inbox); those not due or leased elsewhere are left alone."""
    if delivery_ids:
        _this_process_pusher().submit(delivery_ids)


def web_push_drain(timeout: float = 10.0) -> bool:
    """Wait for this process's pushes handed over so far (tests, before their database is
    emptied); True when there is nothing left to push."""
    pusher = _pusher
    if pusher is None or pusher.pid != os.getpid():
        return True
    return pusher.drain(timeout)
