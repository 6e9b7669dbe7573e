"""Request middleware: the request context (request id, client address) bound to every log
line of a request, the API request metrics, and the body size limit answered with a JSON 413
before the body is read."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Callable

import structlog
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import Resolver404, resolve
from django.utils.module_loading import import_string

from core import metrics
from core.logs import sane_request_id
from notifications.api.errors import error_body

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
METRICS_PATH = "/metrics"
# Probes and scrapes come every few seconds; a log line each would bury the requests.
QUIET_PATHS = frozenset({METRICS_PATH, "/healthz", "/readyz"})
# Any other method is counted as "other", so a client cannot mint label values.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_PARAMETER = re.compile(r"<(?:[^>:]+:)?([^>]+)>")


def client_ip(request: HttpRequest) -> str:
    """The caller's address. Behind NUM_PROXIES trusted proxies, each of which appends the
    address it received from to X-Forwarded-For, the client is that many entries from the
    right; anything further left was written by the client and is not trusted."""
    remote = str(request.META.get("REMOTE_ADDR") or "")
    proxies = settings.NUM_PROXIES
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR")
    if proxies <= 0 or not forwarded:
        return remote
    addresses = [a.strip() for a in str(forwarded).split(",") if a.strip()]
    if not addresses:
        return remote
    candidate = addresses[-min(proxies, len(addresses))]
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return remote
    return candidate


def route_of(request: HttpRequest) -> str:
    """The URL pattern that answered (`/api/v1/notifications/{notification_id}`), never the
    raw path, so the metrics' label values stay few."""
    match = request.resolver_match
    if match is None:
        if request.path.startswith("/" + settings.STATIC_URL.lstrip("/")):
            return "/" + settings.STATIC_URL.strip("/") + "/"
        # Answered before URL resolution (a 413, a 404); resolve only to name the pattern.
        try:
            match = resolve(request.path_info)
        except Resolver404:
            return "unmatched"
    return "/" + _PARAMETER.sub(r"{\1}", match.route).lstrip("/")


class RequestContextMiddleware:
    """Outermost: binds request_id and client_ip to the log context for everything the request
    logs (including Django's own lines after the view), echoes X-Request-ID, logs one line
    per request, and records clarion_api_requests_total and its duration histogram."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        request_id = sane_request_id(request.headers.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex
        ip = client_ip(request)
        # Not unbound at the end on purpose: under ASGI each request has a context of its own,
        # and Django logs 4xx/5xx after the middleware returned; the next request rebinds.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id, client_ip=ip)
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        if request.path == METRICS_PATH:
            return response
        elapsed = time.perf_counter() - started
        route = route_of(request)
        method = request.method if request.method in KNOWN_METHODS else "other"
        metrics.api_request_observed(
            route=route, method=method, status=response.status_code, seconds=elapsed
        )
        if request.path not in QUIET_PATHS:
            log.info(
                "%s %s %s",
                method,
                request.path,
                response.status_code,
                extra={
                    "method": method,
                    "path": request.path,
                    "route": route,
                    "status": response.status_code,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
        return response


class BodySizeLimitMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith("/api/"):
            limit = (
                settings.API_MAX_BULK_BODY_BYTES
                if request.path.rstrip("/").endswith("/bulk")
                else settings.API_MAX_BODY_BYTES
            )
            try:
                length = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            if length > limit:
                return JsonResponse(
                    error_body("request_too_large", f"Request body is over {limit} bytes."),
                    status=413,
                )
        return self.get_response(request)


# The API authenticates by key on every request: sessions, CSRF, the session user, messages
# and X-Frame-Options belong to the admin and the browser pages. The API's share of the bench
# profile for them was about 8 % of an accept.
API_PREFIX = "/api/v1/"
BROWSER_MIDDLEWARE = (
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
)


class BrowserOnlyMiddleware:
    """Runs BROWSER_MIDDLEWARE, in order, for every request except the versioned API's, which
    goes straight to the rest of the chain. Sync only, like the rest of the chain."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response
        handler = get_response
        for path in reversed(BROWSER_MIDDLEWARE):
            handler = import_string(path)(handler)
        self.browser_chain = handler

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith(API_PREFIX):
            return self.get_response(request)
        return self.browser_chain(request)
