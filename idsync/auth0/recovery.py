"""Recovery of what Auth0 gave up on: read failed deliveries back, store them, redeliver.

Auth0 tries a webhook delivery 4 times within about 7 seconds and then keeps
the event as *failed*; after 500 consecutive or 5,000 total failures it
disables the whole stream, and while disabled it produces nothing at all
(https://auth0.com/docs/customize/events/event-testing-observability-and-failure-recovery;
``shared/reference/auth0-management.md``). A recovery pass, run by beat every
``AUTH0_RECOVERY_INTERVAL`` or by ``idsync auth0 recover``:

1. reads the stream (its ``status``);
2. lists the failed deliveries of its window, ``[start, now - AUTH0_RECOVERY_LAG)``
   in whole seconds, leaving the newest to Auth0's own retries. The list has no
   cursor: a full page splits the window in halves down to one second, and a
   full one-second window is paged with ``from=<last id>``, whichever id Auth0
   means by it (both readings are handled by deduplicating on the delivery id);
3. stores each delivery's event through the webhook's own path
   (``ingest.store.store_document``) with ``received_via=recovery``;
4. asks Auth0 to redeliver the window, so that Auth0's failure count clears
   (the copies arrive as ``200 duplicate``; a 409 is not an error);
5. re-enables a disabled stream once the redelivery was accepted (or nothing
   was left to redeliver), and from then on warns that events of the disabled
   period may never have been produced: a full backfill recovers that period's
   creates, updates and deletes (a user it no longer holds is stored as
   deleted), and a reconcile then finds drift at the destinations.

The window starts at the watermark, the ``window_to`` of the newest finished
pass without an error, or, on the very first pass, ``AUTH0_RECOVERY_INTERVAL``
before the first window's end. A pass that listed failures is read again by the
next one from its own ``window_from``: when idsync was still down while Auth0
redelivered, those events are still failed in Auth0 and must be redelivered
again, or the stream could never be re-enabled. That re-reading reaches back
at most ``AUTH0_RECOVERY_RECHECK``; the part of the stream after the watermark
is read whatever its age.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import func, select, text, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from idsync.auth0.client import Auth0Error, ManagementClient, recovery_off
from idsync.settings import Settings, parse_duration
from ingest.store import StoreResult, Wakes, store_document
from models.db import db_now, transaction
from models.tables import Auth0RecoveryPass, Event, ReceivedVia

log = logging.getLogger(__name__)

PAGE = 100  # the most deliveries Auth0 lists per request
ONE_SECOND = timedelta(seconds=1)
# How long /readyz, the metric and the alert keep saying that a disabled period
# may have lost events, after recovery re-enabled the stream.
DISABLED_WARNING = timedelta(days=7)


def whole_second(moment: datetime) -> datetime:
    """``moment`` without its fraction of a second: Auth0 takes whole seconds only."""
    return moment.astimezone(UTC).replace(microsecond=0)


@dataclass
class PassReport:
    """What one pass did; the same figures are stored in ``auth0_recovery_passes``."""

    stream_id: str
    window_from: datetime
    window_to: datetime
    trigger: str
    dry_run: bool
    stream_status: str | None = None
    listed: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    redelivered: bool = False
    reenabled: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    id: int | None = None

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["window_from"] = self.window_from.isoformat()
        values["window_to"] = self.window_to.isoformat()
        return values


# Reading failed deliveries


def read_failed(client: ManagementClient, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """Every failed delivery with ``start <= time < end``, each once, oldest window first.

    A full page means "there may be more": the window is split in halves and
    each half read again; a full one-second window cannot be split and is
    paged with ``from``.
    """
    found: dict[str, dict[str, Any]] = {}
    windows = [(start, end)]
    while windows:
        low, high = windows.pop()
        page = client.list_failed_deliveries(low, high, take=PAGE)
        _keep(found, page)
        if len(page) < PAGE:
            continue
        seconds = int((high - low).total_seconds())
        if seconds > 1:
            middle = low + timedelta(seconds=seconds // 2)
            windows += [(middle, high), (low, middle)]  # the older half is read first
        else:
            _page_one_second(client, low, high, page, found)
    return list(found.values())


def _keep(found: dict[str, dict[str, Any]], page: Iterable[dict[str, Any]]) -> int:
    """Add the deliveries of ``page`` not seen yet; how many were new."""
    new = 0
    for delivery in page:
        if delivery.get("id") not in found:
            found[str(delivery.get("id"))] = delivery
            new += 1
    return new


def _page_one_second(
    client: ManagementClient,
    low: datetime,
    high: datetime,
    page: list[dict[str, Any]],
    found: dict[str, dict[str, Any]],
) -> None:
    """Page a full one-second window with ``from=<last id>``.

    Whether ``from`` starts after that id or at it is not documented: either
    way every page brings new ids until the window is exhausted, so paging
    stops at a short page or at a page with nothing new.
    """
    while len(page) == PAGE:
        page = client.list_failed_deliveries(low, high, take=PAGE, from_=str(page[-1]["id"]))
        if _keep(found, page) == 0:
            return


def event_document(delivery: dict[str, Any]) -> tuple[Any, bytes]:
    """The CloudEvent of a failed delivery as the webhook would have received it, and its bytes.

    The deliveries API encodes ``event.data`` as a JSON string; the webhook got
    it as an object. Data that is not JSON is passed on as it is, so that
    validation refuses (and quarantines) it like any other bad body.
    """
    event = delivery.get("event")
    if not isinstance(event, dict):
        return event, json.dumps(event).encode()
    document = dict(event)
    data = document.get("data")
    if isinstance(data, str):
        try:
            document["data"] = json.loads(data)
        except ValueError:
            log.warning("delivery %s carries event.data that is not JSON", delivery.get("id"))
    return document, json.dumps(document).encode()


# The window and the watermark


def watermark(session: Session, stream_id: str) -> datetime | None:
    """The newest window end a finished pass without an error read: where the next starts."""
    return session.scalar(
        select(Auth0RecoveryPass.window_to)
        .where(_counted(stream_id))
        .order_by(Auth0RecoveryPass.id.desc())
        .limit(1)
    )


def last_success_at(session: Session, stream_id: str) -> datetime | None:
    """When the newest pass that moved the watermark finished (the metric alerts watch)."""
    return session.scalar(
        select(func.max(Auth0RecoveryPass.finished_at)).where(_counted(stream_id))
    )


def _counted(stream_id: str) -> Any:
    return (
        (Auth0RecoveryPass.stream_id == stream_id)
        & Auth0RecoveryPass.finished_at.is_not(None)
        & Auth0RecoveryPass.error.is_(None)
        & Auth0RecoveryPass.dry_run.is_(False)
    )


def next_window(
    session: Session, settings: Settings, now: datetime, since: float | None = None
) -> tuple[datetime, datetime]:
    """The window a pass starting at ``now`` reads (see the module docstring)."""
    stream_id = str(settings.auth0_event_stream_id)
    end = whole_second(now - timedelta(seconds=parse_duration(settings.auth0_recovery_lag)))
    if since is not None:
        return whole_second(end - timedelta(seconds=since)), end
    newest = session.scalars(
        select(Auth0RecoveryPass)
        .where(_counted(stream_id))
        .order_by(Auth0RecoveryPass.id.desc())
        .limit(1)
    ).first()
    if newest is None:
        interval = parse_duration(settings.auth0_recovery_interval)
        return whole_second(end - timedelta(seconds=interval)), end
    start = newest.window_to
    if newest.listed:
        # Read the failures of that pass again, reaching back at most RECHECK; what
        # lies after its window_to was never read and is read whatever its age (a
        # deployment down for a day comes back to a day of failed deliveries).
        earliest = whole_second(
            now - timedelta(seconds=parse_duration(settings.auth0_recovery_recheck))
        )
        start = max(newest.window_from, min(earliest, newest.window_to))
    return min(start, end), end


# One pass at a time


def _lock_key(stream_id: str) -> int:
    """The advisory lock key of a stream's passes: 64 bits of a hash of its id."""
    digest = hashlib.sha256(f"idsync.auth0_recovery:{stream_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def exclusive_pass(sessions: sessionmaker[Session], stream_id: str) -> Iterator[bool]:
    """Whether this caller may run a pass of ``stream_id`` now; only one caller may at a time.

    Guarantees, on PostgreSQL: while the block runs, no other process on any
    machine (beat's task, ``idsync auth0 recover``) gets True for the same stream,
    and the hold ends with the block or with the process (a session-level
    advisory lock on a connection of its own, not in a transaction: a killed
    worker leaves no lock and no TTL to wait out). A caller that gets False
    returns at once. Other databases (the embedded SQLite) have no such lock:
    there a second pass may overlap, which costs a redelivery answered 409.
    """
    engine = sessions.kw["bind"]
    if engine.dialect.name != "postgresql":
        yield True
        return
    key = _lock_key(stream_id)
    with engine.connect() as connection:
        held = bool(connection.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}))
        connection.commit()  # the lock outlives the transaction; nothing stays open
        try:
            yield held
        finally:
            if held:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()


