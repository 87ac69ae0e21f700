"""End to end through real processes: gunicorn, two Celery workers, beat, the fake HubSpot."""

from __future__ import annotations

import copy
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select

from idsync.fakes.hubspot import RequestRecord
from models.tables import Delivery, DeliveryStatus, Event, Link
from tests.events import auth0_event, fixture, stamp
from tests.processes import ServiceStack, wait_for

pytestmark = pytest.mark.e2e

# Properties the fake sets itself on every contact; the rest is what idsync wrote.
FAKE_SET = frozenset({"hs_object_id", "createdate", "lastmodifieddate"})


def written(contact: dict[str, Any]) -> dict[str, str]:
    """The properties idsync gave a contact (the fake drops cleared ones)."""
    return {k: v for k, v in contact["properties"].items() if k not in FAKE_SET}


def writes(e2e: ServiceStack) -> list[RequestRecord]:
    """Every call that could change a contact, in the order the fake answered them."""
    return [
        record
        for record in e2e.hubspot.requests_log
        if record.method != "GET" and not record.path.endswith("/batch/read")
    ]


def link_of(e2e: ServiceStack, subject: str) -> Link:
    with e2e.sessions() as session:
        return session.scalars(
            select(Link).where(Link.destination == "hubspot", Link.subject == subject)
        ).one()


def _renamed(document: dict[str, Any], event_id: str, time: str) -> dict[str, Any]:
    copied = copy.deepcopy(document)
    copied.update(id=event_id, time=time)
    copied["data"]["object"]["updated_at"] = time
    return copied


def test_auth0_fixtures_produce_the_right_contacts(e2e: ServiceStack) -> None:
    created = fixture("user_created.json")
    assert e2e.post(created).status_code == 202
    e2e.wait_finished(1)
    contact = e2e.hubspot.contact_by_email("john.doe@gmail.com")
    john = {
        "email": "john.doe@gmail.com",
        "firstname": "John",
        "lastname": "Doe",
        "phone": "+15555555555",
    }
    assert contact is not None
    assert written(contact) == john
    subject = created["data"]["object"]["user_id"]
    assert link_of(e2e, subject).external_id == contact["id"]
    # The catalog's three examples share one id: posted as they are, they are duplicates.
    assert e2e.post(fixture("user_updated.json")).json()["status"] == "duplicate"
    updated = _renamed(fixture("user_updated.json"), "evt_updated_1", "2025-02-01T12:40:00Z")
    updated["data"]["object"]["given_name"] = "Johnny"
    assert e2e.post(updated).status_code == 202
    e2e.wait_finished(2)
    # The update went to the linked contact: the same id, the newest values.
    updated_contact = e2e.hubspot.contact_by_email("john.doe@gmail.com")
    assert updated_contact is not None and updated_contact["id"] == contact["id"]
    assert written(updated_contact) == john | {"firstname": "Johnny"}
    deleted = copy.deepcopy(fixture("user_deleted_minimal.json"))
    deleted.update(id="evt_deleted_minimal1", time="2025-02-01T12:50:00Z")
    assert e2e.post(deleted).status_code == 202
    e2e.wait_finished(3)
    assert e2e.hubspot.contacts() == []
    archived = e2e.hubspot.contacts(include_archived=True)
    assert [(c["id"], c["archived"]) for c in archived] == [(contact["id"], True)]
    assert link_of(e2e, subject).deprovisioned
    assert e2e.statuses() == [("succeeded", None)] * 3


def test_test_event_is_ignored_and_delivers_nothing(e2e: ServiceStack) -> None:
    answer = e2e.post(fixture("user_created_test_event.json"))
    assert answer.status_code == 202
    assert answer.json() == {
        "status": "ignored",
        "reason": "test_event",
        "id": "evt_6SfwXrtm8nVcjzzNCFFH1L",
    }
    with e2e.sessions() as session:
        assert session.scalars(select(Delivery)).all() == []
        assert session.scalars(select(Event.status)).one().value == "ignored"


