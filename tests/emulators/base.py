"""A local HTTP server that stands in for a provider's API: it records every request, answers
like the provider, and can be told to fail (status codes, Retry-After, slow answers, refused
connections). Each vendor's emulator subclasses it with the vendor's paths and bodies."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.conftest import free_port


@dataclass(frozen=True)
class Request:
    """One request as the emulator received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(self.body.decode())


@dataclass(frozen=True)
class Response:
    status: int
    body: Any = None  # JSON-encoded unless bytes
    headers: dict[str, str] = field(default_factory=dict)
    # Seconds to wait before answering: past the client's timeout this is a timeout.
    delay: float = 0.0


class Emulator:
    """Subclasses implement `answer(request)` for the provider's success path (and its own
    validation errors); faults queued with `fail_next` or set with `fail_always` win."""

    name = "emulator"

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._accepted: list[Request] = []
        self._faults: list[Response] = []
        self._always: Response | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        # Seconds every normal answer takes, so that calls are in flight for a while.
        self.latency = 0.0

    # --- life cycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Emulator:
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with emulator._lock:
                    emulator._connections.add(self.connection)

            def finish(self) -> None:
                with emulator._lock:
                    emulator._connections.discard(self.connection)
                super().finish()

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                parsed = urllib.parse.urlsplit(self.path)
                request = Request(
                    method=self.command,
                    path=parsed.path,
                    query=urllib.parse.parse_qs(parsed.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length) if length else b"",
                    at=time.monotonic(),
                )
                response = emulator._respond(request)
                if 200 <= response.status < 300:
                    with emulator._lock:
                        emulator._accepted.append(request)
                if response.delay:
                    time.sleep(response.delay)
                body = response.body
                if not isinstance(body, bytes):
                    body = b"" if body is None else json.dumps(body).encode()
                try:
                    self.send_response(response.status)
                    headers = {"Content-Type": "application/json", **response.headers}
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): nothing to answer

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listening socket: clients now get connection refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        # Keep-alive connections would otherwise go on being answered after the stop.
        with self._lock:
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)

    # --- faults --------------------------------------------------------------------------

    def fail_next(self, *responses: Response) -> None:
        """Answer the next requests with these, one each, before answering normally again."""
        with self._lock:
            self._faults.extend(responses)

    def fail_always(self, response: Response | None) -> None:
        """Answer every request with this until called with None."""
        with self._lock:
            self._always = response

    # --- what was received ---------------------------------------------------------------

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._accepted.clear()
            self._faults.clear()
            self._always = None

    def accepted_requests(self) -> list[Request]:
        """The requests that were answered with a 2xx."""
        with self._lock:
            return list(self._accepted)

    def count_by(self, key: str, *, accepted_only: bool = False) -> Counter[str]:
        """How many messages carried each value of `key` (see `trace_ids`): what reached the
        provider, or with `accepted_only`, what the provider took."""
        requests = self.accepted_requests() if accepted_only else self.requests()
        return Counter(value for r in requests for value in self.trace_ids(r, key))

    def trace_ids(self, request: Request, key: str) -> list[str]:
        """One value per message the request carries; a batched request carries several."""
        return [self.trace_id(request, key)]

    def trace_id(self, request: Request, key: str) -> str:
        """The value a vendor's request carries for `key` (e.g. the notification id)."""
        raise NotImplementedError

    # --- answering -----------------------------------------------------------------------

    def _respond(self, request: Request) -> Response:
        with self._lock:
            self._requests.append(request)
            if self._faults:
                return self._faults.pop(0)
            if self._always is not None:
                return self._always
        if self.latency:
            time.sleep(self.latency)
        return self.answer(request)

    def answer(self, request: Request) -> Response:
        raise NotImplementedError
