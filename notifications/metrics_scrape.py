"""What GET /metrics answers: this host's counters (core.metrics) summed over processes,
plus gauges read across layers when Prometheus scrapes (broker queue depth, queue lag, open dead
letters, circuit breaker states)."""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from core import db_clock
from core.metrics import multiprocess_dir_cleanup, multiprocess_registry
from notifications.api.errors import error_body
from notifications.api.middleware import client_ip
from notifications.models import CHANNEL_ORDER, Delivery, DeliveryStatus
from workers.circuit_breaker import circuit_states_present
from workers.dead_letters import dead_letter_counts
from workers.providers import FACTORIES
from workers.selectors import queue_depths

log = logging.getLogger(__name__)

# A circuit breaker's state as a number, so alert rules can compare it.
CIRCUIT_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


# --- Read at scrape time --------------------------------------------------------------------


def queue_oldest_ages(*, now: datetime | None = None) -> dict[str, float]:
    """Per channel, seconds the oldest queued delivery that is due has been waiting: since it
    was enqueued, or since its next_attempt_at came. Two index seeks per channel on the
    partial index delivery_queued_lag."""
    # Both times it reads were written on the database's clock (the relay's published mark,
    # a due time): ages on this host's clock would be off by its skew.
    now = now or db_clock.now()
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
    return dict(dead_letter_counts()["channels"])


def circuit_states() -> dict[str, str]:
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


def scrape_registry() -> CollectorRegistry:
    registry = multiprocess_registry()
    registry.register(ScrapeTimeCollector())
    return registry


# --- Serving --------------------------------------------------------------------------------


def metrics_allowed(ip: str) -> bool:
    """METRICS_ALLOWED_IPS: addresses or networks (CIDR); empty lets everyone scrape."""
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
    if not metrics_allowed(client_ip(request)):
        return JsonResponse(error_body("forbidden", "Not allowed to read metrics."), status=403)
    multiprocess_dir_cleanup()
    return HttpResponse(generate_latest(scrape_registry()), content_type=CONTENT_TYPE_LATEST)
