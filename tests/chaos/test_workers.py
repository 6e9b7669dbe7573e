"""Chaos on the worker side: pool children and a whole worker killed with SIGKILL while they
drain a backlog, and a poison delivery that always fails next to normal traffic."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from notifications.models import Delivery, DeliveryStatus
from tests.chaos.conftest import accept_bulk, item, received
from tests.chaos.harness import (
    RECOVERY_ENV,
    Ledger,
    WorkerSpec,
    in_flight,
    kill_child,
    kill_group,
    rate,
    report,
    scale,
    start_workers,
    tally,
    wait_settled,
)
from tests.conftest import Process
from tests.emulators.base import Request, Response
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from workers.models import DeadLetter

pytestmark = [pytest.mark.chaos, pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]


def test_kill_9_worker_children_and_a_whole_worker_loses_nothing(
    api: Any,
    chaos_template: Any,
    sendgrid: SendGridEmulator,
    twilio: TwilioEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    notifications = scale(100, 1000)  # two deliveries each: email and SMS
    kill_every = scale(1.0, 2.0)
    rng = random.Random(6)
    # Each provider call takes a while and a task carries two deliveries, so that the run
    # lasts several kill intervals and a kill finds sends in flight.
    sendgrid.latency = twilio.latency = 0.2
    env = {
        **RECOVERY_ENV,
        **sendgrid.settings_env(),
        **twilio.settings_env(),
        "DISPATCH_BATCH_SIZE": "2",
        # A kill costs the attempt of every delivery its child held, and a redelivered batch
        # may be killed again: with a kill a second, the default 4 attempts would let a few
        # deliveries be abandoned as poison (dead) although every send was cut off by a kill.
        "RETRY_MAX_ATTEMPTS": "10",
    }
    ledger = Ledger()
    # The backlog first: the kills then land while the workers drain it.
    accept_bulk(api, ledger, [item(n, "kill") for n in range(notifications)])
    total = ledger.accepted
    _, *victims = start_workers(
        spawn,
        tmp_path,
        [
            WorkerSpec("sweeper", "maintenance", concurrency=1, beat=True),
            WorkerSpec("victim-0", "email,sms"),
            WorkerSpec("victim-1", "email,sms"),
        ],
        **env,
    )
    exposed = kills = 0
    whole_worker_killed = False
    deadline = time.monotonic() + scale(60, 600)
    while time.monotonic() < deadline:
        time.sleep(kill_every)
        done = Delivery.objects.filter(status=DeliveryStatus.SENT).count()
        if done >= total:
            break
        # Whatever a worker holds now may have reached the provider without being marked
        # sent: the most a kill can duplicate.
        exposed += in_flight()
        if not whole_worker_killed and done >= total // 3:
            kill_group(victims[0])
            [victims[0]] = start_workers(
                spawn, tmp_path, [WorkerSpec("victim-2", "email,sms")], **env
            )
            whole_worker_killed = True
        elif kill_child(rng.choice(victims), rng) is not None:
            kills += 1
    wait_settled(total, timeout=scale(60, 300), message="every delivery settled after the kills")
    result = tally(
        "1 kill -9 workers",
        ledger,
        received(sendgrid, twilio),
        note=f"{kills} pool children and 1 whole worker killed; {exposed} in flight at the kills",
    )
    assert whole_worker_killed
    assert kills >= 1
    assert (result.lost, result.unexpected) == (0, 0)
    assert result.duplicated <= exposed
    assert Delivery.objects.filter(status=DeliveryStatus.SENT).count() == total


# --- A poison delivery ----------------------------------------------------------------------

# Outside the +1415555NNNN numbers that tests/chaos/conftest.py gives the other recipients.
POISON_NUMBER = "+14155560999"


class PoisonedTwilio(TwilioEmulator):
    """Twilio that fails every message to one number with a 500, forever."""

    def answer(self, request: Request) -> Response:
        if request.form().get("To", [""])[0] == POISON_NUMBER:
            return self.server_error(500)
        return super().answer(request)


def test_a_poison_delivery_ends_dead_and_the_rest_keep_their_throughput(
    api: Any, chaos_template: Any, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    """Segments of SMS queued one after the other, clean and poisoned in turn (a poison
    message at the head of each poisoned one), then one worker drains them in order; the
    poisoned segments' mean rate is compared with the clean ones', which surround them so
    that a drift of the machine's speed cancels out. Under `make chaos` (five segments of 400)
    it must keep 90 %. The normal suite has three short segments: there the poison's own sends
    are several per cent of a segment and the machine's noise is ±10 %, so it only checks
    that the poison does not stall the rest; and one poison only, because two short segments
    drain before their poisons' retries, which then fail five times in a row and open the
    provider's breaker (see the report of this suite)."""
    per_segment = scale(60, 400)
    twilio = PoisonedTwilio().start()
    # Sends that wait on the provider more than on the CPU, so that the segments compare
    # the pipeline rather than whatever else the machine is doing.
    twilio.latency = 0.05
    segments = scale(
        ["clean-1", "poisoned-1", "clean-2"],
        ["clean-1", "poisoned-1", "clean-2", "poisoned-2", "clean-3"],
    )
    poisons = sum(1 for name in segments if name.startswith("poisoned"))
    ledgers = {name: Ledger() for name in segments}
    try:
        env = {
            **RECOVERY_ENV,
            **twilio.settings_env(),
            # A poison's four attempts fall inside its own segment.
            "RETRY_BACKOFF_BASE_SECONDS": str(scale(0.25, 1.0)),
        }
        for name in segments:
            if name.startswith("poisoned"):
                poisoned = item(0, name, channels=["sms"])
                poisoned["recipient"] = {"id": f"poison-{name}", "phone": POISON_NUMBER}
                accept_bulk(api, Ledger(), [poisoned])
            items = [item(n, name, channels=["sms"]) for n in range(per_segment)]
            accept_bulk(api, ledgers[name], items)
        start_workers(spawn, tmp_path, [WorkerSpec("sms", "sms")], **env)
        wait_settled(
            Delivery.objects.count(), timeout=scale(60, 300), message="every segment settled"
        )
        rates = {}
        for name in segments:
            refs = ledgers[name].expected["sms"]
            rates[name] = rate(
                [r.at for r in twilio.accepted_requests() if twilio.trace_id(r, "body") in refs]
            )
        counts = received(None, twilio)
        poison_calls = [r for r in twilio.requests() if twilio.trace_id(r, "to") == POISON_NUMBER]
    finally:
        twilio.stop()
    ledger = Ledger()
    # The poison is not in the ledger: it is meant to end dead, as checked below.
    for name in segments:
        for channel, traces in ledgers[name].expected.items():
            ledger.expected.setdefault(channel, set()).update(traces)
    clean = [value for name, value in rates.items() if name.startswith("clean")]
    poisoned_rates = [value for name, value in rates.items() if name.startswith("poisoned")]
    share = (sum(poisoned_rates) / len(poisoned_rates)) / (sum(clean) / len(clean))
    result = tally(
        "7 poison delivery",
        ledger,
        counts,
        note="normal SMS a second: "
        + ", ".join(f"{name} {value:.1f}" for name, value in rates.items())
        + f"; poisoned / clean = {share:.0%}",
    )
    dead = list(Delivery.objects.filter(address=POISON_NUMBER).values_list("status", "attempts"))
    report(f"7 poison delivery: the poison messages ended {dead}")
    assert (dead, len(poison_calls)) == ([(DeliveryStatus.DEAD, 4)] * poisons, 4 * poisons)
    dead_letters = DeadLetter.objects.filter(delivery__address=POISON_NUMBER, attempts=4)
    assert dead_letters.count() == poisons
    assert (result.lost, result.duplicated, result.unexpected) == (0, 0, 0)
    assert share >= scale(0.5, 0.9)


