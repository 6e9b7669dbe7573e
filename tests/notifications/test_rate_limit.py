"""The API gateway's per-key rate limit: one token bucket per API key in Redis, shared by every
API process, answering 429 with Retry-After; and the client address behind proxies."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.test import RequestFactory
from redis.exceptions import ConnectionError as RedisConnectionError
from rest_framework.test import APIClient

from core.rate_limiter import token_bucket_take
from notifications.api import throttling
from notifications.api.middleware import client_ip
from notifications.models import ApiKey
from notifications.services import api_key_create
from tests.conftest import ROOT, Process, process_env
from tests.project.api_server import http, start_api_server

THROTTLED_BODY = {
    "error": "rate_limited",
    "detail": "Request was throttled. Expected available in 1 second.",
}


def _key(owner: Any, name: str, rate: int | None) -> str:
    api_key, raw_key = api_key_create(owner_name=owner.name, name=name)
    ApiKey.objects.filter(pk=api_key.pk).update(rate_limit_per_second=rate)
    return raw_key


def _client(raw_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    return client


def test_the_bucket_script_is_the_workers_one_keyed_by_caller() -> None:
    assert token_bucket_take(key="t:a", per_second=1, capacity=3, max_wait=0, want=5) == (3, 0.0)
    granted, wait = token_bucket_take(key="t:a", per_second=1, capacity=3, max_wait=0, want=1)
    assert granted == 0
    assert 0.9 < wait <= 1.0
    assert token_bucket_take(key="t:b", per_second=1, capacity=3, max_wait=0, want=1) == (1, 0.0)


@pytest.mark.django_db
def test_an_empty_bucket_answers_429_with_retry_after(owner: Any) -> None:
    client = _client(_key(owner, "one-a-second", 1))
    assert client.get("/api/v1/templates").status_code == 200
    refused = client.get("/api/v1/templates")
    assert refused.status_code == 429
    assert refused["Retry-After"] == "1"
    assert refused.json() == THROTTLED_BODY


@pytest.mark.django_db
def test_a_key_without_a_limit_takes_the_setting_and_zero_means_none(
    owner: Any, settings: Any
) -> None:
    settings.API_RATE_LIMIT_PER_SECOND = 2
    default = _client(_key(owner, "default", None))
    assert [default.get("/api/v1/templates").status_code for _ in range(3)] == [200, 200, 429]
    unlimited = _client(_key(owner, "unlimited", 0))
    assert {unlimited.get("/api/v1/templates").status_code for _ in range(20)} == {200}
    # Each key has a bucket of its own, even for the same owner.
    other = _client(_key(owner, "other", None))
    assert other.get("/api/v1/templates").status_code == 200


@pytest.mark.django_db
def test_requests_go_through_when_redis_is_down(
    owner: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def redis_down(**kwargs: Any) -> tuple[int, float]:
        raise RedisConnectionError("down")

    monkeypatch.setattr(throttling, "token_bucket_take", redis_down)
    client = _client(_key(owner, "one-a-second", 1))
    assert [client.get("/api/v1/templates").status_code for _ in range(3)] == [200, 200, 200]


@pytest.mark.django_db
def test_unauthenticated_requests_are_refused_before_any_bucket(settings: Any) -> None:
    settings.API_RATE_LIMIT_PER_SECOND = 1
    answers = [APIClient().get("/api/v1/templates").status_code for _ in range(3)]
    assert answers == [401, 401, 401]


# --- Across API processes -------------------------------------------------------------------


@dataclass
class _Result:
    status: int
    retry_after: str | None
    body: bytes
    sent: float
    done: float


@pytest.mark.django_db(transaction=True)
def test_a_key_limited_to_50_per_second_across_two_api_processes(
    owner: Any, spawn: Callable[..., Process], tmp_path: Path, settings: Any
) -> None:
    rate, total, threads = 50, 200, 4
    limited = _key(owner, "limited", rate)
    unlimited = _key(owner, "warm-up", 0)
    bases = [start_api_server(spawn, tmp_path, name=f"api-{n}")[1] for n in range(2)]
    for base in bases:
        # The first requests of a process load code and open connections.
        for _ in range(5):
            warm = http(
                "GET", f"{base}/api/v1/templates", headers={"Authorization": f"Bearer {unlimited}"}
            )
            assert warm.status == 200
    capacity = rate * settings.API_RATE_LIMIT_BURST_SECONDS
    results: list[_Result] = []
    lock = threading.Lock()
    start = time.monotonic() + 0.2

    def client(k: int) -> None:
        connections = []
        for base in bases:
            address = urlsplit(base)
            connections.append(HTTPConnection(address.hostname, address.port, timeout=10))
        for j in range(total // threads):
            # 200 requests spread evenly over one second, each thread alternating servers.
            due = start + (j * threads + k) / total
            time.sleep(max(0.0, due - time.monotonic()))
            connection = connections[(j + k) % 2]
            sent = time.monotonic()
            connection.request(
                "OPTIONS", "/api/v1/templates", headers={"Authorization": f"Bearer {limited}"}
            )
            answer = connection.getresponse()
            body = answer.read()
            with lock:
                results.append(
                    _Result(
                        answer.status, answer.getheader("Retry-After"), body, sent, time.monotonic()
                    )
                )
        for connection in connections:
            connection.close()

    workers = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    assert len(results) == total
    accepted = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status != 200]
    # The bucket starts full and refills at the rate while requests keep coming faster than
    # it: accepted = capacity + rate * (time between the first and the last token taken),
    # which lies between these two bounds measured on the client side.
    shortest = max(r.sent for r in results) - min(r.done for r in results)
    longest = max(r.done for r in results) - min(r.sent for r in results)
    # Paced over one second at least; a machine too slow to send well over the rate could
    # not show the limit at all.
    assert shortest > 0.9
    assert capacity + rate * longest < total - 20, f"too slow: {total} requests in {longest}s"
    assert {r.status for r in refused} == {429}
    assert {r.retry_after for r in refused} == {"1"}
    assert {r.body for r in refused} == {refused[0].body}
    assert json.loads(refused[0].body) == THROTTLED_BODY
    low = capacity + rate * shortest - 2
    high = capacity + rate * longest + 2
    assert low <= len(accepted) <= high, (len(accepted), low, high)


# --- The client address behind proxies ------------------------------------------------------


@pytest.mark.parametrize(
    ("proxies", "forwarded", "expected"),
    [
        (0, "203.0.113.9", "10.0.0.1"),
        (1, None, "10.0.0.1"),
        (1, "203.0.113.9", "203.0.113.9"),
        (1, "198.51.100.7, 203.0.113.9", "203.0.113.9"),
        (2, "198.51.100.7, 203.0.113.9", "198.51.100.7"),
        (2, "spoofed, 198.51.100.7, 203.0.113.9", "198.51.100.7"),
        (3, "198.51.100.7, 203.0.113.9", "198.51.100.7"),
        (1, "198.51.100.7, not-an-address", "10.0.0.1"),
        (1, "2001:db8::1", "2001:db8::1"),
    ],
)
def test_client_ip_counts_trusted_proxies_from_the_right(
    settings: Any, proxies: int, forwarded: str | None, expected: str
) -> None:
    settings.NUM_PROXIES = proxies
    meta = {"REMOTE_ADDR": "10.0.0.1"}
    if forwarded is not None:
        meta["HTTP_X_FORWARDED_FOR"] = forwarded
    assert client_ip(RequestFactory().get("/", **meta)) == expected


def test_trust_x_forwarded_proto_sets_the_secure_proxy_header(tmp_path: Path) -> None:
    probe = "from django.conf import settings; print(settings.SECURE_PROXY_SSL_HEADER)"
    for value, expected in (("true", "('HTTP_X_FORWARDED_PROTO', 'https')"), ("false", "None")):
        env = process_env(
            tmp_path, TRUST_X_FORWARDED_PROTO=value, DJANGO_SETTINGS_MODULE="project.settings"
        )
        out = subprocess.run(
            [sys.executable, "-c", f"import django; django.setup(); {probe}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == expected


@pytest.mark.django_db
def test_the_schema_documents_429_on_api_key_operations() -> None:
    schema = APIClient().get("/api/schema/?format=json").json()
    too_many = {
        (path, method): "429" in operation["responses"]
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    }
    assert too_many[("/api/v1/notifications", "post")] is True
    assert too_many[("/api/v1/templates", "get")] is True
    # The inbox authenticates with a recipient token: no API key, no API-key bucket.
    assert too_many[("/api/v1/inbox", "get")] is False
    header = schema["paths"]["/api/v1/templates"]["get"]["responses"]["429"]["headers"]
    assert header == {
        "Retry-After": {
            "schema": {"type": "integer"},
            "description": "Seconds until the key may send again.",
        }
    }


def _redis_sends(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per request written to any Redis connection (a pipeline is one) by this
    thread: the request's own, not the in-app push that runs after its commit on a thread of
    its own (workers/web_push.py)."""
    import threading

    import redis.connection

    sends: list[int] = []
    original = redis.connection.AbstractConnection.send_packed_command
    caller = threading.get_ident()

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == caller:
            sends.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    return sends


