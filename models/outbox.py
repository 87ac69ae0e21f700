"""Outbox operations that ingest and workers share: record, claim, finish, sweep.

Every function takes the session as a keyword argument and never commits: the
caller (a request, a task run) owns the transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    String,
    and_,
    any_,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload, selectinload

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
    values = {
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
    }
    connection = session.connection()
    dialect = connection.dialect.name
    event_pk = connection.execute(_event_insert(dialect), values).scalar_one_or_none()
    if event_pk is None:
        stored = session.execute(
            select(Event.body_sha256).where(
                Event.source == event.source, Event.event_id == event.event_id
            )
        ).scalar_one_or_none()
        return Recorded(duplicate=True, event_pk=None, stored_sha256=stored)
    targets = tuple(destinations) if event.status is EventStatus.ACCEPTED else ()
    if targets:
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
    return Recorded(duplicate=False, event_pk=event_pk, destinations=targets)


# Claiming a user's work (workers)


@dataclass
class UserWork:
    """One user's claimed deliveries, oldest first, and the link that holds the user."""

    link: Link
    deliveries: list[Delivery]
    lost: list[Delivery] = field(default_factory=list)  # reclaimed too often: worker_lost

    def key_of(self, delivery: Delivery) -> str:
        return event_order_key(delivery.event)


@dataclass
class Claim:
    """Work taken by one worker under one lease token."""

    token: str
    now: datetime
    expires_at: datetime
    users: list[UserWork]

    @property
    def deliveries(self) -> list[Delivery]:
        return [delivery for user in self.users for delivery in user.deliveries]


def event_order_key(event: Event) -> str:
    """The order key of a stored event."""
    return order_key(
        event_time=event.event_time,
        received_at=event.received_at,
        object_updated_at=event.object_updated_at,
        event_type=event.type,
        event_id=event.event_id,
    )


def _pending(destination: str, now: datetime) -> Any:
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


def _orphaned(destination: str, now: datetime) -> Any:
    """Deliveries of ``destination`` whose worker's lease ran out (``ix_deliveries_leased``)."""
    return and_(
        Delivery.destination == destination,
        Delivery.status == DeliveryStatus.IN_PROGRESS,
        Delivery.lease_expires_at < now,
    )


def _due(destination: str, now: datetime) -> Any:
    """Deliveries of ``destination`` that a worker may take now: due, or orphaned.

    Only for statements already narrowed to a few users (by ``ix_deliveries_user``):
    an OR of the two keeps the planner off both partial indexes, so finding work
    in the whole backlog goes through ``_candidates`` instead.
    """
    return or_(_pending(destination, now), _orphaned(destination, now))


CLAIM_ORDER = (Delivery.priority, Delivery.next_attempt_at, Delivery.id)


def _candidates(destination: str, now: datetime, limit: int) -> Any:
    """The first ``limit`` due or orphaned deliveries of ``destination``, in claim order.

    The cost must not grow with the backlog (a first backfill leaves a million rows
    pending). So each condition is its own ordered, limited index scan that stops
    after ``limit`` rows, and the branches are merged: live pending work
    (``priority = 0``: an equality, so the scan ends at the first row not yet due
    instead of walking every retry scheduled for later), replays and resyncs
    (``priority > 0``), and orphans (few: at most the rows of workers that died).
    """
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


def _users_in(dialect: str, source: Any, subject: Any, users: list[tuple[str, str]]) -> Any:
    """``(source, subject)`` is one of ``users``.

    On PostgreSQL the users travel as two arrays, so the statement has the same short
    text for any batch: psycopg prepares it once and the planner joins the pairs
    against an index, instead of planning an OR of a hundred pairs on every claim.
    """
    if dialect != "postgresql":
        return tuple_(source, subject).in_(users)
    sources, subjects = zip(*users, strict=True) if users else ((), ())
    pairs = select(
        func.unnest(literal(list(sources), postgresql.ARRAY(String))),
        func.unnest(literal(list(subjects), postgresql.ARRAY(String))),
    )
    return tuple_(source, subject).in_(pairs)


def _ids_in(dialect: str, column: Any, ids: list[int]) -> Any:
    """``column`` is one of ``ids``: one array parameter on PostgreSQL (see ``_users_in``)."""
    if dialect != "postgresql":
        return column.in_(ids)
    return column == any_(literal(ids, postgresql.ARRAY(BigInteger)))


