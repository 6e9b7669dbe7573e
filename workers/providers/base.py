"""The provider interface: one outbound message in, one normalised result out."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable


class Outcome(enum.StrEnum):
    OK = "ok"
    TRANSIENT = "transient"  # worth retrying: timeouts, connection errors, 5xx, 429
    PERMANENT = "permanent"  # retrying cannot help: other 4xx, bounced address, bad token


@dataclass(frozen=True)
class OutboundMessage:
    delivery_id: int
    notification_id: str
    owner_id: int
    channel: str
    # An email address or phone number; for push, the recipient's device tokens.
    to: str | list[str]
    content: dict[str, str]
    data: dict[str, Any] = field(default_factory=dict)
    # Extra email headers (List-Unsubscribe and List-Unsubscribe-Post, RFC 8058).
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SendResult:
    outcome: Outcome
    provider_message_id: str = ""
    status_code: int | None = None
    error: str = ""
    # Seconds the provider asked us to wait (HTTP Retry-After), if it said so.
    retry_after: float | None = None
    # Push tokens the provider reported as no longer registered.
    invalid_tokens: tuple[str, ...] = ()
    # The provider said the address must not be sent to again (a SuppressionReason: a hard
    # bounce at the SMTP server, Twilio's 21610 for a number that replied STOP).
    suppress: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def throttled(self) -> bool:
        """The provider asked us to slow down (HTTP 429): not a failure of the provider."""
        return self.status_code == 429


class Provider(Protocol):
    name: str

    def send(self, message: OutboundMessage) -> SendResult: ...


@runtime_checkable
class BatchProvider(Protocol):
    """A provider whose API takes many messages in one call (SendGrid personalizations)."""

    name: str
    max_batch: int

    def send(self, message: OutboundMessage) -> SendResult: ...

    def send_batch(self, messages: list[OutboundMessage]) -> list[SendResult]:
        """One result per message, in order."""
        ...


class HookRefused(Exception):
    """A post to a provider hook that is not the provider's: unsigned, badly signed (`status`
    401) or stale (400)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class ProviderEventIn:
    """One event a provider posted about a message it accepted (or an inbound message), in
    our terms; `kind` is a ProviderEventKind, "stop", "start" or "ignored"."""

    provider: str
    event_id: str
    kind: str
    raw_status: str
    occurred_at: datetime
    payload: dict[str, Any]
    detail: str = ""
    # The address must not be sent to again: a SuppressionReason, or "".
    suppress: str = ""
    delivery_id: int | None = None
    message_id: str = ""
    address: str = ""
