"""The outbox wake signals. Writers never publish: they leave rows in the outbox
(Delivery.enqueued_at NULL) and, once their transaction commits, wake a relay
(workers/relay.py), which blocks on RELAY_WAKE_KEY. In-app deliveries due at accept may
instead be handed to this process's own pusher (workers/web_push.py), which the workers app
registers here as it loads: the writer below it needs no import of the code above it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import transaction
from redis.exceptions import RedisError

from core.shared_state import redis_client

log = logging.getLogger(__name__)

# A list holding at most one element: the relay blocks on it (BLPOP). Trimmed at every push, so
# a relay that is down for a day finds one wake-up waiting, not millions.
RELAY_WAKE_KEY = "clarion:relay:wake"


def outbox_wake() -> None:
    """Tell a relay that the outbox has new rows. Best effort: a lost signal costs at most
    RELAY_POLL_SECONDS, the relay's own poll."""
    try:
        pipeline = redis_client().pipeline(transaction=False)
        pipeline.lpush(RELAY_WAKE_KEY, 1)
        pipeline.ltrim(RELAY_WAKE_KEY, 0, 0)
        pipeline.execute()
    except (RedisError, OSError) as exc:
        log.warning("could not wake the relay (its poll will find the rows): %s", exc)


def outbox_wake_on_commit() -> None:
    """Wake the relay once the current transaction commits (a rollback wrote nothing)."""
    transaction.on_commit(outbox_wake)


# This process's in-app pusher: takes committed web delivery ids (workers/web_push.py).
_web_pusher: Callable[[list[int]], None] | None = None


def web_pusher_register(push: Callable[[list[int]], None]) -> None:
    global _web_pusher
    _web_pusher = push


def web_pusher_registered() -> bool:
    """Whether a writer may mark its due web deliveries published and leave them to this
    process's pusher (if not, they stay in the outbox for the relay)."""
    return _web_pusher is not None


def web_push_on_commit(delivery_ids: list[int]) -> None:
    """Hand these web deliveries to this process's pusher once the current transaction
    commits (a rollback wrote nothing to push). A push that never happens loses nothing: the
    sweeper hands such a row back to the relay."""
    push = _web_pusher
    if delivery_ids and push is not None:
        transaction.on_commit(lambda: push(delivery_ids))
