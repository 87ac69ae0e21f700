"""Backfill: a user export from the fake Auth0 stored as user.backfill events, once.

Real parts: PostgreSQL, the fake Auth0 over HTTP (token, export job, NDJSON or
gzip download) through the real Management API client, and the fake HubSpot
for the order rule and the dry run.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from idsync.auth0.backfill import (
    BACKFILL_PRIORITY,
    BACKFILL_TYPE,
    BackfillError,
    BackfillReport,
    DryRunReport,
    ExportLine,
    event_id_of,
    export_lines,
    plan_users,
    run_backfill,
    store_users,
)
from idsync.auth0.backfill_deletes import (
    ABSENT_MARK,
    JOB_MARK,
    ExportScope,
    absent_event_id,
    is_synthesised,
)
from idsync.auth0.client import ManagementClient
from idsync.cli import main
from idsync.fakes.auth0 import FakeAuth0, generated_user
from idsync.settings import Settings
from ingest.validation import to_new_event
from models.db import make_engine, make_session_factory, transaction
from models.guard import held_counts
from models.outbox import record_event
from models.tables import Delivery, Event, ReceivedVia
from tests.conftest import FIXTURES, migrate
from tests.pipeline import Pipeline
from workers.delivery import run_batch

DOMAIN = "backfill-test.eu.auth0.com"
SOURCE = f"urn:auth0:{DOMAIN}"
SECRET = "whsec_" + base64.b64encode(b"backfill-test-secret-of-32-bytes").decode()


@pytest.fixture
def auth0() -> Iterator[FakeAuth0]:
    with FakeAuth0(domain=DOMAIN, job_seconds=0.15) as fake:
        yield fake


def auth0_settings(settings: Settings, fake: FakeAuth0, **extra: Any) -> Settings:
    return settings.model_copy(
        update={
            "auth0_domain": DOMAIN,
            "auth0_client_id": fake.client_id,
            "auth0_client_secret": fake.client_secret,
            "auth0_event_stream_id": fake.stream_id,
            "auth0_mgmt_base_url": fake.url,
        }
        | extra
    )


def backfill(sessions: Any, settings: Settings, **options: Any) -> Any:
    client = ManagementClient.from_settings(settings, stream=False)
    assert client is not None
    with client:
        return run_backfill(
            sessions=sessions, settings=settings, client=client, poll_seconds=0.05, **options
        )


def count(sessions: Any, *conditions: Any, table: Any = Event) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(table).where(*conditions)))


def user(number: int, **changes: Any) -> dict[str, Any]:
    return generated_user(number) | changes


@pytest.mark.parametrize("gzipped", [False, True], ids=["ndjson", "gzip"])
def test_a_second_backfill_stores_nothing_new(
    sessions: Any, settings: Settings, auth0: FakeAuth0, gzipped: bool
) -> None:
    auth0.export_gzip = gzipped
    users = 3000 if not gzipped else 300
    auth0.add_users(generated_user(n) for n in range(users))
    configured = auth0_settings(settings, auth0)

    first = backfill(sessions, configured)
    assert isinstance(first, BackfillReport)
    assert (first.users, first.stored, first.existing, first.rejected) == (users, users, 0, 0)
    assert first.deliveries == {"hubspot": users}
    assert count(sessions, Event.type == BACKFILL_TYPE, Event.source == SOURCE) == users
    assert count(sessions, Event.received_via == ReceivedVia.BACKFILL.value) == users
    assert count(sessions, Delivery.priority == BACKFILL_PRIORITY, table=Delivery) == users, (
        "backfill deliveries wait behind live traffic"
    )
    with sessions() as session:
        stored = session.scalars(select(Event).where(Event.subject == "auth0|gen0000007")).one()
    assert stored.event_id == event_id_of("auth0|gen0000007", stored.event_time)
    assert stored.payload["data"]["object"]["email"] == "user0000007@example.com"
    assert stored.payload["type"] == BACKFILL_TYPE and stored.payload["a0stream"] == auth0.stream_id

    second = backfill(sessions, configured)
    assert (second.stored, second.existing, second.deliveries) == (0, users, {"hubspot": 0})
    assert count(sessions) == users and count(sessions, table=Delivery) == users


def test_a_changed_user_is_stored_again_and_bad_lines_are_reported(
    sessions: Any, settings: Settings, auth0: FakeAuth0
) -> None:
    auth0.add_users([user(1), user(2)])
    configured = auth0_settings(settings, auth0)
    backfill(sessions, configured)
    later = datetime(2026, 6, 1, tzinfo=UTC).isoformat().replace("+00:00", "Z")
    auth0.add_users([user(2, updated_at=later, given_name="Renamed"), user(3)])
    auth0.add_users([{"user_id": "auth0|no-time", "email": "x@example.com"}])
    report = backfill(sessions, configured)
    assert (report.users, report.stored, report.existing, report.rejected) == (3, 2, 1, 1)
    assert "updated_at" in report.rejections[0].reason
    assert count(sessions, Event.subject == "auth0|gen0000002") == 2


def test_export_lines_sniff_gzip_and_split_across_blocks() -> None:
    text = b'{"a": 1}\n\n{"b": 2}\n{"c": 3}'
    members = gzip.compress(text[:12]) + gzip.compress(text[12:])  # two gzip members
    for data in (text, members):
        blocks = [data[i : i + 3] for i in range(0, len(data), 3)]
        lines = list(export_lines(blocks))
        assert [(line.number, json.loads(line.body)) for line in lines] == [
            (1, {"a": 1}),
            (3, {"b": 2}),
            (4, {"c": 3}),
        ]
    with pytest.raises(BackfillError, match="gzip"):
        list(export_lines([gzip.compress(text)[:-6]]))


def test_backfill_refuses_a_source_the_stream_does_not_carry(
    sessions: Any, settings: Settings, auth0: FakeAuth0
) -> None:
    auth0.add_users([user(1)])
    configured = auth0_settings(settings, auth0)
    live = json.loads((FIXTURES / "user_updated.json").read_text())
    live |= {"source": "urn:auth0:custom.example.com", "a0stream": auth0.stream_id}
    test_event = json.loads((FIXTURES / "user_created_test_event.json").read_text())
    with transaction(sessions) as session:
        for document in (live, test_event):
            record_event(
                session=session,
                event=to_new_event(document, json.dumps(document).encode()),
                destinations=["hubspot"],
            )
    with pytest.raises(BackfillError) as refused:
        backfill(sessions, configured)
    assert "urn:auth0:custom.example.com" in str(refused.value) and SOURCE in str(refused.value)
    assert auth0.jobs == {}, "refused before any export job started"
    # The dashboard's test event ("urn:auth0:", stored as ignored) never blocks a backfill.
    report = backfill(
        sessions, configured.model_copy(update={"auth0_event_source": live["source"]})
    )
    assert report.stored == 1


def test_destination_added_later_gets_the_existing_events(
    sessions: Any, settings: Settings, auth0: FakeAuth0
) -> None:
    auth0.add_users(generated_user(n) for n in range(40))
    first = auth0_settings(settings, auth0)
    backfill(sessions, first)
    both = first.model_copy(
        update={
            "destinations": ("hubspot", "licenses"),
            "destination_env": {
                "LICENSES_KIND": "webhook",
                "LICENSES_URL": "http://127.0.0.1:9/hooks",
                "LICENSES_SECRET": SECRET,
            },
        }
    )
    report = backfill(sessions, both, destination="licenses")
    assert (report.stored, report.existing, report.deliveries) == (0, 40, {"licenses": 40})
    assert count(sessions, Delivery.destination == "licenses", table=Delivery) == 40
    assert count(sessions, Delivery.destination == "hubspot", table=Delivery) == 40
    again = backfill(sessions, both, destination="licenses")
    assert again.deliveries == {"licenses": 0}
    with pytest.raises(BackfillError, match="not in DESTINATIONS"):
        backfill(sessions, both, destination="nowhere")


@pytest.mark.parametrize("live_is", ["newer", "older"])
def test_the_newest_state_wins_by_the_order_rule(
    pipeline: Pipeline, sessions: Any, auth0: FakeAuth0, live_is: str
) -> None:
    exported = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    live_time = exported + (timedelta(hours=1) if live_is == "newer" else -timedelta(hours=1))
    auth0.add_users([generated_user(5, at=exported) | {"given_name": "Exported"}])
    live = json.loads((FIXTURES / "user_updated.json").read_text())
    stamp = live_time.isoformat().replace("+00:00", "Z")
    live["source"], live["id"], live["time"] = SOURCE, "evt_live_update_000000000", stamp
    live["data"]["object"] |= {
        "user_id": "auth0|gen0000005",
        "email": "user0000005@example.com",
        "given_name": "Live",
        "updated_at": stamp,
    }
    assert pipeline.post(live).status_code == 202
    pipeline.drain()
    backfill(sessions, auth0_settings(pipeline.settings, auth0))
    pipeline.drain()
    contact = pipeline.hubspot.contact_by_email("user0000005@example.com")
    assert contact is not None
    assert contact["properties"]["firstname"] == ("Live" if live_is == "newer" else "Exported")
    if live_is == "newer":
        assert ("skipped", "stale") in pipeline.deliveries()


def test_dry_run_counts_per_destination_and_stores_nothing(
    pipeline: Pipeline, sessions: Any, auth0: FakeAuth0
) -> None:
    auth0.add_users(generated_user(n) for n in range(10))
    configured = auth0_settings(pipeline.settings, auth0)
    backfill(sessions, configured)
    pipeline.drain()
    later = datetime(2026, 7, 1, tzinfo=UTC).isoformat().replace("+00:00", "Z")
    auth0.add_users([user(n, updated_at=later, given_name=f"New{n}") for n in (0, 1, 2)])
    auth0.add_users([user(n, updated_at=later, blocked=True) for n in (3, 4)])
    auth0.add_users([user(5, updated_at=later)])  # a new updated_at, the same properties
    auth0.add_users(generated_user(n) for n in range(10, 14))
    events_before = count(sessions)

    report = backfill(sessions, configured, dry_run=True)
    assert isinstance(report, DryRunReport)
    counts = report.counts["hubspot"]
    assert counts == {
        "created": 4,
        "updated": 3,
        "deprovisioned": 2,
        "unchanged": 1,
        "stale": 0,
        "already_stored": 4,
    }
    assert count(sessions) == events_before, "a dry run stores nothing"


def test_cli_backfill_prints_json_and_says_when_it_is_off(
    database_url: str, sessions: Any, settings: Settings, auth0: FakeAuth0, monkeypatch: Any
) -> None:
    runner = CliRunner()
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("DESTINATIONS", "hubspot")
    off = runner.invoke(main, ["backfill"])
    assert off.exit_code == 1 and "backfill is off: AUTH0_DOMAIN" in off.output
    auth0.add_users(generated_user(n) for n in range(25))
    for name, value in {
        "AUTH0_DOMAIN": DOMAIN,
        "HUBSPOT_TOKEN": "fake-token",
        "AUTH0_CLIENT_ID": auth0.client_id,
        "AUTH0_CLIENT_SECRET": auth0.client_secret,
        "AUTH0_MGMT_BASE_URL": auth0.url,
        "REDIS_URL": settings.redis_url or "",
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
    }.items():
        monkeypatch.setenv(name, value)
    dry = runner.invoke(main, ["backfill", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["destinations"]["hubspot"]["created"] == 25
    stored = runner.invoke(main, ["backfill", "--json"])
    assert stored.exit_code == 0, stored.output
    assert json.loads(stored.stdout)["stored"] == 25
    assert count(sessions) == 25


# Deletes recovered from a full export: known users it no longer holds


def live_emails(pipeline: Pipeline) -> set[str]:
    return {contact["properties"]["email"] for contact in pipeline.hubspot.contacts()}


def email(number: int) -> str:
    return f"user{number:07d}@example.com"


def subject(number: int) -> str:
    return f"auth0|gen{number:07d}"


def stored_deletes(sessions: Any) -> list[Event]:
    with sessions() as session:
        query = select(Event).where(Event.type == "user.deleted").order_by(Event.subject)
        return list(session.scalars(query).all())


def live_event(number: int, kind: str, at: datetime, event_id: str) -> dict[str, Any]:
    """A live event of generated user ``number`` as the stream would post it."""
    document = json.loads((FIXTURES / f"user_{kind}.json").read_text())
    stamp = at.isoformat().replace("+00:00", "Z")
    document |= {"source": SOURCE, "id": event_id, "time": stamp}
    document["data"]["object"] |= {
        "user_id": subject(number),
        "email": email(number),
        "updated_at": stamp,
    }
    document["data"].pop("previous_object", None)
    return document


def test_users_absent_from_a_full_export_end_deprovisioned_once(
    pipeline: Pipeline, sessions: Any, auth0: FakeAuth0
) -> None:
    auth0.add_users(generated_user(n) for n in range(6))
    configured = auth0_settings(pipeline.settings, auth0)
    first = backfill(sessions, configured)
    assert first.absence.checked and first.absence.absent == 0
    pipeline.drain()
    assert live_emails(pipeline) == {email(n) for n in range(6)}

    for number in (1, 4):  # deleted in Auth0 while the stream was disabled
        auth0.remove_user(subject(number))
    second = backfill(sessions, configured)
    absence = second.absence
    assert (absence.absent, absence.stored, absence.existing) == (2, 2, 0)
    assert absence.deliveries == {"hubspot": 2}
    assert (second.stored, second.existing) == (0, 4)
    started = datetime.fromisoformat(auth0.jobs[str(second.job_id)].created_at)
    assert absence.export_started_at == started
    deletes = stored_deletes(sessions)
    assert [event.subject for event in deletes] == [subject(1), subject(4)]
    for event in deletes:
        assert event.received_via == ReceivedVia.BACKFILL.value
        assert event.event_time == started, "dated when the export job was created"
        assert event.event_id == absent_event_id(str(event.subject), started)
        assert is_synthesised(event.payload)
        assert event.payload["data"]["object"]["user_id"] == event.subject
        assert event.payload["data"]["object"][ABSENT_MARK].startswith(
            started.strftime("%Y-%m-%dT%H:%M:%S")
        )
        assert event.payload["data"]["object"][JOB_MARK] == second.job_id

    pipeline.drain()
    assert live_emails(pipeline) == {email(n) for n in (0, 2, 3, 5)}
    assert pipeline.link(subject(1)).deprovisioned and pipeline.link(subject(4)).deprovisioned
    assert not pipeline.link(subject(0)).deprovisioned

    third = backfill(sessions, configured)
    assert (third.absence.absent, third.absence.stored, third.stored) == (0, 0, 0)
    assert len(stored_deletes(sessions)) == 2, "a second backfill stores nothing new"


def test_the_same_export_stored_twice_stores_its_deletes_once(
    sessions: Any, settings: Settings, auth0: FakeAuth0
) -> None:
    configured = auth0_settings(settings, auth0)
    lines = [ExportLine(n + 1, json.dumps(generated_user(n)).encode() + b"\n") for n in range(5)]
    store_users(sessions=sessions, settings=configured, lines=lines)
    scope = ExportScope(job_id="job_same", started_at=datetime(2026, 6, 1, tzinfo=UTC))
    once = store_users(sessions=sessions, settings=configured, lines=lines[:3], absent_from=scope)
    assert (once.absence.absent, once.absence.stored) == (2, 2)
    twice = store_users(sessions=sessions, settings=configured, lines=lines[:3], absent_from=scope)
    assert (twice.absence.absent, twice.absence.stored, twice.stored) == (0, 0, 0)
    assert [event.subject for event in stored_deletes(sessions)] == [subject(3), subject(4)]


def test_a_user_newer_than_the_export_start_is_not_deleted(
    pipeline: Pipeline, sessions: Any, auth0: FakeAuth0
) -> None:
    """A user created while the export runs is missing from it, and must stay live."""
    auth0.add_users([generated_user(1)])
    older = datetime.now(UTC) - timedelta(hours=1)
    assert pipeline.post(live_event(8, "created", older, "evt_live_create_8")).status_code == 202
    configured = auth0_settings(pipeline.settings, auth0)

    class CreatedDuringTheExport:
        """The Management client, with user 9 created in Auth0 just after the job starts."""

        def __init__(self, client: ManagementClient) -> None:
            self.client = client

        def start_users_export(self, fields: list[str], connection_id: str | None) -> str:
            job_id = self.client.start_users_export(fields, connection_id)
            moment = datetime.now(UTC) + timedelta(seconds=1)
            created = live_event(9, "created", moment, "evt_live_create_9")
            assert pipeline.post(created).status_code == 202
            return job_id

        def get_job(self, job_id: str) -> dict[str, Any]:
            return self.client.get_job(job_id)

        def download(self, location: str) -> Iterator[bytes]:
            return self.client.download(location)

    client = ManagementClient.from_settings(configured, stream=False)
    assert client is not None
    with client:
        report = run_backfill(
            sessions=sessions,
            settings=configured,
            client=CreatedDuringTheExport(client),
            poll_seconds=0.05,
        )
    assert isinstance(report, BackfillReport)
    assert report.absence.absent == 1, "user 8 (older than the export) only"
    assert [event.subject for event in stored_deletes(sessions)] == [subject(8)]
    pipeline.drain()
    assert live_emails(pipeline) == {email(1), email(9)}


def test_an_export_of_one_connection_or_no_deletes_deletes_nobody(
    pipeline: Pipeline, sessions: Any, auth0: FakeAuth0
) -> None:
    auth0.add_users((generated_user(n) for n in range(4)), connection_id="con_aaaaaaaaaaaaaaaa")
    auth0.add_users((generated_user(n) for n in (4, 5)), connection_id="con_bbbbbbbbbbbbbbbb")
    configured = auth0_settings(pipeline.settings, auth0)
    backfill(sessions, configured)
    pipeline.drain()
    one = backfill(sessions, configured, connection_id="con_aaaaaaaaaaaaaaaa")
    assert one.users == 4 and not one.absence.checked
    assert "con_aaaaaaaaaaaaaaaa only" in str(one.absence.note)
    auth0.remove_user(subject(0))
    off = backfill(sessions, configured, deletes=False)
    assert not off.absence.checked and "--no-deletes" in str(off.absence.note)
    assert stored_deletes(sessions) == []
    pipeline.drain()
    assert live_emails(pipeline) == {email(n) for n in range(6)}


def test_dry_run_counts_the_absent_per_destination_and_stores_nothing(
    pipeline: Pipeline, sessions: Any, auth0: FakeAuth0
) -> None:
    auth0.add_users(generated_user(n) for n in range(6))
    configured = auth0_settings(pipeline.settings, auth0)
    backfill(sessions, configured)
    pipeline.drain()
    auth0.remove_user(subject(2))
    auth0.remove_user(subject(3))
    # Known from a live event that never reached HubSpot: absent, but no live link there.
    never_sent = live_event(20, "created", datetime.now(UTC) - timedelta(hours=1), "evt_c_20")
    assert pipeline.post(never_sent).status_code == 202
    events_before = count(sessions)

    report = backfill(sessions, configured, dry_run=True)
    assert isinstance(report, DryRunReport)
    assert report.absence.checked and report.absence.absent == 3
    assert report.absence.deprovisioned == {"hubspot": 2}
    assert report.to_json()["destinations"]["hubspot"]["absent"] == 2
    assert count(sessions) == events_before and stored_deletes(sessions) == []
    assert live_emails(pipeline) >= {email(2), email(3)}


def test_a_short_export_is_held_by_the_deprovision_guard(
    pipeline: Pipeline, sessions: Any, auth0: FakeAuth0
) -> None:
    pipeline.settings = pipeline.settings.model_copy(update={"deprovision_guard": "3/1h"})
    auth0.add_users(generated_user(n) for n in range(10))
    configured = auth0_settings(pipeline.settings, auth0)
    backfill(sessions, configured)
    pipeline.drain()
    for number in range(2, 10):  # the export came back with 2 users of 10
        auth0.remove_user(subject(number))
    report = backfill(sessions, configured)
    assert report.absence.absent == 8
    for _ in range(10):
        batch = run_batch(
            sessions=sessions, settings=pipeline.settings, destination=pipeline.destination
        )
        if batch.claimed == 0:
            break
    assert len(live_emails(pipeline)) == 10 - 3, "three deprovisions pass, five wait"
    with sessions() as session:
        assert held_counts(session=session) == {"hubspot": 5}


def test_an_export_line_naming_nobody_makes_absence_unknowable(
    sessions: Any, settings: Settings, auth0: FakeAuth0
) -> None:
    auth0.add_users(generated_user(n) for n in range(3))
    configured = auth0_settings(settings, auth0)
    backfill(sessions, configured)
    auth0.remove_user(subject(0))
    auth0.add_users([{"user_id": None, "email": "garbled@example.com"}])  # exported without id
    report = backfill(sessions, configured)
    assert report.rejected == 1 and not report.absence.checked
    assert "no readable user_id" in str(report.absence.note)
    assert stored_deletes(sessions) == []


def test_absence_on_the_embedded_sqlite(tmp_path: Any, settings: Settings) -> None:
    url = f"sqlite:///{tmp_path / 'idsync.db'}"
    migrate(url)
    engine = make_engine(url)
    try:
        sqlite_sessions = make_session_factory(engine)
        configured = settings.model_copy(
            update={"database_url": url, "auth0_domain": DOMAIN, "auth0_event_stream_id": None}
        )
        lines = [
            ExportLine(n + 1, json.dumps(generated_user(n)).encode() + b"\n") for n in range(7)
        ]
        store_users(sessions=sqlite_sessions, settings=configured, lines=lines, chunk_size=3)
        scope = ExportScope(job_id="job_sqlite", started_at=datetime(2026, 6, 1, tzinfo=UTC))
        kept = lines[:2] + lines[4:]
        dry = plan_users(
            sessions=sqlite_sessions, settings=configured, lines=kept, absent_from=scope
        )
        assert (dry.absence.absent, dry.absence.deprovisioned) == (2, {"hubspot": 0})
        report = store_users(
            sessions=sqlite_sessions,
            settings=configured,
            lines=kept,
            absent_from=scope,
            chunk_size=1,
        )
        assert (report.absence.absent, report.absence.stored) == (2, 2)
        assert [event.subject for event in stored_deletes(sqlite_sessions)] == [
            subject(2),
            subject(3),
        ]
        again = store_users(
            sessions=sqlite_sessions, settings=configured, lines=kept, absent_from=scope
        )
        assert (again.absence.absent, again.absence.stored) == (0, 0)
    finally:
        engine.dispose()


def test_cli_says_when_deletes_are_not_checked_and_what_the_guard_will_hold(
    database_url: str,
    sessions: Any,
    settings: Settings,
    pipeline: Pipeline,
    auth0: FakeAuth0,
    monkeypatch: Any,
) -> None:
    auth0.add_users((generated_user(n) for n in range(5)), connection_id="con_aaaaaaaaaaaaaaaa")
    for name, value in {
        "DATABASE_URL": database_url,
        "DESTINATIONS": "hubspot",
        "DEPROVISION_GUARD": "1/1h",
        "AUTH0_DOMAIN": DOMAIN,
        "HUBSPOT_TOKEN": "fake-token",
        "AUTH0_CLIENT_ID": auth0.client_id,
        "AUTH0_CLIENT_SECRET": auth0.client_secret,
        "AUTH0_MGMT_BASE_URL": auth0.url,
        "REDIS_URL": settings.redis_url or "",
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
    }.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    first = runner.invoke(main, ["backfill"])
    assert first.exit_code == 0, first.output
    assert "No user known to idsync is absent from the export" in first.stdout
    pipeline.drain()  # links at HubSpot, which the guard's figures count
    for number in (0, 1, 2):
        auth0.remove_user(subject(number))

    one = runner.invoke(main, ["backfill", "--connection", "con_aaaaaaaaaaaaaaaa"])
    assert one.exit_code == 0, one.output
    assert "Deletes not checked: the export holds connection con_aaaaaaaaaaaaaaaa only" in (
        one.stdout
    )
    off = runner.invoke(main, ["backfill", "--no-deletes"])
    assert off.exit_code == 0 and "Deletes not checked (--no-deletes)." in off.stdout
    assert stored_deletes(sessions) == []

    dry = runner.invoke(main, ["backfill", "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout)
    assert planned["absent"]["absent"] == 3 and planned["destinations"]["hubspot"]["absent"] == 3
    assert stored_deletes(sessions) == []
    stored = runner.invoke(main, ["backfill"], terminal_width=200)
    assert stored.exit_code == 0, stored.output
    assert "3 users known to idsync are absent from the export of" in stored.stdout
    assert "hubspot: 3 deprovisions exceed DEPROVISION_GUARD (1 per 3600 s)" in stored.stdout
    assert len(stored_deletes(sessions)) == 3
