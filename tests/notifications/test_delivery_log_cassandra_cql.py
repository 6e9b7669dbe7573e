"""The Cassandra delivery log without a server: the CQL it prepares, the values it binds, how it
maps rows back, its schema, its connection handling and the delivery_log_schema command."""

from __future__ import annotations

import io
import re
from collections import namedtuple
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import pytest
from cassandra import cqltypes
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command

from notifications.delivery_log import AttemptRecord, StatusEvent, get_delivery_log
from notifications.delivery_log import cassandra as cassandra_log
from notifications.delivery_log.cassandra import CassandraDeliveryLog, schema_statements
from tests.notifications.test_delivery_log import (
    check_delivery_log_contract,
    check_records_come_back_in_utc,
)

NOTIFICATION = "6f1c2d3e-4b5a-4c6d-8e7f-901234567890"
OTHER_NOTIFICATION = "0a1b2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d"
KS = "clarion"

INSERT_ATTEMPT = (
    "INSERT INTO clarion.attempts_by_notification (notification_id, delivery_id, number,"
    " attempt_id, owner_id, recipient_id, channel, provider, outcome, status_code,"
    " provider_message_id, error, started_at, latency_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_BY_NOTIFICATION = (
    "INSERT INTO clarion.events_by_notification (notification_id, at, event_id, delivery_id,"
    " owner_id, recipient_id, channel, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_BY_RECIPIENT_DAY = (
    "INSERT INTO clarion.events_by_recipient_day (owner_id, recipient_id, day, at, event_id,"
    " notification_id, delivery_id, channel, status, detail)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SELECT_ATTEMPTS = (
    "SELECT notification_id, delivery_id, number, owner_id, recipient_id, channel, provider,"
    " outcome, status_code, provider_message_id, error, started_at, latency_ms"
    " FROM clarion.attempts_by_notification WHERE notification_id = ? AND delivery_id IN ?"
)
SELECT_BY_NOTIFICATION = (
    "SELECT notification_id, at, delivery_id, owner_id, recipient_id, channel, status, detail"
    " FROM clarion.events_by_notification WHERE notification_id = ?"
)
SELECT_BY_RECIPIENT_DAY = (
    "SELECT owner_id, recipient_id, at, notification_id, delivery_id, channel, status, detail"
    " FROM clarion.events_by_recipient_day WHERE owner_id = ? AND recipient_id = ? AND day = ?"
)


class FakePrepared:
    def __init__(self, cql: str) -> None:
        self.cql = cql
        self.is_idempotent = False


class FakeFuture:
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def result(self) -> list[Any]:
        return self.rows


class FakeSession:
    """Records prepare/execute calls; a SELECT returns the rows queued for its CQL, as the
    driver's named tuples of the selected columns."""

    def __init__(self) -> None:
        self.prepared: list[str] = []
        self.executed: list[tuple[str, tuple[Any, ...]]] = []
        self.executed_async: list[tuple[str, tuple[Any, ...]]] = []
        self.rows: dict[str, list[dict[str, Any]]] = {}

    def prepare(self, cql: str) -> FakePrepared:
        self.prepared.append(cql)
        return FakePrepared(cql)

    def _rows(self, cql: str) -> list[Any]:
        if not cql.startswith("SELECT "):
            return []
        columns = cql.removeprefix("SELECT ").split(" FROM ")[0].split(", ")
        row = namedtuple("Row", columns)  # type: ignore[misc]
        return [row(**values) for values in self.rows.get(cql, [])]

    def execute(self, statement: FakePrepared, params: tuple[Any, ...]) -> list[Any]:
        assert isinstance(statement, FakePrepared), "only prepared statements are executed"
        self.executed.append((statement.cql, params))
        return self._rows(statement.cql)

    def execute_async(self, statement: FakePrepared, params: tuple[Any, ...]) -> FakeFuture:
        assert isinstance(statement, FakePrepared), "only prepared statements are executed"
        self.executed_async.append((statement.cql, params))
        return FakeFuture(self._rows(statement.cql))


@pytest.fixture
def session() -> FakeSession:
    return FakeSession()


