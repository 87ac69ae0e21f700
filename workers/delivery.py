"""One batch of deliveries: claim users, ask the destination, record what happened.

This is the worker's whole job, as a plain function that tests call directly;
the Celery task around it only loops and hands over.

1. Claim up to a batch of users with due work (each held by a lease on its link).
2. Per user, drop events older than the last applied one (``stale``) and send
   only the newest: Auth0 sends the whole user, so the newest event is the truth.
   The destination starts no call after the batch deadline, which lies well
   inside the lease, so no write lands after the hold is gone.
3. Write every outcome with a compare-and-set on the user's hold; older events
   of the user become ``stale`` only once the newest has succeeded. Every
   intent ends with an outcome, whatever the destination raised, and one
   user's bad row cannot roll back the others'.
"""

from __future__ import annotations

import contextvars
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from idsync.logs import scrub
from idsync.settings import Settings
from models.db import db_now, transaction
from models.guard import Deprovision, hold_excess
from models.outbox import (
    DELIVERY_STATE,
    LINK_STATE,
    Claim,
    ClaimedDelivery,
    UserWork,
    claim_due,
    destination_state,
    flag_conflict,
    give_back_reclaims,
    hold_contact,
    live_contacts_of_others,
    set_paused,
    still_held,
    write_deliveries,
    write_links,
)
from models.tables import FINISHED, DeliveryAttempt, DeliveryStatus
from workers.destinations.base import (
    CallSummary,
    Destination,
    Intent,
    Limiter,
    LinkState,
    Outcome,
    UserState,
    Verdict,
)
from workers.ratelimit import SlotForecast
from workers.retry import backoff_delay, budget_spent

log = logging.getLogger(__name__)


@dataclass
class BatchReport:
    """What one batch did, for logs, metrics and tests."""

    claimed: int = 0  # deliveries
    users: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, label: str, n: int = 1) -> None:
        self.outcomes[label] = self.outcomes.get(label, 0) + n


@dataclass
class _UserPlan:
    work: UserWork
    stale: list[ClaimedDelivery]
    newest: ClaimedDelivery | None
    older: list[ClaimedDelivery]


def _plan_user(work: UserWork) -> _UserPlan:
    last = work.link.last_order_key
    stale, live = [], []
    for delivery in work.deliveries:
        if last is not None and not delivery.force and work.key_of(delivery) <= last:
            stale.append(delivery)
        else:
            live.append(delivery)
    newest = live[-1] if live else None
    return _UserPlan(work=work, stale=stale, newest=newest, older=live[:-1])


def _intent(plan: _UserPlan, now: datetime) -> Intent | Outcome:
    """What to ask the destination for the user's newest delivery, or its outcome now."""
    assert plan.newest is not None
    event, link = plan.newest.event, plan.work.link
    if link.conflict:
        return Outcome(
            Verdict.FAILED,
            reason="contact_owned",
            message=f"{link.conflict}; once resolved, run: idsync resync --subject {link.subject}",
        )
    if not event.payload:
        # Retention or forget cleared it: sending nothing would clear the contact.
        return Outcome(Verdict.SKIPPED, reason="purged")
    uncertain_until = link.uncertain_until
    return Intent(
        key=str(plan.newest.id),
        user=UserState.from_event(event.type, event.payload),
        link=LinkState(
            external_id=link.external_id,
            deprovisioned=link.deprovisioned,
            properties_hash=link.properties_hash,
            last_email=link.last_email,
            uncertain=uncertain_until is not None,
            settling_for=max(0.0, (uncertain_until - now).total_seconds())
            if uncertain_until
            else 0.0,
        ),
        force=plan.newest.force,
        event_id=event.event_id,
        source=event.source,
        event_time=event.event_time,
        message_id=f"msg_{plan.newest.id}_{plan.newest.resyncs}",
    )


def is_paused(session: Session, settings: Settings, destination: str) -> bool:
    """Paused by an operator, by a misconfiguration, or for want of a setting."""
    if settings.destination(destination).missing():
        return True
    state = destination_state(session=session, name=destination)
    return bool(state and state.paused)