@cache
def _shared_client(
    base_url: str, domain: str, client_id: str, client_secret: str, stream_id: str
) -> ManagementClient:
    return ManagementClient(
        base_url=base_url,
        domain=domain,
        client_id=client_id,
        client_secret=client_secret,
        stream_id=stream_id,
    )


def shared_client(settings: Settings) -> ManagementClient | None:
    """One client per process and tenant, so that its token outlives a pass.

    Beat runs a pass every ``AUTH0_RECOVERY_INTERVAL``; a token per pass would
    spend a monthly machine-to-machine token quota in days. None when recovery is off.
    """
    if recovery_off(settings):
        return None
    assert settings.auth0_base_url and settings.auth0_domain and settings.auth0_client_id
    assert settings.auth0_client_secret and settings.auth0_event_stream_id
    return _shared_client(
        settings.auth0_base_url,
        settings.auth0_domain,
        settings.auth0_client_id,
        settings.auth0_client_secret,
        settings.auth0_event_stream_id,
    )


def recover(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    client: ManagementClient,
    waker: Wakes,
    trigger: str,
    since: float | None = None,
    dry_run: bool = False,
) -> PassReport | None:
    """One pass (``run_pass``) unless another is running: then None, at once.

    Beat's task and ``idsync auth0 recover`` both come through here.
    """
    stream_id = str(settings.auth0_event_stream_id)
    with exclusive_pass(sessions, stream_id) as mine:
        if not mine:
            log.info("a recovery pass of %s is running already; this one is skipped", stream_id)
            return None
        return run_pass(
            sessions=sessions,
            settings=settings,
            client=client,
            waker=waker,
            trigger=trigger,
            since=since,
            dry_run=dry_run,
        )


