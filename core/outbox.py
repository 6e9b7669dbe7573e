"""The outbox wake signal. Writers never publish: they leave rows in the outbox
(Delivery.enqueued_at NULL) and, once their transaction commits, wake a relay
(workers/relay.py), which blocks on RELAY_WAKE_KEY."""

from __future__ import annotations

import logging

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
