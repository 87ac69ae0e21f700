"""Celery tasks. They are thin: they take names or ids and call plain functions."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog
from celery import signals

from idsync.logs import configure_logging
from idsync.settings import Settings
from idsync.wakeups import DELIVER_TASK, wakeup_key
from models.db import transaction
from models.guard import drop_stale_holds
from models.outbox import has_due_work, reopen_unsettled
from workers import app
from workers.delivery import BatchPipeline, is_paused
from workers.maintenance import probe_paused, purge_finished
from workers.runtime import runtime

log = logging.getLogger(__name__)

# A task runs batches for at most this long, then hands over to a fresh message.
TASK_TIME_BUDGET_SECONDS = 60


@signals.setup_logging.connect
def _json_logs(loglevel: int | None = None, **_: Any) -> None:
    """Worker and beat log JSON through ``idsync.logs`` instead of Celery's own format.

    Celery imports this module (the app's ``include``) before it sets up logging,
    in the worker and in beat; connecting here replaces Celery's handlers.
    """
    role = "beat" if "beat" in sys.argv[1:] else "worker"
    settings = Settings()
    configure_logging(
        role,
        loglevel or logging.INFO,
        secrets=settings.secrets,
    )


@signals.task_prerun.connect
def _bind_task(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """Every line a task logs names the task; nothing of the previous task remains."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(task_id=task_id, task=getattr(task, "name", None))


@signals.task_postrun.connect
def _unbind_task(**_: Any) -> None:
    structlog.contextvars.clear_contextvars()


def wake(destination: str) -> None:
    """Publish a deliver task unless a wake-up for ``destination`` is pending."""
    rt = runtime()
    key = wakeup_key(rt.settings, destination)
    ttl = int(rt.settings.wakeup_token_seconds * 1000)
    if rt.redis is not None and not rt.redis.set(key, "1", nx=True, px=ttl):
        return
    deliver.delay(destination)


@app.task(name=DELIVER_TASK, bind=True, acks_late=True, ignore_result=True)
def deliver(self, destination: str) -> int:  # type: ignore[no-untyped-def]
    """Deliver due work of ``destination`` in batches, for a bounded time."""
    rt = runtime()
    if rt.redis is not None:
        # From now on a new event may publish the next wake-up.
        rt.redis.delete(wakeup_key(rt.settings, destination))
    structlog.contextvars.bind_contextvars(task_id=self.request.id, destination=destination)
    config = rt.settings.destination(destination)
    slots = rt.slots(destination)
    task_id = self.request.id or "local"
    if slots is not None and not slots.take(task_id):
        # Enough tasks serve this destination already: a slow one cannot take every worker.
        return 0
    batches = BatchPipeline(
        sessions=rt.sessions,
        settings=rt.settings,
        destination=rt.destination(destination),
        limiter=rt.limiter(destination),
        rng=rt.rng,
        task_id=self.request.id,
    )
    deadline = time.monotonic() + TASK_TIME_BUDGET_SECONDS
    handled = 0
    try:
        # A batch claimed ahead is always sent, even when the budget has just run out.
        while time.monotonic() < deadline or batches.claimed_ahead:
            if slots is not None and not slots.take(task_id):
                return handled  # the slot expired meanwhile and another task has it
            # Under a backlog the next batch is claimed while this one waits for its
            # request slot (workers/delivery.py:BatchPipeline), each within its lease.
            report = batches.send_next(
                timeout=max(1.0, deadline - time.monotonic()),
                claim_ahead=time.monotonic() < deadline,
            )
            if report is None:
                return handled
            if report.users >= config.batch_size:
                # A full batch means a backlog: bring one more worker in (coalesced).
                wake(destination)
            handled += report.claimed
            log.info(
                "batch delivered", extra={"claimed": report.claimed, "outcomes": report.outcomes}
            )
        wake(destination)  # more work remains: hand over to a fresh message
        return handled
    finally:
        batches.close()  # a batch claimed ahead and not sent goes back unsent
        if slots is not None:
            slots.release(task_id)
        structlog.contextvars.unbind_contextvars("destination")


@app.task(name="idsync.sweep", ignore_result=True)
def sweep() -> None:
    """Re-publish due or orphaned work, verify settled uncertain writes, probe paused
    destinations."""
    rt = runtime()
    for destination in rt.settings.destinations:
        with structlog.contextvars.bound_contextvars(destination=destination):
            probe_paused(rt, destination)
            with transaction(rt.sessions) as session:
                reopen_unsettled(session=session, destination=destination)
                drop_stale_holds(session=session, destination=destination)
                due = not is_paused(session, rt.settings, destination) and has_due_work(
                    session=session, destination=destination
                )
            if due:
                wake(destination)


@app.task(name="idsync.purge", ignore_result=True)
def purge() -> None:
    """Daily retention: drop old payloads and, later, old finished rows."""
    rt = runtime()
    with transaction(rt.sessions) as session:
        purge_finished(session=session, settings=rt.settings)


@app.task(name="idsync.reconcile", ignore_result=True)
def reconcile() -> None:
    """RECONCILE_INTERVAL: compare every readable destination with its links (no fix)."""
    from workers.reconcile import Unreadable
    from workers.reconcile import reconcile as run_reconcile

    rt = runtime()
    for destination in rt.settings.destinations:
        if rt.settings.destination(destination).missing():
            continue  # paused for want of a setting: it cannot be read either
        with structlog.contextvars.bound_contextvars(destination=destination):
            try:
                report = run_reconcile(
                    sessions=rt.sessions,
                    settings=rt.settings,
                    destination=rt.destination(destination),
                    trigger="beat",
                )
            except Unreadable:
                continue  # a webhook: nothing to read back
            log.info("reconciled", extra={"checked": report.checked, "drift": report.counts})


class _TaskWaker:
    """Wakes a destination from inside a task, through this worker's Redis and broker."""

    def wake(self, destination: str) -> None:
        wake(destination)


@app.task(name="idsync.auth0_recover", ignore_result=True)
def auth0_recover() -> None:
    """AUTH0_RECOVERY_INTERVAL: one recovery pass over Auth0's failed deliveries.

    A pass still running (a slow Auth0, a long backlog) makes this one return at once.
    """
    from idsync.auth0.recovery import recover, shared_client

    rt = runtime()
    client = shared_client(rt.settings)
    if client is None:
        return  # recovery was switched off since beat scheduled this
    report = recover(
        sessions=rt.sessions,
        settings=rt.settings,
        client=client,
        waker=_TaskWaker(),
        trigger="beat",
    )
    if report is not None:
        log.info("recovery pass", extra={"pass": report.to_json()})
