"""Reconciliation runs as stored: what each found (``workers/reconcile.py`` writes them)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.tables import ReconcileRun


def latest_runs(*, session: Session) -> dict[str, ReconcileRun]:
    """Each destination's newest finished reconciliation (for metrics)."""
    newest = (
        select(func.max(ReconcileRun.id))
        .where(ReconcileRun.finished_at.is_not(None))
        .group_by(ReconcileRun.destination)
    )
    runs = session.scalars(select(ReconcileRun).where(ReconcileRun.id.in_(newest)))
    return {run.destination: run for run in runs}
