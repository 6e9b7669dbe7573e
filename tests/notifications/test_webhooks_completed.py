"""`notification.completed` for every way a notification ends: its last delivery sent,
delivered or read, failed or bounced by the provider's report, dead, cancelled (the cancel API,
an escalation step a read made unneeded, a topic cancel, an erasure), skipped at acceptance or
at send time, digested. Each arrives at a real receiver, signed as Standard Webhooks says
(checked with the reference implementation), once per notification, with every delivery's
final status; two channels settled in two concurrent transactions complete it once too."""

from __future__ import annotations

import functools
import json
import threading
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from notifications.models import (
    CompletionCheck,
    Delivery,
    DeliveryEvent,
    Notification,
    Recipient,
    Topic,
    TopicSubscription,
    WebhookMessage,
)
from notifications.services import ERASED_PREFIX
from notifications.suppressions import suppression_add
from tests.emulators.sendgrid import SendGridEmulator
from tests.emulators.twilio import TwilioEmulator
from tests.emulators.webhook_receiver import WebhookReceiver
from tests.factories import TemplateFactory
from workers import fanout, transitions
from workers.provider_events import provider_events_apply
from workers.providers import provider_for
from workers.relay import outbox_publish_due
from workers.services import deliveries_process
from workers.webhook_sender import webhooks_send_due

pytestmark = pytest.mark.django_db

URL = "/api/v1/notifications"
COMPLETED = "notification.completed"
TWILIO_HOOK_URL = "http://testserver/hooks/twilio"


@pytest.fixture
def receiver(settings: Any) -> Iterator[WebhookReceiver]:
    settings.WEBHOOK_ALLOW_PRIVATE = True
    settings.EMAIL_PROVIDER = settings.SMS_PROVIDER = settings.WEB_PROVIDER = "sandbox"
    provider_for.cache_clear()
    endpoint = WebhookReceiver().start()
    yield endpoint
    endpoint.stop()
    provider_for.cache_clear()


def register(api: APIClient, receiver: WebhookReceiver, *types: str) -> str:
    answer = api.post(
        "/api/v1/webhooks",
        {"url": f"{receiver.url}/hook", "event_types": list(types)},
        format="json",
    )
    assert answer.status_code == 201, answer.content
    return str(answer.json()["secret"])


@pytest.fixture
def secret(api: APIClient, receiver: WebhookReceiver) -> str:
    return register(api, receiver, COMPLETED)


@pytest.fixture
def providers(receiver: WebhookReceiver, settings: Any) -> Iterator[tuple[Any, Any]]:
    """SendGrid for email and Twilio for SMS, both emulated, instead of the sandbox."""
    sendgrid, twilio = SendGridEmulator().start(), TwilioEmulator().start()
    for emulator in (sendgrid, twilio):
        for name, value in emulator.settings_overrides().items():
            setattr(settings, name, value)
    provider_for.cache_clear()
    yield sendgrid, twilio
    provider_for.cache_clear()
    sendgrid.stop()
    twilio.stop()


def accept(
    api: APIClient,
    rid: str,
    channels: list[str] | None,
    *,
    contact: bool = True,
    template: str = "order_shipped",
    **fields: Any,
) -> str:
    recipient: dict[str, str] = {"id": rid}
    if contact:
        recipient |= {"email": f"{rid}@example.com", "phone": "+14155550100"}
    body: dict[str, Any] = {
        "recipient": recipient,
        "template": template,
        "data": {"order_id": "A-1", "project_id": "apollo", "what": rid},
        **fields,
    }
    if channels is not None:
        body["channels"] = channels
    answer = api.post(URL, body, format="json")
    assert answer.status_code == 202, answer.content
    return str(answer.json()["id"])


def process(notification_id: str, channel: str) -> None:
    """The channel's worker sends that delivery (one claimed batch)."""
    ids = list(
        Delivery.objects.filter(notification_id=notification_id, channel=channel).values_list(
            "pk", flat=True
        )
    )
    deliveries_process(delivery_ids=ids)


def completed(receiver: WebhookReceiver, secret: str) -> dict[str, dict[str, Any]]:
    """One round of the webhooks worker, then every `notification.completed` the receiver
    has got so far, each verified with the reference implementation, by notification id;
    fails when a notification completed twice or anything else arrived."""
    webhooks_send_due()
    got = receiver.verified(secret)
    assert {g["type"] for g in got} <= {COMPLETED}
    twice = [
        n for n, count in Counter(g["data"]["notification_id"] for g in got).items() if count > 1
    ]
    assert twice == []
    assert CompletionCheck.objects.count() == 0
    return {g["data"]["notification_id"]: g["data"] for g in got}


