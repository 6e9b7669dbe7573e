"""ASGI entry of a variant: Clarion's application after bench.variants.apply(BENCH_VARIANT)."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

from bench.variants import apply

apply(os.environ.get("BENCH_VARIANT"))

from project.asgi import application  # noqa: E402, F401
