"""Run the outbox relay: publishes the deliveries writers left in the outbox (workers/relay.py)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from workers import providers
from workers.relay import Relay, outbox_publish_due


class Command(BaseCommand):
    help = "Publish due outbox deliveries to the broker, woken at commit; runs until stopped."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--once",
            action="store_true",
            help="Publish what is due now, print how many, and exit",
        )
        parser.add_argument(
            "--poll", type=float, default=None, help="Seconds between polls (RELAY_POLL_SECONDS)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            self.stdout.write(str(outbox_publish_due()))
            return
        # The relay publishes tasks by name and never sends; but a misconfigured provider
        # should stop the whole process set at start, not only the workers.
        providers.check()
        Relay(poll_seconds=options["poll"]).run()