def data(notification_id: str, recipient: str, **deliveries: str) -> dict[str, Any]:
    return {"notification_id": notification_id, "recipient": recipient, "deliveries": deliveries}


def browser(api: APIClient, rid: str) -> APIClient:
    token = api.post(f"/api/v1/recipients/{rid}/token").json()["token"]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def later() -> str:
    return (timezone.now() + timedelta(hours=1)).isoformat()


# --- Sent, delivered, read -------------------------------------------------------------------


def test_the_last_delivery_sent_completes_it_once(
    api: APIClient, template: Any, receiver: WebhookReceiver, secret: str
) -> None:
    nid = accept(api, "user-1", ["email", "sms"])
    process(nid, "email")
    assert completed(receiver, secret) == {}
    process(nid, "sms")
    assert completed(receiver, secret) == {nid: data(nid, "user-1", email="sent", sms="sent")}
    assert WebhookMessage.objects.count() == 1


def test_an_in_app_delivery_acknowledged_or_read_before_it_was_sent_completes_it(
    api: APIClient, template: Any, receiver: WebhookReceiver, secret: str
) -> None:
    acked = accept(api, "user-1", ["web"])
    read = accept(api, "user-2", ["web"])
    # The browser has them from the inbox before the worker pushed them.
    person = Recipient.objects.get(external_id="user-1")
    assert transitions.inbox_acknowledge(
        recipient_id=person.pk, notification_id=uuid.UUID(acked), source="websocket"
    )
    answer = browser(api, "user-2").post(f"/api/v1/inbox/{read}/read")
    assert answer.status_code in (200, 204)
    expected = {
        acked: data(acked, "user-1", web="delivered"),
        read: data(read, "user-2", web="read"),
    }
    assert completed(receiver, secret) == expected

    # Later moves of deliveries that were final already check nothing: delivered → read.
    assert browser(api, "user-1").post(f"/api/v1/inbox/{acked}/read").status_code in (200, 204)
    assert Delivery.objects.get(notification_id=acked).status == "read"
    assert CompletionCheck.objects.count() == 0
    assert completed(receiver, secret) == expected


# --- Provider reports: delivered, bounced, failed --------------------------------------------


def post_sendgrid(sendgrid: SendGridEmulator, events: list[dict[str, Any]]) -> None:
    body = json.dumps(events).encode()
    answer = Client().post(
        "/hooks/sendgrid", data=body, content_type="application/json", headers=sendgrid.sign(body)
    )
    assert answer.status_code == 200, answer.content


def post_twilio(twilio: TwilioEmulator, params: dict[str, str]) -> None:
    answer = Client().post(
        "/hooks/twilio",
        data=urllib.parse.urlencode(params),
        content_type="application/x-www-form-urlencoded",
        headers={"X-Twilio-Signature": twilio.sign(TWILIO_HOOK_URL, params)},
    )
    assert answer.status_code == 200, answer.content


def test_provider_reports_show_in_the_completion_and_never_complete_twice(
    api: APIClient,
    template: Any,
    receiver: WebhookReceiver,
    secret: str,
    providers: tuple[SendGridEmulator, TwilioEmulator],
) -> None:
    sendgrid, twilio = providers
    delivered = accept(api, "user-1", ["email", "sms"])
    bounced = accept(api, "user-2", ["email", "sms"])
    failed = accept(api, "user-3", ["email", "sms"])
    bounced_after = accept(api, "user-4", ["email"])
    for nid in (delivered, bounced, bounced_after):
        process(nid, "email")
    process(failed, "sms")
    first, second, fourth = sendgrid.accepted_requests()
    sms = Delivery.objects.get(notification_id=failed, channel="sms")
    post_sendgrid(
        sendgrid,
        [
            *sendgrid.events_for(first, "delivered", response="250 OK"),
            *sendgrid.events_for(second, "bounce", type="bounce", reason="550 5.1.1 no such user"),
        ],
    )
    post_twilio(
        twilio, twilio.status_params(sms.provider_message_id, "undelivered", to=sms.address)
    )
    assert provider_events_apply() == 3
    # The email-only one completed when its email was sent.
    assert completed(receiver, secret) == {
        bounced_after: data(bounced_after, "user-4", email="sent")
    }

    process(delivered, "sms")
    process(bounced, "sms")
    process(failed, "email")
    expected = {
        delivered: data(delivered, "user-1", email="delivered", sms="sent"),
        bounced: data(bounced, "user-2", email="bounced", sms="sent"),
        failed: data(failed, "user-3", email="sent", sms="failed"),
        bounced_after: data(bounced_after, "user-4", email="sent"),
    }
    assert completed(receiver, secret) == expected

    # A bounce after completion moves the delivery, and checks nothing.
    post_sendgrid(sendgrid, sendgrid.events_for(fourth, "bounce", type="bounce", reason="550"))
    assert provider_events_apply() == 1
    assert Delivery.objects.get(notification_id=bounced_after).status == "bounced"
    assert CompletionCheck.objects.count() == 0
    assert completed(receiver, secret) == expected


