"""HubSpot's adapter under faults: late writes, whole-call errors, odd answers, bad mappings.

In-process through ``run_batch`` against real PostgreSQL and the fake HubSpot
over HTTP (``responses`` only where the fake cannot misbehave: a 2xx of an
unexpected shape).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import pytest
import responses
from sqlalchemy import select

from models.db import transaction
from models.outbox import destination_state, reopen_unsettled
from models.tables import Delivery, DeliveryStatus, Link
from tests.events import auth0_event
from tests.pipeline import Pipeline
from tests.processes import wait_for
from workers.delivery import run_batch
from workers.destinations.base import Intent, LinkState, UserState, Verdict
from workers.destinations.hubspot.adapter import HubSpotDestination
from workers.destinations.hubspot.client import HubSpotClient, HubSpotTransportError
from workers.ratelimit import LocalRateLimiter

SOURCE_A = "urn:auth0:a.example.com"
SOURCE_B = "urn:auth0:b.example.com"


def _once(pipeline: Pipeline) -> Any:
    return run_batch(
        sessions=pipeline.sessions, settings=pipeline.settings, destination=pipeline.destination
    )


def _quiet(pipeline: Pipeline, timeout: float = 30) -> None:
    """Run batches and the verification sweep until nothing is pending or uncertain."""

    def done() -> bool:
        with transaction(pipeline.sessions) as session:
            reopen_unsettled(session=session, destination="hubspot")
        _once(pipeline)
        with pipeline.sessions() as session:
            uncertain = session.scalars(select(Link).where(Link.uncertain_until.is_not(None)))
            return not pipeline.pending() and not uncertain.first()

    wait_for(done, timeout, "a quiet outbox")
    wait_for(lambda: pipeline.hubspot.in_flight() == 0, timeout, "no late request in flight")


def _contact(pipeline: Pipeline, email: str) -> dict[str, Any]:
    contact = pipeline.hubspot.contact_by_email(email)
    assert contact is not None, f"no contact {email}"
    return contact


# Unknown outcomes


def test_a_late_update_landing_after_a_newer_one_is_put_right(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|late", email="l@example.com", given_name="A1"))
    pipeline.drain()
    pipeline.hubspot.apply_late_next(1, 2.5)  # past the 1.5 s call deadline
    pipeline.post(
        auth0_event("user.updated", "auth0|late", email="l@example.com", given_name="A2", at=5)
    )
    assert _once(pipeline).outcomes == {"retry:timeout_or_connection": 1}
    assert pipeline.link("auth0|late").uncertain_until is not None
    pipeline.post(
        auth0_event("user.updated", "auth0|late", email="l@example.com", given_name="A3", at=10)
    )
    pipeline.drain()  # sends A3 while A2 is still on its way
    wait_for(lambda: pipeline.hubspot.in_flight() == 0, 10, "the late write to land")
    assert _contact(pipeline, "l@example.com")["properties"]["firstname"] == "A2"  # the hazard
    _quiet(pipeline)
    assert _contact(pipeline, "l@example.com")["properties"]["firstname"] == "A3"
    assert pipeline.link("auth0|late").uncertain_until is None


def test_a_create_with_no_answer_never_makes_a_twin(pipeline: Pipeline) -> None:
    """The create lands late; the user changed email meanwhile: one contact, at the new email."""
    pipeline.hubspot.apply_late_next(1, 2.5)
    pipeline.post(auth0_event("user.created", "auth0|twin", email="old@example.com"))
    assert _once(pipeline).outcomes == {"retry:timeout_or_connection": 1}
    pipeline.post(
        auth0_event(
            "user.updated",
            "auth0|twin",
            email="new@example.com",
            previous_email="old@example.com",
            at=5,
        )
    )
    _quiet(pipeline)
    contacts = pipeline.hubspot.contacts()
    assert [c["properties"]["email"] for c in contacts] == ["new@example.com"]
    assert pipeline.link("auth0|twin").external_id == contacts[0]["id"]


def test_an_answer_that_never_came_is_verified_without_writing_again(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|ok", email="ok@example.com", given_name="B"))
    pipeline.drain()
    pipeline.hubspot.answer_late_next(1, 2.5)  # applied at once, answered too late
    pipeline.post(
        auth0_event("user.updated", "auth0|ok", email="ok@example.com", given_name="C", at=5)
    )
    _once(pipeline)
    mark = time.monotonic()  # the fake runs in this process: one clock
    _quiet(pipeline)
    after = [r for r in pipeline.hubspot.requests_log if r.started >= mark]
    # The retry reads back and finds the write landed; the end of the window reads again.
    assert [r.path for r in after] == ["/crm/v3/objects/contacts/batch/read"] * 2
    assert _contact(pipeline, "ok@example.com")["properties"]["firstname"] == "C"
    assert pipeline.deliveries()[-1] == ("succeeded", "verified")


def test_a_trickling_answer_ends_at_the_call_deadline() -> None:
    """``requests``' read timeout is per read: a server sending a byte now and then
    would hold the call for as long as it likes without a deadline of its own."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    stop = threading.Event()

    def trickle() -> None:
        connection, _ = server.accept()
        connection.recv(65536)
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        connection.sendall(b"Content-Length: 100\r\n\r\n{")
        for _ in range(40):  # 40 x 0.2 s, each read well inside the read timeout
            if stop.wait(0.2):
                break
            try:
                connection.sendall(b" ")
            except OSError:
                break
        connection.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    client = HubSpotClient(f"http://127.0.0.1:{port}", "t", timeout=(0.5, 1.0))
    started = time.monotonic()
    with pytest.raises(HubSpotTransportError) as raised:
        client.update_contact("1", {"firstname": "x"})
    elapsed = time.monotonic() - started
    stop.set()
    server.close()
    assert raised.value.category == "TIMEOUT" and raised.value.maybe_applied
    assert elapsed < 4, f"the call lasted {elapsed:.1f}s; the trickle lasts 8s"


