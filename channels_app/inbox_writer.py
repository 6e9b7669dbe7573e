"""Acks and reads from every socket of one server process, gathered for WS_ACK_WINDOW_SECONDS
and written together (workers.transitions.inbox_record: one locking SELECT, one UPDATE,
one insert of events per kind), in a thread of their own so the event loop and the sockets'
connects never wait for them.

Nothing is lost if a batch is: an ack not written leaves its delivery `sent`, and a socket
that connects again gets every unacknowledged entry back in its backlog (clarion.js shows an
id once). A batch the database refuses is kept and tried again."""

from __future__ import annotations

import asyncio
import logging
import uuid

from django.conf import settings

from channels_app.database import in_thread_pool
from core import metrics
from workers import transitions

log = logging.getLogger(__name__)

ACK = "ack"
READ = "read"
# After a refused batch, the next try waits this long.
RETRY_SECONDS = 1.0

Entry = tuple[int, uuid.UUID]


@in_thread_pool
def _write(acks: list[Entry], reads: list[Entry]) -> tuple[int, int]:
    return transitions.inbox_record(acks=acks, reads=reads, source="websocket")


class InboxWriter:
    """The acks and reads one event loop's sockets received and not yet written."""

    def __init__(self, *, window: float, pending_max: int) -> None:
        self.window = window
        self.pending_max = pending_max
        # Insertion-ordered sets: an ack sent twice is written once.
        self.acks: dict[Entry, None] = {}
        self.reads: dict[Entry, None] = {}
        self.task: asyncio.Task[None] | None = None

    def add(self, kind: str, recipient_id: int, notification_id: uuid.UUID) -> None:
        entries = self.acks if kind == ACK else self.reads
        if len(self.acks) + len(self.reads) >= self.pending_max:
            # The database has been refusing for a while: this one is given up like a lost
            # ack (the frame comes back with the next backlog).
            log.warning("%d acks and reads wait to be written; dropping one", self.pending_max)
            return
        entries[(recipient_id, notification_id)] = None
        metrics.websocket_inbox_pending(len(self.acks) + len(self.reads))
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        wait = self.window
        while self.acks or self.reads:
            await asyncio.sleep(wait)
            wait = self.window
            acks, reads = list(self.acks), list(self.reads)
            self.acks, self.reads = {}, {}
            try:
                await _write(acks, reads)
            except Exception:
                log.exception(
                    "writing %d acks and %d reads failed; trying again", len(acks), len(reads)
                )
                metrics.websocket_inbox_write_failed()
                # Put them back in front of what came meanwhile, in their order.
                self.acks = dict.fromkeys([*acks, *self.acks])
                self.reads = dict.fromkeys([*reads, *self.reads])
                wait = RETRY_SECONDS
            else:
                for kind, written in ((ACK, acks), (READ, reads)):
                    if written:
                        metrics.websocket_inbox_written(kind=kind, entries=len(written))
            metrics.websocket_inbox_pending(len(self.acks) + len(self.reads))

    async def drain(self) -> None:
        """Wait until everything received so far is written (tests, shutdown)."""
        while self.task is not None and not self.task.done():
            await asyncio.shield(self.task)


_writers: dict[asyncio.AbstractEventLoop, InboxWriter] = {}


def inbox_writer() -> InboxWriter:
    """The writer of the running loop (one per server process; a test's loop gets its own)."""
    loop = asyncio.get_running_loop()
    writer = _writers.get(loop)
    if writer is None:
        for old in [lp for lp in _writers if lp.is_closed()]:
            del _writers[old]
        writer = _writers[loop] = InboxWriter(
            window=settings.WS_ACK_WINDOW_SECONDS, pending_max=settings.WS_ACK_PENDING_MAX
        )
    return writer