# --- Dead -----------------------------------------------------------------------------------


def test_a_delivery_refused_for_good_or_out_of_retries_completes_it_dead(
    api: APIClient,
    template: Any,
    receiver: WebhookReceiver,
    secret: str,
    providers: tuple[SendGridEmulator, TwilioEmulator],
    settings: Any,
) -> None:
    sendgrid, twilio = providers
    settings.RETRY_MAX_ATTEMPTS = 1
    refused = accept(api, "user-1", ["email"])
    exhausted = accept(api, "user-2", ["sms"])
    sendgrid.fail_next(SendGridEmulator.bad_address())
    process(refused, "email")
    twilio.fail_next(TwilioEmulator.server_error(503), TwilioEmulator.server_error(503))
    process(exhausted, "sms")
    assert Delivery.objects.get(notification_id=exhausted).status == "retrying"
    assert completed(receiver, secret) == {refused: data(refused, "user-1", email="dead")}

    Delivery.objects.filter(notification_id=exhausted).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    process(exhausted, "sms")
    assert completed(receiver, secret) == {
        refused: data(refused, "user-1", email="dead"),
        exhausted: data(exhausted, "user-2", sms="dead"),
    }


# --- Cancelled: the cancel API, an escalation step, a topic, an erasure ----------------------


def test_a_cancel_completes_what_it_ends(
    api: APIClient, template: Any, receiver: WebhookReceiver, secret: str
) -> None:
    scheduled = accept(api, "user-1", ["email", "sms"], send_at=later())
    half_sent = accept(api, "user-2", ["email", "sms"])
    process(half_sent, "email")
    assert completed(receiver, secret) == {}
    for nid in (scheduled, half_sent):
        assert api.post(f"{URL}/{nid}/cancel").status_code == 200
    assert completed(receiver, secret) == {
        scheduled: data(scheduled, "user-1", email="cancelled", sms="cancelled"),
        half_sent: data(half_sent, "user-2", email="sent", sms="cancelled"),
    }


@pytest.fixture
def escalating(owner: Any) -> Any:
    return TemplateFactory(
        owner=owner,
        key="escalating",
        content={"web": {"title": "Alert", "body": "{{ order_id }}"}, "sms": {"body": "SMS"}},
        escalation=[{"after": "15m", "unless": "read", "channel": "sms"}],
    )


def test_an_escalation_step_a_read_made_unneeded_completes_it(
    api: APIClient, escalating: Any, receiver: WebhookReceiver, secret: str
) -> None:
    nid = accept(api, "user-1", None, template="escalating")
    process(nid, "web")
    assert completed(receiver, secret) == {}  # the SMS step waits
    assert browser(api, "user-1").post(f"/api/v1/inbox/{nid}/read").status_code in (200, 204)
    assert completed(receiver, secret) == {nid: data(nid, "user-1", sms="cancelled", web="read")}


def test_a_topic_cancel_completes_each_child_and_a_child_skipped_at_fan_out_completes_at_once(
    owner: Any, api: APIClient, template: Any, receiver: WebhookReceiver, secret: str
) -> None:
    people = Recipient.objects.bulk_create(
        [
            Recipient(owner=owner, external_id=f"sub-{n}", phone="+14155550100" if n else "")
            for n in range(4)
        ]
    )
    topic = Topic.objects.create(owner=owner, key="release-notes")
    TopicSubscription.objects.bulk_create(
        [TopicSubscription(topic=topic, recipient=r) for r in people]
    )
    answer = api.post(
        URL,
        {
            "topic": "release-notes",
            "template": "order_shipped",
            "data": {"order_id": "v2"},
            "channels": ["sms"],
            "send_at": later(),
        },
        format="json",
    )
    assert answer.status_code == 202, answer.content
    parent = answer.json()["id"]
    while fanout.topic_fanout_step():
        pass
    children = dict(
        Notification.objects.filter(parent_id=parent).values_list("recipient__external_id", "pk")
    )
    no_phone = str(children.pop("sub-0"))
    assert completed(receiver, secret) == {no_phone: data(no_phone, "sub-0", sms="skipped")}
    assert api.post(f"{URL}/{parent}/cancel").json()["children_cancelled"] == 3
    assert completed(receiver, secret) == {
        no_phone: data(no_phone, "sub-0", sms="skipped"),
        **{str(child): data(str(child), rid, sms="cancelled") for rid, child in children.items()},
    }


