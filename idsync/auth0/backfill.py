"""Backfill: every existing Auth0 user as one ``user.backfill`` event, through the outbox.

A company that installs idsync already has users who will send no event until
they change. Backfill asks Auth0 for a user export (``POST /api/v2/jobs/users-exports``,
format json), waits for the job, streams the NDJSON file (gzip or not: the first
two bytes decide) and stores each user as an event that the workers treat like
``user.updated``:

- its time is the user's ``updated_at``, so a live event newer than the export
  wins by the normal order rule, and an older one loses;
- its id is derived from (``user_id``, ``updated_at``), so a second backfill of
  unchanged users stores nothing new;
- its ``source`` is the stream's own (``AUTH0_EVENT_SOURCE``), so backfilled and
  live events of a user share one link per destination.

A full export (no connection chosen) also recovers deletes: users idsync knows
that the export no longer holds get a ``user.deleted`` each, dated at the export
job's creation (``idsync.auth0.backfill_deletes``).

Users are stored set-based (``models.outbox.record_events``) in chunks of a few
thousand, each chunk its own transaction: memory stays constant whatever the
size of the export, and a run that is interrupted stores only the rest when run
again. Backfill deliveries are claimed after live traffic (``BACKFILL_PRIORITY``).

The Management API facts are in ``shared/reference/auth0-management.md`` and in
Auth0's "Bulk User Exports" page:
https://auth0.com/docs/manage-users/user-migration/bulk-user-exports
"""

from __future__ import annotations

import hashlib
import itertools
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from idsync.auth0.backfill_deletes import (
    AbsentReport,
    ExportRoster,
    ExportScope,
    absent_event,
)
from idsync.auth0.backfill_store import RecordedMany, record_events
from idsync.destinations import build_adapter
from idsync.settings import Settings
from ingest.validation import InvalidEvent, NotJson, parse_json, to_new_event
from models.db import db_now, transaction
from models.ordering import TimeOutOfRange, order_key, parse_time
from models.outbox import NewEvent
from models.tables import Delivery, Event, EventStatus, Link, ReceivedVia
from workers.destinations.base import Intent, LinkState, UserState

BACKFILL_TYPE = "user.backfill"
# Live traffic (0) is claimed first; a backfill waits behind it, as an operator's replay does.
BACKFILL_PRIORITY = 1
CHUNK_USERS = 2000
GZIP_MAGIC = b"\x1f\x8b"
# A line longer than this is not a user: stop rather than hold it in memory.
MAX_LINE_BYTES = 1 << 20
# The largest piece of decompressed text produced at once, so a small gzip that
# inflates hugely never sits in memory whole.
INFLATE_PIECE = 1 << 20
# Root fields of an Auth0 user that every export holds, beside the fields that the
# destinations map. A mapped field missing from the export would reach a destination
# as absent, which clears it there (HubSpot with "", webhooks with null), so the
# export errs on the side of the profile's usual fields.
BASE_FIELDS = (
    "user_id",
    "email",
    "email_verified",
    "username",
    "phone_number",
    "phone_verified",
    "given_name",
    "family_name",
    "name",
    "nickname",
    "picture",
    "created_at",
    "updated_at",
    "blocked",
    "app_metadata",
    "user_metadata",
)
MAX_REJECTIONS_KEPT = 20


class BackfillError(Exception):
    """Backfill cannot run or cannot go on; the message says why and what to do."""


class ExportClient(Protocol):
    """The parts of ``idsync.auth0.client.ManagementClient`` a backfill uses."""

    def start_users_export(self, fields: list[str], connection_id: str | None) -> str: ...

    def get_job(self, job_id: str) -> dict[str, Any]: ...

    def download(self, location: str) -> Iterator[bytes]: ...


class Progress(Protocol):
    """Where a backfill reports how far it got (the CLI draws progress bars)."""

    def job(self, status: str, percent: int | None, seconds_left: int | None) -> None: ...

    def users(self, read: int) -> None: ...


