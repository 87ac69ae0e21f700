"""Outbox operations that ingest and workers share: record, claim, finish, sweep.

Every function takes the session as a keyword argument and never commits: the
caller (a request, a task run) owns the transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Engine,
    Integer,
    String,
    and_,
    any_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, selectinload

from models.base import UTCDateTime
from models.db import db_now
from models.ordering import order_key
from models.tables import (
    Delivery,
    DeliveryStatus,
    DestinationState,
    Event,
    EventStatus,
    Link,
    ReceivedVia,
)


# Ingest runs these once per request: build them once per dialect, and run them
# on the connection (Core), which skips the ORM's per-statement bookkeeping.
@cache
def _event_insert(dialect: str) -> Any:
    module = postgresql if dialect == "postgresql" else sqlite
    return (
        module.insert(Event.__table__)
        .on_conflict_do_nothing(index_elements=["source", "event_id"])
        .returning(Event.__table__.c.id)
    )


@cache
def _delivery_insert(dialect: str) -> Any:
    return insert(Delivery)


# On PostgreSQL the event and its deliveries are one statement: one round trip, and
# on an autocommit connection no BEGIN or COMMIT either. Statement-level atomicity
# keeps the promise of one transaction: both rows or neither. A duplicate (source, id)
# inserts nothing, so new_event is empty and so is new_deliveries. It is written in
# the driver's own parameter style because ingest runs it on the DBAPI cursor.
_RECORD_ON_POSTGRESQL = """
WITH new_event AS (
    INSERT INTO events (source, event_id, type, subject, event_time, object_updated_at,
                        status, ignore_reason, body_sha256, payload, received_via)
    VALUES (%(source)s, %(event_id)s, %(type)s, %(subject)s, %(event_time)s,
            %(object_updated_at)s, %(status)s, %(ignore_reason)s, %(body_sha256)s,
            CAST(%(payload)s AS jsonb), %(received_via)s)
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING id
), new_deliveries AS (
    INSERT INTO deliveries (event_pk, destination, source, subject, status)
    SELECT new_event.id, destination.name, %(source)s, %(subject)s, %(pending)s
    FROM new_event
    CROSS JOIN unnest(string_to_array(%(destinations)s, ',')) WITH ORDINALITY
        AS destination (name, position)
    ORDER BY destination.position
    RETURNING 1
)
SELECT (SELECT id FROM new_event)
"""


def _insert(session: Session, table: Any) -> Any:
    """An INSERT that knows ON CONFLICT on the session's dialect."""
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(table)


# Recording events (ingest)


@dataclass(frozen=True)
class NewEvent:
    """A validated CloudEvent, ready to store."""

    source: str
    event_id: str
    type: str
    subject: str | None
    event_time: datetime
    object_updated_at: datetime | None
    payload: dict[str, Any]
    body_sha256: str
    status: EventStatus
    ignore_reason: str | None = None
    # How it reached idsync: a ReceivedVia value (the webhook, recovery or backfill).
    received_via: str = ReceivedVia.WEBHOOK.value


@dataclass(frozen=True)
class Recorded:
    """What storing an event did: a new row with its deliveries, or a duplicate."""

    duplicate: bool
    event_pk: int | None
    stored_sha256: str | None = None
    destinations: tuple[str, ...] = ()


def record_event(*, session: Session, event: NewEvent, destinations: Sequence[str]) -> Recorded:
    """Insert the event and one delivery per destination, unless (source, id) exists.

    The unique constraint decides duplicates, so two identical posts racing each
    other store one event: the loser's INSERT does nothing and it reads the winner.
    """
    return _record_event(session.connection(), event, destinations)


def commit_event(*, engine: Engine, event: NewEvent, destinations: Sequence[str]) -> Recorded:
    """``record_event`` in a transaction of its own: committed when this returns.

    Ingest's path for one event. On PostgreSQL it is one statement, run on the
    DBAPI cursor of a pooled connection (a request's SQLAlchemy bookkeeping costs
    more than the statement); on an engine made with ``make_engine(...,
    autocommit=True)`` that statement is the whole transaction, with no BEGIN or
    COMMIT round trip. Errors are SQLAlchemy's, as on any other path, and a
    connection found dead is dropped from the pool. On any other database the
    statements run in one transaction and commit.
    """
    if engine.dialect.name != "postgresql":
        with engine.connect() as connection:
            recorded = _record_event(connection, event, destinations)
            connection.commit()
        return recorded
    values = _postgresql_values(event, destinations)
    event_pk = _execute_on_cursor(engine, _RECORD_ON_POSTGRESQL, values)
    if event_pk is None:
        with engine.connect() as connection:
            return Recorded(
                duplicate=True, event_pk=None, stored_sha256=_stored_sha256(connection, event)
            )
    return Recorded(duplicate=False, event_pk=event_pk, destinations=_targets(event, destinations))


