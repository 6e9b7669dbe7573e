"""The inbox page in a real Chromium, served by a real uvicorn process with a real web worker:
a posted notification appears live, the bell counts it, a click marks it read; after a server
restart the page reconnects by itself and resumes where it was."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from django.db import connections

from notifications.models import Delivery
from tests.channels_app.support import post_notification, start_server
from tests.conftest import Process, free_port

pytestmark = [pytest.mark.pipeline, pytest.mark.django_db(transaction=True)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@contextmanager
def chromium(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # CI installs Debian's chromium; a machine without it must not pass these tests silently.
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in this thread; the ORM calls the test makes
    # meanwhile are still plain sequential ones (Django's documented escape hatch).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()
            # With that loop running, Django keeps this thread's connections apart from the
            # usual ones; close them here, or they outlive the test database.
            connections.close_all()


def open_inbox(browser: Any, base: str, token: str, console: list[str]) -> Any:
    """A new page on the inbox with the token, its console messages collected."""
    page = browser.new_page()
    page.on("console", lambda message: console.append(message.text))
    page.goto(f"{base}/inbox/#token={token}")
    return page


def test_inbox_page_shows_a_live_notification_and_click_marks_it_read(
    api: Any,
    template: Any,
    spawn: Callable[..., Process],
    celery_worker_process: Callable[..., Process],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    celery_worker_process("web", concurrency=1)
    base, _ = start_server(spawn, tmp_path, "uvicorn")
    api.put("/api/v1/recipients/user-42", {}, format="json")
    earlier = post_notification(api, "user-42", "A-1000")
    token = api.post("/api/v1/recipients/user-42/token").json()["token"]
    console: list[str] = []

    with chromium(monkeypatch) as browser:
        page = open_inbox(browser, base, token, console)
        page.wait_for_selector("#connection[data-state=live]", timeout=10_000)
        # The one sent before the page opened is listed, and counted.
        page.wait_for_selector(f'li.entry.unread[data-id="{earlier}"]', timeout=5_000)
        page.wait_for_selector('#unread-count[data-count="1"]', timeout=5_000)
        # The token left the address bar.
        assert page.url == f"{base}/inbox/"

        started = time.monotonic()
        notification_id = post_notification(api, "user-42", "A-1001")
        item = page.wait_for_selector(
            f'li.entry.unread[data-id="{notification_id}"]', timeout=1_000
        )
        assert item is not None
        appeared_after = time.monotonic() - started
        page.wait_for_selector('#unread-count[data-count="2"]', timeout=2_000)

        assert appeared_after < 1.0
        assert page.inner_text("#unread-count") == "2"
        assert entries(page) == [
            [notification_id, "entry unread", "Shipped", "Order A-1001 is on its way"],
            [earlier, "entry unread", "Shipped", "Order A-1000 is on its way"],
        ]

        item.click()
        page.wait_for_selector('#unread-count[data-count="1"]', timeout=3_000)
        page.wait_for_selector(f'li.entry.read[data-id="{notification_id}"]', timeout=3_000)
        assert page.inner_text("#unread-count") == "1"
        assert page.get_attribute(f'li[data-id="{earlier}"]', "class") == "entry unread"
        screenshot = tmp_path / "inbox.png"
        page.screenshot(path=str(screenshot), full_page=True)

    assert screenshot.stat().st_size > 1000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = Delivery.objects.get(notification_id=notification_id, channel="web")
    assert shown.status == "read"
    assert shown.delivered_at is not None and shown.read_at is not None
    # The page acked the earlier one too (it came in the backlog), without reading it.
    # (Acks are written within WS_ACK_WINDOW_SECONDS of arriving.)
    until(
        lambda: Delivery.objects.get(notification_id=earlier, channel="web").status == "delivered"
    )
    assert [m for m in console if "error" in m.lower()] == []


def until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    """wait_until without pytest.fail, usable while the browser is open."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def entries(page: Any) -> list[list[str]]:
    return list(
        page.eval_on_selector_all(
            "#inbox-list li.entry",
            "items => items.map(i => [i.dataset.id, i.className, "
            "i.querySelector('.title').textContent, i.querySelector('.body').textContent])",
        )
    )


