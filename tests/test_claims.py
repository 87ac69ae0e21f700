"""The claim's candidate query: one ordered index scan per condition, merged.

``claim_due`` finds work as a UNION ALL of live pending rows, replays and orphans
(so that its cost does not grow with the backlog). These tests pin what that must
keep meaning: claim order (live before replays, due time, id), orphans taken back,
held and not-yet-due rows left alone, every due delivery of a claimed user taken
together, and the plan on PostgreSQL using the partial indexes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from models.outbox import claim_due, has_due_work, live_contacts_of_others
from models.tables import Delivery, DeliveryStatus, Event, EventStatus

DESTINATION = "hubspot"
SOURCE = "urn:auth0:claims.test"
LEASE = timedelta(seconds=60)


@pytest.fixture
def session(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session:
        yield session


def _add(session: Session, subject: str, **delivery: Any) -> int:
    """One stored event of ``subject`` with one delivery; returns the delivery id."""
    number = session.execute(select(text("count(*)")).select_from(Event)).scalar_one()
    event_pk = session.execute(
        insert(Event)
        .values(
            source=SOURCE,
            event_id=f"evt_{number}",
            type="user.updated",
            subject=subject,
            event_time=session.execute(select(text("now()"))).scalar_one(),
            status=EventStatus.ACCEPTED,
            body_sha256="0" * 64,
            payload={"data": {"object": {"user_id": subject}}},
        )
        .returning(Event.id)
    ).scalar_one()
    values = {
        "event_pk": event_pk,
        "destination": DESTINATION,
        "source": SOURCE,
        "subject": subject,
        "status": DeliveryStatus.PENDING,
        **delivery,
    }
    return session.execute(insert(Delivery).values(**values).returning(Delivery.id)).scalar_one()


def _claim(session: Session, max_users: int) -> list[str]:
    claim = claim_due(
        session=session,
        destination=DESTINATION,
        max_users=max_users,
        lease=LEASE,
        max_reclaims=3,
    )
    return [work.link.subject for work in claim.users]


def _ago(session: Session, seconds: float) -> Any:
    return session.execute(select(text(f"now() - interval '{seconds} seconds'"))).scalar_one()


def test_live_work_comes_first_then_replays_each_by_due_time(session: Session) -> None:
    _add(session, "replay-old", priority=1, next_attempt_at=_ago(session, 60))
    _add(session, "live-new", next_attempt_at=_ago(session, 1))
    _add(session, "live-old", next_attempt_at=_ago(session, 30))
    _add(session, "replay-new", priority=1, next_attempt_at=_ago(session, 2))
    assert _claim(session, 3) == ["live-old", "live-new", "replay-old"]
    assert _claim(session, 3) == ["replay-new"]


def test_held_and_not_yet_due_rows_are_left_and_orphans_are_taken_back(session: Session) -> None:
    _add(session, "held", held="deprovision_guard")
    _add(session, "later", next_attempt_at=_ago(session, -3600))
    orphan = _add(
        session,
        "orphan",
        status=DeliveryStatus.IN_PROGRESS,
        lease_token="gone",
        lease_expires_at=_ago(session, 5),
    )
    _add(
        session,
        "busy",
        status=DeliveryStatus.IN_PROGRESS,
        lease_token="alive",
        lease_expires_at=_ago(session, -60),
    )
    assert has_due_work(session=session, destination=DESTINATION)
    assert _claim(session, 10) == ["orphan"]
    reclaimed = session.get(Delivery, orphan, populate_existing=True)
    assert reclaimed is not None and reclaimed.reclaims == 1
    assert not has_due_work(session=session, destination=DESTINATION)


def test_a_claimed_user_brings_all_its_due_deliveries(session: Session) -> None:
    for _ in range(6):  # more rows than the candidate limit of max_users * 4
        _add(session, "busy-user", next_attempt_at=_ago(session, 10))
    _add(session, "busy-user", next_attempt_at=_ago(session, -3600))  # not yet due
    _add(session, "other", next_attempt_at=_ago(session, 1))
    claim = claim_due(
        session=session, destination=DESTINATION, max_users=1, lease=LEASE, max_reclaims=3
    )
    assert [work.link.subject for work in claim.users] == ["busy-user"]
    assert len(claim.users[0].deliveries) == 6
    assert all(d.event.payload for d in claim.deliveries)
    assert _claim(session, 5) == ["other"]


def test_a_user_held_by_another_worker_is_skipped(session: Session) -> None:
    _add(session, "first", next_attempt_at=_ago(session, 10))
    _add(session, "second", next_attempt_at=_ago(session, 5))
    assert _claim(session, 1) == ["first"]
    # The first user's lease is taken, and a new event of it arrives: it stays with its worker.
    _add(session, "first", next_attempt_at=_ago(session, 20))
    assert _claim(session, 5) == ["second"]


def test_the_candidates_come_from_the_partial_indexes(session: Session) -> None:
    """With many finished rows and planner statistics, no sequential scan of deliveries."""
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("the plan is PostgreSQL's")
    for n in range(20):
        _add(session, f"user-{n}")
    session.execute(update(Delivery).values(status=DeliveryStatus.SUCCEEDED))
    _add(session, "due")
    session.execute(text("ANALYZE deliveries"))
    session.execute(text("SET LOCAL enable_seqscan = off"))  # tiny tables: show what it can use
    plan = "\n".join(
        row[0]
        for row in session.execute(
            text(
                "EXPLAIN SELECT source, subject FROM ("
                "(SELECT source, subject, priority, next_attempt_at, id FROM deliveries "
                " WHERE destination = 'hubspot' AND status = 'pending' AND held IS NULL "
                " AND next_attempt_at <= now() AND priority = 0 "
                " ORDER BY priority, next_attempt_at, id LIMIT 4) UNION ALL "
                "(SELECT source, subject, priority, next_attempt_at, id FROM deliveries "
                " WHERE destination = 'hubspot' AND status = 'in_progress' "
                " AND lease_expires_at < now() ORDER BY priority, next_attempt_at, id LIMIT 4)"
                ") AS due ORDER BY priority, next_attempt_at, id LIMIT 4"
            )
        )
    )
    assert "ix_deliveries_pending" in plan
    assert "ix_deliveries_leased" in plan
    assert _claim(session, 5) == ["due"]


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows the scans of ``plan`` (EXPLAIN ANALYZE, JSON) read: kept plus filtered out."""
    own = 0
    if "Scan" in plan["Node Type"] and plan["Node Type"] != "Function Scan":
        own = (plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)) * plan["Actual Loops"]
    return own + sum(_rows_read(child) for child in plan.get("Plans", []))


