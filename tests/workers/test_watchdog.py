"""The worker's stall watchdog (workers/watchdog.py): when it reconnects, when it gives up and
exits, and when it leaves a worker alone; a process whose event loop stopped exits with its
pool. tests/chaos/test_stall.py produces a real stall (a worker's connections half-open) and
checks that the watchdog reconnects the consumer and that /healthz says so meanwhile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, process_env, wait_until
from workers import watchdog
from workers.watchdog import Watch

STALL = 60.0


def _watch(*, prefetch: int = 2, at: float = 1000.0) -> Watch:
    return Watch(
        stall_seconds=STALL,
        queues=["sms"],
        prefetch=lambda: prefetch,
        last_received=at,
        last_tick=at,
        broker_seen=at,
    )


def _looks(watch: Watch, depth: int | None, times: list[float]) -> list[str | None]:
    actions = []
    for now in times:
        watch.last_tick = now  # the event loop turns
        actions.append(watch.look(depth, now=now))
    return actions


def test_a_queue_that_holds_messages_untaken_for_the_stall_period_reconnects_then_exits() -> None:
    watch = _watch()
    assert _looks(watch, 3, [1001, 1030, 1060]) == [None, None, None]
    assert _looks(watch, 3, [1061]) == ["reconnect"]
    assert watch.stalled
    assert watch.problem(now=1061) == "consumer on sms stalled: took no waiting message"
    # The reconnect did not help: another stall period, then the process gives up.
    assert _looks(watch, 3, [1090, 1120]) == [None, None]
    assert _looks(watch, 3, [1121]) == ["exit"]


def test_a_worker_that_takes_a_message_is_not_stalled() -> None:
    watch = _watch()
    assert _looks(watch, 3, [1001, 1061]) == [None, "reconnect"]
    watch.received()
    assert not watch.stalled
    assert watch.problem(now=1061) is None
    # Still messages waiting, but it took one a moment ago: a fresh stall period.
    assert _looks(watch, 3, [1062, 1100]) == [None, None]


def test_an_empty_queue_a_full_worker_or_an_unreachable_broker_is_no_stall() -> None:
    assert _looks(_watch(), 0, [1001, 1100, 1200]) == [None, None, None]
    # Room for none: its prefetch is taken by a task still running (busy, not stalled).
    full = _watch(prefetch=1)
    running = _Request()  # the set holds weak references
    watchdog.worker_state.reserved_requests.add(running)
    try:
        assert _looks(full, 3, [1001, 1100, 1200]) == [None, None, None]
    finally:
        watchdog.worker_state.reserved_requests.clear()
    # The broker does not answer the watchdog either: an outage, for the consumer's own
    # reconnect loop, not a stall; its liveness says so once it lasts.
    outage = _watch()
    assert [outage.look(None, now=t) for t in (1001, 1100, 1200)] == [None, None, None]
    assert outage.problem(now=1200) == "event loop has not turned for 200s"
    outage.last_tick = 1200
    assert outage.problem(now=1200) == "broker not reached for 200s"


def test_an_event_loop_that_stopped_turning_exits() -> None:
    watch = _watch()
    assert watch.look(0, now=1030) is None
    assert watch.look(0, now=1061) == "exit"  # last turn at 1000
    # A solo pool runs tasks on the loop: a long task is not a stall.
    solo = _watch()
    solo.loop_checked = False
    assert solo.look(0, now=1200) is None


class _Request:
    """Stands in for a reserved request (the set holds weak references)."""


EXIT_PROBE = """
import os, subprocess, sys, time
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
import django
django.setup()
from project.celery import app
from workers import watchdog
child = subprocess.Popen(["sleep", "600"])
print(child.pid, flush=True)
watch = watchdog.Watch(stall_seconds=1.2, queues=["sms"], prefetch=lambda: 2)
watch.last_tick = time.monotonic() - 60  # the event loop stopped turning a minute ago
watchdog._watch_forever(watch, app)
"""


@pytest.mark.django_db
def test_a_worker_whose_event_loop_stopped_exits_with_its_pool(tmp_path: Path) -> None:
    """The watchdog's thread reaches the broker but the event loop has not turned for the
    stall period: the process kills its pool children and exits with status 70, for its
    supervisor to start a fresh one."""
    probe = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE],
        cwd=ROOT,
        env=process_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode == watchdog.EXIT_STATUS, probe.stderr[-2000:]
    child = int(probe.stdout.split()[0])
    assert "its event loop has not turned for 60s" in probe.stderr
    assert "exiting for its supervisor to start it again" in probe.stderr
    wait_until(lambda: not _alive(child), timeout=5, message="the pool child to be gone")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"
