"""The CACHES backend: Django's RedisCache with one connection pool and one client per process.
Django keeps cache objects per asyncio context, so under ASGI every request would build a fresh
pool and TCP connection, and every cache call a new redis.Redis; redis.Redis is thread-safe
over its pool, so one per pool is enough."""

from __future__ import annotations

import threading
from typing import Any

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

_CLIENTS: dict[tuple[str, int], Any] = {}
_LOCK = threading.Lock()


class SharedPoolRedisCacheClient(RedisCacheClient):
    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        index = self._get_connection_pool_index(write)
        slot = (self._servers[index], index)
        client = _CLIENTS.get(slot)
        if client is None:
            with _LOCK:
                client = _CLIENTS.get(slot)
                if client is None:
                    pool = self._pool_class.from_url(self._servers[index], **self._pool_options)
                    client = _CLIENTS[slot] = self._client(connection_pool=pool)
        return client


class SharedPoolRedisCache(RedisCache):
    def __init__(self, server: str, params: dict[str, Any]):
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient
