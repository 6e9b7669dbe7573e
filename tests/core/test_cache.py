"""The two cache layers of the creation path: each process's own copy in front of Redis,
trusted while the shared version is unchanged; a change made here is seen at once, one made
by another process within CACHE_LOCAL_CHECK_SECONDS, and a flushed Redis empties it too."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.core.cache import cache

from core import cache as keys
from notifications import services
from notifications.models import ApiKey
from notifications.selectors import recipient_context_get, template_snapshot_get

pytestmark = pytest.mark.django_db(transaction=True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch, settings: Any) -> Clock:
    settings.CACHE_LOCAL_SECONDS = 30.0
    settings.CACHE_LOCAL_CHECK_SECONDS = 0.1
    fake = Clock()
    monkeypatch.setattr(keys.time, "monotonic", fake)
    return fake


def test_a_read_is_served_by_the_process_then_by_nothing_else(clock: Clock) -> None:
    loads: list[int] = []

    def load() -> str:
        loads.append(1)
        return "value"

    assert keys.cached("k", load, lambda v: 60) == "value"
    # Gone from Redis: this process still has it, with no database or Redis read.
    cache.delete("k")
    clock.now += 0.05
    assert keys.cached("k", load, lambda v: 60) == "value"
    assert len(loads) == 1
    # A value that says "do not keep" (ttl 0) is loaded every time.
    assert keys.cached("none", lambda: None, lambda v: 0) is None
    assert "none" not in keys._local.entries


def test_a_change_made_here_is_seen_at_once(owner: Any, template: Any, clock: Clock) -> None:
    assert template_snapshot_get(owner_id=owner.pk, key=template.key).content == template.content
    edited = {"sms": {"body": "Edited {{ order_id }}"}}
    services.template_save(owner=owner, key=template.key, category="", locale="en", content=edited)
    # No time passes: the process that changed it drops its own entry.
    assert template_snapshot_get(owner_id=owner.pk, key=template.key).content == edited


def test_a_change_made_elsewhere_is_seen_within_the_check_interval(
    owner: Any, clock: Clock
) -> None:
    services.recipient_upsert(owner=owner, external_id="u-1", email="a@example.com")
    assert recipient_context_get(owner_id=owner.pk, external_id="u-1").email == "a@example.com"
    # Another process changes the recipient: its row, Redis's entry, and the shared version.
    type(owner).objects.get(pk=owner.pk).recipients.filter(external_id="u-1").update(
        email="b@example.com"
    )
    cache.delete(keys.recipient_key(owner.pk, "u-1"))
    cache.set(keys.VERSION_KEY, "another process's change", None)

    clock.now += 0.05
    assert recipient_context_get(owner_id=owner.pk, external_id="u-1").email == "a@example.com"
    clock.now += 0.06
    assert recipient_context_get(owner_id=owner.pk, external_id="u-1").email == "b@example.com"


def test_a_flushed_redis_empties_the_local_layer(owner: Any, template: Any, clock: Clock) -> None:
    assert template_snapshot_get(owner_id=owner.pk, key=template.key) is not None
    template.delete()  # without the service: only a flush can tell the caches
    redis.Redis.from_url(django_settings.REDIS_URL).flushdb()
    clock.now += 0.2
    assert template_snapshot_get(owner_id=owner.pk, key=template.key) is None


def test_a_revoked_api_key_fails_on_the_next_request(api: Any, owner: Any, clock: Clock) -> None:
    assert api.get("/api/v1/templates").status_code == 200
    services.api_key_revoke(api_key=ApiKey.objects.get(owner=owner))
    assert api.get("/api/v1/templates").status_code == 401


def test_a_send_repeating_known_contact_data_keeps_the_caches(owner: Any, clock: Clock) -> None:
    services.recipient_upsert(owner=owner, external_id="u-2", email="c@example.com")
    version = cache.get(keys.VERSION_KEY)
    recipient_context_get(owner_id=owner.pk, external_id="u-2")
    services.recipient_upsert(owner=owner, external_id="u-2", email="c@example.com")
    assert cache.get(keys.VERSION_KEY) == version
    assert cache.get(keys.recipient_key(owner.pk, "u-2")) is not None
    services.recipient_upsert(owner=owner, external_id="u-2", email="d@example.com")
    assert cache.get(keys.VERSION_KEY) != version
    assert recipient_context_get(owner_id=owner.pk, external_id="u-2").email == "d@example.com"


def test_the_local_layer_is_bounded(clock: Clock, settings: Any) -> None:
    settings.CACHE_LOCAL_MAX_ENTRIES = 3
    for n in range(7):
        keys.cached(f"k{n}", lambda n=n: n, lambda v: 60)
    assert len(keys._local.entries) <= 3
