"""WebSocket routes; the in-app consumer is mounted at /ws/notifications/."""

from django.urls import URLPattern

websocket_urlpatterns: list[URLPattern] = []
