"""Summarise a py-spy raw profile taken with --idle --threads on the API process.

Django runs every sync view of an ASGI server on one thread (sync_to_async, thread-sensitive),
so that thread's wall time per request bounds the accepts per second of a server process.
The summary therefore reports, per thread, how busy it was, and for the stacks that serve a
request: self time and inclusive time by file and function, waits on Redis and PostgreSQL
included (they hold that one thread as surely as CPU work does)."""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_SITE = re.compile(r".*/site-packages/")
_THREAD = re.compile(r"^thread \((?P<tid>\d+)\)(?::\s*(?P<name>.*))?$")
# A stack that is serving a request on the sync thread.
REQUEST_MARKERS = ("asgiref/sync.py:SyncToAsync.thread_handler",)
# Buckets of request time worth naming in a report. Publishing is recognised anywhere in the
# stack (its Redis I/O included); the others by the innermost frame that matches.
PUBLISH = ("celery/", "kombu/")
BUCKETS = (
    ("redis round trips (cache, idempotency)", ("redis/",)),
    ("postgresql (driver and waits)", ("psycopg/", "psycopg_pool/")),
    ("django ORM (python side)", ("django/db/",)),
    ("DRF request/serializers", ("rest_framework/",)),
    ("jinja2 rendering", ("jinja2/",)),
    ("json", ("stdlib/json/",)),
    ("logging", ("stdlib/logging/", "structlog/")),
    ("prometheus metrics", ("prometheus_client/",)),
    ("django (handlers, middleware, urls)", ("django/",)),
)


def _wait(frames: list[str]) -> str:
    """Where a request's thread stands still: for a database connection from the pool, or
    for the event loop during a sync/async switch (AsyncToSync in the middleware chain)."""
    if not frames or not frames[-1].endswith("Condition.wait"):
        return "working (CPU, or a Redis/PostgreSQL round trip)"
    if any(f.startswith("psycopg_pool/") for f in frames):
        return "waiting for a pooled database connection (psycopg_pool getconn)"
    if any("run_until_future" in f for f in frames[-4:]):
        return "waiting for the event loop (sync/async switch in the middleware chain)"
    return "waiting on another lock or condition"


def _bucket(frames: list[str]) -> str:
    if any(frame.startswith(PUBLISH) for frame in frames):
        return "celery/kombu publish (its redis I/O included)"
    for frame in reversed(frames):
        for name, prefixes in BUCKETS:
            if frame.startswith(prefixes):
                return name
    return "other (clarion code, stdlib)"


def _short(frame: str, root: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = _SITE.sub("", match["file"])
    if root and path.startswith(root):
        path = path[len(root) :].lstrip("/")
    path = re.sub(r"^.*/lib/python3\.\d+/", "stdlib/", path)
    return f"{path}:{match['func']}"


def _stacks(raw_path: Path, root: str) -> list[tuple[str, list[str], int]]:
    out = []
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        parts = stack.split(";")
        thread = "?"
        if parts and (m := _THREAD.match(parts[0])):
            thread = m["name"] or m["tid"]
            parts = parts[1:]
        out.append((thread, [_short(f, root) for f in parts if f], int(count_text)))
    return out


def summarise(raw_path: Path, *, root: str = "", top: int = 25) -> dict[str, Any]:
    stacks = _stacks(raw_path, root)
    per_thread: Counter[str] = Counter()
    request_by_thread: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    waits: Counter[str] = Counter()
    request_total = 0
    for thread, frames, count in stacks:
        per_thread[thread] += count
        joined = ";".join(frames)
        leaf = frames[-1] if frames else ""
        if any(marker in joined for marker in REQUEST_MARKERS):
            request_by_thread[thread] += count
            request_total += count
            self_time[leaf] += count
            for frame in set(frames):
                inclusive[frame] += count
            buckets[_bucket(frames)] += count
            waits[_wait(frames)] += count

    def table(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {
                "function": name,
                "samples": n,
                "share": round(n / request_total, 4) if request_total else 0.0,
            }
            for name, n in counter.most_common(top)
        ]

    threads = [
        {
            "thread": thread,
            "samples": n,
            "serving_requests": round(request_by_thread[thread] / n, 3),
        }
        for thread, n in per_thread.most_common(8)
    ]
    return {
        "request_samples": request_total,
        "threads": threads,
        "waits": table(waits),
        "buckets": table(buckets),
        "self": table(self_time),
        "inclusive": table(inclusive),
    }


def render(summary: dict[str, Any]) -> str:
    lines = [f"request-serving samples: {summary['request_samples']}", "", "threads:"]
    lines += [
        f"  {t['thread'][:40]:40}  samples {t['samples']:6}  serving {t['serving_requests']:6.1%}"
        for t in summary["threads"]
    ]
    for title, key in (
        ("request time: waiting or working", "waits"),
        ("request time by what runs", "buckets"),
        ("request time, self (top)", "self"),
        ("request time, inclusive (top)", "inclusive"),
    ):
        lines += ["", f"{title}:"]
        lines += [f"  {row['share']:6.1%}  {row['function']}" for row in summary[key]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(summarise(Path(sys.argv[1]), root=str(Path.cwd()), top=40)))
