"""Outbox operations for operators: find deliveries, read why they failed, replay them.

The admin API and the ``idsync`` command line share these functions, and the
masked views of rows that they show. Every function takes the session as a
keyword argument and never commits: the caller owns the transaction.

Replays are set-based (one UPDATE per chunk of ids, however many rows match) and
safe by construction: a replayed delivery goes back through the worker, which
skips an event older than the user's last applied one as ``stale``. Replayed
work gets a lower priority than live traffic, so a large replay never starves
new events.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    ColumnElement,
    and_,
    delete,
    func,
    not_,
    null,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session, aliased, contains_eager, selectinload

from idsync.logs import scrub
from models.db import db_now
from models.ordering import order_key
from models.outbox import set_paused
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

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
DEFAULT_CHUNK_SIZE = 5000
# Live traffic is claimed at priority 0, an operator's replay or resync after it.
REPLAY_PRIORITY = 1
FORGOTTEN = "forgotten"

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each chunk of a replay."""


# Filters


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_moment(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO 8601 date or time (UTC unless it says otherwise), or a duration ago.

    ``2025-03-01``, ``2025-03-01T12:00:00Z`` and ``24h`` (24 hours before now) are
    all accepted, so that operators can write ``--since 2h``.
    """
    relative = _DURATION.match(text)
    if relative:
        seconds = float(relative.group(1)) * _UNIT[relative.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (write e.g. 2025-03-01, 2025-03-01T12:00:00Z or 24h)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _whole_number(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise ValueError(f"{name} must be a whole number, not {value!r}")


@dataclass(frozen=True)
class DeliveryFilter:
    """Which deliveries an operator means; ``since``/``until`` apply to ``created_at``.

    Paging is by ``cursor``: the ``next_cursor`` of the previous page (a delivery
    id; pages go from the newest delivery to the oldest).
    """

    status: DeliveryStatus | None = None
    destination: str | None = None
    event_type: str | None = None
    subject: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = DEFAULT_LIMIT
    cursor: int | None = None

    def __post_init__(self) -> None:
        if self.status is not None and not isinstance(self.status, DeliveryStatus):
            known = ", ".join(status.value for status in DeliveryStatus)
            try:
                object.__setattr__(self, "status", DeliveryStatus(str(self.status)))
            except ValueError:
                raise ValueError(f"unknown status {self.status!r}; use one of: {known}") from None
        for name in ("destination", "event_type", "subject"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty text")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise ValueError(f"{name} must be a time with a time zone")
        if self.since and self.until and self.since > self.until:
            raise ValueError("since must not be after until")
        limit = _whole_number("limit", self.limit)
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
        object.__setattr__(self, "limit", limit)
        if self.cursor is not None:
            cursor = _whole_number("cursor", self.cursor)
            if cursor < 1:
                raise ValueError("cursor must be the next_cursor of a previous page")
            object.__setattr__(self, "cursor", cursor)

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], *, now: datetime | None = None
    ) -> DeliveryFilter:
        """A filter from text parameters (a query string, a JSON body, CLI options).

        Empty values count as absent; an unknown name is an error, so a typo does
        not silently widen a bulk replay.
        """
        names = {item.name for item in fields(cls)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown}; use: {', '.join(sorted(names))}")
        values: dict[str, Any] = {
            name: value for name, value in params.items() if value is not None and value != ""
        }
        for name in ("since", "until"):
            if isinstance(values.get(name), str):
                values[name] = parse_moment(values[name], now=now)
        return cls(**values)


def _conditions(
    item: DeliveryFilter, delivery: type[Delivery] | Any, event: type[Event] | Any
) -> list[ColumnElement[bool]]:
    """The filter's conditions on ``delivery`` joined to ``event`` (paging aside)."""
    conditions: list[ColumnElement[bool]] = []
    if item.status is not None:
        conditions.append(delivery.status == item.status)
    if item.destination is not None:
        conditions.append(delivery.destination == item.destination)
    if item.subject is not None:
        conditions.append(delivery.subject == item.subject)
    if item.event_type is not None:
        conditions.append(event.type == item.event_type)
    if item.since is not None:
        conditions.append(delivery.created_at >= item.since)
    if item.until is not None:
        conditions.append(delivery.created_at < item.until)
    return conditions


def _has_payload(payload: Any) -> ColumnElement[bool]:
    """Whether an event still has its payload.

    A cleared payload is SQL NULL or, where it was set from Python's None, the
    JSON value ``null``: both mean there is nothing left to send.
    """
    return and_(payload.is_not(None), payload != JSON.NULL)


# Reading


def list_deliveries(
    *, session: Session, filter: DeliveryFilter
) -> tuple[list[Delivery], int | None]:
    """One page of deliveries, newest first, with their events (payloads not loaded).

    Returns the rows and the cursor of the next page (None on the last page).
    """
    statement = (
        select(Delivery)
        .join(Delivery.event)
        .options(contains_eager(Delivery.event).defer(Event.payload))
        .where(*_conditions(filter, Delivery, Event))
        .order_by(Delivery.id.desc())
        .limit(filter.limit + 1)
    )
    if filter.cursor is not None:
        statement = statement.where(Delivery.id < filter.cursor)
    rows = list(session.scalars(statement).all())
    if len(rows) > filter.limit:
        return rows[: filter.limit], rows[filter.limit - 1].id
    return rows, None


def counts_by_status(*, session: Session) -> dict[str, dict[str, int]]:
    """``{destination: {status: number of deliveries}}`` over the whole outbox."""
    rows = session.execute(
        select(Delivery.destination, Delivery.status, func.count())
        .group_by(Delivery.destination, Delivery.status)
        .order_by(Delivery.destination, Delivery.status)
    ).all()
    counts: dict[str, dict[str, int]] = {}
    for destination, status, number in rows:
        counts.setdefault(destination, {})[DeliveryStatus(status).value] = number
    return counts


@dataclass(frozen=True)
class DeliveryDetail:
    """One delivery with its event and every attempt, oldest attempt first."""

    delivery: Delivery
    event: Event
    attempts: list[DeliveryAttempt]


def delivery_detail(*, session: Session, delivery_id: int) -> DeliveryDetail | None:
    """The delivery ``delivery_id`` with its event and attempts, or None if unknown."""
    delivery = session.scalars(
        select(Delivery)
        .where(Delivery.id == delivery_id)
        .options(selectinload(Delivery.event), selectinload(Delivery.attempt_records))
    ).one_or_none()
    if delivery is None:
        return None
    return DeliveryDetail(
        delivery=delivery, event=delivery.event, attempts=list(delivery.attempt_records)
    )


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
        *(_conditions(filter, target, event) if filter is not None else []),
    ]
    if delivery_ids is not None:
        conditions.append(target.id.in_(list(delivery_ids)))
    unsendable = [*conditions, not_(_has_payload(event.payload))]
    conditions.append(_has_payload(event.payload))
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
            _has_payload(Event.payload),
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
        statement.values(**_fresh_budget(db_now(session), force=True)).execution_options(
            synchronize_session=False
        )
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
        .where(Event.subject == subject, _has_payload(Event.payload))
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


