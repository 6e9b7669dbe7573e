"""The middleware chain: the versioned API skips the browser's middleware (sessions, CSRF,
the session user, messages, X-Frame-Options); the admin and the browser pages keep it."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from notifications.api.middleware import BrowserOnlyMiddleware

pytestmark = pytest.mark.django_db


def test_the_api_answers_without_the_browser_middleware(api: Any, template: Any) -> None:
    response = api.get("/api/v1/templates")
    assert response.status_code == 200
    assert "X-Frame-Options" not in response.headers
    assert response.cookies == {}
    assert not hasattr(response.wsgi_request, "session")
    assert "X-Request-ID" in response.headers  # the outer chain still ran


def test_the_admin_keeps_sessions_csrf_and_frame_options(admin_client: Client) -> None:
    response = admin_client.get("/admin/")
    assert response.status_code == 200
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.wsgi_request.user.is_superuser
    assert hasattr(response.wsgi_request, "session")
    login = Client().get("/admin/login/")
    assert "csrftoken" in login.cookies


def test_the_api_prefix_is_the_versioned_api_only() -> None:
    seen: list[str] = []

    def view(request: Any) -> Any:
        from django.http import HttpResponse

        seen.append("session" if hasattr(request, "session") else "none")
        return HttpResponse("ok")

    from django.test import RequestFactory

    chain = BrowserOnlyMiddleware(view)
    factory = RequestFactory()
    for path in ("/api/v1/notifications", "/api/docs/", "/admin/", "/inbox/"):
        chain(factory.get(path))
    assert seen == ["none", "session", "session", "session"]
