"""Clarion across hosts (network namespaces on one machine, tests/cluster/net.py): hosts
killed, cut off and with a clock of their own, while notifications flow from the upstream
service (this process) through HAProxy to two API hosts, relays, two worker hosts and the
WebSocket clients' host. Every scenario reports accepted / delivered / duplicated / lost as
tests/chaos does: lost must be 0, and duplicates no more than what was in flight when the
fault came. `make test` runs scenario 1 at a small size; `make cluster` and `make chaos` run
them all at full size."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db.models import Count
from django.utils import timezone

from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Notification
from tests.chaos.harness import (
    Ledger,
    Tally,
    http,
    in_flight,
    scale,
    tally,
    wait_settled,
)
from tests.clock import skewed_env
from tests.cluster.conftest import frames, received_all, recipients
from tests.cluster.harness import Cluster
from tests.conftest import wait_until
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.factories import api_key_for

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.pipeline,
    pytest.mark.django_db(transaction=True),
]

CHANNELS = ["email", "sms", "web"]
BULK_CHUNK = 250
EVERY_HOST = ["lb", "api1", "api2", "relay1", "relay2", "sched", "worker1", "worker2", "clients"]


def body(n: int, run: str, sockets: int) -> dict[str, Any]:
    """One notification to recipient u{n mod sockets} (each has a live socket), on every
    channel, with a ref unique in the run."""
    return {
        "recipient": {"id": f"u{n % sockets}"},
        "template": "chaos",
        "data": {"ref": f"{run}-{n}"},
        "channels": CHANNELS,
    }


def record(ledger: Ledger, result: dict[str, Any], ref: str) -> None:
    for delivery in result["deliveries"]:
        assert delivery["status"] in ("queued", "scheduled"), result
        channel = delivery["channel"]
        ledger.accept(channel, ref if channel == "sms" else result["id"])


def post_bulk(
    cluster: Cluster,
    api_key: str,
    items: list[dict[str, Any]],
    ledger: Ledger,
    url: str | None = None,
) -> None:
    """Through the load balancer (or straight to `url`), in chunks, each retried with its
    Idempotency-Key until answered."""
    for start in range(0, len(items), BULK_CHUNK):
        chunk = items[start : start + BULK_CHUNK]
        key = str(uuid.uuid4())
        for _ in range(20):
            status, _, raw = http(
                "POST",
                (url or cluster.url) + "/api/v1/notifications/bulk",
                {"notifications": chunk},
                api_key,
                {"Idempotency-Key": key},
                timeout=120,
            )
            if status == 200:
                break
            time.sleep(0.5)
        assert status == 200, raw[:500]
        answer = json.loads(raw)
        assert (answer["accepted"], answer["rejected"]) == (len(chunk), 0), answer
        for result, sent in zip(answer["results"], chunk, strict=True):
            record(ledger, result, sent["data"]["ref"])


def fenced_results(cluster: Cluster, host_name: str) -> int:
    """How many results the host's workers dropped because their lease had moved on."""
    total = 0
    for process in cluster.processes.get(host_name, []):
        for match in re.finditer(r"(\d+) results dropped: their lease ran out", process.log()):
            total += int(match.group(1))
    return total


def progress() -> int:
    """Deliveries a provider or a socket has taken."""
    return Delivery.objects.filter(
        status__in=[DeliveryStatus.SENT, DeliveryStatus.DELIVERED, DeliveryStatus.READ]
    ).count()


def build(
    cluster: Cluster,
    env: dict[str, str],
    tokens: list[str],
    *,
    hosts: list[str] | None = None,
    relays: tuple[str, ...] = ("relay1",),
    workers: tuple[str, ...] = ("worker1", "worker2"),
    worker_env: dict[str, dict[str, str]] | None = None,
    relay_env: dict[str, str] | None = None,
    api_env: dict[str, dict[str, str]] | None = None,
) -> Path:
    """The whole of Clarion across the hosts; returns the clients' frames file."""
    cluster.up(hosts or EVERY_HOST)
    for api in ("api1", "api2"):
        cluster.start_api(api, **{**env, **(api_env or {}).get(api, {})})
    cluster.start_lb(["api1", "api2"])
    cluster.start_workers("sched", [("maintenance", 1)], beat=True, **env)
    for worker in workers:
        cluster.start_worker_host(worker, **{**env, **(worker_env or {}).get(worker, {})})
    _, frames_path = cluster.start_clients(tokens)
    for relay in relays:
        cluster.start_relay(relay, **{**env, **(relay_env or {})})
    return frames_path