def _execute_on_cursor(engine: Engine, statement: str, values: dict[str, Any]) -> Any:
    """The first column of the one row ``statement`` returns, committed (a no-op on autocommit)."""
    dbapi_error = engine.dialect.loaded_dbapi.Error
    try:
        pooled = engine.raw_connection()
    except dbapi_error as error:  # the database cannot be reached
        raise DBAPIError.instance(None, None, error, dbapi_error) from error
    try:
        cursor = pooled.cursor()
        try:
            cursor.execute(statement, values)
            row = cursor.fetchone()
        finally:
            cursor.close()
        pooled.commit()
    except dbapi_error as error:
        dead = engine.dialect.is_disconnect(error, pooled.dbapi_connection, None)
        if dead:
            pooled.invalidate(error)
        raise DBAPIError.instance(
            statement, values, error, dbapi_error, connection_invalidated=dead
        ) from error
    finally:
        pooled.close()
    return row[0] if row else None


def _targets(event: NewEvent, destinations: Sequence[str]) -> tuple[str, ...]:
    return tuple(destinations) if event.status is EventStatus.ACCEPTED else ()


def _postgresql_values(event: NewEvent, destinations: Sequence[str]) -> dict[str, Any]:
    return {
        "source": event.source,
        "event_id": event.event_id,
        "type": event.type,
        "subject": event.subject,
        "event_time": event.event_time,
        "object_updated_at": event.object_updated_at,
        "status": event.status.value,
        "ignore_reason": event.ignore_reason,
        "body_sha256": event.body_sha256,
        "payload": json.dumps(event.payload),
        "received_via": event.received_via,
        # Comma-separated (names come from DESTINATIONS and hold no comma): a string
        # costs the driver less to send than an array.
        "destinations": ",".join(_targets(event, destinations)),
        "pending": DeliveryStatus.PENDING.value,
    }


def _stored_sha256(connection: Connection, event: NewEvent) -> str | None:
    return connection.execute(
        select(Event.body_sha256).where(
            Event.source == event.source, Event.event_id == event.event_id
        )
    ).scalar_one_or_none()


def _record_event(connection: Connection, event: NewEvent, destinations: Sequence[str]) -> Recorded:
    targets = _targets(event, destinations)
    if connection.dialect.name == "postgresql":
        event_pk = connection.exec_driver_sql(
            _RECORD_ON_POSTGRESQL, _postgresql_values(event, destinations)
        ).scalar_one_or_none()
    else:
        event_pk = _record_in_two_statements(connection, event, targets)
    if event_pk is None:
        return Recorded(
            duplicate=True, event_pk=None, stored_sha256=_stored_sha256(connection, event)
        )
    return Recorded(duplicate=False, event_pk=event_pk, destinations=targets)


def _record_in_two_statements(
    connection: Connection, event: NewEvent, targets: tuple[str, ...]
) -> int | None:
    """The event, then its deliveries: for databases without INSERT in a WITH (SQLite)."""
    dialect = connection.dialect.name
    event_pk: int | None = connection.execute(
        _event_insert(dialect),
        {
            "source": event.source,
            "event_id": event.event_id,
            "type": event.type,
            "subject": event.subject,
            "event_time": event.event_time,
            "object_updated_at": event.object_updated_at,
            "status": event.status,
            "ignore_reason": event.ignore_reason,
            "body_sha256": event.body_sha256,
            "payload": event.payload,
            "received_via": event.received_via,
        },
    ).scalar_one_or_none()
    if event_pk is not None and targets:
        connection.execute(
            _delivery_insert(dialect),
            [
                {
                    "event_pk": event_pk,
                    "destination": name,
                    "source": event.source,
                    "subject": event.subject,
                    "status": DeliveryStatus.PENDING,
                }
                for name in targets
            ],
        )
    return event_pk


# Claiming a user's work (workers)


@dataclass(slots=True)
class ClaimedEvent:
    """What a claimed delivery's event says: enough to order it and to send it."""

    id: int
    source: str
    event_id: str
    type: str
    event_time: datetime
    object_updated_at: datetime | None
    received_at: datetime
    payload: dict[str, Any] | None


@dataclass(slots=True)
class ClaimedDelivery:
    """A claimed delivery's state as the claim left it (``in_progress``, under its lease)."""

    event: ClaimedEvent
    id: int
    source: str
    subject: str
    status: DeliveryStatus
    reason: str | None
    force: bool
    attempts: int
    reclaims: int
    resyncs: int
    next_attempt_at: datetime
    last_error: str | None
    last_status_code: int | None
    external_id: str | None
    finished_at: datetime | None


