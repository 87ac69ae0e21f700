"""The order of one user's events, as one comparable string.

Auth0 delivers events at least once and in no order, so idsync orders a user's
events itself: by the CloudEvent ``time``, then ``data.object.updated_at``, then
the type (created before updated before deleted), then the event id. The key is
a string whose text order is that order, so the last applied key can be stored
in a link row and compared by the database or by Python alike.

Times are kept a day inside years 1 to 9999: PostgreSQL renders a stored
instant in the session's time zone, and psycopg cannot read back a year 0 or
10000, so an instant at the very edge would make its event unreadable.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

log = logging.getLogger(__name__)

TYPE_RANK = {"user.created": 0, "user.updated": 1, "user.deleted": 2}
FUTURE_TOLERANCE = timedelta(minutes=5)
EARLIEST = datetime(1, 1, 2, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)


class TimeOutOfRange(ValueError):
    """A timestamp whose UTC instant falls outside ``EARLIEST`` to ``LATEST``."""


def _stamp(moment: datetime | None) -> str:
    """Fixed-width UTC text, so that text order is time order."""
    if moment is None:
        return " " * 27  # sorts before any time: a missing updated_at is the oldest
    # isoformat pads the year to four digits (strftime's %Y does not below 1000).
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def effective_time(event_time: datetime, received_at: datetime) -> datetime:
    """The event's time, or its arrival when the sender's clock ran far ahead."""
    if event_time - received_at > FUTURE_TOLERANCE:
        return received_at
    return event_time


def order_key(
    *,
    event_time: datetime,
    received_at: datetime,
    object_updated_at: datetime | None,
    event_type: str,
    event_id: str,
) -> str:
    """The key that orders this event among its user's events."""
    effective = effective_time(event_time, received_at)
    if effective is not event_time:
        log.warning(
            "event %s is dated %s, more than %s after its arrival; ordered by arrival",
            event_id,
            event_time.isoformat(),
            FUTURE_TOLERANCE,
        )
    rank = TYPE_RANK.get(event_type, 1)
    return f"{_stamp(effective)}|{_stamp(object_updated_at)}|{rank}|{event_id}"


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 timestamp as an aware UTC datetime, or None when it is not one.

    Raises ``TimeOutOfRange`` for a timestamp that parses but whose UTC instant
    lies outside ``EARLIEST`` to ``LATEST`` (``9999-12-31T23:59:59-01:00``).
    """
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    try:
        moment = parsed.astimezone(UTC)
    except OverflowError as error:
        raise TimeOutOfRange(value) from error
    if not EARLIEST <= moment <= LATEST:
        raise TimeOutOfRange(value)
    return moment