# A pass


def run_pass(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    client: ManagementClient,
    waker: Wakes,
    trigger: str,
    since: float | None = None,
    dry_run: bool = False,
) -> PassReport:
    """One recovery pass, recorded in ``auth0_recovery_passes`` (see the module docstring).

    An Auth0 error ends the pass with the error recorded (the watermark does not
    move, so the next pass reads the window again); the events stored so far stay.
    """
    with transaction(sessions) as session:
        now = db_now(session)
        start, end = next_window(session, settings, now, since)
    report = PassReport(str(settings.auth0_event_stream_id), start, end, trigger, dry_run)
    report.id = _open(sessions, report)
    try:
        _run(sessions, settings, client, waker, report)
    except Auth0Error as error:
        report.error = str(error)
        log.error("recovery pass %s stopped: %s", report.id, error)
    except Exception as error:
        report.error = f"{type(error).__name__}: {error}"
        _close(sessions, report)
        raise
    _close(sessions, report)
    return report


def _run(
    sessions: sessionmaker[Session],
    settings: Settings,
    client: ManagementClient,
    waker: Wakes,
    report: PassReport,
) -> None:
    report.stream_status = str(client.get_stream().get("status"))
    deliveries = (
        read_failed(client, report.window_from, report.window_to)
        if (report.window_from < report.window_to)
        else []
    )
    report.listed = len(deliveries)
    if report.dry_run:
        _count_dry(sessions, settings, deliveries, report)
        return
    for delivery in deliveries:
        _tally(report, _store(sessions, settings, waker, delivery))
    if report.listed:
        report.redelivered = client.redeliver(report.window_from, report.window_to)
        if not report.redelivered:
            report.notes.append(
                "Auth0 answered 409 to the redelivery: some events are still being redelivered"
            )
    if report.stream_status == "disabled" and (report.redelivered or not report.listed):
        _reenable(client, report)