@dataclass(slots=True)
class ClaimedLink:
    """A held user's link, as it was when the claim took its lease."""

    id: int
    source: str
    subject: str
    external_id: str | None
    created_contact: bool
    last_order_key: str | None
    properties_hash: str | None
    last_email: str | None
    deprovisioned: bool
    uncertain_until: datetime | None
    conflict: str | None


@dataclass
class UserWork:
    """One user's claimed deliveries, oldest first, and the link that holds the user."""

    link: ClaimedLink
    deliveries: list[ClaimedDelivery]
    lost: list[ClaimedDelivery] = field(default_factory=list)  # reclaimed too often: worker_lost

    def key_of(self, delivery: ClaimedDelivery) -> str:
        return event_order_key(delivery.event)


@dataclass
class Claim:
    """Work taken by one worker under one lease token."""

    token: str
    now: datetime
    expires_at: datetime
    users: list[UserWork]

    @property
    def deliveries(self) -> list[ClaimedDelivery]:
        return [delivery for user in self.users for delivery in user.deliveries]


def event_order_key(event: Event | ClaimedEvent) -> str:
    """The order key of a stored event."""
    return order_key(
        event_time=event.event_time,
        received_at=event.received_at,
        object_updated_at=event.object_updated_at,
        event_type=event.type,
        event_id=event.event_id,
    )


def _pending(destination: Any, now: Any) -> Any:
    """Pending deliveries of ``destination`` that are due; a held one waits for an operator.

    The conditions repeat the partial index ``ix_deliveries_pending`` word for word
    (``status = 'pending' AND held IS NULL``), so the planner can use it.
    """
    return and_(
        Delivery.destination == destination,
        Delivery.status == DeliveryStatus.PENDING,
        Delivery.held.is_(None),
        Delivery.next_attempt_at <= now,
    )


def _orphaned(destination: Any, now: Any) -> Any:
    """Deliveries of ``destination`` whose worker's lease ran out (``ix_deliveries_leased``)."""
    return and_(
        Delivery.destination == destination,
        Delivery.status == DeliveryStatus.IN_PROGRESS,
        Delivery.lease_expires_at < now,
    )


def _due(destination: Any, now: Any) -> Any:
    """Deliveries of ``destination`` that a worker may take now: due, or orphaned.

    Only for statements already narrowed to a few users (by ``ix_deliveries_user``):
    an OR of the two keeps the planner off both partial indexes, so finding work
    in the whole backlog goes through ``_candidates`` instead.
    """
    return or_(_pending(destination, now), _orphaned(destination, now))


CLAIM_ORDER = (Delivery.priority, Delivery.next_attempt_at, Delivery.id)


@cache
def _candidates() -> Any:
    """The first ``limit`` due or orphaned deliveries of ``destination``, in claim order.

    The cost must not grow with the backlog (a first backfill leaves a million rows
    pending). So each condition is its own ordered, limited index scan that stops
    after ``limit`` rows, and the branches are merged: live pending work
    (``priority = 0``: an equality, so the scan ends at the first row not yet due
    instead of walking every retry scheduled for later), replays and resyncs
    (``priority > 0``), and orphans (few: at most the rows of workers that died).
    Built once, with the destination, the clock and the limit as parameters.
    """
    destination = bindparam("dest", type_=String())
    now = bindparam("now", type_=UTCDateTime())
    limit = bindparam("limit", type_=Integer())
    branches = (
        and_(_pending(destination, now), Delivery.priority == 0),
        and_(_pending(destination, now), Delivery.priority > 0),
        _orphaned(destination, now),
    )
    columns = (Delivery.source, Delivery.subject, *CLAIM_ORDER)
    # Each branch is a subquery of its own, so that SQLite accepts its ORDER BY and LIMIT.
    parts = [
        select(*select(*columns).where(where).order_by(*CLAIM_ORDER).limit(limit).subquery().c)
        for where in branches
    ]
    due = union_all(*parts).subquery()
    return (
        select(due.c.source, due.c.subject)
        .order_by(due.c.priority, due.c.next_attempt_at, due.c.id)
        .limit(limit)
    )


# The claim reads these columns, in the order of the dataclasses' fields.
_LINKS: Any = Link.__table__
_DELIVERIES: Any = Delivery.__table__
_EVENTS: Any = Event.__table__
_LINK_COLUMNS = tuple(_LINKS.c[name] for name in ClaimedLink.__slots__)  # type: ignore[attr-defined]
_DELIVERY_COLUMNS = tuple(
    _DELIVERIES.c["event_pk" if name == "event" else name]
    for name in ClaimedDelivery.__slots__  # type: ignore[attr-defined]
)
_EVENT_COLUMNS = tuple(_EVENTS.c[name] for name in ClaimedEvent.__slots__)  # type: ignore[attr-defined]


