"""The outbox relay: the one process kind that publishes deliveries. It claims due rows of the
outbox (Delivery.enqueued_at NULL: new, retrying, deferred, and scheduled ones once due),
publishes one task per batch of ids of a channel in one broker round trip, and marks them
published in the same transaction. It also fans out topic notifications, a chunk of
subscribers per round (workers/fanout.py), publishing the children due now with the
chunk that writes them. It wakes on the signal writers send at
commit, or after RELAY_POLL_SECONDS, or when the next row falls due, whichever comes first.

Several relays may run: on PostgreSQL each claims with FOR UPDATE SKIP LOCKED, so they take
disjoint rows. A crash between publish and commit leaves the rows in the outbox, to be
published again: a duplicate message, which the worker's lease turns into a no-op."""

from __future__ import annotations

import functools
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

import redis
from django.conf import settings
from django.db import DatabaseError, close_old_connections, transaction
from django.db.models import DurationField, ExpressionWrapper, F, Min
from django.utils import timezone
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from core import db_clock, metrics
from core.db_clock import db_now
from core.outbox import RELAY_WAKE_KEY
from notifications.models import Delivery, DeliveryStatus
from workers import digests, transitions
from workers.fanout import topic_fanout_step
from workers.liveness import liveness_check_register, liveness_server_start

log = logging.getLogger(__name__)

# After a failed round (broker or database down) the relay waits this long, doubling up to
# the maximum, rather than spinning on an outage.
FAILURE_BACKOFF_SECONDS = 0.5
FAILURE_BACKOFF_MAX_SECONDS = 5.0


def outbox_publish_due(*, limit: int | None = None) -> int:
    """One round: claim up to `limit` due outbox rows, publish them in batches, mark them
    published; all or nothing. Scheduled rows due are released (an escalation no longer
    needed is cancelled instead) and due digest members are flushed into their digest.
    Returns how many outbox rows it handled.

    Due, and the published mark the sweeper reads, are by the database's clock: a relay
    whose own clock runs ahead must not release retries, scheduled sends, escalation steps or
    digests early. This host's `now` only stamps updated_at."""
    now = timezone.now()
    limit = limit or settings.RELAY_CLAIM_SIZE
    with transaction.atomic():
        rows = list(
            Delivery.objects.outbox()
            .due()
            .order_by("id")
            .select_for_update(skip_locked=True)
            .values_list("id", "channel", "status", "created_at", "next_attempt_at", "digest_key")[
                :limit
            ]
        )
        if not rows:
            return 0
        claimed = len(rows)
        scheduled = [row for row in rows if row[2] == DeliveryStatus.SCHEDULED]
        digested = {row[0] for row in scheduled if row[5]}
        not_needed = transitions.deliveries_release_due(
            delivery_ids=[row[0] for row in scheduled if row[0] not in digested], now=now
        )
        # Digest members are not published: their group goes out as one new delivery.
        flushed = digests.digests_flush(delivery_ids=sorted(digested), now=now)
        rows = [row for row in rows if row[0] not in not_needed and row[0] not in digested]
        # Marked and published inside this transaction: should the publish fail, the
        # rollback puts every row back in the outbox.
        published = transitions.deliveries_publish(
            [row[0] for row in rows] + [pk for ids in flushed.values() for pk in ids]
        )
    # The lag runs from a due time (the database's clock) or an accept's stamp (the API
    # host's), measured on the database's clock: a relay whose own clock is off reports no lag
    # of its own making.
    published_at = db_clock.now()
    metrics.relay_lag(
        seconds=(
            (published_at - max(created_at, next_attempt_at or created_at)).total_seconds()
            for _, _, _, created_at, next_attempt_at, _ in rows
        )
    )
    log.debug("relay published %s deliveries", sum(map(len, published.values())))
    # Escalation steps cancelled on release count as handled: the drain goes on.
    return claimed


def outbox_next_due() -> float | None:
    """Seconds until the earliest outbox row that is not due yet falls due, by the database's
    clock (as outbox_publish_due() judges due: a relay whose clock runs ahead would otherwise
    wake at once, find nothing due, and spin); None if none."""
    wait = (
        Delivery.objects.outbox()
        .filter(next_attempt_at__gt=db_now())
        .aggregate(
            wait=Min(
                ExpressionWrapper(F("next_attempt_at") - db_now(), output_field=DurationField())
            )
        )["wait"]
    )
    if wait is None:
        return None
    return max(0.0, wait.total_seconds())