def _post(client: APIClient, key: str | None, body: dict[str, Any]) -> Any:
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key else {}
    return client.post("/api/v1/notifications", body, format="json", **headers)


SEND = {"recipient": {"id": "u-1"}, "template": "order_shipped", "data": {"order_id": "A-1"}}


@pytest.mark.django_db(transaction=True)
def test_with_an_idempotency_key_the_token_and_the_key_take_one_round_trip(
    owner: Any, template: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    # The cache version is checked once in a minute here, so no check falls in the request.
    settings.CACHE_LOCAL_CHECK_SECONDS = 60
    client = _client(_key(owner, "limited", 100))
    # Warm: the API key, template and recipient are read once, then held by this process
    # (the first send creates the recipient, which changes the cache version).
    for warm_up in ("warm-up-1", "warm-up-2"):
        assert _post(client, warm_up, SEND).status_code == 202
    sends = _redis_sends(monkeypatch)
    assert _post(client, "order-1", SEND).status_code == 202
    # The token with the key; the answer remembered under the key. (The only delivery due,
    # the in-app one, is pushed by this process after the commit, on a thread of its own:
    # no relay to wake.)
    assert len(sends) == 2


@pytest.mark.django_db
def test_over_the_limit_with_an_idempotency_key_the_key_stays_free(
    owner: Any, template: Any
) -> None:
    client = _client(_key(owner, "one-a-second", 1))
    assert _post(client, "first", SEND).status_code == 202
    refused = _post(client, "second", SEND)
    assert refused.status_code == 429
    assert refused["Retry-After"] == "1"
    assert refused.json() == THROTTLED_BODY
    # An invalid body over the limit is refused for the limit, as without a key.
    assert _post(client, "third", {"template": "order_shipped"}).status_code == 429
    time.sleep(1.05)
    # The refused key was not kept in flight: its retry goes through (not 409).
    assert _post(client, "second", SEND).status_code == 202
    time.sleep(1.05)
    invalid = _post(client, "fourth", {"template": "order_shipped"})
    assert invalid.status_code == 400
    assert "recipient" in invalid.json()["fields"]


@pytest.mark.django_db
def test_an_overlong_idempotency_key_is_throttled_before_it_is_refused(owner: Any) -> None:
    client = _client(_key(owner, "one-a-second", 1))
    assert client.get("/api/v1/templates").status_code == 200
    assert _post(client, "k" * 256, SEND).status_code == 429