@dataclass
class ClaimedBatch:
    """A batch claimed and planned, ready to send: what ``send_batch`` needs.

    ``deadline`` (``time.monotonic()``) was counted from before the claim, so it
    lies inside the lease: no call of this batch may start after it.
    """

    claim: Claim
    plans: list[_UserPlan]
    intents: list[Intent]
    outcomes: dict[str, Outcome]
    holds: _ContactHolds
    report: BatchReport
    deadline: float

    def time_left(self) -> float:
        """Seconds until the batch may start no more calls."""
        return self.deadline - time.monotonic()


def claim_batch(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    destination: Destination,
    task_id: str | None = None,
) -> ClaimedBatch | None:
    """Claim and plan one batch of ``destination``'s due work; None when there is none."""
    report = BatchReport()
    # Counted from before the claim, so the deadline lies inside the lease it takes.
    deadline = time.monotonic() + settings.batch_seconds
    with transaction(sessions) as session:
        if is_paused(session, settings, destination.name):
            return None
        claim = claim_due(
            session=session,
            destination=destination.name,
            max_users=settings.destination(destination.name).batch_size,
            lease=settings.lease,
            max_reclaims=settings.max_reclaims,
            task_id=task_id,
        )
    if not claim.users:
        return None
    report.claimed = len(claim.deliveries) + sum(len(u.lost) for u in claim.users)
    report.users = len(claim.users)
    plans = [_plan_user(work) for work in claim.users]
    outcomes: dict[str, Outcome] = {}
    intents: list[Intent] = []
    for plan in plans:
        if plan.newest is not None:
            asked = _intent(plan, claim.now)
            if isinstance(asked, Outcome):
                outcomes[str(plan.newest.id)] = asked
            else:
                intents.append(asked)
    intents = _guard_deprovisions(sessions, settings, destination.name, claim, plans, intents)
    if len(claim.users) < report.users:
        report.count("held:deprovision_guard", report.users - len(claim.users))
    holds = _ContactHolds(sessions, claim, plans)
    return ClaimedBatch(claim, plans, intents, outcomes, holds, report, deadline)


def send_batch(
    batch: ClaimedBatch,
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    destination: Destination,
    rng: random.Random | None = None,
) -> BatchReport:
    """Deliver a claimed batch and record every outcome, releasing its users."""
    outcomes = dict(batch.outcomes)
    if batch.intents:
        outcomes |= _deliver(destination, batch.intents, batch.holds, batch.deadline)
    return _record(
        batch, outcomes, sessions=sessions, settings=settings, name=destination.name, rng=rng
    )


def release_batch(
    batch: ClaimedBatch,
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    name: str,
    reason: str = "released",
) -> BatchReport:
    """Give a claimed batch back unsent: its work is due again at once, no budget spent.

    Nothing was asked of the destination, so no attempt is recorded; the users'
    links are released as after any batch.
    """
    unsent = Outcome(
        Verdict.RETRY,
        reason=reason,
        message="claimed ahead of its request slot, given back unsent",
        counts_against_budget=False,
        retry_after=0.0,
    )
    outcomes = dict(batch.outcomes) | {intent.key: unsent for intent in batch.intents}
    return _record(batch, outcomes, sessions=sessions, settings=settings, name=name, rng=None)


def run_batch(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    destination: Destination,
    rng: random.Random | None = None,
    task_id: str | None = None,
) -> BatchReport:
    """Claim, deliver and record one batch of ``destination``'s due work."""
    batch = claim_batch(
        sessions=sessions, settings=settings, destination=destination, task_id=task_id
    )
    if batch is None:
        return BatchReport()
    return send_batch(batch, sessions=sessions, settings=settings, destination=destination, rng=rng)


# How far ahead of a free request slot the next batch may be claimed. Claiming
# takes a fraction of a second; a limiter blocked for longer holds no claims.
CLAIM_AHEAD_SECONDS = 2.0


