"""The template editor in a real browser: Debian's Chromium, driven by Playwright, signs into
the admin served by a real uvicorn process on the test database, edits a template, watches
the live preview follow each edit, and saves."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth import get_user_model

from notifications.models import Template
from tests.conftest import Process
from tests.project.api_server import start_api_server

pytestmark = pytest.mark.django_db(transaction=True)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Long enough for a debounced preview round trip on a slow CI machine.
UI_TIMEOUT_MS = 15_000


def _serve(spawn: Callable[..., Process], tmp_path: Path) -> str:
    return start_api_server(spawn, tmp_path, name="asgi")[1]


def test_template_preview_follows_edits_and_saves(
    owner: Any, template: Template, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    # A missing browser is a broken test machine, not a reason to skip.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    from playwright.sync_api import expect, sync_playwright

    get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123")
    template.sample_data = {"order_id": "A-1"}
    template.save()
    change_path = f"/admin/notifications/template/{template.pk}/change/"
    edited = {k: dict(v) for k, v in template.content.items()}
    edited["sms"] = {"body": "Parcel {{ order_id }} left the warehouse"}
    base = _serve(spawn, tmp_path)

    static: dict[str, int] = {}
    # No database access inside this block: Playwright's sync API runs an event loop, and
    # Django refuses synchronous queries from a thread that has one.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.on(
                "response",
                lambda r: (
                    static.__setitem__(r.url.removeprefix(base), r.status)
                    if "/static/" in r.url
                    else None
                ),
            )
            page.goto(f"{base}/admin/login/?next={change_path}")
            page.fill("#id_username", "ops")
            page.fill("#id_password", "pw-ops-123")
            page.click("input[type=submit]")
            page.wait_for_url(f"{base}{change_path}")

            preview = page.locator("#clarion-preview .clarion-preview-output")
            sms = preview.locator('[data-channel="sms"] [data-field="body"] pre')
            # The saved template with its saved sample data, as soon as the page opens.
            expect(sms).to_have_text("Order A-1 shipped")
            expect(preview.locator('[data-channel="email"] iframe')).to_have_attribute(
                "srcdoc", "<p>Hi, A-1 is on its way.</p>"
            )

            page.fill("#id_content", json.dumps(edited, indent=2))
            expect(sms).to_have_text("Parcel A-1 left the warehouse")
            page.fill("#id_sample_data", "{}")
            expect(preview.locator('[data-channel="sms"] .errorlist li')).to_have_text(
                "data.order_id: Missing template variable."
            )
            page.fill("#id_sample_data", '{"order_id": "<B-2>"}')
            expect(sms).to_have_text("Parcel <B-2> left the warehouse")
            expect(preview).to_have_attribute("data-state", "ok")
            page.select_option("#clarion-preview-channel", "sms")
            expect(preview.locator(".clarion-preview-channel")).to_have_count(1)
            page.screenshot(path=str(tmp_path / "template-preview.png"), full_page=True)

            page.click("input[name=_save]")
            page.wait_for_url(f"{base}/admin/notifications/template/")
            expect(page.locator(".messagelist .success")).to_contain_text(
                "was changed successfully"
            )
        finally:
            browser.close()

    assert (tmp_path / "template-preview.png").stat().st_size > 0
    # The admin's own CSS and JS and Clarion's additions came from the ASGI server itself.
    for asset in (
        "/static/admin/css/base.css",
        "/static/admin/css/forms.css",
        "/static/clarion_admin/admin.css",
        "/static/clarion_admin/template_preview.js",
    ):
        assert static.get(asset) == 200, (asset, static)
    template.refresh_from_db()
    assert template.content == edited
    assert template.sample_data == {"order_id": "<B-2>"}


def test_delivery_rules_and_quiet_hours_in_the_browser(
    owner: Any, template: Template, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    """The template's "Delivery rules" (frequency caps, escalation, digest) and a recipient's
    quiet hours, edited, refused when wrong and saved through the real admin pages."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    from playwright.sync_api import expect, sync_playwright

    from notifications.models import Recipient

    get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123")
    recipient = Recipient.objects.create(
        owner=owner, external_id="night-owl", timezone="Asia/Tokyo"
    )
    template_path = f"/admin/notifications/template/{template.pk}/change/"
    recipient_path = f"/admin/notifications/recipient/{recipient.pk}/change/"
    base = _serve(spawn, tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(f"{base}/admin/login/?next={template_path}")
            page.fill("#id_username", "ops")
            page.fill("#id_password", "pw-ops-123")
            page.click("input[type=submit]")
            page.wait_for_url(f"{base}{template_path}")

            expect(page.locator("fieldset h2", has_text="Delivery rules")).to_be_visible()
            page.fill("#id_frequency_caps", '{"email": "3 an hour"}')
            page.click("input[name=_continue]")
            # The field's own error list: the live preview has error lists of its own.
            expect(page.locator("#id_frequency_caps_error")).to_contain_text(
                "frequency_caps.email: A cap is N/window"
            )
            page.fill("#id_frequency_caps", '{"email": "3/1h", "sms": "1/1d"}')
            page.select_option("#id_frequency_cap_scope", "category")
            page.fill("#id_escalation", '[{"after": "15m", "unless": "read", "channel": "sms"}]')
            page.fill("#id_digest", '{"window": "1h", "key": "{{ order_id }}"}')
            page.click("input[name=_continue]")
            expect(page.locator(".messagelist .success")).to_contain_text(
                "was changed successfully"
            )
            expect(page.locator("#id_frequency_caps")).to_contain_text('"sms": "1/1d"')
            page.locator("fieldset", has_text="Delivery rules").screenshot(
                path=str(tmp_path / "delivery-rules.png")
            )

            page.goto(f"{base}{recipient_path}")
            page.fill("#id_quiet_hours", '{"start": "22:00", "end": "7am"}')
            page.click("input[name=_continue]")
            expect(page.locator("#id_quiet_hours_error")).to_contain_text(
                "quiet_hours.end: A time of day"
            )
            page.fill("#id_quiet_hours", '{"start": "22:00", "end": "07:00", "channels": ["sms"]}')
            page.click("input[name=_save]")
            page.wait_for_url(f"{base}/admin/notifications/recipient/")
            expect(page.locator("#result_list")).to_contain_text("22:00-07:00 (sms)")
            page.screenshot(path=str(tmp_path / "recipients.png"), full_page=True)
        finally:
            browser.close()

    for shot in ("delivery-rules.png", "recipients.png"):
        assert (tmp_path / shot).stat().st_size > 5_000, shot
    template.refresh_from_db()
    assert template.frequency_caps == {"email": "3/1h", "sms": "1/1d"}
    assert template.frequency_cap_scope == "category"
    assert template.escalation == [{"after": "15m", "unless": "read", "channel": "sms"}]
    assert template.digest == {"window": "1h", "key": "{{ order_id }}"}
    recipient.refresh_from_db()
    assert recipient.quiet_hours == {"start": "22:00", "end": "07:00", "channels": ["sms"]}


def test_topics_and_subscribers_in_the_browser(
    owner: Any, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    """A topic created in the admin, its subscriber count linking to its subscribers, a
    subscriber found by search and one refused from another owner, through the real pages."""
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    from playwright.sync_api import expect, sync_playwright

    from notifications.models import Owner, Recipient, Topic, TopicSubscription

    get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123")
    for n in range(3):
        Recipient.objects.create(owner=owner, external_id=f"reader-{n}", email=f"r{n}@example.com")
    stranger = Recipient.objects.create(
        owner=Owner.objects.create(name="elsewhere"), external_id="stranger"
    )
    pks = dict(Recipient.objects.values_list("external_id", "pk"))
    base = _serve(spawn, tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(UI_TIMEOUT_MS)
            add_topic = "/admin/notifications/topic/add/"
            page.goto(f"{base}/admin/login/?next={add_topic}")
            page.fill("#id_username", "ops")
            page.fill("#id_password", "pw-ops-123")
            page.click("input[type=submit]")
            page.wait_for_url(f"{base}{add_topic}")
            page.select_option("#id_owner", label=owner.name)
            page.fill("#id_key", "release-notes")
            page.fill("#id_name", "Release notes")
            page.click("input[name=_save]")
            page.wait_for_url(f"{base}/admin/notifications/topic/")

            # Subscribe two readers through the subscription form (autocomplete widgets are
            # plain selects underneath).
            topic_id = page.evaluate(
                "() => document.querySelector('#result_list a[href*=\"/change/\"]')"
                ".getAttribute('href').split('/').slice(-3)[0]"
            )
            for rid in ("reader-0", "reader-2", "stranger"):
                page.goto(f"{base}/admin/notifications/topicsubscription/add/")
                page.evaluate(
                    """([topic, rid]) => {
                        for (const [id, value, label] of [["id_topic", topic, "release-notes"],
                                                         ["id_recipient", rid, rid]]) {
                            const select = document.getElementById(id);
                            select.add(new Option(label, value, true, true));
                        }
                    }""",
                    [topic_id, str(pks[rid])],
                )
                page.click("input[name=_save]")
                if rid == "stranger":
                    expect(page.locator(".errorlist.nonfield")).to_contain_text("different owners")
                else:
                    page.wait_for_url(f"{base}/admin/notifications/topicsubscription/")

            page.goto(f"{base}/admin/notifications/topic/")
            count = page.locator("#result_list td.field-subscribers a")
            expect(count).to_have_text("2")
            count.click()
            expect(page.locator("#result_list tbody tr")).to_have_count(2)
            page.fill("#searchbar", "r2@example.com")
            page.press("#searchbar", "Enter")
            expect(page.locator("#result_list tbody tr")).to_have_count(1)
            expect(page.locator("#result_list")).to_contain_text("reader-2")
            page.screenshot(path=str(tmp_path / "subscribers.png"), full_page=True)
        finally:
            browser.close()

    assert (tmp_path / "subscribers.png").stat().st_size > 5_000
    topic = Topic.objects.get(key="release-notes")
    assert topic.owner_id == owner.pk
    assert set(
        TopicSubscription.objects.filter(topic=topic).values_list(
            "recipient__external_id", flat=True
        )
    ) == {"reader-0", "reader-2"}
    assert not TopicSubscription.objects.filter(recipient=stranger).exists()