@pytest.fixture
def log(session: FakeSession) -> CassandraDeliveryLog:
    return CassandraDeliveryLog(hosts=["db1"], keyspace=KS, session=session)


@pytest.fixture
def timeuuids(monkeypatch: pytest.MonkeyPatch) -> list[UUID]:
    """The ids the backend will give new rows, in order, instead of uuid1()'s."""
    ids = [UUID(f"00000000-0000-1000-8000-{n:012d}") for n in range(1, 20)]
    handed = iter(ids)
    monkeypatch.setattr(cassandra_log, "uuid1", lambda: next(handed))
    return ids


def an_attempt(**changes: Any) -> AttemptRecord:
    values: dict[str, Any] = {
        "delivery_id": 41,
        "notification_id": NOTIFICATION,
        "owner_id": 7,
        "recipient_id": "user-1",
        "channel": "sms",
        "number": 2,
        "provider": "twilio",
        "outcome": "transient",
        "status_code": 429,
        "provider_message_id": "",
        "error": "rate limited",
        "started_at": datetime(2024, 5, 1, 9, 15, 0, 250000, tzinfo=UTC),
        "latency_ms": 120.5,
    }
    return AttemptRecord(**{**values, **changes})


def an_event(**changes: Any) -> StatusEvent:
    values: dict[str, Any] = {
        "delivery_id": 41,
        "notification_id": NOTIFICATION,
        "owner_id": 7,
        "recipient_id": "user-1",
        "channel": "sms",
        "status": "queued",
        "at": datetime(2024, 5, 1, 9, 15, tzinfo=UTC),
        "detail": "",
    }
    return StatusEvent(**{**values, **changes})


def test_record_attempt_binds_one_row_of_attempts_by_notification(
    log: CassandraDeliveryLog, session: FakeSession, timeuuids: list[UUID]
) -> None:
    attempt = an_attempt()
    log.record_attempt(attempt)
    log.record_attempt(an_attempt(number=3, status_code=None, error="timeout"))

    assert session.prepared == [INSERT_ATTEMPT]
    assert session.executed == [
        (
            INSERT_ATTEMPT,
            (
                UUID(NOTIFICATION),
                41,
                2,
                timeuuids[0],
                7,
                "user-1",
                "sms",
                "twilio",
                "transient",
                429,
                "",
                "rate limited",
                attempt.started_at,
                120.5,
            ),
        ),
        (
            INSERT_ATTEMPT,
            (
                UUID(NOTIFICATION),
                41,
                3,
                timeuuids[1],
                7,
                "user-1",
                "sms",
                "twilio",
                "transient",
                None,
                "",
                "timeout",
                attempt.started_at,
                120.5,
            ),
        ),
    ]
    assert session.executed_async == []


def test_record_statuses_writes_each_event_to_both_tables_with_the_utc_day(
    log: CassandraDeliveryLog, session: FakeSession, timeuuids: list[UUID]
) -> None:
    # 22:30 in New York on 30 April is 02:30 UTC on 1 May: the day partition is the UTC one.
    new_york_evening = datetime(2024, 4, 30, 22, 30, tzinfo=ZoneInfo("America/New_York"))
    utc_midnight = datetime(2024, 5, 1, 0, 0, tzinfo=UTC)
    first = an_event(at=new_york_evening)
    second = an_event(
        delivery_id=42,
        notification_id=OTHER_NOTIFICATION,
        owner_id=8,
        recipient_id="user-2",
        channel="email",
        status="dead",
        at=utc_midnight,
        detail="550 mailbox unknown",
    )
    log.record_statuses([first, second])
    log.record_statuses([])

    assert session.prepared == [INSERT_BY_NOTIFICATION, INSERT_BY_RECIPIENT_DAY]
    assert session.executed == []
    assert session.executed_async == [
        (
            INSERT_BY_NOTIFICATION,
            (
                UUID(NOTIFICATION),
                new_york_evening,
                timeuuids[0],
                41,
                7,
                "user-1",
                "sms",
                "queued",
                "",
            ),
        ),
        (
            INSERT_BY_RECIPIENT_DAY,
            (
                7,
                "user-1",
                date(2024, 5, 1),
                new_york_evening,
                timeuuids[0],
                UUID(NOTIFICATION),
                41,
                "sms",
                "queued",
                "",
            ),
        ),
        (
            INSERT_BY_NOTIFICATION,
            (
                UUID(OTHER_NOTIFICATION),
                utc_midnight,
                timeuuids[1],
                42,
                8,
                "user-2",
                "email",
                "dead",
                "550 mailbox unknown",
            ),
        ),
        (
            INSERT_BY_RECIPIENT_DAY,
            (
                8,
                "user-2",
                date(2024, 5, 1),
                utc_midnight,
                timeuuids[1],
                UUID(OTHER_NOTIFICATION),
                42,
                "email",
                "dead",
                "550 mailbox unknown",
            ),
        ),
    ]


