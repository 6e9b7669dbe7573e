"""Variants of the API server for `python -m bench.experiment`: each changes one thing a
profile pointed at, applied to Clarion's own settings at start (BENCH_VARIANT), so its gain is
measured before anyone changes the application. Several: BENCH_VARIANT=a+b."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

BODY_LIMIT = "notifications.api.middleware.BodySizeLimitMiddleware"


def _sync_chain(settings: Any) -> None:
    # A sync-only middleware innermost puts the whole chain in sync mode: one switch to the
    # request's thread instead of one per MiddlewareMixin hook around WhiteNoise.
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if m != BODY_LIMIT] + [BODY_LIMIT]


def _pool_32(settings: Any) -> None:
    # Under ASGI every request runs on a thread of its own and checks out its own connection.
    pool = settings.DATABASES["default"].get("OPTIONS", {}).get("pool")
    if pool:
        pool["max_size"] = 32


def _no_sent_events(settings: Any) -> None:
    from project.celery import app

    # One Redis PUBLISH (and one redis.Redis client) fewer per enqueued delivery; only
    # Flower's "sent" state reads these events.
    app.conf.task_send_sent_event = False


VARIANTS: dict[str, Callable[[Any], None]] = {
    "baseline": lambda settings: None,
    "sync_chain": _sync_chain,
    "pool_32": _pool_32,
    "no_sent_events": _no_sent_events,
}


def apply(spec: str | None) -> None:
    """Apply the variants named in `spec` (a+b) to the settings, before django.setup()."""
    from django.conf import settings

    for name in filter(None, (spec or "baseline").split("+")):
        VARIANTS[name](settings)
