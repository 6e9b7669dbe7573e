"""Prometheus counters that every layer (API, services, workers, consumers) writes to,
file-backed in PROMETHEUS_MULTIPROC_DIR so that a scrape adds them up across processes. It
imports nothing of Clarion's, so any module may import it; the scrape side, which reads across
layers, is notifications.metrics_scrape."""

from __future__ import annotations

import atexit
import logging
import os
import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, values
from prometheus_client.core import Metric

log = logging.getLogger(__name__)

# settings sets PROMETHEUS_MULTIPROC_DIR before anything imports prometheus_client; should a
# library have imported it earlier, the metrics below must still be file-backed, or each
# process would count on its own and /metrics would show only the API's share.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and not getattr(
    values.ValueClass, "_multiprocess", False
):
    values.ValueClass = values.get_value_class()

PREFIX = "clarion_"

API_REQUESTS = Counter(
    "clarion_api_requests_total",
    "HTTP requests answered by the API, by URL pattern, method and status.",
    ["route", "method", "status"],
)
API_REQUEST_DURATION = Histogram(
    "clarion_api_request_duration_seconds",
    "Time to answer an HTTP request, by URL pattern and method.",
    ["route", "method"],
)
NOTIFICATIONS_ACCEPTED = Counter(
    "clarion_notifications_accepted_total",
    "Deliveries queued or scheduled when their notification was accepted, per channel.",
    ["channel"],
)
DELIVERIES = Counter(
    "clarion_deliveries_total",
    "Worker outcomes of delivery attempts: sent, retried, dead, deferred (no token, "
    "breaker open; no attempt spent), or skipped (address suppressed since acceptance).",
    ["channel", "provider", "outcome"],
)
DELIVERY_LATENCY = Histogram(
    "clarion_delivery_latency_seconds",
    "From acceptance (or send_at, when scheduled) to the provider accepting the delivery.",
    ["channel"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
RATE_LIMITER_WAITS = Counter(
    "clarion_rate_limiter_waits_total",
    "Deliveries that slept for a rate-limit token or were deferred for lack of one.",
    ["channel", "provider"],
)
RELAY_PUBLISHED = Counter(
    "clarion_relay_published_total",
    "Deliveries the outbox relay handed to the broker, per channel.",
    ["channel"],
)
RELAY_MESSAGES = Counter(
    "clarion_relay_messages_total",
    "Broker messages (one per batch of deliveries) the outbox relay published, per channel.",
    ["channel"],
)
RELAY_LAG = Histogram(
    "clarion_relay_lag_seconds",
    "From a delivery becoming due (its commit, or its due time) to the relay publishing it.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
WEBSOCKET_CONNECTIONS = Gauge(
    "clarion_websocket_connections",
    "Open WebSocket connections, summed over the live server processes.",
    multiprocess_mode="livesum",
)
WEBSOCKET_FRAMES_PUSHED = Counter(
    "clarion_websocket_frames_pushed_total",
    "Notification frames sent to a WebSocket (live or from the backlog).",
)
WEBSOCKET_INBOX_BATCH = Histogram(
    "clarion_websocket_inbox_batch_entries",
    "Acks or reads a server process gathered and wrote in one statement (kind: ack, read).",
    ["kind"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
WEBSOCKET_INBOX_PENDING = Gauge(
    "clarion_websocket_inbox_pending",
    "Acks and reads received and not yet written, summed over the live server processes.",
    multiprocess_mode="livesum",
)
WEBSOCKET_SEND_QUEUE = Gauge(
    "clarion_websocket_send_queue",
    "Messages a server process's channel layer handed to its sockets and they have not taken "
    "yet (frames waiting their turn), per live process, sampled every second.",
    multiprocess_mode="liveall",
)
WEBSOCKET_INBOX_WRITE_FAILURES = Counter(
    "clarion_websocket_inbox_write_failures_total",
    "Batches of acks and reads the database refused (kept and tried again).",
)
WEBSOCKET_LAYER_RECONNECTS = Counter(
    "clarion_websocket_layer_reconnects_total",
    "Times a server process's channel layer subscription was lost and came back (its sockets "
    "then fetched what they missed from the database).",
)
WORKER_STALLS = Counter(
    "clarion_worker_stalls_total",
    "Times a worker's stall watchdog acted: its queue held messages and it, with room for "
    "more, took none for WORKER_STALL_SECONDS (action: reconnect, or exit for a restart).",
    ["queue", "action"],
)
WORKER_STALLED = Gauge(
    "clarion_worker_stalled",
    "1 while a worker on the queue is stalled (from its watchdog's first action until it "
    "takes a message again, or exits).",
    ["queue"],
    multiprocess_mode="livemax",
)

OUTCOME_SENT = "sent"
OUTCOME_RETRIED = "retried"
OUTCOME_DEAD = "dead"
OUTCOME_DEFERRED = "deferred"
OUTCOME_SKIPPED = "skipped"


# --- Recording ------------------------------------------------------------------------------


def api_request_observed(*, route: str, method: str, status: int, seconds: float) -> None:
    API_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
    API_REQUEST_DURATION.labels(route=route, method=method).observe(seconds)


def notifications_accepted_on_commit(channels: Iterable[str]) -> None:
    """Count deliveries accepted in the current transaction once it commits (a rolled-back
    acceptance accepted nothing)."""
    wanted = list(channels)
    if wanted:
        transaction.on_commit(lambda: _count_accepted(wanted))


def _count_accepted(channels: list[str]) -> None:
    for channel in channels:
        NOTIFICATIONS_ACCEPTED.labels(channel=channel).inc()


def delivery_outcome(*, channel: str, provider: str, outcome: str) -> None:
    DELIVERIES.labels(channel=channel, provider=provider or "none", outcome=outcome).inc()


def delivery_sent_latency(*, channel: str, accepted_at: datetime, send_at: datetime | None) -> None:
    # A scheduled notification is not late while it waits for its send_at.
    start = send_at if send_at is not None and send_at > accepted_at else accepted_at
    seconds = max(0.0, (timezone.now() - start).total_seconds())
    DELIVERY_LATENCY.labels(channel=channel).observe(seconds)


def rate_limiter_waited(*, channel: str, provider: str, count: int = 1) -> None:
    RATE_LIMITER_WAITS.labels(channel=channel, provider=provider or "none").inc(count)


def relay_published(*, channel: str, deliveries: int, messages: int) -> None:
    RELAY_PUBLISHED.labels(channel=channel).inc(deliveries)
    RELAY_MESSAGES.labels(channel=channel).inc(messages)


def relay_lag(*, seconds: Iterable[float]) -> None:
    for value in seconds:
        RELAY_LAG.observe(max(0.0, value))


WORKER_STALL_ACTIONS = ("reconnect", "exit")


def worker_stalls_known(*, queues: Iterable[str]) -> None:
    """Export the stall counters at 0 from a worker's start: Prometheus' increase() does not
    count a series' first sample, so a counter that appeared at 1 would never alert."""
    for queue in queues:
        for action in WORKER_STALL_ACTIONS:
            WORKER_STALLS.labels(queue=queue, action=action)
        WORKER_STALLED.labels(queue=queue).set(0)


def worker_stall(*, queues: Iterable[str], action: str) -> None:
    for queue in queues:
        WORKER_STALLS.labels(queue=queue, action=action).inc()


def worker_stalled(*, queues: Iterable[str], stalled: bool) -> None:
    for queue in queues:
        WORKER_STALLED.labels(queue=queue).set(1 if stalled else 0)


def websocket_connection_opened() -> None:
    WEBSOCKET_CONNECTIONS.inc()


def websocket_connection_closed() -> None:
    WEBSOCKET_CONNECTIONS.dec()


def websocket_frame_pushed() -> None:
    WEBSOCKET_FRAMES_PUSHED.inc()


def websocket_inbox_written(*, kind: str, entries: int) -> None:
    WEBSOCKET_INBOX_BATCH.labels(kind=kind).observe(entries)


def websocket_inbox_pending(count: int) -> None:
    WEBSOCKET_INBOX_PENDING.set(count)


def websocket_inbox_write_failed() -> None:
    WEBSOCKET_INBOX_WRITE_FAILURES.inc()


def websocket_send_queue(depth: int) -> None:
    WEBSOCKET_SEND_QUEUE.set(depth)


def websocket_layer_reconnected() -> None:
    WEBSOCKET_LAYER_RECONNECTS.inc()


# --- The multiprocess directory -------------------------------------------------------------

_PID_FILE = re.compile(r"^gauge_live\w*_(\d+)\.db$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def multiprocess_dir_cleanup() -> list[int]:
    """Drop the live-gauge files of processes that are gone (killed without a clean exit), so
    `livesum` gauges stop counting them; returns their pids. Counter and histogram files stay:
    removing them would make totals go backwards. Pids are this host's, so the directory must
    not be shared between hosts or containers."""
    directory = Path(settings.PROMETHEUS_MULTIPROC_DIR)
    dead = set()
    for path in directory.glob("gauge_live*_*.db"):
        match = _PID_FILE.match(path.name)
        if match and not _pid_alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(directory))
    return sorted(dead)


def process_exited(pid: int) -> None:
    """A process of this host is gone: its live gauges stop counting."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        multiprocess.mark_process_dead(pid, directory)


# A process that exits normally (an API server stopped) stops counting at once; a Celery pool
# child does it in worker_process_shutdown; one killed is caught by multiprocess_dir_cleanup.
atexit.register(lambda: process_exited(os.getpid()))


class ClarionMultiProcessCollector(multiprocess.MultiProcessCollector):
    """The directory's metrics summed over processes, Clarion's only: other libraries in the
    same processes (Flower) write there too and serve their own."""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            if metric.name.startswith(PREFIX):
                yield metric


def multiprocess_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ClarionMultiProcessCollector(registry, path=settings.PROMETHEUS_MULTIPROC_DIR)
    return registry