def test_concurrent_duplicates_store_one_event(e2e: ServiceStack) -> None:
    document = auth0_event("user.created", "auth0|dup", email="dup@example.com")
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: e2e.post(document), range(16)))
    codes = sorted(a.status_code for a in answers)
    assert codes.count(202) == 1 and codes.count(200) == 15
    e2e.wait_finished(1)
    assert e2e.statuses() == [("succeeded", None)]
    # One write, the create; no second create was tried (it would have met a 409, or a
    # 207 in a batch).
    calls = [(r.method, r.status, sorted(r.emails)) for r in writes(e2e)]
    assert calls == [("POST", 201, ["dup@example.com"])], calls
    assert not [r for r in e2e.hubspot.requests_log if r.status in (207, 409)]
    contact = e2e.hubspot.contact_by_email("dup@example.com")
    assert contact is not None
    assert written(contact) == {"email": "dup@example.com"}
    assert link_of(e2e, "auth0|dup").external_id == contact["id"]


def test_one_user_never_in_flight_twice_and_ends_at_newest(e2e: ServiceStack) -> None:
    e2e.hubspot.slow_next(30, 0.05)
    events = [
        auth0_event(
            "user.updated", "auth0|busy", email="busy@example.com", given_name=f"v{n:02d}", at=n
        )
        for n in range(30)
    ]
    with ThreadPoolExecutor(6) as pool:
        # Posted in a shuffled order, as Auth0 might deliver them.
        list(pool.map(e2e.post, reversed(events)))
    e2e.wait_finished(30)
    contact = e2e.hubspot.contact_by_email("busy@example.com")
    assert contact is not None
    assert written(contact) == {"email": "busy@example.com", "firstname": "v29"}
    assert [c["id"] for c in e2e.hubspot.contacts(include_archived=True)] == [contact["id"]]
    assert link_of(e2e, "auth0|busy").external_id == contact["id"]
    assert e2e.hubspot.overlaps() == []
    statuses = e2e.statuses()
    assert statuses.count(("succeeded", None)) >= 1
    assert all(s in (("succeeded", None), ("skipped", "stale")) for s in statuses)


def test_out_of_order_update_after_delete_keeps_contact_archived(e2e: ServiceStack) -> None:
    e2e.post(auth0_event("user.updated", "auth0|ooo", email="ooo@example.com", at=5))
    e2e.wait_finished(1)
    e2e.post(auth0_event("user.deleted", "auth0|ooo", at=20))
    e2e.wait_finished(2)
    e2e.post(auth0_event("user.updated", "auth0|ooo", email="ooo@example.com", at=10))
    e2e.post(auth0_event("user.created", "auth0|ooo", email="ooo@example.com", at=0))
    e2e.wait_finished(4)
    assert e2e.hubspot.contacts() == []
    assert e2e.statuses()[2:] == [("skipped", "stale"), ("skipped", "stale")]


def test_server_errors_are_retried_and_bad_input_fails(e2e: ServiceStack) -> None:
    e2e.hubspot.fail_next(3, status=500)
    e2e.post(auth0_event("user.created", "auth0|retry", email="retry@example.com"))
    e2e.post(auth0_event("user.created", "auth0|bad", email="not an email"))
    e2e.wait_finished(2)
    # The three injected 500s were the first three answers; then the retries got through.
    log = e2e.hubspot.requests_log
    assert [(r.status, r.fault) for r in log[:3]] == [(500, "fail")] * 3
    assert all(r.fault is None for r in log[3:])
    contact = e2e.hubspot.contact_by_email("retry@example.com")
    assert contact is not None
    assert written(contact) == {"email": "retry@example.com"}
    assert link_of(e2e, "auth0|retry").external_id == contact["id"]
    with e2e.sessions() as session:
        rows = {d.subject: d for d in session.scalars(select(Delivery))}
    assert rows["auth0|retry"].status is DeliveryStatus.SUCCEEDED
    assert rows["auth0|retry"].attempts >= 2
    assert rows["auth0|bad"].status is DeliveryStatus.FAILED
    # The Celery task that handled it, as Flower shows it at /task/<id>.
    assert uuid.UUID(rows["auth0|bad"].task_id or "")
    assert rows["auth0|bad"].reason == "rejected"
    assert "INVALID_EMAIL" in (rows["auth0|bad"].last_error or "")


