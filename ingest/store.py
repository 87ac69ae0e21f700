"""Storing one Auth0 event exactly as the webhook does, whoever brings it.

The webhook and recovery of Auth0's failed deliveries (``idsync/auth0/recovery.py``)
both call ``store_document``: the source allow-list, validation, quarantine of a
body that can never be stored, deduplication on (source, id) and the wake-up
after commit are one path, so an event read back from Auth0 is treated exactly
as if Auth0 had delivered it. The caller turns the ``StoreResult`` into its own
answer (an HTTP status, a count).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from sqlalchemy import Engine
from sqlalchemy.exc import DataError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from idsync.settings import Settings
from ingest.validation import (
    InvalidEvent,
    canonical_json,
    clean_text,
    quarantine_text,
    read_envelope,
    to_new_event,
)
from models.db import transaction
from models.outbox import NewEvent, commit_event
from models.tables import EventStatus, Quarantine, ReceivedVia

log = logging.getLogger(__name__)

Outcome = Literal["accepted", "ignored", "duplicate", "rejected", "forbidden", "unavailable"]
NOT_ALLOWED = "this event source is not in INGEST_ALLOWED_SOURCES"
UNAVAILABLE = "the outbox database is unavailable; retry later"


class Wakes(Protocol):
    """What wakes the workers of a destination after commit (``idsync.wakeups.Waker``)."""

    def wake(self, destination: str) -> Any: ...


@dataclass(frozen=True)
class StoreResult:
    """What storing one event did.

    ``accepted`` and ``ignored`` are committed; ``duplicate`` was committed
    before; ``rejected`` can never be stored (quarantined when the database
    could hold it); ``forbidden`` is a source outside the allow-list;
    ``unavailable`` means the database could not commit now: try again.
    """

    outcome: Outcome
    event_id: str | None = None
    reason: str | None = None
    deliveries: int = 0

    @property
    def committed(self) -> bool:
        """Whether the event is in the outbox now (a 2xx for the webhook)."""
        return self.outcome in ("accepted", "ignored", "duplicate")


def document_sha256(document: Any) -> str:
    """A hash of the event's content, the same whatever JSON spelling carried it.

    Auth0's redelivered copy and the copy recovery reads from the deliveries API
    are the same event in different bytes (key order, spacing), so duplicates
    are compared by content, not by the bytes of one request.
    """
    return hashlib.sha256(canonical_json(document).encode()).hexdigest()


def source_allowed(settings: Settings, document: dict[str, Any]) -> bool:
    """Whether ``INGEST_ALLOWED_SOURCES`` (when set) names the event's source or tenant."""
    allowed = settings.ingest_allowed_sources
    if not allowed:
        return True
    envelope = read_envelope(document)
    return envelope.source in allowed or envelope.tenant in allowed


def _column_text(value: object) -> str | None:
    return clean_text(value)[:255] if isinstance(value, str) else None


def quarantine(
    sessions: sessionmaker[Session], body: bytes, reason: str, document: Any | None
) -> StoreResult:
    """Keep a body that failed validation, for operators: ``rejected``, or ``unavailable``
    when even the quarantine cannot be committed (so that Auth0 sends it again)."""
    fields = document if isinstance(document, dict) else {}
    try:
        with transaction(sessions) as session:
            session.add(
                Quarantine(
                    reason=reason,
                    source=_column_text(fields.get("source")),
                    event_id=_column_text(fields.get("id")),
                    body=quarantine_text(body, document),
                )
            )
    except DataError:
        log.exception("rejected a body (%s) and could not quarantine it", reason)
    except SQLAlchemyError as error:
        log.error(
            "rejected a body (%s) but could not quarantine it: database unavailable (%s)",
            reason,
            type(error).__name__,
        )
        return StoreResult("unavailable", reason=UNAVAILABLE)
    else:
        log.warning("rejected a body and quarantined it: %s", reason)
    return StoreResult("rejected", event_id=_column_text(fields.get("id")), reason=reason)


def store_document(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    waker: Wakes,
    document: Any,
    body: bytes,
    received_via: ReceivedVia = ReceivedVia.WEBHOOK,
    engine: Engine | None = None,
) -> StoreResult:
    """Store one parsed CloudEvent the way the webhook does, then wake its destinations.

    ``body`` is what the quarantine keeps when the event is refused. Nothing
    enters the outbox unless the result is committed. ``engine`` records the
    event (the webhook's autocommit engine, see ``models.outbox.commit_event``);
    by default the engine of ``sessions``.
    """
    try:
        if not source_allowed(settings, document):
            return StoreResult("forbidden", reason=NOT_ALLOWED)
        canonical = _canonical_or_none(document)
        event = to_new_event(document, b"", canonical=canonical)
    except InvalidEvent as error:
        return quarantine(sessions, body, str(error), document)
    # One canonical text serves validation and the duplicate check's hash alike.
    sha256 = (
        hashlib.sha256(canonical.encode()).hexdigest()
        if canonical is not None
        else document_sha256(document)
    )
    event = replace(event, body_sha256=sha256, received_via=received_via.value)
    return _record(sessions, engine or sessions.kw["bind"], settings, waker, event, body, document)


def _canonical_or_none(document: Any) -> str | None:
    try:
        return canonical_json(document)
    except (ValueError, TypeError, RecursionError):
        return None  # validation walks the document and says what is wrong with it


def _record(
    sessions: sessionmaker[Session],
    engine: Engine,
    settings: Settings,
    waker: Wakes,
    event: NewEvent,
    body: bytes,
    document: Any,
) -> StoreResult:
    try:
        recorded = commit_event(engine=engine, event=event, destinations=settings.destinations)
    except DataError as error:
        # Validation should have caught this value: the database refuses this body,
        # and would refuse every retry of it, so keep it and say so.
        code = getattr(error.orig, "sqlstate", None)
        log.error("event %s refused by the database (SQLSTATE %s)", event.event_id, code)
        return quarantine(
            sessions, body, f"the database refused a value of this event ({code})", document
        )
    except SQLAlchemyError as error:
        log.error(
            "event %s not stored: database unavailable (%s)", event.event_id, type(error).__name__
        )
        return StoreResult("unavailable", event_id=event.event_id, reason=UNAVAILABLE)
    if recorded.duplicate:
        if recorded.stored_sha256 != event.body_sha256:
            log.warning(
                "event %s from %s repeated with a different body; kept the first",
                event.event_id,
                event.source,
            )
        return StoreResult("duplicate", event_id=event.event_id)
    for destination in recorded.destinations:
        waker.wake(destination)
    if event.status is EventStatus.IGNORED:
        return StoreResult("ignored", event_id=event.event_id, reason=event.ignore_reason)
    return StoreResult("accepted", event_id=event.event_id, deliveries=len(recorded.destinations))
