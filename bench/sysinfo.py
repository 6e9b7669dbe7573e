"""What the figures were measured on: the machine, and the versions of everything in the path."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def _wrk_version() -> str:
    try:
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "-"
    match = re.search(r"wrk (\S+)", out.stdout + out.stderr)
    return match.group(1) if match else "-"


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "loadavg_at_start": _loadavg(),
    }


def versions(*, redis_version: str, database: str) -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "django": _version("Django"),
        "djangorestframework": _version("djangorestframework"),
        "uvicorn": _version("uvicorn"),
        "uvloop": _version("uvloop"),
        "httptools": _version("httptools"),
        "channels": _version("channels"),
        "channels_redis": _version("channels_redis"),
        "websockets": _version("websockets"),
        "celery": _version("celery"),
        "kombu": _version("kombu"),
        "redis_server": redis_version,
        "database": database,
        "wrk": _wrk_version(),
    }
