"""Print what `make run` serves: the URLs, a fresh demo API key, the demo recipient's inbox
page, and a first request."""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from notifications.models import Recipient
from notifications.services import api_key_create
from notifications.tokens import recipient_token_issue


class Command(BaseCommand):
    help = "Create a demo API key (and, on first run, an admin user) and print the URLs."

    def handle(self, *args: Any, **options: Any) -> None:
        _, raw_key = api_key_create(owner_name="demo", name="demo")
        base = f"http://127.0.0.1:{settings.PORT}"
        admin_line = "existing superuser"
        user_model = get_user_model()
        if settings.EMBEDDED and not user_model.objects.filter(is_superuser=True).exists():
            password = secrets.token_urlsafe(12)
            user_model.objects.create_superuser("admin", "admin@localhost", password)
            admin_line = f"user admin, password {password} (shown once)"
        inbox_line = ""
        demo = Recipient.objects.filter(owner__name="demo", external_id="user-42").first()
        if demo is not None:
            issued = recipient_token_issue(owner_id=demo.owner_id, recipient_id=demo.pk)
            hours = settings.RECIPIENT_TOKEN_TTL_SECONDS / 3600
            inbox_line = (
                f"\n  Inbox     {base}/inbox/#token={issued.token}"
                f"\n            (user-42's in-app inbox, live; the token is valid {hours:g} h)"
            )
        self.stdout.write(
            f"""
Clarion is starting.
  API       {base}/api/v1/
  Docs      {base}/api/docs/
  Admin     {base}/admin/   ({admin_line})
  Health    {base}/readyz
  Flower    http://127.0.0.1:{settings.FLOWER_PORT}/
  Processes web (API + WebSocket), relay (outbox → broker), workers email, sms, push and
            inapp, maintenance (sweeper, provider events), webhooks (status webhooks out),
            beat, flower
  API key   {raw_key}{inbox_line}

Try it:
  curl -s -X POST {base}/api/v1/notifications \\
    -H 'Authorization: Bearer {raw_key}' -H 'Content-Type: application/json' \\
    -d '{{"recipient": "user-42", "template": "order_shipped", "data": {{"order_id": "A-1001"}}}}'
  curl -s {base}/api/v1/sandbox/messages -H 'Authorization: Bearer {raw_key}'
"""
        )