def _store(
    sessions: sessionmaker[Session], settings: Settings, waker: Wakes, delivery: dict[str, Any]
) -> StoreResult:
    document, body = event_document(delivery)
    result = store_document(
        sessions=sessions,
        settings=settings,
        waker=waker,
        document=document,
        body=body,
        received_via=ReceivedVia.RECOVERY,
    )
    if result.outcome == "unavailable":
        # The database cannot commit: stop here, so that nothing is redelivered
        # before it is stored; the next pass reads the window again.
        raise Auth0RecoveryUnavailable(result.reason or "the outbox database is unavailable")
    if result.outcome in ("rejected", "forbidden"):
        log.warning("recovered event %s not stored: %s", result.event_id, result.reason)
    return result


class Auth0RecoveryUnavailable(Auth0Error):
    """The outbox could not commit a recovered event; the pass stops and is retried."""


def _tally(report: PassReport, result: StoreResult) -> None:
    if result.outcome in ("accepted", "ignored"):
        report.stored += 1
    elif result.outcome == "duplicate":
        report.duplicates += 1
    else:
        report.rejected += 1


def _count_dry(
    sessions: sessionmaker[Session],
    settings: Settings,
    deliveries: list[dict[str, Any]],
    report: PassReport,
) -> None:
    """What a real pass would store: deliveries whose (source, id) is not stored yet."""
    keys = {
        (str(event.get("source")), str(event.get("id")))
        for event in (delivery.get("event") for delivery in deliveries)
        if isinstance(event, dict)
    }
    stored: set[tuple[str, str]] = set()
    with sessions() as session:
        for chunk in _chunks(sorted(keys), 1000):
            rows = session.execute(
                select(Event.source, Event.event_id).where(
                    tuple_(Event.source, Event.event_id).in_(chunk)
                )
            ).all()
            stored.update((row.source, row.event_id) for row in rows)
    report.duplicates = len(stored)
    report.stored = len(keys) - len(stored)
    report.rejected = len(deliveries) - len(keys)


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for offset in range(0, len(items), size):
        yield items[offset : offset + size]


def _reenable(client: ManagementClient, report: PassReport) -> None:
    """Turn the stream back on; Auth0 refuses while its total failure count is too high."""
    try:
        client.enable_stream()
    except Auth0Error as error:
        report.notes.append(f"Auth0 did not re-enable the stream yet: {error}")
        log.warning("recovery could not re-enable the Event Stream yet: %s", error)
        return
    report.reenabled = True
    log.warning(
        "recovery re-enabled the Event Stream %s: events of the disabled period may never "
        "have been produced; run idsync backfill (it recovers that period's creates, updates "
        "and deletes), then idsync reconcile <destination>",
        report.stream_id,
    )


def _open(sessions: sessionmaker[Session], report: PassReport) -> int:
    with transaction(sessions) as session:
        row = Auth0RecoveryPass(
            stream_id=report.stream_id,
            window_from=report.window_from,
            window_to=report.window_to,
            trigger=report.trigger,
            dry_run=report.dry_run,
        )
        session.add(row)
        session.flush()
        return int(row.id)


def _close(sessions: sessionmaker[Session], report: PassReport) -> None:
    with transaction(sessions) as session:
        session.execute(
            update(Auth0RecoveryPass)
            .where(Auth0RecoveryPass.id == report.id)
            .values(
                finished_at=db_now(session),
                stream_status=report.stream_status,
                listed=report.listed,
                stored=report.stored,
                duplicates=report.duplicates,
                rejected=report.rejected,
                redelivered=report.redelivered,
                reenabled=report.reenabled,
                error=report.error,
            )
        )


# What status, /readyz and the metrics show


