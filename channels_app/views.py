"""The demo inbox page that shows the browser client at work."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET


@require_GET
def inbox_page(request: HttpRequest) -> HttpResponse:
    # No data in the page itself: the script reads the token from the URL fragment and
    # fetches everything through the inbox API and the WebSocket.
    return render(request, "clarion/inbox.html")