class _Silent:
    def job(self, status: str, percent: int | None, seconds_left: int | None) -> None:
        """Nothing to show."""

    def users(self, read: int) -> None:
        """Nothing to show."""


# The export job


def export_fields(settings: Settings, destinations: Sequence[str]) -> list[str]:
    """The root fields to export: ``BASE_FIELDS`` and each destination's mapped fields.

    A dotted field (``app_metadata.plan``) is exported through its root, which the
    JSON format exports whole.
    """
    fields = dict.fromkeys(BASE_FIELDS)
    for name in destinations:
        mapping = _mapping(settings, name)
        fields |= dict.fromkeys(source.split(".", 1)[0] for source in mapping)
    return list(fields)


def _mapping(settings: Settings, name: str) -> dict[str, str]:
    """Destination ``name``'s property map (Auth0 field -> its name), read by its adapter."""
    adapter = _adapter(settings, name)
    try:
        mapping = getattr(adapter, "mapping", None)
        if not isinstance(mapping, dict):
            raise BackfillError(
                f"destination {name!r} does not say which Auth0 fields it maps, so an "
                "export could clear some of them there; leave it out with --destination"
            )
        return mapping
    finally:
        adapter.close()


class _NoCalls:
    """A limiter for an adapter that is only asked how it maps, never to send."""

    def acquire(self, timeout: float) -> None:
        raise RuntimeError("a backfill never sends to a destination itself")

    def block_for(self, seconds: float) -> None:
        """Nothing is ever sent."""

    def wait_for_capacity(self, timeout: float) -> bool:
        return False


def _adapter(settings: Settings, name: str) -> Any:
    config = settings.destination(name)
    try:
        return build_adapter(config, settings, _NoCalls())
    except Exception as error:  # each kind refuses its own missing settings its own way
        why = config.missing() or f"{type(error).__name__}: {error}"
        raise BackfillError(
            f"destination {name!r} cannot be read ({why}): its property map decides which "
            "fields the export holds; fix its settings first"
        ) from None


def wait_for_export(
    client: ExportClient,
    job_id: str,
    *,
    progress: Progress,
    poll_seconds: float = 1.0,
    timeout: float = 6 * 3600,
) -> dict[str, Any]:
    """The export job once completed; ``BackfillError`` when it failed or took too long.

    Polls ``GET /api/v2/jobs/{id}``, a little less often the longer the job runs
    (never more than every 10 s), and reports its percentage as it goes.
    """
    deadline = time.monotonic() + timeout
    delay = poll_seconds
    while True:
        job = client.get_job(job_id)
        status = str(job.get("status"))
        progress.job(
            status, _number(job.get("percentage_done")), _number(job.get("time_left_seconds"))
        )
        if status == "completed":
            if not job.get("location"):
                raise BackfillError(f"export job {job_id} completed without a download location")
            return job
        if status not in ("pending", "processing"):
            summary = job.get("summary") or job.get("message") or job
            raise BackfillError(f"export job {job_id} ended {status}: {summary}")
        if time.monotonic() + delay > deadline:
            raise BackfillError(f"export job {job_id} did not complete within {timeout:g} s")
        time.sleep(delay)
        delay = min(delay * 1.5, max(poll_seconds, 10.0))


