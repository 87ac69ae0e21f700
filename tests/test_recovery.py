"""Recovery passes against the fake Auth0 and a real ingest server on loopback."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from idsync.auth0.client import ManagementClient
from idsync.auth0.recovery import (
    PassReport,
    exclusive_pass,
    read_failed,
    recover,
    recovery_off,
    recovery_status,
    run_pass,
    watermark,
)
from idsync.celery_config import celery_config
from idsync.cli import main as cli_main
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
    assert "creates, updates and deletes" in status.missing_events
    assert "for deletes" not in status.missing_events, "a backfill recovers deletes itself"
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


# One pass at a time, beat's schedule, /readyz


def test_a_second_pass_returns_at_once_while_one_runs(
    sessions: Any, auth0_settings: Settings, client: ManagementClient, waker: Waker, fake: FakeAuth0
) -> None:
    fake.emit(recent(2))
    kwargs = {"sessions": sessions, "settings": auth0_settings, "client": client, "waker": waker}
    with exclusive_pass(sessions, fake.stream_id) as first:
        assert first
        # Another process (its own connection) asks while the first pass runs.
        started = time.monotonic()
        assert recover(trigger="beat", **kwargs) is None
        assert time.monotonic() - started < 2
        with exclusive_pass(sessions, "est_another_stream_000000") as other:
            assert other  # another stream's passes are not held up
    with sessions() as session:
        assert session.scalar(select(func.count(Auth0RecoveryPass.id))) == 0
    report = recover(trigger="beat", **kwargs)
    assert report is not None and report.stored == 2
    with exclusive_pass(sessions, fake.stream_id) as again:
        assert again  # the pass let go of its lock


def test_beat_schedules_recovery_only_when_configured(
    settings: Settings, auth0_settings: Settings
) -> None:
    assert "auth0_recover" not in celery_config(settings)["beat_schedule"]
    configured = auth0_settings.model_copy(update={"auth0_recovery_interval": "2m"})
    entry = celery_config(configured)["beat_schedule"]["auth0_recover"]
    assert entry == {
        "task": "idsync.auth0_recover",
        "schedule": timedelta(minutes=2),
        "options": {"expires": 120.0},
    }
    import workers.tasks

    assert "idsync.auth0_recover" in workers.tasks.app.tasks


def test_readyz_says_off_ok_or_what_is_wrong(
    sessions: Any,
    settings: Settings,
    auth0_settings: Settings,
    client: ManagementClient,
    waker: Waker,
    fake: FakeAuth0,
) -> None:
    def readiness(configured: Settings) -> Any:
        app = create_app(configured)
        try:
            answer = app.test_client().get("/readyz")
        finally:
            app.extensions["idsync"].engine.dispose()
        assert answer.status_code == 200
        return answer.json["auth0_recovery"]

    assert readiness(settings) == recovery_off(settings)
    assert readiness(auth0_settings) == "ok"  # configured, no pass yet
    client.max_rate_wait = 0.2
    fake.rate_limit_next(100)
    a_pass(sessions, auth0_settings, client, waker)
    assert readiness(auth0_settings).startswith("the last recovery pass failed: ")
    fake.rate_limit_next(0)
    fake.consecutive_threshold, fake.total_threshold, fake.attempts = 2, 2, 1
    fake.emit(recent(2))
    assert fake.status == "disabled"
    a_pass(sessions, auth0_settings, client, waker)  # refused: 2 failed events remain
    assert readiness(auth0_settings).startswith("the Event Stream is disabled")


# The command line


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, auth0_settings: Settings) -> None:
    values = {
        "DATABASE_URL": auth0_settings.database_url,
        "CELERY_BROKER_URL": auth0_settings.celery_broker_url,
        "REDIS_URL": str(auth0_settings.redis_url),
        "REDIS_KEY_PREFIX": auth0_settings.redis_key_prefix,
        "DESTINATIONS": "hubspot",
        "HUBSPOT_TOKEN": "fake-token",
        "AUTH0_DOMAIN": str(auth0_settings.auth0_domain),
        "AUTH0_CLIENT_ID": str(auth0_settings.auth0_client_id),
        "AUTH0_CLIENT_SECRET": str(auth0_settings.auth0_client_secret),
        "AUTH0_EVENT_STREAM_ID": str(auth0_settings.auth0_event_stream_id),
        "AUTH0_MGMT_BASE_URL": str(auth0_settings.auth0_mgmt_base_url),
        "AUTH0_RECOVERY_LAG": "1s",
        "COLUMNS": "200",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def idsync(*args: str) -> Result:
    return CliRunner().invoke(cli_main, list(args), catch_exceptions=False)


def test_status_without_settings_says_off_and_exits_0(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in ("AUTH0_DOMAIN", "AUTH0_CLIENT_ID", "AUTH0_CLIENT_SECRET", "AUTH0_EVENT_STREAM_ID"):
        monkeypatch.delenv(name, raising=False)
    # Nothing is read: not even the embedded default database is created.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    shown = idsync("auth0", "status")
    assert shown.exit_code == 0
    assert shown.stdout.strip() == (
        "recovery off: AUTH0_DOMAIN, AUTH0_CLIENT_ID, AUTH0_CLIENT_SECRET, "
        "AUTH0_EVENT_STREAM_ID are not set"
    )
    assert json.loads(idsync("auth0", "status", "--json").stdout)["off"].startswith("recovery off")
    refused = CliRunner().invoke(cli_main, ["auth0", "recover"])
    assert refused.exit_code == 1 and "recovery off" in refused.stderr
    assert not list(tmp_path.iterdir())


def test_recover_by_hand_prints_its_figures_and_status_shows_them(
    cli_env: None, sessions: Any, fake: FakeAuth0
) -> None:
    fake.emit(recent(3))
    dry = idsync("auth0", "recover", "--since", "1h", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "Dry run" in dry.stdout and "listed 3, would store 3, duplicates 0" in dry.stdout
    done = idsync("auth0", "recover", "--since", "1h")
    assert done.exit_code == 0, done.output
    assert "listed 3, stored 3, duplicates 0, rejected 0; redelivered yes" in done.stdout
    fake.wait_redeliveries()
    state = json.loads(idsync("auth0", "status", "--json").stdout)
    last = state["last_pass"]
    assert (last["trigger"], last["listed"], last["stored"], last["duplicates"]) == ("cli", 3, 3, 0)
    assert last["stream_status"] == "enabled" and last["redelivered"] is True
    assert state["line"] == "ok" and state["watermark"] == last["window_to"]
    shown = idsync("auth0", "status")
    assert "Recovery of failed deliveries: ok" in shown.stdout
    for figure in (r"listed\s+3", r"stored\s+3", r"duplicates\s+0", r"redelivered\s+yes"):
        assert re.search(figure, shown.stdout), figure
    # The stored events say how they came, in every view.
    listed = json.loads(idsync("deliveries", "--json").stdout)["deliveries"]
    assert {view["event"]["received_via"] for view in listed} == {"recovery"}
    assert "via recovery" in idsync("deliveries").stdout
    assert "received via recovery" in idsync("deliveries", "show", str(listed[0]["id"])).stdout
    assert idsync("auth0", "recover", "--since", "yesterday").exit_code == 2


def test_recover_while_a_pass_runs_exits_1_at_once(
    cli_env: None, sessions: Any, fake: FakeAuth0
) -> None:
    with exclusive_pass(sessions, fake.stream_id):
        busy = CliRunner().invoke(cli_main, ["auth0", "recover"])
    assert busy.exit_code == 1 and "running already" in busy.stderr


def test_a_failed_pass_exits_1_with_its_error(
    cli_env: None, sessions: Any, fake: FakeAuth0, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTH0_CLIENT_SECRET", "wrong")
    failed = CliRunner().invoke(cli_main, ["auth0", "recover"])
    assert failed.exit_code == 1 and "refused the client credentials" in failed.stderr
    assert "Traceback" not in failed.output


def test_after_a_long_outage_the_next_pass_starts_at_the_watermark(
    sessions: Any, auth0_settings: Settings, client: ManagementClient, waker: Waker, fake: FakeAuth0
) -> None:
    # Beat and the workers were down for a day with ingest (one deployment): the last
    # pass read up to 24 hours ago, and Auth0 kept what failed since.
    now = datetime.now(UTC).replace(microsecond=0)
    with sessions.begin() as session:
        session.add(
            Auth0RecoveryPass(
                stream_id=fake.stream_id,
                trigger="beat",
                window_from=now - timedelta(hours=25),
                window_to=now - timedelta(hours=24),
                finished_at=now - timedelta(hours=24),
                stream_status="enabled",
            )
        )
    fake.emit(recent(3, seconds_ago=20 * 3600) + recent(2))
    report = a_pass(sessions, auth0_settings, client, waker)
    # AUTH0_RECOVERY_RECHECK (6 h) bounds re-reading, never the unread part of the stream.
    assert report.window_from == now - timedelta(hours=24)
    assert (report.listed, report.stored) == (5, 5)


def test_readyz_puts_what_is_wrong_now_before_the_missing_events_warning(
    sessions: Any, auth0_settings: Settings, fake: FakeAuth0
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)

    def add_pass(**fields: Any) -> None:
        with sessions.begin() as session:
            session.add(
                Auth0RecoveryPass(
                    stream_id=fake.stream_id,
                    trigger="beat",
                    window_from=now - timedelta(minutes=5),
                    window_to=now,
                    finished_at=now,
                    **fields,
                )
            )

    def line() -> str:
        with sessions() as session:
            return recovery_status(session, auth0_settings).line()

    add_pass(stream_status="disabled", reenabled=True)
    assert line().startswith("the Event Stream was disabled from")
    add_pass(stream_status="enabled", error="Auth0 GET /api/v2/event-streams answered 403")
    assert line() == ("the last recovery pass failed: Auth0 GET /api/v2/event-streams answered 403")
    add_pass(stream_status="disabled")  # Auth0 disabled the stream again
    assert line().startswith("the Event Stream is disabled")
    with sessions() as session:
        assert recovery_status(session, auth0_settings).missing_events is not None
