"""``Pipeline``: events in through the real Flask app, out through ``run_batch``.

Used by the in-process tests (real PostgreSQL, the fake HubSpot over HTTP).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, text

from idsync.fakes.hubspot import FakeHubSpot
from idsync.settings import Settings
from ingest import create_app
from models.tables import Delivery, DeliveryStatus, Link
from workers.delivery import run_batch
from workers.destinations.base import Destination
from workers.destinations.hubspot.adapter import HubSpotDestination
from workers.ratelimit import LocalRateLimiter


@pytest.fixture
def hubspot() -> Iterator[FakeHubSpot]:
    with FakeHubSpot(token="fake-token") as fake:
        yield fake


class Pipeline:
    """Post events to ingest, drain the outbox into the fake, read the results."""

    def __init__(self, settings: Settings, sessions: Any, hubspot: FakeHubSpot) -> None:
        self.settings = settings.model_copy(update={"hubspot_base_url": hubspot.url})
        self.sessions = sessions
        self.hubspot = hubspot
        self.app = create_app(self.settings)
        self.client = self.app.test_client()
        self.destination = HubSpotDestination(self.settings, LocalRateLimiter(limit=1000, window=1))

    def close(self) -> None:
        """Close the adapter and the app's database pools (an open connection left to the
        garbage collector fails whichever test is running when it is collected)."""
        self.destination.close()
        self.app.extensions["idsync"].engine.dispose()

    def reset(self) -> None:
        """Empty the outbox and the fake, for one more property-test example."""
        with self.sessions() as session, session.begin():
            session.execute(
                text("TRUNCATE delivery_attempts, deliveries, events, links, destination_states")
            )
        self.hubspot.reset()

    def post(self, document: dict[str, Any]) -> Any:
        return self.client.post(
            "/events/auth0",
            json=document,
            headers={"Authorization": "Bearer test-ingest-token"},
        )

    def drain(self, rounds: int = 20) -> None:
        """Run batches until nothing is claimable (retries are due at once here)."""
        self.drain_with(self.destination, rounds)

    def drain_with(self, destination: Destination, rounds: int = 20) -> None:
        """``drain`` through another destination (the engine's in-memory one, say)."""
        for _ in range(rounds):
            report = run_batch(
                sessions=self.sessions, settings=self.settings, destination=destination
            )
            if report.claimed == 0 and not self.pending():
                return
        raise AssertionError(f"outbox not drained: {self.deliveries()}")

    def pending(self) -> int:
        with self.sessions() as session:
            return len(
                session.scalars(
                    select(Delivery).where(
                        Delivery.status.in_([DeliveryStatus.PENDING, DeliveryStatus.IN_PROGRESS])
                    )
                ).all()
            )

    def deliveries(self) -> list[tuple[str, str | None]]:
        with self.sessions() as session:
            rows = session.scalars(select(Delivery).order_by(Delivery.id)).all()
            return [(row.status.value, row.reason) for row in rows]

    def link(self, subject: str) -> Link:
        with self.sessions() as session:
            return session.scalars(select(Link).where(Link.subject == subject)).one()


@pytest.fixture
def pipeline(settings: Settings, sessions: Any, hubspot: FakeHubSpot) -> Iterator[Pipeline]:
    pipe = Pipeline(settings.model_copy(update={"retry_schedule": ("0s",) * 4}), sessions, hubspot)
    yield pipe
    pipe.close()
