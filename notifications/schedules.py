"""The time rules of routing, pure and without I/O: durations ("15m"), frequency caps
("3/1h"), escalation steps, and quiet hours in the recipient's time zone (DST-correct with
zoneinfo)."""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from notifications.models import CHANNEL_ORDER

_DURATION = re.compile(r"^\s*(\d{1,6})\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Longest window a cap or an escalation may name: a year.
MAX_SECONDS = 366 * 86400


class RuleError(ValueError):
    """A rule that cannot be used; `fields` maps a field path to messages."""

    def __init__(self, fields: dict[str, list[str]]):
        super().__init__("; ".join(f"{k}: {' '.join(v)}" for k, v in fields.items()))
        self.fields = fields


def duration_parse(text: Any) -> timedelta:
    """`30s`, `15m`, `1h`, `1d` → timedelta; ValueError otherwise."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError("A duration is a number and a unit: 30s, 15m, 1h or 1d.")
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError("A duration is more than 0 and at most 366d.")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class Cap:
    limit: int
    window: timedelta


def cap_parse(text: Any) -> Cap:
    """`3/1h` → at most 3 per hour."""
    if not isinstance(text, str) or "/" not in text:
        raise ValueError("A cap is N/window, e.g. 3/1h or 1/1d.")
    count, window = text.split("/", 1)
    if not count.strip().isdigit() or not 0 < int(count) <= 100_000:
        raise ValueError("A cap's N is a whole number from 1 to 100000.")
    return Cap(int(count), duration_parse(window))


def caps_parse(caps: Any, *, path: str = "frequency_caps") -> dict[str, Cap]:
    """{"email": "3/1h", ...} → {"email": Cap}; RuleError names each bad entry."""
    if not isinstance(caps, dict):
        raise RuleError({path: ['Must be an object of channel: "N/window".']})
    parsed: dict[str, Cap] = {}
    errors: dict[str, list[str]] = {}
    for channel, text in caps.items():
        if channel not in CHANNEL_ORDER:
            errors[f"{path}.{channel}"] = [f"Unknown channel; use {', '.join(CHANNEL_ORDER)}."]
            continue
        try:
            parsed[channel] = cap_parse(text)
        except ValueError as exc:
            errors[f"{path}.{channel}"] = [str(exc)]
    if errors:
        raise RuleError(errors)
    return parsed


ESCALATION_CONDITIONS = ("read", "delivered")


@dataclass(frozen=True)
class EscalationStep:
    after: timedelta
    unless: str
    channel: str


def escalation_parse(steps: Any, *, path: str = "escalation") -> list[EscalationStep]:
    """[{"after": "15m", "unless": "read", "channel": "sms"}, ...], each channel once."""
    if not isinstance(steps, list):
        raise RuleError({path: ["Must be a list of {after, unless, channel}."]})
    parsed: list[EscalationStep] = []
    errors: dict[str, list[str]] = {}
    seen: set[str] = set()
    for index, step in enumerate(steps):
        where = f"{path}.{index}"
        if not isinstance(step, dict):
            errors[where] = ["Must be an object {after, unless, channel}."]
            continue
        unknown = set(step) - {"after", "unless", "channel"}
        if unknown:
            errors[where] = [f"Unknown field {', '.join(sorted(unknown))}."]
            continue
        try:
            after = duration_parse(step.get("after"))
        except ValueError as exc:
            errors[f"{where}.after"] = [str(exc)]
            continue
        unless = step.get("unless", "read")
        if unless not in ESCALATION_CONDITIONS:
            errors[f"{where}.unless"] = ["Use read or delivered."]
            continue
        channel = step.get("channel")
        if channel not in CHANNEL_ORDER:
            errors[f"{where}.channel"] = [f"Use one of {', '.join(CHANNEL_ORDER)}."]
            continue
        if channel in seen:
            errors[f"{where}.channel"] = ["Each channel escalates once."]
            continue
        seen.add(channel)
        parsed.append(EscalationStep(after, unless, channel))
    if errors:
        raise RuleError(errors)
    return parsed


@dataclass(frozen=True)
class DigestRule:
    window: timedelta
    key: str  # a Jinja template over the notification's data; "" groups every event
    web_at_once: bool  # the in-app channel is not digested: it shows in the inbox at once


def digest_parse(document: Any, *, path: str = "digest") -> DigestRule | None:
    """{"window": "1h", "key": "{{ project_id }}", "web_at_once": true} → DigestRule; an
    empty object or None means no digest."""
    if document is None or document == {}:
        return None
    if not isinstance(document, dict):
        raise RuleError({path: ['Must be {"window": "1h", "key": "...", "web_at_once": true}.']})
    errors: dict[str, list[str]] = {}
    unknown = set(document) - {"window", "key", "web_at_once"}
    if unknown:
        errors[path] = [f"Unknown field {', '.join(sorted(unknown))}."]
    window = timedelta(0)
    try:
        window = duration_parse(document.get("window"))
    except ValueError as exc:
        errors[f"{path}.window"] = [str(exc)]
    key = document.get("key", "")
    if not isinstance(key, str) or len(key) > 500:
        errors[f"{path}.key"] = ["A template of at most 500 characters, e.g. {{ project_id }}."]
    web_at_once = document.get("web_at_once", True)
    if not isinstance(web_at_once, bool):
        errors[f"{path}.web_at_once"] = ["Must be true or false."]
    if errors:
        raise RuleError(errors)
    return DigestRule(window, key, web_at_once)


# --- Quiet hours ----------------------------------------------------------------------------

_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class QuietHours:
    start: time
    end: time
    channels: frozenset[str]

    def document(self) -> dict[str, Any]:
        return {
            "start": self.start.strftime("%H:%M"),
            "end": self.end.strftime("%H:%M"),
            "channels": [c for c in CHANNEL_ORDER if c in self.channels],
        }


def quiet_hours_parse(document: Any, *, path: str = "quiet_hours") -> QuietHours | None:
    """{"start": "22:00", "end": "07:00", "channels": [...]} (channels: every one when
    absent) → QuietHours; None for null; RuleError otherwise."""
    if document is None:
        return None
    if not isinstance(document, dict):
        raise RuleError({path: ['Must be {"start": "HH:MM", "end": "HH:MM", "channels": [...]}.']})
    errors: dict[str, list[str]] = {}
    unknown = set(document) - {"start", "end", "channels"}
    if unknown:
        errors[path] = [f"Unknown field {', '.join(sorted(unknown))}."]
    clocks: dict[str, time] = {}
    for name in ("start", "end"):
        value = document.get(name)
        match = _CLOCK.match(value) if isinstance(value, str) else None
        if match is None:
            errors[f"{path}.{name}"] = ["A time of day HH:MM, 00:00 to 23:59."]
        else:
            clocks[name] = time(int(match.group(1)), int(match.group(2)))
    if len(clocks) == 2 and clocks["start"] == clocks["end"]:
        errors[f"{path}.end"] = ["Must differ from start."]
    channels = document.get("channels", list(CHANNEL_ORDER))
    if not isinstance(channels, list) or not channels:
        errors[f"{path}.channels"] = ["A non-empty list of channels."]
    else:
        bad = [c for c in channels if c not in CHANNEL_ORDER]
        if bad:
            errors[f"{path}.channels"] = [f"Unknown channel; use {', '.join(CHANNEL_ORDER)}."]
    if errors:
        raise RuleError(errors)
    return QuietHours(clocks["start"], clocks["end"], frozenset(channels))


def _zone(name: str) -> zoneinfo.ZoneInfo | None:
    try:
        return zoneinfo.ZoneInfo(name) if name else None
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return None


def _wall(day: Any, clock: time, zone: Any) -> datetime:
    """`clock` on `day` in `zone`, as an instant. A wall time that does not exist (skipped by
    a DST change) comes out as the instant the clocks jumped over it."""
    local = datetime.combine(day, clock, tzinfo=zone)
    return local.astimezone(UTC)


def quiet_until(
    quiet: QuietHours | None, *, timezone_name: str, channel: str, at: datetime
) -> datetime | None:
    """When the quiet window that `at` falls into ends (UTC), or None when `at` is outside
    it or the channel is not quiet. The window is read on the recipient's wall clock, so
    22:00-07:00 stays 22:00-07:00 local across a DST change."""
    if quiet is None or channel not in quiet.channels:
        return None
    zone = _zone(timezone_name) or UTC
    local = at.astimezone(zone)
    clock = local.time().replace(tzinfo=None)
    day = local.date()
    if quiet.start < quiet.end:  # same day, e.g. 13:00-14:00
        if quiet.start <= clock < quiet.end:
            return _wall(day, quiet.end, zone)
        return None
    # Over midnight, e.g. 22:00-07:00.
    if clock >= quiet.start:
        return _wall(day + timedelta(days=1), quiet.end, zone)
    if clock < quiet.end:
        return _wall(day, quiet.end, zone)
    return None
