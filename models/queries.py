"""Queries of the outbox for operators: which deliveries match, and why they failed.

The admin API and the ``idsync`` command line find deliveries with these, and
``models.commands`` replays the deliveries a ``DeliveryFilter`` matches. Every
function takes the session as a keyword argument and never commits: the caller
owns the transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import JSON, ColumnElement, and_, func, select
from sqlalchemy.orm import Session, contains_eager, selectinload

from idsync.settings import parse_duration
from models.tables import Delivery, DeliveryAttempt, DeliveryStatus, Event

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


# Filters


def parse_moment(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO 8601 date or time (UTC unless it says otherwise), or a duration ago.

    ``2025-03-01``, ``2025-03-01T12:00:00Z`` and ``24h`` (24 hours before now) are
    all accepted, so that operators can write ``--since 2h``; durations are read
    as ``idsync.settings.parse_duration`` reads them, with their unit required.
    """
    try:
        seconds = parse_duration(text, unit_required=True)
    except ValueError:
        pass  # not a duration: a date or a time, or neither
    else:
        try:
            return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(
                f"{text!r} reaches back before the year 1: since and until must lie between "
                "the years 1 and 9999"
            ) from None
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


def filter_conditions(
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


def payload_present(payload: Any) -> ColumnElement[bool]:
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
        .where(*filter_conditions(filter, Delivery, Event))
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
