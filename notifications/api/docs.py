"""The API's documentation pages: Swagger UI at /api/docs/ and Redoc at /api/redoc/, with their
assets served by Clarion (drf-spectacular-sidecar, through WhiteNoise). A Content-Security-
Policy keeps each page to this host, so neither reaches the internet: Redoc's bundle, for one,
loads its vendor's logo from a CDN, which the policy refuses (the page hides the image)."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from drf_spectacular.utils import extend_schema
from drf_spectacular.views import SpectacularRedocView, SpectacularSwaggerView

# Inline script and style: both pages boot from an inline <script> and style themselves
# inline. Redoc runs its search in a blob: worker.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "frame-ancestors 'none'",
    )
)


class _SelfContained:
    @extend_schema(exclude=True)
    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response: HttpResponse = super().get(request, *args, **kwargs)  # type: ignore[misc]
        response["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response


class SwaggerView(_SelfContained, SpectacularSwaggerView):
    url_name = "schema"


class RedocView(_SelfContained, SpectacularRedocView):
    url_name = "schema"
    # drf-spectacular's page without its Google Fonts links.
    template_name = "api/redoc.html"
