"""Database work of the WebSocket server, off its event loop."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from channels.db import database_sync_to_async
from django.db import close_old_connections

P = ParamSpec("P")
R = TypeVar("R")


def in_thread_pool(func: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """`func` run in the loop's thread pool rather than on Channels' one thread-sensitive
    thread, so sockets' connects, backlogs and ack batches do not queue behind each other.

    Each call hands its connection back when it ends (to the pool, with CONN_MAX_AGE 0):
    Channels' own clean-up after the call did not (seen in the tests), and a
    pool thread that outlived its loop held its connection for good (the pool ran dry
    after ten test loops)."""

    @functools.wraps(func)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        finally:
            close_old_connections()

    return database_sync_to_async(run, thread_sensitive=False)