# --- A topic fanned out while workers die ---------------------------------------------------


def test_a_topic_fan_out_while_workers_are_killed_loses_nothing(
    api: Any,
    owner: Any,
    sendgrid: SendGridEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    """One POST to a topic of 20,000 subscribers (2,000 in the normal suite), fanned out by
    the relay in chunks while pool children are killed every second and one whole worker
    once: every subscriber gets one child notification, every child's email reaches SendGrid,
    and only what was in flight at a kill may arrive twice."""
    from notifications.models import Notification, Recipient, Topic, TopicSubscription
    from tests.factories import TemplateFactory

    subscribers = scale(2000, 20000)
    rng = random.Random(12)
    TemplateFactory(owner=owner, key="fan", content={"email": {"subject": "News", "body": "x"}})
    Recipient.objects.bulk_create(
        [
            Recipient(owner=owner, external_id=f"fan-{n}", email=f"fan-{n}@example.com")
            for n in range(subscribers)
        ],
        batch_size=5000,
    )
    topic = Topic.objects.create(owner=owner, key="news", name="News")
    TopicSubscription.objects.bulk_create(
        [
            TopicSubscription(topic=topic, recipient_id=pk)
            for pk in Recipient.objects.filter(owner=owner).values_list("pk", flat=True)
        ],
        batch_size=5000,
    )
    sendgrid.latency = 0.05
    env = {
        **RECOVERY_ENV,
        **sendgrid.settings_env(),
        "DISPATCH_BATCH_SIZE": "5",
        "FANOUT_CHUNK_SIZE": str(scale(200, 1000)),
        "RETRY_MAX_ATTEMPTS": "10",
    }
    _, *victims = start_workers(
        spawn,
        tmp_path,
        [
            WorkerSpec("sweeper", "maintenance", concurrency=1, beat=True),
            WorkerSpec("fan-0", "email"),
            WorkerSpec("fan-1", "email"),
        ],
        **env,
    )
    answer = api.post(
        "/api/v1/notifications", {"topic": "news", "template": "fan", "data": {}}, format="json"
    )
    assert answer.status_code == 202, answer.content
    parent_id = answer.json()["id"]

    def sent() -> int:
        return Delivery.objects.filter(status=DeliveryStatus.SENT).count()

    exposed = kills = 0
    whole_worker_killed = False
    kills_during_fan_out = 0
    deadline = time.monotonic() + scale(120, 900)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        fanning_out = Notification.objects.filter(
            pk=parent_id, fanout_finished_at__isnull=True
        ).exists()
        done = sent()
        if done >= subscribers:
            break
        exposed += in_flight()
        if not whole_worker_killed and done >= subscribers // 3:
            kill_group(victims[0])
            [victims[0]] = start_workers(
                spawn, tmp_path, [WorkerSpec("fan-2", "email")], relay=False, **env
            )
            whole_worker_killed = True
        elif kill_child(rng.choice(victims), rng) is not None:
            kills += 1
            kills_during_fan_out += fanning_out
    parent = Notification.objects.get(pk=parent_id)
    assert parent.fanout_finished_at is not None
    assert parent.recipients_done == subscribers
    wait_settled(subscribers, timeout=scale(60, 300), message="every email settled")

    children = Notification.objects.filter(parent_id=parent_id)
    per_recipient = Counter(children.values_list("recipient_id", flat=True))
    assert len(per_recipient) == subscribers and max(per_recipient.values()) == 1
    ledger = Ledger()
    for child_id in children.values_list("pk", flat=True):
        ledger.accept("email", str(child_id))
    result = tally(
        "8 topic fan-out, kill -9 workers",
        ledger,
        received(sendgrid, None),
        note=(
            f"{subscribers} subscribers; {kills} pool children ({kills_during_fan_out} during "
            f"the fan-out) and 1 whole worker killed; {exposed} in flight at the kills"
        ),
    )
    assert whole_worker_killed and kills >= 1
    assert (result.lost, result.unexpected) == (0, 0)
    assert result.duplicated <= exposed