def test_an_erasure_completes_what_it_cancels_naming_nobody(
    api: APIClient, template: Any, receiver: WebhookReceiver, secret: str
) -> None:
    nid = accept(api, "user-1", ["email", "sms"], send_at=later())
    assert api.delete("/api/v1/recipients/user-1").status_code == 204
    anonymous = Notification.objects.values_list("recipient__external_id", flat=True).get(pk=nid)
    assert anonymous.startswith(ERASED_PREFIX)
    assert completed(receiver, secret) == {
        nid: data(nid, anonymous, email="cancelled", sms="cancelled")
    }


# --- Skipped: at acceptance, at send time, digested ------------------------------------------


def test_a_notification_skipped_whole_at_acceptance_completes_without_a_worker(
    api: APIClient, template: Any, receiver: WebhookReceiver, secret: str
) -> None:
    no_address = accept(api, "user-1", ["email", "sms"], contact=False)
    accept(api, "user-2", ["email"])  # the recipient exists; now it opts out
    api.put("/api/v1/recipients/user-2/preferences", {"channels": {"email": False}}, format="json")
    opted_out = accept(api, "user-2", ["email"])
    accept(api, "user-3", ["email", "push"])  # push: no device; the email waits for a worker
    bulk = api.post(
        f"{URL}/bulk",
        {
            "notifications": [
                {
                    "recipient": {"id": f"bulk-{n}"},
                    "template": "order_shipped",
                    "data": {"order_id": "B"},
                    "channels": ["email", "sms"],
                }
                for n in range(2)
            ]
        },
        format="json",
    )
    assert bulk.json()["accepted"] == 2, bulk.content
    in_bulk = {r["id"]: f"bulk-{n}" for n, r in enumerate(bulk.json()["results"])}
    assert completed(receiver, secret) == {
        no_address: data(no_address, "user-1", email="skipped", sms="skipped"),
        opted_out: data(opted_out, "user-2", email="skipped"),
        **{nid: data(nid, rid, email="skipped", sms="skipped") for nid, rid in in_bulk.items()},
    }


def test_without_an_endpoint_for_completions_nothing_is_checked_nor_queried(
    api: APIClient, template: Any, receiver: WebhookReceiver
) -> None:
    secret = register(api, receiver, "delivery.sent")
    accept(api, "user-1", ["email"], contact=False)  # the owner's endpoints are cached now
    with CaptureQueriesContext(connection) as queries:
        skipped = accept(api, "user-2", ["email"], contact=False)
    touched = [q["sql"] for q in queries if "webhook" in q["sql"] or "completioncheck" in q["sql"]]
    assert touched == []
    sent = accept(api, "user-3", ["email"])
    process(sent, "email")
    assert CompletionCheck.objects.count() == 0
    webhooks_send_due()
    got = receiver.verified(secret)
    assert [(g["type"], g["data"]["notification_id"]) for g in got] == [("delivery.sent", sent)]
    assert Delivery.objects.get(notification_id=skipped).status == "skipped"


def test_a_delivery_suppressed_after_acceptance_completes_it_skipped(
    owner: Any, api: APIClient, template: Any, receiver: WebhookReceiver, secret: str
) -> None:
    nid = accept(api, "user-1", ["email", "sms"])
    process(nid, "sms")
    assert completed(receiver, secret) == {}
    suppression_add(
        owner_id=owner.pk,
        channel="email",
        address="user-1@example.com",
        reason="complained",
        source="sendgrid",
    )
    process(nid, "email")
    email = Delivery.objects.get(notification_id=nid, channel="email")
    assert (email.status, email.skip_reason) == ("skipped", "suppressed")
    assert completed(receiver, secret) == {nid: data(nid, "user-1", email="skipped", sms="sent")}


