"""One-click unsubscribe (RFC 8058): the headers on a real SMTP conversation and in SendGrid's
personalizations, the link in the body, the confirmation page, the POST that opts out, and
links that are not ours."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from notifications.models import Delivery, Preference, Recipient, Topic, TopicSubscription
from tests.conftest import SmtpSink
from tests.emulators.sendgrid import SendGridEmulator
from tests.factories import RecipientFactory, TemplateFactory
from workers import fanout
from workers.providers import provider_for
from workers.services import ProcessOutcome, deliveries_process

pytestmark = pytest.mark.django_db

BASE = "https://notify.example.com"
LINK = re.compile(r"https://notify\.example\.com/unsubscribe/[A-Za-z0-9_:.\-]+")
WITH_LINK = {
    "email": {
        "subject": "News {{ n }}",
        "body": "News {{ n }}. Unsubscribe: {{ unsubscribe_url }}",
        "html": '<p>News {{ n }}</p><a href="{{ unsubscribe_url }}">Unsubscribe</a>',
    },
    "sms": {"body": "News {{ n }}"},
}


@pytest.fixture(autouse=True)
def public_url(settings: Any) -> None:
    settings.PUBLIC_BASE_URL = BASE


@pytest.fixture
def smtp(settings: Any, smtp_server: SmtpSink) -> Iterator[SmtpSink]:
    settings.EMAIL_PROVIDER = "smtp"
    settings.SMTP_HOST = smtp_server.host
    settings.SMTP_PORT = smtp_server.port
    provider_for.cache_clear()
    yield smtp_server
    provider_for.cache_clear()


def _send(api: APIClient, template: str, n: int = 1, rid: str = "user-1") -> str:
    response = api.post(
        "/api/v1/notifications",
        {
            "recipient": {"id": rid, "email": f"{rid}@example.com", "phone": "+14155550100"},
            "template": template,
            "data": {"n": n},
        },
        format="json",
    )
    assert response.status_code == 202, response.content
    return str(response.json()["id"])


def _deliver(notification_ids: list[str]) -> None:
    ids = list(
        Delivery.objects.filter(notification_id__in=notification_ids, channel="email").values_list(
            "pk", flat=True
        )
    )
    assert set(deliveries_process(delivery_ids=ids).values()) == {ProcessOutcome.SENT}


def test_a_marketing_email_carries_the_headers_and_its_link_opts_out_with_one_post(
    api: APIClient, owner: Any, smtp: SmtpSink
) -> None:
    TemplateFactory(owner=owner, key="news", category="marketing", content=WITH_LINK)
    _deliver([_send(api, "news")])
    [message] = smtp.received()
    # Folded on the wire (a long line), unfolded by the parser.
    header = message["List-Unsubscribe"].strip()
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    [url] = LINK.findall(header)
    assert header == f"<{url}>"
    # The body's {{ unsubscribe_url }} is the same link, in the text and in the HTML.
    text = message.get_body(("plain",)).get_content()
    html = message.get_body(("html",)).get_content()
    assert LINK.findall(text) == [url]
    assert LINK.findall(html) == [url]

    path = url.removeprefix(BASE)
    browser = Client()
    page = browser.get(path)
    assert page.status_code == 200
    assert page["Content-Type"] == "text/html; charset=utf-8"
    assert "Stop receiving “marketing” emails from this sender?" in page.content.decode()
    assert '<form method="post">' in page.content.decode()
    assert not Preference.objects.exists()  # a GET changes nothing

    # What a mailbox provider posts (RFC 8058), twice: the same one opt-out.
    for _ in range(2):
        done = browser.post(
            path,
            data="List-Unsubscribe=One-Click",
            content_type="application/x-www-form-urlencoded",
        )
        assert done.status_code == 200
        assert "You will no longer receive “marketing” emails" in done.content.decode()
    recipient = Recipient.objects.get(external_id="user-1")
    assert list(Preference.objects.values_list("recipient", "category", "channel", "enabled")) == [
        (recipient.pk, "marketing", "email", False)
    ]
    # The next marketing email is skipped; its SMS, and other categories' email, still go.
    nid = _send(api, "news", 2)
    assert sorted(
        Delivery.objects.filter(notification_id=nid).values_list("channel", "status")
    ) == [
        ("email", "skipped"),
        ("sms", "queued"),
    ]
    TemplateFactory(owner=owner, key="order_shipped", category="orders")
    other = api.post(
        "/api/v1/notifications",
        {"recipient": "user-1", "template": "order_shipped", "data": {"order_id": "A-1"}},
        format="json",
    )
    assert {"channel": "email", "status": "queued"} in other.json()["deliveries"]


def test_transactional_and_uncategorised_email_carries_no_unsubscribe_header(
    api: APIClient, owner: Any, smtp: SmtpSink
) -> None:
    plain = {"email": {"subject": "Code {{ n }}", "body": "Your code is {{ n }}."}}
    TemplateFactory(owner=owner, key="reset", category="transactional", content=plain)
    TemplateFactory(owner=owner, key="plain", category="", content=plain)
    _deliver([_send(api, "reset"), _send(api, "plain")])
    messages = smtp.received()
    assert len(messages) == 2
    assert [m["List-Unsubscribe"] for m in messages] == [None, None]
    assert [m["List-Unsubscribe-Post"] for m in messages] == [None, None]


def test_links_that_are_not_ours_are_refused_and_change_nothing(
    api: APIClient, owner: Any, smtp: SmtpSink
) -> None:
    TemplateFactory(owner=owner, key="news", category="marketing", content=WITH_LINK)
    _deliver([_send(api, "news")])
    [url] = LINK.findall(smtp.received()[0]["List-Unsubscribe"])
    token = url.rsplit("/", 1)[1]
    tampered = token[:-3] + ("abc" if not token.endswith("abc") else "xyz")
    browser = Client()
    for path in (f"/unsubscribe/{tampered}", "/unsubscribe/nonsense", "/unsubscribe/preview"):
        for answer in (browser.get(path), browser.post(path)):
            assert answer.status_code == 400, path
            assert "This unsubscribe link is not valid" in answer.content.decode()
    # An erased recipient's link is gone with it.
    assert api.delete("/api/v1/recipients/user-1").status_code == 204
    assert browser.post(f"/unsubscribe/{token}").status_code == 400
    assert not Preference.objects.exists()


def test_sendgrid_gets_each_recipients_own_headers_in_one_batch(
    api: APIClient, owner: Any, settings: Any
) -> None:
    emulator = SendGridEmulator().start()
    try:
        for name, value in emulator.settings_overrides().items():
            setattr(settings, name, value)
        provider_for.cache_clear()
        TemplateFactory(owner=owner, key="news", category="marketing", content=WITH_LINK)
        _deliver([_send(api, "news", rid=f"user-{n}") for n in range(3)])
        [request] = emulator.accepted_requests()
        personalizations = request.json()["personalizations"]
        links = [p["headers"]["List-Unsubscribe"] for p in personalizations]
        assert len(set(links)) == 3 and all(LINK.fullmatch(link[1:-1]) for link in links)
        assert {p["headers"]["List-Unsubscribe-Post"] for p in personalizations} == {
            "List-Unsubscribe=One-Click"
        }
        # Each body carries its recipient's own link (substituted per personalization).
        bodies = [p["substitutions"]["-clarion-body-"] for p in personalizations]
        assert [LINK.findall(b)[0] for b in bodies] == [link[1:-1] for link in links]
    finally:
        provider_for.cache_clear()
        emulator.stop()


def test_a_topic_send_renders_each_subscribers_own_link(owner: Any, api: APIClient) -> None:
    TemplateFactory(owner=owner, key="news", category="marketing", content=WITH_LINK)
    topic = Topic.objects.create(owner=owner, key="news")
    for n in range(3):
        recipient = RecipientFactory(owner=owner, external_id=f"sub-{n}", email=f"s{n}@example.com")
        TopicSubscription.objects.create(topic=topic, recipient=recipient)
    answer = api.post(
        "/api/v1/notifications",
        {"topic": "news", "template": "news", "data": {"n": 1}},
        format="json",
    )
    assert answer.status_code == 202, answer.content
    while fanout.topic_fanout_step(chunk_size=10):
        pass
    bodies = list(
        Delivery.objects.filter(channel="email", notification__parent_id=answer.json()["id"])
        .order_by("notification__recipient_id")
        .values_list("content__body", flat=True)
    )
    links = [LINK.findall(body)[0] for body in bodies]
    assert len(links) == 3 and len(set(links)) == 3
    # Each link opts out its own subscriber.
    Client().post(links[1].removeprefix(BASE))
    assert list(Preference.objects.values_list("recipient__external_id", flat=True)) == ["sub-1"]
