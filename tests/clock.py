"""A process whose wall clock runs ahead or behind this one's: libfaketime (Debian's
`faketime` package), preloaded, with the monotonic clock left alone (tests/clock_shim)."""

from __future__ import annotations

from pathlib import Path

import pytest

FAKETIME_LIBRARY = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SHIM = Path(__file__).resolve().parent / "clock_shim"


def skewed_env(seconds: int) -> dict[str, str]:
    """The environment that moves a Python process's wall clock `seconds` ahead (negative:
    behind). Fails the test when libfaketime is missing (`make test` installs it)."""
    if not FAKETIME_LIBRARY.exists():
        pytest.fail(f"libfaketime is missing ({FAKETIME_LIBRARY}): apt-get install -y faketime")
    return {
        "LD_PRELOAD": str(FAKETIME_LIBRARY),
        "FAKETIME": f"{seconds:+d}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        # libfaketime caches the faked time for a few seconds by default; the offset is fixed.
        "FAKETIME_NO_CACHE": "1",
        "PYTHONPATH": str(SHIM),
    }