def test_page_reconnects_after_a_server_restart_and_resumes_with_since(
    api: Any,
    template: Any,
    spawn: Callable[..., Process],
    celery_worker_process: Callable[..., Process],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    celery_worker_process("web", concurrency=1)
    port = free_port()
    base, server = start_server(spawn, tmp_path, "uvicorn-before", port=port)
    api.put("/api/v1/recipients/user-42", {}, format="json")
    token = api.post("/api/v1/recipients/user-42/token").json()["token"]
    socket_urls: list[str] = []
    auth_frames: list[dict[str, Any]] = []

    def watch(socket: Any) -> None:
        socket_urls.append(socket.url)

        def sent(payload: str | bytes) -> None:
            frame = json.loads(payload)
            if frame["type"] == "auth":
                auth_frames.append(frame)

        socket.on("framesent", sent)

    with chromium(monkeypatch) as browser:
        page = browser.new_page()
        page.on("websocket", watch)
        page.goto(f"{base}/inbox/#token={token}")
        page.wait_for_selector("#connection[data-state=live]", timeout=10_000)
        seen = post_notification(api, "user-42", "A-1")
        page.wait_for_selector(f'li.entry[data-id="{seen}"]', timeout=5_000)
        # The entry may come from the page's list request; the ack proves the socket had it.
        until(lambda: Delivery.objects.filter(notification_id=seen, status="delivered").exists())

        server.stop()
        page.wait_for_selector("#connection[data-state=connecting]", timeout=10_000)
        # Sent while no server is up: the worker publishes to nobody; the database keeps them.
        missed = [post_notification(api, "user-42", f"A-{n}") for n in (2, 3)]
        until(
            lambda: Delivery.objects.filter(notification_id__in=missed, status="sent").count() == 2
        )
        start_server(spawn, tmp_path, "uvicorn-after", port=port)

        page.wait_for_selector("#connection[data-state=live]", timeout=20_000)
        for notification_id in missed:
            page.wait_for_selector(f'li.entry[data-id="{notification_id}"]', timeout=5_000)
        page.wait_for_selector('#unread-count[data-count="3"]', timeout=5_000)
        assert [e[0] for e in entries(page)] == [missed[1], missed[0], seen]

    # Every socket went to the bare URL, no token in it. The first authenticated without
    # `since`; the one after the restart resumed from the last notification it had seen.
    assert set(socket_urls) == {f"ws://127.0.0.1:{port}/ws/notifications/"}
    assert auth_frames == [
        {"type": "auth", "token": token},
        {"type": "auth", "token": token, "since": 1},
    ]
    assert (
        Delivery.objects.filter(notification_id__in=[seen, *missed], status="delivered").count()
        == 3
    )


def test_inbox_preferences_panel_changes_the_recipients_own_preferences(
    api: Any,
    owner: Any,
    template: Any,
    spawn: Callable[..., Process],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.factories import TemplateFactory

    TemplateFactory(owner=owner, key="newsletter", category="marketing")
    base, _ = start_server(spawn, tmp_path, "uvicorn")
    api.put("/api/v1/recipients/user-42", {}, format="json")
    api.put(
        "/api/v1/recipients/user-42/preferences",
        {"categories": {"orders": {"push": False}}},
        format="json",
    )
    token = api.post("/api/v1/recipients/user-42/token").json()["token"]
    console: list[str] = []

    with chromium(monkeypatch) as browser:
        page = open_inbox(browser, base, token, console)
        page.click("#preferences-toggle")
        page.wait_for_selector('#preferences [data-category="orders"]', timeout=5_000)
        # What is stored is what the panel shows: every channel on, orders' push off, both
        # categories of the owner's templates offered.
        assert page.eval_on_selector_all(
            "#preferences-categories .category", "rows => rows.map(r => r.dataset.category)"
        ) == ["marketing", "orders"]
        assert not page.is_checked('input[data-category="orders"][data-channel="push"]')
        assert page.is_checked('input[data-category="marketing"][data-channel="email"]')
        assert page.is_checked('#preferences-channels input[data-channel="sms"]')
        assert not page.is_checked("#quiet-on")

        page.uncheck('#preferences-channels input[data-channel="sms"]')
        page.uncheck('input[data-category="marketing"][data-channel="email"]')
        page.check('input[data-category="orders"][data-channel="push"]')
        page.check("#quiet-on")
        page.fill("#quiet-start", "21:30")
        page.fill("#quiet-end", "06:45")
        page.click("#preferences-save")
        page.wait_for_selector("#preferences-status:has-text('Saved')", timeout=5_000)
        screenshot = tmp_path / "preferences.png"
        page.screenshot(path=str(screenshot), full_page=True)

    stored = api.get("/api/v1/recipients/user-42/preferences").json()
    assert stored["channels"] == {"email": True, "sms": False, "push": True, "web": True}
    assert stored["categories"] == {"marketing": {"email": False}, "orders": {"push": True}}
    assert stored["quiet_hours"] == {
        "start": "21:30",
        "end": "06:45",
        "channels": ["email", "sms", "push", "web"],
    }
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [m for m in console if "error" in m.lower()] == []


# Records every notification clarion.js emits (what the page shows), before the page's own
# scripts run: the client is wrapped as it is defined.
RECORD_SHOWN = """
(() => {
  window.__shown = [];
  let clarion;
  Object.defineProperty(window, "Clarion", {
    configurable: true,
    get() { return clarion; },
    set(value) {
      clarion = value;
      const emit = value.Client.prototype.emit;
      value.Client.prototype.emit = function (event, payload) {
        if (event === "notification") window.__shown.push(payload.id);
        return emit.call(this, event, payload);
      };
    },
  });
})();
"""


def test_notifications_created_while_the_page_reconnects_are_each_shown_once(
    api: Any,
    template: Any,
    spawn: Callable[..., Process],
    celery_worker_process: Callable[..., Process],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Posted before, during and after a server restart, while the page is away, while it
    reconnects and catches up, and once it is live again: each one shown, and only once."""
    celery_worker_process("web", concurrency=1)
    port = free_port()
    base, server = start_server(spawn, tmp_path, "uvicorn-before", port=port)
    api.put("/api/v1/recipients/user-42", {}, format="json")
    token = api.post("/api/v1/recipients/user-42/token").json()["token"]
    posted: list[str] = []

    def post() -> None:
        posted.append(post_notification(api, "user-42", f"A-{len(posted)}"))

    with chromium(monkeypatch) as browser:
        page = browser.new_page()
        page.add_init_script(RECORD_SHOWN)
        page.goto(f"{base}/inbox/#token={token}")
        page.wait_for_selector("#connection[data-state=live]", timeout=10_000)
        for _ in range(3):
            post()
        server.stop()
        page.wait_for_selector("#connection[data-state=connecting]", timeout=10_000)
        for _ in range(3):
            post()
        start_server(spawn, tmp_path, "uvicorn-after", port=port)
        # The page comes back within its backoff: posts keep going while it reconnects,
        # authenticates and catches up, and a few more once it is live.
        live_for = 0
        deadline = time.monotonic() + 20
        while live_for < 5:
            assert time.monotonic() < deadline, "the page did not come back"
            post()
            if page.query_selector("#connection[data-state=live]"):
                live_for += 1
            time.sleep(0.05)
        until(lambda: set(page.evaluate("window.__shown")) >= set(posted), timeout=20)
        time.sleep(1)  # anything shown twice would show by now
        shown = page.evaluate("window.__shown")

    assert sorted(shown) == sorted(posted), "each notification shown exactly once"
    assert len(posted) >= 12
