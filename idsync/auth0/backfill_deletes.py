"""Deletes a backfill recovers: users idsync knows that a full export no longer holds.

Auth0 produces no events while a stream is disabled, and a user deleted in that
period is simply missing from the next export. So after a full export (every
connection) is stored, the users that idsync knows under the stream's source,
whose newest stored event is not a delete and who are absent from the export,
get a ``user.deleted`` event each, stored like the backfilled users
(``received_via=backfill``, behind live traffic):

- its time is the moment the export job was created, so any event newer than
  the export wins by the normal order rule, and a user whose newest stored
  event is newer than that (created after the export started, say) is not
  considered at all;
- its id is ``bfdel_`` and a digest of (``user_id``, the export's start), so
  storing the same export twice stores nothing new; a later export finds the
  user's newest event is that delete and leaves it alone;
- its ``data.object`` holds the ``user_id`` and ``idsync_absent_from_export``
  (the export's start) with ``idsync_export_job``, so an operator can tell it
  from a delete Auth0 sent.

What it guarantees: absence is decided in SQL, never in Python memory. The
export's user ids go, chunk by chunk, into a temporary table on a connection of
the backfill's own (``COPY`` on PostgreSQL, a multi-row INSERT elsewhere); one
statement then writes the absent users into a second temporary table, which is
read back a chunk at a time. Memory stays constant whatever the export's size.
A line of the export that names no readable ``user_id`` makes absence
unknowable: then nothing is deleted. An export of one connection says nothing
about the others, so the caller checks absence only after a full export.

Deprovisions count against ``DEPROVISION_GUARD`` at the worker like any other,
so an export that came back short (thousands absent) is held for approval.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    MetaData,
    Table,
    Text,
    case,
    exists,
    func,
    insert,
    or_,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, sessionmaker

from ingest.validation import to_new_event
from models.outbox import NewEvent
from models.tables import Event, EventStatus, Link

DELETED_TYPE = "user.deleted"
# The types whose newest one says whether idsync holds the user as live.
USER_TYPES = ("user.created", "user.updated", "user.backfill", DELETED_TYPE)
ABSENT_MARK = "idsync_absent_from_export"
JOB_MARK = "idsync_export_job"

# Temporary tables, one pair per connection: the export's user ids and the absent users.
# They are created by the DDL below; the Table objects only build the queries.
_temporary = MetaData()
EXPORTED = Table("idsync_exported_users", _temporary, Column("user_id", Text, nullable=False))
ABSENT = Table("idsync_absent_users", _temporary, Column("subject", Text, primary_key=True))
_CREATE = (
    f"CREATE TEMPORARY TABLE {EXPORTED.name} (user_id text NOT NULL)",
    f"CREATE TEMPORARY TABLE {ABSENT.name} (subject text PRIMARY KEY)",
)
_DROP = tuple(f"DROP TABLE IF EXISTS {table.name}" for table in (EXPORTED, ABSENT))
# Built once the ids are in (cheaper than keeping it up to date through every COPY). The
# anti-join needs it whatever the planner believes: right after a large backfill the
# statistics of events are stale, and without an index a nested loop over both tables
# costs users x users comparisons (minutes at 100,000).
_INDEX = f"CREATE INDEX IF NOT EXISTS {EXPORTED.name}_user_id ON {EXPORTED.name} (user_id)"


@dataclass(frozen=True)
class ExportScope:
    """The export a backfill reads: its job and the moment Auth0 created it."""

    job_id: str
    started_at: datetime


def absent_event_id(user_id: str, started_at: datetime) -> str:
    """``bfdel_`` and a digest of (user_id, the export's start): one id per user and export."""
    moment = started_at.astimezone(UTC).isoformat(timespec="microseconds")
    text = f"deleted\n{user_id}\n{moment}"
    return f"bfdel_{hashlib.sha256(text.encode(errors='surrogatepass')).hexdigest()[:40]}"


def rfc3339(moment: datetime) -> str:
    """``moment`` in UTC as Auth0 writes times, with microseconds."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def absent_event(
    user_id: str, *, scope: ExportScope, source: str, stream_id: str | None
) -> NewEvent:
    """The ``user.deleted`` of a user the export did not hold, validated like a live one."""
    stamp = rfc3339(scope.started_at)
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": absent_event_id(user_id, scope.started_at),
        "type": DELETED_TYPE,
        "source": source,
        "time": stamp,
        "data": {"object": {"user_id": user_id, ABSENT_MARK: stamp, JOB_MARK: scope.job_id}},
    }
    if stream_id:
        document["a0stream"] = stream_id
    return to_new_event(document, json.dumps(document).encode())


def is_synthesised(payload: dict[str, Any] | None) -> bool:
    """Whether a stored event is a delete made from an export's absence, not sent by Auth0."""
    data = (payload or {}).get("data") or {}
    return ABSENT_MARK in (data.get("object") or {})


class ExportRoster:
    """The user ids of one export, in a temporary table on a connection of its own.

    Ids are added chunk by chunk as the export streams, each chunk committed so
    that later statements see the events other connections stored meanwhile.
    ``find_absent`` decides absence in one statement; ``absent_chunks`` reads
    the result back a chunk at a time. ``close`` drops both tables, so the
    connection goes back to the pool clean.
    """

    def __init__(self, engine: Engine) -> None:
        self.connection: Connection = engine.connect()
        self.unidentified = 0  # lines of the export that name no readable user_id
        self.users = 0
        try:
            for statement in _DROP + _CREATE:
                self.connection.exec_driver_sql(statement)
            self.connection.commit()
        except BaseException:
            self.connection.close()
            raise

    @classmethod
    def of(cls, sessions: sessionmaker[Session]) -> ExportRoster:
        """A roster on a new connection of the engine ``sessions`` are bound to."""
        engine = sessions.kw["bind"]
        assert isinstance(engine, Engine)
        return cls(engine)

    def close(self) -> None:
        """Drop the temporary tables and give the connection back."""
        try:
            self.connection.rollback()
            for statement in _DROP:
                self.connection.exec_driver_sql(statement)
            self.connection.commit()
        finally:
            self.connection.close()

    def add(self, user_ids: Sequence[str], unidentified: int = 0) -> None:
        """Note ``user_ids`` as held by the export, and lines that name nobody."""
        self.unidentified += unidentified
        self.users += len(user_ids)
        if not user_ids:
            return
        if self.connection.dialect.name == "postgresql":
            if not self.connection.in_transaction():
                self.connection.begin()
            driver = self.connection.connection.driver_connection
            statement = f"COPY {EXPORTED.name} (user_id) FROM STDIN"
            with driver.cursor() as cursor, cursor.copy(statement) as copy:  # type: ignore[union-attr]
                for user_id in user_ids:
                    copy.write_row((user_id,))
        else:
            self.connection.execute(insert(EXPORTED), [{"user_id": uid} for uid in user_ids])
        self.connection.commit()

    def find_absent(self, *, source: str, before: datetime) -> int:
        """Write the absent users into the second table; how many they are.

        Absent: a subject of accepted user events under ``source``, not in the
        export, whose newest stored event is not a delete (a delete at the same
        time as the newest other event counts as newest) and is older than
        ``before``, the export's start.
        """
        self.connection.exec_driver_sql(_INDEX)
        if self.connection.dialect.name == "postgresql":
            # Temporary tables are never analysed by autovacuum; the planner needs the size.
            self.connection.exec_driver_sql(f"ANALYZE {EXPORTED.name}")
        deleted = Event.type == DELETED_TYPE
        newest_delete = func.max(case((deleted, Event.event_time)))
        newest_other = func.max(case((~deleted, Event.event_time)))
        known = (
            select(Event.subject)
            .where(
                Event.source == source,
                Event.status == EventStatus.ACCEPTED,
                Event.subject.is_not(None),
                Event.type.in_(USER_TYPES),
                ~exists().where(EXPORTED.c.user_id == Event.subject),
            )
            .group_by(Event.subject)
            .having(
                func.max(Event.event_time) < before,
                or_(newest_delete.is_(None), newest_other > newest_delete),
            )
        )
        self.connection.execute(ABSENT.delete())
        self.connection.execute(insert(ABSENT).from_select(["subject"], known))
        absent = self.connection.scalar(select(func.count()).select_from(ABSENT))
        self.connection.commit()
        return int(absent or 0)

    def absent_chunks(self, size: int) -> Iterator[list[str]]:
        """The absent users, in order, ``size`` at a time."""
        after = ""
        while True:
            chunk = list(
                self.connection.scalars(
                    select(ABSENT.c.subject)
                    .where(ABSENT.c.subject > after)
                    .order_by(ABSENT.c.subject)
                    .limit(size)
                )
            )
            self.connection.commit()
            if not chunk:
                return
            yield chunk
            after = chunk[-1]

    def live_links(self, *, source: str, destinations: Sequence[str]) -> dict[str, int]:
        """Per destination, the absent users with a live link there: who a delete deprovisions."""
        rows = self.connection.execute(
            select(Link.destination, func.count())
            .join(ABSENT, ABSENT.c.subject == Link.subject)
            .where(
                Link.source == source,
                Link.destination.in_(destinations),
                Link.external_id.is_not(None),
                ~Link.deprovisioned,
            )
            .group_by(Link.destination)
        ).all()
        self.connection.commit()
        return dict.fromkeys(destinations, 0) | {str(name): int(n) for name, n in rows}


@dataclass
class AbsentReport:
    """What a backfill found of users known to idsync but absent from a full export."""

    checked: bool = False
    note: str | None = None  # why absence was not checked
    export_started_at: datetime | None = None
    absent: int = 0  # users found absent
    stored: int = 0  # their user.deleted events, new
    existing: int = 0  # ... stored before (the same export stored twice)
    deliveries: dict[str, int] = field(default_factory=dict)  # added, by destination
    # Per destination, the absent users with a live link there: whom a delete deprovisions.
    deprovisioned: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        started = self.export_started_at
        return {
            "checked": self.checked,
            "note": self.note,
            "export_started_at": rfc3339(started) if started else None,
            "absent": self.absent,
            "stored": self.stored,
            "existing": self.existing,
            "deliveries": self.deliveries,
            "deprovisioned": self.deprovisioned,
        }
