"""System checks of Clarion's own settings. Django runs them when manage.py starts a command
(migrate, relay, check), so a deployment hears of a setting that will not work as meant."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage
from django.core.checks import Warning as CheckWarning

# `manage.py check --tag clarion` runs these alone.
TAG = "clarion"


def public_base_url_is_https(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """One-click unsubscribe links are made from PUBLIC_BASE_URL. RFC 8058 requires https,
    and mailbox providers ignore an http link, so outside DEBUG (a developer's machine) a
    public URL that is not https, or none, is a warning."""
    if settings.DEBUG:
        return []
    base = settings.PUBLIC_BASE_URL
    if base.lower().startswith("https://"):
        return []
    if base:
        problem = (
            f"PUBLIC_BASE_URL is {base}, not https: mailbox providers ignore the one-click "
            "unsubscribe links (List-Unsubscribe, RFC 8058) made from it."
        )
    else:
        problem = (
            "PUBLIC_BASE_URL is not set, so one-click unsubscribe links (List-Unsubscribe, "
            f"RFC 8058) point at http://localhost:{settings.PORT}: mailbox providers ignore "
            "links that are not https."
        )
    return [
        CheckWarning(
            problem,
            hint="Set PUBLIC_BASE_URL to the https:// address the world reaches Clarion at, "
            "for example https://notify.example.com.",
            id="clarion.W001",
        )
    ]
