"""Delivery log on Apache Cassandra: one denormalised table per query the log answers, written
and read through prepared statements on a session opened lazily in each process."""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID, uuid1

from notifications.delivery_log.records import AttemptRecord, StatusEvent

# Cassandra stores `timestamp` as milliseconds since the epoch: the microseconds of
# `started_at` and `at` are truncated on write, so records read back equal the SQL backend's
# only at millisecond precision. Events within one millisecond keep their write order through
# the timeuuid clustering column.

DEFAULT_REPLICATION = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
# A worker that cannot reach the cluster should fail its task, not hang the queue.
CONNECT_TIMEOUT_SECONDS = 5.0
REQUEST_TIMEOUT_SECONDS = 10.0
# Bounds the writes of one record_statuses call that are in flight at once: a sweep of
# hundreds of deliveries must not exhaust the connection's request streams.
MAX_IN_FLIGHT_WRITES = 128

KEYSPACE_CQL = "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {replication}"

ATTEMPTS_BY_NOTIFICATION_CQL = """\
CREATE TABLE IF NOT EXISTS {keyspace}.attempts_by_notification (
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
) WITH CLUSTERING ORDER BY (delivery_id ASC, number ASC, attempt_id ASC)"""

EVENTS_BY_NOTIFICATION_CQL = """\
CREATE TABLE IF NOT EXISTS {keyspace}.events_by_notification (
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
) WITH CLUSTERING ORDER BY (at ASC, event_id ASC)"""

EVENTS_BY_RECIPIENT_DAY_CQL = """\
CREATE TABLE IF NOT EXISTS {keyspace}.events_by_recipient_day (
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
) WITH CLUSTERING ORDER BY (at ASC, event_id ASC)"""

