"""Operator operations on the outbox: find, read, replay, resync, forget, pause.

Real PostgreSQL throughout; the replay and resync stories go through the real
webhook, ``run_batch`` and the fake HubSpot, using test_pipeline's ``Pipeline``.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import requests
from sqlalchemy import event, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from idsync.settings import Settings, parse_duration
from models.commands import (
    NothingToResync,
    forget,
    pause_destination,
    replay,
    resume_destination,
    resync,
)
from models.db import transaction
from models.outbox import claim_due, destination_state, set_paused
from models.queries import (
    DeliveryFilter,
    counts_by_status,
    delivery_detail,
    list_deliveries,
    parse_moment,
)
from models.tables import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    DestinationState,
    Event,
    EventStatus,
    Link,
    Quarantine,
)
from tests.events import auth0_event
from tests.pipeline import Pipeline
from workers.maintenance import probe_paused

SOURCE = "urn:auth0:example.auth0app.com"


def store(
    session: Session,
    subject: str,
    status: DeliveryStatus = DeliveryStatus.FAILED,
    *,
    event_type: str = "user.updated",
    destination: str = "hubspot",
    at: int = 0,
    payload: dict[str, Any] | None = None,
    attempts: int = 0,
) -> Delivery:
    """One event with one delivery in ``status``, written directly."""
    moment = datetime(2025, 3, 1, tzinfo=UTC) + timedelta(seconds=at)
    row = Event(
        source=SOURCE,
        event_id=f"evt_{subject}_{event_type}_{at}_{destination}",
        type=event_type,
        subject=subject,
        event_time=moment,
        status=EventStatus.ACCEPTED,
        body_sha256="0" * 64,
        payload=payload if payload is not None else {"data": {"object": {"user_id": subject}}},
    )
    delivery = Delivery(
        event=row,
        destination=destination,
        source=SOURCE,
        subject=subject,
        status=status,
        reason="rejected" if status is DeliveryStatus.FAILED else None,
        attempts=attempts,
        last_error="HubSpot said no" if status is DeliveryStatus.FAILED else None,
        finished_at=moment if status in (DeliveryStatus.FAILED, DeliveryStatus.SKIPPED) else None,
    )
    session.add(delivery)
    session.flush()
    return delivery


# Filters


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"status": "lost"}, "unknown status"),
        ({"limit": "0"}, "between 1 and 500"),
        ({"limit": 501}, "between 1 and 500"),
        ({"limit": "ten"}, "whole number"),
        ({"cursor": "abc"}, "whole number"),
        ({"cursor": "0"}, "next_cursor"),
        ({"since": "yesterday"}, "not a time"),
        ({"since": "2025-03-02", "until": "2025-03-01"}, "since must not be after until"),
        ({"colour": "red"}, "unknown filter"),
        ({"subject": "  "}, "non-empty"),
    ],
)
def test_bad_filter_values_are_rejected_with_a_clear_message(
    params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        DeliveryFilter.from_params(params)


def test_filter_reads_text_parameters() -> None:
    now = datetime(2025, 3, 2, tzinfo=UTC)
    item = DeliveryFilter.from_params(
        {
            "status": "failed",
            "since": "24h",
            "until": "2025-03-02T00:00:00Z",
            "limit": "10",
            "cursor": "7",
            "subject": "",
        },
        now=now,
    )
    assert item.status is DeliveryStatus.FAILED
    assert item.since == now - timedelta(hours=24) and item.until == now
    assert (item.limit, item.cursor, item.subject) == (10, 7, None)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("1.5h", 5400),
        ("30d", 30 * 86400),
        ("2w", 14 * 86400),
        (" 5 m ", 300),
    ],
)
def test_since_reads_a_duration_as_the_settings_do(text: str, seconds: float) -> None:
    """One grammar for durations: ``--since 2w`` reads ``2w`` as the settings read it."""
    now = datetime(2025, 3, 2, tzinfo=UTC)
    assert parse_duration(text) == seconds
    assert parse_moment(text, now=now) == now - timedelta(seconds=seconds)


def test_since_reads_a_number_without_a_unit_as_a_date_not_a_duration() -> None:
    assert parse_moment("20250301") == datetime(2025, 3, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="not a time"):
        parse_moment("90")


def test_list_filters_and_pages_newest_first(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        ids = [store(session, f"auth0|{n}", at=n).id for n in range(7)]
        store(session, "auth0|ok", DeliveryStatus.SUCCEEDED, event_type="user.created")
        store(session, "auth0|ok", DeliveryStatus.SKIPPED, event_type="user.deleted")
    seen: list[int] = []
    cursor = None
    with sessions() as session:
        while True:
            page, cursor = list_deliveries(
                session=session, filter=DeliveryFilter(status="failed", limit=3, cursor=cursor)
            )
            seen += [row.id for row in page]
            assert len(page) <= 3
            if cursor is None:
                break
        assert seen == sorted(ids, reverse=True)

        def matching(**params: Any) -> list[str]:
            rows, _ = list_deliveries(session=session, filter=DeliveryFilter(**params))
            return [f"{row.subject} {row.event.type} {row.status.value}" for row in rows]

        assert matching(subject="auth0|ok") == [
            "auth0|ok user.deleted skipped",
            "auth0|ok user.created succeeded",
        ]
        assert matching(event_type="user.created") == ["auth0|ok user.created succeeded"]
        assert matching(destination="salesforce") == []
        assert len(matching()) == 9
        future = datetime.now(UTC) + timedelta(hours=1)
        assert matching(since=future) == []
        assert len(matching(until=future)) == 9
        assert counts_by_status(session=session) == {
            "hubspot": {"failed": 7, "skipped": 1, "succeeded": 1}
        }


def test_detail_has_event_and_every_attempt(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        delivery = store(session, "auth0|1")
        session.add_all(
            DeliveryAttempt(
                delivery_id=delivery.id,
                request_summary=f"POST /try/{n}",
                status_code=400,
                outcome="failed",
                response_excerpt="no",
            )
            for n in range(3)
        )
        delivery_id = delivery.id
    with sessions() as session:
        detail = delivery_detail(session=session, delivery_id=delivery_id)
        assert detail is not None
        assert detail.event.subject == "auth0|1"
        assert [a.request_summary for a in detail.attempts] == [
            "POST /try/0",
            "POST /try/1",
            "POST /try/2",
        ]
        assert delivery_detail(session=session, delivery_id=delivery_id + 1000) is None


# Replay


def test_replay_resets_the_budget_and_keeps_the_history(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        delivery = store(session, "auth0|1", attempts=4)
        session.add(
            DeliveryAttempt(
                delivery_id=delivery.id,
                request_summary="POST /x",
                status_code=400,
                outcome="failed",
            )
        )
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery.id)
            .values(reclaims=2, lease_token="t", force=True)
        )
        delivery_id = delivery.id
    with transaction(sessions) as session:
        result = replay(session=session, delivery_ids=[delivery_id])
    assert (result.matched, result.replayed, result.destinations) == (1, 1, ("hubspot",))
    with sessions() as session:
        row = session.get_one(Delivery, delivery_id)
        now = session.execute(text("SELECT clock_timestamp()")).scalar_one()
        assert row.status is DeliveryStatus.PENDING
        assert (row.attempts, row.reclaims, row.reason, row.finished_at) == (0, 0, None, None)
        assert (row.priority, row.force, row.lease_token) == (1, False, None)
        assert row.last_error == "HubSpot said no"
        assert row.next_attempt_at <= now
        assert session.scalars(select(DeliveryAttempt.delivery_id)).all() == [delivery_id]


def test_replay_takes_failed_by_default_and_others_only_when_asked(
    sessions: sessionmaker[Session],
) -> None:
    with transaction(sessions) as session:
        for status in DeliveryStatus:
            store(session, f"auth0|{status.value}", status)
        store(session, "auth0|purged", payload={})
        session.execute(update(Event).where(Event.subject == "auth0|purged").values(payload=None))
    with transaction(sessions) as session:
        assert replay(session=session, filter=DeliveryFilter()).replayed == 1
        skipped = replay(session=session, filter=DeliveryFilter(status="skipped"))
        assert skipped.replayed == 1
        for status in ("pending", "in_progress"):
            with pytest.raises(ValueError, match="still on their way"):
                replay(session=session, filter=DeliveryFilter(status=status))
    with sessions() as session:
        states = dict(session.execute(select(Delivery.subject, Delivery.status)).all())
    assert states["auth0|failed"] is DeliveryStatus.PENDING
    assert states["auth0|skipped"] is DeliveryStatus.PENDING
    assert states["auth0|succeeded"] is DeliveryStatus.SUCCEEDED
    assert states["auth0|in_progress"] is DeliveryStatus.IN_PROGRESS
    assert states["auth0|purged"] is DeliveryStatus.FAILED  # nothing left to send


def test_replay_is_set_based(sessions: sessionmaker[Session]) -> None:
    total = 20_000
    with transaction(sessions) as session:
        session.execute(
            text("""
            INSERT INTO events (source, event_id, type, subject, event_time, status,
                                body_sha256, payload)
            SELECT 'urn:bulk', 'evt_' || n, 'user.updated', 'auth0|bulk' || n, now(),
                   'accepted', 'x', '{"data": {}}'::jsonb
            FROM generate_series(1, :total) AS n
        """),
            {"total": total},
        )
        session.execute(
            text("""
            INSERT INTO deliveries (event_pk, destination, source, subject, status, reason,
                                    attempts)
            SELECT id, 'hubspot', source, subject, 'failed', 'retries_exhausted', 12
            FROM events
        """)
        )
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engine = sessions.kw["bind"]
    progress: list[tuple[int, int]] = []
    event.listen(engine, "before_cursor_execute", count)
    try:
        with transaction(sessions) as session:
            result = replay(
                session=session,
                filter=DeliveryFilter(status="failed"),
                progress=lambda done, of: progress.append((done, of)),
            )
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert (result.matched, result.replayed) == (total, total)
    assert len(statements) <= 10, statements
    assert progress == [(5000, total), (10000, total), (15000, total), (20000, total)]
    with sessions() as session:
        assert counts_by_status(session=session) == {"hubspot": {"pending": total}}


def test_dry_run_only_counts(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        for n in range(3):
            store(session, f"auth0|{n}")
    with transaction(sessions) as session:
        result = replay(session=session, filter=DeliveryFilter(), dry_run=True)
    assert (result.matched, result.replayed, result.destinations) == (3, 0, ("hubspot",))
    with sessions() as session:
        assert counts_by_status(session=session) == {"hubspot": {"failed": 3}}


def test_replayed_old_event_ends_stale_after_a_newer_one(pipeline: Pipeline) -> None:
    pipeline.post(
        auth0_event("user.created", "auth0|1", email="not-an-email", given_name="Old", at=0)
    )
    pipeline.drain()
    assert pipeline.deliveries() == [("failed", "rejected")]
    pipeline.post(
        auth0_event("user.updated", "auth0|1", email="a@example.com", given_name="New", at=10)
    )
    pipeline.drain()
    with transaction(pipeline.sessions) as session:
        assert replay(session=session, filter=DeliveryFilter()).replayed == 1
    pipeline.drain()
    assert pipeline.deliveries() == [("skipped", "stale"), ("succeeded", None)]
    contact = pipeline.hubspot.contact_by_email("a@example.com")
    assert contact is not None and contact["properties"]["firstname"] == "New"


def test_live_traffic_is_claimed_before_a_large_replay(pipeline: Pipeline) -> None:
    with transaction(pipeline.sessions) as session:
        for n in range(200):
            store(session, f"auth0|old{n}")
    with transaction(pipeline.sessions) as session:
        assert replay(session=session, filter=DeliveryFilter()).replayed == 200
    pipeline.post(auth0_event("user.created", "auth0|live", email="live@example.com"))
    with transaction(pipeline.sessions) as session:
        claim = claim_due(
            session=session,
            destination="hubspot",
            max_users=5,
            lease=timedelta(seconds=30),
            max_reclaims=3,
        )
        claimed = [work.link.subject for work in claim.users]
    assert "auth0|live" in claimed and len(claimed) == 5


# Resync


def test_resync_sends_the_newest_state_again(pipeline: Pipeline) -> None:
    pipeline.post(
        auth0_event("user.created", "auth0|1", email="a@example.com", given_name="Old", at=0)
    )
    pipeline.post(
        auth0_event("user.updated", "auth0|1", email="a@example.com", given_name="Ann", at=10)
    )
    pipeline.drain()
    contact_id = pipeline.link("auth0|1").external_id
    # A sales rep overwrites a mapped property by hand; idsync cannot know.
    requests.patch(
        f"{pipeline.hubspot.url}/crm/v3/objects/contacts/{contact_id}",
        json={"properties": {"firstname": "Changed"}},
        headers={"Authorization": "Bearer fake-token"},
        timeout=5,
    ).raise_for_status()
    with transaction(pipeline.sessions) as session:
        assert resync(session=session, subject="auth0|1") == 1
    pipeline.drain()
    contact = pipeline.hubspot.contact_by_email("a@example.com")
    assert contact is not None and contact["properties"]["firstname"] == "Ann"
    assert pipeline.deliveries() == [("skipped", "stale"), ("succeeded", None)]


def test_resync_explains_when_there_is_nothing_to_send(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        store(session, "auth0|1", DeliveryStatus.SUCCEEDED)
        session.execute(update(Event).values(payload=None))
    with transaction(sessions) as session:
        with pytest.raises(NothingToResync, match="no accepted user event"):
            resync(session=session, subject="auth0|nobody")
        with pytest.raises(NothingToResync, match="purged"):
            resync(session=session, subject="auth0|1")


# Forget


def test_forget_erases_one_persons_data(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="ann@example.com", at=0))
    pipeline.post(auth0_event("user.created", "auth0|2", email="bob@example.com", at=0))
    pipeline.drain()
    pipeline.post(auth0_event("user.updated", "auth0|1", email="ann@example", at=5))
    pipeline.drain()  # HubSpot rejects the invalid email: a failed delivery with an excerpt
    pipeline.post(
        auth0_event("user.updated", "auth0|1", email="ann@example.com", given_name="Ann", at=9)
    )
    with transaction(pipeline.sessions) as session:
        session.add_all(
            [
                Quarantine(reason="bad", body='{"user_id": "auth0|1"}'),
                Quarantine(reason="bad", body='{"user_id": "auth0|2"}'),
            ]
        )
    with transaction(pipeline.sessions) as session:
        removed = forget(session=session, subject="auth0|1")
    assert removed["event_payloads"] == 3 and removed["quarantine_rows"] == 1
    assert removed["deliveries_closed"] >= 1
    with pipeline.sessions() as session:
        payloads = dict(session.execute(select(Event.subject, Event.payload)).all())
        assert payloads["auth0|1"] is None and payloads["auth0|2"] is not None
        emails = dict(session.execute(select(Link.subject, Link.last_email)).all())
        assert emails["auth0|1"] is None and emails["auth0|2"] == "bob@example.com"
        excerpts = session.scalars(
            select(DeliveryAttempt.response_excerpt)
            .join(Delivery)
            .where(Delivery.subject == "auth0|1")
        ).all()
        assert excerpts and all(excerpt is None for excerpt in excerpts)
        assert session.scalars(select(Quarantine.body)).all() == ['{"user_id": "auth0|2"}']
        open_work = session.scalars(
            select(Delivery).where(
                Delivery.subject == "auth0|1", Delivery.status != DeliveryStatus.SUCCEEDED
            )
        ).all()
        assert {(d.status, d.reason) for d in open_work} == {(DeliveryStatus.SKIPPED, "forgotten")}
    pipeline.drain()  # nothing left to send for the forgotten user
    contact = pipeline.hubspot.contact_by_email("ann@example.com")
    assert contact is not None and contact["properties"].get("firstname", "") == ""


# Pauses


def test_operator_pause_is_not_lifted_by_the_probe(
    settings: Settings, sessions: sessionmaker[Session]
) -> None:
    probes: list[str] = []
    runtime = SimpleNamespace(
        sessions=sessions,
        settings=settings.model_copy(update={"pause_probe_seconds": 0}),
        destination=lambda name: SimpleNamespace(probe=lambda: probes.append(name)),
    )
    with transaction(sessions) as session:
        pause_destination(session=session, name="hubspot", reason="HubSpot maintenance")
    probe_paused(runtime, "hubspot")  # type: ignore[arg-type]
    with transaction(sessions) as session:
        state = destination_state(session=session, name="hubspot")
        assert state is not None and state.paused and state.paused_by == "operator"
        assert state.paused_reason == "HubSpot maintenance"
        resume_destination(session=session, name="hubspot")
    assert probes == []
    with sessions() as session:
        state = destination_state(session=session, name="hubspot")
        assert state is not None and not state.paused


def test_two_workers_pausing_at_once_both_succeed(sessions: Any) -> None:
    """Workers that meet a 401 together both pause the destination, without a conflict."""
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def pause() -> None:
        try:
            with transaction(sessions) as session:
                barrier.wait(timeout=5)
                set_paused(session=session, name="hubspot", paused=True, reason="401", by="auto")
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=pause) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    with sessions() as session:
        state = session.get(DestinationState, "hubspot")
        assert state is not None and state.paused and state.paused_reason == "401"


def test_a_duration_reaching_before_the_year_1_is_a_clear_error() -> None:
    from models.queries import parse_moment

    with pytest.raises(ValueError, match="before the year 1"):
        parse_moment("99999999999999999999w")
