"""Liveness of the processes that answer no HTTP of their own (each Celery worker's main
process, the relay): each registers what it knows of its own health, and the small server that
serves this host's metrics on WORKER_METRICS_PORT also answers GET /healthz with 200, or 503
and the reasons, so that a container's healthcheck or a Kubernetes liveness probe sees a
process that can no longer do its work (a stalled consumer, an event loop that stopped, a
broker or database it has not reached for a while), not merely one that still runs."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from django.conf import settings
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.metrics import multiprocess_registry

log = logging.getLogger(__name__)

# A check returns None when all is well, else what is wrong, in a few words.
Check = Callable[[], str | None]
_CHECKS: list[Check] = []


def liveness_check_register(check: Check) -> None:
    _CHECKS.append(check)


def liveness_problems() -> list[str]:
    problems = []
    for check in list(_CHECKS):
        try:
            problem = check()
        except Exception as exc:  # noqa: BLE001 - a check that fails is itself the answer
            problem = f"{getattr(check, '__name__', 'check')} failed: {exc}"
        if problem:
            problems.append(problem)
    return problems


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/healthz":
            problems = liveness_problems()
            body = json.dumps(
                {"status": "unavailable" if problems else "ok", "problems": problems}
            ).encode()
            self._answer(503 if problems else 200, "application/json", body)
        else:
            self._answer(200, CONTENT_TYPE_LATEST, generate_latest(multiprocess_registry()))

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Probes and scrapes are not worth a log line each."""


def liveness_server_start() -> None:
    """Serve this host's metrics (every path but /healthz) and this process's liveness
    (/healthz) on WORKER_METRICS_PORT, from a thread; nothing when the port is 0. Scrape-time
    gauges stay with the API's /metrics, which reads the broker and the database for every
    host."""
    port = settings.WORKER_METRICS_PORT
    if not port:
        return
    try:
        server = ThreadingHTTPServer((settings.WORKER_METRICS_ADDR, port), _Handler)
    except OSError as exc:
        # Another process on this host serves it already; this one still works.
        log.error("metrics and liveness not served on port %s: %s", port, exc)
        return
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="liveness", daemon=True).start()
    log.info("metrics and /healthz served on %s:%s", settings.WORKER_METRICS_ADDR, port)