@pytest.fixture
def in_background() -> Iterator[Any]:
    """Run a function in a thread; its exception fails the test when joined."""
    threads: list[tuple[threading.Thread, list[BaseException]]] = []

    def start(function: Any, *args: Any) -> Any:
        errors: list[BaseException] = []

        def target() -> None:
            try:
                function(*args)
            except BaseException as exc:  # re-raised by join()
                errors.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        threads.append((thread, errors))

        def join(timeout: float = 600) -> None:
            thread.join(timeout)
            assert not thread.is_alive(), "the background load did not finish"
            if errors:
                raise errors[0]

        return join

    yield start
    for thread, _ in threads:
        thread.join(30)


def settle_and_tally(
    scenario: str,
    ledger: Ledger,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    frames_path: Path,
    *,
    note: str,
    timeout: float,
) -> Tally:
    wait_settled(ledger.accepted, timeout=timeout, message=f"{scenario} settled")
    # An in-app delivery is settled once a worker pushed it (`sent`); its frame reaches the
    # clients' file when the socket's server process relays it, which on a loaded machine
    # took more than 15 s (scenario 5, 2 of 10 runs). What is still missing after a minute is
    # counted as lost.
    web = len(ledger.expected.get("web", ()))
    deadline = time.monotonic() + 60
    while len(frames(frames_path)) < web and time.monotonic() < deadline:
        time.sleep(0.2)
    # Whatever the fault, each delivery entered `sent` once (a late or repeated result is
    # fenced by the lease; in-app included, whose copies the sockets dedupe) and ended final.
    sent_twice = list(
        DeliveryEvent.objects.filter(status=DeliveryStatus.SENT)
        .values("delivery")
        .annotate(n=Count("id"))
        .filter(n__gt=1)[:5]
    )
    assert not sent_twice, sent_twice
    assert set(Delivery.objects.values_list("status", flat=True)) <= {
        DeliveryStatus.SENT,
        DeliveryStatus.DELIVERED,
        DeliveryStatus.READ,
    }
    resent = sum(frames(frames_path, again=True).values())
    if resent:
        note += f"; {resent} frames arrived again after a reconnect and were shown once"
    return tally(
        f"cluster {scenario}", ledger, received_all(sendgrid, twilio, frames_path), note=note
    )


def start_load(
    owner: Any,
    cluster: Cluster,
    env: dict[str, str],
    in_background: Any,
    run: str,
) -> tuple[Ledger, Path, Any, int]:
    """The whole cluster, and notifications posted through it in the background: returns the
    ledger, the clients' frames file, the load's join() and how many deliveries it makes."""
    count, sockets = scale(300, 10_000), scale(30, 200)
    frames_path = build(cluster, env, recipients(owner, sockets))
    ledger = Ledger()
    items = [body(n, run, sockets) for n in range(count)]
    join = in_background(post_bulk, cluster, api_key_for(owner), items, ledger)
    return ledger, frames_path, join, count * len(CHANNELS)


def fault_while_leases_held(total: int, fault: Any) -> int:
    """Once a quarter of the deliveries went out and leases are held (which, at the full
    size, the API's pace makes intermittent), apply the fault; returns the leases in flight.
    A dead or cut-off host's leases stay in the table until they run out, so counting again
    after the fault takes in what was leased between the two readings."""
    wait_until(
        lambda: progress() >= total // 4 and in_flight() > 0,
        timeout=scale(120, 600),
        interval=0.02,
    )
    held = in_flight()
    fault()
    return max(held, in_flight())


