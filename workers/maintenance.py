"""Periodic upkeep: probing paused destinations, and data retention."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, delete
from sqlalchemy.orm import Session

from idsync.settings import Settings
from models.db import db_now, transaction
from models.outbox import destination_state, set_paused
from models.retention import purge_before
from models.tables import Quarantine

if TYPE_CHECKING:
    from workers.runtime import Runtime

log = logging.getLogger(__name__)


def probe_paused(rt: Runtime, destination: str) -> None:
    """Resume a destination idsync paused itself, once a probe shows it works again."""
    with transaction(rt.sessions) as session:
        state = destination_state(session=session, name=destination)
        if state is None or not state.paused or state.paused_by != "auto":
            return
        if state.next_probe_at and state.next_probe_at > db_now(session):
            return
        state.next_probe_at = db_now(session) + timedelta(seconds=rt.settings.pause_probe_seconds)
    problem = rt.destination(destination).probe()
    with transaction(rt.sessions) as session:
        if problem is None:
            set_paused(session=session, name=destination, paused=False, reason=None, by="auto")
            log.warning("destination %s resumed after a successful probe", destination)
        else:
            log.warning("destination %s still paused: %s", destination, problem)


def purge_finished(*, session: Session, settings: Settings) -> dict[str, int]:
    """Apply ``RETENTION_DAYS`` and the longer deletion horizon.

    Quarantined bodies are personal data with nothing to finish: they are deleted
    after ``RETENTION_DAYS``, like the payloads of finished events.
    """
    now = db_now(session)
    payloads_before = now - timedelta(days=settings.retention_days)
    counts = purge_before(
        session=session,
        payloads_before=payloads_before,
        rows_before=now - timedelta(days=settings.retention_delete_days),
    )
    quarantined = session.execute(
        delete(Quarantine)
        .where(Quarantine.received_at < payloads_before)
        .execution_options(synchronize_session=False)
    )
    counts["quarantine"] = int(cast(CursorResult[Any], quarantined).rowcount)
    return counts
