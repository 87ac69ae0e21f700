"""Under a backlog the next batch is claimed while this one waits for its request slot.

``workers.delivery.BatchPipeline`` is what the deliver task loops on. These run it
against real PostgreSQL with the in-memory destination and a rate limiter of one
request per window: the next batch must be claimed and planned before the slot
it will use frees, a batch claimed ahead must never be sent once its lease could
run out (it is given back unsent and claimed afresh), and one never sent is
given back when the task ends.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from models.tables import Delivery, DeliveryAttempt, DeliveryStatus
from tests.events import auth0_event
from tests.memory_destination import MemoryDestination
from tests.pipeline import Pipeline
from workers.delivery import BatchPipeline
from workers.destinations.base import ContactClaim, Intent, Outcome
from workers.ratelimit import LocalRateLimiter

BATCH = 3
WINDOW = 1.0  # one request per second: the second batch's slot frees a second after the first


class Paced(MemoryDestination):
    """The in-memory destination behind the rate limit, as a real adapter sends."""

    def __init__(self, limiter: LocalRateLimiter, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limiter = limiter
        self.sent_at: list[float] = []

    def deliver(
        self, intents: list[Intent], *, claim: ContactClaim, deadline: float
    ) -> dict[str, Outcome]:
        self.limiter.acquire(timeout=max(0.0, deadline - time.monotonic()))
        self.sent_at.append(time.monotonic())
        return super().deliver(intents, claim=claim, deadline=deadline)


def _backlog(pipeline: Pipeline, users: int) -> None:
    for n in range(users):
        pipeline.post(auth0_event("user.created", f"auth0|ahead{n}", email=f"a{n}@example.com"))


def _status(pipeline: Pipeline) -> dict[str, DeliveryStatus]:
    with pipeline.sessions() as session:
        return {d.subject: d.status for d in session.scalars(select(Delivery))}


def _pipeline(pipeline: Pipeline, destination: Paced, **settings: Any) -> BatchPipeline:
    return BatchPipeline(
        sessions=pipeline.sessions,
        settings=pipeline.settings.model_copy(update={"hubspot_batch_size": BATCH, **settings}),
        destination=destination,
        limiter=destination.limiter,
    )


def test_the_next_batch_is_claimed_before_its_request_slot_frees(pipeline: Pipeline) -> None:
    _backlog(pipeline, 2 * BATCH)
    limiter = LocalRateLimiter(limit=1, window=WINDOW)
    destination = Paced(limiter)
    batches = _pipeline(pipeline, destination)
    try:
        first = batches.send_next(timeout=5)
        assert first is not None and first.users == BATCH
        # The first batch has taken the only slot of this window, and the next one
        # is already claimed: its users are in progress before any slot is free.
        assert not limiter.wait_for_capacity(timeout=0)
        assert batches.claimed_ahead
        deadline = time.monotonic() + 5
        while list(_status(pipeline).values()).count(DeliveryStatus.IN_PROGRESS) < BATCH:
            assert time.monotonic() < deadline, _status(pipeline)
            time.sleep(0.02)
        assert not limiter.wait_for_capacity(timeout=0)
        second = batches.send_next(timeout=5)
        assert second is not None and second.users == BATCH
    finally:
        batches.close()
    assert set(_status(pipeline).values()) == {DeliveryStatus.SUCCEEDED}
    # Each batch went out on its own slot, one window apart: the limit held.
    assert len(destination.batches) == 2
    assert destination.sent_at[1] - destination.sent_at[0] >= WINDOW * 0.99


def test_a_batch_claimed_ahead_whose_lease_would_run_out_is_not_sent(pipeline: Pipeline) -> None:
    _backlog(pipeline, 2 * BATCH)
    destination = Paced(LocalRateLimiter(limit=1000, window=WINDOW))
    batches = _pipeline(pipeline, destination)
    try:
        assert batches.send_next(timeout=5) is not None
        assert batches.claimed_ahead
        ahead = batches._next.result()  # type: ignore[union-attr]
        assert ahead is not None
        stale_token = ahead.claim.token
        stale_users = {intent.key for intent in ahead.intents}
        # Its turn comes late: most of the time its lease allows has gone by.
        ahead.deadline = time.monotonic() + pipeline.settings.batch_seconds / 4
        second = batches.send_next(timeout=5)
        assert second is not None and second.users == BATCH
    finally:
        batches.close()
    # The stale claim was given back unsent; the same users went out once, under a
    # fresh claim with a deadline of a whole batch again, and nothing was recorded as
    # an attempt of the stale one.
    assert len(destination.batches) == 2
    assert {intent.key for intent in destination.batches[1]} == stale_users
    assert destination.deadlines[1] - time.monotonic() > pipeline.settings.batch_seconds / 2
    assert set(_status(pipeline).values()) == {DeliveryStatus.SUCCEEDED}
    with pipeline.sessions() as session:
        rows = session.scalars(select(Delivery)).all()
        assert all(row.attempts == 0 and row.lease_token is None for row in rows)
        assert stale_token not in {row.lease_token for row in rows}
        assert not session.scalars(select(DeliveryAttempt)).all()


def test_a_batch_claimed_ahead_and_never_sent_is_given_back(pipeline: Pipeline) -> None:
    _backlog(pipeline, 2 * BATCH)
    destination = Paced(LocalRateLimiter(limit=1000, window=WINDOW))
    batches = _pipeline(pipeline, destination)
    try:
        assert batches.send_next(timeout=5) is not None
        assert batches.claimed_ahead
    finally:
        batches.close()
    statuses = _status(pipeline)
    assert list(statuses.values()).count(DeliveryStatus.SUCCEEDED) == BATCH
    assert list(statuses.values()).count(DeliveryStatus.PENDING) == BATCH
    with pipeline.sessions() as session:
        waiting = session.scalars(
            select(Delivery).where(Delivery.status == DeliveryStatus.PENDING)
        ).all()
        assert all(row.attempts == 0 and row.lease_token is None for row in waiting)
    pipeline.drain_with(destination)
    assert set(_status(pipeline).values()) == {DeliveryStatus.SUCCEEDED}


def test_a_partial_batch_claims_nothing_ahead(pipeline: Pipeline) -> None:
    _backlog(pipeline, BATCH - 1)
    destination = Paced(LocalRateLimiter(limit=1000, window=WINDOW))
    batches = _pipeline(pipeline, destination)
    try:
        report = batches.send_next(timeout=5)
        assert report is not None and report.users == BATCH - 1
        assert not batches.claimed_ahead
        assert batches.send_next(timeout=1) is None
    finally:
        batches.close()
