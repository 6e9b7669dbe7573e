"""Status webhooks out: endpoints registered over the API (public https only), every status
change turned into signed messages that a real HTTP receiver checks with the Standard
Webhooks reference implementation, retries and the breaker while the receiver is down,
dead messages replayed, endpoints disabled after failing for long, and no SSRF through DNS."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient
from standardwebhooks.webhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

from notifications.models import Delivery, Webhook, WebhookMessage
from tests.emulators.base import Response
from tests.emulators.webhook_receiver import WebhookReceiver
from workers.providers import provider_for
from workers.services import deliveries_process
from workers.webhook_sender import webhooks_send_due

pytestmark = pytest.mark.django_db

PUBLIC_URL = "https://93.184.216.34/hooks/clarion"


@pytest.fixture
def receiver(settings: Any) -> Iterator[WebhookReceiver]:
    settings.WEBHOOK_ALLOW_PRIVATE = True
    settings.EMAIL_PROVIDER = settings.SMS_PROVIDER = "sandbox"
    settings.CIRCUIT_FAILURE_THRESHOLD = 2
    settings.CIRCUIT_OPEN_SECONDS = 1
    settings.CIRCUIT_SUCCESS_THRESHOLD = 1
    provider_for.cache_clear()
    endpoint = WebhookReceiver().start()
    yield endpoint
    endpoint.stop()
    provider_for.cache_clear()


def _register(api: APIClient, url: str, *types: str) -> dict[str, Any]:
    answer = api.post("/api/v1/webhooks", {"url": url, "event_types": list(types)}, format="json")
    assert answer.status_code == 201, answer.content
    return dict(answer.json())


def _send(api: APIClient, n: int, channels: list[str]) -> str:
    answer = api.post(
        "/api/v1/notifications",
        {
            "recipient": {
                "id": f"user-{n}",
                "email": f"user-{n}@example.com",
                "phone": "+14155550100",
            },
            "template": "order_shipped",
            "data": {"order_id": f"A-{n}"},
            "channels": channels,
        },
        format="json",
    )
    assert answer.status_code == 202, answer.content
    ids = list(
        Delivery.objects.filter(notification_id=answer.json()["id"]).values_list("pk", flat=True)
    )
    deliveries_process(delivery_ids=ids)
    return str(answer.json()["id"])


def _verified(receiver: WebhookReceiver, secret: str) -> list[dict[str, Any]]:
    """Every POST the receiver got, checked with the reference implementation."""
    verifier = Verifier(secret)
    out = []
    for request in receiver.requests():
        headers = {k: v for k, v in request.headers.items() if k.startswith("webhook-")}
        out.append({"id": headers["webhook-id"], **verifier.verify(request.body, headers)})
    return out


def test_registering_accepts_public_https_only_and_shows_the_secret_once(
    api: APIClient, other_api: APIClient
) -> None:
    created = _register(api, PUBLIC_URL, "delivery.sent", "delivery.dead")
    assert created["secret"].startswith("whsec_")
    assert (created["url"], created["event_types"]) == (
        PUBLIC_URL,
        ["delivery.dead", "delivery.sent"],
    )
    listed = api.get("/api/v1/webhooks").json()
    assert [w["id"] for w in listed] == [created["id"]]
    assert "secret" not in listed[0]
    assert (listed[0]["pending"], listed[0]["dead"], listed[0]["disabled_at"]) == (0, 0, None)
    refused = {
        url: api.post(
            "/api/v1/webhooks", {"url": url, "event_types": ["delivery.sent"]}, format="json"
        )
        for url in (
            "http://93.184.216.34/hook",
            "https://127.0.0.1/hook",
            "https://10.1.2.3/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/hook",
            "https://user:pw@93.184.216.34/hook",
        )
    }
    assert {url: a.status_code for url, a in refused.items()} == dict.fromkeys(refused, 400)
    assert refused["http://93.184.216.34/hook"].json()["fields"] == {
        "url": ["Only https:// URLs are accepted."]
    }
    assert refused["https://10.1.2.3/hook"].json()["fields"] == {
        "url": ["The host resolves to 10.1.2.3, which is not a public address."]
    }
    bad_type = api.post(
        "/api/v1/webhooks", {"url": PUBLIC_URL, "event_types": ["delivery.lost"]}, format="json"
    )
    assert bad_type.status_code == 400 and "event_types.0" in bad_type.json()["fields"]

    rotated = api.post(f"/api/v1/webhooks/{created['id']}/rotate-secret").json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    assert other_api.delete(f"/api/v1/webhooks/{created['id']}").status_code == 404
    assert api.delete(f"/api/v1/webhooks/{created['id']}").status_code == 204
    assert api.delete(f"/api/v1/webhooks/{created['id']}").status_code == 404


def test_status_changes_arrive_signed_once_each(
    api: APIClient, template: Any, receiver: WebhookReceiver
) -> None:
    hook = _register(api, f"{receiver.url}/hook", "delivery.sent", "notification.completed")
    first = _send(api, 1, ["email", "sms"])
    second = _send(api, 2, ["email"])
    assert webhooks_send_due() == 5
    assert webhooks_send_due() == 0
    got = _verified(receiver, hook["secret"])
    assert len({g["id"] for g in got}) == 5
    kinds = Counter((g["type"], g["data"]["notification_id"]) for g in got)
    assert kinds == Counter(
        {
            ("delivery.sent", first): 2,
            ("notification.completed", first): 1,
            ("delivery.sent", second): 1,
            ("notification.completed", second): 1,
        }
    )
    completed = next(
        g
        for g in got
        if g["type"] == "notification.completed" and g["data"]["notification_id"] == first
    )
    assert completed["data"] == {
        "notification_id": first,
        "recipient": "user-1",
        "deliveries": {"email": "sent", "sms": "sent"},
    }
    sent = next(g for g in got if g["type"] == "delivery.sent" and g["data"]["channel"] == "sms")
    assert (sent["data"]["recipient"], sent["data"]["status"], sent["data"]["detail"]) == (
        "user-1",
        "sent",
        "sandbox",
    )
    # A forged body does not pass the reference check.
    request = receiver.requests()[0]
    headers = {k: v for k, v in request.headers.items() if k.startswith("webhook-")}
    with pytest.raises(WebhookVerificationError):
        Verifier(hook["secret"]).verify(request.body.replace(b"sent", b"dead"), headers)
    assert set(WebhookMessage.objects.values_list("status", flat=True)) == {"sent"}


def test_after_a_rotation_both_secrets_verify_during_the_rollover(
    api: APIClient, template: Any, receiver: WebhookReceiver
) -> None:
    hook = _register(api, f"{receiver.url}/hook", "delivery.sent")
    new = api.post(f"/api/v1/webhooks/{hook['id']}/rotate-secret").json()["secret"]
    _send(api, 1, ["email"])
    webhooks_send_due()
    [request] = receiver.requests()
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert len(_verified(receiver, new)) == 1
    assert len(_verified(receiver, hook["secret"])) == 1


def test_a_receiver_down_gets_everything_once_when_it_is_back(
    api: APIClient, template: Any, receiver: WebhookReceiver, settings: Any
) -> None:
    settings.WEBHOOK_CONCURRENCY = 1  # one call at a time: the breaker's count is exact
    hook = _register(api, f"{receiver.url}/hook", "delivery.sent")
    receiver.stop()  # connection refused
    for n in range(5):
        _send(api, n, ["email"])
    assert webhooks_send_due() == 0
    # Two failures opened the host's breaker: the other three wait without spending attempts.
    attempts = sorted(WebhookMessage.objects.values_list("attempts", flat=True))
    assert attempts == [0, 0, 0, 1, 1]
    assert Webhook.objects.get(pk=hook["id"]).failing_since is not None
    assert set(WebhookMessage.objects.values_list("status", flat=True)) == {"pending"}

    receiver.start()
    time.sleep(1.2)  # CIRCUIT_OPEN_SECONDS
    WebhookMessage.objects.update(next_attempt_at=timezone.now())
    # As the schedule does: rounds until nothing is left (the half-open breaker lets one
    # trial through first; the others wait for it to close).
    sent, deadline = 0, time.monotonic() + 15
    while sent < 5 and time.monotonic() < deadline:
        sent += webhooks_send_due()
        time.sleep(0.2)
    assert sent == 5
    got = _verified(receiver, hook["secret"])
    assert len(got) == 5 and len({g["id"] for g in got}) == 5
    assert Webhook.objects.get(pk=hook["id"]).failing_since is None


def test_dead_messages_replay_and_an_endpoint_failing_for_days_is_disabled(
    api: APIClient, template: Any, receiver: WebhookReceiver, settings: Any
) -> None:
    hook = _register(api, f"{receiver.url}/hook", "delivery.sent")
    receiver.fail_always(Response(500, {"error": "boom"}))
    settings.WEBHOOK_RETRY_FOR_SECONDS = 0  # the first failure is the last
    settings.CIRCUIT_FAILURE_THRESHOLD = 100
    _send(api, 1, ["email"])
    webhooks_send_due()
    [dead] = WebhookMessage.objects.all()
    assert (dead.status, dead.attempts, dead.last_status_code) == ("dead", 1, 500)
    assert dead.last_error == 'HTTP 500: {"error": "boom"}'
    assert api.get("/api/v1/webhooks").json()[0]["dead"] == 1

    # Failing for longer than WEBHOOK_DISABLE_AFTER_SECONDS: switched off, and said so.
    Webhook.objects.filter(pk=hook["id"]).update(failing_since=timezone.now() - timedelta(days=6))
    settings.WEBHOOK_RETRY_FOR_SECONDS = 3600
    _send(api, 2, ["email"])
    webhooks_send_due()
    disabled = api.get("/api/v1/webhooks").json()[0]
    assert disabled["disabled_at"] is not None
    assert disabled["disabled_reason"].startswith("every call failed for 6.0 days")
    _send(api, 3, ["email"])
    assert WebhookMessage.objects.count() == 2  # a disabled endpoint gets no new messages

    receiver.fail_always(None)
    replayed = api.post(f"/api/v1/webhooks/{hook['id']}/replay")
    assert (replayed.status_code, replayed.json()) == (202, {"count": 1})
    WebhookMessage.objects.update(next_attempt_at=timezone.now())
    assert webhooks_send_due() == 2
    assert {g["id"] for g in _verified(receiver, hook["secret"])} >= {dead.msg_id}
    assert api.get("/api/v1/webhooks").json()[0]["disabled_at"] is None


def test_an_address_that_turned_private_is_refused_at_send_time(
    api: APIClient, template: Any, receiver: WebhookReceiver, settings: Any, owner: Any
) -> None:
    # Registered while its name pointed elsewhere; it resolves to loopback now.
    Webhook.objects.create(
        owner=owner,
        url=f"https://localhost:{receiver.port}/hook",
        event_types=["delivery.sent"],
        secret="whsec_" + "A" * 44,
    )
    settings.WEBHOOK_ALLOW_PRIVATE = False
    _send(api, 1, ["email"])
    webhooks_send_due()
    [message] = WebhookMessage.objects.all()
    assert message.status == "dead"
    assert message.last_error.startswith("refused: The host resolves to ")
    assert message.last_error.endswith("which is not a public address.")
    assert receiver.requests() == []
