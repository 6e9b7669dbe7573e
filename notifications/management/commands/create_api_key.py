"""Create an API key and print the raw key alone on stdout (only its hash is stored)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from notifications.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key NAME (for the owner NAME, or --owner) and print the raw key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--owner", help="Owner of the key; default: the key's NAME.")

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"]
        api_key, raw_key = api_key_create(owner_name=options["owner"] or name, name=name)
        self.stderr.write(f"API key '{api_key.name}' for owner '{api_key.owner.name}':")
        self.stdout.write(raw_key)
