"""The one clock that leases and the workers' due times are written and compared on: the
database's. Hosts' wall clocks drift apart, and a worker, relay or sweeper whose clock runs
ahead would otherwise take leases still held, send retries and scheduled deliveries early, and
sweep messages that are not lost; they share the database's `now()` instead (SQL, no extra
round trip). Due times set when a notification is accepted (an escalation step's, a digest
window's end, a quiet-hours end) are still the accepting host's clock plus an offset."""

from __future__ import annotations

from datetime import timedelta

from django.db.models import DateTimeField, ExpressionWrapper
from django.db.models.functions import Now


def db_now() -> Now:
    """The database's time when the statement runs (PostgreSQL STATEMENT_TIMESTAMP(); SQLite
    STRFTIME('%Y-%m-%d %H:%M:%f', 'NOW'))."""
    return Now()


def db_now_plus(seconds: float) -> ExpressionWrapper:
    """The database's time `seconds` from when the statement runs (negative: ago)."""
    return ExpressionWrapper(Now() + timedelta(seconds=seconds), output_field=DateTimeField())