class BatchPipeline:
    """Batches one after another; under a backlog the next is claimed while this one is sent.

    A worker that claimed and planned a batch only once a request slot had freed
    left every slot idle for the length of a claim. Here, when a batch is full
    (a backlog), a helper thread claims and plans the next batch as soon as the
    limiter will have a slot within ``CLAIM_AHEAD_SECONDS``, while this batch
    waits for its own slot, is sent and is recorded; the next one is then ready
    when its slot frees. Its users are held by their own lease, so per-user order
    and exclusivity are those of two workers.

    A batch claimed ahead keeps its own deadline, counted from before its claim
    and inside its lease, and the destination starts no call after it. One that
    has less than half its time left when its turn comes is given back unsent
    (no attempt, no budget spent) and a fresh batch is claimed, so no claim is
    sent stale. At most one batch is claimed ahead; ``close`` gives back one that
    was never sent.
    """

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        settings: Settings,
        destination: Destination,
        limiter: Limiter,
        rng: random.Random | None = None,
        task_id: str | None = None,
    ) -> None:
        self.sessions, self.settings = sessions, settings
        self.destination, self.limiter = destination, limiter
        self.rng, self.task_id = rng, task_id
        self.batch_size = settings.destination(destination.name).batch_size
        self.ahead = min(CLAIM_AHEAD_SECONDS, settings.batch_seconds / 4)
        # SQLite (the embedded default) writes one transaction at a time: a claim ahead
        # would only queue behind the recording of the batch before it.
        bind = sessions.kw.get("bind")
        self.may_claim_ahead = bind is None or bind.dialect.name != "sqlite"
        self._executor: ThreadPoolExecutor | None = None
        self._next: Future[ClaimedBatch | None] | None = None

    @property
    def claimed_ahead(self) -> bool:
        """Whether a batch claimed ahead waits to be sent."""
        return self._next is not None

    def send_next(self, timeout: float, *, claim_ahead: bool = True) -> BatchReport | None:
        """Send one batch: the one claimed ahead, else one claimed when a slot is near.

        None when no slot came within ``timeout`` seconds or there is no due work.
        With ``claim_ahead``, a full batch has the next one claimed while it is sent.
        """
        batch = self._take_next(timeout)
        if batch is not None and batch.time_left() < self.settings.batch_seconds / 2:
            log.info("a batch claimed ahead waited too long for its turn; claiming afresh")
            self._release(batch)
            batch = self._claim(timeout)
        if batch is None:
            return None
        if claim_ahead and self.may_claim_ahead and batch.report.users >= self.batch_size:
            self._next = self._pool().submit(contextvars.copy_context().run, self._claim, timeout)
        return send_batch(
            batch,
            sessions=self.sessions,
            settings=self.settings,
            destination=self.destination,
            rng=self.rng,
        )

    def close(self) -> None:
        """Give back a batch claimed ahead and never sent, and stop the helper thread."""
        future, self._next = self._next, None
        try:
            batch = future.result() if future is not None else None
            if batch is not None:
                self._release(batch)
        except Exception:
            # Its lease expires by itself and the sweep hands its work on: nothing is lost.
            log.exception("could not give back the batch claimed ahead")
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="claim-ahead")
        return self._executor

    def _take_next(self, timeout: float) -> ClaimedBatch | None:
        if self._next is None:
            return self._claim(timeout)
        future, self._next = self._next, None
        return future.result()

    def _claim(self, timeout: float) -> ClaimedBatch | None:
        """Claim a batch once the limiter has a slot free, or will within ``self.ahead``."""
        limiter = self.limiter
        if isinstance(limiter, SlotForecast):
            near = limiter.wait_for_capacity_within(max(timeout, 0.0), ahead=self.ahead)
        else:
            near = limiter.wait_for_capacity(timeout=max(timeout, 0.0))
        if not near:
            return None
        return claim_batch(
            sessions=self.sessions,
            settings=self.settings,
            destination=self.destination,
            task_id=self.task_id,
        )

    def _release(self, batch: ClaimedBatch) -> None:
        release_batch(
            batch,
            sessions=self.sessions,
            settings=self.settings,
            name=self.destination.name,
            reason="claimed_ahead",
        )


