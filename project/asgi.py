"""ASGI entry point: HTTP (API, admin, docs) and WebSocket (in-app stream) in one server."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from channels_app.gc_freeze import asgi_server_process, gc_freezer_start_in_server  # noqa: E402
from channels_app.routing import websocket_urlpatterns  # noqa: E402
from core import db_clock  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(URLRouter(websocket_urlpatterns)),
    }
)

# Open sockets are long-lived objects that full garbage collections kept walking (the WebSocket
# p99 tail); channels_app/gc_freeze.py says how and why. Only in a server process: importing
# this module (tests, tools) leaves the collector alone.
gc_freezer_start_in_server()

# The accept path routes on this process's reading of the database's clock
# (core/db_clock.py): taken as the server starts, not by its first request.
if asgi_server_process():
    db_clock.read_in_background()
