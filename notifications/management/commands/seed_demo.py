"""Create the demo owner's template and recipient that `make run` shows how to use."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from notifications.models import Owner
from notifications.services import recipient_upsert, template_save

DEMO_TEMPLATE = {
    "email": {
        "subject": "Order {{ order_id }} shipped",
        "body": "Hi, your order {{ order_id }} is on its way.",
        "html": "<p>Hi, your order <b>{{ order_id }}</b> is on its way.</p>",
    },
    "sms": {"body": "Order {{ order_id }} shipped"},
    "push": {"title": "Shipped", "body": "Order {{ order_id }}"},
    "web": {"title": "Shipped", "body": "Order {{ order_id }} is on its way"},
}


class Command(BaseCommand):
    help = "Create (or refresh) the demo template 'order_shipped' and recipient 'user-42'."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--owner", default="demo")

    def handle(self, *args: Any, **options: Any) -> None:
        owner, _ = Owner.objects.get_or_create(name=options["owner"])
        template_save(
            owner=owner, key="order_shipped", category="orders", locale="en", content=DEMO_TEMPLATE
        )
        recipient_upsert(
            owner=owner,
            external_id="user-42",
            email="user-42@example.com",
            phone="+14155550100",
            locale="en",
            timezone="UTC",
        )
        self.stdout.write("demo template 'order_shipped' and recipient 'user-42' ready")