@cache
def _new_links(dialect: str) -> Any:
    """Create the links of users that have none, already held: nobody else can hold them.

    Existing links are left as they are (``_free_links`` takes those). On PostgreSQL
    the users travel as arrays (one statement text for any batch).
    """
    statement: Any
    if dialect != "postgresql":
        statement = sqlite.insert(_LINKS).on_conflict_do_nothing(
            index_elements=["destination", "source", "subject"]
        )
    else:
        statement = postgresql.insert(_LINKS).from_select(
            ["destination", "source", "subject", "lease_token", "lease_expires_at"],
            select(
                bindparam("dest", type_=String()),
                func.unnest(bindparam("sources", type_=postgresql.ARRAY(String))),
                func.unnest(bindparam("subjects", type_=postgresql.ARRAY(String))),
                bindparam("token", type_=String()),
                bindparam("expires_at", type_=UTCDateTime()),
            ),
        )
        statement = statement.on_conflict_do_nothing(
            index_elements=["destination", "source", "subject"]
        )
    return statement.returning(*_LINK_COLUMNS)


def _users_parameters(dialect: str, users: list[tuple[str, str]]) -> dict[str, Any]:
    """The users as the claim's statements read them: pairs on SQLite, two arrays on
    PostgreSQL (one statement text for any batch, which psycopg prepares once)."""
    if dialect != "postgresql":
        return {"users": users}
    return {
        "sources": [source for source, _ in users],
        "subjects": [subject for _, subject in users],
    }


def _names(columns: Iterable[Any]) -> str:
    return ", ".join(column.name for column in columns)


# On PostgreSQL each held user's rows are found by a probe of their own: a LATERAL
# subquery per (source, subject) with equality on every column of the user's index.
# Conditions on the whole batch at once (``subject = ANY(...)``) leave the planner a
# choice it makes from statistics, and on tables filled since their last ANALYZE (a
# first backfill) it took "every row of the destination, then filter": a scan of
# every link or of the whole backlog for each claim. ``OFFSET 0`` (and the row lock
# in the links' subquery) keeps the planner from turning the probes back into one
# join. The ids found reach the UPDATE as one array, so the UPDATE probes the
# primary key; its own check on the status (a row another transaction finished since
# this statement's snapshot is left alone) is one no partial index answers, so that
# no plan trades those probes for a scan of every pending row.
_WANTED = (
    "unnest(CAST(:sources AS varchar[]), CAST(:subjects AS varchar[])) AS wanted (source, subject)"
)
_DUE = (
    "((candidate.status = 'pending' AND candidate.held IS NULL"
    " AND candidate.next_attempt_at <= :now)"
    " OR (candidate.status = 'in_progress' AND candidate.lease_expires_at < :now))"
)

_FREE_LINKS_ON_POSTGRESQL = text(
    f"""
UPDATE links SET lease_token = :token, lease_expires_at = :expires_at
WHERE links.id = ANY (ARRAY(
    SELECT found.id FROM {_WANTED}
    CROSS JOIN LATERAL (
        SELECT candidate.id FROM links AS candidate
        WHERE candidate.destination = :dest
          AND candidate.source = wanted.source AND candidate.subject = wanted.subject
          AND (candidate.lease_token IS NULL OR candidate.lease_expires_at < :now)
        FOR UPDATE SKIP LOCKED
    ) AS found
))
RETURNING {_names(_LINK_COLUMNS)}
"""  # noqa: S608 - the names are the table's own columns
).columns(*_LINK_COLUMNS)

_TAKE_DELIVERIES_ON_POSTGRESQL = text(
    f"""
UPDATE deliveries
SET reclaims = deliveries.reclaims + CASE WHEN deliveries.status = 'in_progress' THEN 1 ELSE 0 END,
    status = 'in_progress', lease_token = :token, lease_expires_at = :expires_at,
    updated_at = :now, task_id = :task
WHERE deliveries.id = ANY (ARRAY(
    SELECT due.id FROM {_WANTED}
    CROSS JOIN LATERAL (
        SELECT candidate.id FROM deliveries AS candidate
        WHERE candidate.destination = :dest
          AND candidate.source = wanted.source AND candidate.subject = wanted.subject
          AND {_DUE}
        OFFSET 0
    ) AS due
))
  AND deliveries.status IN ('pending', 'in_progress')
RETURNING {_names(_DELIVERY_COLUMNS)}
"""  # noqa: S608 - the names are the table's own columns
).columns(*_DELIVERY_COLUMNS)


