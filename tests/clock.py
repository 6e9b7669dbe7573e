"""A process whose wall clock runs ahead or behind this one's: libfaketime (Debian's
`faketime` package), preloaded, with the monotonic clock left alone (tests/clock_shim)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FAKETIME_LIBRARY = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SHIM = Path(__file__).resolve().parent / "clock_shim"


def skewed_env(seconds: int) -> dict[str, str]:
    """The environment that moves a Python process's wall clock `seconds` ahead (negative:
    behind). Without libfaketime (`make test` installs it as root), fails on CI and skips
    elsewhere."""
    if not FAKETIME_LIBRARY.exists():
        why = f"libfaketime is missing ({FAKETIME_LIBRARY}): apt-get install -y faketime"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return {
        "LD_PRELOAD": str(FAKETIME_LIBRARY),
        "FAKETIME": f"{seconds:+d}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        # libfaketime caches the faked time for a few seconds by default; the offset is fixed.
        "FAKETIME_NO_CACHE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(SHIM), os.environ.get("PYTHONPATH")) if p),
    }
