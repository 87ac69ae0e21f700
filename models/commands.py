"""Operator commands on the outbox: replay, resync, forget, pause and resume.

The admin API and the ``idsync`` command line share these. Every function takes
the session as a keyword argument and never commits: the caller owns the
transaction.

Replays are set-based (one UPDATE per chunk of ids, however many rows match) and
safe by construction: a replayed delivery goes back through the worker, which
skips an event older than the user's last applied one as ``stale``. Replayed
work gets a lower priority than live traffic, so a large replay never starves
new events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, not_, null, or_, select, tuple_, update
from sqlalchemy.orm import Session, aliased

from models.db import db_now
from models.ordering import order_key
from models.outbox import set_paused
from models.queries import DeliveryFilter, filter_conditions, payload_present
from models.tables import (
    FINISHED,
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    DestinationState,
    Event,
    EventStatus,
    Link,
    Quarantine,
)

DEFAULT_CHUNK_SIZE = 5000
# Live traffic is claimed at priority 0, an operator's replay or resync after it.
REPLAY_PRIORITY = 1
FORGOTTEN = "forgotten"

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each chunk of a replay."""


# Replay and resync


@dataclass(frozen=True)
class ReplayResult:
    """How many deliveries matched, how many went back to pending, and where to."""

    matched: int
    replayed: int
    destinations: tuple[str, ...] = field(default_factory=tuple)
    # Matched but left alone: their event's payload is gone, so nothing can be sent.
    purged: int = 0


def _replayable_statuses(filter: DeliveryFilter | None) -> tuple[DeliveryStatus, ...]:
    if filter is None:
        return FINISHED  # ids named one by one: any finished delivery
    if filter.status is None:
        return (DeliveryStatus.FAILED,)
    if filter.status not in FINISHED:
        raise ValueError(
            f"{filter.status.value} deliveries are still on their way and cannot be "
            "replayed; replay failed, skipped or succeeded ones"
        )
    return (filter.status,)


def _fresh_budget(now: datetime, **extra: Any) -> dict[str, Any]:
    """Column values that put a delivery back in the queue, behind live traffic."""
    return {
        "status": DeliveryStatus.PENDING,
        "attempts": 0,
        "reclaims": 0,
        "reason": None,
        "next_attempt_at": now,
        "finished_at": None,
        "priority": REPLAY_PRIORITY,
        "lease_token": None,
        "lease_expires_at": None,
        "updated_at": now,
        **extra,
    }


