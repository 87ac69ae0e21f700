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
    event_id_of,
    export_lines,
    run_backfill,
)
from idsync.auth0.client import ManagementClient
from idsync.cli import main
from idsync.fakes.auth0 import FakeAuth0, generated_user
from idsync.settings import Settings
from ingest.validation import to_new_event
from models.db import transaction
from models.outbox import record_event
from models.tables import Delivery, Event, ReceivedVia
from tests.conftest import FIXTURES
from tests.pipeline import Pipeline

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
