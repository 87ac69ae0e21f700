"""Every answer of ``POST /events/auth0`` in DESIGN's contract, on real PostgreSQL.

Nothing may be stored after a non-2xx answer, and every 2xx means committed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from idsync.settings import Settings
from ingest import create_app
from models.tables import Delivery, Event, Quarantine
from tests.events import auth0_event, fixture
from tests.processes import TcpProxy

TOKEN = "test-ingest-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def app_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"ingest_token": (TOKEN, "next-token")})


@pytest.fixture
def client(app_settings: Settings, db: None) -> Iterator[FlaskClient]:
    app = create_app(app_settings)
    yield app.test_client()
    app.extensions["idsync"].engine.dispose()


def counts(sessions: Any) -> tuple[int, int, int]:
    with sessions() as session:
        return (
            session.scalar(select(func.count(Event.id))) or 0,
            session.scalar(select(func.count(Delivery.id))) or 0,
            session.scalar(select(func.count(Quarantine.id))) or 0,
        )


def post(
    client: FlaskClient,
    body: Any,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(
        "/events/auth0",
        data=data,
        content_type=content_type,
        headers=BEARER if headers is None else headers,
    )


def test_accepted_event_is_stored_with_one_delivery_per_destination(
    client: FlaskClient, sessions: Any
) -> None:
    answer = post(client, fixture("user_created.json"))
    assert answer.status_code == 202
    assert answer.json == {
        "status": "accepted",
        "id": "evt_vjFVP5pVdfvsfRKatshkVV",
        "deliveries": 1,
    }
    assert counts(sessions) == (1, 1, 0)
    with sessions() as session:
        event = session.scalars(select(Event)).one()
    assert event.subject == "auth0|507f1f77bcf86cd799439020"
    assert "context" not in event.payload["data"]  # the end user's IP and location


def test_repeated_id_is_a_duplicate_even_with_another_body(
    client: FlaskClient, sessions: Any
) -> None:
    assert post(client, fixture("user_created.json")).status_code == 202
    again = post(client, fixture("user_updated.json"))  # same source and id, other body
    assert again.status_code == 200 and again.json["status"] == "duplicate"
    assert counts(sessions) == (1, 1, 0)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Token {TOKEN}"},
        {"Authorization": "Bearer t\u00e9st"},
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Basic " + base64.b64encode(b"auth0:wrong").decode()},
    ],
    ids=["missing", "wrong", "scheme", "non-ascii", "bad-basic", "basic-wrong"],
)
def test_bad_credentials_are_401_and_store_nothing(
    client: FlaskClient, sessions: Any, headers: dict[str, str]
) -> None:
    answer = post(client, fixture("user_created.json"), headers=headers)
    assert answer.status_code == 401
    assert counts(sessions) == (0, 0, 0)


@pytest.mark.parametrize(
    "authorization",
    [
        f"Bearer {TOKEN}",
        "Bearer next-token",
        "Basic " + base64.b64encode(f"auth0:{TOKEN}".encode()).decode(),
    ],
    ids=["bearer", "rotated-token", "basic"],
)
def test_every_valid_credential_form_is_accepted(client: FlaskClient, authorization: str) -> None:
    answer = post(
        client,
        auth0_event("user.created", "auth0|1", email="a@example.com"),
        headers={"Authorization": authorization},
    )
    assert answer.status_code == 202


def test_no_ingest_token_configured_refuses_everything(settings: Settings, db: None) -> None:
    app = create_app(settings.model_copy(update={"ingest_token": ()}))
    answer = post(app.test_client(), fixture("user_created.json"), headers=BEARER)
    app.extensions["idsync"].engine.dispose()
    assert answer.status_code == 401


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"{not json", "application/json", 400),
        (b"\xff\xfe", "application/json", 400),
        (b'{"specversion":"1.0"}', "text/plain", 415),
        (b'{"specversion":"1.0"}', "application/cloudevents-batch+json", 415),
        (b"x" * (256 * 1024 + 1), "application/json", 413),
    ],
    ids=["not-json", "not-utf8", "text", "batch-mode", "too-large"],
)
def test_malformed_bodies_get_precise_errors(
    client: FlaskClient, sessions: Any, body: bytes, content_type: str, status: int
) -> None:
    answer = post(client, body, content_type=content_type)
    assert answer.status_code == status
    assert answer.json["status"] == "rejected" and answer.json["error"]
    assert counts(sessions) == (0, 0, 0)


def _without(document: dict[str, Any], *path: str) -> dict[str, Any]:
    copied = json.loads(json.dumps(document))
    target = copied
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return copied


@pytest.mark.parametrize(
    "document",
    [
        _without(fixture("user_created.json"), "specversion"),
        _without(fixture("user_created.json"), "id"),
        _without(fixture("user_created.json"), "type"),
        _without(fixture("user_created.json"), "source"),
        _without(fixture("user_created.json"), "time"),
        {**fixture("user_created.json"), "time": "yesterday"},
        {**fixture("user_created.json"), "specversion": "0.3"},
        _without(fixture("user_created.json"), "data", "object", "user_id"),
        [fixture("user_created.json")],
    ],
    ids=["specversion", "id", "type", "source", "time", "bad-time", "old-spec", "user_id", "array"],
)
def test_invalid_events_are_422_and_quarantined(
    client: FlaskClient, sessions: Any, document: Any
) -> None:
    answer = post(client, document)
    assert answer.status_code == 422
    assert counts(sessions) == (0, 0, 1)
    with sessions() as session:
        quarantined = session.scalars(select(Quarantine)).one()
    assert quarantined.reason == answer.json["error"]


def test_unhandled_type_is_ignored_before_user_fields_are_checked(
    client: FlaskClient, sessions: Any
) -> None:
    document = {
        **fixture("user_created.json"),
        "type": "organization.created",
        "data": {"object": {"id": "org_1"}},
    }
    answer = post(client, document)
    assert answer.status_code == 202
    assert answer.json["status"] == "ignored" and answer.json["reason"] == "unhandled_type"
    assert counts(sessions) == (1, 0, 0)


def test_any_id_pattern_and_cloudevents_media_type_are_accepted(client: FlaskClient) -> None:
    answer = post(
        client,
        fixture("user_deleted_minimal.json"),
        content_type="application/cloudevents+json; charset=utf-8",
    )
    assert answer.status_code == 202


def test_allowed_sources_reject_other_tenants(app_settings: Settings, sessions: Any) -> None:
    app = create_app(app_settings.model_copy(update={"ingest_allowed_sources": ("my-tenant",)}))
    client = app.test_client()
    assert post(client, fixture("user_created.json")).status_code == 202
    other = {
        **fixture("user_created.json"),
        "a0tenant": "other",
        "id": "evt_other",
        "source": "urn:auth0:other.auth0app.com",
    }
    answer = post(client, other)
    app.extensions["idsync"].engine.dispose()
    assert answer.status_code == 403
    assert counts(sessions) == (1, 1, 0)


def test_database_down_is_503_and_the_retry_is_accepted_once(
    app_settings: Settings, database_url: str, sessions: Any
) -> None:
    port = int(database_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port)
    proxied_url = database_url.replace(f":{port}/", f":{proxy.port}/")
    app = create_app(app_settings.model_copy(update={"database_url": proxied_url}))
    client = app.test_client()
    document = auth0_event("user.created", "auth0|1", email="a@example.com")
    try:
        proxy.cut()
        answer = post(client, document)
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == "1"
        assert counts(sessions) == (0, 0, 0)
        proxy.restore()
        assert post(client, document).status_code == 202
        assert post(client, document).status_code == 200
    finally:
        app.extensions["idsync"].engine.dispose()
        proxy.close()
    assert counts(sessions) == (1, 1, 0)


def test_a_pooled_connection_that_died_costs_one_503_and_is_replaced(
    app_settings: Settings, database_url: str, sessions: Any
) -> None:
    port = int(database_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port)
    proxied_url = database_url.replace(f":{port}/", f":{proxy.port}/")
    app = create_app(app_settings.model_copy(update={"database_url": proxied_url}))
    client = app.test_client()
    first, second = (
        auth0_event("user.created", f"auth0|pooled{n}", email=f"p{n}@example.com") for n in (1, 2)
    )
    try:
        assert post(client, first).status_code == 202  # its connection stays in the pool
        proxy.cut()
        proxy.restore()  # the pooled connection is broken; new ones work
        answer = post(client, second)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        assert post(client, second).status_code == 202
    finally:
        app.extensions["idsync"].engine.dispose()
        proxy.close()
    assert counts(sessions) == (2, 2, 0)


def test_health_endpoints(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json["database"] == "ok" and ready.json["destinations"] == {"hubspot": "ok"}
    assert b"idsync_events_received_total" in client.get("/metrics").data