def test_worker_killed_mid_delivery_completes_once_after_lease(e2e: ServiceStack) -> None:
    # Only one worker runs, so the one we kill is the one holding the delivery.
    e2e.stack.stop("worker2")
    try:
        e2e.hubspot.slow_next(1, 8)
        e2e.post(auth0_event("user.created", "auth0|kill", email="kill@example.com"))
        # Claimed means committed as in_progress; the slow HTTP call then takes 8 s.
        wait_for(lambda: e2e.count(DeliveryStatus.IN_PROGRESS) == 1, 20, "a claimed delivery")
        e2e.stack.kill("worker1", signal.SIGKILL)
        e2e.start_worker("worker1")
        e2e.wait_finished(1, timeout=60)
    finally:
        if "worker2" not in e2e.stack.children:
            e2e.start_worker("worker2")
    with e2e.sessions() as session:
        delivery = session.scalars(select(Delivery)).one()
    assert delivery.status is DeliveryStatus.SUCCEEDED
    assert delivery.reclaims == 1
    # The killed worker's call still landed (the fake holds it, then applies it); the
    # worker that took over must adopt that contact, not make a second one or archive it.
    # The held call may land after the new worker's own call: wait for it before counting.
    held = wait_for(
        lambda: [r for r in e2e.hubspot.requests_log if r.fault == "apply_late"],
        20,
        "the killed worker's held call to land",
    )
    assert len(held) == 1
    created = [r for r in writes(e2e) if r.status == 201]
    assert len(created) == 1, [(r.method, r.path, r.status) for r in writes(e2e)]
    assert not [r for r in writes(e2e) if r.method == "DELETE" or "archive" in r.path]
    contacts = e2e.hubspot.contacts(include_archived=True)
    assert [written(c) for c in contacts] == [{"email": "kill@example.com"}]
    assert link_of(e2e, "auth0|kill").external_id == contacts[0]["id"]


def test_many_users_with_email_changes_reach_their_newest_state(e2e: ServiceStack) -> None:
    users = [f"auth0|many{n}" for n in range(40)]
    for n, user in enumerate(users):
        e2e.post(auth0_event("user.created", user, email=f"u{n}@example.com", at=0))
    e2e.wait_finished(40)
    for n, user in enumerate(users):
        e2e.post(
            auth0_event(
                "user.updated",
                user,
                email=f"u{n}.new@example.com",
                previous_email=f"u{n}@example.com",
                at=10,
                event_id=f"evt_{uuid.uuid4().hex[:20]}",
            )
        )
    e2e.wait_finished(80)
    emails = sorted(c["properties"]["email"] for c in e2e.hubspot.contacts())
    assert emails == sorted(f"u{n}.new@example.com" for n in range(40))
    # Each email change updated the user's own contact: no contact was made twice or
    # archived, and every link still names the contact that now has the new email.
    assert len(e2e.hubspot.contacts(include_archived=True)) == 40
    for n, user in enumerate(users):
        contact = e2e.hubspot.contact_by_email(f"u{n}.new@example.com")
        assert contact is not None
        assert link_of(e2e, user).external_id == contact["id"], user


def test_event_time_in_far_future_is_ordered_by_arrival(e2e: ServiceStack) -> None:
    from datetime import UTC, datetime, timedelta

    future = datetime.now(UTC) + timedelta(days=2)
    e2e.post(
        auth0_event(
            "user.created", "auth0|clock", email="clock@example.com", given_name="Skewed", at=future
        )
    )
    e2e.wait_finished(1)
    later = auth0_event(
        "user.updated",
        "auth0|clock",
        email="clock@example.com",
        given_name="Fixed",
        at=datetime.now(UTC) + timedelta(seconds=30),
    )
    later["time"] = stamp(datetime.now(UTC) + timedelta(seconds=30))
    e2e.post(later)
    e2e.wait_finished(2)
    contact = e2e.hubspot.contact_by_email("clock@example.com")
    assert contact is not None and contact["properties"]["firstname"] == "Fixed"
