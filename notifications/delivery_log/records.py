"""The records the delivery log holds, shared by its interface and its backends."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class AttemptRecord:
    """One provider call for one delivery."""

    delivery_id: int
    notification_id: str
    owner_id: int
    recipient_id: str
    channel: str
    number: int
    provider: str
    outcome: str
    status_code: int | None
    provider_message_id: str
    error: str
    started_at: datetime
    latency_ms: float

    def as_api(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "provider": self.provider,
            "outcome": self.outcome,
            "status_code": self.status_code,
            "provider_message_id": self.provider_message_id or None,
            "error": self.error or None,
            "started_at": self.started_at,
            "latency_ms": round(self.latency_ms, 3),
        }


@dataclass(frozen=True)
class StatusEvent:
    """A delivery entering a status (queued, sent, retrying, dead, delivered, read, …)."""

    delivery_id: int
    notification_id: str
    owner_id: int
    recipient_id: str
    channel: str
    status: str
    at: datetime
    detail: str = ""