@cache
def _free_links(dialect: str) -> Any:
    """Lease the existing links of the given users that nobody holds; their rows back.

    Locked rows are skipped (another worker is taking them).
    """
    if dialect == "postgresql":
        return _FREE_LINKS_ON_POSTGRESQL
    now = bindparam("now", type_=UTCDateTime())
    free = or_(_LINKS.c.lease_token.is_(None), _LINKS.c.lease_expires_at < now)
    users = tuple_(_LINKS.c.source, _LINKS.c.subject).in_(bindparam("users", expanding=True))
    locked = select(_LINKS.c.id).where(
        _LINKS.c.destination == bindparam("dest", type_=String()), users, free
    )
    return (
        update(_LINKS)
        .where(_LINKS.c.id.in_(locked.scalar_subquery()))
        .values(lease_token=bindparam("token"), lease_expires_at=bindparam("expires_at"))
        .returning(*_LINK_COLUMNS)
    )


@cache
def _take_deliveries(dialect: str) -> Any:
    """Mark the held users' due deliveries in progress under the lease; their state back."""
    if dialect == "postgresql":
        return _TAKE_DELIVERIES_ON_POSTGRESQL
    destination = bindparam("dest", type_=String())
    now = bindparam("now", type_=UTCDateTime())
    users = tuple_(_DELIVERIES.c.source, _DELIVERIES.c.subject).in_(
        bindparam("users", expanding=True)
    )
    return (
        update(_DELIVERIES)
        .where(_DELIVERIES.c.destination == destination, users, _due(destination, now))
        .values(
            reclaims=_DELIVERIES.c.reclaims
            + case((_DELIVERIES.c.status == DeliveryStatus.IN_PROGRESS, 1), else_=0),
            status=DeliveryStatus.IN_PROGRESS,
            lease_token=bindparam("token"),
            lease_expires_at=bindparam("expires_at"),
            updated_at=now,
            task_id=bindparam("task"),
        )
        .returning(*_DELIVERY_COLUMNS)
    )


@cache
def _events_of(dialect: str) -> Any:
    """The claimed deliveries' events by id: primary-key probes, whatever the statistics.

    A join in the UPDATE's statement would leave the choice to the planner, which on
    a table just filled and not yet analyzed may read every event, payloads and all.
    """
    if dialect != "postgresql":
        return select(*_EVENT_COLUMNS).where(_EVENTS.c.id.in_(bindparam("ids", expanding=True)))
    ids = bindparam("ids", type_=postgresql.ARRAY(BigInteger))
    return select(*_EVENT_COLUMNS).where(_EVENTS.c.id == any_(ids))


def _claimed(connection: Any, dialect: str, parameters: dict[str, Any]) -> list[ClaimedDelivery]:
    """Take the held users' due deliveries (``_take_deliveries``), each with its event."""
    rows = connection.execute(_take_deliveries(dialect), parameters).all()
    ids = list({row.event_pk for row in rows})
    # .all() fetches the rows at once; iterating a result fetches them one call at a time.
    events = {
        row.id: ClaimedEvent(*row)
        for row in connection.execute(_events_of(dialect), {"ids": ids}).all()
    }
    return [ClaimedDelivery(events[row.event_pk], *row[1:]) for row in rows]


def claim_due(
    *,
    session: Session,
    destination: str,
    max_users: int,
    lease: timedelta,
    max_reclaims: int,
    task_id: str | None = None,
) -> Claim:
    """Take up to ``max_users`` users with due work, each with all its due deliveries.

    A user is held by a lease on its link row; a held user is skipped, so two
    workers never work on one user at once. The lease comes from the database's
    clock and expires by itself if the worker dies.

    The statements run on the connection (Core) and their rows become plain
    dataclasses, not ORM objects: a claim costs a handful of short statements and
    no identity-map bookkeeping, whatever the depth of the backlog.
    """
    connection = session.connection()
    dialect = connection.dialect.name
    now = db_now(session)
    token = str(uuid.uuid4())
    expires_at = now + lease
    candidates = connection.execute(
        _candidates(), {"dest": destination, "now": now, "limit": max_users * 4}
    ).all()
    users = list(dict.fromkeys((row.source, row.subject) for row in candidates))[:max_users]
    if not users:
        return Claim(token=token, now=now, expires_at=expires_at, users=[])
    lease_values = {"dest": destination, "token": token, "expires_at": expires_at}
    # Existing links first: after a first pass every user has one, and the INSERT of
    # missing links is left out. A user whose link another worker holds (or creates
    # meanwhile) is in neither result, and so is skipped by this claim.
    free = connection.execute(
        _free_links(dialect), {**lease_values, "now": now, **_users_parameters(dialect, users)}
    ).all()
    found = {(row.source, row.subject) for row in free}
    created = _create_links(connection, dialect, lease_values, [u for u in users if u not in found])
    rank = {user: index for index, user in enumerate(users)}
    links = sorted(
        (ClaimedLink(*row) for row in [*created, *free]),
        key=lambda link: rank[(link.source, link.subject)],
    )
    if not links:
        return Claim(token=token, now=now, expires_at=expires_at, users=[])
    held = [(link.source, link.subject) for link in links]
    taken = {**lease_values, "now": now, "task": task_id, **_users_parameters(dialect, held)}
    claimed = _claimed(connection, dialect, taken)
    return Claim(
        token=token,
        now=now,
        expires_at=expires_at,
        users=_group_by_user(links, claimed, max_reclaims),
    )


