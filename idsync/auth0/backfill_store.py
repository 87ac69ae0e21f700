"""Storing many events at once: the rows ``models.outbox.record_event`` writes, set-based.

A backfill stores a whole tenant's users, 100,000 or more. One transaction per
event would take minutes, so events are stored a chunk at a time, as the same
rows ``record_event`` writes (events unique on (source, id), one pending
delivery per destination for accepted ones), with INSERT ... ON CONFLICT DO
NOTHING: a repeated event stores nothing, and a run repeated after an
interruption stores only the rest.

On PostgreSQL a chunk is copied (``COPY``) into a temporary table and moved into
``events`` and ``deliveries`` by one statement; a multi-row INSERT with one
parameter per value spends most of its time in the driver parsing a very long
query. Other databases (the embedded SQLite) take the portable multi-row INSERT.
Like every outbox operation, these take the session and never commit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.outbox import NewEvent
from models.tables import Delivery, DeliveryStatus, Event, EventStatus

# Per connection; emptied at every commit, so a chunk never sees another's rows.
STAGE = "idsync_event_stage"
_CREATE_STAGE = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {STAGE} (
    source text NOT NULL,
    event_id text NOT NULL,
    type text NOT NULL,
    subject text,
    event_time timestamptz NOT NULL,
    object_updated_at timestamptz,
    status text NOT NULL,
    ignore_reason text,
    body_sha256 text NOT NULL,
    payload jsonb,
    received_via text NOT NULL
) ON COMMIT DELETE ROWS
"""
_COLUMNS = (
    "source, event_id, type, subject, event_time, object_updated_at, status, "
    "ignore_reason, body_sha256, payload, received_via"
)
# The new events, then a delivery per destination for each accepted one (and, with
# existing_too, for each accepted event stored before); counted by destination.
# The join on events sees the table as it was before this statement: the new rows
# come from the INSERT's RETURNING instead.
# Table and column names are constants; every value is a parameter.
_MOVE = f"""
WITH new AS (
    INSERT INTO events ({_COLUMNS})
    SELECT {_COLUMNS} FROM {STAGE}
    ON CONFLICT (source, event_id) DO NOTHING
    RETURNING id, source, subject, status
), targets AS (
    SELECT id, source, subject FROM new WHERE status = 'accepted'
    UNION ALL
    SELECT e.id, e.source, e.subject
    FROM events e JOIN (SELECT DISTINCT source, event_id FROM {STAGE}) s
      ON e.source = s.source AND e.event_id = s.event_id
    WHERE %(existing_too)s AND e.status = 'accepted'
), added AS (
    INSERT INTO deliveries (event_pk, destination, source, subject, status, priority)
    SELECT t.id, d.name, t.source, t.subject, 'pending', %(priority)s
    FROM targets t CROSS JOIN unnest(%(destinations)s::text[]) AS d(name)
    ON CONFLICT (event_pk, destination) DO NOTHING
    RETURNING destination
)
SELECT NULL AS destination, count(*) AS n FROM new
UNION ALL
SELECT destination, count(*) FROM added GROUP BY destination
"""  # noqa: S608 - constant names, values are parameters


@dataclass(frozen=True)
class RecordedMany:
    """What storing a set of events did: new events, ones already stored, deliveries added."""

    stored: int
    existing: int
    deliveries: dict[str, int]  # destination -> deliveries added


def record_events(
    *,
    session: Session,
    events: Sequence[NewEvent],
    destinations: Sequence[str],
    received_via: str,
    priority: int = 0,
    existing_too: bool = False,
) -> RecordedMany:
    """Store ``events`` as ``record_event`` stores one, in a few statements.

    Accepted events get one pending delivery per destination, at ``priority``
    (0 live, 1 behind live traffic). With ``existing_too``, accepted events that
    were already stored get a delivery for each of ``destinations`` they lack
    (a destination added after them).
    """
    if not events:
        return RecordedMany(stored=0, existing=0, deliveries=dict.fromkeys(destinations, 0))
    unique = len({(event.source, event.event_id) for event in events})
    if session.get_bind().dialect.name == "postgresql":
        stored, added = _copy_and_move(
            session, events, destinations, received_via, priority, existing_too
        )
    else:
        stored, added = _insert_many(
            session, events, destinations, received_via, priority, existing_too
        )
    return RecordedMany(stored=stored, existing=unique - stored, deliveries=added)


def _row(event: NewEvent, received_via: str) -> dict[str, Any]:
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
        "payload": event.payload,
        "received_via": received_via,
    }


def _copy_and_move(
    session: Session,
    events: Sequence[NewEvent],
    destinations: Sequence[str],
    received_via: str,
    priority: int,
    existing_too: bool,
) -> tuple[int, dict[str, int]]:
    """PostgreSQL: COPY the chunk into the stage, then one statement moves it."""
    driver = session.connection().connection.driver_connection
    with driver.cursor() as cursor:  # type: ignore[union-attr]
        cursor.execute(_CREATE_STAGE)
        with cursor.copy(f"COPY {STAGE} ({_COLUMNS}) FROM STDIN") as copy:
            for event in events:
                row = _row(event, received_via)
                row["payload"] = None if event.payload is None else json.dumps(event.payload)
                copy.write_row(tuple(row.values()))
        cursor.execute(
            _MOVE,
            {
                "existing_too": existing_too,
                "priority": priority,
                "destinations": list(destinations),
            },
        )
        counts = cursor.fetchall()
        # The next chunk of this transaction (a caller may store several) starts empty.
        cursor.execute(f"TRUNCATE {STAGE}")
    stored = next(int(n) for name, n in counts if name is None)
    added = dict.fromkeys(destinations, 0) | {name: int(n) for name, n in counts if name}
    return stored, added


def _insert_many(
    session: Session,
    events: Sequence[NewEvent],
    destinations: Sequence[str],
    received_via: str,
    priority: int,
    existing_too: bool,
) -> tuple[int, dict[str, int]]:
    """Any other database: a multi-row INSERT per table."""
    module = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    table = Event.__table__
    inserted = session.execute(
        module.insert(table)
        .on_conflict_do_nothing(index_elements=["source", "event_id"])
        .returning(table.c.id, table.c.source, table.c.event_id),
        [_row(event, received_via) for event in events],
    ).all()
    new = {(row.source, row.event_id): row.id for row in inserted}
    accepted = {(e.source, e.event_id): e for e in events if e.status is EventStatus.ACCEPTED}
    targets = {key: pk for key, pk in new.items() if key in accepted}
    if existing_too:
        targets |= _stored_ids(session, [key for key in accepted if key not in new])
    rows = [
        {
            "event_pk": pk,
            "destination": name,
            "source": key[0],
            "subject": accepted[key].subject,
            "status": DeliveryStatus.PENDING,
            "priority": priority,
        }
        for key, pk in targets.items()
        for name in destinations
    ]
    added = dict.fromkeys(destinations, 0)
    if rows:
        deliveries = Delivery.__table__
        created = session.execute(
            module.insert(deliveries)
            .on_conflict_do_nothing(index_elements=["event_pk", "destination"])
            .returning(deliveries.c.destination),
            rows,
        ).scalars()
        for name in created:
            added[name] += 1
    return len(new), added


def _stored_ids(session: Session, keys: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The primary keys of stored events by (source, event id)."""
    if not keys:
        return {}
    rows = session.execute(
        select(Event.id, Event.source, Event.event_id).where(
            tuple_(Event.source, Event.event_id).in_(keys)
        )
    ).all()
    return {(row.source, row.event_id): row.id for row in rows}
