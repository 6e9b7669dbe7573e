"""The queues as the broker sees them once a worker has started, on Redis and on RabbitMQ: each
queue bound to an exchange of its own by its own name, each routing key reaching one queue,
and the bindings of earlier releases (every queue bound to `maintenance` by `maintenance`)
gone. Then a delivery task published by exchange and key lands in its queue only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Callable

import pytest
from django.conf import settings
from kombu import Connection, Exchange, Queue

from project.celery import DEFAULT_QUEUE, app
from tests.conftest import Process, wait_until

pytestmark = pytest.mark.pipeline

NAMES = tuple(settings.CELERY_QUEUES)
Bindings = dict[tuple[str, str], set[str]]


def _brokers() -> list[object]:
    rabbitmq = os.environ.get("TEST_RABBITMQ_URL")
    return [
        pytest.param(settings.CELERY_BROKER_URL, id="redis"),
        pytest.param(
            rabbitmq,
            id="rabbitmq",
            marks=pytest.mark.skipif(
                not rabbitmq, reason="TEST_RABBITMQ_URL is not set (CI sets it)"
            ),
        ),
    ]


def _legacy_bindings_planted(connection: Connection) -> None:
    """What the brokers of earlier releases hold: every queue declared on the exchange
    `maintenance` with the routing key `maintenance`."""
    legacy = Exchange(DEFAULT_QUEUE, type="direct")
    for name in NAMES:
        Queue(name, legacy, routing_key=DEFAULT_QUEUE)(connection.default_channel).declare()


def _redis_bindings(connection: Connection) -> Bindings:
    channel = connection.default_channel
    client = channel.client
    found: Bindings = defaultdict(set)
    for name in NAMES:
        for member in client.smembers(channel.keyprefix_queue % name):
            routing_key, _pattern, queue = member.decode().split(channel.sep)
            found[(name, routing_key)].add(queue)
    return found


def _rabbitmq_bindings() -> Bindings:
    rabbitmqctl = shutil.which("rabbitmqctl")
    assert rabbitmqctl, "rabbitmqctl is missing: the RabbitMQ test reads bindings with it"
    listed = subprocess.run(
        [
            rabbitmqctl,
            "list_bindings",
            "-q",
            "--formatter",
            "json",
            "source_name",
            "routing_key",
            "destination_name",
            "destination_kind",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    found: Bindings = defaultdict(set)
    for row in json.loads(listed.stdout):
        # The default exchange ("") binds every queue by its name, implicitly.
        if row["source_name"] in NAMES and row["destination_kind"] == "queue":
            found[(row["source_name"], row["routing_key"])].add(row["destination_name"])
    return found


def _depths(connection: Connection) -> dict[str, int]:
    channel = connection.default_channel
    if connection.transport.driver_type == "redis":
        # A Redis queue is a list, and an empty list does not exist: a passive declare fails.
        return {name: channel.client.llen(name) for name in NAMES}
    return {name: channel.queue_declare(queue=name, passive=True).message_count for name in NAMES}


@pytest.mark.parametrize("broker", _brokers())
def test_each_routing_key_reaches_one_queue(
    broker: str,
    celery_worker_process: Callable[..., Process],
) -> None:
    with Connection(broker) as connection:
        _legacy_bindings_planted(connection)
        worker = celery_worker_process(",".join(NAMES), relay=False, CELERY_BROKER_URL=broker)
        worker.stop()

        bindings = (
            _redis_bindings(connection) if broker.startswith("redis") else _rabbitmq_bindings()
        )
        assert dict(bindings) == {(name, name): {name} for name in NAMES}

        channel = connection.default_channel
        try:
            for name in NAMES:
                channel.queue_purge(name)
            for name in NAMES:
                task = (
                    f"clarion.deliver.{name}"
                    if name != DEFAULT_QUEUE
                    else "clarion.sweep_deliveries"
                )
                app.send_task(
                    task,
                    args=[[0]] if name != DEFAULT_QUEUE else [],
                    exchange=name,
                    routing_key=name,
                    connection=connection,
                )
                # RabbitMQ counts a message once it has routed it: a moment after the publish.
                wait_until(
                    lambda name=name: _depths(connection)[name] == 1,
                    timeout=10,
                    message=f"the task published to {name} in its queue",
                )
                assert _depths(connection) == {n: int(n == name) for n in NAMES}, name
                channel.queue_purge(name)
        finally:
            for name in NAMES:
                channel.queue_purge(name)