# Masked views, as the admin API and the command line show them


_SECRET_KEY = re.compile(r"(?i)token|secret|password|authorization|api_?key")
# Invalid addresses (no top-level domain, e.g. "ann@localhost") are personal data too.
_ANY_EMAIL = re.compile(
    r"([A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]*@(?!\*)([A-Za-z0-9\-][A-Za-z0-9.\-]*)"
)
REDACTED = "***"


def masked(value: Any) -> Any:
    """``value`` with every email masked and every credential-like field redacted."""
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _SECRET_KEY.search(str(key)) and item else masked(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [masked(item) for item in value]
    if isinstance(value, str):
        return _ANY_EMAIL.sub(r"\1***@\2", scrub(value))
    return value


def _time(moment: datetime | date | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def delivery_view(delivery: Delivery) -> dict[str, Any]:
    """A delivery as operators see it (masked), with a summary of its event."""
    event = delivery.event
    view = {
        "id": delivery.id,
        "destination": delivery.destination,
        "status": delivery.status.value,
        "reason": delivery.reason,
        "source": delivery.source,
        "subject": delivery.subject,
        "event": {
            "id": event.id,
            "event_id": event.event_id,
            "type": event.type,
            "time": _time(event.event_time),
        },
        "priority": delivery.priority,
        "force": delivery.force,
        "attempts": delivery.attempts,
        "reclaims": delivery.reclaims,
        "next_attempt_at": _time(delivery.next_attempt_at),
        "last_error": delivery.last_error,
        "last_status_code": delivery.last_status_code,
        "external_id": delivery.external_id,
        "task_id": delivery.task_id,
        "created_at": _time(delivery.created_at),
        "updated_at": _time(delivery.updated_at),
        "finished_at": _time(delivery.finished_at),
    }
    return masked(view)  # type: ignore[no-any-return]


def event_view(event: Event) -> dict[str, Any]:
    """A stored event (masked payload; None once retention or forget cleared it)."""
    view = {
        "id": event.id,
        "source": event.source,
        "event_id": event.event_id,
        "type": event.type,
        "subject": event.subject,
        "time": _time(event.event_time),
        "received_at": _time(event.received_at),
        "status": event.status.value,
        "ignore_reason": event.ignore_reason,
        "payload": event.payload,
    }
    return masked(view)  # type: ignore[no-any-return]


def attempt_view(attempt: DeliveryAttempt) -> dict[str, Any]:
    """One call made for a delivery and what came back (masked)."""
    view = {
        "id": attempt.id,
        "started_at": _time(attempt.started_at),
        "duration_ms": attempt.duration_ms,
        "request": attempt.request_summary,
        "status_code": attempt.status_code,
        "error_category": attempt.error_category,
        "outcome": attempt.outcome,
        "response": attempt.response_excerpt,
    }
    return masked(view)  # type: ignore[no-any-return]


def detail_view(detail: DeliveryDetail) -> dict[str, Any]:
    """A delivery, its event and every attempt, masked."""
    return {
        "delivery": delivery_view(detail.delivery),
        "event": event_view(detail.event),
        "attempts": [attempt_view(attempt) for attempt in detail.attempts],
    }


def destination_view(
    name: str, state: DestinationState | None, counts: Mapping[str, int] | None = None
) -> dict[str, Any]:
    """A destination's pause state (who paused it, why, since when) and its counts."""
    view: dict[str, Any] = {
        "name": name,
        "paused": False,
        "paused_by": None,
        "paused_reason": None,
        "paused_at": None,
    }
    if state is not None and state.paused:
        view |= {
            "paused": True,
            "paused_by": state.paused_by,
            "paused_reason": scrub(state.paused_reason) if state.paused_reason else None,
            "paused_at": _time(state.paused_at),
        }
    if counts is not None:
        view["deliveries"] = dict(counts)
    return view


def replay_view(result: ReplayResult, *, dry_run: bool) -> dict[str, Any]:
    """A replay's result for the admin API and ``idsync replay --json``."""
    return {
        "dry_run": dry_run,
        "matched": result.matched,
        "replayed": result.replayed,
        "destinations": list(result.destinations),
        "purged": result.purged,
    }