def test_record_statuses_bounds_the_writes_in_flight(
    log: CassandraDeliveryLog, session: FakeSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cassandra_log, "MAX_IN_FLIGHT_WRITES", 4)
    sent_when_waited: list[int] = []

    class WaitedFuture(FakeFuture):
        def result(self) -> list[Any]:
            sent_when_waited.append(len(session.executed_async))
            return []

    def execute_async(statement: FakePrepared, params: tuple[Any, ...]) -> FakeFuture:
        session.executed_async.append((statement.cql, params))
        return WaitedFuture([])

    monkeypatch.setattr(session, "execute_async", execute_async)
    log.record_statuses([an_event(delivery_id=n) for n in range(5)])

    # Ten writes, never more than four sent ahead of the ones waited for.
    assert len(session.executed_async) == 10
    assert sent_when_waited == [4, 4, 4, 4, 8, 8, 8, 8, 10, 10]


def test_each_statement_is_prepared_once_per_session_and_marked_idempotent(
    log: CassandraDeliveryLog, session: FakeSession
) -> None:
    prepared: list[FakePrepared] = []
    original = session.prepare

    def prepare(cql: str) -> FakePrepared:
        prepared.append(original(cql))
        return prepared[-1]

    session.prepare = prepare  # type: ignore[method-assign]
    for _ in range(3):
        log.record_attempt(an_attempt())
        log.record_statuses([an_event(), an_event(status="sent")])
        log.attempts_for_deliveries(notification_id=NOTIFICATION, delivery_ids=[41])
        log.events_for_notification(notification_id=NOTIFICATION)
        log.events_for_recipient_day(owner_id=7, recipient_id="user-1", day=date(2024, 5, 1))

    assert session.prepared == [
        INSERT_ATTEMPT,
        INSERT_BY_NOTIFICATION,
        INSERT_BY_RECIPIENT_DAY,
        SELECT_ATTEMPTS,
        SELECT_BY_NOTIFICATION,
        SELECT_BY_RECIPIENT_DAY,
    ]
    assert [p.is_idempotent for p in prepared] == [True] * 6
    assert len(session.executed) == 12
    assert len(session.executed_async) == 12


def test_attempts_for_deliveries_maps_rows_in_clustering_order(
    log: CassandraDeliveryLog, session: FakeSession
) -> None:
    def row(delivery_id: int, number: int, **changes: Any) -> dict[str, Any]:
        values: dict[str, Any] = {
            "notification_id": UUID(NOTIFICATION),
            "delivery_id": delivery_id,
            "number": number,
            "owner_id": 7,
            "recipient_id": "user-1",
            "channel": "sms",
            "provider": "twilio",
            "outcome": "transient",
            "status_code": 429,
            "provider_message_id": "",
            "error": "rate limited",
            # The driver hands timestamps back naive, in UTC, at millisecond precision.
            "started_at": datetime(2024, 5, 1, 9, 15, 0, 250000),
            "latency_ms": 120.5,
        }
        return {**values, **changes}

    session.rows[SELECT_ATTEMPTS] = [
        row(40, 1, channel="email", provider="smtp", outcome="ok", status_code=250),
        row(41, 1, status_code=None, error="timeout"),
        row(41, 2, provider_message_id="SM1", outcome="ok", status_code=201, error=""),
    ]

    found = log.attempts_for_deliveries(notification_id=NOTIFICATION, delivery_ids=[41, 40, 41])

    assert session.executed == [(SELECT_ATTEMPTS, (UUID(NOTIFICATION), [40, 41]))]
    assert list(found.items()) == [
        (
            40,
            [
                an_attempt(
                    delivery_id=40,
                    number=1,
                    channel="email",
                    provider="smtp",
                    outcome="ok",
                    status_code=250,
                )
            ],
        ),
        (
            41,
            [
                an_attempt(number=1, status_code=None, error="timeout"),
                an_attempt(
                    number=2, provider_message_id="SM1", outcome="ok", status_code=201, error=""
                ),
            ],
        ),
    ]
    started_at = found[41][0].started_at
    assert started_at.tzinfo is UTC


