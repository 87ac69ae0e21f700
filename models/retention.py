"""Retention: purge personal data of finished events, then the old rows themselves."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, delete, exists, select, update
from sqlalchemy.orm import Session

from models.tables import FINISHED, Delivery, DeliveryAttempt, Event


def _unfinished_exists() -> object:
    return exists().where(Delivery.event_pk == Event.id, Delivery.status.not_in(FINISHED))


def _failed_exists() -> object:
    return exists().where(Delivery.event_pk == Event.id, Delivery.status == "failed")


def purge_before(
    *, session: Session, payloads_before: datetime, rows_before: datetime
) -> dict[str, int]:
    """Clear payloads of events received before ``payloads_before`` whose deliveries
    all finished (failed ones are kept for replay), and delete such events received
    before ``rows_before`` with their deliveries and attempts."""
    keep = _unfinished_exists() | _failed_exists()  # type: ignore[operator]
    old_payloads = _count(
        session.execute(
            update(Event)
            .where(Event.received_at < payloads_before, Event.payload.is_not(None), ~keep)
            .values(payload=None)
            .execution_options(synchronize_session=False)
        )
    )
    excerpts = _count(
        session.execute(
            update(DeliveryAttempt)
            .where(
                DeliveryAttempt.response_excerpt.is_not(None),
                DeliveryAttempt.delivery_id.in_(
                    select(Delivery.id)
                    .join(Event)
                    .where(Event.received_at < payloads_before, Event.payload.is_(None))
                ),
            )
            .values(response_excerpt=None)
            .execution_options(synchronize_session=False)
        )
    )
    old_rows = _count(
        session.execute(
            delete(Event)
            .where(Event.received_at < rows_before, ~keep)
            .execution_options(synchronize_session=False)
        )
    )
    return {"payloads": old_payloads, "excerpts": excerpts, "events": old_rows}


def _count(result: Any) -> int:
    """Rows an UPDATE or DELETE touched."""
    return int(cast(CursorResult[Any], result).rowcount)
