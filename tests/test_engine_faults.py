"""The delivery engine keeps its promise under faults, whatever the destination does.

These run ``run_batch`` (the function the Celery task calls) against real
PostgreSQL with an in-memory destination, so the generic rules are tested
without any vendor: deadlines inside the lease, no abandoned batch, reclaims
that a slow destination caused, two users on one record, purged payloads,
``forget`` during a batch.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select, update

from idsync.settings import Settings
from models.commands import forget, resync
from models.db import transaction
from models.tables import Delivery, DeliveryAttempt, DeliveryStatus, Event, Link
from tests.events import auth0_event
from tests.memory_destination import MemoryDestination
from tests.pipeline import Pipeline
from workers.delivery import run_batch
from workers.destinations.base import Intent, Outcome, Verdict


def _batch(pipeline: Pipeline, destination: MemoryDestination, **settings: Any) -> Any:
    chosen = pipeline.settings.model_copy(update=settings) if settings else pipeline.settings
    return run_batch(sessions=pipeline.sessions, settings=chosen, destination=destination)


def _rows(pipeline: Pipeline) -> dict[str, Delivery]:
    with pipeline.sessions() as session:
        return {d.subject: d for d in session.scalars(select(Delivery).order_by(Delivery.id))}


def _attempts(pipeline: Pipeline) -> list[DeliveryAttempt]:
    with pipeline.sessions() as session:
        return list(session.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)))


def test_settings_refuse_a_lease_shorter_than_two_calls_and_a_margin() -> None:
    with pytest.raises(ValidationError) as raised:
        Settings(lease_seconds=20, hubspot_timeout_seconds=10)
    message = str(raised.value)
    assert "LEASE_SECONDS=20" in message and "HUBSPOT_TIMEOUT_SECONDS=10" in message
    assert "= 31.1" in message  # 2 x (3.05 + 10) + 5
    assert Settings(lease_seconds=31.1, hubspot_timeout_seconds=10).batch_seconds == pytest.approx(
        31.1 - 13.05 - 5
    )


def test_the_batch_deadline_leaves_a_call_and_a_margin_inside_the_lease(
    pipeline: Pipeline,
) -> None:
    pipeline.post(auth0_event("user.created", "auth0|d", email="d@example.com"))
    destination = MemoryDestination()
    before = time.monotonic()
    _batch(pipeline, destination)
    after = time.monotonic()
    settings = pipeline.settings
    (deadline,) = destination.deadlines
    lease_left_for_calls = settings.lease_seconds - settings.call_seconds - 5
    assert before + lease_left_for_calls <= deadline <= after + lease_left_for_calls


def test_a_destination_that_raises_leaves_no_user_in_progress(pipeline: Pipeline) -> None:
    for n in range(3):
        pipeline.post(auth0_event("user.created", f"auth0|r{n}", email=f"r{n}@example.com"))
    destination = MemoryDestination(raises=AttributeError("'list' object has no attribute 'get'"))
    report = _batch(pipeline, destination)
    assert report.outcomes == {"retry:adapter_error": 3}
    rows = _rows(pipeline)
    assert {d.status for d in rows.values()} == {DeliveryStatus.PENDING}
    assert all(d.attempts == 1 and "AttributeError" in (d.last_error or "") for d in rows.values())
    attempts = _attempts(pipeline)
    assert [a.error_category for a in attempts] == ["ADAPTER_ERROR"] * 3
    # The next batch delivers them: the error cost one attempt, nothing more.
    destination.raises = None
    pipeline.drain_with(destination)
    assert {d.status for d in _rows(pipeline).values()} == {DeliveryStatus.SUCCEEDED}


def test_an_intent_the_destination_left_out_is_retried(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|a", email="a@example.com"))
    pipeline.post(auth0_event("user.created", "auth0|b", email="b@example.com"))

    class Forgetful(MemoryDestination):
        def deliver(self, intents: list[Intent], **kwargs: Any) -> dict[str, Outcome]:
            return dict(list(super().deliver(intents, **kwargs).items())[:1])

    report = _batch(pipeline, Forgetful())
    assert report.outcomes == {"succeeded": 1, "retry:adapter_error": 1}
    assert sorted(d.status for d in _rows(pipeline).values()) == ["pending", "succeeded"]


def test_reclaims_caused_by_a_slow_destination_never_end_worker_lost(pipeline: Pipeline) -> None:
    """Two workers keep taking the user from each other while the destination is slow.

    Each takes the user after the other's lease ran out, which counts a reclaim;
    the slow one comes back alive and gives its reclaim back. Without that, the
    fourth reclaim would end the delivery ``failed: worker_lost`` though no
    worker ever died.
    """
    pipeline.post(auth0_event("user.created", "auth0|slow", email="slow@example.com"))
    # A lease shorter than the start-up rule allows, to make the destination outlive it.
    quick = {"lease_seconds": 0.6, "max_reclaims": 2}
    slow = MemoryDestination(
        delay=1.0,
        answer=lambda i: Outcome(Verdict.RETRY, reason="slow", counts_against_budget=False),
    )
    stop = time.monotonic() + 5
    lost_holds: list[int] = []

    def worker() -> None:
        while time.monotonic() < stop:
            lost_holds.append(_batch(pipeline, slow, **quick).outcomes.get("lost_hold", 0))
            time.sleep(0.05)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(lost_holds) > quick["max_reclaims"] + 1, "the workers did not outlive leases"
    (row,) = _rows(pipeline).values()
    assert row.reason != "worker_lost" and row.status is not DeliveryStatus.FAILED


def test_two_batches_ending_on_one_record_flag_both_and_record_the_others(
    pipeline: Pipeline,
) -> None:
    """Two workers' users land on one record at once (a merge seen only in the answers).

    The second recording meets the unique index on live links. It must not roll
    back its batch: the unrelated user of that batch is recorded, and the user
    that shares the record fails ``contact_owned`` with both links flagged.
    """
    pipeline.post(auth0_event("user.created", "auth0|one", email="one@example.com"))
    first = MemoryDestination(
        answer=lambda i: Outcome(Verdict.SUCCEEDED, external_id="shared", email=i.user.email)
    )
    _batch(pipeline, first, **{"hubspot_batch_size": 1})
    pipeline.post(auth0_event("user.created", "auth0|two", email="two@example.com"))
    pipeline.post(auth0_event("user.created", "auth0|three", email="three@example.com"))
    # Both answers come back while neither batch has recorded yet.
    barrier = threading.Barrier(2)

    def answer(intent: Intent) -> Outcome:
        record = "shared" if intent.user.subject == "auth0|two" else "own"
        return Outcome(Verdict.SUCCEEDED, external_id=record, email=intent.user.email)

    second = MemoryDestination(answer=answer, before_answer=barrier.wait)
    # The first link is taken out of "shared" and put back only when both answers are in:
    # the race the index settles, played deterministically.
    with transaction(pipeline.sessions) as session:
        session.execute(update(Link).values(external_id=None))
    relink = MemoryDestination(
        answer=lambda i: Outcome(Verdict.SUCCEEDED, external_id="shared", email=i.user.email),
        before_answer=barrier.wait,
    )
    with transaction(pipeline.sessions) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.subject == "auth0|one")
            .values(status=DeliveryStatus.PENDING, force=True)
        )
    results: dict[str, Any] = {}

    def run(name: str, destination: MemoryDestination, subjects: tuple[str, ...]) -> None:
        results[name] = _batch(pipeline, destination, **{"hubspot_batch_size": len(subjects)})

    one = threading.Thread(target=run, args=("one", relink, ("auth0|one",)))
    one.start()
    time.sleep(0.3)  # let it claim auth0|one first
    two = threading.Thread(target=run, args=("two", second, ("auth0|two", "auth0|three")))
    two.start()
    one.join(20)
    two.join(20)
    rows = _rows(pipeline)
    assert not [d for d in rows.values() if d.status is DeliveryStatus.IN_PROGRESS]
    assert rows["auth0|three"].status is DeliveryStatus.SUCCEEDED
    owners = {s: rows[s] for s in ("auth0|one", "auth0|two")}
    assert sorted((d.status.value, d.reason) for d in owners.values()) == [
        ("pending", None),
        ("succeeded", None),
    ] or sorted((d.status.value, d.reason) for d in owners.values()) == [
        ("failed", "contact_owned"),
        ("succeeded", None),
    ]
    with pipeline.sessions() as session:
        flagged = {link.subject for link in session.scalars(select(Link)) if link.conflict}
    assert flagged == {"auth0|one", "auth0|two"}
    # While flagged, the loser's work fails without a call; resync lifts its flag.
    pipeline.drain_with(MemoryDestination())
    loser = next(s for s, d in _rows(pipeline).items() if s in owners and d.reason)
    assert _rows(pipeline)[loser].reason == "contact_owned"
    with transaction(pipeline.sessions) as session:
        resync(session=session, subject=loser)
    after = MemoryDestination()
    pipeline.drain_with(after)
    assert [i.user.subject for batch in after.batches for i in batch] == [loser]


def test_a_flagged_link_fails_contact_owned_without_a_call(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|f", email="f@example.com"))
    pipeline.drain_with(MemoryDestination())
    with transaction(pipeline.sessions) as session:
        session.execute(update(Link).values(conflict="shares record r1 with another user's link"))
    pipeline.post(auth0_event("user.updated", "auth0|f", email="f2@example.com", at=5))
    destination = MemoryDestination()
    pipeline.drain_with(destination)
    assert destination.batches == []
    newest = max(_all(pipeline), key=lambda d: d.id)
    assert (newest.status, newest.reason) == (DeliveryStatus.FAILED, "contact_owned")
    assert "idsync resync --subject auth0|f" in (newest.last_error or "")
    # A replay alone does not lift the flag; resync does.
    with transaction(pipeline.sessions) as session:
        resync(session=session, subject="auth0|f")
    pipeline.drain_with(destination)
    assert [i.user.email for batch in destination.batches for i in batch] == ["f2@example.com"]


def _all(pipeline: Pipeline) -> list[Delivery]:
    with pipeline.sessions() as session:
        return list(session.scalars(select(Delivery)))


def test_a_purged_payload_is_skipped_never_sent(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|p", email="p@example.com"))
    with transaction(pipeline.sessions) as session:
        session.execute(update(Event).values(payload=None))
    destination = MemoryDestination()
    pipeline.drain_with(destination)
    assert destination.batches == []
    (row,) = _rows(pipeline).values()
    assert (row.status, row.reason) == (DeliveryStatus.SKIPPED, "purged")


def test_forget_during_a_batch_is_not_undone_by_the_batch(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|gdpr", email="gdpr@example.com"))

    def erase() -> None:
        with transaction(pipeline.sessions) as session:
            forget(session=session, subject="auth0|gdpr")

    _batch(pipeline, MemoryDestination(before_answer=erase))
    with pipeline.sessions() as session:
        link = session.scalars(select(Link)).one()
        (row,) = session.scalars(select(Delivery)).all()
    assert link.last_email is None
    assert (row.status, row.reason) == (DeliveryStatus.SKIPPED, "forgotten")


def test_a_pause_the_destination_asked_for_is_lifted_only_by_an_operator(
    pipeline: Pipeline,
) -> None:
    from models.outbox import destination_state

    pipeline.post(auth0_event("user.created", "auth0|gone", email="gone@example.com"))
    gone = MemoryDestination(
        answer=lambda i: Outcome(Verdict.PAUSE, reason="endpoint_gone", resume_by_hand=True)
    )
    _batch(pipeline, gone)
    with pipeline.sessions() as session:
        state = destination_state(session=session, name="hubspot")
        assert state is not None and state.paused and state.paused_by == "operator"


def test_the_message_id_is_stable_across_retries_and_new_for_each_resync(
    pipeline: Pipeline,
) -> None:
    pipeline.post(auth0_event("user.created", "auth0|mid", email="mid@example.com"))
    flaky = MemoryDestination(answer=lambda i: Outcome(Verdict.RETRY, reason="flaky"))
    _batch(pipeline, flaky)
    _batch(pipeline, flaky)
    pipeline.drain_with(MemoryDestination())
    with transaction(pipeline.sessions) as session:
        resync(session=session, subject="auth0|mid")
    again = MemoryDestination()
    pipeline.drain_with(again)
    (row,) = _rows(pipeline).values()
    sent = [i.message_id for batch in flaky.batches + again.batches for i in batch]
    assert sent == [f"msg_{row.id}_0", f"msg_{row.id}_0", f"msg_{row.id}_1"]


def test_an_error_text_no_database_can_hold_costs_only_its_own_user(pipeline: Pipeline) -> None:
    """A destination's message with a NUL byte or a lone surrogate cannot be stored as
    text; the batch's rows travel as one document, and the others are recorded all the same."""
    for n in range(3):
        pipeline.post(auth0_event("user.created", f"auth0|t{n}", email=f"t{n}@example.com"))
    destination = MemoryDestination()

    def answer(intent: Intent) -> Outcome:
        if intent.user.email == "t1@example.com":
            return Outcome(Verdict.RETRY, reason="server_error", message="bad \x00 and \ud800")
        return destination._store(intent)

    destination.answer = answer
    _batch(pipeline, destination)
    rows = _rows(pipeline)
    assert rows["auth0|t0"].status == rows["auth0|t2"].status == DeliveryStatus.SUCCEEDED
    refused = rows["auth0|t1"]
    assert refused.status == DeliveryStatus.PENDING and refused.lease_token is None
    assert "recording failed" in (refused.last_error or "")
    with pipeline.sessions() as session:
        links = {link.subject: link for link in session.scalars(select(Link))}
    assert {s: link.lease_token for s, link in links.items()} == dict.fromkeys(links)
    # Once the destination answers plainly, the user is delivered like the others.
    destination.answer = None
    pipeline.drain_with(destination)
    assert _rows(pipeline)["auth0|t1"].status == DeliveryStatus.SUCCEEDED
