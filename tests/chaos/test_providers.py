"""Chaos at the providers: one that is down for a while (the shared circuit breaker holds the
traffic back), and one that answers 429 with Retry-After. Every delivery must still go out,
once, and none may die of the outage."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from notifications.models import Delivery, DeliveryStatus, WebhookMessage, WebhookMessageStatus
from tests.chaos.conftest import accept_bulk, item, received
from tests.chaos.harness import (
    RECOVERY_ENV,
    Ledger,
    WorkerSpec,
    report,
    scale,
    start_workers,
    tally,
    wait_settled,
)
from tests.conftest import Process, wait_until
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.emulators.webhook_receiver import WebhookReceiver

pytestmark = [pytest.mark.chaos, pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]


def test_provider_down_is_held_off_by_the_breaker_and_loses_nothing(
    api: Any,
    chaos_template: Any,
    sendgrid: SendGridEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    count = scale(100, 1000)
    down_for = scale(6.0, 60.0)
    open_seconds = scale(2, 60)
    env = {**RECOVERY_ENV, **sendgrid.settings_env(), "CIRCUIT_OPEN_SECONDS": str(open_seconds)}
    ledger = Ledger()
    accept_bulk(api, ledger, [item(n, "down", channels=["email"]) for n in range(count)])
    sendgrid.fail_always(sendgrid.server_error(503))
    start_workers(
        spawn,
        tmp_path,
        [
            WorkerSpec("sweeper", "maintenance", concurrency=1, beat=True),
            WorkerSpec("email", "email"),
        ],
        **env,
    )
    down_since = time.monotonic()
    time.sleep(down_for)
    sendgrid.fail_always(None)
    up_since = time.monotonic()
    wait_settled(count, timeout=scale(60, 300), message="every email settled after the outage")
    calls_while_down = sum(1 for r in sendgrid.requests() if down_since <= r.at < up_since)
    # Five failed calls open the breaker; then at most one trial per open period.
    ceiling = 5 + int(down_for // open_seconds) + 1
    result = tally(
        "4a provider down",
        ledger,
        received(sendgrid, None),
        note=f"down {down_for:.0f}s, breaker open {open_seconds}s: {calls_while_down} calls "
        f"while down (at most {ceiling})",
    )
    assert (result.lost, result.duplicated, result.unexpected) == (0, 0, 0)
    assert Delivery.objects.filter(status=DeliveryStatus.DEAD).count() == 0
    assert calls_while_down <= ceiling
    assert all(r.at >= up_since for r in sendgrid.accepted_requests())


def test_provider_429_with_retry_after_is_honoured_and_loses_nothing(
    api: Any,
    chaos_template: Any,
    twilio: TwilioEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
) -> None:
    count = scale(60, 500)
    retry_after = scale(1, 5)
    window = scale(3.0, 30.0)
    open_seconds = scale(2, 60)
    env = {**RECOVERY_ENV, **twilio.settings_env(), "CIRCUIT_OPEN_SECONDS": str(open_seconds)}
    ledger = Ledger()
    accept_bulk(api, ledger, [item(n, "429", channels=["sms"]) for n in range(count)])
    twilio.fail_always(twilio.rate_limited(retry_after))
    start_workers(spawn, tmp_path, [WorkerSpec("sms", "sms")], **env)
    time.sleep(window)
    twilio.fail_always(None)
    wait_settled(count, timeout=scale(60, 300), message="every SMS settled after the 429s")
    result = tally(
        "4b provider 429 + Retry-After",
        ledger,
        received(None, twilio),
        note=f"429 with Retry-After: {retry_after} for {window:.0f}s",
    )
    # The wait after each 429 a message got, before that message was tried again.
    accepted = {id(r) for r in twilio.accepted_requests()}
    calls: dict[str, list[Any]] = defaultdict(list)
    for request in twilio.requests():
        calls[twilio.trace_id(request, "body")].append(request)
    waits = [
        later.at - refused.at
        for requests in calls.values()
        for refused, later in itertools.pairwise(requests)
        if id(refused) not in accepted
    ]
    limited = sum(1 for r in twilio.requests() if id(r) not in accepted)
    report(
        f"4b provider 429 + Retry-After: {limited} calls answered 429, shortest wait after one "
        f"{min(waits):.2f}s"
    )
    assert (result.lost, result.duplicated, result.unexpected) == (0, 0, 0)
    assert Delivery.objects.filter(status=DeliveryStatus.DEAD).count() == 0
    assert len(waits) == limited
    assert min(waits) >= retry_after


def test_webhook_receiver_down_gets_every_event_once_when_it_answers_again(
    api: Any,
    chaos_template: Any,
    sendgrid: SendGridEmulator,
    spawn: Callable[..., Process],
    tmp_path: Path,
    settings: Any,
) -> None:
    """4c: the status-webhook receiver is down (connection refused) while the events are made,
    then answers: every `delivery.sent` arrives, signed, and none twice by `webhook-id`."""
    count = scale(100, 1000)
    down_for = scale(6.0, 60.0)
    open_seconds = scale(2, 60)
    settings.WEBHOOK_ALLOW_PRIVATE = True
    receiver = WebhookReceiver().start()
    try:
        registered = api.post(
            "/api/v1/webhooks",
            {"url": f"{receiver.url}/hooks", "event_types": ["delivery.sent"]},
            format="json",
        )
        assert registered.status_code == 201, registered.content
        secret = registered.json()["secret"]
        receiver.stop()
        env = {
            **RECOVERY_ENV,
            **sendgrid.settings_env(),
            "WEBHOOK_ALLOW_PRIVATE": "true",
            "CIRCUIT_OPEN_SECONDS": str(open_seconds),
        }
        start_workers(
            spawn,
            tmp_path,
            [
                WorkerSpec("sweeper", "maintenance", concurrency=1, beat=True),
                WorkerSpec("email", "email"),
                WorkerSpec("webhooks", "webhooks"),
            ],
            **env,
        )
        ledger = Ledger()
        accept_bulk(api, ledger, [item(n, "hook", channels=["email"]) for n in range(count)])
        wait_settled(count, timeout=scale(60, 300), message="every email sent")
        # Down while the events were made, and for `down_for` after the last one.
        time.sleep(down_for)
        receiver.start()

        def all_arrived() -> bool:
            return (
                len(receiver.ids()) >= count
                and not WebhookMessage.objects.exclude(status=WebhookMessageStatus.SENT).exists()
            )

        wait_until(
            all_arrived, timeout=scale(90, 400), interval=0.5, message="every webhook to arrive"
        )
        ids = receiver.ids()
        twice = sum(n - 1 for n in ids.values() if n > 1)
        got = receiver.verified(secret)
        notified = {g["data"]["notification_id"] for g in got}
        sent = set(
            Delivery.objects.filter(status=DeliveryStatus.SENT).values_list(
                "notification_id", flat=True
            )
        )
        report(
            f"4c webhook receiver down {down_for:.0f}s: events {len(sent)}, arrived "
            f"{len(ids)}, twice by webhook-id {twice}, lost {len(sent) - len(notified)}"
        )
        assert len(sent) == count
        assert notified == {str(n) for n in sent}
        assert (len(ids), twice) == (count, 0)
        assert {g["type"] for g in got} == {"delivery.sent"}
    finally:
        receiver.stop()
