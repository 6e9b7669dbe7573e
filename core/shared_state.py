"""The Redis connection for state every worker process shares (rate limits, circuit
breakers); redis-py's pool reconnects after a fork, so prefork children can use it."""

from __future__ import annotations

from functools import cache

import redis
from django.conf import settings


@cache
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=2,
        socket_connect_timeout=2,
        health_check_interval=settings.REDIS_HEALTH_CHECK_SECONDS,
    )