def _record(
    batch: ClaimedBatch,
    outcomes: dict[str, Outcome],
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    name: str,
    rng: random.Random | None,
) -> BatchReport:
    """Write every outcome with a compare-and-set on the users' hold, and release them."""
    rng = rng or random.Random()  # noqa: S311 - jitter, not security
    claim, plans, report = batch.claim, batch.plans, batch.report
    with transaction(sessions) as session:
        now = db_now(session)
        held = still_held(
            session=session, link_ids=[w.link.id for w in claim.users], token=claim.token
        )
        recorder = _Recorder(
            settings,
            now,
            rng,
            report,
            destination=name,
            taken=_taken_contacts(session, name, claim, outcomes),
            held_contacts=batch.holds.held,
        )
        lost: list[int] = []
        for plan in plans:
            if plan.work.link.id not in held:
                # The lease expired and another worker took the user: its work is theirs.
                log.warning("lost the hold on user %s", plan.work.link.subject)
                report.count("lost_hold")
                lost += [d.id for d in plan.work.deliveries + plan.work.lost]
                continue
            with _bound(plan.newest or _first(plan)):
                recorder.record_user(plan, outcomes)
        # This worker is alive: a reclaim its slowness caused is no sign of a crash.
        give_back_reclaims(session=session, delivery_ids=lost, token=claim.token)
        recorder.flush(session, claim.token)
        _pause_if_asked(session, settings, name, outcomes)
    return report


def is_deprovision(intent: Intent) -> bool:
    """Whether sending ``intent`` deprovisions someone at the destination.

    A live link turning deprovisioned, or an unlinked user with an email, whom
    the destination would look up and then archive or mark. A link already
    deprovisioned sends nothing new, and a user with no link and no email
    cannot be found.
    """
    user, link = intent.user, intent.link
    if not user.deprovisioned or (link.deprovisioned and link.external_id):
        return False
    return bool(link.external_id or user.email or user.previous_email)


def _guard_deprovisions(
    sessions: sessionmaker[Session],
    settings: Settings,
    name: str,
    claim: Claim,
    plans: list[_UserPlan],
    intents: list[Intent],
) -> list[Intent]:
    """The intents the deprovision guard lets through (``models/guard.py``).

    Users whose deprovision exceeds ``DEPROVISION_GUARD`` leave the batch:
    their deliveries wait, held, and their link is released; ``plans`` and
    ``claim.users`` lose them, so nothing is recorded for them here.
    """
    limit = settings.deprovision_guard_of(name)
    if limit is None:
        return intents
    plan_of = {str(plan.newest.id): plan for plan in plans if plan.newest is not None}
    deprovisions = [
        Deprovision(
            delivery_id=int(intent.key),
            link_id=plan_of[intent.key].work.link.id,
            delivery_ids=tuple(
                d.id for d in plan_of[intent.key].work.deliveries + plan_of[intent.key].work.lost
            ),
        )
        for intent in intents
        if is_deprovision(intent)
    ]
    if not deprovisions:
        return intents
    with transaction(sessions) as session:
        held = hold_excess(
            session=session,
            destination=name,
            token=claim.token,
            limit=limit[0],
            window_seconds=limit[1],
            deprovisions=deprovisions,
        )
    if not held:
        return intents
    log.warning(
        "deprovision guard: holding %d deprovisions to %s for approval "
        "(idsync destinations approve-deprovisions %s)",
        len(held),
        name,
        name,
    )
    for key in map(str, held):
        plans.remove(plan_of[key])
        claim.users.remove(plan_of[key].work)
    return [intent for intent in intents if int(intent.key) not in held]


def _deliver(
    destination: Destination, intents: list[Intent], holds: _ContactHolds, deadline: float
) -> dict[str, Outcome]:
    """The destination's outcomes, one per intent, whatever it raised or left out."""
    try:
        outcomes = dict(destination.deliver(intents, claim=holds, deadline=deadline))
        problem = "the destination gave no outcome for this delivery"
    except Exception as error:
        log.exception("destination %s raised while delivering a batch", destination.name)
        outcomes = {}
        problem = scrub(f"{type(error).__name__}: {error}")[:1000]
    for intent in intents:
        if intent.key not in outcomes:
            outcomes[intent.key] = Outcome(
                Verdict.RETRY,
                reason="adapter_error",
                message=problem,
                calls=[CallSummary("(no outcome)", None, 0.0, "ADAPTER_ERROR", problem)],
            )
    return outcomes


class _ContactHolds:
    """The destination's question "may this user take this record?", answered atomically.

    Keyed by intent (one delivery, so one (source, subject)), never by subject
    alone: two sources may share a user id.
    """

    def __init__(self, sessions: sessionmaker[Session], claim: Claim, plans: list[_UserPlan]):
        self.sessions = sessions
        self.token = claim.token
        self.link_of = {
            str(plan.newest.id): plan.work.link.id for plan in plans if plan.newest is not None
        }
        self.held: dict[int, str] = {}  # link id -> the record its user now holds

    def __call__(self, key: str, external_id: str) -> bool:
        link_id = self.link_of[key]
        with transaction(self.sessions) as session:
            taken = hold_contact(
                session=session, link_id=link_id, token=self.token, external_id=external_id
            )
        if taken:
            self.held[link_id] = external_id
        return taken


