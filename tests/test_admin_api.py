"""The admin JSON API: authentication, masking, detail, replay and pauses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from idsync.fakes.hubspot import FakeHubSpot
from idsync.settings import Settings
from ingest import create_app
from models.tables import Delivery, DeliveryStatus, DestinationState
from tests.events import auth0_event
from tests.pipeline import Pipeline
from workers.delivery import run_batch
from workers.destinations.base import Headroom
from workers.metrics import HeadroomReporter

ADMIN_TOKEN = "admin-secret-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EMAIL = "ann.lee@example.com"


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


def failed_delivery(pipeline: Pipeline) -> int:
    """A user whose email change HubSpot rejected: one succeeded, one failed delivery."""
    document = auth0_event("user.created", "auth0|1", email=EMAIL, given_name="Ann", at=0)
    document["data"]["object"]["identities"][0]["access_token"] = "idp-access-token-value"
    pipeline.post(document)
    pipeline.drain()
    pipeline.post(auth0_event("user.updated", "auth0|1", email="ann.lee@invalid", at=5))
    pipeline.drain()
    with pipeline.sessions() as session:
        return session.scalars(
            select(Delivery.id).where(Delivery.status == DeliveryStatus.FAILED)
        ).one()


def get(pipeline: Pipeline, path: str, **kwargs: Any) -> Any:
    return pipeline.client.get(path, headers=AUTH, **kwargs)


def post(pipeline: Pipeline, path: str, **kwargs: Any) -> Any:
    return pipeline.client.post(path, headers=AUTH, **kwargs)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": "Bearer admin-secret-tökén"},
        {"Authorization": "Bearer 管理"},
        {"Authorization": "test-ingest-token"},
    ],
)
def test_admin_needs_the_admin_token(pipeline: Pipeline, headers: dict[str, str]) -> None:
    for method, path in [
        ("get", "/admin/deliveries"),
        ("get", "/admin/deliveries/1"),
        ("post", "/admin/replay"),
        ("post", "/admin/deliveries/1/replay"),
        ("post", "/admin/destinations/hubspot/pause"),
    ]:
        response = getattr(pipeline.client, method)(path, headers=headers)
        assert response.status_code == 401, (path, response.data)
        assert response.json["error"].startswith("missing or invalid admin token")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    with pipeline.sessions() as session:
        assert session.scalars(select(DestinationState)).all() == []


def test_admin_is_off_without_an_admin_token(settings: Settings) -> None:
    app = create_app(settings)
    try:
        response = app.test_client().get("/admin/deliveries", headers=AUTH)
        assert response.status_code == 404
    finally:
        app.extensions["idsync"].engine.dispose()


def test_list_shows_failures_with_their_reason_masked(pipeline: Pipeline) -> None:
    failed_id = failed_delivery(pipeline)
    response = get(pipeline, "/admin/deliveries", query_string={"status": "failed"})
    assert response.status_code == 200
    [row] = response.json["deliveries"]
    assert (row["id"], row["status"], row["reason"]) == (failed_id, "failed", "rejected")
    assert "INVALID_EMAIL" in row["last_error"]
    assert row["event"]["type"] == "user.updated"
    assert response.json["counts"] == {"hubspot": {"failed": 1, "succeeded": 1}}
    assert response.json["next_cursor"] is None
    everything = get(pipeline, "/admin/deliveries")
    assert [row["status"] for row in everything.json["deliveries"]] == ["failed", "succeeded"]
    for body in (response.data, everything.data):
        assert b"ann.lee@" not in body


def test_list_pages_with_a_cursor(pipeline: Pipeline) -> None:
    for n in range(5):
        pipeline.post(auth0_event("user.created", f"auth0|{n}", email=f"u{n}@example.com"))
    seen, cursor = [], None
    while True:
        query = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = get(pipeline, "/admin/deliveries", query_string=query).json
        seen += [row["id"] for row in page["deliveries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [5, 4, 3, 2, 1]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"status": "lost"}, "unknown status"),
        ({"limit": "9999"}, "between 1 and 500"),
        ({"since": "last week"}, "not a time"),
        ({"colour": "red"}, "unknown filter"),
    ],
)
def test_bad_filters_are_400_with_a_message(
    pipeline: Pipeline, query: dict[str, str], message: str
) -> None:
    response = get(pipeline, "/admin/deliveries", query_string=query)
    assert response.status_code == 400
    assert message in response.json["error"]


def test_detail_has_event_and_every_attempt_masked(pipeline: Pipeline) -> None:
    failed_id = failed_delivery(pipeline)
    with pipeline.sessions() as session:
        succeeded_id = session.scalars(
            select(Delivery.id).where(Delivery.status == DeliveryStatus.SUCCEEDED)
        ).one()
    failed = get(pipeline, f"/admin/deliveries/{failed_id}")
    assert failed.status_code == 200
    assert failed.json["delivery"]["reason"] == "rejected"
    assert "INVALID_EMAIL" in failed.json["delivery"]["last_error"]
    assert "a***@invalid" in failed.json["delivery"]["last_error"]
    [attempt] = failed.json["attempts"]
    assert attempt["outcome"] == "failed" and attempt["request"].startswith("POST /crm/v3/")
    created = get(pipeline, f"/admin/deliveries/{succeeded_id}").json
    user = created["event"]["payload"]["data"]["object"]
    assert user["email"] == "a***@example.com"
    assert user["identities"][0]["access_token"] == "***"
    assert "context" not in created["event"]["payload"]["data"]
    assert created["event"]["received_via"] == created["delivery"]["event"]["received_via"]
    assert created["event"]["received_via"] == "webhook"
    assert created["attempts"], "the successful calls are listed too"
    for body in (failed.data, json.dumps(created).encode()):
        assert b"ann.lee@" not in body and b"idp-access-token-value" not in body
        assert b"fake-token" not in body and ADMIN_TOKEN.encode() not in body
    missing = get(pipeline, "/admin/deliveries/999999")
    assert missing.status_code == 404 and "999999" in missing.json["error"]


def test_replay_one_delivery(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|1", email="ann@example.com", at=0))
    pipeline.drain()
    pipeline.post(
        auth0_event("user.updated", "auth0|1", email="ann@example.com", given_name="Ann", at=5)
    )
    pipeline.hubspot.fail_next(1, status=400)
    pipeline.drain()
    assert pipeline.deliveries() == [("succeeded", None), ("failed", "rejected")]
    assert post(pipeline, "/admin/deliveries/1/replay").json["replayed"] == 1
    response = post(pipeline, "/admin/deliveries/2/replay")
    assert response.status_code == 200
    assert response.json == {
        "dry_run": False,
        "matched": 1,
        "replayed": 1,
        "destinations": ["hubspot"],
        "purged": 0,
    }
    again = post(pipeline, "/admin/deliveries/2/replay")
    assert again.status_code == 409 and "pending" in again.json["error"]
    pipeline.drain()
    # The replayed create is older than the update that now succeeds: it ends stale.
    assert pipeline.deliveries() == [("skipped", "stale"), ("succeeded", None)]
    contact = pipeline.hubspot.contact_by_email("ann@example.com")
    assert contact is not None and contact["properties"]["firstname"] == "Ann"
    assert post(pipeline, "/admin/deliveries/42/replay").status_code == 404


def test_bulk_replay_by_filters_with_dry_run(pipeline: Pipeline) -> None:
    for n in range(3):
        pipeline.post(auth0_event("user.created", f"auth0|{n}", email=f"u{n}@invalid"))
    pipeline.drain()
    assert pipeline.deliveries() == [("failed", "rejected")] * 3
    dry = post(pipeline, "/admin/replay", json={"status": "failed", "dry_run": True})
    assert dry.status_code == 200
    assert dry.json == {
        "dry_run": True,
        "matched": 3,
        "replayed": 0,
        "destinations": ["hubspot"],
        "purged": 0,
    }
    assert pipeline.deliveries() == [("failed", "rejected")] * 3
    one = post(pipeline, "/admin/replay", json={"subject": "auth0|1"})
    assert (one.json["matched"], one.json["replayed"]) == (1, 1)
    assert [status for status, _ in pipeline.deliveries()] == ["failed", "pending", "failed"]
    for body, message in [
        ({"status": "pending"}, "still on their way"),
        ({"colour": "red"}, "unknown filter"),
        ({"dry_run": "yes"}, "dry_run must be true or false"),
        ([1, 2], "JSON object"),
    ]:
        response = post(pipeline, "/admin/replay", json=body)
        assert response.status_code == 400 and message in response.json["error"], body


def test_operator_pause_and_resume(pipeline: Pipeline) -> None:
    response = post(
        pipeline, "/admin/destinations/hubspot/pause", json={"reason": "HubSpot maintenance"}
    )
    assert response.status_code == 200
    assert response.json["paused"] and response.json["paused_by"] == "operator"
    pipeline.post(auth0_event("user.created", "auth0|1", email="ann@example.com"))
    report = run_batch(
        sessions=pipeline.sessions, settings=pipeline.settings, destination=pipeline.destination
    )
    assert report.claimed == 0 and pipeline.deliveries() == [("pending", None)]
    assert pipeline.client.get("/readyz").json["destinations"]["hubspot"] == (
        "paused: HubSpot maintenance"
    )
    assert post(pipeline, "/admin/destinations/hubspot/resume").json["paused"] is False
    pipeline.drain()
    assert pipeline.deliveries() == [("succeeded", None)]
    unknown = post(pipeline, "/admin/destinations/salesforce/pause")
    assert unknown.status_code == 404 and "unknown destination" in unknown.json["error"]


def test_destinations_lists_each_with_its_state_and_counts(pipeline: Pipeline) -> None:
    failed_delivery(pipeline)
    assert post(pipeline, "/admin/destinations/hubspot/pause").status_code == 200
    response = get(pipeline, "/admin/destinations")
    assert response.status_code == 200
    [view] = response.json
    assert (view["name"], view["paused"], view["paused_by"]) == ("hubspot", True, "operator")
    assert view["deliveries"] == {"failed": 1, "succeeded": 1}  # as failed_delivery leaves it
    assert view["rate_limit"] is None  # no worker has reported HubSpot's headroom yet
    assert pipeline.client.get("/admin/destinations").status_code == 401


def test_destinations_show_the_headroom_workers_reported(pipeline: Pipeline) -> None:
    reporter = HeadroomReporter.from_settings(pipeline.settings, "hubspot")
    assert reporter is not None
    try:
        reporter(
            Headroom(
                max=100, remaining=87, interval_ms=10_000, daily=250_000, daily_remaining=249_000
            )
        )
        [view] = get(pipeline, "/admin/destinations").json
        headroom = view["rate_limit"]
        assert {key: headroom[key] for key in headroom if key != "age_seconds"} == {
            "max": 100,
            "remaining": 87,
            "interval_seconds": 10,
            "daily_max": 250_000,
            "daily_remaining": 249_000,
        }
        assert 0 <= headroom["age_seconds"] < 60
    finally:
        reporter.client.delete(reporter.key)
