"""The guard against mass deprovisioning: count, hold, release.

An IdP misconfiguration (a wrong group rule, an unassigned application) can
deprovision every user in minutes, and a destination cannot undo an archive.
``DEPROVISION_GUARD`` (``100/1h``) lets at most that many deprovisions reach a
destination per rolling window; the rest stay ``pending`` with
``held = 'deprovision_guard'``, which the claim never takes, until an operator
approves them (``idsync destinations approve-deprovisions``) or the users'
newer events make them stale.

What it guarantees:

- The count lives in the database (``deliveries.deprovision_counted_at``), so
  it holds across workers and machines: deciding takes a row lock on the
  destination's ``destination_states`` row, so two workers cannot both let the
  hundredth deprovision through.
- A deprovision is counted once, when it is let through; its retries are not
  counted again. Backfilled deprovisions count like live ones.
- Approving releases every held delivery of the destination and restarts the
  count from that moment (``destination_states.deprovisions_approved_at``).

Every function takes the session as a keyword argument and never commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, selectinload

from models.db import db_now
from models.outbox import event_order_key
from models.tables import Delivery, DeliveryStatus, DestinationState, Event, Link

GUARD_HOLD = "deprovision_guard"


@dataclass(frozen=True)
class Deprovision:
    """One claimed user whose newest intent is a deprovision, as the guard sees it."""

    delivery_id: int  # the user's newest delivery: the deprovision
    link_id: int  # the user's link, held by the claim
    delivery_ids: tuple[int, ...]  # every delivery of the user in the claim


@dataclass(frozen=True)
class GuardState:
    """How a destination's guard stands: its window count and what it holds."""

    destination: str
    limit: int | None  # None: the guard is off
    window_seconds: float | None
    counted: int  # deprovisions let through in the current window
    held: int  # deliveries waiting for approval
    approved_at: datetime | None


def _lock_state(session: Session, destination: str) -> DestinationState:
    """The destination's state row, created if need be and locked until commit."""
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    session.execute(
        module.insert(DestinationState)
        .values(name=destination)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    state = session.get(DestinationState, destination, with_for_update=True, populate_existing=True)
    assert state is not None
    return state


def _window_start(now: datetime, window_seconds: float, approved_at: datetime | None) -> datetime:
    start = now - timedelta(seconds=window_seconds)
    return max(start, approved_at) if approved_at is not None else start


def _counted_since(session: Session, destination: str, since: datetime) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.destination == destination, Delivery.deprovision_counted_at > since)
        )
        or 0
    )


def hold_excess(
    *,
    session: Session,
    destination: str,
    token: str,
    limit: int,
    window_seconds: float,
    deprovisions: Sequence[Deprovision],
) -> set[int]:
    """Count ``deprovisions`` into the window and hold those beyond ``limit``.

    Returns the ids of the newest deliveries held. A held user's claimed
    deliveries all go back to ``pending`` and held (so nothing older of the user
    is sent on its own), without spending an attempt, and the claim's hold on
    the user's link is released. Deliveries counted before (a retry) pass
    without counting again. Only rows ``token`` still holds are written.
    """
    if not deprovisions:
        return set()
    state = _lock_state(session, destination)
    now = db_now(session)
    counted = _counted_since(
        session, destination, _window_start(now, window_seconds, state.deprovisions_approved_at)
    )
    ids = [item.delivery_id for item in deprovisions]
    already = set(
        session.scalars(
            select(Delivery.id).where(
                Delivery.id.in_(ids), Delivery.deprovision_counted_at.is_not(None)
            )
        )
    )
    passing: list[int] = []
    held: list[Deprovision] = []
    for item in deprovisions:
        if item.delivery_id in already:
            continue
        if counted < limit:
            passing.append(item.delivery_id)
            counted += 1
        else:
            held.append(item)
    if passing:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(passing), Delivery.lease_token == token)
            .values(deprovision_counted_at=now)
            .execution_options(synchronize_session=False)
        )
    if held:
        _hold(session, token, now, held)
    return {item.delivery_id for item in held}


