"""The CACHES backend: Django's RedisCache with one connection pool and one client per process.
Django keeps cache objects per asyncio context, so under ASGI every request would build a fresh
pool and TCP connection, and every cache call a new redis.Redis; redis.Redis is thread-safe
over its pool, so one per pool is enough."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, cast

import redis
from django.core.cache.backends.redis import RedisCache, RedisCacheClient, RedisSerializer
from redis.commands.core import Script
from redis.exceptions import NoScriptError

_CLIENTS: dict[tuple[str, int], Any] = {}
_LOCK = threading.Lock()


class SharedPoolRedisCacheClient(RedisCacheClient):
    # Set by RedisCacheClient.__init__ (django/core/cache/backends/redis.py); django-stubs
    # declares only the public methods. Annotations only: nothing here shadows them.
    _servers: list[str]
    _client: type[redis.Redis]
    _pool_class: type[redis.ConnectionPool]
    _pool_options: dict[str, Any]
    _serializer: RedisSerializer
    _get_connection_pool_index: Callable[[bool], int]

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

    def add_many(self, data: dict[Any, Any], timeout: int) -> dict[Any, bool]:
        """add() of many keys in one round trip: which of them this call set."""
        client = self.get_client(None, write=True)
        pipeline = client.pipeline(transaction=False)
        for key, value in data.items():
            pipeline.set(key, self._serializer.dumps(value), ex=timeout, nx=True)
        return {key: bool(done) for key, done in zip(data, pipeline.execute(), strict=True)}

    def add_after_script(
        self, key: Any, value: Any, timeout: int, script: Script, keys: list[str], args: list[Any]
    ) -> tuple[Any, bool]:
        """Run a Lua script (by its SHA), then add(): one round trip. The script is loaded
        and run again on its own only when the server does not know it yet."""
        client = self.get_client(None, write=True)
        pipeline = client.pipeline(transaction=False)
        pipeline.evalsha(script.sha, len(keys), *keys, *args)
        pipeline.set(key, self._serializer.dumps(value), ex=timeout, nx=True)
        ran, added = pipeline.execute(raise_on_error=False)
        if isinstance(added, Exception):
            raise added
        if isinstance(ran, NoScriptError):
            ran = script(keys=keys, args=args, client=client)
        elif isinstance(ran, Exception):
            raise ran
        return ran, bool(added)


class SharedPoolRedisCache(RedisCache):
    def __init__(self, server: str, params: dict[str, Any]):
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient

    def add_many(self, data: dict[str, Any], timeout: int) -> set[str]:
        """add() of many keys in one round trip; returns the keys this call set (the others
        existed). `timeout` is in seconds, and positive."""
        seconds = int(timeout)
        if seconds <= 0:
            raise ValueError("add_many needs a positive timeout")
        made = {self.make_and_validate_key(key): key for key in data}
        # __init__ made _class this client; django-stubs types _cache as the base class.
        client = cast(SharedPoolRedisCacheClient, self._cache)
        done = client.add_many({k: data[made[k]] for k in made}, seconds)
        return {made[k] for k, ok in done.items() if ok}

    def add_after_script(
        self, key: str, value: Any, timeout: int, script: Script, keys: list[str], args: list[Any]
    ) -> tuple[Any, bool]:
        """add() with a Lua script run just before it in the same round trip (a rate limit
        taken with an idempotency claim): (the script's answer, whether this call set key).
        The script's keys are raw Redis keys, not cache keys."""
        client = cast(SharedPoolRedisCacheClient, self._cache)
        return client.add_after_script(
            self.make_and_validate_key(key), value, int(timeout), script, keys, args
        )