def replay(
    *,
    session: Session,
    filter: DeliveryFilter | None = None,
    delivery_ids: Sequence[int] | None = None,
    dry_run: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> ReplayResult:
    """Put finished deliveries back to ``pending`` with a fresh attempt budget.

    Choose them by ``filter`` (failed ones unless it names another finished
    status; paging is ignored: every match is replayed) or by ``delivery_ids``
    (any finished delivery). Pending and in-progress deliveries are never
    touched, nor events whose payload retention already purged (sending them
    would clear the contact). Attempts and ``last_error`` are kept for history.
    """
    if (filter is None) == (delivery_ids is None):
        raise ValueError("replay needs either a filter or delivery ids, not both")
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    statuses = _replayable_statuses(filter)
    target, event = aliased(Delivery), aliased(Event)
    conditions = [
        target.status.in_(statuses),
        *(filter_conditions(filter, target, event) if filter is not None else []),
    ]
    if delivery_ids is not None:
        conditions.append(target.id.in_(list(delivery_ids)))
    unsendable = [*conditions, not_(payload_present(event.payload))]
    conditions.append(payload_present(event.payload))
    matches = session.execute(
        select(target.destination, func.count(), func.max(target.id))
        .join(event, event.id == target.event_pk)
        .where(*conditions)
        .group_by(target.destination)
        .order_by(target.destination)
    ).all()
    matched = sum(row[1] for row in matches)
    destinations = tuple(row[0] for row in matches)
    if not matched:
        # Say why nothing matched when the reason is a purged payload.
        purged = session.scalar(
            select(func.count())
            .select_from(target)
            .join(event, event.id == target.event_pk)
            .where(*unsendable)
        )
        return ReplayResult(matched=0, replayed=0, purged=int(purged or 0))
    if dry_run:
        return ReplayResult(matched=matched, replayed=0, destinations=destinations)
    # Walk down the ids from the highest match, so each chunk reads only new rows;
    # rows that turn finished while the replay runs are left for another one.
    bound = max(row[2] for row in matches)
    values = _fresh_budget(db_now(session), force=False)
    replayed = 0
    while replayed < matched:
        chunk = (
            select(target.id)
            .join(event, event.id == target.event_pk)
            .where(*conditions, target.id <= bound)
            .order_by(target.id.desc())
            .limit(chunk_size)
        )
        changed = session.scalars(
            update(Delivery)
            .where(Delivery.id.in_(chunk), Delivery.status.in_(statuses))
            .values(**values)
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        ).all()
        if not changed:
            break  # someone else replayed the rest meanwhile
        replayed += len(changed)
        bound = min(changed) - 1
        if progress is not None:
            progress(min(replayed, matched), matched)
    return ReplayResult(matched=matched, replayed=replayed, destinations=destinations)


class NothingToResync(LookupError):
    """No stored event of the subject can be sent again; the message says why."""


@dataclass(frozen=True)
class _Candidate:
    pk: int
    source: str
    key: str
    has_payload: bool


def resync(*, session: Session, subject: str, destination: str | None = None) -> int:
    """Send the newest state of ``subject`` again, regardless of the stale rule.

    The delivery of the user's newest accepted ``user.*`` event (per source, and
    per destination unless one is named) goes back to pending with ``force``, so
    the worker sends it even if it was applied already or looks unchanged.
    Returns how many deliveries were queued; raises NothingToResync otherwise.
    """
    rows = session.execute(
        select(
            Event.id,
            Event.source,
            Event.event_id,
            Event.type,
            Event.event_time,
            Event.received_at,
            Event.object_updated_at,
            payload_present(Event.payload),
        ).where(
            Event.subject == subject,
            Event.status == EventStatus.ACCEPTED,
            Event.type.startswith("user.", autoescape=True),
        )
    ).all()
    if not rows:
        raise NothingToResync(f"no accepted user event is stored for subject {subject!r}")
    newest: dict[str, _Candidate] = {}
    for pk, source, event_id, kind, event_time, received_at, updated_at, has_payload in rows:
        key = order_key(
            event_time=event_time,
            received_at=received_at,
            object_updated_at=updated_at,
            event_type=kind,
            event_id=event_id,
        )
        if source not in newest or key > newest[source].key:
            newest[source] = _Candidate(pk, source, key, bool(has_payload))
    sendable = [candidate.pk for candidate in newest.values() if candidate.has_payload]
    if not sendable:
        raise NothingToResync(
            f"the newest event of subject {subject!r} was purged by retention "
            "(RETENTION_DAYS); its state will be sent with the user's next change"
        )
    statement = update(Delivery).where(Delivery.event_pk.in_(sendable))
    if destination is not None:
        statement = statement.where(Delivery.destination == destination)
    queued = session.execute(
        statement.values(
            # A new message id for receivers that dedupe: this is a deliberate re-send.
            **_fresh_budget(db_now(session), force=True, resyncs=Delivery.resyncs + 1)
        ).execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if not queued:
        where = f" to {destination}" if destination else ""
        raise NothingToResync(f"the newest event of subject {subject!r} has no delivery{where}")
    # An operator who resyncs has resolved a shared record: lift the conflict flag.
    cleared = update(Link).where(Link.subject == subject, Link.conflict.is_not(None))
    if destination is not None:
        cleared = cleared.where(Link.destination == destination)
    session.execute(cleared.values(conflict=None).execution_options(synchronize_session=False))
    return int(queued)


# Personal data


def forget(*, session: Session, subject: str) -> dict[str, int]:
    """Erase one person's personal data; returns how many rows of each kind changed.

    Clears the payloads of the subject's events, the response excerpts and last
    errors of their deliveries, the email remembered in their links, and deletes
    quarantined bodies that name them. Their unfinished or failed deliveries end
    ``skipped: forgotten``: without a payload there is nothing left to send.
    The ids and times that order events stay, so the user's later events still
    apply in order.
    """
    if not subject or not subject.strip():
        raise ValueError("forget needs the subject (Auth0 user_id) of one person")
    now = db_now(session)
    their_deliveries = select(Delivery.id).where(Delivery.subject == subject)
    closed = session.execute(
        update(Delivery)
        .where(
            Delivery.subject == subject,
            Delivery.status.in_(
                [DeliveryStatus.PENDING, DeliveryStatus.IN_PROGRESS, DeliveryStatus.FAILED]
            ),
        )
        .values(
            status=DeliveryStatus.SKIPPED,
            reason=FORGOTTEN,
            lease_token=None,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    payloads = session.execute(
        update(Event)
        .where(Event.subject == subject, payload_present(Event.payload))
        .values(payload=null())
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    excerpts = session.execute(
        update(DeliveryAttempt)
        .where(
            DeliveryAttempt.delivery_id.in_(their_deliveries),
            DeliveryAttempt.response_excerpt.is_not(None),
        )
        .values(response_excerpt=None)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    errors = session.execute(
        update(Delivery)
        .where(Delivery.subject == subject, Delivery.last_error.is_not(None))
        .values(last_error=None)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    emails = session.execute(
        update(Link)
        .where(Link.subject == subject, Link.last_email.is_not(None))
        .values(last_email=None)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    # A batch running for them now must not write back the email it read at its claim:
    # taking its hold away makes its compare-and-set write nothing.
    session.execute(
        update(Link)
        .where(Link.subject == subject, Link.lease_token.is_not(None))
        .values(lease_token=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    their_event_ids = select(Event.source, Event.event_id).where(Event.subject == subject)
    quarantined = session.execute(
        delete(Quarantine)
        .where(
            or_(
                and_(
                    Quarantine.event_id.is_not(None),
                    tuple_(Quarantine.source, Quarantine.event_id).in_(their_event_ids),
                ),
                Quarantine.body.contains(subject, autoescape=True),
            )
        )
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return {
        "event_payloads": payloads,
        "attempt_excerpts": excerpts,
        "delivery_errors": errors,
        "link_emails": emails,
        "quarantine_rows": quarantined,
        "deliveries_closed": closed,
    }


# Destinations


def pause_destination(*, session: Session, name: str, reason: str | None = None) -> None:
    """Pause ``name`` by hand; only an operator's resume lifts it (the probe does not)."""
    set_paused(
        session=session,
        name=name,
        paused=True,
        reason=reason,
        by="operator",
    )


def resume_destination(*, session: Session, name: str) -> None:
    """Resume ``name``, whoever paused it."""
    set_paused(session=session, name=name, paused=False, reason=None, by="operator")


def destination_states(*, session: Session) -> dict[str, DestinationState]:
    """Every stored destination state by name (a destination never paused has none)."""
    return {state.name: state for state in session.scalars(select(DestinationState))}
