"""Create (or print) the Cassandra keyspace and tables of the delivery log; safe to run again."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from notifications.delivery_log import cassandra


class Command(BaseCommand):
    help = (
        "Create the delivery log's Cassandra keyspace and tables on CASSANDRA_HOSTS "
        "(IF NOT EXISTS), or print their CQL with --print."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--replication",
            default=cassandra.DEFAULT_REPLICATION,
            help=f"Keyspace replication map (default: {cassandra.DEFAULT_REPLICATION})",
        )
        parser.add_argument(
            "--print",
            action="store_true",
            dest="print_only",
            help="Print the CQL instead of running it; needs no server",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        keyspace = settings.CASSANDRA_KEYSPACE
        replication = options["replication"]
        try:
            statements = cassandra.schema_statements(keyspace, replication)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        if options["print_only"]:
            self.stdout.write(";\n\n".join(statements) + ";")
            return
        hosts = settings.CASSANDRA_HOSTS
        if not hosts:
            raise CommandError(
                "CASSANDRA_HOSTS is not set: set it to the Cassandra contact points "
                "(comma-separated host or host:port), or pass --print to only print the CQL"
            )
        from cassandra import DriverException
        from cassandra.cluster import NoHostAvailable

        try:
            cassandra.delivery_log_schema_create(
                hosts=hosts, keyspace=keyspace, replication=replication
            )
        except (NoHostAvailable, DriverException) as exc:
            raise CommandError(
                f"Could not create the delivery log schema on CASSANDRA_HOSTS={','.join(hosts)}: "
                f"{exc}"
            ) from exc
        self.stdout.write(
            f"Delivery log keyspace {keyspace} and its {len(statements) - 1} tables are ready "
            f"on {','.join(hosts)}"
        )