def _create_links(
    connection: Any, dialect: str, lease_values: dict[str, Any], users: list[tuple[str, str]]
) -> list[Any]:
    """Create the links of ``users`` that have none, held by this claim; their rows back.

    Users whose link exists (held by another worker, or created by one a moment ago)
    are left out of the result.
    """
    if not users:
        return []
    if dialect == "postgresql":
        sources, subjects = (list(column) for column in zip(*users, strict=True))
        parameters: Any = {**lease_values, "sources": sources, "subjects": subjects}
    else:
        parameters = [
            {
                "destination": lease_values["dest"],
                "source": source,
                "subject": subject,
                "lease_token": lease_values["token"],
                "lease_expires_at": lease_values["expires_at"],
            }
            for source, subject in users
        ]
    return connection.execute(_new_links(dialect), parameters).all()


def _group_by_user(
    links: Iterable[ClaimedLink], claimed: Iterable[ClaimedDelivery], max_reclaims: int
) -> list[UserWork]:
    by_user: dict[tuple[str, str], UserWork] = {
        (link.source, link.subject): UserWork(link=link, deliveries=[]) for link in links
    }
    for delivery in claimed:
        work = by_user[(delivery.source, delivery.subject)]
        if delivery.reclaims > max_reclaims:
            work.lost.append(delivery)
        else:
            work.deliveries.append(delivery)
    for work in by_user.values():
        work.deliveries.sort(key=work.key_of)
    return list(by_user.values())


def still_held(*, session: Session, link_ids: Iterable[int], token: str) -> set[int]:
    """Lock the links ``token`` still holds; the others were lost to an expired lease."""
    ids = list(link_ids)
    if not ids:
        return set()
    connection = session.connection()
    dialect = connection.dialect.name
    rows = connection.execute(_still_held(dialect), {"ids": ids, "token": token}).scalars()
    return set(rows)


@cache
def _still_held(dialect: str) -> Any:
    ids = _ids_parameter(dialect, "ids")
    chosen = _LINKS.c.id == any_(ids) if dialect == "postgresql" else _LINKS.c.id.in_(ids)
    token = bindparam("token", type_=String())
    return select(_LINKS.c.id).where(chosen, _LINKS.c.lease_token == token).with_for_update()


def _ids_parameter(dialect: str, name: str, type_: Any = BigInteger) -> Any:
    """A list parameter: one array on PostgreSQL (one statement text for any length,
    prepared once), an expanding IN elsewhere."""
    if dialect == "postgresql":
        return bindparam(name, type_=postgresql.ARRAY(type_))
    return bindparam(name, expanding=True)


def live_contacts_of_others(
    *, session: Session, destination: str, contact_ids: Iterable[str], link_ids: Iterable[int]
) -> set[str]:
    """Those of ``contact_ids`` that a live link outside ``link_ids`` holds.

    The contacts are looked up in the unique index of live links, a probe each: the
    cost is the batch's, not the number of links the destination has.
    """
    ids = list(set(contact_ids))
    if not ids:
        return set()
    connection = session.connection()
    dialect = connection.dialect.name
    parameters = {"dest": destination, "contacts": ids, "links": list(link_ids)}
    rows = connection.execute(_live_contacts(dialect), parameters).scalars()
    return {row for row in rows if row is not None}


# Each contact is one probe of the unique index of live links (a LATERAL subquery per
# contact): a plan that reads the destination's live links and filters them, which the
# planner picks for ``external_id = ANY(...)`` when its statistics still say the index
# is small, would cost the number of links, not the batch.
_LIVE_CONTACTS_ON_POSTGRESQL = text(
    """
SELECT found.external_id
FROM unnest(CAST(:contacts AS varchar[])) AS wanted (id)
CROSS JOIN LATERAL (
    SELECT links.external_id FROM links
    WHERE links.destination = :dest AND links.external_id = wanted.id
      AND links.external_id IS NOT NULL AND NOT links.deprovisioned
      AND links.id <> ALL (CAST(:links AS bigint[]))
    LIMIT 1
) AS found
"""
)


