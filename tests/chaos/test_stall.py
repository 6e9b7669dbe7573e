"""Chaos: Redis connections that go silent. A TCP forwarder in front of Redis turns the
connections open at one moment half-open (tests/chaos/forwarder.py): what is sent is
swallowed, nothing is closed, new connections work. Under a steady load of SMS, everything
accepted before and after must be sent within WORKER_STALL_SECONDS + 30 s of the fault,
without a process restarted by hand, none lost, duplicates no more than what was in flight.

1. Every connection of every process (API caches and limits, relay signal and publisher,
   worker consumers and producers, beat) at once, on the production defaults.
2. One worker's connections only, with kombu's own check of its BRPOP connection turned off
   (REDIS_HEALTH_CHECK_SECONDS=0, what kombu before 5.7 did): its consumer waits on a dead
   BRPOP for ever, and only the worker's stall watchdog can bring it back."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from notifications.models import Delivery
from tests.chaos.conftest import item, received, record
from tests.chaos.forwarder import Forwarder, forwarding, port_of
from tests.chaos.harness import (
    ApiServer,
    Ledger,
    WorkerSpec,
    in_flight,
    report,
    scale,
    start_api,
    start_workers,
    tally,
    wait_settled,
)
from tests.conftest import PRODUCTION_BROKER_POLL_SECONDS, Process, free_port, wait_until
from tests.emulators.twilio import TwilioEmulator
from tests.factories import api_key_for

pytestmark = [pytest.mark.chaos, pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

STALL_SECONDS = scale(30, 60)
# What the issue allows past the stall period for everything to be sent.
HEAL_MARGIN_SECONDS = 30
LOAD_PER_SECOND = 10


@dataclass
class Load:
    """SMS posted one by one at a steady rate from a thread, each to its own recipient."""

    server: ApiServer
    api_key: str
    ledger: Ledger = field(default_factory=Ledger)
    accepted_at: dict[str, float] = field(default_factory=dict)
    slowest_answer: float = 0.0
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

    def start(self) -> Load:
        self.thread = threading.Thread(target=self._run, name="load", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self.stop.is_set():
            started = time.monotonic()
            sent = item(n, "stall", channels=["sms"])
            status, _, body = self.server.post("/api/v1/notifications", sent, self.api_key)
            took = time.monotonic() - started
            with self.lock:
                self.slowest_answer = max(self.slowest_answer, took)
                if status == 202:
                    answer = json.loads(body)
                    record(self.ledger, answer["id"], sent["data"]["ref"], answer["deliveries"])
                    self.accepted_at[sent["data"]["ref"]] = started
                else:
                    self.errors.append(f"{status} {body[:200]!r}")
            n += 1
            time.sleep(max(0.0, 1 / LOAD_PER_SECOND - took))

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(60)

    @property
    def accepted(self) -> int:
        with self.lock:
            return len(self.accepted_at)


@dataclass
class HealthProbe:
    """Polls a worker's /healthz twice a second from a thread: each answer and its first
    problem."""

    port: int
    seen: list[tuple[int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> HealthProbe:
        self.thread = threading.Thread(target=self._run, name="healthz", daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self.seen.append(self.once())

    def once(self) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return answer.status, ""
        except urllib.error.HTTPError as exc:
            return exc.code, (json.loads(exc.read())["problems"] or [""])[0]
        except OSError as exc:
            return 0, str(exc)

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)
        self.seen.append(self.once())


def _first_taken(twilio: TwilioEmulator) -> dict[str, float]:
    """When Twilio first took each ref (monotonic)."""
    taken: dict[str, float] = {}
    for request in twilio.accepted_requests():
        ref = twilio.trace_id(request, "body")
        taken.setdefault(ref, request.at)
    return taken


def _heal_times(load: Load, twilio: TwilioEmulator, fault_at: float) -> list[float]:
    """Per accepted ref, how long after max(fault, its acceptance) Twilio took it."""
    taken = _first_taken(twilio)
    return [
        taken[ref] - max(fault_at, accepted)
        for ref, accepted in load.accepted_at.items()
        if ref in taken and taken[ref] > fault_at
    ]


def _run_fault(
    *,
    load: Load,
    twilio: TwilioEmulator,
    silence: Callable[[], int],
    scenario: str,
) -> tuple[float, int]:
    """Wait for traffic to flow, silence the connections, keep the load on for a while, then
    wait for everything to be sent; returns the worst heal time and the in-flight count."""
    wait_until(
        lambda: len(_first_taken(twilio)) >= 20,
        timeout=60,
        message="SMS flowing before the fault",
    )
    flying = in_flight()
    fault_at = time.monotonic()
    silenced = silence()
    time.sleep(scale(15, 45))
    load.finish()
    wait_settled(
        load.ledger.accepted,
        timeout=STALL_SECONDS + HEAL_MARGIN_SECONDS + 60,
        message=f"{scenario}: everything sent after the fault",
    )
    heal = _heal_times(load, twilio, fault_at)
    worst = max(heal, default=0.0)
    report(
        f"{scenario}: {silenced} connections silenced, {load.accepted} accepted, slowest 202 "
        f"{load.slowest_answer:.1f}s, every SMS sent within {worst:.1f}s of the fault or its "
        f"acceptance (bound {STALL_SECONDS + HEAL_MARGIN_SECONDS}s)"
    )
    return worst, flying


def _env(twilio: TwilioEmulator, **extra: str) -> dict[str, str]:
    """The scenarios' processes, on the production defaults of what heals a stall."""
    return {
        **twilio.settings_env(),
        "WORKER_STALL_SECONDS": str(STALL_SECONDS),
        "RATE_LIMITS": "email=600000/m,sms=10000/s,push=10000/s,web=10000/s",
        "BROKER_POLL_SECONDS": PRODUCTION_BROKER_POLL_SECONDS,
        **extra,
    }