def _hold(session: Session, token: str, now: datetime, held: Sequence[Deprovision]) -> None:
    session.execute(
        update(Delivery)
        .where(
            Delivery.id.in_([i for item in held for i in item.delivery_ids]),
            Delivery.lease_token == token,
        )
        .values(
            status=DeliveryStatus.PENDING,
            held=GUARD_HOLD,
            lease_token=None,
            lease_expires_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Link)
        .where(Link.id.in_([item.link_id for item in held]), Link.lease_token == token)
        .values(lease_token=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )


def held_counts(*, session: Session) -> dict[str, int]:
    """``{destination: deliveries held by the guard}``; destinations holding none are absent."""
    rows = session.execute(
        select(Delivery.destination, func.count())
        .where(Delivery.held == GUARD_HOLD, Delivery.status == DeliveryStatus.PENDING)
        .group_by(Delivery.destination)
    ).all()
    return {name: int(count) for name, count in rows}


def guard_state(
    *, session: Session, destination: str, limit: tuple[int, float] | None
) -> GuardState:
    """How ``destination``'s guard stands now, for the CLI, /readyz and the admin page."""
    state = session.get(DestinationState, destination)
    approved_at = state.deprovisions_approved_at if state else None
    counted = 0
    if limit is not None:
        now = db_now(session)
        counted = _counted_since(session, destination, _window_start(now, limit[1], approved_at))
    return GuardState(
        destination=destination,
        limit=limit[0] if limit else None,
        window_seconds=limit[1] if limit else None,
        counted=counted,
        held=held_counts(session=session).get(destination, 0),
        approved_at=approved_at,
    )


def approve_deprovisions(*, session: Session, destination: str, dry_run: bool = False) -> int:
    """Release every delivery the guard holds for ``destination``; returns how many.

    They become due now, pass the guard without counting, and the window's
    count restarts: deprovisions after this moment are counted from zero.
    ``dry_run`` only counts. A held deprovision that the user's newer events
    made stale still ends ``skipped: stale`` by the normal order rule.
    """
    state = _lock_state(session, destination)
    held = held_counts(session=session).get(destination, 0)
    if dry_run:
        return held
    now = db_now(session)
    session.execute(
        update(Delivery)
        .where(Delivery.destination == destination, Delivery.held == GUARD_HOLD)
        .values(held=None, next_attempt_at=now, deprovision_counted_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    state.deprovisions_approved_at = now
    session.flush()
    return held


def drop_stale_holds(*, session: Session, destination: str, limit: int = 1000) -> int:
    """Finish held deliveries that the user's newer applied events made stale.

    When the IdP is fixed instead of the deprovisions approved, the users' next
    events reach the destination and move their links' last applied key past
    the held deprovisions: those end ``skipped: stale`` here, as the worker
    would skip them, so the held count shrinks by itself. Safe to run twice.
    """
    rows = session.execute(
        select(Delivery, Link.last_order_key)
        .join(Event, Event.id == Delivery.event_pk)
        .join(
            Link,
            (Link.destination == Delivery.destination)
            & (Link.source == Delivery.source)
            & (Link.subject == Delivery.subject),
        )
        .where(
            Delivery.destination == destination,
            Delivery.held == GUARD_HOLD,
            Delivery.status == DeliveryStatus.PENDING,
            ~Delivery.force,
            Link.last_order_key.is_not(None),
        )
        .options(selectinload(Delivery.event))
        .limit(limit)
    ).all()
    stale = [
        delivery.id
        for delivery, last_key in rows
        if last_key is not None and event_order_key(delivery.event) <= last_key
    ]
    if not stale:
        return 0
    now = db_now(session)
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_(stale), Delivery.held == GUARD_HOLD)
        .values(
            status=DeliveryStatus.SKIPPED,
            reason="stale",
            held=None,
            finished_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return len(stale)
