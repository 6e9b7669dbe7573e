"""The time rules of routing: durations, caps, escalation steps, and quiet hours on the
recipient's wall clock across DST changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from notifications.schedules import (
    RuleError,
    cap_parse,
    caps_parse,
    duration_parse,
    escalation_parse,
    quiet_hours_parse,
    quiet_until,
)
from notifications.templating import locale_chain, locale_normalize, pick_locale_content

NIGHT = quiet_hours_parse({"start": "22:00", "end": "07:00", "channels": ["sms", "push"]})
LUNCH = quiet_hours_parse({"start": "12:00", "end": "13:30"})


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("15m", 900), ("1h", 3600), (" 2d ", 172800)]
)
def test_durations(text: str, seconds: int) -> None:
    assert duration_parse(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "15", "m", "1w", "0s", "-1h", "367d", 15, None, "1.5h"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        duration_parse(text)


def test_caps() -> None:
    assert cap_parse("3/1h").limit == 3
    assert cap_parse("3/1h").window == timedelta(hours=1)
    with pytest.raises(RuleError) as caught:
        caps_parse({"email": "3", "fax": "1/1d", "sms": "0/1h", "push": "2/1y"})
    assert set(caught.value.fields) == {
        "frequency_caps.email",
        "frequency_caps.fax",
        "frequency_caps.sms",
        "frequency_caps.push",
    }


def test_escalation_steps() -> None:
    [step] = escalation_parse([{"after": "15m", "unless": "read", "channel": "sms"}])
    assert (step.after, step.unless, step.channel) == (timedelta(minutes=15), "read", "sms")
    assert escalation_parse([{"after": "1h", "channel": "email"}])[0].unless == "read"
    with pytest.raises(RuleError) as caught:
        escalation_parse(
            [
                {"after": "15m", "unless": "clicked", "channel": "sms"},
                {"after": "1h", "channel": "fax"},
                {"after": "1h", "channel": "email", "when": "x"},
                "sms",
            ]
        )
    assert set(caught.value.fields) == {
        "escalation.0.unless",
        "escalation.1.channel",
        "escalation.2",
        "escalation.3",
    }
    with pytest.raises(RuleError, match="once"):
        escalation_parse([{"after": "1m", "channel": "sms"}, {"after": "2m", "channel": "sms"}])


def test_quiet_hours_documents() -> None:
    assert NIGHT is not None and NIGHT.document() == {
        "start": "22:00",
        "end": "07:00",
        "channels": ["sms", "push"],
    }
    assert LUNCH is not None and LUNCH.document()["channels"] == ["email", "sms", "push", "web"]
    assert quiet_hours_parse(None) is None
    with pytest.raises(RuleError) as caught:
        quiet_hours_parse({"start": "24:00", "end": "7", "channels": ["fax"], "mute": True})
    assert set(caught.value.fields) == {
        "quiet_hours",
        "quiet_hours.start",
        "quiet_hours.end",
        "quiet_hours.channels",
    }
    with pytest.raises(RuleError, match="differ"):
        quiet_hours_parse({"start": "07:00", "end": "07:00"})


def test_a_window_over_midnight_in_the_recipients_zone() -> None:
    # 23:30 in Paris (CET, UTC+1) on 1 December: held until 07:00 the next morning.
    at = utc(2026, 12, 1, 22, 30)
    assert quiet_until(NIGHT, timezone_name="Europe/Paris", channel="sms", at=at) == utc(
        2026, 12, 2, 6, 0
    )
    # 05:00 in Paris: until 07:00 the same morning.
    assert quiet_until(
        NIGHT, timezone_name="Europe/Paris", channel="sms", at=utc(2026, 12, 2, 4)
    ) == utc(2026, 12, 2, 6)
    # Outside the window, for a channel that is not quiet, or with no quiet hours: nothing.
    assert quiet_until(
        NIGHT, timezone_name="Europe/Paris", channel="sms", at=utc(2026, 12, 2, 5, 59)
    ) == utc(2026, 12, 2, 6)
    assert (
        quiet_until(NIGHT, timezone_name="Europe/Paris", channel="sms", at=utc(2026, 12, 2, 6))
        is None
    )
    assert quiet_until(NIGHT, timezone_name="Europe/Paris", channel="email", at=at) is None
    assert quiet_until(None, timezone_name="Europe/Paris", channel="sms", at=at) is None


def test_the_end_is_local_time_across_a_dst_change() -> None:
    # New York, night of 31 October to 1 November 2026: clocks go back at 02:00 EDT.
    # 23:00 EDT (03:00 UTC) is inside; 07:00 EST the next morning is 12:00 UTC, not 11:00.
    held = quiet_until(
        NIGHT, timezone_name="America/New_York", channel="sms", at=utc(2026, 11, 1, 3)
    )
    assert held == utc(2026, 11, 1, 12)
    # Spring forward (8 March 2026): 23:00 EST (04:00 UTC) is held until 07:00 EDT = 11:00 UTC.
    held = quiet_until(
        NIGHT, timezone_name="America/New_York", channel="sms", at=utc(2026, 3, 8, 4)
    )
    assert held == utc(2026, 3, 8, 11)


def test_a_wall_time_skipped_by_dst_ends_at_the_jump() -> None:
    early = quiet_hours_parse({"start": "01:00", "end": "02:30"})
    # Paris, 29 March 2026: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist.
    held = quiet_until(
        early, timezone_name="Europe/Paris", channel="sms", at=utc(2026, 3, 29, 0, 30)
    )
    assert held is not None
    assert utc(2026, 3, 29, 1) <= held <= utc(2026, 3, 29, 1, 30)


def test_without_a_time_zone_the_window_is_utc() -> None:
    assert quiet_until(LUNCH, timezone_name="", channel="web", at=utc(2026, 12, 1, 12, 10)) == utc(
        2026, 12, 1, 13, 30
    )
    assert quiet_until(LUNCH, timezone_name="", channel="web", at=utc(2026, 12, 1, 13, 30)) is None


def test_locale_chain() -> None:
    assert locale_normalize("pt_BR") == locale_normalize("PT-br") == "pt-br"
    assert locale_chain("zh_Hant_TW") == ["zh-hant-tw", "zh-hant", "zh"]
    assert locale_chain("") == []


def test_locale_content_falls_back_channel_by_channel() -> None:
    content = {"sms": {"body": "en sms"}, "email": {"subject": "en", "body": "en"}}
    translations = {
        "pt": {"sms": {"body": "pt sms"}, "email": {"subject": "pt", "body": "pt"}},
        "pt-BR": {"sms": {"body": "pt-BR sms"}},
    }
    for wanted in ("pt-BR", "pt_BR", "pt-br", "PT_br"):
        locale, merged = pick_locale_content(
            default_locale="en", content=content, translations=translations, wanted=wanted
        )
        assert locale == "pt-BR"
        assert merged == {
            "sms": {"body": "pt-BR sms"},
            "email": {"subject": "pt", "body": "pt"},
        }
    assert pick_locale_content(
        default_locale="en", content=content, translations=translations, wanted="pt-PT"
    ) == ("pt", translations["pt"])
    assert pick_locale_content(
        default_locale="en", content=content, translations=translations, wanted="de"
    ) == ("en", content)