class _Stopped(Exception):
    """Raised by the stop signal's handler to end a wait at once."""


class Relay:
    """The relay's loop: drain the outbox, then sleep until woken, polled, or the next due."""

    def __init__(self, *, poll_seconds: float | None = None):
        self.poll_seconds = (
            poll_seconds if poll_seconds is not None else settings.RELAY_POLL_SECONDS
        )
        self.stopping = False
        # True while it only waits (between rounds): a stop signal may cut that short.
        self.sleeping = False
        # When a round last reached the database and the broker (monotonic), and what failed
        # since: the relay's liveness (/healthz, workers/liveness.py).
        self.last_round_ok = time.monotonic()
        self.last_error = ""
        # Its own connection: a blocking pop holds it, and must outlast its own timeout.
        self.signals = redis.Redis.from_url(
            settings.REDIS_URL,
            socket_timeout=self.poll_seconds + 10,
            socket_connect_timeout=settings.REDIS_CONNECT_TIMEOUT_SECONDS,
            health_check_interval=settings.REDIS_HEALTH_CHECK_SECONDS,
        )

    def stop(self, *args: int | FrameType | None) -> None:
        self.stopping = True
        if self.sleeping:
            # Waiting for a signal (up to RELAY_POLL_SECONDS), or backing off: nothing is
            # half done, so leave at once rather than at the end of the wait.
            raise _Stopped

    def problem(self) -> str | None:
        """Rounds have failed for longer than RELAY_UNHEALTHY_SECONDS: the relay cannot reach
        the database or the broker (it keeps trying; nothing is lost meanwhile)."""
        failing_for = time.monotonic() - self.last_round_ok
        if failing_for > settings.RELAY_UNHEALTHY_SECONDS:
            return f"no relay round succeeded for {failing_for:.0f}s: {self.last_error}"
        return None

    def drain(self) -> int:
        """Publish every due row, a round of RELAY_CLAIM_SIZE at a time; between rounds, fan
        out the next chunk of a topic notification, so its children's deliveries go out while
        the fan-out goes on."""
        total = 0
        while not self.stopping:
            published = outbox_publish_due()
            total += published
            fanned_out = not self.stopping and topic_fanout_step()
            if published < settings.RELAY_CLAIM_SIZE and not fanned_out:
                break
        return total

    def wait(self) -> None:
        """Until a writer's signal, the poll interval, or the next due row."""
        timeout = self.poll_seconds
        next_due = outbox_next_due()
        if next_due is not None:
            timeout = min(timeout, next_due)
        if timeout <= 0:
            return
        try:
            # BLPOP takes fractions of a second since Redis 6; at least 10 ms.
            self._sleeping(lambda: self.signals.blpop([RELAY_WAKE_KEY], timeout=max(0.01, timeout)))
        except (RedisError, OSError) as exc:
            log.warning("relay signal unavailable, polling: %s", exc)
            self._sleeping(lambda: time.sleep(timeout))

    def _sleeping(self, wait: Callable[[], object]) -> None:
        if self.stopping:
            return
        self.sleeping = True
        try:
            wait()
        finally:
            self.sleeping = False

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        log.info(
            "relay started (poll %.2fs, batch %s)", self.poll_seconds, settings.DISPATCH_BATCH_SIZE
        )
        liveness_check_register(self.problem)
        liveness_server_start()
        backoff = FAILURE_BACKOFF_SECONDS
        try:
            while not self.stopping:
                try:
                    close_old_connections()
                    self.drain()
                    self.last_round_ok = time.monotonic()
                    if self.stopping:
                        break
                    self.wait()
                    backoff = FAILURE_BACKOFF_SECONDS
                except (DatabaseError, KombuError, OSError, RedisError) as exc:
                    # Nothing was marked published: the rows wait in the outbox for the next
                    # round.
                    self.last_error = f"{exc.__class__.__name__}: {exc}"
                    log.warning("relay round failed, retrying in %.1fs: %s", backoff, exc)
                    self._sleeping(functools.partial(time.sleep, backoff))
                    backoff = min(FAILURE_BACKOFF_MAX_SECONDS, backoff * 2)
        except _Stopped:
            pass
        log.info("relay stopped")