@dataclass(frozen=True)
class RecoveryStatus:
    """Recovery's state for operators: off and why, the watermark, the last pass, warnings."""

    off: str | None
    watermark: datetime | None = None
    last_pass: dict[str, Any] | None = None
    stream_disabled: bool = False
    missing_events: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "off": self.off,
            "watermark": self.watermark.isoformat() if self.watermark else None,
            "last_pass": self.last_pass,
            "stream_disabled": self.stream_disabled,
            "missing_events": self.missing_events,
        }

    def line(self) -> str:
        """One line for /readyz: ``off: <why>``, a warning, or ``ok``.

        What is wrong now comes before the missing-events warning, which stands
        for ``DISABLED_WARNING`` whatever happens meanwhile and would hide it.
        """
        if self.off:
            return self.off
        if self.stream_disabled:
            return "the Event Stream is disabled; the next recovery pass re-enables it"
        if self.last_pass and self.last_pass.get("error"):
            return f"the last recovery pass failed: {self.last_pass['error']}"
        if self.missing_events:
            return self.missing_events
        return "ok"


def pass_view(row: Auth0RecoveryPass) -> dict[str, Any]:
    """One pass as the CLI and /readyz show it."""
    return {
        "id": row.id,
        "trigger": row.trigger,
        "dry_run": row.dry_run,
        "started_at": row.started_at.isoformat(),
        "finished_at": row.finished_at.isoformat() if row.finished_at else None,
        "window_from": row.window_from.isoformat(),
        "window_to": row.window_to.isoformat(),
        "stream_status": row.stream_status,
        "listed": row.listed,
        "stored": row.stored,
        "duplicates": row.duplicates,
        "rejected": row.rejected,
        "redelivered": row.redelivered,
        "reenabled": row.reenabled,
        "error": row.error,
    }


def recovery_status(session: Session, settings: Settings) -> RecoveryStatus:
    """Recovery's state from the stored passes (no call to Auth0)."""
    off = recovery_off(settings)
    if off:
        return RecoveryStatus(off=off)
    stream_id = str(settings.auth0_event_stream_id)
    last = session.scalars(
        select(Auth0RecoveryPass)
        .where(
            Auth0RecoveryPass.stream_id == stream_id,
            Auth0RecoveryPass.finished_at.is_not(None),
            Auth0RecoveryPass.dry_run.is_(False),
        )
        .order_by(Auth0RecoveryPass.id.desc())
        .limit(1)
    ).first()
    return RecoveryStatus(
        off=None,
        watermark=watermark(session, stream_id),
        last_pass=pass_view(last) if last else None,
        stream_disabled=bool(last and last.stream_status == "disabled" and not last.reenabled),
        missing_events=missing_events_warning(session, stream_id, db_now(session)),
    )


def missing_events_warning(session: Session, stream_id: str, now: datetime) -> str | None:
    """The warning after recovery re-enabled the stream, for ``DISABLED_WARNING``; else None.

    Auth0 produces no events while a stream is disabled, so redelivery cannot
    bring them back. A full backfill can: the export holds every existing user
    (creates and updates), and a user idsync knows that it lacks is stored as
    deleted. A reconcile then compares the destinations with idsync's links.
    """
    reenabled = session.scalars(
        select(Auth0RecoveryPass)
        .where(
            Auth0RecoveryPass.stream_id == stream_id,
            Auth0RecoveryPass.reenabled.is_(True),
            Auth0RecoveryPass.finished_at > now - DISABLED_WARNING,
        )
        .order_by(Auth0RecoveryPass.id.desc())
        .limit(1)
    ).first()
    if reenabled is None or reenabled.finished_at is None:
        return None
    seen_enabled = session.scalar(
        select(Auth0RecoveryPass.started_at)
        .where(
            Auth0RecoveryPass.stream_id == stream_id,
            Auth0RecoveryPass.stream_status == "enabled",
            Auth0RecoveryPass.id < reenabled.id,
        )
        .order_by(Auth0RecoveryPass.id.desc())
        .limit(1)
    )
    since = f"after {seen_enabled:%Y-%m-%d %H:%M}Z" if seen_enabled else "at some time"
    return (
        f"the Event Stream was disabled from {since} until recovery re-enabled it at "
        f"{reenabled.finished_at:%Y-%m-%d %H:%M}Z: events of that period may never have been "
        "produced; run idsync backfill without --connection (it recovers that period's "
        "creates, updates and deletes), then idsync reconcile <destination> to find drift "
        "at the destinations"
    )
