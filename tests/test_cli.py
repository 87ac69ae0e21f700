"""The operator commands of ``idsync``, run through click's CliRunner.

The commands read their settings from the environment, as in production; each
test points DATABASE_URL and the broker at this run's database and Redis prefix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from idsync.cli import main
from idsync.fakes.hubspot import FakeHubSpot
from idsync.settings import Settings
from models.db import transaction
from models.outbox import destination_state
from models.tables import Delivery, DeliveryStatus, Event
from tests.conftest import REDIS_URL
from tests.events import auth0_event
from tests.pipeline import Pipeline
from workers.destinations.base import Headroom
from workers.metrics import HeadroomReporter

ADMIN_TOKEN = "admin-secret-token"


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch, database_url: str, redis_prefix: str, db: None
) -> dict[str, str]:
    """The environment an operator's shell would have, pointing at the test outbox."""
    values = {
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": REDIS_URL,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": redis_prefix,
        "DESTINATIONS": "hubspot",
        "HUBSPOT_TOKEN": "fake-token",
        "COLUMNS": "200",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    for name in ("ADMIN_TOKEN", "RETENTION_DAYS", "RETENTION_DELETE_DAYS"):
        monkeypatch.delenv(name, raising=False)
    return values


@pytest.fixture
def pipeline(
    settings: Settings, sessions: sessionmaker[Session], hubspot: FakeHubSpot
) -> Iterator[Pipeline]:
    """The shared pipeline, with the admin API on."""
    configured = settings.model_copy(
        update={"retry_schedule": ("0s",) * 4, "admin_token": ADMIN_TOKEN}
    )
    pipe = Pipeline(configured, sessions, hubspot)
    yield pipe
    pipe.close()


def idsync(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


def failed_users(pipeline: Pipeline, count: int) -> None:
    """``count`` users whose creation HubSpot rejected (invalid email)."""
    for n in range(count):
        pipeline.post(auth0_event("user.created", f"auth0|{n}", email=f"u{n}@invalid"))
    pipeline.drain()


COMMANDS = [
    ["deliveries"],
    ["deliveries", "show"],
    ["replay"],
    ["resync"],
    ["purge"],
    ["forget"],
    ["destinations"],
    ["destinations", "list"],
    ["destinations", "pause"],
    ["destinations", "resume"],
    ["auth0"],
    ["auth0", "status"],
    ["auth0", "recover"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_examples(command: list[str]) -> None:
    result = idsync(*command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout and "idsync " in result.stdout


def test_permanent_failure_is_visible_and_replayable(
    env: dict[str, str], pipeline: Pipeline
) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="ann@example.com", at=0))
    pipeline.drain()
    pipeline.post(
        auth0_event("user.updated", "auth0|1", email="ann@example.com", given_name="Ann", at=5)
    )
    pipeline.hubspot.fail_next(1, status=400)  # HubSpot rejects the update once
    pipeline.drain()
    assert pipeline.deliveries() == [("succeeded", None), ("failed", "rejected")]

    listed = idsync("deliveries", "--status", "failed")
    assert listed.exit_code == 1
    assert "failed: rejected" in listed.stdout and "Injected failure (400)" in listed.stdout
    [row] = as_json(idsync("deliveries", "--status", "failed", "--json"))["deliveries"]
    assert (row["id"], row["reason"], row["last_status_code"]) == (2, "rejected", 400)
    api = pipeline.client.get(
        "/admin/deliveries?status=failed", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert api.json["deliveries"][0]["reason"] == "rejected"
    shown = idsync("deliveries", "show", "2")
    assert shown.exit_code == 0
    assert "VALIDATION_ERROR" in shown.stdout and "Attempts" in shown.stdout
    assert "ann@example.com" not in shown.stdout and "a***@example.com" in shown.stdout

    replayed = idsync("replay", "2")
    assert replayed.exit_code == 0 and "Replayed 1 of 1" in replayed.stdout
    pipeline.drain()
    assert pipeline.deliveries() == [("succeeded", None), ("succeeded", None)]
    contact = pipeline.hubspot.contact_by_email("ann@example.com")
    assert contact is not None and contact["properties"]["firstname"] == "Ann"
    assert idsync("deliveries", "--status", "failed").exit_code == 0


def test_deliveries_lists_and_pages_as_json(env: dict[str, str], pipeline: Pipeline) -> None:
    assert idsync("deliveries").exit_code == 0
    failed_users(pipeline, 3)
    first = idsync("deliveries", "--limit", "2", "--json")
    assert first.exit_code == 1  # failures are listed
    page = as_json(first)
    assert [row["id"] for row in page["deliveries"]] == [3, 2]
    assert page["counts"] == {"hubspot": {"failed": 3}}
    second = idsync("deliveries", "--limit", "2", "--cursor", str(page["next_cursor"]), "--json")
    rest = as_json(second)
    assert [row["id"] for row in rest["deliveries"]] == [1] and rest["next_cursor"] is None
    assert "u0@invalid" not in first.stdout + second.stdout
    none = idsync("deliveries", "--status", "succeeded", "--json")
    assert none.exit_code == 0 and as_json(none)["deliveries"] == []
    assert idsync("deliveries", "show", "999", "--json").exit_code == 1
    shown = as_json(idsync("deliveries", "show", "1", "--json"))
    assert shown["event"]["payload"]["data"]["object"]["email"] == "u***@invalid"
    assert shown["attempts"][0]["outcome"] == "failed"


@pytest.mark.parametrize(
    "args",
    [
        ["deliveries", "--status", "lost"],
        ["deliveries", "--limit", "0"],
        ["deliveries", "--since", "last tuesday"],
        ["deliveries", "--since", "2025-03-02", "--until", "2025-03-01"],
        ["replay"],
        ["replay", "1", "--status", "failed"],
        ["replay", "--status", "pending", "--yes"],
        ["purge", "--older-than", "a while"],
        ["purge", "--older-than", "30d", "--delete-older-than", "1d"],
        ["destinations", "pause", "salesforce"],
        ["resync"],
    ],
    ids=" ".join,
)
def test_bad_usage_exits_2(env: dict[str, str], args: list[str]) -> None:
    result = idsync(*args)
    assert result.exit_code == 2, result.output
    assert "Error" in result.stderr


def test_replay_of_an_unknown_or_unfinished_id_exits_1(
    env: dict[str, str], pipeline: Pipeline
) -> None:
    unknown = idsync("replay", "4711")
    assert unknown.exit_code == 1 and "no delivery with id 4711" in unknown.stderr
    pipeline.post(auth0_event("user.created", "auth0|1", email="ann@example.com"))
    pending = idsync("replay", "1")
    assert pending.exit_code == 1 and "still on its way" in pending.stderr


def test_bulk_replay_asks_counts_and_shows_progress(
    env: dict[str, str], pipeline: Pipeline
) -> None:
    failed_users(pipeline, 5)
    dry = idsync("replay", "--status", "failed", "--dry-run", "--json")
    assert dry.exit_code == 0
    assert as_json(dry) == {
        "dry_run": True,
        "matched": 5,
        "replayed": 0,
        "destinations": ["hubspot"],
        "purged": 0,
    }
    declined = idsync("replay", "--status", "failed", input="n\n")
    assert declined.exit_code == 1 and "Replay 5 deliveries to hubspot?" in declined.stderr
    assert pipeline.deliveries() == [("failed", "rejected")] * 5
    result = idsync("replay", "--status", "failed", "--yes", "--chunk-size", "2", "--json")
    assert result.exit_code == 0, result.output
    assert as_json(result)["replayed"] == 5
    assert "Replaying" in result.stderr  # the progress bar, on stderr
    assert pipeline.deliveries() == [("pending", None)] * 5
    again = idsync("replay", "--status", "failed", "--yes")
    assert again.exit_code == 0 and "Nothing to replay" in again.stdout


def test_replay_says_when_what_matches_was_purged(env: dict[str, str], pipeline: Pipeline) -> None:
    failed_users(pipeline, 2)
    with transaction(pipeline.sessions) as session:
        session.execute(update(Event).values(payload=None))
    result = idsync("replay", "--status", "failed", "--yes")
    assert result.exit_code == 0
    assert "the 2 finished deliveries that match have no payload left" in result.stdout
    assert as_json(idsync("replay", "--status", "failed", "--dry-run", "--json"))["purged"] == 2
    one = idsync("replay", "1")
    assert one.exit_code == 1 and "was purged" in one.stderr


def test_resync_queues_the_newest_state(env: dict[str, str], pipeline: Pipeline) -> None:
    missing = idsync("resync", "--subject", "auth0|nobody")
    assert missing.exit_code == 1 and "no accepted user event" in missing.stderr
    pipeline.post(auth0_event("user.created", "auth0|1", email="ann@example.com", at=0))
    pipeline.post(auth0_event("user.updated", "auth0|1", email="ann@example.com", at=5))
    pipeline.drain()
    result = idsync("resync", "--subject", "auth0|1", "--json")
    assert result.exit_code == 0 and as_json(result) == {"subject": "auth0|1", "queued": 1}
    with pipeline.sessions() as session:
        row = session.scalars(select(Delivery).where(Delivery.status == DeliveryStatus.PENDING))
        [delivery] = row.all()
        assert delivery.force and delivery.priority == 1 and delivery.event.type == "user.updated"


def test_purge_applies_retention(env: dict[str, str], pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="ann@example.com"))
    pipeline.drain()
    with transaction(pipeline.sessions) as session:
        session.execute(update(Event).values(received_at=text("now() - interval '40 days'")))
    kept = as_json(idsync("purge", "--older-than", "60d", "--json"))
    assert kept == {"payloads": 0, "excerpts": 0, "events": 0}
    purged = idsync("purge", "--older-than", "30d", "--delete-older-than", "365d", "--json")
    assert purged.exit_code == 0 and as_json(purged)["payloads"] == 1
    deleted = idsync("purge", "--older-than", "1d", "--delete-older-than", "30d")
    assert deleted.exit_code == 0 and "deleted 1 events" in deleted.stdout


def test_forget_erases_and_says_what(env: dict[str, str], pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="ann@example.com"))
    pipeline.drain()
    declined = idsync("forget", "--subject", "auth0|1", input="n\n")
    assert declined.exit_code == 1
    result = idsync("forget", "--subject", "auth0|1", "--yes", "--json")
    assert result.exit_code == 0
    removed = as_json(result)["removed"]
    assert removed["event_payloads"] == 1 and removed["link_emails"] == 1
    table = idsync("forget", "--subject", "auth0|1", "--yes")
    assert table.exit_code == 0 and "event payloads" in table.stdout


def test_destinations_pause_list_resume(
    env: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    paused = idsync("destinations", "pause", "hubspot", "--reason", "maintenance")
    assert paused.exit_code == 0
    [view] = as_json(idsync("destinations", "list", "--json"))
    assert (view["name"], view["paused"], view["paused_by"]) == ("hubspot", True, "operator")
    assert view["paused_reason"] == "maintenance"
    listed = idsync("destinations", "list")
    assert "paused by operator: maintenance" in listed.stdout
    assert idsync("destinations", "resume", "hubspot").exit_code == 0
    with sessions() as session:
        state = destination_state(session=session, name="hubspot")
        assert state is not None and not state.paused


def test_unreachable_database_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none")
    result = idsync("deliveries")
    assert result.exit_code == 1 and "cannot reach the outbox database" in result.stderr


def test_destinations_list_shows_the_headroom_workers_reported(
    env: dict[str, str], settings: Settings
) -> None:
    reporter = HeadroomReporter.from_settings(settings, "hubspot")
    assert reporter is not None
    try:
        assert as_json(idsync("destinations", "list", "--json"))[0]["rate_limit"] is None
        reporter(
            Headroom(max=190, remaining=12, interval_ms=10_000, daily=None, daily_remaining=None)
        )
        [view] = as_json(idsync("destinations", "list", "--json"))
        assert (view["rate_limit"]["max"], view["rate_limit"]["remaining"]) == (190, 12)
        # The age is whole seconds since the report; a slow machine may show 1 or 2.
        assert re.search(r"12/190 per 10 s; seen \d+ s ago", idsync("destinations", "list").stdout)
    finally:
        reporter.client.delete(reporter.key)


def test_destinations_list_shows_every_destination_and_what_it_lacks(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DESTINATIONS", "hubspot,licenses")
    monkeypatch.setenv("LICENSES_KIND", "webhook")
    views = {v["name"]: v for v in as_json(idsync("destinations", "list", "--json"))}
    assert views["hubspot"]["paused"] is False
    assert (views["licenses"]["paused_by"], views["licenses"]["paused_reason"]) == (
        "config",
        "LICENSES_URL is not set",
    )
