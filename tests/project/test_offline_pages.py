"""Every browser page of Clarion works on a machine without internet access: Debian's Chromium,
with every request to a non-loopback address blocked, opens the API docs (Swagger UI and
Redoc), the admin, the template preview and the inbox page served by a real uvicorn process,
and each renders its content from Clarion's own assets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model

from notifications.models import Template
from tests.channels_app.support import post_notification
from tests.conftest import Process
from tests.notifications.test_admin_browser import CHROMIUM, CHROMIUM_ARGS, UI_TIMEOUT_MS
from tests.project.api_server import http, start_api_server

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def test_every_page_renders_with_the_internet_blocked(
    api: Any,
    owner: Any,
    template: Template,
    spawn: Callable[..., Process],
    celery_worker_process: Callable[..., Process],
    tmp_path: Path,
) -> None:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    from playwright.sync_api import Route, expect, sync_playwright

    get_user_model().objects.create_superuser("ops", "ops@example.com", "pw-ops-123")
    template.sample_data = {"order_id": "A-7"}
    template.save()
    celery_worker_process("web", concurrency=1)
    _, base = start_api_server(spawn, tmp_path)
    api.put("/api/v1/recipients/user-7", {}, format="json")
    notification_id = post_notification(api, "user-7", "A-7")
    token = api.post("/api/v1/recipients/user-7/token").json()["token"]
    operations = sum(
        1
        for item in http("GET", f"{base}/api/schema/?format=json").json()["paths"].values()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    )
    assert operations > 10

    blocked: list[str] = []
    served: dict[str, int] = {}
    errors: list[str] = []

    def route(route: Route) -> None:
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in {"http", "https", "ws", "wss"} and parts.hostname not in LOOPBACK:
            blocked.append(url)
            route.abort("blockedbyclient")
        else:
            route.continue_()

    # No database access inside this block: Playwright's sync API runs an event loop, and
    # Django refuses synchronous queries from a thread that has one.
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = browser.new_context()
            context.route("**/*", route)
            page = context.new_page()
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.on("pageerror", lambda error: errors.append(f"{page.url}: {error}"))
            page.on(
                "response",
                lambda r: (
                    served.__setitem__(r.url.removeprefix(base), r.status)
                    if r.url.startswith(base)
                    else None
                ),
            )

            # Swagger UI: every operation of the schema listed.
            page.goto(f"{base}/api/docs/")
            expect(page.locator(".opblock")).to_have_count(operations)
            expect(page.locator(".info .title")).to_contain_text("Clarion API")
            expect(
                page.locator(".opblock-summary-path", has_text="/api/v1/notifications").first
            ).to_be_visible()
            page.screenshot(path=str(tmp_path / "docs.png"))

            # Redoc: the same operations in its side menu.
            page.goto(f"{base}/api/redoc/")
            expect(page.locator("h1", has_text="Clarion API")).to_be_visible()
            expect(page.locator('[data-section-id^="operation/"]')).to_have_count(operations)

            # The admin, styled by its own CSS.
            page.goto(f"{base}/admin/login/?next=/admin/")
            page.fill("#id_username", "ops")
            page.fill("#id_password", "pw-ops-123")
            page.click("input[type=submit]")
            page.wait_for_url(f"{base}/admin/")
            expect(page.locator("#site-name")).to_be_visible()
            expect(page.locator("a", has_text="Templates").first).to_be_visible()

            # The template preview renders the saved sample.
            page.goto(f"{base}/admin/notifications/template/{template.pk}/change/")
            preview = page.locator("#clarion-preview .clarion-preview-output")
            expect(preview.locator('[data-channel="sms"] [data-field="body"] pre')).to_have_text(
                "Order A-7 shipped"
            )

            # The inbox page lists the notification over its live connection.
            page.goto(f"{base}/inbox/#token={token}")
            page.wait_for_selector("#connection[data-state=live]")
            expect(page.locator(f'li.entry.unread[data-id="{notification_id}"]')).to_be_visible()
            expect(page.locator('#unread-count[data-count="1"]')).to_be_visible()

            # The block is live: a page that does reach out is stopped and recorded.
            pages_blocked = len(blocked)
            with pytest.raises(Exception, match="ERR_BLOCKED_BY_CLIENT"):
                page.goto("https://cdn.jsdelivr.net/npm/swagger-ui-dist@latest/")
            probe = blocked[pages_blocked:]
            del blocked[pages_blocked:]
        finally:
            browser.close()

    # Nothing asked for the internet, nothing failed, and the assets came from Clarion.
    assert probe == ["https://cdn.jsdelivr.net/npm/swagger-ui-dist@latest/"]
    assert blocked == []
    assert errors == []
    for asset in (
        "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js",
        "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui.css",
        "/static/drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js",
        "/static/admin/css/base.css",
        "/static/clarion_admin/template_preview.js",
    ):
        assert served.get(asset) == 200, (asset, sorted(served))
