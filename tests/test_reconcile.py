"""Reconciliation finds and fixes what changed at the destination behind idsync's back.

Real PostgreSQL, the fake HubSpot over HTTP: the hand edit, the deletion and
the merge are made through the fake's own API, as a person in HubSpot would.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from click.testing import CliRunner, Result
from sqlalchemy import select, update

from idsync.cli import main
from models.db import transaction
from models.tables import Event, Link, ReconcileRun
from tests.conftest import REDIS_URL
from tests.events import auth0_event
from tests.pipeline import Pipeline
from workers.destinations.webhook.adapter import build as build_webhook
from workers.ratelimit import LocalRateLimiter
from workers.reconcile import Unreadable, reconcile


def _users(pipeline: Pipeline, names: list[str]) -> None:
    for n, name in enumerate(names):
        pipeline.post(
            auth0_event(
                "user.created", f"auth0|{name}", email=f"{name}@example.com", given_name=name, at=n
            )
        )
    pipeline.drain()


def _hubspot(pipeline: Pipeline, method: str, path: str, **body: object) -> None:
    answer = requests.request(
        method,
        f"{pipeline.hubspot.url}/crm/v3/objects/contacts/{path}",
        json=body or None,
        headers={"Authorization": "Bearer fake-token"},
        timeout=5,
    )
    assert answer.status_code < 300, answer.text


def _run(pipeline: Pipeline, *, fix: bool = False):  # type: ignore[no-untyped-def]
    return reconcile(
        sessions=pipeline.sessions,
        settings=pipeline.settings,
        destination=pipeline.destination,
        fix=fix,
        yield_seconds=0,
    )


def test_reconcile_finds_and_fixes_a_hand_edit_a_deleted_and_a_merged_contact(
    pipeline: Pipeline,
) -> None:
    _users(pipeline, ["ann", "bob", "cat", "dan"])
    ids = {name: pipeline.link(f"auth0|{name}").external_id for name in ("ann", "bob", "cat")}
    _hubspot(pipeline, "PATCH", str(ids["ann"]), properties={"firstname": "Hand-edited"})
    _hubspot(pipeline, "DELETE", str(ids["bob"]))
    # Someone merges cat's contact into a contact a salesperson made by hand.
    survivor = pipeline.hubspot.seed_contact({"email": "cat.sales@example.com"})
    pipeline.hubspot.merge(str(ids["cat"]), survivor)

    found = _run(pipeline)
    assert (found.checked, found.counts) == (
        4,
        {"changed": 1, "missing": 2, "live_deprovisioned": 0},
    )
    kinds = {d.subject: d.kind for d in found.drift}
    assert kinds == {"auth0|ann": "changed", "auth0|bob": "missing", "auth0|cat": "missing"}
    assert pipeline.hubspot.contact_by_email("bob@example.com") is None  # report only

    fixed = _run(pipeline, fix=True)
    assert (fixed.fixed, fixed.unfixed) == (3, [])
    pipeline.drain()
    ann = pipeline.hubspot.contact_by_email("ann@example.com")
    assert ann is not None and ann["properties"]["firstname"] == "ann"
    bob = pipeline.hubspot.contact_by_email("bob@example.com")
    assert bob is not None and bob["id"] != ids["bob"]  # created again
    assert pipeline.link("auth0|bob").external_id == bob["id"]
    assert pipeline.link("auth0|cat").external_id == survivor  # follows the merge
    again = _run(pipeline)
    assert (again.checked, again.drifted) == (4, 0)
    with transaction(pipeline.sessions) as session:
        runs = session.scalars(select(ReconcileRun).order_by(ReconcileRun.id)).all()
        assert [(r.missing, r.changed, r.fixed, r.finished_at is not None) for r in runs] == [
            (2, 1, 0, True),
            (2, 1, 3, True),
            (0, 0, 0, True),
        ]


def test_a_contact_live_though_idsync_deprovisioned_it_is_drift(pipeline: Pipeline) -> None:
    _users(pipeline, ["eve"])
    contact = pipeline.link("auth0|eve").external_id
    pipeline.post(
        auth0_event("user.updated", "auth0|eve", email="eve@example.com", blocked=True, at=50)
    )
    pipeline.drain()
    assert pipeline.hubspot.contact_by_email("eve@example.com") is None
    # As if the archive had been undone in HubSpot: the link's record reads live again.
    live = pipeline.hubspot.seed_contact({"email": "eve.again@example.com"})
    with transaction(pipeline.sessions) as session:
        session.execute(update(Link).where(Link.external_id == contact).values(external_id=live))
    found = _run(pipeline)
    assert found.counts["live_deprovisioned"] == 1
    _run(pipeline, fix=True)
    pipeline.drain()
    assert pipeline.hubspot.contact_by_email("eve.again@example.com") is None  # archived


def test_a_purged_newest_state_cannot_be_fixed_without_auth0(pipeline: Pipeline) -> None:
    _users(pipeline, ["fay"])
    _hubspot(
        pipeline,
        "PATCH",
        str(pipeline.link("auth0|fay").external_id),
        properties={"firstname": "X"},
    )
    with transaction(pipeline.sessions) as session:
        session.execute(update(Event).values(payload=None))
    fixed = _run(pipeline, fix=True)
    assert fixed.fixed == 0
    assert fixed.unfixed and "AUTH0_DOMAIN" in fixed.unfixed[0][1]


def test_a_webhook_cannot_be_reconciled(pipeline: Pipeline) -> None:
    settings = pipeline.settings.model_copy(
        update={
            "destinations": ("licenses",),
            "destination_env": {
                "LICENSES_KIND": "webhook",
                "LICENSES_URL": "http://127.0.0.1:1/hook",
                "LICENSES_SECRET": "whsec_" + "A" * 32,
            },
        }
    )
    webhook = build_webhook(
        settings.destination("licenses"), settings, LocalRateLimiter(limit=10, window=1)
    )
    with pytest.raises(Unreadable, match="cannot be read back"):
        reconcile(sessions=pipeline.sessions, settings=settings, destination=webhook)


# The command line


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, pipeline: Pipeline, redis_prefix: str) -> Iterator[None]:
    values = {
        "DATABASE_URL": pipeline.settings.database_url,
        "CELERY_BROKER_URL": REDIS_URL,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": redis_prefix,
        "DESTINATIONS": "hubspot,licenses",
        "HUBSPOT_TOKEN": "fake-token",
        "HUBSPOT_BASE_URL": pipeline.hubspot.url,
        "LICENSES_KIND": "webhook",
        "LICENSES_URL": "http://127.0.0.1:1/hook",
        "LICENSES_SECRET": "whsec_" + "A" * 32,
        "COLUMNS": "200",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    yield


def idsync(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_reconcile_on_the_command_line(pipeline: Pipeline, env: None) -> None:
    _users(pipeline, ["gus"])
    _hubspot(
        pipeline, "PATCH", str(pipeline.link("auth0|gus").external_id), properties={"lastname": "Z"}
    )
    found = idsync("reconcile", "hubspot", "--json")
    assert found.exit_code == 1
    assert '"changed": 1' in found.stdout
    fixed = idsync("reconcile", "hubspot", "--fix")
    assert fixed.exit_code == 0 and "Queued 1 resyncs" in fixed.stdout
    webhook = idsync("reconcile", "licenses")
    assert webhook.exit_code == 2 and "cannot be read back" in webhook.stderr


def test_a_purged_newest_state_is_read_again_from_auth0(pipeline: Pipeline) -> None:
    from idsync.fakes.auth0 import FakeAuth0

    _users(pipeline, ["hal"])
    contact = str(pipeline.link("auth0|hal").external_id)
    _hubspot(pipeline, "PATCH", contact, properties={"firstname": "Hand"})
    with transaction(pipeline.sessions) as session:
        session.execute(update(Event).values(payload=None))
    with FakeAuth0(domain="reconcile-test.eu.auth0.com") as auth0:
        auth0.add_users(
            [
                {
                    "user_id": "auth0|hal",
                    "email": "hal@example.com",
                    "given_name": "Hal",
                    "updated_at": "2025-03-02T00:00:00.000Z",
                }
            ]
        )
        pipeline.settings = pipeline.settings.model_copy(
            update={
                "auth0_domain": "reconcile-test.eu.auth0.com",
                "auth0_client_id": auth0.client_id,
                "auth0_client_secret": auth0.client_secret,
                "auth0_mgmt_base_url": auth0.url,
            }
        )
        fixed = _run(pipeline, fix=True)
    assert (fixed.fixed, fixed.unfixed) == (1, [])
    pipeline.drain()
    hal = pipeline.hubspot.contact_by_email("hal@example.com")
    assert hal is not None and hal["id"] == contact
    assert hal["properties"]["firstname"] == "Hal"