@cache
def _live_contacts(dialect: str) -> Any:
    if dialect == "postgresql":
        return _LIVE_CONTACTS_ON_POSTGRESQL
    return select(_LINKS.c.external_id).where(
        _LINKS.c.destination == bindparam("dest"),
        _LINKS.c.external_id.in_(bindparam("contacts", expanding=True)),
        ~_LINKS.c.deprovisioned,
        _LINKS.c.id.not_in(bindparam("links", expanding=True)),
    )


def hold_contact(*, session: Session, link_id: int, token: str, external_id: str) -> bool:
    """Point a held link at ``external_id`` unless another user's live link holds it.

    The unique index on live links decides, so two workers adopting one contact
    at once cannot both win: the loser's savepoint rolls back and it gets False.
    False too when ``token`` no longer holds the link (nothing may be written then).
    """
    try:
        with session.begin_nested():
            changed = session.execute(
                update(Link)
                .where(Link.id == link_id, Link.lease_token == token)
                .values(external_id=external_id, deprovisioned=False)
            ).rowcount  # type: ignore[attr-defined]
    except IntegrityError:
        return False
    return bool(changed)


def flag_conflict(
    *, session: Session, destination: str, link_ids: Iterable[int], external_id: str, note: str
) -> None:
    """Flag ``link_ids`` and the live link holding ``external_id``: two users share a record.

    The flag is its own column, written without the hold, so a worker that holds
    the other link cannot overwrite it with what it read at its claim.
    """
    session.execute(
        update(Link)
        .where(
            Link.destination == destination,
            or_(
                Link.id.in_(list(link_ids)),
                and_(Link.external_id == external_id, ~Link.deprovisioned),
            ),
        )
        .values(conflict=note)
        .execution_options(synchronize_session=False)
    )


def give_back_reclaims(*, session: Session, delivery_ids: Iterable[int], token: str) -> None:
    """Undo the reclaim count of deliveries another worker took while ``token`` was alive.

    A slow destination made the lease run out, not a crash: such a reclaim must
    not count toward ``worker_lost``.
    """
    ids = list(delivery_ids)
    if ids:
        session.execute(
            update(Delivery)
            .where(
                Delivery.id.in_(ids),
                Delivery.reclaims > 0,
                or_(Delivery.lease_token.is_(None), Delivery.lease_token != token),
            )
            .values(reclaims=Delivery.reclaims - 1)
            .execution_options(synchronize_session=False)
        )


