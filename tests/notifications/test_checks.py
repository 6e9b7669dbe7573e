"""Clarion's system checks: outside DEBUG, a public URL that is not https is a warning, since
mailbox providers ignore one-click unsubscribe links that are not."""

from __future__ import annotations

from io import StringIO
from typing import Any

import pytest
from django.core import checks
from django.core.management import call_command

HINT = (
    "Set PUBLIC_BASE_URL to the https:// address the world reaches Clarion at, for example "
    "https://notify.example.com."
)


def _warning(msg: str) -> checks.Warning:
    return checks.Warning(msg, hint=HINT, id="clarion.W001")


def test_no_public_url_warns_that_links_point_at_localhost(settings: Any) -> None:
    settings.DEBUG, settings.PUBLIC_BASE_URL, settings.PORT = False, "", 8000
    assert checks.run_checks(tags=["clarion"]) == [
        _warning(
            "PUBLIC_BASE_URL is not set, so one-click unsubscribe links (List-Unsubscribe, "
            "RFC 8058) point at http://localhost:8000: mailbox providers ignore links that "
            "are not https."
        )
    ]


def test_an_http_public_url_warns(settings: Any) -> None:
    settings.DEBUG, settings.PUBLIC_BASE_URL = False, "http://notify.example.com"
    assert checks.run_checks(tags=["clarion"]) == [
        _warning(
            "PUBLIC_BASE_URL is http://notify.example.com, not https: mailbox providers "
            "ignore the one-click unsubscribe links (List-Unsubscribe, RFC 8058) made from it."
        )
    ]


@pytest.mark.parametrize(
    ("debug", "url"),
    [(False, "https://notify.example.com"), (False, "HTTPS://Notify.example.com"), (True, "")],
)
def test_https_or_debug_is_quiet(settings: Any, debug: bool, url: str) -> None:
    settings.DEBUG, settings.PUBLIC_BASE_URL = debug, url
    assert checks.run_checks(tags=["clarion"]) == []


def test_manage_py_check_reports_it(settings: Any) -> None:
    """Registered by the app (notifications.apps), so every manage.py command that checks
    at start-up (migrate, relay, check) prints it."""
    settings.DEBUG, settings.PUBLIC_BASE_URL = False, "http://notify.example.com"
    err = StringIO()
    call_command("check", stderr=err, stdout=StringIO())
    assert err.getvalue() == (
        "System check identified some issues:\n\nWARNINGS:\n"
        "?: (clarion.W001) PUBLIC_BASE_URL is http://notify.example.com, not https: mailbox "
        "providers ignore the one-click unsubscribe links (List-Unsubscribe, RFC 8058) made "
        f"from it.\n\tHINT: {HINT}\n\nSystem check identified 1 issue (3 silenced).\n"
    )
