"""Two destinations side by side through real processes: HubSpot and a signed webhook.

A webhook receiver that never answers must cost HubSpot nothing: not worker
slots, not limiter capacity, not claim throughput. Once it answers again,
every event reaches it too, signed so that the ``standardwebhooks`` package
(inside the fake receiver) verifies every message.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import func, select

from idsync.fakes.hubspot import FakeHubSpot
from idsync.fakes.webhook_receiver import DEFAULT_SECRET, FakeWebhookReceiver
from models.db import make_engine, make_session_factory
from models.tables import Delivery, DeliveryAttempt, DeliveryStatus
from tests.conftest import REDIS_URL
from tests.events import auth0_event
from tests.processes import ServiceStack, stack_env, wait_for

pytestmark = pytest.mark.e2e

USERS = 40


def _succeeded(stack: ServiceStack, destination: str) -> int:
    with stack.sessions() as session:
        return int(
            session.scalar(
                select(func.count(Delivery.id)).where(
                    Delivery.destination == destination,
                    Delivery.status == DeliveryStatus.SUCCEEDED,
                )
            )
            or 0
        )


def post_users(stack: ServiceStack, numbers: range) -> None:
    for n in numbers:
        answer = stack.post(auth0_event("user.created", f"auth0|two{n}", email=f"two{n}@x.com"))
        assert answer.status_code == 202 and answer.json()["deliveries"] == 2


def _attempts(stack: ServiceStack, destination: str) -> int:
    with stack.sessions() as session:
        return int(
            session.scalar(
                select(func.count(DeliveryAttempt.id))
                .join(Delivery, Delivery.id == DeliveryAttempt.delivery_id)
                .where(Delivery.destination == destination)
            )
            or 0
        )


def test_a_hanging_webhook_costs_hubspot_nothing_and_catches_up_signed(
    isolated_database_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    engine = make_engine(isolated_database_url)
    with FakeHubSpot(token="fake-token") as hubspot, FakeWebhookReceiver() as receiver:
        env = stack_env(
            isolated_database_url,
            REDIS_URL,
            f"{redis_prefix}-two",
            hubspot,
            DESTINATIONS="hubspot,licenses",
            LICENSES_KIND="webhook",
            LICENSES_URL=receiver.url,
            LICENSES_SECRET=DEFAULT_SECRET,
            # Each hanging call holds its task for seconds; the sweep keeps publishing
            # more: without a cap they would take every worker slot.
            LICENSES_TIMEOUT_SECONDS="10",
            LICENSES_CONNECT_TIMEOUT_SECONDS="0.5",
            LICENSES_BATCH_SIZE="5",  # many batches: many tasks want a slot
            LICENSES_CONCURRENCY=os.environ.get("IDSYNC_TEST_WEBHOOK_CONCURRENCY", "1"),
            LEASE_SECONDS="26",
            SETTLE_SECONDS="12",
        )
        stack = ServiceStack(
            env=env, workdir=tmp_path, hubspot=hubspot, sessions=make_session_factory(engine)
        )
        try:
            stack.start_ingest()
            # Three slots: more than the sum of both destinations' caps (1 + 1).
            stack.start_worker(concurrency=3)
            stack.start_beat()
            receiver.hang_next(10_000)
            post_users(stack, range(USERS // 2))
            # The webhook's tasks now sit on hanging calls, batch after batch ...
            wait_for(lambda: _attempts(stack, "licenses") >= 5, 60, "hanging webhook calls")
            # ... and HubSpot's new work still goes through at once. (With the cap
            # lifted, IDSYNC_TEST_WEBHOOK_CONCURRENCY=10, the hanging tasks hold every
            # worker slot and this wait times out.)
            post_users(stack, range(USERS // 2, USERS))
            wait_for(lambda: _succeeded(stack, "hubspot") == USERS, 8, "HubSpot to drain")
            assert _succeeded(stack, "licenses") == 0
            assert len(hubspot.contacts()) == USERS

            receiver.reset()  # answers again, and forgets what it held
            wait_for(lambda: _succeeded(stack, "licenses") == USERS, 90, "the webhook to catch up")
            messages = receiver.messages()
            assert sorted(m["data"]["user_id"] for m in messages) == sorted(
                f"auth0|two{n}" for n in range(USERS)
            )
            assert all(m["type"] == "user.upserted" for m in messages)
            assert all(r.verified for r in receiver.requests_log if r.status < 300)
        finally:
            stack.stop()
            engine.dispose()
