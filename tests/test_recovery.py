"""Recovery passes against the fake Auth0 and a real ingest server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from idsync.auth0.client import ManagementClient
from idsync.auth0.recovery import (
    PassReport,
    read_failed,
    recovery_off,
    recovery_status,
    run_pass,
    watermark,
)
from idsync.fakes.auth0 import FakeAuth0
from idsync.fakes.server import FakeServer
from idsync.settings import Settings
from idsync.stack import free_port
from idsync.wakeups import Waker
from ingest import create_app
from models.tables import Auth0RecoveryPass, Delivery, Event, Quarantine
from tests.events import auth0_event

INGEST_TOKEN = "test-ingest-token"


class IngestServer(FakeServer):
    """idsync's own ingest app, served on loopback for the fake Auth0 to post to."""

    label = "ingest server"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.app = create_app(settings)

    def stop(self) -> None:
        super().stop()
        self.app.extensions["idsync"].engine.dispose()


@pytest.fixture
def fake() -> Iterator[FakeAuth0]:
    # Until a test starts ingest, the webhook URL is a closed port: every delivery fails.
    with FakeAuth0(
        webhook_url=f"http://127.0.0.1:{free_port()}/events/auth0", webhook_token=INGEST_TOKEN
    ) as server:
        yield server


@pytest.fixture
def auth0_settings(settings: Settings, fake: FakeAuth0) -> Settings:
    return settings.model_copy(
        update={
            "auth0_domain": fake.domain,
            "auth0_client_id": fake.client_id,
            "auth0_client_secret": fake.client_secret,
            "auth0_event_stream_id": fake.stream_id,
            "auth0_mgmt_base_url": fake.url,
            "auth0_recovery_lag": "1s",
        }
    )


@pytest.fixture
def client(auth0_settings: Settings) -> Iterator[ManagementClient]:
    made = ManagementClient.from_settings(auth0_settings)
    assert made is not None
    with made:
        yield made


@pytest.fixture
def waker(auth0_settings: Settings) -> Iterator[Waker]:
    made = Waker(auth0_settings)
    yield made
    made.close()


@pytest.fixture
def ingest(auth0_settings: Settings) -> Iterator[IngestServer]:
    with IngestServer(auth0_settings) as server:
        yield server


def recent(count: int, *, seconds_ago: float = 30, **fields: Any) -> list[dict[str, Any]]:
    """``count`` user events that happened ``seconds_ago`` (inside the first pass's window)."""
    moment = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    return [
        auth0_event("user.updated", f"auth0|r{n}", email=f"r{n}@example.com", at=moment, **fields)
        for n in range(count)
    ]


def a_pass(
    sessions: Any, settings: Settings, client: ManagementClient, waker: Waker, **kw: Any
) -> PassReport:
    return run_pass(
        sessions=sessions, settings=settings, client=client, waker=waker, trigger="cli", **kw
    )


def test_failed_events_are_stored_then_redelivered_as_duplicates(
    sessions: Any,
    auth0_settings: Settings,
    client: ManagementClient,
    waker: Waker,
    fake: FakeAuth0,
    ingest: IngestServer,
) -> None:
    live = f"{ingest.url}/events/auth0"
    fake.webhook_url = f"http://127.0.0.1:{free_port()}/events/auth0"  # ingest is down
    sent = recent(5)
    assert fake.emit(sent) == [None] * 5
    first = a_pass(sessions, auth0_settings, client, waker)
    assert (first.listed, first.stored, first.duplicates, first.rejected) == (5, 5, 0, 0)
    assert first.redelivered and first.error is None and first.stream_status == "enabled"
    with sessions() as session:
        events = session.scalars(select(Event)).all()
        assert sorted(e.event_id for e in events) == sorted(e["id"] for e in sent)
        assert {e.received_via for e in events} == {"recovery"}
        # The event as the webhook would have stored it: data decoded, context dropped.
        assert events[0].payload["data"]["object"]["email"].startswith("r")
        assert "context" not in events[0].payload["data"]
        assert session.scalar(select(func.count(Delivery.id))) == 5
    fake.wait_redeliveries()
    assert fake.total_failures == 5  # ingest was still down: the redelivery failed again
    fake.webhook_url = live  # ingest is back
    second = a_pass(sessions, auth0_settings, client, waker)
    # The window of the first pass is read again: its failures had not cleared.
    assert second.window_from == first.window_from
    assert (second.listed, second.stored, second.duplicates) == (5, 0, 5)
    assert second.redelivered
    fake.wait_redeliveries()
    assert fake.total_failures == 0
    redelivered = [a.status for a in fake.answers if a.redelivery and a.status is not None]
    assert redelivered == [200] * 5  # 200 duplicate: nothing stored twice
    third = a_pass(sessions, auth0_settings, client, waker)
    # The second pass listed failures, so the third reads its window once more: now clear.
    assert third.window_from == second.window_from and third.listed == 0
    assert not third.redelivered  # nothing failed: nothing to ask
    with sessions() as session:
        assert session.scalar(select(func.count(Event.id))) == 5
        assert watermark(session, fake.stream_id) == third.window_to


