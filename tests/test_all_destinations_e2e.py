"""Every destination kind at once, through real processes, from one event stream.

HubSpot, Salesforce, Segment, Braze and a signed webhook (``licenses``) each get
a delivery per event; every fake is a real HTTP server on loopback. The stream
holds creates, updates (an email change, a block, an unblock) and deletes for a
set of users, shuffled and partly duplicated, as Auth0 delivers them. Braze's
key is revoked before the first event: Braze pauses with its reason in
``/readyz`` while the four others reach every user's newest state, with no
retry or pause of their own. Once the key works again, the sweep's probe
resumes Braze and it catches up from the outbox, with no replay.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from idsync.fakes.braze import DEFAULT_KEY, FakeBraze
from idsync.fakes.hubspot import FakeHubSpot
from idsync.fakes.salesforce import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeSalesforce
from idsync.fakes.segment import DEFAULT_WRITE_KEY, FakeSegment
from idsync.fakes.webhook_receiver import DEFAULT_SECRET, FakeWebhookReceiver
from models.db import make_engine, make_session_factory
from models.tables import FINISHED, Delivery, DeliveryAttempt
from tests.conftest import REDIS_URL
from tests.events import auth0_event
from tests.processes import ServiceStack, stack_env, wait_for

pytestmark = pytest.mark.e2e

USERS = 10
# Another order of the same stream: IDSYNC_STREAM_SEED=<n>.
SEED = int(os.environ.get("IDSYNC_STREAM_SEED", "7"))
OTHERS = ("hubspot", "salesforce", "segment", "licenses")
DESTINATIONS = (*OTHERS, "braze")
MARK = "Idsync_Deprovisioned__c"  # Salesforce's deprovisioned checkbox
# Inside SETTLE_SECONDS=3 (longer than connect + timeout) and LEASE_SECONDS=15, long enough
# that a call on a busy machine is not cut off: a retry of one of the others fails the test.
FAST_CALLS = {"TIMEOUT_SECONDS": "2", "CONNECT_TIMEOUT_SECONDS": "0.5"}


@dataclass(frozen=True)
class Newest:
    """A user's newest state, as the stream's newest event says it."""

    user_id: str
    email: str
    given_name: str
    deprovisioned: bool
    deleted: bool
    emails: tuple[str, ...]  # every email the user had in the stream


def user_stream(users: int) -> tuple[list[dict[str, Any]], dict[str, Newest]]:
    """Each user's events, with each user's newest state.

    By ``n % 5``: 0 created then renamed; 1 then an email change; 2 then blocked;
    3 then deleted (without an email, as Auth0 often sends it); 4 blocked, then
    unblocked again.
    """
    events: list[dict[str, Any]] = []
    newest: dict[str, Newest] = {}
    for n in range(users):
        uid, email = f"auth0|all{n}", f"all{n}@example.com"
        names = {"family_name": f"Last{n}"}
        events.append(
            auth0_event("user.created", uid, email=email, given_name=f"First{n}", **names)
        )
        events.append(
            auth0_event("user.updated", uid, email=email, given_name=f"Second{n}", at=10, **names)
        )
        final = Newest(uid, email, f"Second{n}", False, False, (email,))
        match n % 5:
            case 1:
                moved = f"all{n}.moved@example.com"
                events.append(
                    auth0_event(
                        "user.updated",
                        uid,
                        email=moved,
                        previous_email=email,
                        given_name=f"Second{n}",
                        at=20,
                        **names,
                    )
                )
                final = Newest(uid, moved, f"Second{n}", False, False, (email, moved))
            case 2:
                events.append(
                    auth0_event(
                        "user.updated",
                        uid,
                        email=email,
                        given_name=f"Second{n}",
                        blocked=True,
                        at=20,
                        **names,
                    )
                )
                final = Newest(uid, email, f"Second{n}", True, False, (email,))
            case 3:
                events.append(auth0_event("user.deleted", uid, at=30))
                final = Newest(uid, email, f"Second{n}", True, True, (email,))
            case 4:
                for at, blocked in ((20, True), (30, False)):
                    events.append(
                        auth0_event(
                            "user.updated",
                            uid,
                            email=email,
                            given_name=f"Second{n}",
                            blocked=blocked,
                            at=at,
                            **names,
                        )
                    )
        newest[uid] = final
    return events, newest


def shuffled_with_duplicates(events: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The events in no order, a third of them delivered twice."""
    chosen = random.Random(seed)
    stream = events + chosen.sample(events, len(events) // 3)
    chosen.shuffle(stream)
    return stream


# What each fake holds, against the newest states


def hubspot_problems(fake: FakeHubSpot, newest: dict[str, Newest]) -> list[str]:
    live = {c["properties"].get("email"): c["properties"] for c in fake.contacts()}
    problems = []
    for user in newest.values():
        if user.deprovisioned:
            kept = [email for email in user.emails if email in live]
            if kept:
                problems.append(f"hubspot: {user.user_id} is deprovisioned but {kept} live")
        elif live.get(user.email, {}).get("firstname") != user.given_name:
            problems.append(f"hubspot: {user.user_id} is {live.get(user.email)}")
    if len(live) != sum(not u.deprovisioned for u in newest.values()):
        problems.append(f"hubspot: live contacts {sorted(live)}")
    return problems


def salesforce_problems(fake: FakeSalesforce, newest: dict[str, Newest]) -> list[str]:
    by_user: dict[str, list[dict[str, Any]]] = {}
    for record in fake.records("Contact"):
        by_user.setdefault(str(record.get("Auth0_User_Id__c")), []).append(record)
    problems = []
    for user in newest.values():
        records = by_user.get(user.user_id, [])
        if len(records) > 1:
            problems.append(f"salesforce: {user.user_id} has {len(records)} records")
        elif user.deprovisioned:
            # Never linked (its newest event came first): nothing is created for it.
            if records and records[0].get(MARK) is not True:
                problems.append(f"salesforce: {user.user_id} is not marked: {records[0]}")
        elif not records:
            problems.append(f"salesforce: {user.user_id} has no record")
        else:
            got = {k: records[0].get(k) for k in ("Email", "FirstName", MARK)}
            if got != {"Email": user.email, "FirstName": user.given_name, MARK: False}:
                problems.append(f"salesforce: {user.user_id} is {got}")
    return problems


def segment_problems(fake: FakeSegment, newest: dict[str, Newest]) -> list[str]:
    records = fake.records()
    problems = []
    for user in newest.values():
        traits = records.get(user.user_id, {}).get("traits", {})
        expected = {"deprovisioned": user.deprovisioned}
        if not user.deprovisioned:
            expected |= {"email": user.email, "firstName": user.given_name}
        if {key: traits.get(key) for key in expected} != expected:
            problems.append(f"segment: {user.user_id} traits {traits}")
    return problems


def braze_problems(fake: FakeBraze, newest: dict[str, Newest]) -> list[str]:
    profiles = fake.profiles()
    problems = []
    for user in newest.values():
        profile = profiles.get(user.user_id)
        if user.deprovisioned:
            if profile is not None and profile.get("idsync_deprovisioned") is not True:
                problems.append(f"braze: {user.user_id} is not marked: {profile}")
        elif profile is None or (
            profile.get("email"),
            profile.get("first_name"),
            profile.get("idsync_deprovisioned"),
        ) != (user.email, user.given_name, False):
            problems.append(f"braze: {user.user_id} is {profile}")
    return problems


def webhook_problems(receiver: FakeWebhookReceiver, newest: dict[str, Newest]) -> list[str]:
    last: dict[str, dict[str, Any]] = {}
    for message in receiver.messages():  # arrival order, each webhook-id once
        last[message["data"]["user_id"]] = message
    problems = []
    for user in newest.values():
        message = last.get(user.user_id)
        kind = (
            "user.deleted"
            if user.deleted
            else ("user.deprovisioned" if user.deprovisioned else "user.upserted")
        )
        if message is None or message["type"] != kind:
            problems.append(f"licenses: {user.user_id} last got {message}")
        elif not user.deprovisioned and (
            message["data"]["email"],
            message["data"]["profile"].get("given_name"),
        ) != (user.email, user.given_name):
            problems.append(f"licenses: {user.user_id} last got {message['data']}")
    return problems


# The outbox


def open_count(stack: ServiceStack, destination: str) -> int:
    with stack.sessions() as session:
        return int(
            session.scalar(
                select(func.count(Delivery.id)).where(
                    Delivery.destination == destination, Delivery.status.not_in(FINISHED)
                )
            )
            or 0
        )


def statuses(stack: ServiceStack, destination: str) -> dict[str, int]:
    with stack.sessions() as session:
        rows = session.execute(
            select(Delivery.status, Delivery.reason, func.count(Delivery.id))
            .where(Delivery.destination == destination)
            .group_by(Delivery.status, Delivery.reason)
        ).all()
    return {f"{s.value}{':' + r if r else ''}": int(n) for s, r, n in rows}


def troubled_attempts(stack: ServiceStack, destinations: tuple[str, ...]) -> list[tuple[str, str]]:
    """Attempts of these destinations that were retried, paused or failed."""
    with stack.sessions() as session:
        rows = session.execute(
            select(Delivery.destination, DeliveryAttempt.outcome)
            .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
            .where(
                Delivery.destination.in_(destinations),
                DeliveryAttempt.outcome.in_(("retry", "pause", "failed")),
            )
        ).all()
    return [(row[0], row[1]) for row in rows]


def readiness(stack: ServiceStack) -> dict[str, str]:
    answer = requests.get(f"{stack.url}/readyz", timeout=5).json()
    return dict(answer["destinations"])


def test_every_destination_ends_at_the_newest_state_and_a_revoked_braze_catches_up(
    isolated_database_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    events, newest = user_stream(USERS)
    stream = shuffled_with_duplicates(events, seed=SEED)
    engine = make_engine(isolated_database_url)
    with (
        FakeHubSpot(token="fake-token", rate_limit=10_000, window_seconds=10) as hubspot,
        FakeSalesforce() as salesforce,
        FakeSegment() as segment,
        FakeBraze() as braze,
        FakeWebhookReceiver() as receiver,
    ):
        # A Contact the sales team made for user 0 before idsync: it is adopted, not doubled.
        adopted = salesforce.seed("Contact", {"Email": "all0@example.com", "LastName": "Sales"})
        env = stack_env(
            isolated_database_url,
            REDIS_URL,
            f"{redis_prefix}-all",
            hubspot,
            DESTINATIONS=",".join(DESTINATIONS),
            SALESFORCE_LOGIN_URL=salesforce.url,
            SALESFORCE_CLIENT_ID=DEFAULT_CLIENT_ID,
            SALESFORCE_CLIENT_SECRET=DEFAULT_CLIENT_SECRET,
            SALESFORCE_RATE_LIMIT="50/1s",
            SEGMENT_WRITE_KEY=DEFAULT_WRITE_KEY,
            SEGMENT_BASE_URL=segment.url,
            BRAZE_REST_ENDPOINT=braze.url,
            BRAZE_API_KEY=DEFAULT_KEY,
            LICENSES_KIND="webhook",
            LICENSES_URL=receiver.url,
            LICENSES_SECRET=DEFAULT_SECRET,
            # A batch may start calls for LEASE_SECONDS - 1.5 - 5 s: a Salesforce batch makes
            # several (token, lookup, upsert, update), which a busy machine can stretch.
            LEASE_SECONDS="15",
            **{f"{name.upper()}_{k}": v for name in DESTINATIONS for k, v in FAST_CALLS.items()},
        )
        stack = ServiceStack(
            env=env, workdir=tmp_path, hubspot=hubspot, sessions=make_session_factory(engine)
        )
        try:
            stack.start_ingest()
            stack.start_worker(concurrency=4)
            stack.start_beat()
            braze.revoke()  # someone deleted the key in Braze's dashboard
            for document in stream:
                answer = stack.post(document)
                assert answer.status_code in (200, 202), answer.text
                assert answer.json()["status"] in ("accepted", "duplicate")

            try:
                wait_for(lambda: all(open_count(stack, n) == 0 for n in OTHERS), 60, "the others")
            except AssertionError as error:
                raise AssertionError({n: statuses(stack, n) for n in DESTINATIONS}) from error
            assert hubspot_problems(hubspot, newest) == []
            assert salesforce_problems(salesforce, newest) == []
            assert segment_problems(segment, newest) == []
            assert webhook_problems(receiver, newest) == []
            assert troubled_attempts(stack, OTHERS) == []
            assert all("failed" not in statuses(stack, name) for name in OTHERS)
            record = salesforce.record(adopted)
            assert record is not None and record["Auth0_User_Id__c"] == "auth0|all0"

            # Braze meanwhile: paused, its reason shown, nothing written, nothing given up.
            ready = wait_for(
                lambda: (r := readiness(stack))["braze"].startswith("paused:") and r,
                10,
                f"Braze paused (log {braze.requests_log}, {statuses(stack, 'braze')})",
            )
            assert ready["braze"].startswith("paused:") and "401" in ready["braze"], ready
            assert all(ready[name] == "ok" for name in OTHERS), ready
            assert braze.profiles() == {}
            # Only what needs no call finished (stale events, users never written).
            waiting = statuses(stack, "braze")
            assert {k for k in waiting if not k.startswith("skipped:")} == {"pending"}, waiting

            before = {
                name: _received(name, hubspot, salesforce, segment, receiver) for name in OTHERS
            }
            braze.restore()
            wait_for(lambda: open_count(stack, "braze") == 0, 30, "Braze to catch up")
            assert braze_problems(braze, newest) == []
            # Nothing reached Braze before the key came back: a user deprovisioned by then
            # was never written, and is not written now to deprovision it.
            gone = {u.user_id for u in newest.values() if u.deprovisioned}
            assert gone.isdisjoint(braze.profiles()), sorted(gone & set(braze.profiles()))
            assert "failed" not in " ".join(statuses(stack, "braze")), statuses(stack, "braze")
            assert readiness(stack)["braze"] == "ok"
            # Braze's catching up sent nothing more to the others.
            after = {
                name: _received(name, hubspot, salesforce, segment, receiver) for name in OTHERS
            }
            assert after == before
        finally:
            stack.stop()
            engine.dispose()


def _received(
    name: str,
    hubspot: FakeHubSpot,
    salesforce: FakeSalesforce,
    segment: FakeSegment,
    receiver: FakeWebhookReceiver,
) -> int:
    """How many requests a fake has answered so far."""
    match name:
        case "hubspot":
            return int(hubspot.stats()["total"])
        case "salesforce":
            return int(salesforce.stats()["requests"])
        case "segment":
            return len(segment.requests_log)
        case _:
            return len(receiver.requests_log)


def test_the_stream_is_out_of_order_and_duplicated() -> None:
    events, newest = user_stream(USERS)
    stream = shuffled_with_duplicates(events, seed=7)
    assert len(stream) > len(events) and len({e["id"] for e in stream}) == len(events)
    assert stream != sorted(stream, key=lambda e: (e["data"]["object"]["user_id"], e["time"]))
    assert sum(u.deprovisioned for u in newest.values()) == 2 * USERS // 5
