"""Real-time in-app delivery over WebSocket (Django Channels)."""