@pytest.mark.parametrize("reading", ["after", "at"])
def test_full_pages_split_the_window_and_page_one_second(
    fake: FakeAuth0, client: ManagementClient, reading: str
) -> None:
    fake.from_reading, fake.attempts = reading, 1
    now = datetime.now(UTC).replace(microsecond=0)
    crowded = recent(250, seconds_ago=0)
    for event in crowded:  # 250 failures in one second
        event["time"] = (now - timedelta(seconds=40)).isoformat().replace("+00:00", ".250Z")
    spread = recent(130, seconds_ago=0)
    for n, event in enumerate(spread):
        event["time"] = (now - timedelta(seconds=200 - n)).isoformat().replace("+00:00", "Z")
    fake.emit(crowded + spread)
    found = read_failed(client, now - timedelta(minutes=5), now)
    assert sorted(d["id"] for d in found) == sorted(e["id"] for e in crowded + spread)
    lists = [path for method, path, _ in fake.requests_log if path.endswith("/deliveries")]
    assert len(lists) < 30  # halving down to one second, then three pages of that second


def test_a_disabled_stream_is_reenabled_and_the_gap_reported(
    sessions: Any,
    auth0_settings: Settings,
    client: ManagementClient,
    waker: Waker,
    fake: FakeAuth0,
    ingest: IngestServer,
) -> None:
    live = f"{ingest.url}/events/auth0"
    fake.webhook_url = f"http://127.0.0.1:{free_port()}/events/auth0"
    fake.consecutive_threshold, fake.total_threshold, fake.attempts = 3, 3, 1
    fake.emit(recent(4))
    assert fake.status == "disabled" and len(fake.dropped) == 1
    fake.webhook_url = live
    refused = a_pass(sessions, auth0_settings, client, waker)
    # Re-enabling is refused while the total failure count is at the threshold.
    assert refused.stream_status == "disabled" and refused.redelivered and not refused.reenabled
    assert any("did not re-enable" in note for note in refused.notes)
    with sessions() as session:
        status = recovery_status(session, auth0_settings)
    assert status.stream_disabled and status.line().startswith("the Event Stream is disabled")
    fake.wait_redeliveries()
    assert fake.total_failures == 0
    reenabled = a_pass(sessions, auth0_settings, client, waker)
    assert reenabled.reenabled and fake.status == "enabled"
    with sessions() as session:
        status = recovery_status(session, auth0_settings)
    assert not status.stream_disabled
    assert status.missing_events is not None
    assert "idsync backfill" in status.missing_events and "reconcile" in status.missing_events
    assert status.line() == status.missing_events


def test_a_dry_run_lists_and_counts_but_stores_and_redelivers_nothing(
    sessions: Any, auth0_settings: Settings, client: ManagementClient, waker: Waker, fake: FakeAuth0
) -> None:
    fake.emit(recent(3))
    report = a_pass(sessions, auth0_settings, client, waker, since=3600, dry_run=True)
    assert (report.listed, report.stored, report.duplicates, report.redelivered) == (3, 3, 0, False)
    assert not [path for _, path, _ in fake.requests_log if path.endswith("/redeliver")]
    with sessions() as session:
        assert session.scalar(select(func.count(Event.id))) == 0
        assert watermark(session, fake.stream_id) is None  # a dry run moves nothing
        assert session.scalar(select(Auth0RecoveryPass.dry_run)) is True


def test_an_invalid_event_is_quarantined_as_by_the_webhook(
    sessions: Any, auth0_settings: Settings, client: ManagementClient, waker: Waker, fake: FakeAuth0
) -> None:
    broken = recent(1)[0]
    del broken["data"]["object"]["user_id"]
    fake.emit([broken])
    report = a_pass(sessions, auth0_settings, client, waker)
    assert (report.listed, report.stored, report.rejected) == (1, 0, 1)
    with sessions() as session:
        kept = session.scalars(select(Quarantine)).one()
    assert kept.event_id == broken["id"] and "data.object.user_id" in kept.reason


def test_an_auth0_error_is_recorded_and_the_watermark_stays(
    sessions: Any, auth0_settings: Settings, client: ManagementClient, waker: Waker, fake: FakeAuth0
) -> None:
    client.max_rate_wait = 0.5
    fake.rate_limit_next(1000)
    report = a_pass(sessions, auth0_settings, client, waker)
    assert report.error is not None and "rate limited" in report.error
    with sessions() as session:
        assert watermark(session, fake.stream_id) is None
        status = recovery_status(session, auth0_settings)
    assert status.line().startswith("the last recovery pass failed")


def test_missing_settings_switch_recovery_off_with_a_reason(settings: Settings) -> None:
    assert recovery_off(settings) == (
        "recovery off: AUTH0_DOMAIN, AUTH0_CLIENT_ID, AUTH0_CLIENT_SECRET, AUTH0_EVENT_STREAM_ID "
        "are not set"
    )