def test_attempts_for_no_deliveries_asks_nothing(
    log: CassandraDeliveryLog, session: FakeSession
) -> None:
    assert log.attempts_for_deliveries(notification_id=NOTIFICATION, delivery_ids=[]) == {}
    assert session.executed == []
    assert session.prepared == []


def _event_row(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "notification_id": UUID(NOTIFICATION),
        "at": datetime(2024, 5, 1, 9, 15),
        "delivery_id": 41,
        "owner_id": 7,
        "recipient_id": "user-1",
        "channel": "sms",
        "status": "queued",
        "detail": "",
    }
    return {**values, **changes}


EVENT_ROWS = [
    _event_row(),
    _event_row(delivery_id=40, channel="email"),
    _event_row(status="sent", at=datetime(2024, 5, 1, 9, 15, 2, 7000), detail="twilio"),
]
EXPECTED_EVENTS = [
    an_event(),
    an_event(delivery_id=40, channel="email"),
    an_event(status="sent", at=datetime(2024, 5, 1, 9, 15, 2, 7000, tzinfo=UTC), detail="twilio"),
]


def test_events_for_notification_maps_rows_in_order(
    log: CassandraDeliveryLog, session: FakeSession
) -> None:
    session.rows[SELECT_BY_NOTIFICATION] = EVENT_ROWS

    found = log.events_for_notification(notification_id=NOTIFICATION.upper())

    assert session.executed == [(SELECT_BY_NOTIFICATION, (UUID(NOTIFICATION),))]
    assert found == EXPECTED_EVENTS
    assert [e.at.tzinfo for e in found] == [UTC, UTC, UTC]


def test_events_for_recipient_day_reads_one_day_partition(
    log: CassandraDeliveryLog, session: FakeSession
) -> None:
    session.rows[SELECT_BY_RECIPIENT_DAY] = EVENT_ROWS

    found = log.events_for_recipient_day(owner_id=7, recipient_id="user-1", day=date(2024, 5, 1))

    assert session.executed == [(SELECT_BY_RECIPIENT_DAY, (7, "user-1", date(2024, 5, 1)))]
    assert found == EXPECTED_EVENTS


EXPECTED_SCHEMA = [
    "CREATE KEYSPACE IF NOT EXISTS clarion_eu WITH replication = "
    "{'class': 'NetworkTopologyStrategy', 'eu-west': 3}",
    """\
CREATE TABLE IF NOT EXISTS clarion_eu.attempts_by_notification (
    notification_id uuid,
    delivery_id bigint,
    number int,
    attempt_id timeuuid,
    owner_id bigint,
    recipient_id text,
    channel text,
    provider text,
    outcome text,
    status_code int,
    provider_message_id text,
    error text,
    started_at timestamp,
    latency_ms double,
    PRIMARY KEY ((notification_id), delivery_id, number, attempt_id)
) WITH CLUSTERING ORDER BY (delivery_id ASC, number ASC, attempt_id ASC)""",
    """\
CREATE TABLE IF NOT EXISTS clarion_eu.events_by_notification (
    notification_id uuid,
    at timestamp,
    event_id timeuuid,
    delivery_id bigint,
    owner_id bigint,
    recipient_id text,
    channel text,
    status text,
    detail text,
    PRIMARY KEY ((notification_id), at, event_id)
) WITH CLUSTERING ORDER BY (at ASC, event_id ASC)""",
    """\
CREATE TABLE IF NOT EXISTS clarion_eu.events_by_recipient_day (
    owner_id bigint,
    recipient_id text,
    day date,
    at timestamp,
    event_id timeuuid,
    notification_id uuid,
    delivery_id bigint,
    channel text,
    status text,
    detail text,
    PRIMARY KEY ((owner_id, recipient_id, day), at, event_id)
) WITH CLUSTERING ORDER BY (at ASC, event_id ASC)""",
]