def test_no_call_starts_after_the_batch_deadline(pipeline: Pipeline) -> None:
    intents = [
        Intent(
            key=str(n),
            user=UserState.from_event(
                "user.created", auth0_event("user.created", f"auth0|{n}", email=f"{n}@x.com")
            ),
            link=LinkState(),
        )
        for n in range(3)
    ]
    outcomes = pipeline.destination.deliver(
        intents, claim=lambda key, record: True, deadline=time.monotonic() - 1
    )
    assert {(o.verdict, o.reason, o.counts_against_budget) for o in outcomes.values()} == {
        (Verdict.RETRY, "batch_deadline", False)
    }
    assert pipeline.hubspot.requests_log == []


# Whole-call errors and odd answers


def _two_linked_users(pipeline: Pipeline) -> None:
    for n in (1, 2):
        pipeline.post(auth0_event("user.created", f"auth0|w{n}", email=f"w{n}@example.com"))
    pipeline.drain()


@pytest.mark.parametrize("status", [404, 409])
def test_a_whole_call_404_or_409_on_a_batch_update_is_split(
    pipeline: Pipeline, status: int
) -> None:
    _two_linked_users(pipeline)
    for n in (1, 2):
        pipeline.post(
            auth0_event(
                "user.updated", f"auth0|w{n}", email=f"w{n}@example.com", given_name="N", at=5
            )
        )
    pipeline.hubspot.fail_next(1, status)
    pipeline.drain()
    assert pipeline.deliveries()[2:] == [("succeeded", None), ("succeeded", None)]
    assert {c["properties"]["firstname"] for c in pipeline.hubspot.contacts()} == {"N"}


def test_a_400_on_a_batch_archive_is_split(pipeline: Pipeline) -> None:
    _two_linked_users(pipeline)
    for n in (1, 2):
        pipeline.post(auth0_event("user.deleted", f"auth0|w{n}", at=5))
    pipeline.hubspot.fail_next(1, 400)
    pipeline.drain()
    assert pipeline.deliveries()[2:] == [("succeeded", None), ("succeeded", None)]
    assert pipeline.hubspot.contacts() == []


@pytest.mark.parametrize(
    "answer",
    [
        {"results": "not a list"},
        {"results": [["not", "an", "object"]]},
        {"results": [{"id": 7, "properties": ["odd"]}], "errors": {"odd": True}},
    ],
)
def test_a_2xx_of_an_unexpected_shape_retries_with_the_error_on_record(
    settings: Any, answer: dict[str, Any]
) -> None:
    chosen = settings.model_copy(update={"hubspot_base_url": "http://127.0.0.1:9"})
    destination = HubSpotDestination(chosen, LocalRateLimiter(limit=100, window=1))
    event = auth0_event("user.created", "auth0|odd", email="odd@example.com")
    intent = Intent(key="1", user=UserState.from_event("user.created", event), link=LinkState())
    with responses.RequestsMock() as mocked:
        mocked.post(
            "http://127.0.0.1:9/crm/v3/objects/contacts/batch/create", json=answer, status=201
        )
        outcome = destination.deliver(
            [intent], claim=lambda k, r: True, deadline=time.monotonic() + 5
        )["1"]
    assert outcome.verdict is Verdict.RETRY
    assert outcome.calls and outcome.calls[0].request.startswith(
        "POST /crm/v3/objects/contacts/batch"
    )


# Mapping and scopes