INSERT_ATTEMPT_CQL = (
    "INSERT INTO {keyspace}.attempts_by_notification (notification_id, delivery_id, number,"
    " attempt_id, owner_id, recipient_id, channel, provider, outcome, status_code,"
    " provider_message_id, error, started_at, latency_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_EVENT_BY_NOTIFICATION_CQL = (
    "INSERT INTO {keyspace}.events_by_notification (notification_id, at, event_id, delivery_id,"
    " owner_id, recipient_id, channel, status, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_EVENT_BY_RECIPIENT_DAY_CQL = (
    "INSERT INTO {keyspace}.events_by_recipient_day (owner_id, recipient_id, day, at, event_id,"
    " notification_id, delivery_id, channel, status, detail)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
SELECT_ATTEMPTS_CQL = (
    "SELECT notification_id, delivery_id, number, owner_id, recipient_id, channel, provider,"
    " outcome, status_code, provider_message_id, error, started_at, latency_ms"
    " FROM {keyspace}.attempts_by_notification WHERE notification_id = ? AND delivery_id IN ?"
)
SELECT_EVENTS_BY_NOTIFICATION_CQL = (
    "SELECT notification_id, at, delivery_id, owner_id, recipient_id, channel, status, detail"
    " FROM {keyspace}.events_by_notification WHERE notification_id = ?"
)
SELECT_EVENTS_BY_RECIPIENT_DAY_CQL = (
    "SELECT owner_id, recipient_id, at, notification_id, delivery_id, channel, status, detail"
    " FROM {keyspace}.events_by_recipient_day WHERE owner_id = ? AND recipient_id = ? AND day = ?"
)
# Erasure (recipient_anonymise): whole partitions go; `day IN ?` names the recipient's days.
DELETE_ATTEMPTS_CQL = "DELETE FROM {keyspace}.attempts_by_notification WHERE notification_id = ?"
DELETE_EVENTS_BY_NOTIFICATION_CQL = (
    "DELETE FROM {keyspace}.events_by_notification WHERE notification_id = ?"
)
DELETE_EVENTS_BY_RECIPIENT_DAYS_CQL = (
    "DELETE FROM {keyspace}.events_by_recipient_day"
    " WHERE owner_id = ? AND recipient_id = ? AND day IN ?"
)

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")


def _checked_keyspace(keyspace: str) -> str:
    # The keyspace is spliced into CQL text (identifiers cannot be bound), so only a plain
    # unquoted identifier is accepted.
    if not _IDENTIFIER.fullmatch(keyspace):
        raise ValueError(
            f"CASSANDRA_KEYSPACE={keyspace!r} is not a keyspace name: use letters, digits and _,"
            " starting with a letter, at most 48 characters"
        )
    return keyspace


def schema_statements(keyspace: str, replication: str = DEFAULT_REPLICATION) -> list[str]:
    """The CQL that creates the keyspace and the log's tables; safe to run again."""
    keyspace = _checked_keyspace(keyspace)
    replication = replication.strip()
    if not (replication.startswith("{") and replication.endswith("}")) or ";" in replication:
        raise ValueError(
            f"replication {replication!r} is not a CQL map such as {DEFAULT_REPLICATION}"
        )
    return [
        KEYSPACE_CQL.format(keyspace=keyspace, replication=replication),
        ATTEMPTS_BY_NOTIFICATION_CQL.format(keyspace=keyspace),
        EVENTS_BY_NOTIFICATION_CQL.format(keyspace=keyspace),
        EVENTS_BY_RECIPIENT_DAY_CQL.format(keyspace=keyspace),
    ]


def contact_points(hosts: Iterable[str]) -> list[str | tuple[str, int]]:
    """CASSANDRA_HOSTS entries as driver contact points; `host:port` selects a port."""
    points: list[str | tuple[str, int]] = []
    for host in hosts:
        name, sep, port = host.strip().rpartition(":")
        if sep and port.isdigit() and ":" not in name:
            points.append((name, int(port)))
        else:
            points.append(host.strip())
    return points


def cluster_connect(
    hosts: Sequence[str],
    *,
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    request_timeout: float = REQUEST_TIMEOUT_SECONDS,
) -> tuple[Any, Any]:
    """A new (cluster, session) pair; the caller owns it and shuts the cluster down."""
    from cassandra import ConsistencyLevel
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

    profile = ExecutionProfile(
        # Token-aware routing sends each single-partition request straight to a replica.
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy()),
        # LOCAL_QUORUM on both sides: the API reads attempts right after a worker wrote them.
        consistency_level=ConsistencyLevel.LOCAL_QUORUM,
        request_timeout=request_timeout,
    )
    cluster = Cluster(
        contact_points=contact_points(hosts),
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        connect_timeout=connect_timeout,
        control_connection_timeout=connect_timeout,
    )
    try:
        return cluster, cluster.connect()
    except BaseException:
        cluster.shutdown()
        raise


def delivery_log_schema_create(
    *, hosts: Sequence[str], keyspace: str, replication: str = DEFAULT_REPLICATION
) -> list[str]:
    """Create the keyspace and tables on the cluster; returns the statements run."""
    statements = schema_statements(keyspace, replication)
    cluster, session = cluster_connect(hosts)
    try:
        for statement in statements:
            # The driver waits for schema agreement after each DDL statement.
            session.execute(statement)
    finally:
        cluster.shutdown()
    return statements


def _utc(value: datetime) -> datetime:
    # The driver returns timestamps as naive UTC datetimes.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc_day(at: datetime) -> date:
    return _utc(at).date()


