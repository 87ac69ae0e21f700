"""Recovery of failed deliveries through real processes: ingest down, the stream disabled.

The fake Auth0 (a real HTTP server on loopback) plays the Event Stream into a
real gunicorn ingest; a real Celery worker and beat run recovery passes every
2 seconds and deliver to the fake HubSpot. Ingest stops, Auth0 fails 200
deliveries and disables the stream; recovery stores the failed events while
ingest is still down, and once ingest is back, Auth0's redelivery clears its
failure count (each copy answered ``200 duplicate``) and recovery re-enables the
stream, warning that the disabled period may have lost events.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select

from idsync.fakes.auth0 import FakeAuth0
from idsync.fakes.hubspot import FakeHubSpot
from models.db import make_engine, make_session_factory
from models.tables import Auth0RecoveryPass, Event
from tests.conftest import REDIS_URL
from tests.events import auth0_event
from tests.processes import INGEST_TOKEN, ServiceStack, stack_env, wait_for

pytestmark = pytest.mark.e2e

USERS = 50
ROUNDS = 4  # updates of every user while ingest is down: USERS * ROUNDS failed events
FAILED = USERS * ROUNDS
LOST = 5  # users created while the stream is disabled: Auth0 never produces their events


def email(n: int, round_: int) -> str:
    return f"rec{n}.r{round_}@example.com"


def events_of_round(round_: int, base: datetime) -> list[dict[str, Any]]:
    """Every user's event of one round; later rounds are later in time (10 ms apart)."""
    kind = "user.created" if round_ == 0 else "user.updated"
    at = base + timedelta(milliseconds=10 * round_)
    return [
        auth0_event(
            kind,
            f"auth0|rec{n}",
            email=email(n, round_),
            previous_email=email(n, round_ - 1) if round_ else None,
            given_name=f"Round{round_}",
            at=at,
        )
        for n in range(USERS)
    ]


def passes(stack: ServiceStack) -> list[Auth0RecoveryPass]:
    with stack.sessions() as session:
        return list(session.scalars(select(Auth0RecoveryPass).order_by(Auth0RecoveryPass.id)))


def stored(stack: ServiceStack, **where: str) -> int:
    with stack.sessions() as session:
        query = select(func.count(Event.id)).filter_by(**where)
        return int(session.scalar(query) or 0)


def readiness(stack: ServiceStack) -> str:
    return str(requests.get(f"{stack.url}/readyz", timeout=5).json()["auth0_recovery"])


def test_failed_deliveries_come_back_once_and_the_stream_is_reenabled(
    isolated_database_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    engine = make_engine(isolated_database_url)
    with (
        FakeHubSpot(token="fake-token", rate_limit=10_000, window_seconds=10) as hubspot,
        # Disabled after 200 failures (Auth0's 500 / 5,000, scaled down), and not
        # re-enabled while 200 are failed.
        FakeAuth0(
            webhook_token=INGEST_TOKEN, consecutive_threshold=FAILED, total_threshold=FAILED
        ) as auth0,
    ):
        env = stack_env(
            isolated_database_url,
            REDIS_URL,
            f"{redis_prefix}-recovery",
            hubspot,
            AUTH0_DOMAIN=auth0.domain,
            AUTH0_CLIENT_ID=auth0.client_id,
            AUTH0_CLIENT_SECRET=auth0.client_secret,
            AUTH0_EVENT_STREAM_ID=auth0.stream_id,
            AUTH0_MGMT_BASE_URL=auth0.url,
            AUTH0_RECOVERY_INTERVAL="2s",
            AUTH0_RECOVERY_LAG="1s",
        )
        stack = ServiceStack(
            env=env, workdir=tmp_path, hubspot=hubspot, sessions=make_session_factory(engine)
        )
        auth0.webhook_url = f"{stack.url}/events/auth0"
        try:
            stack.start_ingest()
            stack.start_worker(concurrency=2)
            stack.start_beat()
            assert readiness(stack) == "ok"
            assert auth0.emit(events_of_round(0, datetime.now(UTC))) == [202] * USERS
            # Beat's passes run and set the watermark before anything fails.
            wait_for(lambda: [p for p in passes(stack) if p.finished_at], 20, "a first pass")

            stack.stack.stop("ingest")
            # Events that happen from now on: after the windows the passes have read.
            base = datetime.now(UTC)
            for round_ in range(1, ROUNDS + 1):
                assert auth0.emit(events_of_round(round_, base)) == [None] * USERS
            assert auth0.status == "disabled" and auth0.total_failures == FAILED
            lost = [
                auth0_event("user.created", f"auth0|lost{n}", email=f"lost{n}@example.com")
                for n in range(LOST)
            ]
            assert auth0.emit(lost) == [None] * LOST and len(auth0.dropped) == LOST

            # Recovery stores the failed events while ingest is still down; Auth0 keeps
            # them failed (its redelivery cannot get through) and refuses to re-enable.
            wait_for(
                lambda: stored(stack, received_via="recovery") == FAILED,
                30,
                "recovery to store the failed events",
            )
            assert auth0.status == "disabled"

            stack.start_ingest()
            wait_for(
                lambda: auth0.status == "enabled" and auth0.total_failures == 0,
                30,
                f"the stream re-enabled (now {auth0.state()})",
            )
            stack.wait_finished(expected=USERS * (ROUNDS + 1), timeout=30)
            warning = wait_for(
                lambda: (
                    readiness(stack).startswith("the Event Stream was disabled")
                    and readiness(stack)
                ),
                10,
                "/readyz to warn about the disabled period",
            )
            assert "idsync backfill" in warning

            # Every user ends in HubSpot as its newest state, once; the lost users not at all.
            contacts = hubspot.contacts()
            assert sorted(c["properties"]["email"] for c in contacts) == sorted(
                email(n, ROUNDS) for n in range(USERS)
            )
            assert {c["properties"]["firstname"] for c in contacts} == {f"Round{ROUNDS}"}
            # Each event stored once: by the webhook before the outage, by recovery after.
            assert stored(stack) == USERS * (ROUNDS + 1)
            assert stored(stack, received_via="webhook") == USERS
            # Which later pass re-reads which still-failed delivery (a duplicate then) depends
            # on timing; that each was stored exactly once does not.
            assert sum(p.stored for p in passes(stack)) == FAILED
            assert all(p.stored + p.duplicates + p.rejected <= p.listed for p in passes(stack))
            # Auth0's redelivered copies were answered 200 duplicate, each once it got through.
            redelivered = [a.status for a in auth0.answers if a.redelivery and a.status]
            assert redelivered == [200] * FAILED
            assert auth0.consecutive_failures == 0
            assert not [p.error for p in passes(stack) if p.error]
        finally:
            stack.stop()
            engine.dispose()
