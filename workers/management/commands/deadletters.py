"""Operate the dead-letter queue from a shell: list, replay and discard, by id or filter."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from notifications.models import Owner
from workers import dead_letters
from workers.models import DeadLetter


class Command(BaseCommand):
    help = "List, replay or discard dead letters (by id, or every open one matching filters)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["list", "replay", "discard", "counts"])
        parser.add_argument("ids", nargs="*", type=int, help="Dead letter ids")
        parser.add_argument("--owner", help="Owner name")
        parser.add_argument("--channel", choices=["email", "sms", "push", "web"])
        parser.add_argument("--error", help="Substring of the error")
        parser.add_argument("--older-than", type=int, help="Seconds since the delivery died")
        parser.add_argument("--all", action="store_true", help="Every open one that matches")
        parser.add_argument("--limit", type=int, default=100, help="Rows to list")
        parser.add_argument(
            "--lift-suppression",
            action="store_true",
            help="replay: lift the suppression of an address that has one, instead of leaving "
            "its dead letter open",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        owner = None
        if options["owner"]:
            owner = Owner.objects.filter(name=options["owner"]).first()
            if owner is None:
                raise CommandError(f"No owner named {options['owner']!r}")
        if options["action"] == "counts":
            counts = dead_letters.dead_letter_counts(owner=owner)
            for channel, count in counts["channels"].items():
                self.stdout.write(f"{channel}\t{count}")
            return
        older = options["older_than"]
        where = dead_letters.DeadLetterFilter(
            channel=options["channel"],
            error=options["error"],
            older_than=timezone.now() - timedelta(seconds=older) if older is not None else None,
        )
        letters = dead_letters.dead_letters_list(owner=owner, where=where)
        if options["ids"]:
            letters = letters.filter(pk__in=options["ids"])
        if options["action"] == "list":
            for letter in letters[: options["limit"]]:
                self._row(letter)
            return
        if not options["ids"] and not options["all"]:
            raise CommandError("Name dead letter ids, or pass --all to act on every match")
        if options["action"] == "replay":
            self._replay(letters, lift_suppression=options["lift_suppression"])
            return
        count = dead_letters.dead_letters_discard(letters=letters)
        self.stdout.write(f"Discarded {count} dead letter(s)")

    def _replay(self, letters: Any, *, lift_suppression: bool) -> None:
        done = dead_letters.dead_letters_replay(letters=letters, lift_suppression=lift_suppression)
        self.stdout.write(f"Replayed {sum(1 for d in done if d.replayed)} dead letter(s)")
        for held in done:
            if held.suppression is None:
                continue
            suppression = held.suppression
            what = "lifted" if held.replayed else "not replayed, its address has"
            self.stdout.write(
                f"{held.dead_letter_id}\t{what} suppression {suppression.pk} "
                f"({suppression.channel} {suppression.reason})"
            )
        if any(not d.replayed for d in done):
            self.stdout.write("Lift those suppressions, or replay with --lift-suppression.")

    def _row(self, letter: DeadLetter) -> None:
        self.stdout.write(
            f"{letter.pk}\t{letter.channel}\t{letter.created_at:%Y-%m-%dT%H:%M:%SZ}\t"
            f"{letter.attempts}\t{letter.notification_id}\t{letter.error}"
        )