def test_worker_host_killed_mid_run(
    owner: Any,
    cluster_template: Any,
    cluster: Cluster,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    provider_env: dict[str, str],
    in_background: Any,
) -> None:
    """Scenario 1: a worker host loses every process (kill -9) in the middle of the run."""
    ledger, frames_path, join, total = start_load(
        owner, cluster, provider_env, in_background, "host-killed"
    )
    held = fault_while_leases_held(total, lambda: cluster.kill_host("worker2"))
    join()
    result = settle_and_tally(
        "1 worker host killed",
        ledger,
        sendgrid,
        twilio,
        frames_path,
        note=f"{held} in flight when worker2 died",
        timeout=scale(120, 900),
    )
    assert (result.lost, result.unexpected) == (0, 0)
    assert result.duplicated <= held
    assert Notification.objects.count() == total // len(CHANNELS)


def post_each(
    cluster: Cluster, api_key: str, items: list[dict[str, Any]], ledger: Ledger, log: list[int]
) -> None:
    """One POST per notification through the load balancer, each with its own
    Idempotency-Key, retried with the same key until the API answers 202 (or 200: the answer
    to a request whose first answer was lost); `log` gets every status seen."""
    lock = threading.Lock()

    def one(item: dict[str, Any]) -> None:
        key = str(uuid.uuid4())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status, _, raw = http(
                "POST",
                cluster.url + "/api/v1/notifications",
                item,
                api_key,
                {"Idempotency-Key": key},
                timeout=30,
            )
            with lock:
                log.append(status)
            if status in (200, 202):
                result = json.loads(raw)
                with lock:
                    record(ledger, result, item["data"]["ref"])
                return
            # 409: the first request with this key is still held by the host that died; its
            # lock runs out after IDEMPOTENCY_LOCK_SECONDS.
            assert status in (0, 409, 502, 503, 504), (status, raw[:300])
            time.sleep(0.5)
        raise AssertionError(f"{item['data']['ref']} never accepted")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, items))


