"""Nothing is lost under faults: a broker outage, killed workers, HubSpot storms, bad tokens."""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from idsync.fakes.hubspot import FakeHubSpot
from models.db import make_engine, make_session_factory
from models.tables import Delivery, DeliveryStatus
from tests.events import auth0_event
from tests.processes import PrivateRedis, ServiceStack, stack_env, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_events_accepted_while_the_broker_is_down_are_delivered_after(
    isolated_database_url: str, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    database_url = isolated_database_url
    engine = make_engine(database_url)
    with FakeHubSpot(token="fake-token") as hubspot:
        stack = ServiceStack(
            env=stack_env(database_url, private_redis.url, "outage", hubspot),
            workdir=tmp_path,
            hubspot=hubspot,
            sessions=make_session_factory(engine),
        )
        try:
            stack.start_ingest()
            stack.start_worker()
            stack.start_beat()
            stack.post(auth0_event("user.created", "auth0|before", email="before@example.com"))
            stack.wait_finished(1)
            private_redis.stop()
            for n in range(5):
                answer = stack.post(
                    auth0_event("user.created", f"auth0|during{n}", email=f"during{n}@example.com")
                )
                # Stored durably; the lost wake-up is the sweep's job.
                assert answer.status_code == 202, answer.text
                assert answer.elapsed.total_seconds() < 5
            assert stack.count(DeliveryStatus.PENDING) == 5
            private_redis.start()
            stack.wait_finished(6, timeout=90)
        finally:
            stack.stop()
            engine.dispose()
        emails = sorted(c["properties"]["email"] for c in hubspot.contacts())
    assert emails == ["before@example.com"] + [f"during{n}@example.com" for n in range(5)]


def test_worker_killed_under_load_delivers_everything_once(e2e: ServiceStack) -> None:
    e2e.hubspot.slow_next(40, 0.05)
    rng = random.Random(7)
    expected = {}
    for n in range(150):
        user = f"auth0|load{n % 50}"
        email = f"load{n % 50}.{n // 50}@example.com"
        e2e.post(
            auth0_event(
                "user.updated",
                user,
                email=email,
                at=n // 50,
                previous_email=f"load{n % 50}.{n // 50 - 1}@example.com",
            )
        )
        expected[user] = email
    wait_for(lambda: e2e.count(DeliveryStatus.SUCCEEDED) > 5, 30, "some deliveries")
    e2e.stack.kill(rng.choice(["worker1", "worker2"]), signal.SIGKILL)
    e2e.wait_finished(150, timeout=120)
    for name in ("worker1", "worker2"):
        if name not in e2e.stack.children:
            e2e.start_worker(name)
    contacts = e2e.hubspot.contacts()
    assert sorted(c["properties"]["email"] for c in contacts) == sorted(expected.values())
    assert {s for s, _ in e2e.statuses()} <= {"succeeded", "skipped"}


def test_hubspot_storms_of_500_and_429_are_ridden_out(e2e: ServiceStack) -> None:
    # Twelve 429s: more than the six-attempt budget, which 429s must not spend.
    e2e.hubspot.rate_limit_next(12, retry_after=0.2)
    for n in range(20):
        e2e.post(auth0_event("user.created", f"auth0|storm{n}", email=f"storm{n}@example.com"))
    e2e.wait_finished(20, timeout=90)
    e2e.hubspot.fail_next(3, status=503)
    e2e.hubspot.rate_limit_next(3, policy="SECONDLY")
    for n in range(20):
        e2e.post(
            auth0_event(
                "user.updated",
                f"auth0|storm{n}",
                email=f"storm{n}@example.com",
                given_name="After",
                at=10,
            )
        )
    e2e.wait_finished(40, timeout=90)
    assert e2e.statuses().count(("succeeded", None)) == 40
    assert all(c["properties"]["firstname"] == "After" for c in e2e.hubspot.contacts())
    assert e2e.hubspot.stats()["rate_limited"] >= 12


def test_bad_credentials_pause_and_fixing_them_resumes(e2e: ServiceStack) -> None:
    e2e.hubspot.set_token("rotated-token")
    for n in range(3):
        e2e.post(auth0_event("user.created", f"auth0|pause{n}", email=f"pause{n}@example.com"))
    wait_for(
        lambda: "paused" in e2e.http.get(f"{e2e.url}/readyz").json()["destinations"]["hubspot"],
        30,
        "the destination to pause",
    )
    # Paused work stays pending, with its budget untouched.
    wait_for(lambda: e2e.count(DeliveryStatus.PENDING) == 3, 30, "all three to wait")
    with e2e.sessions() as session:
        assert [d.attempts for d in session.scalars(select(Delivery))] == [0, 0, 0]
    e2e.hubspot.set_token("fake-token")  # the operator fixes the token at HubSpot's side
    e2e.wait_finished(3, timeout=60)
    assert e2e.http.get(f"{e2e.url}/readyz").json()["destinations"]["hubspot"] == "ok"
    with e2e.sessions() as session:
        assert all(d.status is DeliveryStatus.SUCCEEDED for d in session.scalars(select(Delivery)))
