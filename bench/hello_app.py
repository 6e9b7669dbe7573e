"""B_http's application: one view answering any method with a small JSON body, as Clarion's
202 is; the load generator sends it the very same requests it sends the API."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application
from django.http import HttpRequest, JsonResponse
from django.urls import path

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.hello_settings")


def hello(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"id": "hello", "status": "accepted"}, status=202)


urlpatterns = [path("api/v1/notifications", hello)]

application = get_asgi_application()
