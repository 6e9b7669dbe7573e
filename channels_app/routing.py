"""WebSocket routes; the in-app consumer is mounted at /ws/notifications/."""

from django.urls import URLPattern, path

from channels_app.consumers import NotificationConsumer

websocket_urlpatterns: list[URLPattern] = [
    path("ws/notifications/", NotificationConsumer.as_asgi(), name="ws-notifications"),
]
