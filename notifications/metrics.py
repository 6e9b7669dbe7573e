"""Prometheus metrics. Every process (API servers, Celery pool children) writes its counters
into the shared PROMETHEUS_MULTIPROC_DIR; GET /metrics adds them up across processes and
reads queue depth, queue lag, dead letters and breaker states when Prometheus scrapes."""

from __future__ import annotations

import atexit
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric

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
    "Worker outcomes of delivery attempts: sent, retried, dead, or deferred (no token, "
    "breaker open; no attempt spent).",
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

OUTCOME_SENT = "sent"
OUTCOME_RETRIED = "retried"
OUTCOME_DEAD = "dead"
OUTCOME_DEFERRED = "deferred"

# A circuit breaker's state as a number, so alert rules can compare it.
CIRCUIT_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


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


def websocket_connection_opened() -> None:
    WEBSOCKET_CONNECTIONS.inc()


def websocket_connection_closed() -> None:
    WEBSOCKET_CONNECTIONS.dec()


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


# --- Read at scrape time --------------------------------------------------------------------


def queue_depths() -> dict[str, int]:
    """Messages waiting on the broker in each Celery queue."""
    from project.celery import app

    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1, timeout=settings.METRICS_SOURCE_TIMEOUT_SECONDS)
        if conn.transport.driver_type == "redis":
            return _redis_queue_depths(conn.default_channel, settings.CELERY_QUEUES)
        return _amqp_queue_depths(conn, settings.CELERY_QUEUES)


def _redis_queue_depths(channel: Any, queues: Iterable[str]) -> dict[str, int]:
    # kombu's Redis transport keeps a queue as one list per priority step: the queue's name
    # for step 0, name + sep + step for the others (kombu/transport/redis.py, _q_for_pri).
    queues = list(queues)
    steps = list(channel.priority_steps)
    with channel.conn_or_acquire() as client:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            for step in steps:
                pipe.llen(f"{queue}{channel.sep}{step}" if step else queue)
        lengths = pipe.execute()
    return {
        queue: int(sum(lengths[i * len(steps) : (i + 1) * len(steps)]))
        for i, queue in enumerate(queues)
    }


def _amqp_queue_depths(conn: Any, queues: Iterable[str]) -> dict[str, int]:
    from amqp.exceptions import NotFound

    depths = {}
    for queue in queues:
        # A passive declare of a missing queue closes the channel: one channel per queue.
        channel = conn.channel()
        try:
            _, message_count, _ = channel.queue_declare(queue=queue, passive=True)
            depths[queue] = int(message_count)
        except NotFound:
            depths[queue] = 0
        finally:
            if getattr(channel, "is_open", True):
                channel.close()
    return depths


def queue_oldest_ages(*, now: datetime | None = None) -> dict[str, float]:
    """Per channel, seconds the oldest queued delivery that is due has been waiting: since it
    was enqueued, or since its next_attempt_at came. Two index seeks per channel on the
    partial index delivery_queued_lag."""
    from notifications.models import CHANNEL_ORDER, Delivery, DeliveryStatus

    now = now or timezone.now()
    queued = Delivery.objects.filter(status=DeliveryStatus.QUEUED)
    ages = {}
    for channel in CHANNEL_ORDER:
        in_channel = queued.filter(channel=channel)
        since = [
            in_channel.filter(next_attempt_at__isnull=True, enqueued_at__isnull=False)
            .order_by("enqueued_at")
            .values_list("enqueued_at", flat=True)
            .first(),
            in_channel.filter(next_attempt_at__lte=now)
            .order_by("next_attempt_at")
            .values_list("next_attempt_at", flat=True)
            .first(),
        ]
        oldest = min((s for s in since if s is not None), default=None)
        ages[channel] = max(0.0, (now - oldest).total_seconds()) if oldest else 0.0
    return ages


def dead_letters_open() -> dict[str, int]:
    from workers.dead_letters import dead_letter_counts

    return dict(dead_letter_counts()["channels"])


