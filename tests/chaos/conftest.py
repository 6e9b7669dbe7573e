"""Fixtures of the chaos scenarios: provider emulators, the template every scenario sends, and
bulk acceptance through the API; the run's summary repeats every scenario's result line."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from rest_framework.test import APIClient

from notifications.models import Notification
from tests.chaos.harness import RESULTS, Ledger
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.factories import TemplateFactory

# Each rendered message carries the notification's `ref`, so that Twilio, which takes no
# custom arguments, can be traced by its body.
CONTENT = {
    "email": {"subject": "Chaos {{ ref }}", "body": "{{ ref }}"},
    "sms": {"body": "{{ ref }}"},
}
BULK_CHUNK = 500


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RESULTS:
        terminalreporter.section("chaos: accepted / delivered / duplicated / lost")
        for line in RESULTS:
            terminalreporter.write_line(line)


@pytest.fixture
def sendgrid() -> Iterator[SendGridEmulator]:
    emulator = SendGridEmulator().start()
    yield emulator
    emulator.stop()


@pytest.fixture
def twilio() -> Iterator[TwilioEmulator]:
    emulator = TwilioEmulator().start()
    yield emulator
    emulator.stop()


@pytest.fixture
def chaos_template(owner: Any) -> Any:
    return TemplateFactory(
        owner=owner, key="chaos", content={k: dict(v) for k, v in CONTENT.items()}
    )


def phone(n: int) -> str:
    return f"+1415555{n % 10000:04d}"


def item(n: int, run: str, *, channels: list[str] | None = None) -> dict[str, Any]:
    """One notification of the bulk endpoint, to recipient n, with a ref unique in the run."""
    body: dict[str, Any] = {
        "recipient": {"id": f"u{n}", "email": f"u{n}@example.com", "phone": phone(n)},
        "template": "chaos",
        "data": {"ref": f"{run}-{n}"},
    }
    if channels is not None:
        body["channels"] = channels
    return body


def record(
    ledger: Ledger, notification_id: str, ref: str, deliveries: list[dict[str, Any]]
) -> None:
    """Enter a notification's queued deliveries in the ledger under their trace values."""
    for delivery in deliveries:
        if delivery["status"] != "queued":
            continue
        channel = delivery["channel"]
        ledger.accept(channel, ref if channel == "sms" else notification_id)


def committed(ledger: Ledger) -> dict[str, tuple[str, ...]]:
    """Enter every delivery the database holds that was accepted for sending (whatever it
    became since: a worker may have sent it already) in the ledger; return each notification's
    channels, to check that none is half-written."""
    written = {}
    for notification in Notification.objects.prefetch_related("deliveries"):
        deliveries = list(notification.deliveries.all())
        written[str(notification.pk)] = tuple(sorted(d.channel for d in deliveries))
        record(
            ledger,
            str(notification.pk),
            notification.data["ref"],
            [
                {"channel": d.channel, "status": "skipped" if d.skip_reason else "queued"}
                for d in deliveries
            ],
        )
    return written


def accept_bulk(
    api: APIClient, ledger: Ledger, items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """POST the items to /notifications/bulk in chunks; every one must be accepted."""
    results = []
    for start in range(0, len(items), BULK_CHUNK):
        chunk = items[start : start + BULK_CHUNK]
        response = api.post("/api/v1/notifications/bulk", {"notifications": chunk}, format="json")
        assert response.status_code == 200, response.content
        body = response.json()
        assert (body["accepted"], body["rejected"]) == (len(chunk), 0), body
        for result, sent in zip(body["results"], chunk, strict=True):
            record(ledger, result["id"], sent["data"]["ref"], result["deliveries"])
            results.append(result)
    return results


def received(sendgrid: SendGridEmulator | None, twilio: TwilioEmulator | None) -> dict[str, Any]:
    """What each provider took, per trace value."""
    counts = {}
    if sendgrid is not None:
        counts["email"] = sendgrid.count_by("notification_id", accepted_only=True)
    if twilio is not None:
        counts["sms"] = twilio.count_by("body", accepted_only=True)
    return counts
