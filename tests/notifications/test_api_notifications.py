"""POST /api/v1/notifications: routing and skip reasons, error answers, idempotency."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.utils import timezone

from notifications.models import Delivery, IdempotencyRecord, Notification
from tests.factories import DeviceFactory, TemplateFactory

URL = "/api/v1/notifications"
USER = {"id": "user-42", "email": "user-42@example.com", "phone": "+14155550100"}


def post(api: Any, body: Any, **headers: str) -> Any:
    return api.post(URL, body, format="json", **headers)


def body_for(**overrides: Any) -> dict[str, Any]:
    return {
        "recipient": USER,
        "template": "order_shipped",
        "data": {"order_id": "A-1001"},
        **overrides,
    }


@pytest.mark.django_db
class TestRouting:
    def test_accepts_every_channel_with_an_address(self, api: Any, template: Any) -> None:
        DeviceFactory(recipient__owner=template.owner, recipient__external_id="user-42")
        response = post(api, body_for())
        assert response.status_code == 202
        notification = Notification.objects.get()
        assert response.json() == {
            "id": str(notification.pk),
            "status": "accepted",
            "deliveries": [
                {"channel": "email", "status": "queued"},
                {"channel": "sms", "status": "queued"},
                {"channel": "push", "status": "queued"},
                {"channel": "web", "status": "queued"},
            ],
        }
        assert response["Location"] == f"/api/v1/notifications/{notification.pk}"
        email = Delivery.objects.get(channel="email")
        assert email.content == {
            "subject": "Order A-1001 shipped",
            "body": "Hi, A-1001 is on its way.",
            "html": "<p>Hi, A-1001 is on its way.</p>",
        }
        assert email.address == "user-42@example.com"

    def test_sms_opt_out_through_the_api_skips_sms(self, api: Any, template: Any) -> None:
        assert post(api, body_for(channels=["email", "sms"])).json()["deliveries"][1] == {
            "channel": "sms",
            "status": "queued",
        }
        response = api.put(
            "/api/v1/recipients/user-42/preferences", {"channels": {"sms": False}}, format="json"
        )
        assert response.status_code == 200
        response = post(api, body_for(channels=["email", "sms"]))
        assert response.status_code == 202
        assert response.json()["deliveries"] == [
            {"channel": "email", "status": "queued"},
            {"channel": "sms", "status": "skipped", "reason": "opted_out"},
        ]

    def test_critical_priority_overrides_the_opt_out(self, api: Any, template: Any) -> None:
        post(api, body_for())
        api.put(
            "/api/v1/recipients/user-42/preferences", {"channels": {"sms": False}}, format="json"
        )
        response = post(api, body_for(channels=["sms"], priority="critical"))
        assert response.json()["deliveries"] == [{"channel": "sms", "status": "queued"}]

    def test_category_opt_out_applies_to_that_category_only(self, api: Any, template: Any) -> None:
        TemplateFactory(owner=template.owner, key="promo", category="marketing")
        post(api, body_for())
        api.put(
            "/api/v1/recipients/user-42/preferences",
            {"categories": {"marketing": {"email": False}}},
            format="json",
        )
        promo = post(api, body_for(template="promo", channels=["email"]))
        order = post(api, body_for(channels=["email"]))
        assert promo.json()["deliveries"] == [
            {"channel": "email", "status": "skipped", "reason": "opted_out"}
        ]
        assert order.json()["deliveries"] == [{"channel": "email", "status": "queued"}]

    def test_recipient_without_phone_or_device_has_no_address(
        self, api: Any, template: Any
    ) -> None:
        response = post(api, body_for(recipient={"id": "u-2", "email": "u2@example.com"}))
        assert response.json()["deliveries"] == [
            {"channel": "email", "status": "queued"},
            {"channel": "sms", "status": "skipped", "reason": "no_address"},
            {"channel": "push", "status": "skipped", "reason": "no_address"},
            {"channel": "web", "status": "queued"},
        ]

    def test_channel_missing_from_template(self, api: Any, owner: Any) -> None:
        TemplateFactory(owner=owner, key="sms_only", content={"sms": {"body": "Hi"}})
        response = post(api, body_for(template="sms_only", channels=["email", "sms"], data={}))
        assert response.json()["deliveries"] == [
            {"channel": "email", "status": "skipped", "reason": "not_in_template"},
            {"channel": "sms", "status": "queued"},
        ]

    def test_send_at_in_the_future_schedules(self, api: Any, template: Any) -> None:
        response = post(api, body_for(channels=["email"], send_at="2999-01-01T00:00:00Z"))
        assert response.json()["deliveries"] == [
            {"channel": "email", "status": "scheduled", "scheduled_for": "2999-01-01T00:00:00Z"}
        ]
        assert Delivery.objects.get().next_attempt_at.year == 2999

    def test_status_api_shows_each_delivery(self, api: Any, template: Any) -> None:
        created = post(api, body_for(channels=["email", "push"])).json()
        detail = api.get(f"{URL}/{created['id']}").json()
        assert detail["status"] == "in_progress"
        assert [
            (d["channel"], d["status"], d["reason"], d["attempts"]) for d in detail["deliveries"]
        ] == [("email", "queued", None, []), ("push", "skipped", "no_address", [])]
        assert detail["recipient"] == "user-42"
        assert detail["data"] == {"order_id": "A-1001"}


@pytest.mark.django_db
class TestErrors:
    def test_missing_template_variable(self, api: Any, template: Any) -> None:
        response = post(api, body_for(data={}))
        assert response.status_code == 400
        assert response.json() == {
            "error": "validation_error",
            "detail": "Invalid request.",
            "fields": {"data.order_id": ["Missing template variable."]},
        }
        assert Notification.objects.count() == 0

    def test_unknown_template(self, api: Any, template: Any) -> None:
        response = post(api, body_for(template="nope"))
        assert response.status_code == 400
        assert response.json() == {
            "error": "validation_error",
            "detail": "Invalid request.",
            "fields": {"template": ["Unknown template 'nope'."]},
        }

    def test_malformed_json(self, api: Any, template: Any) -> None:
        response = api.post(URL, '{"recipient": ', content_type="application/json")
        assert response.status_code == 400
        assert response.json()["error"] == "malformed_json"
        assert response.json()["detail"].startswith("Malformed JSON: ")

    def test_oversized_body(self, api: Any, template: Any, settings: Any) -> None:
        settings.API_MAX_BODY_BYTES = 1024
        response = post(api, body_for(data={"order_id": "x" * 2000}))
        assert response.status_code == 413
        assert response.json() == {
            "error": "request_too_large",
            "detail": "Request body is over 1024 bytes.",
        }

    def test_no_api_key(self, template: Any) -> None:
        from rest_framework.test import APIClient

        response = APIClient().post(URL, body_for(), format="json")
        assert response.status_code == 401
        assert response.json() == {
            "error": "unauthenticated",
            "detail": "Authentication credentials were not provided.",
        }
        assert response["WWW-Authenticate"] == 'Bearer realm="clarion"'

    def test_another_owners_notification_is_404(
        self, api: Any, other_api: Any, template: Any
    ) -> None:
        created = post(api, body_for()).json()
        response = other_api.get(f"{URL}/{created['id']}")
        assert response.status_code == 404
        assert response.json() == {"error": "not_found", "detail": "Not found."}

    def test_bad_fields(self, api: Any, template: Any) -> None:
        response = post(
            api,
            {
                "recipient": "",
                "template": "order_shipped",
                "channels": ["fax"],
                "priority": "urgent",
                "data": [],
            },
        )
        assert response.status_code == 400
        assert set(response.json()["fields"]) == {"recipient", "channels.0", "priority", "data"}

    def test_unknown_recipient_id(self, api: Any, template: Any) -> None:
        response = post(api, body_for(recipient="ghost"))
        assert response.status_code == 400
        assert response.json()["fields"] == {
            "recipient": ["Unknown recipient 'ghost'; send its contact data."]
        }

    def test_idempotency_key_too_long(self, api: Any, template: Any) -> None:
        response = post(api, body_for(), HTTP_IDEMPOTENCY_KEY="k" * 256)
        assert response.status_code == 400
        assert response.json()["fields"] == {"Idempotency-Key": ["Must be 1 to 255 characters."]}


@pytest.mark.django_db
class TestIdempotency:
    def test_the_header_is_read_once_per_request(self, api: Any, template: Any) -> None:
        # The throttle (the limit deferred to the claim), the view and the protocol all ask.
        from django.http.request import HttpHeaders

        reads: list[str] = []
        read = HttpHeaders.__getitem__

        def counted(headers: HttpHeaders, name: str) -> str:
            if name.lower() == "idempotency-key":
                reads.append(name)
            return read(headers, name)

        with mock.patch.object(HttpHeaders, "__getitem__", counted):
            response = post(api, body_for(), HTTP_IDEMPOTENCY_KEY="read-once-1")
        assert response.status_code == 202
        assert reads == ["Idempotency-Key"]

    def test_replay_answers_200_with_the_original_body(self, api: Any, template: Any) -> None:
        first = post(api, body_for(), HTTP_IDEMPOTENCY_KEY="order-A-1001")
        second = post(api, body_for(), HTTP_IDEMPOTENCY_KEY="order-A-1001")
        assert first.status_code == 202
        assert second.status_code == 200
        assert second.json() == first.json()
        assert second["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first
        assert Notification.objects.count() == 1
        assert Delivery.objects.count() == 4

    def test_same_key_different_body_is_422(self, api: Any, template: Any) -> None:
        post(api, body_for(), HTTP_IDEMPOTENCY_KEY="k1")
        response = post(api, body_for(data={"order_id": "B-2"}), HTTP_IDEMPOTENCY_KEY="k1")
        assert response.status_code == 422
        assert response.json() == {
            "error": "idempotency_key_reused",
            "detail": "This Idempotency-Key was used with another request: a different body or "
            "endpoint.",
        }
        assert Notification.objects.count() == 1

    def test_key_in_flight_is_409(self, api: Any, owner: Any, template: Any) -> None:
        from notifications import idempotency

        body = body_for()
        fp = idempotency.fingerprint(method="POST", path=URL, body=json.loads(json.dumps(body)))
        claim = idempotency.begin(owner_id=owner.pk, key="k-busy", fp=fp)
        assert isinstance(claim, idempotency.Proceed)
        response = post(api, body, HTTP_IDEMPOTENCY_KEY="k-busy")
        assert response.status_code == 409
        assert response.json()["error"] == "conflict"

    def test_failed_request_frees_the_key(self, api: Any, template: Any) -> None:
        assert post(api, body_for(data={}), HTTP_IDEMPOTENCY_KEY="k2").status_code == 400
        assert post(api, body_for(), HTTP_IDEMPOTENCY_KEY="k2").status_code == 202

    def test_with_redis_unreachable_the_database_keeps_a_key_to_one_notification(
        self, api: Any, template: Any, settings: Any
    ) -> None:
        warm = post(api, body_for(), HTTP_IDEMPOTENCY_KEY="warm")  # caches filled
        assert warm.status_code == 202
        # Every cache call now meets a closed port: connection refused.
        caches = {
            "default": {
                **settings.CACHES["default"],
                "LOCATION": "redis://127.0.0.1:1/0",
                "OPTIONS": {"socket_timeout": 0.5, "socket_connect_timeout": 0.5},
            }
        }
        settings.CACHES = caches
        first = post(api, body_for(), HTTP_IDEMPOTENCY_KEY="order-R-1")
        second = post(api, body_for(), HTTP_IDEMPOTENCY_KEY="order-R-1")
        other = post(api, body_for(data={"order_id": "B-2"}), HTTP_IDEMPOTENCY_KEY="order-R-1")
        assert (first.status_code, second.status_code, other.status_code) == (202, 200, 422)
        assert second.json() == first.json()
        assert Notification.objects.filter(idempotency_key="order-R-1").count() == 1
        # A refused request leaves its key free, with or without Redis.
        assert post(api, body_for(data={}), HTTP_IDEMPOTENCY_KEY="order-R-2").status_code == 400
        assert post(api, body_for(), HTTP_IDEMPOTENCY_KEY="order-R-2").status_code == 202

    def test_keys_are_per_owner(self, api: Any, other_api: Any, template: Any) -> None:
        TemplateFactory(owner=template.owner.__class__.objects.get(name="globex"))
        assert post(api, body_for(), HTTP_IDEMPOTENCY_KEY="shared").status_code == 202
        assert post(other_api, body_for(), HTTP_IDEMPOTENCY_KEY="shared").status_code == 202
        assert Notification.objects.count() == 2

    def test_database_backstop_after_redis_flush(self, api: Any, template: Any) -> None:
        first = post(api, body_for(), HTTP_IDEMPOTENCY_KEY="k3")
        cache.clear()
        replay = post(api, body_for(), HTTP_IDEMPOTENCY_KEY="k3")
        assert replay.status_code == 200
        assert replay.json() == first.json()
        assert replay["Idempotent-Replayed"] == "true"
        cache.clear()
        changed = post(api, body_for(data={"order_id": "Z"}), HTTP_IDEMPOTENCY_KEY="k3")
        assert changed.status_code == 422
        assert Notification.objects.count() == 1
        assert IdempotencyRecord.objects.get().response == first.json()

    def test_an_expired_record_does_not_replay(self, api: Any, template: Any) -> None:
        """Past IDEMPOTENCY_TTL_SECONDS, a key is new again even while the purge has not
        removed its record yet."""
        first = post(api, body_for(), HTTP_IDEMPOTENCY_KEY="k-old")
        IdempotencyRecord.objects.update(
            created_at=timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_TTL_SECONDS + 1)
        )
        cache.clear()
        again = post(api, body_for(), HTTP_IDEMPOTENCY_KEY="k-old")
        assert again.status_code == 202
        assert again.json()["id"] != first.json()["id"]
        assert Notification.objects.count() == 2
        assert IdempotencyRecord.objects.get().response == again.json()

    def test_unique_record_stops_a_twin_that_redis_let_through(
        self, owner: Any, template: Any
    ) -> None:
        from notifications import accepting, idempotency, sending

        claim = accepting.IdempotencyClaim(key="k4", fingerprint="f" * 64)
        args = {
            "owner": owner,
            "recipient": USER,
            "template_key": "order_shipped",
            "data": {"order_id": "1"},
            "idempotency": claim,
        }
        sending.notification_create(**args)
        with pytest.raises(idempotency.RecordExists):
            sending.notification_create(**args)
        assert Notification.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_identical_posts_create_one_notification(api: Any, template: Any) -> None:
    body = body_for()
    start = threading.Barrier(50)
    results: list[tuple[int, dict[str, Any], str | None]] = []
    lock = threading.Lock()

    def send() -> None:
        try:
            start.wait()
            response = post(api, body, HTTP_IDEMPOTENCY_KEY="concurrent-1")
            with lock:
                results.append(
                    (response.status_code, response.json(), response.get("Idempotent-Replayed"))
                )
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert len(results) == 50
    statuses = [status for status, _, _ in results]
    assert statuses.count(202) == 1
    assert set(statuses) <= {200, 202, 409}
    notification = Notification.objects.get()
    for status, payload, replayed in results:
        if status in (200, 202):
            assert payload["id"] == str(notification.pk)
            assert replayed == ("true" if status == 200 else None)
        else:
            assert payload["error"] == "conflict"
    assert Delivery.objects.count() == 4
    assert IdempotencyRecord.objects.count() == 1


@pytest.mark.django_db
class TestDevices:
    def _url(self, api: Any) -> str:
        assert api.put("/api/v1/recipients/user-9", {}, format="json").status_code == 201
        return "/api/v1/recipients/user-9/devices"

    def test_an_fcm_token_is_registered_once(self, api: Any) -> None:
        url = self._url(api)
        first = api.post(url, {"platform": "fcm", "token": "fcm-tok-1"}, format="json")
        again = api.post(url, {"platform": "fcm", "token": "fcm-tok-1"}, format="json")
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["id"] == again.json()["id"]
        assert first.json()["platform"] == "fcm"

    def test_an_apns_token_is_refused_with_what_to_register_instead(self, api: Any) -> None:
        from notifications.models import Device

        url = self._url(api)
        response = api.post(url, {"platform": "apns", "token": "a" * 64}, format="json")
        assert response.status_code == 400
        body = response.json()
        assert body["error"] == "validation_error"
        [message] = body["fields"]["platform"]
        assert "FCM registration token of the iOS app" in message
        assert '"platform": "fcm"' in message
        assert not Device.objects.exists()

    def test_an_unknown_platform_is_refused(self, api: Any) -> None:
        url = self._url(api)
        response = api.post(url, {"platform": "webpush", "token": "t"}, format="json")
        assert response.status_code == 400
        assert response.json()["fields"]["platform"] == ['"webpush" is not a valid choice.']