def test_a_missing_property_in_a_207_pauses_instead_of_failing(pipeline: Pipeline) -> None:
    pipeline.hubspot.set_known_properties(["email", "firstname", "lastname"])
    pipeline.post(auth0_event("user.created", "auth0|m", email="m@example.com", phone="+1"))
    report = _once(pipeline)
    assert report.outcomes == {"retry:misconfigured": 1}
    with pipeline.sessions() as session:
        state = destination_state(session=session, name="hubspot")
        assert state is not None and state.paused
        assert "PROPERTY_DOESNT_EXIST" in (state.paused_reason or "")
        row = session.scalars(select(Delivery)).one()
    assert row.status is DeliveryStatus.PENDING and row.attempts == 0


def test_the_probe_names_mapped_properties_that_do_not_exist(pipeline: Pipeline) -> None:
    assert pipeline.destination.probe() is None
    pipeline.hubspot.set_known_properties(["email", "firstname", "lastname"])
    problem = pipeline.destination.probe()
    assert problem is not None and "phone" in problem


def test_the_probe_without_the_schema_scope_cannot_verify_but_does_not_block(
    pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline.hubspot.set_known_properties(["email"])
    pipeline.hubspot.set_missing_scopes(["crm.schemas.contacts.read"])
    with caplog.at_level(logging.WARNING):
        assert pipeline.destination.probe() is None
    assert "cannot verify the mapping" in caplog.text


def test_the_probe_checks_the_mark_property_in_mark_mode(pipeline: Pipeline) -> None:
    marking = pipeline.settings.model_copy(update={"deprovision": "mark"})
    destination = HubSpotDestination(marking, LocalRateLimiter(limit=100, window=1))
    pipeline.hubspot.set_known_properties(["email", "firstname", "lastname", "phone"])
    problem = destination.probe()
    assert problem is not None and "idsync_deprovisioned" in problem


# Two users, one contact


@pytest.mark.parametrize("first", [SOURCE_A, SOURCE_B])
def test_one_user_id_in_two_sources_never_shares_a_contact(pipeline: Pipeline, first: str) -> None:
    """The same ``user_id`` in two tenants is two users: the ownership check keys by both."""
    second = SOURCE_B if first == SOURCE_A else SOURCE_A
    pipeline.post(
        auth0_event("user.created", "auth0|same", email="same@example.com", source=second)
    )
    pipeline.drain()
    # Both in one batch: the other source's user updates, this one arrives with the same email.
    pipeline.post(auth0_event("user.created", "auth0|same", email="same@example.com", source=first))
    pipeline.post(
        auth0_event(
            "user.updated",
            "auth0|same",
            email="same@example.com",
            given_name="Z",
            source=second,
            at=5,
        )
    )
    _quiet(pipeline)
    with pipeline.sessions() as session:
        links = {link.source: link for link in session.scalars(select(Link))}
        rows = {
            (d.source, d.status.value, d.reason)
            for d in session.scalars(select(Delivery).where(Delivery.source == first))
        }
    assert links[first].external_id is None
    assert links[second].external_id == _contact(pipeline, "same@example.com")["id"]
    assert rows == {(first, "failed", "contact_owned")}


def test_two_workers_adopting_one_contact_at_once_cannot_both_win(pipeline: Pipeline) -> None:
    """Two users whose email matches one existing contact, claimed by two workers at once."""
    pipeline.hubspot.seed_contact({"email": "shared@example.com"})
    pipeline.post(auth0_event("user.created", "auth0|x1", email="shared@example.com"))
    pipeline.post(auth0_event("user.created", "auth0|x2", email="shared@example.com"))
    settings = pipeline.settings.model_copy(update={"hubspot_batch_size": 1})
    pipeline.hubspot.answer_late_next(4, 0.3)  # both 409s, then both updates, arrive together

    def work() -> None:
        destination = HubSpotDestination(settings, LocalRateLimiter(limit=1000, window=1))
        run_batch(sessions=pipeline.sessions, settings=settings, destination=destination)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    # Neither batch was rolled back: both users are accounted for, none left in progress.
    assert "in_progress" not in {status for status, _ in pipeline.deliveries()}
    pipeline.drain()
    assert sorted(pipeline.deliveries()) == [("failed", "contact_owned"), ("succeeded", None)]
    with pipeline.sessions() as session:
        holders = [link.subject for link in session.scalars(select(Link)) if link.external_id]
    assert len(holders) == 1


def test_read_returns_linked_contacts_by_id_and_leaves_out_unknown_ones(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|r", email="r@example.com", given_name="R"))
    pipeline.drain()
    linked = pipeline.link("auth0|r").external_id
    assert linked is not None
    found = pipeline.destination.read([linked, "999999"])
    assert set(found) == {linked}
    assert (found[linked]["email"], found[linked]["firstname"]) == ("r@example.com", "R")
    assert pipeline.destination.clears_with == ""
