"""Fixtures of the cluster scenarios: the network and its hosts (torn down after every test,
whatever happened), the emulators on the bridge address, recipients with live sockets, and
the accounting shared with tests/chaos."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from notifications.models import Recipient
from notifications.tokens import recipient_token_issue
from tests.chaos.conftest import CONTENT, phone
from tests.chaos.harness import RESULTS
from tests.cluster.harness import Cluster, require_cluster
from tests.cluster.net import GATEWAY
from tests.conftest import Process
from tests.emulators.base import Emulator
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.factories import TemplateFactory


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# `timeout`, CI runners and service managers stop a run with SIGTERM, which pytest does not
# turn into a teardown; as an interrupt it does, and the fixtures remove the cluster.
signal.signal(signal.SIGTERM, _interrupt)

E = TypeVar("E", bound=Emulator)

CLUSTER_CONTENT = {**CONTENT, "web": {"title": "Cluster {{ ref }}", "body": "{{ ref }}"}}


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = [line for line in RESULTS if line.startswith("cluster")]
    if lines:
        terminalreporter.section("cluster: accepted / delivered / duplicated / lost")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def cluster(spawn: Callable[..., Process], tmp_path: Path) -> Iterator[Cluster]:
    require_cluster()
    built = Cluster(spawn, tmp_path)
    try:
        built.bridge()
        yield built
    finally:
        built.down()


def _on_the_bridge(emulator: E) -> Iterator[E]:
    """The emulator listening on the machine's bridge address, where the hosts reach it."""
    emulator.host = GATEWAY
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def sendgrid(cluster: Cluster) -> Iterator[SendGridEmulator]:
    yield from _on_the_bridge(SendGridEmulator())


@pytest.fixture
def twilio(cluster: Cluster) -> Iterator[TwilioEmulator]:
    yield from _on_the_bridge(TwilioEmulator())


@pytest.fixture
def provider_env(sendgrid: SendGridEmulator, twilio: TwilioEmulator) -> dict[str, str]:
    return {**sendgrid.settings_env(), **twilio.settings_env()}


@pytest.fixture
def cluster_template(owner: Any) -> Any:
    return TemplateFactory(
        owner=owner, key="chaos", content={k: dict(v) for k, v in CLUSTER_CONTENT.items()}
    )


def recipients(owner: Any, count: int) -> list[str]:
    """`count` recipients (u0, u1, ...), each with an address of every channel; returns a
    WebSocket token for each, in order."""
    tokens = []
    for n in range(count):
        recipient = Recipient.objects.create(
            owner=owner, external_id=f"u{n}", email=f"u{n}@example.com", phone=phone(n)
        )
        tokens.append(recipient_token_issue(owner_id=owner.pk, recipient_id=recipient.pk).token)
    return tokens


def frames(path: Path, *, again: bool = False) -> Counter[str]:
    """How many times the clients showed each notification's in-app frame (a client shows a
    position once, as clarion.js does); with `again`, how many times one arrived that its
    client had already seen."""
    counts: Counter[str] = Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            if line:
                frame = json.loads(line)
                if frame["again"] == again:
                    counts[frame["id"]] += 1
    return counts


def received_all(
    sendgrid: SendGridEmulator, twilio: TwilioEmulator, frames_path: Path
) -> dict[str, Counter[str]]:
    """What the providers and the sockets took, per trace value (tests/chaos's ledger)."""
    return {
        "email": sendgrid.count_by("notification_id", accepted_only=True),
        "sms": twilio.count_by("body", accepted_only=True),
        "web": frames(frames_path),
    }
