"""factory-boy factories for the data model."""

from __future__ import annotations

import factory

from notifications.models import Device, Owner, Preference, Recipient, Template
from notifications.services import api_key_create

ORDER_SHIPPED = {
    "email": {
        "subject": "Order {{ order_id }} shipped",
        "body": "Hi, {{ order_id }} is on its way.",
        "html": "<p>Hi, {{ order_id }} is on its way.</p>",
    },
    "sms": {"body": "Order {{ order_id }} shipped"},
    "push": {"title": "Shipped", "body": "Order {{ order_id }}"},
    "web": {"title": "Shipped", "body": "Order {{ order_id }} is on its way"},
}


class OwnerFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Owner
        django_get_or_create = ["name"]

    name = factory.Sequence(lambda n: f"owner-{n}")


class RecipientFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Recipient

    owner = factory.SubFactory(OwnerFactory)
    # Not "user-N": tests write such ids by hand, and a sequence that reaches one collides.
    external_id = factory.Sequence(lambda n: f"recipient-{n}")
    email = factory.LazyAttribute(lambda r: f"{r.external_id}@example.com")
    phone = "+14155550100"
    locale = "en"
    timezone = "UTC"


class PreferenceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Preference

    recipient = factory.SubFactory(RecipientFactory)
    channel = "sms"
    category = ""
    enabled = False


class DeviceFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Device

    recipient = factory.SubFactory(RecipientFactory)
    platform = "fcm"
    token = factory.Sequence(lambda n: f"fcm-token-{n:06d}")


class TemplateFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Template

    owner = factory.SubFactory(OwnerFactory)
    key = "order_shipped"
    category = "orders"
    locale = "en"
    content = factory.LazyFunction(lambda: {k: dict(v) for k, v in ORDER_SHIPPED.items()})
    translations = factory.LazyFunction(dict)


def api_key_for(owner: Owner) -> str:
    _, raw_key = api_key_create(owner_name=owner.name, name=f"{owner.name}-key")
    return raw_key
