"""Reconciliation: read every linked record back and report what drifted from the links.

A destination someone edited by hand, a contact deleted or merged there, or a
record live again though idsync deprovisioned it: none of these sends idsync an
event. ``reconcile`` reads each linked record through the destination's own
``read`` (in batches, under its shared rate limit, waiting while live work is
due so it runs below live traffic), normalises the mapped properties the way
the destination hashes what it sends (its ``record_hash``), and compares with
the link's ``properties_hash``. Drift comes in three kinds:

- ``changed``: the record's mapped properties differ from what idsync last sent;
- ``missing``: the linked record is gone (deleted, or merged into another);
- ``live_deprovisioned``: the record is live though idsync deprovisioned the user.

With ``fix`` each drifted user is resynced (``models.commands.resync``: the
newest state, forced, queued behind live traffic). When retention purged that
state, the user is read again from Auth0 (``GET /api/v2/users/{id}``) and stored
as a new event first. Each run is recorded in ``reconcile_runs`` for metrics.

Like ``workers/delivery.py:run_batch`` this is a plain function; the CLI and
the beat task only call it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from idsync.logs import scrub
from idsync.settings import Settings
from models.commands import NothingToResync, resync
from models.db import db_now, transaction
from models.outbox import has_due_work, record_event
from models.tables import Link, ReconcileRun
from workers.destinations.base import Destination

log = logging.getLogger(__name__)

READ_BATCH = 100
# Before each read, wait at most this long for due live work to be claimed first.
YIELD_SECONDS = 2.0
# How many drifted users a report lists one by one (the counts are always whole).
LISTED = 1000
KINDS = ("changed", "missing", "live_deprovisioned")

Progress = Callable[[int, int], None]
"""Called as ``progress(checked, total)`` after each batch."""


class Unreadable(Exception):
    """The destination cannot be read back (a webhook): there is nothing to compare."""


@dataclass(frozen=True)
class Drift:
    """One linked user whose record differs from what idsync holds."""

    subject: str
    source: str
    external_id: str
    kind: str  # one of KINDS


@dataclass
class ReconcileReport:
    """What a reconciliation found and, with ``fix``, what it queued."""

    destination: str
    fix: bool
    checked: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    drift: list[Drift] = field(default_factory=list)
    fixed: int = 0
    unfixed: list[tuple[str, str]] = field(default_factory=list)  # (subject, why)
    error: str | None = None

    @property
    def drifted(self) -> int:
        return sum(self.counts.values())

    def note(self, drift: Drift) -> None:
        self.counts[drift.kind] += 1
        self.drift.append(drift)

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "fix": self.fix,
            "checked": self.checked,
            "in_step": self.checked - self.drifted,
            "drift": dict(self.counts),
            "drifted": [
                {"subject": d.subject, "external_id": d.external_id, "kind": d.kind}
                for d in self.drift[:LISTED]
            ],
            "fixed": self.fixed,
            "unfixed": [{"subject": s, "why": why} for s, why in self.unfixed],
            "error": self.error,
        }


def readable(destination: Destination) -> bool:
    """Whether ``destination`` can be read back and compared (its ``read`` is not None)."""
    return destination.read([]) is not None and hasattr(destination, "record_hash")


def classify(
    link: Link, record: dict[str, Any] | None, destination: Any, deprovision: str | None
) -> str | None:
    """The kind of drift between ``link`` and the ``record`` read for it (None: in step)."""
    if link.deprovisioned:
        if record is None:
            return None  # archived, or gone: the user is not live there either way
        if deprovision != "mark":
            return "live_deprovisioned"
        marked = destination.record_hash(record, deprovisioned=True)
        return None if marked == link.properties_hash else "live_deprovisioned"
    if record is None:
        return "missing"
    if destination.record_hash(record, deprovisioned=False) != link.properties_hash:
        return "changed"
    return None


def _links(session: Session, destination: str, after: int, limit: int) -> list[Link]:
    return list(
        session.scalars(
            select(Link)
            .where(Link.destination == destination, Link.external_id.is_not(None), Link.id > after)
            .order_by(Link.id)
            .limit(limit)
        )
    )


def _batches(sessions: sessionmaker[Session], destination: str, size: int) -> Iterator[list[Link]]:
    after = 0
    while True:
        with transaction(sessions) as session:
            links = _links(session, destination, after, size)
            session.expunge_all()
        if not links:
            return
        yield links
        after = links[-1].id


def _yield_to_live(sessions: sessionmaker[Session], destination: str, wait: float) -> None:
    """Let the workers claim due live work before reconcile spends a request slot."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with transaction(sessions) as session:
            if not has_due_work(session=session, destination=destination):
                return
        time.sleep(0.2)


