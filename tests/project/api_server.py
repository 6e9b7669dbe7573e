"""A real API server process (uvicorn on the project's ASGI application) for tests, on the
test's database and broker, and a small HTTP client for it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BIN, Process, free_port, process_env, wait_until


@dataclass
class Answer:
    status: int
    # Lowercased names: HTTP header names are case-insensitive, and uvicorn sends lowercase.
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None
) -> Answer:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, method=method, data=data, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=15) as answer:
            return Answer(answer.status, _lowered(answer.headers.items()), answer.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, _lowered(error.headers.items()), error.read())


def _lowered(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers}


def start_api_server(
    spawn: Callable[..., Process],
    tmp_path: Path,
    *,
    name: str = "api",
    port: int | None = None,
    workers: int = 1,
    access_log: bool = True,
    **env: Any,
) -> tuple[Process, str]:
    """Start uvicorn on project.asgi (the API and the WebSocket server) and wait until it
    answers /healthz; returns the process and base URL. The one way tests start a server."""
    port = port or free_port()
    argv = [
        str(BIN / "uvicorn"),
        "project.asgi:application",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--lifespan",
        "off",
    ]
    if not access_log:
        argv.append("--no-access-log")
    server = spawn(name, argv, process_env(tmp_path, **env))
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if server.popen.poll() is not None:
            pytest.fail(f"API server {name} exited early:\n{server.log()}")
        try:
            return http("GET", f"{base}/healthz").status == 200
        except OSError:
            return False

    wait_until(ready, timeout=60, interval=0.1, message=f"the API server {name}")
    return server, base