def _missing_links(dialect: str, destination: str, users: list[tuple[str, str]]) -> Any:
    """Create the links of ``users`` that do not exist yet; existing ones stay as they are."""
    if dialect != "postgresql":
        rows = [{"destination": destination, "source": s, "subject": u} for s, u in users]
        return (
            sqlite.insert(Link)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["destination", "source", "subject"])
        )
    sources, subjects = zip(*users, strict=True)
    statement = postgresql.insert(Link).from_select(
        ["destination", "source", "subject"],
        select(
            literal(destination, String),
            func.unnest(literal(list(sources), postgresql.ARRAY(String))),
            func.unnest(literal(list(subjects), postgresql.ARRAY(String))),
        ),
    )
    return statement.on_conflict_do_nothing(index_elements=["destination", "source", "subject"])


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
    """
    now = db_now(session)
    token = str(uuid.uuid4())
    expires_at = now + lease
    candidates = session.execute(_candidates(destination, now, max_users * 4)).all()
    users = list(dict.fromkeys((row.source, row.subject) for row in candidates))[:max_users]
    if not users:
        return Claim(token=token, now=now, expires_at=expires_at, users=[])
    dialect = session.get_bind().dialect.name
    session.execute(_missing_links(dialect, destination, users))
    free = (
        select(Link.id)
        .where(
            Link.destination == destination,
            _users_in(dialect, Link.source, Link.subject, users),
            or_(Link.lease_token.is_(None), Link.lease_expires_at < now),
        )
        .order_by(Link.id)
        .with_for_update(skip_locked=True)
    )
    links = session.scalars(
        update(Link)
        .where(Link.id.in_(free.scalar_subquery()))
        .values(lease_token=token, lease_expires_at=expires_at)
        .returning(Link)
        .execution_options(synchronize_session=False, populate_existing=True)
    ).all()
    if not links:
        return Claim(token=token, now=now, expires_at=expires_at, users=[])
    held = [(link.source, link.subject) for link in links]
    # The ids come back from the UPDATE: deliveries have no index on the lease token.
    claimed_ids = session.scalars(
        update(Delivery)
        .where(
            Delivery.destination == destination,
            _users_in(dialect, Delivery.source, Delivery.subject, held),
            _due(destination, now),
        )
        .values(
            reclaims=Delivery.reclaims
            + case((Delivery.status == DeliveryStatus.IN_PROGRESS, 1), else_=0),
            status=DeliveryStatus.IN_PROGRESS,
            lease_token=token,
            lease_expires_at=expires_at,
            updated_at=now,
            task_id=task_id,
        )
        .returning(Delivery.id)
        .execution_options(synchronize_session=False)
    ).all()
    claimed = session.scalars(
        select(Delivery)
        .where(_ids_in(dialect, Delivery.id, list(claimed_ids)))
        .options(joinedload(Delivery.event, innerjoin=True))
        .execution_options(populate_existing=True)
    ).all()
    return Claim(
        token=token,
        now=now,
        expires_at=expires_at,
        users=_group_by_user(links, claimed, max_reclaims),
    )


def _group_by_user(
    links: Iterable[Link], claimed: Iterable[Delivery], max_reclaims: int
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
    rows = session.scalars(
        select(Link.id).where(Link.id.in_(ids), Link.lease_token == token).with_for_update()
    ).all()
    return set(rows)


def live_contacts_of_others(
    *, session: Session, destination: str, contact_ids: Iterable[str], link_ids: Iterable[int]
) -> set[str]:
    """Those of ``contact_ids`` that a live link outside ``link_ids`` holds."""
    ids = list(set(contact_ids))
    if not ids:
        return set()
    rows = session.scalars(
        select(Link.external_id).where(
            Link.destination == destination,
            Link.external_id.in_(ids),
            ~Link.deprovisioned,  # as the partial index says it, so it is used
            Link.id.not_in(list(link_ids)),
        )
    ).all()
    return {row for row in rows if row is not None}


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


def write_links(*, session: Session, token: str, now: datetime, rows: list[dict[str, Any]]) -> None:
    """Write the new state of held links and release them: one statement, many rows.

    Each row has ``id`` and every field of ``LINK_STATE``; the caller has locked
    the rows with ``still_held``, so the compare-and-set on the token holds.
    """
    if rows:
        statement = _many(Link.__table__, LINK_STATE, token, now)
        session.execute(statement, [_params(row, LINK_STATE) for row in rows])


def write_deliveries(
    *, session: Session, token: str, now: datetime, rows: list[dict[str, Any]]
) -> None:
    """Write the new state of claimed deliveries: one statement, many rows."""
    if rows:
        statement = _many(Delivery.__table__, DELIVERY_STATE, token, now)
        session.execute(statement, [_params(row, DELIVERY_STATE) for row in rows])


def _params(row: dict[str, Any], columns: tuple[str, ...]) -> dict[str, Any]:
    return {"row_id": row["id"], **{f"new_{column}": row[column] for column in columns}}


# Sweep and pauses


def has_due_work(*, session: Session, destination: str) -> bool:
    """Whether any delivery of ``destination`` is due or orphaned right now."""
    now = db_now(session)
    return session.execute(_candidates(destination, now, 1)).first() is not None


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
