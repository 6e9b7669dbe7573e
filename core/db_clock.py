"""The one clock that every due time is set and judged on: the database's. Hosts' wall clocks
drift apart; a host whose clock runs ahead would otherwise take leases still held, send retries
and scheduled deliveries early and sweep messages that are not lost, and an API host 30 s ahead
would queue at once a `send_at` still 20 s away.

Two ways onto that clock, each where it costs nothing:

- In SQL, `db_now()` (`Now()`): leases, retries, deferrals, the relay's due check, the
  sweeper's staleness, held provider events and the give-up and disable checks of provider
  events and webhooks are compared and written in the statement that needs them, with no
  extra round trip.
- In Python, `now()`: the accept path (and the relay's fan-out of a topic) routes in Python
  before its one write: `send_at` against now, an escalation step's deadline, a digest window's
  end, quiet hours on the recipient's wall clock, which a CASE in the INSERT could not read.
  A `SELECT now()` per request would add a round trip to the hot path, so each process keeps
  an estimate instead, NTP-style: it reads the database's clock (several samples, the one with
  the shortest round trip kept) as an API server starts, or on first use in any other
  process, then every DB_CLOCK_REFRESH_SECONDS from a thread of its own, off the request
  path, and counts forward from that reading on the monotonic clock. The error is at most
  half that round trip plus the monotonic clock's drift since the reading (parts per
  million), and this host's wall clock, stepped or skewed, plays no part. On SQLite (the
  embedded default) the database is a file on this host and its clock is this host's:
  `now()` is `timezone.now()`.

Timestamps that only record when something happened here (sent_at, updated_at, an attempt's
start, a status event's time) stay on the host's clock; docs/operations.md ("Clocks") lists
what is on which."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.models import DateTimeField, ExpressionWrapper
from django.db.models.functions import Now
from django.utils import timezone

log = logging.getLogger(__name__)

# Readings per measurement; the one with the shortest round trip bounds the error best.
SAMPLES = 3
# A database that does not answer a connection within this is down for the caller too.
CONNECT_TIMEOUT_SECONDS = 5


def db_now() -> Now:
    """The database's time when the statement runs (PostgreSQL STATEMENT_TIMESTAMP(); SQLite
    STRFTIME('%Y-%m-%d %H:%M:%f', 'NOW'))."""
    return Now()


def db_now_plus(seconds: float) -> ExpressionWrapper:
    """The database's time `seconds` from when the statement runs (negative: ago)."""
    return ExpressionWrapper(Now() + timedelta(seconds=seconds), output_field=DateTimeField())


@dataclass(frozen=True)
class Reading:
    """The database's clock read once: its time at `monotonic` on this host's monotonic clock,
    within `error` seconds; `offset` is how far it was ahead of this host's wall clock."""

    database: datetime
    monotonic: float
    error: float
    offset: float

    def now(self) -> datetime:
        return self.database + timedelta(seconds=time.monotonic() - self.monotonic)


_lock = threading.Lock()
_reading: Reading | None = None
# The process whose refresher thread is running: a forked child (a Celery pool process) keeps
# the parent's reading, which the shared monotonic clock keeps valid, but not its thread.
_refreshing_in: int | None = None


def _after_fork_in_child() -> None:
    # The parent's thread may have held the lock when it forked; that thread is gone here.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def now() -> datetime:
    """The database's time now, as this process estimates it (see the module): for due times
    computed in Python. No round trip, but the first call of a process measures."""
    if connections[DEFAULT_DB_ALIAS].vendor != "postgresql":
        return timezone.now()
    reading = _reading
    if reading is None or _refreshing_in != os.getpid():
        reading = _start()
    return reading.now()


def read_in_background() -> None:
    """Take the first reading now, off any request: what a server process calls as it starts,
    so its first request finds one (a request that comes sooner waits for it)."""
    if connections[DEFAULT_DB_ALIAS].vendor == "postgresql":
        threading.Thread(target=_start, name="db-clock-first", daemon=True).start()


def reading() -> Reading | None:
    """The current reading (None before the first measurement, and on SQLite)."""
    return _reading


def _start() -> Reading:
    """Measure now if this process has no reading yet, and start its refresher thread."""
    global _reading, _refreshing_in
    with _lock:
        if _reading is None:
            try:
                _reading = measure()
                _log_offset(None, _reading)
            except (psycopg.Error, OSError) as exc:
                # The caller's own statement will meet the same outage; until the refresher
                # reads the clock, this host's stands in.
                log.warning("database clock unreadable, using this host's for now: %s", exc)
                _reading = Reading(timezone.now(), time.monotonic(), math.inf, 0.0)
        if _refreshing_in != os.getpid():
            _refreshing_in = os.getpid()
            threading.Thread(target=_refresh_forever, name="db-clock", daemon=True).start()
        return _reading


def measure() -> Reading:
    """Read the database's clock SAMPLES times on a connection of its own (not the caller's:
    no statement joins its transaction or its query count, no pool slot is taken); keep the
    reading with the shortest round trip."""
    params = connections[DEFAULT_DB_ALIAS].get_connection_params()
    best: Reading | None = None
    with psycopg.connect(
        **params, connect_timeout=CONNECT_TIMEOUT_SECONDS, autocommit=True
    ) as conn:
        for _ in range(SAMPLES):
            wall, sent = time.time(), time.monotonic()
            # clock_timestamp(): the clock itself, not the transaction's or statement's start.
            row = conn.execute("SELECT clock_timestamp()").fetchone()
            half = (time.monotonic() - sent) / 2
            if row is None:
                raise psycopg.DataError("SELECT clock_timestamp() returned no row")
            database = row[0].astimezone(UTC)
            if best is None or half < best.error:
                offset = database.timestamp() - (wall + half)
                best = Reading(database, sent + half, half, offset)
    if best is None:
        raise psycopg.DataError("no reading of the database's clock")
    return best


def _refresh_forever() -> None:
    global _reading
    while True:
        unmeasured = _reading is None or math.isinf(_reading.error)
        # After a failed first reading, try again soon; else at the configured pace.
        time.sleep(1.0 if unmeasured else settings.DB_CLOCK_REFRESH_SECONDS)
        try:
            fresh = measure()
        except (psycopg.Error, OSError) as exc:
            log.warning("database clock not refreshed, keeping the last reading: %s", exc)
            continue
        previous, _reading = _reading, fresh
        _log_offset(previous, fresh)


def _log_offset(previous: Reading | None, fresh: Reading) -> None:
    """Say once when this host's wall clock strays DB_CLOCK_WARN_SECONDS or more from the
    database's: due times are safe, but its logs' and stamps' times are off by as much."""
    warn = settings.DB_CLOCK_WARN_SECONDS
    if previous is not None and math.isinf(previous.error):
        previous = None  # the stand-in after a failed first reading
    if previous is None:
        log.info(
            "database clock read: %+.3f s from this host's wall clock (within %.4f s)",
            fresh.offset,
            fresh.error,
        )
    if abs(fresh.offset) >= warn and (previous is None or abs(previous.offset) < warn):
        log.warning(
            "this host's wall clock is %.3f s %s the database's: due times follow the "
            "database's; check this host's time synchronisation",
            abs(fresh.offset),
            "behind" if fresh.offset > 0 else "ahead of",
        )