def _number(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


# The file


@dataclass(frozen=True)
class ExportLine:
    """One line of the export file: its number (from 1) and its bytes."""

    number: int
    body: bytes


def export_lines(blocks: Iterable[bytes]) -> Iterator[ExportLine]:
    """The non-blank lines of an NDJSON export, gzip-compressed or not, streamed.

    Whether Auth0 compresses the file is not documented, so its first two bytes
    decide (``1f 8b``: gzip). Memory holds one block and one line at a time.
    """
    stream = iter(blocks)
    head = b""
    for block in stream:
        head += block
        if len(head) >= len(GZIP_MAGIC):
            break
    text_blocks: Iterable[bytes] = itertools.chain([head], stream)
    if head.startswith(GZIP_MAGIC):
        text_blocks = _gunzip(text_blocks)
    number, carry = 0, b""
    for block in text_blocks:
        pieces = (carry + block).split(b"\n")
        carry = pieces.pop()
        for piece in pieces:
            number += 1
            if piece.strip():
                yield ExportLine(number, piece)
        if len(carry) > MAX_LINE_BYTES:
            raise BackfillError(f"line {number + 1} of the export is over {MAX_LINE_BYTES} bytes")
    if carry.strip():
        yield ExportLine(number + 1, carry)


def _gunzip(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Inflate gzip data as it streams in; several members one after another are one file."""
    inflater = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer
    started = False
    try:
        for block in blocks:
            pending = block
            while pending:
                started = True
                piece = inflater.decompress(pending, INFLATE_PIECE)
                if piece:
                    yield piece
                if inflater.eof:
                    pending = inflater.unused_data
                    inflater, started = zlib.decompressobj(wbits=31), False
                else:
                    pending = inflater.unconsumed_tail
        tail = inflater.flush()
    except zlib.error as error:
        raise BackfillError(f"the export file is not valid gzip: {error}") from None
    if tail:
        yield tail
    if started and not inflater.eof:
        raise BackfillError("the export file ends in the middle of its gzip data")


# One user as one event


def event_id_of(user_id: str, updated_at: datetime) -> str:
    """``bf_`` and a digest of (user_id, updated_at): the same user state, the same id."""
    moment = updated_at.astimezone(UTC).isoformat(timespec="microseconds")
    digest = hashlib.sha256(f"{user_id}\n{moment}".encode(errors="surrogatepass")).hexdigest()
    return f"bf_{digest[:40]}"


def user_event(line: bytes, *, source: str, stream_id: str | None) -> NewEvent:
    """The ``user.backfill`` event of one exported user; ``InvalidEvent`` says why not.

    It goes through the webhook's own validation (``to_new_event``) as the
    ``user.updated`` it stands for, so it is stored exactly as a live event
    would be; only its type then says where it came from.
    """
    try:
        user = parse_json(line)
    except NotJson:
        raise InvalidEvent("the line is not JSON") from None
    if not isinstance(user, dict):
        raise InvalidEvent("the line is not one user as a JSON object")
    user_id = user.get("user_id")
    if not isinstance(user_id, str) or not user_id.strip():
        raise InvalidEvent("the user has no user_id")
    try:
        updated_at = parse_time(user.get("updated_at"))
    except TimeOutOfRange:
        raise InvalidEvent("the user's updated_at is out of range") from None
    if updated_at is None:
        raise InvalidEvent("the user has no updated_at as an RFC 3339 timestamp")
    document: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id_of(user_id, updated_at),
        "type": "user.updated",
        "source": source,
        "time": user["updated_at"],
        "data": {"object": user},
    }
    if stream_id:
        document["a0stream"] = stream_id
    event = to_new_event(document, line)
    return replace(event, type=BACKFILL_TYPE, payload=event.payload | {"type": BACKFILL_TYPE})


# Storing


@dataclass
class Rejection:
    """A line of the export that is not a user idsync can store."""

    line: int
    reason: str


@dataclass
class BackfillReport:
    """What a backfill did, for the CLI (and ``--json``) and the tests."""

    source: str
    destinations: list[str]
    job_id: str | None = None
    users: int = 0  # lines read that hold a user
    stored: int = 0  # new events
    existing: int = 0  # events stored by an earlier backfill (or this one, twice)
    deliveries: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    rejections: list[Rejection] = field(default_factory=list)  # the first few
    seconds: float = 0.0
    absence: AbsentReport = field(default_factory=AbsentReport)

    def reject(self, line: int, reason: str) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_REJECTIONS_KEPT:
            self.rejections.append(Rejection(line, reason))

    def add(self, result: RecordedMany) -> None:
        self.stored += result.stored
        self.existing += result.existing
        for name, count in result.deliveries.items():
            self.deliveries[name] = self.deliveries.get(name, 0) + count

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destinations": self.destinations,
            "job_id": self.job_id,
            "users": self.users,
            "stored": self.stored,
            "existing": self.existing,
            "deliveries": self.deliveries,
            "rejected": self.rejected,
            "rejections": [{"line": r.line, "reason": r.reason} for r in self.rejections],
            "seconds": round(self.seconds, 3),
            "absent": self.absence.to_json(),
        }


def backfill_source(settings: Settings) -> str:
    """The ``source`` backfilled events carry: the stream's own (``AUTH0_EVENT_SOURCE``)."""
    source = settings.auth0_source
    if not source:
        raise BackfillError("set AUTH0_DOMAIN (or AUTH0_EVENT_SOURCE): backfill needs the source")
    return source


def targets(settings: Settings, destination: str | None) -> list[str]:
    """The destinations a backfill delivers to: ``destination`` alone, or every one."""
    if destination is None:
        return list(settings.destinations)
    if destination not in settings.destinations:
        raise BackfillError(
            f"{destination!r} is not in DESTINATIONS ({', '.join(settings.destinations)})"
        )
    return [destination]


def _distinct_sources(session: Session) -> list[str]:
    """Every ``source`` of stored events, read as a skip scan of the (source, subject) index."""
    rows = session.execute(
        text(
            "WITH RECURSIVE sources(source) AS ("
            " SELECT min(source) FROM events"
            " UNION ALL"
            " SELECT (SELECT min(e.source) FROM events e WHERE e.source > sources.source)"
            " FROM sources WHERE sources.source IS NOT NULL"
            ") SELECT source FROM sources WHERE source IS NOT NULL"
        )
    ).scalars()
    return [str(row) for row in rows]


def check_source(*, session: Session, source: str, stream_id: str | None) -> None:
    """Refuse a source that differs from the one stored events of the stream carry.

    Backfilled events must share the live events' source, or each user would get
    a second link (and a second contact) at every destination. Events of the
    stream are the accepted ones whose ``a0stream`` is ``AUTH0_EVENT_STREAM_ID``
    (all accepted ones when no stream is configured); the dashboard's test events
    (``urn:auth0:``) are stored as ignored and do not count.
    """
    for other in _distinct_sources(session):
        if other == source:
            continue
        query = select(Event.id).where(Event.source == other, Event.status == EventStatus.ACCEPTED)
        if stream_id:
            query = query.where(Event.payload["a0stream"].as_string() == stream_id)
        if session.execute(query.limit(1)).first() is not None:
            stream = f"stream {stream_id}" if stream_id else "the stream"
            raise BackfillError(
                f"stored events of {stream} carry source {other!r}, but backfill would store "
                f"{source!r}: set AUTH0_EVENT_SOURCE={other} (or fix AUTH0_DOMAIN) so that "
                "backfilled and live events share one link per user"
            )


def _chunks(lines: Iterable[ExportLine], size: int) -> Iterator[list[ExportLine]]:
    iterator = iter(lines)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@dataclass
class _ChunkRead:
    """A chunk's users as events, and every user the chunk names, stored or not."""

    events: list[NewEvent]
    user_ids: list[str]
    unidentified: int  # lines rejected that name no readable user_id


def _named_user(line: bytes) -> str | None:
    """The ``user_id`` a line names, even when the line is not a storable user."""
    try:
        user = parse_json(line)
    except NotJson:
        return None
    user_id = user.get("user_id") if isinstance(user, dict) else None
    return user_id if isinstance(user_id, str) and user_id.strip() else None


def _read_chunk(
    chunk: list[ExportLine],
    *,
    source: str,
    stream_id: str | None,
    reject: Callable[[int, str], None],
) -> _ChunkRead:
    """The events of a chunk's users; a line that is not one goes to ``reject``.

    A rejected line's user still exists in Auth0, so its ``user_id`` is kept
    for the absence check when the line names one.
    """
    read = _ChunkRead(events=[], user_ids=[], unidentified=0)
    for line in chunk:
        try:
            event = user_event(line.body, source=source, stream_id=stream_id)
        except InvalidEvent as error:
            reject(line.number, str(error))
            user_id = _named_user(line.body)
            if user_id is None:
                read.unidentified += 1
            else:
                read.user_ids.append(user_id)
            continue
        read.events.append(event)
        read.user_ids.append(str(event.subject))
    return read


def store_users(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    lines: Iterable[ExportLine],
    destination: str | None = None,
    progress: Progress | None = None,
    wake: Callable[[list[str]], None] | None = None,
    chunk_size: int = CHUNK_USERS,
    absent_from: ExportScope | None = None,
) -> BackfillReport:
    """Store every user of ``lines`` as a ``user.backfill`` event, chunk by chunk.

    Each chunk is one transaction of a few statements (``record_events``), so a
    run can be interrupted and run again. ``destination`` delivers to that one
    only, to events already stored as well. ``wake`` is called after each
    commit with the destinations that got new deliveries. With ``absent_from``
    (a full export), users idsync knows that ``lines`` do not hold are then
    stored as deleted (``store_absent``), once every line is stored.
    """
    progress = progress or _Silent()
    started = time.monotonic()
    source = backfill_source(settings)
    stream_id = settings.auth0_event_stream_id
    names = targets(settings, destination)
    report = BackfillReport(source=source, destinations=names, deliveries=dict.fromkeys(names, 0))
    with transaction(sessions) as session:
        check_source(session=session, source=source, stream_id=stream_id)

    roster = ExportRoster.of(sessions) if absent_from is not None else None

    def write(events: list[NewEvent]) -> RecordedMany:
        with transaction(sessions) as session:
            return record_events(
                session=session,
                events=events,
                destinations=names,
                received_via=ReceivedVia.BACKFILL.value,
                priority=BACKFILL_PRIORITY,
                existing_too=destination is not None,
            )

    def write_chunk(read: _ChunkRead) -> RecordedMany:
        result = write(read.events)
        if roster is not None:
            roster.add(read.user_ids, read.unidentified)
        return result

    def written(result: RecordedMany) -> None:
        report.add(result)
        woken = [name for name, count in result.deliveries.items() if count]
        if wake is not None and woken:
            wake(woken)
        progress.users(report.users + report.rejected)

    try:
        # One chunk is written (the database's work, which frees the GIL) while the next
        # is parsed and validated (Python's): at most two chunks are in memory.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="backfill-writer") as writer:
            pending: Future[RecordedMany] | None = None
            for chunk in _chunks(lines, chunk_size):
                read = _read_chunk(chunk, source=source, stream_id=stream_id, reject=report.reject)
                report.users += len(read.events)
                if pending is not None:
                    written(pending.result())
                pending = writer.submit(write_chunk, read)
            if pending is not None:
                written(pending.result())
        if roster is not None and absent_from is not None:
            report.absence = store_absent(
                roster=roster,
                scope=absent_from,
                source=source,
                stream_id=stream_id,
                destinations=names,
                write=write,
                wake=wake,
                chunk_size=chunk_size,
            )
    finally:
        if roster is not None:
            roster.close()
    report.seconds = time.monotonic() - started
    return report


def _unknowable(roster: ExportRoster) -> str | None:
    """Why the export cannot say who is absent; None when it can."""
    if roster.unidentified:
        return (
            f"deletes not checked: {roster.unidentified:,} lines of the export name no "
            "readable user_id, so who is absent cannot be known"
        )
    return None


def store_absent(
    *,
    roster: ExportRoster,
    scope: ExportScope,
    source: str,
    stream_id: str | None,
    destinations: list[str],
    write: Callable[[list[NewEvent]], RecordedMany],
    wake: Callable[[list[str]], None] | None = None,
    chunk_size: int = CHUNK_USERS,
) -> AbsentReport:
    """Store a ``user.deleted`` for each user known under ``source`` that ``roster`` lacks.

    Called once every line of a full export is stored. The absent users are
    found by one statement and stored ``chunk_size`` at a time through
    ``write`` (the backfill's own ``record_events``), each chunk a transaction.
    ``deprovisioned`` counts, per destination, those with a live link there.
    """
    absence = AbsentReport(checked=True, export_started_at=scope.started_at)
    unknowable = _unknowable(roster)
    if unknowable:
        return AbsentReport(note=unknowable)
    absence.absent = roster.find_absent(source=source, before=scope.started_at)
    absence.deprovisioned = roster.live_links(source=source, destinations=destinations)
    for user_ids in roster.absent_chunks(chunk_size):
        events = [
            absent_event(user_id, scope=scope, source=source, stream_id=stream_id)
            for user_id in user_ids
        ]
        result = write(events)
        absence.stored += result.stored
        absence.existing += result.existing
        for name, count in result.deliveries.items():
            absence.deliveries[name] = absence.deliveries.get(name, 0) + count
        woken = [name for name, count in result.deliveries.items() if count]
        if wake is not None and woken:
            wake(woken)
    return absence


# The dry run


OUTCOMES = ("created", "updated", "deprovisioned", "unchanged", "stale", "already_stored")


@dataclass
class DryRunReport:
    """Per destination, what a backfill would do to its users; nothing is stored."""

    source: str
    destinations: list[str]
    counts: dict[str, dict[str, int]]
    # Destinations whose kind cannot say whether a linked user's properties changed:
    # their "updated" counts every linked user.
    uncompared: list[str] = field(default_factory=list)
    job_id: str | None = None
    users: int = 0
    rejected: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    absence: AbsentReport = field(default_factory=AbsentReport)

    def reject(self, line: int, reason: str) -> None:
        self.rejected += 1
        if len(self.rejections) < MAX_REJECTIONS_KEPT:
            self.rejections.append(Rejection(line, reason))

    def to_json(self) -> dict[str, Any]:
        deprovisioned = self.absence.deprovisioned
        return {
            "dry_run": True,
            "source": self.source,
            "job_id": self.job_id,
            "users": self.users,
            "rejected": self.rejected,
            "rejections": [{"line": r.line, "reason": r.reason} for r in self.rejections],
            "destinations": {
                name: self.counts[name]
                | {"absent": deprovisioned.get(name, 0), "compared": name not in self.uncompared}
                for name in self.destinations
            },
            "absent": self.absence.to_json(),
        }


def _hubspot_fingerprint(adapter: Any, intent: Intent) -> str:
    from workers.destinations.hubspot.adapter import properties_hash

    return properties_hash(adapter.desired_properties(intent.user))


def _webhook_fingerprint(adapter: Any, intent: Intent) -> str:
    from workers.destinations.webhook.payload import build_message

    return build_message(intent, adapter.mapping).properties_hash


# How each kind computes the properties_hash it leaves on a link after a send. An
# adapter with a ``fingerprint(intent)`` method of its own is asked that instead.
FINGERPRINTS: dict[str, Callable[[Any, Intent], str]] = {
    "hubspot": _hubspot_fingerprint,
    "webhook": _webhook_fingerprint,
}


class _Judge:
    """Decides, for one destination, what the backfill event of a user would do there."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.name = name
        self.adapter = _adapter(settings, name)
        self.fingerprint = self._fingerprint(settings.destination(name).kind)

    def _fingerprint(self, kind: str) -> Callable[[Intent], str] | None:
        """The adapter's own ``fingerprint``, else its kind's in ``FINGERPRINTS``, else None."""
        own = getattr(self.adapter, "fingerprint", None)
        if callable(own):
            return own  # type: ignore[no-any-return]
        known = FINGERPRINTS.get(kind)
        if known is None:
            return None
        return lambda intent: known(self.adapter, intent)

    def close(self) -> None:
        self.adapter.close()

    def outcome(self, event: NewEvent, link: Link | None, now: datetime) -> str:
        user = UserState.from_event(event.type, event.payload)
        key = order_key(
            event_time=event.event_time,
            received_at=now,
            object_updated_at=event.object_updated_at,
            event_type=event.type,
            event_id=event.event_id,
        )
        if link is not None and link.last_order_key is not None and key <= link.last_order_key:
            return "stale"  # a newer event of the user was applied already
        live = link is not None and link.external_id is not None and not link.deprovisioned
        if user.deprovisioned:
            return "unchanged" if link is not None and link.deprovisioned else "deprovisioned"
        if not live:
            return "created"
        assert link is not None
        if self.fingerprint is None:
            return "updated"
        intent = Intent(
            key="dry-run",
            user=user,
            link=LinkState(
                external_id=link.external_id,
                properties_hash=link.properties_hash,
                last_email=link.last_email,
            ),
            event_id=event.event_id,
            source=event.source,
            event_time=event.event_time,
        )
        return "unchanged" if self.fingerprint(intent) == link.properties_hash else "updated"


def _links(session: Session, destination: str, source: str, subjects: list[str]) -> dict[str, Link]:
    rows = session.scalars(
        select(Link).where(
            Link.destination == destination, Link.source == source, Link.subject.in_(subjects)
        )
    ).all()
    return {link.subject: link for link in rows}


def _stored(session: Session, source: str, event_ids: list[str]) -> dict[str, int]:
    rows = session.execute(
        select(Event.event_id, Event.id).where(
            Event.source == source, Event.event_id.in_(event_ids)
        )
    ).all()
    return {row.event_id: row.id for row in rows}


def _delivered(session: Session, destination: str, event_pks: list[int]) -> set[int]:
    if not event_pks:
        return set()
    rows = session.scalars(
        select(Delivery.event_pk).where(
            Delivery.destination == destination, Delivery.event_pk.in_(event_pks)
        )
    ).all()
    return set(rows)


def plan_users(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    lines: Iterable[ExportLine],
    destination: str | None = None,
    progress: Progress | None = None,
    chunk_size: int = CHUNK_USERS,
    absent_from: ExportScope | None = None,
) -> DryRunReport:
    """Count, per destination, the users a backfill would create, update or deprovision.

    created: no live link; updated: the mapped properties' hash differs from the
    link's (computed by the destination's own hashing); deprovisioned: a blocked
    user not yet deprovisioned there; unchanged, stale (a newer event was applied)
    and already_stored (this very event exists, and with it its delivery) send
    nothing. With ``absent_from`` (a full export), also the users known to idsync
    that the export lacks, and per destination those of them with a live link
    there, whom their delete would deprovision. Stores nothing.
    """
    progress = progress or _Silent()
    source = backfill_source(settings)
    stream_id = settings.auth0_event_stream_id
    names = targets(settings, destination)
    report = DryRunReport(
        source=source,
        destinations=names,
        counts={name: dict.fromkeys(OUTCOMES, 0) for name in names},
    )
    judges = [_Judge(settings, name) for name in names]
    report.uncompared = [judge.name for judge in judges if judge.fingerprint is None]
    now = datetime.now(UTC)
    roster = ExportRoster.of(sessions) if absent_from is not None else None
    try:
        with transaction(sessions) as session:
            check_source(session=session, source=source, stream_id=stream_id)
        for chunk in _chunks(lines, chunk_size):
            read = _read_chunk(chunk, source=source, stream_id=stream_id, reject=report.reject)
            report.users += len(read.events)
            with transaction(sessions) as session:
                _judge_chunk(
                    session, judges, read.events, report, source, now, destination is not None
                )
            if roster is not None:
                roster.add(read.user_ids, read.unidentified)
            progress.users(report.users + report.rejected)
        if roster is not None and absent_from is not None:
            report.absence = count_absent(
                roster=roster, scope=absent_from, source=source, destinations=names
            )
    finally:
        for judge in judges:
            judge.close()
        if roster is not None:
            roster.close()
    return report


def count_absent(
    *, roster: ExportRoster, scope: ExportScope, source: str, destinations: list[str]
) -> AbsentReport:
    """What ``store_absent`` would find: the absent users, and per destination the live ones."""
    unknowable = _unknowable(roster)
    if unknowable:
        return AbsentReport(note=unknowable)
    absent = roster.find_absent(source=source, before=scope.started_at)
    return AbsentReport(
        checked=True,
        export_started_at=scope.started_at,
        absent=absent,
        deprovisioned=roster.live_links(source=source, destinations=destinations),
    )


def _judge_chunk(
    session: Session,
    judges: list[_Judge],
    events: list[NewEvent],
    report: DryRunReport,
    source: str,
    now: datetime,
    existing_too: bool,
) -> None:
    stored = _stored(session, source, [event.event_id for event in events])
    subjects = list({event.subject for event in events if event.subject})
    for judge in judges:
        counts = report.counts[judge.name]
        links = _links(session, judge.name, source, subjects)
        delivered = (
            _delivered(session, judge.name, list(stored.values())) if existing_too else set()
        )
        for event in events:
            pk = stored.get(event.event_id)
            if pk is not None and (not existing_too or pk in delivered):
                counts["already_stored"] += 1
                continue
            counts[judge.outcome(event, links.get(event.subject or ""), now)] += 1


# The whole run


def run_backfill(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    client: ExportClient,
    connection_id: str | None = None,
    destination: str | None = None,
    dry_run: bool = False,
    deletes: bool = True,
    progress: Progress | None = None,
    wake: Callable[[list[str]], None] | None = None,
    poll_seconds: float = 1.0,
) -> BackfillReport | DryRunReport:
    """Export the tenant's users through ``client`` and store (or, dry, count) them.

    Everything that can refuse (the destination, the source) is checked before
    the export job starts, so a refusal costs Auth0 nothing. A full export
    (no ``connection_id``) also stores deletes for users it lacks, unless
    ``deletes`` is false.
    """
    progress = progress or _Silent()
    names = targets(settings, destination)
    source = backfill_source(settings)
    with transaction(sessions) as session:
        check_source(session=session, source=source, stream_id=settings.auth0_event_stream_id)
        asked_at = db_now(session)
    fields = export_fields(settings, settings.destinations)
    job_id = client.start_users_export(fields, connection_id)
    job = wait_for_export(client, job_id, progress=progress, poll_seconds=poll_seconds)
    note = absence_off(connection_id=connection_id, deletes=deletes)
    scope = None if note else ExportScope(job_id=job_id, started_at=export_start(job, asked_at))
    lines = export_lines(client.download(str(job["location"])))
    report: BackfillReport | DryRunReport
    if dry_run:
        report = plan_users(
            sessions=sessions,
            settings=settings,
            lines=lines,
            destination=destination,
            progress=progress,
            absent_from=scope,
        )
    else:
        report = store_users(
            sessions=sessions,
            settings=settings,
            lines=lines,
            destination=destination,
            progress=progress,
            wake=wake,
            absent_from=scope,
        )
    report.job_id = job_id
    if note:
        report.absence = AbsentReport(note=note)
    assert report.destinations == names
    return report


def absence_off(*, connection_id: str | None, deletes: bool) -> str | None:
    """Why this backfill does not look for users absent from its export; None when it does."""
    if connection_id is not None:
        return (
            f"deletes not checked: the export holds connection {connection_id} only, so a "
            "user absent from it may be in another"
        )
    if not deletes:
        return "deletes not checked (--no-deletes)"
    return None


def export_start(job: dict[str, Any], asked_at: datetime) -> datetime:
    """When Auth0 created the export job (its ``created_at``), else when idsync asked for it.

    Every user the export lacks was gone by then or created after: the deletes
    are dated here, so any event of Auth0's newer than the export wins.
    """
    try:
        created = parse_time(job.get("created_at"))
    except TimeOutOfRange:
        created = None
    return created or asked_at