@contextmanager
def _statements_run(session: Session) -> Iterator[list[tuple[str, Any]]]:
    """The statements (text and parameters) the session's engine runs inside the block."""
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        statements.append((statement, parameters))

    engine = session.get_bind()
    sqlalchemy_event.listen(engine, "before_cursor_execute", capture)
    try:
        yield statements
    finally:
        sqlalchemy_event.remove(engine, "before_cursor_execute", capture)


def test_looking_up_live_contacts_reads_the_batch_not_every_link(session: Session) -> None:
    """Recording a batch asks which of its contacts other users hold: one probe each.

    The statistics are those of a first pass (links analyzed while they had no
    contact yet). A plan that scanned the destination's live links and filtered them
    cost every batch the number of links: 5,000 rows here for 50 contacts.
    """
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("the plan is PostgreSQL's")
    session.execute(
        text(
            "INSERT INTO links (destination, source, subject) "
            "SELECT :dest, :source, 'user-' || n FROM generate_series(1, 5000) AS n"
        ),
        {"dest": DESTINATION, "source": SOURCE},
    )
    session.execute(text("ANALYZE links"))
    session.execute(text("UPDATE links SET external_id = 'contact-' || id"))
    first = session.execute(text("SELECT min(id) FROM links")).scalar_one()
    contacts = [f"contact-{first + n}" for n in range(50)]
    ours = [first + n for n in range(40)]  # the batch's own links hold the first 40
    with _statements_run(session) as statements:
        others = live_contacts_of_others(
            session=session, destination=DESTINATION, contact_ids=contacts, link_ids=ours
        )
    assert others == set(contacts[40:])
    statement, parameters = statements[-1]
    explained = session.connection().exec_driver_sql(
        "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters
    )
    read = _rows_read(explained.scalar_one()[0]["Plan"])
    assert read <= 2 * len(contacts), f"read {read} rows of links for {len(contacts)} contacts"


def _explained_updates(
    session: Session, statements: list[tuple[str, Any]]
) -> dict[str, dict[str, Any]]:
    """EXPLAIN ANALYZE of each captured UPDATE, by its first two words."""
    plans = {}
    for statement, parameters in statements:
        if statement.lstrip().startswith("UPDATE"):
            explained = session.connection().exec_driver_sql(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters
            )
            plans[" ".join(statement.split()[:2])] = explained.scalar_one()[0]["Plan"]
    return plans


def test_a_claim_reads_its_users_rows_not_the_backlog_on_stale_statistics(
    session: Session,
) -> None:
    """A first backfill fills tables analyzed while empty: the claim must still probe.

    20,000 users are pending, half of them with a link, and the statistics say the
    tables are empty. Taking the links and the deliveries of 50 users read every
    link of the destination and every due delivery when the users were matched as a
    whole batch (``subject = ANY(...)``); probing user by user reads about one row each.
    """
    if session.get_bind().dialect.name != "postgresql":
        pytest.skip("the plan is PostgreSQL's")
    session.execute(text("ANALYZE events, deliveries, links"))
    session.execute(
        text(
            "INSERT INTO events (source, event_id, type, subject, event_time, status, "
            "body_sha256, payload) SELECT :source, 'evt_' || n, 'user.created', 'user-' || n, "
            "now(), 'accepted', repeat('0', 64), '{}' FROM generate_series(1, 20000) AS n"
        ),
        {"source": SOURCE},
    )
    session.execute(
        text(
            "INSERT INTO deliveries (event_pk, destination, source, subject, status) "
            "SELECT id, :dest, source, subject, 'pending' FROM events"
        ),
        {"dest": DESTINATION},
    )
    session.execute(
        text(
            "INSERT INTO links (destination, source, subject) "
            "SELECT :dest, source, subject FROM events WHERE id % 2 = 0"
        ),
        {"dest": DESTINATION},
    )
    with _statements_run(session) as statements:
        claimed = _claim(session, 50)
    assert len(claimed) == 50
    plans = _explained_updates(session, statements)
    assert set(plans) == {"UPDATE links", "UPDATE deliveries"}
    for statement, plan in plans.items():
        rows = _rows_read(plan)
        assert rows <= 3 * 50, f"{statement} read {rows} rows for 50 users: {plan}"