class CassandraDeliveryLog:
    def __init__(
        self,
        hosts: list[str],
        keyspace: str,
        *,
        session: Any = None,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
    ) -> None:
        self._hosts = list(hosts)
        self._keyspace = _checked_keyspace(keyspace)
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._lock = threading.Lock()
        self._cluster: Any = None
        self._session_obj: Any = session
        self._injected = session is not None
        self._pid = os.getpid() if session is not None else None
        self._prepared: dict[str, Any] = {}
        ref = weakref.ref(self)

        def fresh_lock_in_child() -> None:
            log = ref()
            if log is not None:
                log._lock = threading.Lock()

        # A fork can happen while another thread holds the lock; the child gets a fresh one.
        os.register_at_fork(after_in_child=fresh_lock_in_child)

    def _session(self) -> Any:
        if self._injected:
            return self._session_obj
        pid = os.getpid()
        if self._pid == pid:
            return self._session_obj
        with self._lock:
            if self._pid != pid:
                # A prefork child must not use the parent's sockets; the parent's cluster is
                # dropped without shutdown(), which would close connections the parent uses.
                self._cluster, self._session_obj = cluster_connect(
                    self._hosts,
                    connect_timeout=self._connect_timeout,
                    request_timeout=self._request_timeout,
                )
                self._prepared = {}
                self._pid = pid
        return self._session_obj

    def _statement(self, cql: str) -> Any:
        session = self._session()
        prepared = self._prepared.get(cql)
        if prepared is None:
            with self._lock:
                prepared = self._prepared.get(cql)
                if prepared is None:
                    prepared = session.prepare(cql.format(keyspace=self._keyspace))
                    # Every statement writes or reads fixed keys with fixed values, so the
                    # driver may retry it after a timeout without duplicating anything.
                    prepared.is_idempotent = True
                    self._prepared[cql] = prepared
        return prepared

    def close(self) -> None:
        """Shut down the connection this process opened; an injected session is left alone."""
        with self._lock:
            if self._injected:
                return
            if self._cluster is not None and self._pid == os.getpid():
                self._cluster.shutdown()
            self._cluster = self._session_obj = self._pid = None
            self._prepared = {}

    def record_attempt(self, attempt: AttemptRecord) -> None:
        self._session().execute(
            self._statement(INSERT_ATTEMPT_CQL),
            (
                UUID(attempt.notification_id),
                attempt.delivery_id,
                attempt.number,
                uuid1(),
                attempt.owner_id,
                attempt.recipient_id,
                attempt.channel,
                attempt.provider,
                attempt.outcome,
                attempt.status_code,
                attempt.provider_message_id,
                attempt.error,
                attempt.started_at,
                attempt.latency_ms,
            ),
        )

    def record_attempts(self, attempts: list[AttemptRecord]) -> None:
        # Each attempt is its own partition's row (by notification): one write each, as
        # record_attempt does; a batch of several partitions would only load a coordinator.
        for attempt in attempts:
            self.record_attempt(attempt)

    def record_statuses(self, events: list[StatusEvent]) -> None:
        # Each event goes to two tables with different partition keys, and one call's events
        # may span many notifications (a sweep, a replay). A multi-partition batch would make
        # one coordinator fan out and hold everything; a logged batch would add a batchlog
        # round trip. Instead every row is its own idempotent async write, routed token-aware
        # to a replica, all in flight together. The event_id is fixed before sending, so a
        # retried write lands on the same row, and order within one millisecond is the order
        # of `events`, whatever order the writes arrive in.
        if not events:
            return
        by_notification = self._statement(INSERT_EVENT_BY_NOTIFICATION_CQL)
        by_recipient_day = self._statement(INSERT_EVENT_BY_RECIPIENT_DAY_CQL)
        writes: list[tuple[Any, tuple[Any, ...]]] = []
        for event in events:
            event_id = uuid1()
            notification_id = UUID(event.notification_id)
            writes.append(
                (
                    by_notification,
                    (
                        notification_id,
                        event.at,
                        event_id,
                        event.delivery_id,
                        event.owner_id,
                        event.recipient_id,
                        event.channel,
                        event.status,
                        event.detail,
                    ),
                )
            )
            writes.append(
                (
                    by_recipient_day,
                    (
                        event.owner_id,
                        event.recipient_id,
                        _utc_day(event.at),
                        event.at,
                        event_id,
                        notification_id,
                        event.delivery_id,
                        event.channel,
                        event.status,
                        event.detail,
                    ),
                )
            )
        session = self._session()
        for start in range(0, len(writes), MAX_IN_FLIGHT_WRITES):
            futures = [
                session.execute_async(statement, params)
                for statement, params in writes[start : start + MAX_IN_FLIGHT_WRITES]
            ]
            for future in futures:
                future.result()

    def attempts_for_deliveries(
        self, *, notification_id: str, delivery_ids: list[int]
    ) -> dict[int, list[AttemptRecord]]:
        if not delivery_ids:
            return {}
        rows = self._session().execute(
            self._statement(SELECT_ATTEMPTS_CQL),
            (UUID(notification_id), sorted(set(delivery_ids))),
        )
        # One partition, so rows come in clustering order: delivery, number, write order.
        out: dict[int, list[AttemptRecord]] = {}
        for row in rows:
            out.setdefault(row.delivery_id, []).append(
                AttemptRecord(
                    delivery_id=row.delivery_id,
                    notification_id=str(row.notification_id),
                    owner_id=row.owner_id,
                    recipient_id=row.recipient_id,
                    channel=row.channel,
                    number=row.number,
                    provider=row.provider,
                    outcome=row.outcome,
                    status_code=row.status_code,
                    provider_message_id=row.provider_message_id,
                    error=row.error,
                    started_at=_utc(row.started_at),
                    latency_ms=row.latency_ms,
                )
            )
        return out

    def events_for_notification(self, *, notification_id: str) -> list[StatusEvent]:
        rows = self._session().execute(
            self._statement(SELECT_EVENTS_BY_NOTIFICATION_CQL), (UUID(notification_id),)
        )
        return [self._event(row) for row in rows]

    def events_for_recipient_day(
        self, *, owner_id: int, recipient_id: str, day: date
    ) -> list[StatusEvent]:
        rows = self._session().execute(
            self._statement(SELECT_EVENTS_BY_RECIPIENT_DAY_CQL), (owner_id, recipient_id, day)
        )
        return [self._event(row) for row in rows]

    def recipient_anonymise(
        self,
        *,
        owner_id: int,
        recipient_id: str,
        anonymous_id: str,
        deliveries: dict[str, list[int]],
    ) -> None:
        # Rows cannot be re-keyed in place: each notification's partitions are read, dropped,
        # and written again anonymised (new row ids, same times, so the same order); the
        # recipient's day partitions for the days they touched are dropped the same way.
        attempts: list[AttemptRecord] = []
        events: list[StatusEvent] = []
        for notification_id, delivery_ids in deliveries.items():
            for records in self.attempts_for_deliveries(
                notification_id=notification_id, delivery_ids=delivery_ids
            ).values():
                attempts += records
            events += self.events_for_notification(notification_id=notification_id)
        session = self._session()
        for notification_id in deliveries:
            for cql in (DELETE_ATTEMPTS_CQL, DELETE_EVENTS_BY_NOTIFICATION_CQL):
                session.execute(self._statement(cql), (UUID(notification_id),))
        days = sorted({_utc_day(event.at) for event in events})
        if days:
            session.execute(
                self._statement(DELETE_EVENTS_BY_RECIPIENT_DAYS_CQL), (owner_id, recipient_id, days)
            )
        self.record_attempts(
            [
                replace(a, recipient_id=anonymous_id, error="", provider_message_id="")
                for a in attempts
            ]
        )
        self.record_statuses([replace(e, recipient_id=anonymous_id, detail="") for e in events])

    @staticmethod
    def _event(row: Any) -> StatusEvent:
        return StatusEvent(
            delivery_id=row.delivery_id,
            notification_id=str(row.notification_id),
            owner_id=row.owner_id,
            recipient_id=row.recipient_id,
            channel=row.channel,
            status=row.status,
            at=_utc(row.at),
            detail=row.detail,
        )
