"""The cluster's figures, for docs/scaling.md: deliveries/s with one worker host and with two,
side by side in one run, with the CPU every host used; API requests/s per process and per
CPU-second. All hosts share this machine's cores, so the per-CPU-second figures are the ones
that carry over to hosts of their own. Written to $CLUSTER_FIGURES (JSON) when set."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.db.models import Max, Min

from notifications.models import Delivery
from tests.chaos.harness import Ledger, http, report, scale, wait_settled
from tests.cluster.conftest import recipients
from tests.cluster.harness import Cluster
from tests.cluster.test_cluster import CHANNELS, body, build, post_bulk
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.factories import api_key_for

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.cluster_full,
    pytest.mark.pipeline,
    pytest.mark.django_db(transaction=True),
]

MEASURED = ["api1", "api2", "relay1", "sched", "worker1", "worker2", "clients", "lb"]


def _cpu(cluster: Cluster) -> dict[str, float]:
    return {host: cluster.cpu_seconds(host) for host in MEASURED if host in cluster.network.hosts}


def _used(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {host: round(after[host] - before.get(host, 0.0), 2) for host in after}


def _delivery_phase(
    cluster: Cluster, api_key: str, env: dict[str, str], run: str, count: int, sockets: int
) -> dict[str, Any]:
    """Fill the outbox with `count` notifications, then start the relay and let the worker
    hosts drain it: deliveries/s between the first and the last send, and the CPU each host
    used meanwhile."""
    ledger = Ledger()
    post_bulk(cluster, api_key, [body(n, run, sockets) for n in range(count)], ledger)
    ids = list(Delivery.objects.outbox().values_list("id", flat=True))
    before = _cpu(cluster)
    cluster.start_relay("relay1", **env)
    # The relay's own start (Django, its imports) is not part of the work.
    before["relay1"] = cluster.cpu_seconds("relay1")
    wait_settled(ledger.accepted, timeout=scale(180, 900), message=f"{run} settled")
    after = _cpu(cluster)
    cluster.kill_host("relay1")
    span = Delivery.objects.filter(id__in=ids).aggregate(first=Min("sent_at"), last=Max("sent_at"))
    seconds = (span["last"] - span["first"]).total_seconds()
    return {
        "deliveries": len(ids),
        "seconds": round(seconds, 2),
        "deliveries_per_second": round(len(ids) / seconds, 1),
        "cpu_seconds": _used(before, after),
    }


def _api_phase(cluster: Cluster, api_key: str, seconds: float, sockets: int) -> dict[str, Any]:
    """Single POSTs through HAProxy from 16 client threads for `seconds`: requests/s, and the
    CPU each API host used."""
    done = 0
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < stop:
            item = body(index * 1_000_000 + n, "api", sockets)
            status, _, raw = http(
                "POST",
                cluster.url + "/api/v1/notifications",
                item,
                api_key,
                {"Idempotency-Key": str(uuid.uuid4())},
            )
            assert status == 202, raw[:300]
            n += 1
            with lock:
                done += 1

    before = _cpu(cluster)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(client, range(16)))
    elapsed = time.monotonic() - started
    used = _used(before, _cpu(cluster))
    api_cpu = used["api1"] + used["api2"]
    return {
        "requests": done,
        "seconds": round(elapsed, 2),
        "requests_per_second": round(done / elapsed, 1),
        "requests_per_api_process": round(done / elapsed / 2, 1),
        "requests_per_api_cpu_second": round(done / api_cpu, 1),
        "cpu_seconds": used,
    }


def test_figures_one_and_two_worker_hosts(
    owner: Any,
    cluster_template: Any,
    cluster: Cluster,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    provider_env: dict[str, str],
) -> None:
    count, sockets = scale(300, 3_000), scale(30, 200)
    tokens = recipients(owner, sockets)
    build(cluster, provider_env, tokens, workers=("worker1",), relays=())
    api_key = api_key_for(owner)
    figures: dict[str, Any] = {"channels": CHANNELS}
    figures["one_worker_host"] = _delivery_phase(
        cluster, api_key, provider_env, "one-host", count, sockets
    )
    cluster.start_worker_host("worker2", **provider_env)
    figures["two_worker_hosts"] = _delivery_phase(
        cluster, api_key, provider_env, "two-hosts", count, sockets
    )
    figures["api"] = _api_phase(cluster, api_key, scale(5.0, 20.0), sockets)
    for phase in ("one_worker_host", "two_worker_hosts"):
        measured = figures[phase]
        workers = sum(v for h, v in measured["cpu_seconds"].items() if h.startswith("worker"))
        measured["deliveries_per_worker_cpu_second"] = round(measured["deliveries"] / workers, 1)
        report(
            f"cluster figures {phase}: {measured['deliveries_per_second']} deliveries/s, "
            f"{measured['deliveries_per_worker_cpu_second']} per worker CPU-second, "
            f"cpu {measured['cpu_seconds']}"
        )
    api = figures["api"]
    report(
        f"cluster figures api: {api['requests_per_second']} requests/s through HAProxy, "
        f"{api['requests_per_api_process']} per API process, "
        f"{api['requests_per_api_cpu_second']} per API CPU-second, cpu {api['cpu_seconds']}"
    )
    path = os.environ.get("CLUSTER_FIGURES")
    if path:
        with open(path, "w") as out:
            json.dump(figures, out, indent=2)
    assert figures["one_worker_host"]["deliveries"] == figures["two_worker_hosts"]["deliveries"]
    for phase in ("one_worker_host", "two_worker_hosts"):
        assert figures[phase]["deliveries_per_second"] > 0