def _through(forwarder: Forwarder) -> dict[str, str]:
    """Redis (cache and broker) reached through the forwarder."""
    url = forwarder.url(int(settings.REDIS_URL.rsplit("/", 1)[1]))
    return {"REDIS_URL": url, "CELERY_BROKER_URL": url}


def _assert_healed(
    scenario: str, load: Load, twilio: TwilioEmulator, worst: float, flying: int
) -> None:
    result = tally(scenario, load.ledger, received(None, twilio))
    assert load.errors == []
    assert (result.lost, result.unexpected) == (0, 0)
    assert result.duplicated <= flying
    assert worst <= STALL_SECONDS + HEAL_MARGIN_SECONDS


def test_every_redis_connection_half_open_at_once_heals_without_a_restart(
    owner: Any,
    chaos_template: Any,
    twilio: TwilioEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    with forwarding(port_of(settings.REDIS_URL)) as forwarder:
        env = _env(twilio, **_through(forwarder))
        server = start_api(spawn, tmp_path, **env)
        workers = start_workers(
            spawn,
            tmp_path,
            [
                WorkerSpec("sweeper", "maintenance", concurrency=1, beat=True),
                WorkerSpec("sms", "sms"),
            ],
            **env,
        )
        load = Load(server, api_key_for(owner)).start()
        try:
            worst, flying = _run_fault(
                load=load,
                twilio=twilio,
                silence=forwarder.silence,
                scenario="9a every Redis connection half-open",
            )
        finally:
            load.finish()
        _assert_healed("9a every Redis connection half-open", load, twilio, worst, flying)
        assert all(process.popen.poll() is None for process in workers)


def test_one_workers_connections_half_open_are_healed_by_its_watchdog(
    owner: Any,
    chaos_template: Any,
    twilio: TwilioEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    forwarder = Forwarder(port_of(settings.REDIS_URL)).start()
    try:
        env = _env(twilio)
        server = start_api(spawn, tmp_path, **env)
        start_workers(
            spawn,
            tmp_path,
            [WorkerSpec("sweeper", "maintenance", concurrency=1, beat=True)],
            **env,
        )
        # The SMS worker alone reaches Redis through the forwarder, and without kombu's check
        # of its BRPOP connection.
        health_port = free_port()
        (sms,) = start_workers(
            spawn,
            tmp_path,
            [WorkerSpec("sms", "sms")],
            relay=False,
            **env,
            **_through(forwarder),
            REDIS_HEALTH_CHECK_SECONDS="0",
            WORKER_METRICS_PORT=str(health_port),
        )
        health = HealthProbe(health_port).start()
        load = Load(server, api_key_for(owner)).start()
        try:
            worst, flying = _run_fault(
                load=load,
                twilio=twilio,
                silence=forwarder.silence,
                scenario="9b one worker's connections half-open",
            )
        finally:
            load.finish()
            health.finish()
    finally:
        forwarder.stop()
    _assert_healed("9b one worker's connections half-open", load, twilio, worst, flying)
    assert "reconnecting its consumer" in sms.log()
    # Its liveness said so while it lasted, and is well again.
    assert (503, "consumer on sms stalled: took no waiting message") in health.seen
    assert health.seen[-1] == (200, "")
    assert sms.popen.poll() is None  # healed in place: the reconnect was enough
    assert Delivery.objects.count() == load.accepted
