"""B_http's settings: a bare Django project (no apps, no middleware, no database) served by the
same ASGI server, worker count and pinning as Clarion's API."""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("SECRET_KEY", "bench-hello-world-only")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "bench.hello_app"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
USE_I18N = False