def _taken_contacts(
    session: Session, destination: str, claim: Claim, outcomes: dict[str, Outcome]
) -> set[str]:
    """Of the contacts this batch reached, those live links of other users hold."""
    reached = [
        outcome.external_id
        for outcome in outcomes.values()
        if outcome.verdict is Verdict.SUCCEEDED and outcome.external_id
    ]
    return live_contacts_of_others(
        session=session,
        destination=destination,
        contact_ids=reached,
        link_ids=[work.link.id for work in claim.users],
    )


def _first(plan: _UserPlan) -> ClaimedDelivery | None:
    deliveries = plan.stale or plan.work.lost
    return deliveries[0] if deliveries else None


def _bound(delivery: ClaimedDelivery | None) -> AbstractContextManager[None]:
    """Log lines written while recording ``delivery`` name it and its Auth0 event."""
    if delivery is None:
        return structlog.contextvars.bound_contextvars()
    return structlog.contextvars.bound_contextvars(
        delivery_id=delivery.id, event_id=delivery.event.event_id
    )


def _pause_if_asked(
    session: Session, settings: Settings, name: str, outcomes: dict[str, Outcome]
) -> None:
    key, pause = next(
        ((k, o) for k, o in outcomes.items() if o.verdict is Verdict.PAUSE), (None, None)
    )
    if pause is None:
        return
    with structlog.contextvars.bound_contextvars(delivery_id=int(key) if key else None):
        log.error("destination %s paused: %s", name, pause.message)
    set_paused(
        session=session,
        name=name,
        paused=True,
        reason=pause.message,
        # An operator's pause is never lifted by the probe: the destination asked for one.
        by="operator" if pause.resume_by_hand else "auto",
        probe_after=timedelta(seconds=settings.pause_probe_seconds),
    )


@dataclass
class _UserRows:
    """The rows decided for one user, kept together so that one user can be redone."""

    plan: _UserPlan
    links: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    conflict: tuple[str, str] | None = None  # (record id, note) shared with another user