def test_schema_statements() -> None:
    replication = "{'class': 'NetworkTopologyStrategy', 'eu-west': 3}"
    assert schema_statements("clarion_eu", f"  {replication} ") == EXPECTED_SCHEMA
    assert schema_statements("clarion")[0] == (
        "CREATE KEYSPACE IF NOT EXISTS clarion WITH replication = "
        "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )


@pytest.mark.parametrize(
    ("keyspace", "replication", "message"),
    [
        ("clarion; DROP KEYSPACE x", None, "is not a keyspace name"),
        ("1clarion", None, "is not a keyspace name"),
        ("clarion", "'class': 'SimpleStrategy'", "is not a CQL map"),
        ("clarion", "{'class': 'SimpleStrategy'}; DROP KEYSPACE x", "is not a CQL map"),
    ],
)
def test_schema_statements_refuses_what_would_splice_into_cql(
    keyspace: str, replication: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        if replication is None:
            schema_statements(keyspace)
        else:
            schema_statements(keyspace, replication)


TABLE = re.compile(r"CREATE TABLE IF NOT EXISTS (\w+)\.(\w+) \(\n(.*?)\n\) WITH", re.S)
COLUMN = re.compile(r"^    (\w+) (\w+),$", re.M)
PRIMARY_KEY = re.compile(r"PRIMARY KEY \(\(([\w, ]+)\), ([\w, ]+)\)")
INSERT_CQL = re.compile(r"INSERT INTO (\S+) \(([\w, ]+)\) VALUES \(([?, ]+)\)$")
SELECT_CQL = re.compile(r"SELECT ([\w, ]+) FROM (\S+) WHERE (.+)$")
RESTRICTION = re.compile(r"(\w+) (=|IN) \?")


def parse_tables(statements: list[str]) -> dict[str, dict[str, Any]]:
    tables: dict[str, dict[str, Any]] = {}
    for statement in statements:
        match = TABLE.match(statement)
        if match is None:
            continue
        keyspace, name, body = match.groups()
        key = PRIMARY_KEY.search(body)
        assert key is not None
        tables[f"{keyspace}.{name}"] = {
            "columns": dict(COLUMN.findall(body)),
            "partition": key.group(1).split(", "),
            "clustering": key.group(2).split(", "),
        }
    return tables


def test_every_prepared_statement_names_only_schema_tables_and_columns(
    log: CassandraDeliveryLog, session: FakeSession
) -> None:
    tables = parse_tables(schema_statements(KS))
    assert sorted(tables) == [
        "clarion.attempts_by_notification",
        "clarion.events_by_notification",
        "clarion.events_by_recipient_day",
    ]
    assert [len(t["columns"]) for t in tables.values()] == [14, 9, 10]

    log.record_attempt(an_attempt())
    log.record_statuses([an_event()])
    log.attempts_for_deliveries(notification_id=NOTIFICATION, delivery_ids=[41])
    log.events_for_notification(notification_id=NOTIFICATION)
    log.events_for_recipient_day(owner_id=7, recipient_id="user-1", day=date(2024, 5, 1))
    assert len(session.prepared) == 6

    for cql in session.prepared:
        if match := INSERT_CQL.match(cql):
            table = tables[match.group(1)]
            columns = match.group(2).split(", ")
            assert set(columns) == set(table["columns"]), cql
            assert len(match.group(3).split(", ")) == len(columns), cql
            continue
        match = SELECT_CQL.match(cql)
        assert match is not None, cql
        table = tables[match.group(2)]
        assert set(match.group(1).split(", ")) <= set(table["columns"]), cql
        restricted = [column for column, _ in RESTRICTION.findall(match.group(3))]
        # A query the table answers without ALLOW FILTERING: the whole partition key, then at
        # most a prefix of the clustering columns.
        partition = table["partition"]
        assert restricted[: len(partition)] == partition, cql
        extra = restricted[len(partition) :]
        assert extra == table["clustering"][: len(extra)], cql


def test_connects_lazily_once_per_process_with_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    connects: list[tuple[list[str], float, float]] = []
    sessions: list[FakeSession] = []

    class FakeCluster:
        shut_down = False

        def shutdown(self) -> None:
            self.shut_down = True

    clusters: list[FakeCluster] = []

    def cluster_connect(
        hosts: list[str], *, connect_timeout: float, request_timeout: float
    ) -> tuple[FakeCluster, FakeSession]:
        connects.append((list(hosts), connect_timeout, request_timeout))
        clusters.append(FakeCluster())
        sessions.append(FakeSession())
        return clusters[-1], sessions[-1]

    monkeypatch.setattr(cassandra_log, "cluster_connect", cluster_connect)
    pid = [1000]
    monkeypatch.setattr(cassandra_log.os, "getpid", lambda: pid[0])

    log = CassandraDeliveryLog(hosts=["db1", "db2:9043"], keyspace=KS)
    assert connects == []

    log.events_for_notification(notification_id=NOTIFICATION)
    log.events_for_notification(notification_id=NOTIFICATION)
    assert connects == [(["db1", "db2:9043"], 5.0, 10.0)]
    assert [s.prepared for s in sessions] == [[SELECT_BY_NOTIFICATION]]

    # A prefork child: its own connection, its own prepared statements, and the parent's
    # cluster left running for the parent.
    pid[0] = 1001
    log.events_for_notification(notification_id=NOTIFICATION)
    assert len(connects) == 2
    assert [s.prepared for s in sessions] == [[SELECT_BY_NOTIFICATION]] * 2
    assert [len(s.executed) for s in sessions] == [2, 1]
    assert [c.shut_down for c in clusters] == [False, False]

    log.close()
    assert [c.shut_down for c in clusters] == [False, True]


def test_cluster_connect_passes_contact_points_timeouts_and_consistency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cassandra.cluster
    from cassandra import ConsistencyLevel
    from cassandra.cluster import EXEC_PROFILE_DEFAULT

    built: list[dict[str, Any]] = []

    class FakeCluster:
        def __init__(self, **kwargs: Any) -> None:
            built.append(kwargs)

        def connect(self) -> str:
            return "session"

    monkeypatch.setattr(cassandra.cluster, "Cluster", FakeCluster)
    _cluster, session = cassandra_log.cluster_connect(
        ["db1", "db2:9043", " db3 "], connect_timeout=2.0, request_timeout=3.0
    )

    assert session == "session"
    (kwargs,) = built
    profile = kwargs.pop("execution_profiles")[EXEC_PROFILE_DEFAULT]
    assert kwargs == {
        "contact_points": ["db1", ("db2", 9043), "db3"],
        "connect_timeout": 2.0,
        "control_connection_timeout": 2.0,
    }
    assert profile.request_timeout == 3.0
    assert profile.consistency_level == ConsistencyLevel.LOCAL_QUORUM
    assert type(profile.load_balancing_policy).__name__ == "TokenAwarePolicy"


@pytest.fixture
def print_settings(settings: Any) -> Any:
    settings.CASSANDRA_HOSTS = []
    settings.CASSANDRA_KEYSPACE = "clarion_eu"
    return settings


def test_schema_command_prints_the_cql_without_a_server(print_settings: Any) -> None:
    out = io.StringIO()
    call_command(
        "delivery_log_schema",
        "--print",
        "--replication",
        "{'class': 'NetworkTopologyStrategy', 'eu-west': 3}",
        stdout=out,
    )
    assert out.getvalue() == ";\n\n".join(EXPECTED_SCHEMA) + ";\n"


def test_schema_command_without_hosts_names_the_setting(print_settings: Any) -> None:
    with pytest.raises(CommandError) as error:
        call_command("delivery_log_schema", stdout=io.StringIO())
    assert str(error.value) == (
        "CASSANDRA_HOSTS is not set: set it to the Cassandra contact points "
        "(comma-separated host or host:port), or pass --print to only print the CQL"
    )


def test_schema_command_runs_each_statement_on_the_hosts(
    print_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    print_settings.CASSANDRA_HOSTS = ["db1", "db2"]
    shut_down: list[bool] = []

    class FakeCluster:
        def shutdown(self) -> None:
            shut_down.append(True)

    class DdlSession(FakeSession):
        def execute(self, statement: Any, params: Any = None) -> list[Any]:  # type: ignore[override]
            self.executed.append((statement, params))
            return []

    session = DdlSession()
    monkeypatch.setattr(cassandra_log, "cluster_connect", lambda hosts: (FakeCluster(), session))
    out = io.StringIO()
    call_command("delivery_log_schema", stdout=out)

    assert session.executed == [(s, None) for s in schema_statements("clarion_eu")]
    assert shut_down == [True]
    assert out.getvalue() == (
        "Delivery log keyspace clarion_eu and its 3 tables are ready on db1,db2\n"
    )


@pytest.fixture
def fresh_delivery_log() -> Iterator[None]:
    get_delivery_log.cache_clear()
    yield
    get_delivery_log.cache_clear()


def test_cassandra_backend_without_hosts_is_improperly_configured(
    settings: Any, fresh_delivery_log: None
) -> None:
    settings.DELIVERY_LOG_BACKEND = "cassandra"
    settings.CASSANDRA_HOSTS = []
    with pytest.raises(ImproperlyConfigured, match="CASSANDRA_HOSTS"):
        get_delivery_log()


def test_cassandra_backend_with_hosts_builds_a_lazy_log(
    settings: Any, fresh_delivery_log: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cassandra_log, "cluster_connect", pytest.fail)
    settings.DELIVERY_LOG_BACKEND = "cassandra"
    settings.CASSANDRA_HOSTS = ["db1"]
    settings.CASSANDRA_KEYSPACE = "clarion_eu"
    log = get_delivery_log()
    assert isinstance(log, CassandraDeliveryLog)
    assert get_delivery_log() is log


class SimulatedCassandra(FakeSession):
    """Just enough of Cassandra to hold the contract against: tables parsed from the schema,
    every bound value through the driver's own codec for its column type (a wrong Python type
    fails as on a server; timestamps keep milliseconds and come back naive UTC), rows upserted
    by primary key and read one partition at a time in clustering order."""

    PROTOCOL_VERSION = 4

    def __init__(self, keyspace: str) -> None:
        super().__init__()
        self.tables = parse_tables(schema_statements(keyspace))
        self.partitions: dict[str, dict[tuple[bytes, ...], dict[tuple[Any, ...], Any]]] = {
            name: {} for name in self.tables
        }

    def _encode(self, table: str, column: str, value: Any) -> bytes | None:
        codec = cqltypes._cqltypes[self.tables[table]["columns"][column]]
        return None if value is None else codec.to_binary(value, self.PROTOCOL_VERSION)

    def _decode(self, table: str, column: str, raw: bytes | None) -> Any:
        codec = cqltypes._cqltypes[self.tables[table]["columns"][column]]
        return None if raw is None else codec.from_binary(raw, self.PROTOCOL_VERSION)

    @staticmethod
    def _sort_key(value: Any) -> Any:
        # Cassandra orders timeuuids by their time first.
        return (value.time, value.bytes) if isinstance(value, UUID) else value

    def _rows(self, cql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        if match := INSERT_CQL.match(cql):
            table, columns = match.group(1), match.group(2).split(", ")
            raw = {c: self._encode(table, c, v) for c, v in zip(columns, params, strict=True)}
            row = {c: self._decode(table, c, value) for c, value in raw.items()}
            spec = self.tables[table]
            partition = tuple(raw[c] or b"" for c in spec["partition"])
            clustering = tuple(self._sort_key(row[c]) for c in spec["clustering"])
            self.partitions[table].setdefault(partition, {})[clustering] = row
            return []
        match = SELECT_CQL.match(cql)
        assert match is not None, cql
        columns, table = match.group(1).split(", "), match.group(2)
        restrictions = RESTRICTION.findall(match.group(3))
        bound = dict(zip([c for c, _ in restrictions], params, strict=True))
        spec = self.tables[table]
        partition = tuple(self._encode(table, c, bound.pop(c)) or b"" for c in spec["partition"])
        rows = self.partitions[table].get(partition, {})
        found = [rows[key] for key in sorted(rows)]
        for column, values in bound.items():
            wanted = {self._encode(table, column, v) for v in values}
            found = [r for r in found if self._encode(table, column, r[column]) in wanted]
        row_type = namedtuple("Row", columns)
        return [row_type(**{c: r[c] for c in columns}) for r in found]

    def execute(self, statement: FakePrepared, params: tuple[Any, ...]) -> list[Any]:
        self.executed.append((statement.cql, params))
        return self._rows(statement.cql, params)

    def execute_async(self, statement: FakePrepared, params: tuple[Any, ...]) -> FakeFuture:
        self.executed_async.append((statement.cql, params))
        return FakeFuture(self._rows(statement.cql, params))


@pytest.mark.parametrize("check", [check_delivery_log_contract, check_records_come_back_in_utc])
def test_contract_holds_on_a_simulated_cassandra(db: None, check: Any) -> None:
    check(CassandraDeliveryLog(hosts=["db1"], keyspace=KS, session=SimulatedCassandra(KS)))


DELETE_ATTEMPTS = "DELETE FROM clarion.attempts_by_notification WHERE notification_id = ?"
DELETE_BY_NOTIFICATION = "DELETE FROM clarion.events_by_notification WHERE notification_id = ?"
DELETE_BY_RECIPIENT_DAYS = (
    "DELETE FROM clarion.events_by_recipient_day"
    " WHERE owner_id = ? AND recipient_id = ? AND day IN ?"
)


def test_recipient_anonymise_rewrites_the_partitions_without_the_person(
    log: CassandraDeliveryLog, session: FakeSession, timeuuids: list[UUID]
) -> None:
    """Erasure: each notification's partitions are read, dropped and written again under the
    anonymous id with the free text emptied; the recipient's day partitions are dropped; the
    statements restrict whole partition keys only."""
    session.rows[SELECT_ATTEMPTS] = [
        {
            "notification_id": UUID(NOTIFICATION),
            "delivery_id": 41,
            "number": 1,
            "owner_id": 7,
            "recipient_id": "user-1",
            "channel": "sms",
            "provider": "twilio",
            "outcome": "permanent",
            "status_code": 400,
            "provider_message_id": "SM1",
            "error": "+14155550100 is not a valid number",
            "started_at": datetime(2024, 5, 1, 9, 15, 0, 250000),
            "latency_ms": 120.5,
        }
    ]
    session.rows[SELECT_BY_NOTIFICATION] = [
        _event_row(),
        _event_row(status="dead", at=datetime(2024, 5, 2, 0, 0, 1), detail="+14155550100 bad"),
    ]

    log.recipient_anonymise(
        owner_id=7,
        recipient_id="user-1",
        anonymous_id="erased-ab12",
        deliveries={NOTIFICATION: [41]},
    )

    assert session.executed[:5] == [
        (SELECT_ATTEMPTS, (UUID(NOTIFICATION), [41])),
        (SELECT_BY_NOTIFICATION, (UUID(NOTIFICATION),)),
        (DELETE_ATTEMPTS, (UUID(NOTIFICATION),)),
        (DELETE_BY_NOTIFICATION, (UUID(NOTIFICATION),)),
        (DELETE_BY_RECIPIENT_DAYS, (7, "user-1", [date(2024, 5, 1), date(2024, 5, 2)])),
    ]
    [(insert, attempt)] = session.executed[5:]
    assert insert == INSERT_ATTEMPT
    assert attempt[4:12] == (7, "erased-ab12", "sms", "twilio", "permanent", 400, "", "")
    written = [params for _, params in session.executed_async]
    assert [(p[5], p[7], p[8]) for p in written if len(p) == 9] == [
        ("erased-ab12", "queued", ""),
        ("erased-ab12", "dead", ""),
    ]
    assert [(p[1], p[2], p[8], p[9]) for p in written if len(p) == 10] == [
        ("erased-ab12", date(2024, 5, 1), "queued", ""),
        ("erased-ab12", date(2024, 5, 2), "dead", ""),
    ]
    assert "user-1" not in repr(written) and "+1415" not in repr(written)
