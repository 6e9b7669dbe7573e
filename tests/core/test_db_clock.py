"""The per-process estimate of the database's clock (core/db_clock.py): it agrees with
the database's own reading, is refreshed in the background, and stands in with the host's clock
when the database cannot be read."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.db import connection

from core import db_clock
from tests.conftest import ROOT, process_env

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def on_postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("on SQLite the database's clock is this host's: nothing is read")


def database_clock() -> datetime:
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        value: datetime = cursor.fetchone()[0]
    return value.astimezone(UTC)


def test_the_estimate_falls_between_two_readings_of_the_database_clock() -> None:
    reading = db_clock.measure()
    assert reading.error < 0.05
    before = database_clock()
    estimate = db_clock.now()
    after = database_clock()
    slack = timedelta(milliseconds=50)
    assert before - slack <= estimate <= after + slack


def run(tmp_path: Path, script: str, **env: str) -> dict[str, object]:
    """`script` in a fresh Clarion process (Django set up); it prints one JSON line."""
    code = "import django, json\ndjango.setup()\nfrom core import db_clock\n" + script
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=process_env(tmp_path, DJANGO_SETTINGS_MODULE="project.settings", **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def test_a_process_reads_the_clock_once_then_refreshes_it_in_the_background(
    tmp_path: Path,
) -> None:
    answer = run(
        tmp_path,
        "import time\n"
        "db_clock.now(); first = db_clock.reading()\n"
        "db_clock.now(); again = db_clock.reading()\n"
        "time.sleep(1.5)\n"
        "later = db_clock.reading()\n"
        "print(json.dumps({'kept': again is first, 'refreshed': later.monotonic > first.monotonic,"
        " 'error': later.error}))\n",
        DB_CLOCK_REFRESH_SECONDS="0.5",
    )
    assert answer["kept"] is True and answer["refreshed"] is True
    assert isinstance(answer["error"], float) and answer["error"] < 0.05


def test_without_a_reading_the_host_clock_stands_in(tmp_path: Path) -> None:
    answer = run(
        tmp_path,
        "import time\n"
        "now = db_clock.now().timestamp()\n"
        "error = str(db_clock.reading().error)\n"
        "print(json.dumps({'off': abs(now - time.time()), 'error': error}))\n",
        DATABASE_URL="postgres://postgres@127.0.0.1:1/nowhere",
    )
    assert answer["error"] == "inf"
    assert isinstance(answer["off"], float) and answer["off"] < 1