def circuit_states() -> dict[str, str]:
    from workers.circuit_breaker import circuit_states_present
    from workers.providers import FACTORIES

    providers = sorted({name for names in FACTORIES.values() for name in names})
    return {provider: state.value for provider, state in circuit_states_present(providers).items()}


class ScrapeTimeCollector:
    """Gauges computed when Prometheus scrapes, never stored. A source that is down (broker,
    database, Redis) is logged and left out; the rest of the scrape still answers."""

    def collect(self) -> Iterator[Metric]:
        sources: list[tuple[str, Callable[[], Metric]]] = [
            ("queue depth", self._queue_depth),
            ("queue lag", self._queue_oldest_age),
            ("dead letters", self._dead_letters),
            ("circuit breakers", self._circuits),
        ]
        for name, build in sources:
            started = time.perf_counter()
            try:
                family = build()
            # Broad on purpose: one source down must not fail the whole scrape.
            except Exception:
                log.warning("metrics: %s unavailable, left out of this scrape", name, exc_info=True)
                continue
            log.debug("metrics: %s read in %.3fs", name, time.perf_counter() - started)
            yield family

    def _queue_depth(self) -> Metric:
        family = GaugeMetricFamily(
            "clarion_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"]
        )
        for queue, depth in queue_depths().items():
            family.add_metric([queue], depth)
        return family

    def _queue_oldest_age(self) -> Metric:
        family = GaugeMetricFamily(
            "clarion_queue_oldest_age_seconds",
            "Age of the oldest queued, due delivery per channel queue (queue lag).",
            labels=["queue"],
        )
        for channel, age in queue_oldest_ages().items():
            family.add_metric([channel], age)
        return family

    def _dead_letters(self) -> Metric:
        family = GaugeMetricFamily(
            "clarion_dead_letters_open", "Open dead letters per channel.", labels=["channel"]
        )
        for channel, count in dead_letters_open().items():
            family.add_metric([channel], count)
        return family

    def _circuits(self) -> Metric:
        family = GaugeMetricFamily(
            "clarion_circuit_state",
            "Circuit breaker per provider: 0 closed, 1 half-open, 2 open.",
            labels=["provider"],
        )
        for provider, state in circuit_states().items():
            family.add_metric([provider], CIRCUIT_STATE_VALUES[state])
        return family


def multiprocess_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ClarionMultiProcessCollector(registry, path=settings.PROMETHEUS_MULTIPROC_DIR)
    return registry


def scrape_registry() -> CollectorRegistry:
    registry = multiprocess_registry()
    registry.register(ScrapeTimeCollector())
    return registry


# --- Serving --------------------------------------------------------------------------------


def metrics_allowed(ip: str) -> bool:
    """METRICS_ALLOWED_IPS: addresses or networks (CIDR); empty lets everyone scrape."""
    import ipaddress

    allowed = settings.METRICS_ALLOWED_IPS
    if not allowed:
        return True
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            log.warning("METRICS_ALLOWED_IPS entry %r is not an address or network", entry)
    return False


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    from notifications.api.errors import error_body
    from notifications.api.middleware import client_ip

    if not metrics_allowed(client_ip(request)):
        return JsonResponse(error_body("forbidden", "Not allowed to read metrics."), status=403)
    multiprocess_dir_cleanup()
    return HttpResponse(generate_latest(scrape_registry()), content_type=CONTENT_TYPE_LATEST)


def worker_metrics_server_start() -> None:
    """For a host with workers and no API server: serve this host's multiprocess directory
    (counters of every worker process here) on WORKER_METRICS_PORT. Scrape-time gauges stay
    with the API's /metrics, which reads the broker and the database for every host."""
    from prometheus_client import start_http_server

    port = settings.WORKER_METRICS_PORT
    if not port:
        return
    try:
        start_http_server(port, addr=settings.WORKER_METRICS_ADDR, registry=multiprocess_registry())
    except OSError as exc:
        # Another worker process on this host serves it already; this one still works.
        log.error("metrics server not started on port %s: %s", port, exc)
        return
    log.info("metrics served on %s:%s", settings.WORKER_METRICS_ADDR, port)