@dataclass
class _Recorder:
    """Turns one batch's outcomes into rows, then writes them in a few statements.

    ``taken`` holds the record ids other users' live links hold: a success that
    lands on one of them (contacts merged in the destination) means two users
    share a record: both links are flagged and the delivery fails ``contact_owned``.
    ``held_contacts`` are the records users of this batch took before writing.
    """

    settings: Settings
    now: datetime
    rng: random.Random
    report: BatchReport
    destination: str
    taken: set[str]
    held_contacts: dict[int, str] = field(default_factory=dict)
    users: list[_UserRows] = field(default_factory=list)
    # The user whose rows are being decided: every row goes into it.
    current: _UserRows | None = None

    @property
    def _rows(self) -> _UserRows:
        assert self.current is not None, "rows are decided for one user at a time"
        return self.current

    def record_user(self, plan: _UserPlan, outcomes: dict[str, Outcome]) -> None:
        """Decide every row of one user: its deliveries, its attempts and its link."""
        self.current = _UserRows(plan)
        self.users.append(self.current)
        link = plan.work.link
        link_row = {column: getattr(link, column) for column in LINK_STATE} | {"id": link.id}
        if link.id in self.held_contacts:
            link_row |= {"external_id": self.held_contacts[link.id], "deprovisioned": False}
        self._rows.links.append(link_row)
        for delivery in plan.work.lost:
            reclaimed = f"reclaimed {delivery.reclaims - 1} times after its lease expired"
            self._finish(
                delivery, DeliveryStatus.FAILED, reason="worker_lost", last_error=reclaimed
            )
            self.report.count("failed:worker_lost")
        self._skip_stale(plan.stale)
        if plan.newest is None:
            return
        outcome = self._owned_check(outcomes[str(plan.newest.id)])
        self._settle(outcome, link_row)
        self._attempts(plan.newest, outcome)
        if outcome.verdict in (Verdict.SUCCEEDED, Verdict.SKIPPED):
            self._apply(plan, outcome, link_row)
        elif outcome.verdict is Verdict.FAILED:
            self._fail(plan.newest, outcome)
            self._release(plan.older, due=self.now)
        else:
            self._retry(plan, outcome)

    def _owned_check(self, outcome: Outcome) -> Outcome:
        contact = outcome.external_id
        if outcome.verdict is not Verdict.SUCCEEDED or not contact or outcome.deprovisioned:
            return outcome
        if contact in self.taken:
            note = f"shares record {contact} with another user's link"
            self._rows.conflict = (contact, note)
            return Outcome(
                Verdict.FAILED,
                reason="contact_owned",
                message=f"{note}; both links are flagged until resolved",
                calls=outcome.calls,
            )
        self.taken.add(contact)
        return outcome

    def _settle(self, outcome: Outcome, link_row: dict[str, Any]) -> None:
        """Open, keep or close the window in which a write with no answer may land."""
        until = link_row["uncertain_until"]
        if outcome.uncertain:
            opened = self.now + timedelta(seconds=self.settings.settle_seconds)
            link_row["uncertain_until"] = max(until, opened) if until else opened
            if outcome.email and not link_row["external_id"]:
                link_row["last_email"] = outcome.email  # where to look for the record
        elif until is not None and until <= self.now and outcome.verdict is not Verdict.RETRY:
            link_row["uncertain_until"] = None  # nothing can land any more, and this is done

    def _apply(self, plan: _UserPlan, outcome: Outcome, link_row: dict[str, Any]) -> None:
        """The newest state reached the destination (or needs nothing): move the link on."""
        assert plan.newest is not None
        newest = plan.newest
        link_row["last_order_key"] = max(plan.work.key_of(newest), link_row["last_order_key"] or "")
        if outcome.verdict is Verdict.SUCCEEDED:
            link_row |= {
                "external_id": outcome.external_id,
                "properties_hash": outcome.properties_hash,
                "last_email": outcome.email,
                "deprovisioned": outcome.deprovisioned,
            }
            if outcome.created is not None:
                link_row["created_contact"] = outcome.created
        status = DeliveryStatus(outcome.verdict.value)
        self._finish(
            newest,
            status,
            reason=outcome.reason,
            external_id=outcome.external_id,
            attempts=newest.attempts + (1 if outcome.calls else 0),
            last_status_code=outcome.calls[-1].status if outcome.calls else None,
        )
        self.report.count(f"{status.value}:{outcome.reason or ''}".rstrip(":"))
        self._skip_stale(plan.older)

    def _fail(self, delivery: ClaimedDelivery, outcome: Outcome) -> None:
        self._finish(
            delivery,
            DeliveryStatus.FAILED,
            reason=outcome.reason,
            last_error=outcome.message,
            last_status_code=outcome.status_code,
            attempts=delivery.attempts + 1,
        )
        log.warning("delivery %s failed: %s (%s)", delivery.id, outcome.reason, outcome.message)
        self.report.count(f"failed:{outcome.reason}")

    def _retry(self, plan: _UserPlan, outcome: Outcome) -> None:
        """Schedule the user's work again; a spent budget turns into ``failed``."""
        assert plan.newest is not None
        newest, delays = plan.newest, self.settings.retry_delays
        # A pause is the destination's fault, not the delivery's: it spends no budget.
        counted = outcome.counts_against_budget and outcome.verdict is not Verdict.PAUSE
        attempts = newest.attempts + (1 if counted else 0)
        if counted and budget_spent(attempts, delays):
            exhausted = Outcome(
                Verdict.FAILED,
                reason="retries_exhausted",
                message=f"{outcome.reason}: {outcome.message}",
                status_code=outcome.status_code,
            )
            self._fail(newest, exhausted)
            self._release(plan.older, due=self.now)
            return
        if outcome.verdict is Verdict.PAUSE:
            delay = 0.0
        elif outcome.retry_after is not None:
            delay = outcome.retry_after
        else:
            delay = backoff_delay(attempts, delays, self.settings.retry_jitter, self.rng)
        due = self.now + timedelta(seconds=delay)
        self._finish(
            newest,
            DeliveryStatus.PENDING,
            next_attempt_at=due,
            attempts=attempts,
            reason=None,
            last_error=outcome.message,
            last_status_code=outcome.status_code,
        )
        # The older events wait with the newest, so they are never sent on their own.
        self._release(plan.older, due=due)
        log.info("delivery %s retries in %.1fs: %s", newest.id, delay, outcome.reason)
        self.report.count(f"retry:{outcome.reason}")

    def _skip_stale(self, deliveries: list[ClaimedDelivery]) -> None:
        for delivery in deliveries:
            self._finish(delivery, DeliveryStatus.SKIPPED, reason="stale")
        if deliveries:
            self.report.count("skipped:stale", len(deliveries))

    def _release(self, deliveries: list[ClaimedDelivery], *, due: datetime) -> None:
        for delivery in deliveries:
            self._finish(delivery, DeliveryStatus.PENDING, next_attempt_at=due)

    def _finish(self, delivery: ClaimedDelivery, status: DeliveryStatus, **changes: Any) -> None:
        """A delivery's whole new state: what changes, and what it keeps."""
        finished = status in FINISHED
        row = {column: getattr(delivery, column) for column in DELIVERY_STATE}
        row |= {
            "id": delivery.id,
            "status": status,
            "finished_at": self.now if finished else None,
            "force": False if finished else delivery.force,
            **changes,
        }
        self._rows.deliveries.append(row)

    def _attempts(self, delivery: ClaimedDelivery, outcome: Outcome) -> None:
        self._rows.attempts.extend(
            {
                "delivery_id": delivery.id,
                "duration_ms": call.duration_ms,
                "request_summary": call.request,
                "status_code": call.status,
                "error_category": call.error_category,
                "outcome": outcome.verdict.value,
                "response_excerpt": call.response_excerpt,
            }
            for call in outcome.calls
        )

    def flush(self, session: Session, token: str) -> None:
        """Write everything decided: a handful of statements for the whole batch.

        Should one user's rows be refused (another worker's user took the same
        record a moment earlier), the batch is written again user by user, and
        only that user's work is tried again, with the error on record.
        """
        try:
            with session.begin_nested():
                self._write(session, token, self.users)
        except SQLAlchemyError:
            log.warning("recording the batch at once failed; recording user by user")
            for rows in self.users:
                try:
                    with session.begin_nested():
                        self._write(session, token, [rows])
                except SQLAlchemyError as error:
                    with session.begin_nested():
                        self._write(session, token, [self._refused(rows, error)])

    def _write(self, session: Session, token: str, users: list[_UserRows]) -> None:
        deliveries = [row for rows in users for row in rows.deliveries]
        links = [row for rows in users for row in rows.links]
        attempts = [row for rows in users for row in rows.attempts]
        write_deliveries(session=session, token=token, now=self.now, rows=deliveries)
        write_links(session=session, token=token, now=self.now, rows=links)
        if attempts:
            session.execute(insert(DeliveryAttempt), attempts)
        for rows in users:
            if rows.conflict:
                external_id, note = rows.conflict
                flag_conflict(
                    session=session,
                    destination=self.destination,
                    link_ids=[rows.plan.work.link.id],
                    external_id=external_id,
                    note=note,
                )

    def _refused(self, rows: _UserRows, error: SQLAlchemyError) -> _UserRows:
        """The user's rows when the database refused the ones decided: try it again."""
        plan, link = rows.plan, rows.plan.work.link
        cause = getattr(error, "orig", None) or error
        message = scrub(f"recording failed: {type(cause).__name__}: {error}")[:1000]
        log.error("recording user %s failed: %s", link.subject, message)
        redo = self.current = _UserRows(plan)
        keep = {column: getattr(link, column) for column in LINK_STATE} | {"id": link.id}
        redo.links.append(keep)
        shared = isinstance(error, IntegrityError) and "uq_links_live_external_id" in str(error)
        outcome_id = next((row["external_id"] for row in rows.links if row["external_id"]), None)
        if shared and outcome_id:
            redo.conflict = (outcome_id, f"shares record {outcome_id} with another user's link")
        for delivery in plan.work.deliveries:
            self._finish(
                delivery, DeliveryStatus.PENDING, next_attempt_at=self.now, last_error=message
            )
        if plan.newest is not None:
            call = CallSummary("(recording)", None, 0.0, "RECORDING_ERROR", message)
            self._attempts(plan.newest, Outcome(Verdict.RETRY, calls=[call]))
        return redo
