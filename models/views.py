"""Masked views of outbox rows, as the admin API and the ``idsync`` command line show them.

Every email is masked, every credential-like field redacted and every stored
payload cut at ``SHOWN_DEPTH`` levels, so a view can be shown to an operator or
printed to a terminal as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from sqlalchemy.orm import Session

from idsync.logs import scrub
from idsync.settings import Settings
from models.commands import ReplayResult, destination_states
from models.queries import DeliveryDetail, counts_by_status
from models.tables import Delivery, DeliveryAttempt, DestinationState, Event

_SECRET_KEY = re.compile(r"(?i)token|secret|password|authorization|api_?key")
# An address without a top-level domain ("ann@localhost", "γιάννης@localhost") is
# personal data too, though scrub() leaves it: in a log, "worker1@host" is a Celery
# node. Its local part is read as scrub() reads one, in any script: characters that
# do not end a word in running text, JSON, a URL or a header ("*" is the mask itself,
# so masking twice changes nothing), after any apostrophes that quote it. A match
# starts only where such a run of characters starts, so masking takes one pass.
_LOCAL = r"""[^\s@*<>()\[\]{},;:"`|\\/=?&]"""
_LOCAL_START = r"""[^\s@*<>()\[\]{},;:"'`|\\/=?&]"""
_ANY_EMAIL = re.compile(rf"(?<!{_LOCAL})('*+{_LOCAL_START}){_LOCAL}*+@([\w\-][\w.\-]*)")
REDACTED = "***"

# Ingest refuses events nested deeper than this, but rows stored before it did, or
# written by hand, may hold anything: masking and printing them would recurse past
# Python's limit, so the views show them cut at this depth.
SHOWN_DEPTH = 64
TRUNCATED = f"(nested deeper than {SHOWN_DEPTH} levels: truncated here)"


def masked(value: Any, *, depth: int = SHOWN_DEPTH) -> Any:
    """``value`` with every email masked and every credential-like field redacted.

    Every object or array nested deeper than ``depth`` is replaced by ``TRUNCATED``,
    so a value of any depth can be masked and shown.
    """
    if isinstance(value, str):
        return _ANY_EMAIL.sub(r"\1***@\2", scrub(value))
    if not isinstance(value, Mapping | list | tuple):
        return value
    if depth <= 0:
        return TRUNCATED
    inner = depth - 1
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _SECRET_KEY.search(str(key)) and item else masked(item, depth=inner)
            for key, item in value.items()
        }
    return [masked(item, depth=inner) for item in value]


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
            "received_via": event.received_via,
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
    """A stored event (masked payload; None once retention or forget cleared it).

    The payload is cut at ``SHOWN_DEPTH`` levels of its own, one below the view's.
    """
    view = {
        "id": event.id,
        "source": event.source,
        "event_id": event.event_id,
        "type": event.type,
        "subject": event.subject,
        "time": _time(event.event_time),
        "received_at": _time(event.received_at),
        "received_via": event.received_via,
        "status": event.status.value,
        "ignore_reason": event.ignore_reason,
        "payload": event.payload,
    }
    return masked(view, depth=SHOWN_DEPTH + 1)  # type: ignore[no-any-return]


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
    name: str,
    state: DestinationState | None,
    counts: Mapping[str, int] | None = None,
    *,
    missing: str | None = None,
    headroom: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """A destination's pause state (who paused it, why, since when), counts and headroom.

    ``missing`` is what its settings still lack (a token, a URL): it is paused by
    configuration then, whatever the stored state says. ``headroom`` is the newest
    rate-limit headroom it reported (``idsync.destinations.read_headroom``); None
    when it reports none or it is unknown.
    """
    view: dict[str, Any] = {
        "name": name,
        "paused": False,
        "paused_by": None,
        "paused_reason": None,
        "paused_at": None,
    }
    if missing:
        view |= {"paused": True, "paused_by": "config", "paused_reason": missing}
    elif state is not None and state.paused:
        view |= {
            "paused": True,
            "paused_by": state.paused_by,
            "paused_reason": scrub(state.paused_reason) if state.paused_reason else None,
            "paused_at": _time(state.paused_at),
        }
    if counts is not None:
        view["deliveries"] = dict(counts)
    view["rate_limit"] = dict(headroom) if headroom else None
    return view


def destination_views(
    *,
    session: Session,
    settings: Settings,
    headroom: Mapping[str, Mapping[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Every configured destination's view: what its settings lack, counts, headroom."""
    states = destination_states(session=session)
    counts = counts_by_status(session=session)
    return [
        destination_view(
            name,
            states.get(name),
            counts.get(name, {}),
            missing=settings.destination(name).missing(),
            headroom=(headroom or {}).get(name),
        )
        for name in settings.destinations
    ]


def headroom_text(headroom: Mapping[str, float] | None) -> str:
    """A rate-limit headroom in a few words: ``87/100 per 10 s; 249,000/250,000 today``."""
    if not headroom:
        return "-"
    parts = []
    if "remaining" in headroom or "max" in headroom:
        window = headroom.get("interval_seconds")
        per = f" per {headroom['interval_seconds']:g} s" if window else ""
        parts.append(f"{_figure(headroom.get('remaining'))}/{_figure(headroom.get('max'))}{per}")
    if "daily_remaining" in headroom or "daily_max" in headroom:
        parts.append(
            f"{_figure(headroom.get('daily_remaining'))}/{_figure(headroom.get('daily_max'))} today"
        )
    if "age_seconds" in headroom:
        parts.append(f"seen {headroom['age_seconds']:.0f} s ago")
    return "; ".join(parts) or "-"


def _figure(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def replay_view(result: ReplayResult, *, dry_run: bool) -> dict[str, Any]:
    """A replay's result for the admin API and ``idsync replay --json``."""
    return {
        "dry_run": dry_run,
        "matched": result.matched,
        "replayed": result.replayed,
        "destinations": list(result.destinations),
        "purged": result.purged,
    }