def reconcile(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    destination: Destination,
    fix: bool = False,
    progress: Progress | None = None,
    trigger: str = "cli",
    batch_size: int = READ_BATCH,
    yield_seconds: float = YIELD_SECONDS,
) -> ReconcileReport:
    """Compare every linked record of ``destination`` with its link; resync drift if ``fix``.

    Raises ``Unreadable`` when the destination cannot be read back.
    """
    name = destination.name
    if not readable(destination):
        raise Unreadable(
            f"{name} cannot be read back (a webhook receiver keeps no records idsync can "
            "read): there is nothing to reconcile; idsync relies on what it sent"
        )
    deprovision = settings.destination(name).deprovision
    report = ReconcileReport(destination=name, fix=fix)
    with transaction(sessions) as session:
        total = int(
            session.scalar(
                select(func.count())
                .select_from(Link)
                .where(Link.destination == name, Link.external_id.is_not(None))
            )
            or 0
        )
        run = ReconcileRun(destination=name, trigger=trigger, fix=fix)
        session.add(run)
        session.flush()
        run_id = run.id
    try:
        for links in _batches(sessions, name, batch_size):
            _yield_to_live(sessions, name, yield_seconds)
            found = destination.read([str(link.external_id) for link in links]) or {}
            for link in links:
                kind = classify(link, found.get(str(link.external_id)), destination, deprovision)
                if kind is not None:
                    report.note(Drift(link.subject, link.source, str(link.external_id), kind))
            report.checked += len(links)
            if progress is not None:
                progress(report.checked, max(total, report.checked))
        if fix:
            _fix(sessions, settings, name, report)
    except Exception as error:
        report.error = scrub(f"{type(error).__name__}: {error}")[:1000]
        log.exception("reconciling %s failed", name)
    finally:
        _record(sessions, run_id, report)
    return report


def _fix(
    sessions: sessionmaker[Session], settings: Settings, name: str, report: ReconcileReport
) -> None:
    """Resync every drifted user; a purged newest state is read again from Auth0 first."""
    client: Any = None
    try:
        for drift in report.drift:
            why = _resync(sessions, name, drift.subject, relive=drift.kind == "live_deprovisioned")
            if why == "purged":
                client = client or _auth0(settings)
                why = _reread(sessions, settings, name, drift, client)
            if why is None:
                report.fixed += 1
            else:
                report.unfixed.append((drift.subject, why))
    finally:
        if client is not None:
            client.close()


def _resync(
    sessions: sessionmaker[Session], name: str, subject: str, *, relive: bool = False
) -> str | None:
    """None when the user's newest state is queued again; ``purged`` or why not otherwise.

    ``relive``: the record is live though the link says deprovisioned. The link is
    marked live first, so the forced deprovision is sent to the record again
    instead of being taken as done; another user's live link on the same record
    makes that impossible (it needs a human).
    """
    try:
        with transaction(sessions) as session:
            if relive:
                _mark_live(session, name, subject)
            resync(session=session, subject=subject, destination=name)
    except NothingToResync as error:
        return "purged" if "purged" in str(error) else str(error)
    except IntegrityError:
        return "another user's live link holds the same record; resolve it by hand"
    return None


def _mark_live(session: Session, name: str, subject: str) -> None:
    now = db_now(session)
    session.execute(
        update(Link)
        .where(
            Link.destination == name,
            Link.subject == subject,
            Link.deprovisioned,
            or_(Link.lease_token.is_(None), Link.lease_expires_at < now),
        )
        .values(deprovisioned=False)
        .execution_options(synchronize_session=False)
    )


def _auth0(settings: Settings) -> Any:
    """A Management API client, or None when the AUTH0_* settings are incomplete."""
    from idsync.auth0.client import ManagementClient

    return ManagementClient.from_settings(settings, stream=False)


def _reread(
    sessions: sessionmaker[Session], settings: Settings, name: str, drift: Drift, client: Any
) -> str | None:
    """Store the user as Auth0 holds it now, then resync it; None on success, else why not."""
    if client is None:
        from idsync.auth0.client import missing_auth0

        return (
            "the newest payload was purged by retention and Auth0 cannot be asked to "
            f"re-read the user: {missing_auth0(settings, stream=False)}"
        )
    user = client.get_user(drift.subject)
    if user is None:
        return "the newest payload was purged and Auth0 no longer has this user"
    from idsync.auth0.backfill import user_event

    event = user_event(json.dumps(user).encode(), source=drift.source, stream_id=None)
    with transaction(sessions) as session:
        record_event(session=session, event=event, destinations=[name])
    return _resync(sessions, name, drift.subject)


def _record(sessions: sessionmaker[Session], run_id: int, report: ReconcileReport) -> None:
    with transaction(sessions) as session:
        run = session.get(ReconcileRun, run_id)
        if run is None:
            return
        run.finished_at = db_now(session)
        run.checked = report.checked
        run.changed = report.counts["changed"]
        run.missing = report.counts["missing"]
        run.live_deprovisioned = report.counts["live_deprovisioned"]
        run.fixed = report.fixed
        run.unfixed = len(report.unfixed)
        run.error = report.error