def test_digest_members_complete_skipped_and_their_digest_when_it_is_sent(
    owner: Any, api: APIClient, receiver: WebhookReceiver, secret: str
) -> None:
    TemplateFactory(
        owner=owner,
        key="project_update",
        category="projects",
        content={
            "email": {"subject": "{{ count }} updates", "body": "{{ count }}"},
            "sms": {"body": "{{ count }} updates"},
        },
        digest={"window": "1h", "key": "{{ project_id }}"},
    )
    members = [accept(api, "user-1", ["email", "sms"], template="project_update") for _ in "ab"]
    assert completed(receiver, secret) == {}
    Delivery.objects.filter(status="scheduled").update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    outbox_publish_due()
    digest = str(Notification.objects.get(data__has_key="events").pk)
    skipped = {m: data(m, "user-1", email="skipped", sms="skipped") for m in members}
    assert completed(receiver, secret) == skipped
    assert set(
        DeliveryEvent.objects.filter(
            delivery__notification_id__in=members, status="skipped"
        ).values_list("detail", flat=True)
    ) == {f"digested into {digest}"}
    process(digest, "email")
    process(digest, "sms")
    assert completed(receiver, secret) == {
        **skipped,
        digest: data(digest, "user-1", email="sent", sms="sent"),
    }


# --- Concurrent transactions -----------------------------------------------------------------


def _in_thread(work: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        try:
            work()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.django_db(transaction=True)
def test_two_channels_settled_in_two_concurrent_transactions_complete_it_once(
    api: APIClient, template: Any, receiver: WebhookReceiver, secret: str
) -> None:
    """Two workers settle a notification's email and SMS in two transactions open at once:
    each reads the other's delivery as unfinished. Whichever commits last leaves the check
    that finds it complete, also when the first one's check was handled in between."""
    together = accept(api, "user-1", ["email", "sms"])
    one_by_one = accept(api, "user-2", ["email", "sms"])
    written = threading.Barrier(3, timeout=20)
    commit = {channel: threading.Event() for channel in ("email", "sms")}
    done: list[str] = []

    def settle(channel: str) -> None:
        with transaction.atomic():
            process(together, channel)
            process(one_by_one, channel)
            written.wait()
            assert commit[channel].wait(20)
        done.append(channel)

    threads = [_in_thread(functools.partial(settle, channel)) for channel in ("email", "sms")]
    written.wait()  # both have written their statuses; neither has committed
    commit["email"].set()
    threads[0].join(20)
    # The email's check is handled while the SMS transaction still holds its rows locked:
    # the webhooks worker reads without locks, so it neither waits nor finds it complete.
    assert completed(receiver, secret) == {}
    commit["sms"].set()
    threads[1].join(20)
    assert done == ["email", "sms"]
    assert completed(receiver, secret) == {
        together: data(together, "user-1", email="sent", sms="sent"),
        one_by_one: data(one_by_one, "user-2", email="sent", sms="sent"),
    }


@pytest.mark.django_db(transaction=True)
def test_an_escalation_step_the_relay_held_during_the_read_completes_it_at_release(
    api: APIClient, escalating: Any, receiver: WebhookReceiver, secret: str
) -> None:
    """The read skips a step the relay has locked; the relay's release finds the read and
    cancels the step then ("escalation not needed"): that completes the notification."""
    nid = accept(api, "user-1", None, template="escalating")
    process(nid, "web")
    step = Delivery.objects.get(notification_id=nid, channel="sms")
    held, release = threading.Event(), threading.Event()

    def relay_holds() -> None:
        with transaction.atomic():
            list(Delivery.objects.filter(pk=step.pk).select_for_update())
            held.set()
            assert release.wait(20)

    thread = _in_thread(relay_holds)
    assert held.wait(20)
    assert browser(api, "user-1").post(f"/api/v1/inbox/{nid}/read").status_code in (200, 204)
    release.set()
    thread.join(20)
    step.refresh_from_db()
    assert step.status == "scheduled"
    assert completed(receiver, secret) == {}

    Delivery.objects.filter(pk=step.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    outbox_publish_due()
    step.refresh_from_db()
    assert step.status == "cancelled"
    assert DeliveryEvent.objects.filter(delivery=step).values_list("detail", flat=True).last() == (
        "escalation not needed: web read in time"
    )
    assert completed(receiver, secret) == {nid: data(nid, "user-1", sms="cancelled", web="read")}