@pytest.mark.cluster_full
def test_api_host_killed_under_load(
    owner: Any,
    cluster_template: Any,
    cluster: Cluster,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    provider_env: dict[str, str],
    in_background: Any,
) -> None:
    """Scenario 3: an API host dies (kill -9) while clients post through the load balancer;
    HAProxy takes it out, the clients retry what got no answer with the same Idempotency-Key,
    and the sockets it held come back through the other host."""
    count, sockets = scale(300, 3_000), scale(30, 200)
    tokens = recipients(owner, sockets)
    frames_path = build(cluster, provider_env, tokens)
    api_key = api_key_for(owner)
    ledger = Ledger()
    statuses: list[int] = []
    items = [body(n, "api-killed", sockets) for n in range(count)]
    join = in_background(post_each, cluster, api_key, items, ledger, statuses)
    wait_until(lambda: len(statuses) >= count // 3, timeout=scale(120, 600), interval=0.05)
    cluster.kill_host("api2")
    join()
    unanswered = sum(1 for s in statuses if s in (0, 502, 503, 504))
    locked = statuses.count(409)
    replayed = statuses.count(200)
    result = settle_and_tally(
        "3 API host killed",
        ledger,
        sendgrid,
        twilio,
        frames_path,
        note=f"{unanswered} attempts without an answer and {locked} answered 409 (the dead "
        f"host's lock) retried with the same key; {replayed} answered as replays",
        timeout=scale(120, 900),
    )
    assert (result.lost, result.duplicated, result.unexpected) == (0, 0, 0)
    refs = Counter(Notification.objects.values_list("data__ref", flat=True))
    assert len(refs) == count and max(refs.values()) == 1, refs.most_common(3)


@pytest.mark.cluster_full
def test_relay_host_killed_mid_publish(
    owner: Any,
    cluster_template: Any,
    cluster: Cluster,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    provider_env: dict[str, str],
    in_background: Any,
) -> None:
    """Scenario 4: two relay hosts publish one outbox while the API fills it; one dies
    (kill -9) in the middle."""
    count, sockets = scale(600, 10_000), scale(30, 200)
    tokens = recipients(owner, sockets)
    # Small claims and few deliveries a message: a relay spends its time publishing.
    relay_env = {"RELAY_CLAIM_SIZE": "20", "DISPATCH_BATCH_SIZE": scale("1", "5")}
    frames_path = build(
        cluster, provider_env, tokens, relays=("relay1", "relay2"), relay_env=relay_env
    )
    api_key = api_key_for(owner)
    ledger = Ledger()
    items = [body(n, "relay-killed", sockets) for n in range(count)]
    join = in_background(post_bulk, cluster, api_key, items, ledger)
    # Both relays are at work on an outbox the API keeps filling.
    wait_until(
        lambda: (
            Notification.objects.count() >= count // 3
            and Delivery.objects.filter(enqueued_at__isnull=False).count() >= count // 4
        ),
        timeout=scale(120, 600),
        interval=0.05,
    )
    published = Delivery.objects.filter(enqueued_at__isnull=False).count()
    cluster.kill_host("relay1")
    join()
    result = settle_and_tally(
        "4 relay host killed",
        ledger,
        sendgrid,
        twilio,
        frames_path,
        note=f"{published} deliveries published when relay1 died",
        timeout=scale(120, 900),
    )
    assert (result.lost, result.duplicated, result.unexpected) == (0, 0, 0)


@pytest.mark.cluster_full
def test_worker_host_cut_off_while_holding_leases(
    owner: Any,
    cluster_template: Any,
    cluster: Cluster,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    provider_env: dict[str, str],
    in_background: Any,
) -> None:
    """Scenario 2: a worker host's link goes down for 30 s while it holds leases, then comes
    back. Its leases run out meanwhile (DELIVERY_LEASE_SECONDS 10), the other host sends what
    they held, and when the cut-off host's late results arrive they are fenced by the lease
    token: no second 'sent', no status overwritten."""
    ledger, frames_path, join, total = start_load(
        owner, cluster, provider_env, in_background, "host-cut"
    )
    held = fault_while_leases_held(total, lambda: cluster.cut("worker2"))
    time.sleep(30)
    cluster.restore("worker2")
    join()
    result = settle_and_tally(
        "2 worker host cut off 30 s",
        ledger,
        sendgrid,
        twilio,
        frames_path,
        note=f"{held} in flight when worker2 was cut off; {fenced_results(cluster, 'worker2')} "
        "of its late results fenced by the lease",
        timeout=scale(180, 900),
    )
    assert (result.lost, result.unexpected) == (0, 0)
    assert result.duplicated <= held
    # Its processes outlived the cut.
    assert all(p.popen.poll() is None for p in cluster.processes["worker2"])


SKEW_SECONDS = 30
# The odd notifications of scenario 5 escalate to SMS after this (nobody reads in-app there).
ESCALATE_AFTER_SECONDS = 40


@pytest.mark.cluster_full
def test_hosts_with_clocks_ahead_and_behind(
    owner: Any,
    cluster_template: Any,
    cluster: Cluster,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    provider_env: dict[str, str],
) -> None:
    """Scenario 5: wall clocks off by 30 s (libfaketime; a time namespace would not move the
    wall clock): api1 and worker2 ahead, api2 behind. Leases are 10 s, so by worker2's clock
    every lease the other host holds has run out. Each API host accepts half the
    notifications: half of those scheduled 20 s ahead (api1 would see that time as past), the
    other half escalating to SMS after 40 s (api2 would place that deadline 30 s early); the
    first SMS attempts fail and are retried.
    Leases, due times, the accept's routing and the sweeper all follow the database's clock:
    nothing is sent twice and nothing before its time."""
    count, sockets = scale(300, 10_000), scale(30, 200)
    tokens = recipients(owner, sockets)
    ahead, behind = skewed_env(SKEW_SECONDS), skewed_env(-SKEW_SECONDS)
    frames_path = build(
        cluster,
        provider_env,
        tokens,
        worker_env={"worker2": ahead},
        api_env={"api1": ahead, "api2": behind},
    )
    # The skew is real: these hosts' processes read a wall clock 30 s off this one's.
    for host, env, skew in (
        ("worker2", ahead, SKEW_SECONDS),
        ("api1", ahead, SKEW_SECONDS),
        ("api2", behind, -SKEW_SECONDS),
    ):
        off = cluster.clock_offset(host, **env)
        assert abs(off - skew) < 2, (host, off)
    # A few failed attempts to retry (not so many that the breaker opens).
    twilio.fail_next(*[twilio.server_error(503)] * 3)
    api_key = api_key_for(owner)
    ledger = Ledger()
    items = [body(n, "skew", sockets) for n in range(count)]
    for item in items[1::2]:
        item["escalation"] = [
            {"after": f"{ESCALATE_AFTER_SECONDS}s", "unless": "read", "channel": "sms"}
        ]
    # Half to each API host, straight (round robin may pass a host by while its health checks
    # lag), a chunk at a time, each chunk's send_at 20 s after it is posted. This host's clock
    # is the database's (the same machine).
    send_at: dict[str, float] = {}
    posted: dict[str, float] = {}
    started_wall, started_monotonic = time.time(), time.monotonic()
    half = len(items) // 2
    for api, share in (("api1", items[:half]), ("api2", items[half:])):
        for start in range(0, len(share), BULK_CHUNK):
            chunk = share[start : start + BULK_CHUNK]
            now = timezone.now()
            for item in chunk:
                ref = item["data"]["ref"]
                posted[ref] = now.timestamp()
                if "escalation" not in item:
                    item["send_at"] = (now + timedelta(seconds=20)).isoformat()
                    send_at[ref] = now.timestamp() + 20
            post_bulk(cluster, api_key, chunk, ledger, url=cluster.api_url(api))
    result = settle_and_tally(
        "5 clocks 30 s off (api1, worker2 ahead; api2 behind)",
        ledger,
        sendgrid,
        twilio,
        frames_path,
        note=f"{count // 2} scheduled 20 s ahead, {count - count // 2} escalating to SMS after "
        f"{ESCALATE_AFTER_SECONDS} s, the first SMS attempts answered 503",
        timeout=scale(180, 900),
    )
    assert (result.lost, result.duplicated, result.unexpected) == (0, 0, 0)
    scheduled = set(send_at)
    escalated = {item["data"]["ref"] for item in items[1::2]}
    ref_of = {
        str(nid): ref
        for nid, ref in Notification.objects.filter(data__ref__in=scheduled).values_list(
            "id", "data__ref"
        )
    }

    def wall(at: float) -> float:
        return started_wall + (at - started_monotonic)

    def early(ref: str, at: float, channel: str) -> bool:
        """Sent before its send_at, or (an escalation step's SMS) before its deadline."""
        if ref in scheduled:
            return at < send_at[ref] - 0.5
        return channel == "sms" and at < posted[ref] + ESCALATE_AFTER_SECONDS - 0.5

    # Nothing scheduled went out before its time, on any channel, and no escalation step
    # before its deadline (this host's clock, which is the database's).
    early_emails = [
        nid
        for r in sendgrid.accepted_requests()
        for nid in sendgrid.trace_ids(r, "notification_id")
        if nid in ref_of and early(ref_of[nid], wall(r.at), "email")
    ]
    early_sms = [
        ref
        for r in twilio.accepted_requests()
        for ref in twilio.trace_ids(r, "body")
        if ref in posted and early(ref, wall(r.at), "sms")
    ]
    early_frames = [
        line["id"]
        for line in map(json.loads, frames_path.read_text().splitlines())
        if str(uuid.UUID(line["id"])) in ref_of
        and early(ref_of[str(uuid.UUID(line["id"]))], line["at"], "web")
    ]
    assert not early_emails and not early_sms and not early_frames, (
        len(early_emails),
        len(early_sms),
        len(early_frames),
    )
    # Every delivery of a send_at was accepted as `scheduled`, and every escalation step.
    first_scheduled = DeliveryEvent.objects.filter(status=DeliveryStatus.SCHEDULED)
    assert first_scheduled.filter(delivery__notification__data__ref__in=scheduled).count() == len(
        scheduled
    ) * len(CHANNELS)
    assert first_scheduled.filter(
        delivery__notification__data__ref__in=escalated, delivery__channel="sms"
    ).count() == len(escalated)
    # Each API host read the database's clock 30 s off its own.
    logs = {name: cluster.processes[name][0].log() for name in ("api1", "api2")}
    for name, side in (("api1", "ahead of"), ("api2", "behind")):
        assert " accepted: " in logs[name], name
        read = re.search(rf"wall clock is (\d+\.\d+) s {side} the database's", logs[name])
        assert read is not None and abs(float(read.group(1)) - SKEW_SECONDS) < 1, name
    # worker2 took its share of the work.
    assert any(" sent via " in p.log() for p in cluster.processes["worker2"])