def reopen_unsettled(*, session: Session, destination: str, limit: int = 500) -> int:
    """Queue a verification for users whose uncertain window has passed.

    A write with an unknown outcome can land until ``links.uncertain_until``.
    Once that has passed, the user's newest succeeded delivery goes back to
    pending with ``force``; the worker reads the record back and re-sends only
    what differs. Users with work on its way are left to that work; a user with
    nothing to send again is simply settled. Safe to run twice.
    """
    now = db_now(session)
    links = session.execute(
        select(Link.id, Link.source, Link.subject)
        .where(
            Link.destination == destination,
            Link.uncertain_until <= now,
            or_(Link.lease_token.is_(None), Link.lease_expires_at < now),
        )
        .limit(limit)
    ).all()
    reopened = 0
    for link_id, source, subject in links:
        theirs = session.scalars(
            select(Delivery)
            .where(
                Delivery.destination == destination,
                Delivery.source == source,
                Delivery.subject == subject,
            )
            .options(selectinload(Delivery.event))
        ).all()
        if any(d.status in (DeliveryStatus.PENDING, DeliveryStatus.IN_PROGRESS) for d in theirs):
            continue
        applied = [d for d in theirs if d.status is DeliveryStatus.SUCCEEDED and d.event.payload]
        if not applied:
            session.execute(update(Link).where(Link.id == link_id).values(uncertain_until=None))
            continue
        newest = max(applied, key=lambda d: event_order_key(d.event))
        session.execute(
            update(Delivery)
            .where(Delivery.id == newest.id, Delivery.status == DeliveryStatus.SUCCEEDED)
            .values(
                status=DeliveryStatus.PENDING,
                force=True,
                reason=None,
                next_attempt_at=now,
                finished_at=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        reopened += 1
    return reopened


LINK_STATE = (
    "last_order_key",
    "external_id",
    "created_contact",
    "properties_hash",
    "last_email",
    "deprovisioned",
    "uncertain_until",
)
DELIVERY_STATE = (
    "status",
    "reason",
    "attempts",
    "next_attempt_at",
    "last_error",
    "last_status_code",
    "external_id",
    "finished_at",
    "force",
)


def _many(table: Any, columns: tuple[str, ...], token: str, now: datetime) -> Any:
    """UPDATE one row per parameter set, releasing ``token``'s hold as it writes."""
    return (
        update(table)
        .where(table.c.id == bindparam("row_id"), table.c.lease_token == token)
        .values(
            lease_token=None,
            lease_expires_at=None,
            updated_at=now,
            **{column: bindparam(f"new_{column}") for column in columns},
        )
    )


@cache
def _many_from_json(table: Any, columns: tuple[str, ...]) -> Any:
    """``_many`` as one statement on PostgreSQL: the rows travel as one JSON array.

    One UPDATE joined to ``jsonb_to_recordset`` of the rows, each row found by its
    primary key, instead of one statement per row: the server plans and runs it once
    for a batch. One JSON document is encoded in C; arrays of Python values would be
    adapted element by element (a sixth of a worker's CPU when it was arrays).
    """
    dialect = postgresql.dialect()
    types = ", ".join(
        f"{column} {table.c[column].type.compile(dialect=dialect)}" for column in columns
    )
    assignments = ", ".join(f"{column} = new.{column}" for column in columns)
    # The names are the table's own columns, not input: nothing here comes from outside.
    return text(
        f"UPDATE {table.name} SET lease_token = NULL, lease_expires_at = NULL, "  # noqa: S608
        f"updated_at = :now, {assignments} "
        f"FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS new (id bigint, {types}) "
        f"WHERE {table.name}.id = new.id AND {table.name}.lease_token = :token"
    )


def _json_value(value: Any) -> Any:
    """A row value JSON cannot hold as it is: a time as ISO 8601 with its offset."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; attach a time zone")
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} into a row")


def _write_many(
    session: Session,
    table: Any,
    columns: tuple[str, ...],
    token: str,
    now: datetime,
    rows: list[dict[str, Any]],
) -> None:
    """Write ``columns`` of ``rows`` (each with its ``id``) and release ``token``'s hold."""
    if not rows:
        return
    if session.get_bind().dialect.name != "postgresql":
        session.execute(_many(table, columns, token, now), [_params(row, columns) for row in rows])
        return
    # Each row is a dict of its columns and more: the recordset reads only the named ones.
    # Statuses are StrEnums, which JSON writes as their values.
    document = json.dumps(rows, default=_json_value)
    session.execute(_many_from_json(table, columns), {"rows": document, "token": token, "now": now})


def write_links(*, session: Session, token: str, now: datetime, rows: list[dict[str, Any]]) -> None:
    """Write the new state of held links and release them: one statement, many rows.

    Each row has ``id`` and every field of ``LINK_STATE``; the caller has locked
    the rows with ``still_held``, so the compare-and-set on the token holds.
    """
    _write_many(session, Link.__table__, LINK_STATE, token, now, rows)


def write_deliveries(
    *, session: Session, token: str, now: datetime, rows: list[dict[str, Any]]
) -> None:
    """Write the new state of claimed deliveries: one statement, many rows."""
    _write_many(session, Delivery.__table__, DELIVERY_STATE, token, now, rows)


def _params(row: dict[str, Any], columns: tuple[str, ...]) -> dict[str, Any]:
    return {"row_id": row["id"], **{f"new_{column}": row[column] for column in columns}}


# Sweep and pauses


def has_due_work(*, session: Session, destination: str) -> bool:
    """Whether any delivery of ``destination`` is due or orphaned right now."""
    now = db_now(session)
    parameters = {"dest": destination, "now": now, "limit": 1}
    return session.connection().execute(_candidates(), parameters).first() is not None


def destination_state(*, session: Session, name: str) -> DestinationState | None:
    """The stored pause state of a destination, if any was ever written."""
    return session.get(DestinationState, name)


def set_paused(
    *,
    session: Session,
    name: str,
    paused: bool,
    reason: str | None,
    by: str,
    probe_after: timedelta | None = None,
) -> None:
    """Pause or resume a destination; a paused one is probed again after ``probe_after``."""
    now = db_now(session)
    # Two workers may pause at once: create the row race-free, then lock it.
    session.execute(
        _insert(session, DestinationState)
        .values(name=name)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    state = session.get(DestinationState, name, with_for_update=True, populate_existing=True)
    assert state is not None
    if by == "auto" and state.paused and state.paused_by == "operator":
        return  # an operator's pause is only lifted by an operator
    state.paused = paused
    state.paused_reason = reason if paused else None
    state.paused_by = by if paused else None
    state.paused_at = now if paused else None
    state.next_probe_at = now + probe_after if paused and probe_after else None
    session.flush()
