"""``GET /openapi.json`` describes the HTTP surface, exactly, and schemathesis holds the app to it.

The document is ``ingest/openapi.json``. It must be valid OpenAPI 3.1, name every
route of the app (the admin HTML page and static files aside: they are for
browsers) and no path the app does not have. Then schemathesis generates
requests from it, valid and invalid, and sends them in process through the WSGI
app against the real database: no answer may be a 5xx, and every answer's status,
media type and body must be the ones documented; invalid data must be refused,
and so must a request without its credentials.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate

from idsync.settings import Settings
from ingest import create_app
from tests.events import auth0_event

DOCUMENT = Path(__file__).resolve().parent.parent / "ingest" / "openapi.json"
INGEST_TOKEN = "test-ingest-token"  # the settings fixture's
BEARER = f"Bearer {INGEST_TOKEN}"
ADMIN_TOKEN = "admin-secret-token"
SECRET_KEY = "openapi-test-secret-key"
# Routes for browsers, not for API clients: the admin page and Flask's static files.
UNDESCRIBED_BLUEPRINTS = {"admin_page"}
UNDESCRIBED_ENDPOINTS = {"static"}
AUTOMATIC_METHODS = {"HEAD", "OPTIONS"}
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "ignored_auth",
]


def document() -> dict[str, object]:
    return json.loads(DOCUMENT.read_text())  # type: ignore[no-any-return]


@pytest.fixture
def app(settings: Settings, db: None) -> Iterator[Flask]:
    """The ingest app with the admin API and the admin page on, and deliveries 1 and 2."""
    configured = settings.model_copy(update={"admin_token": ADMIN_TOKEN, "secret_key": SECRET_KEY})
    flask_app = create_app(configured)
    client = flask_app.test_client()
    for event in (
        auth0_event("user.created", "auth0|openapi", email="ann@example.com"),
        auth0_event("user.deleted", "auth0|openapi", at=5),
    ):
        stored = client.post("/events/auth0", json=event, headers={"Authorization": BEARER})
        assert stored.status_code == 202, stored.json
    yield flask_app
    flask_app.extensions["idsync"].engine.dispose()


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = document()
    assert spec["openapi"] == "3.1.0"
    validate(spec)


def test_the_app_serves_the_checked_in_document(app: Flask) -> None:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    assert response.json == document()


def _described_routes(app: Flask) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        blueprint = rule.endpoint.rpartition(".")[0]
        if blueprint in UNDESCRIBED_BLUEPRINTS or rule.endpoint in UNDESCRIBED_ENDPOINTS:
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - AUTOMATIC_METHODS:
            routes.add((path, method.lower()))
    return routes


def test_every_route_is_described_and_every_described_path_is_a_route(app: Flask) -> None:
    paths = document()["paths"]
    assert isinstance(paths, dict)
    described = {(path, method) for path, item in paths.items() for method in item}
    assert _described_routes(app) == described
    undescribed = {
        rule.rule
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("admin_page.") or rule.endpoint == "static"
    }
    assert undescribed == {
        "/admin/",
        "/admin/login",
        "/admin/logout",
        "/admin/ui/deliveries/<int:delivery_id>",
        "/admin/ui/deliveries/<int:delivery_id>/replay",
        "/admin/ui/destinations/<name>/approve-deprovisions",
        "/admin/ui/replay",
        "/static/<path:filename>",
    }


# The checks, the credentials and at most 50 examples per operation, valid and invalid.
CONFIG = schemathesis.Config.from_dict(
    {
        "base-url": "http://localhost",
        "generation": {"mode": "all", "max-examples": 50},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "auth": {
            "openapi": {
                "ingestToken": {"bearer": INGEST_TOKEN},
                "ingestBasic": {"username": "auth0", "password": INGEST_TOKEN},
                "adminToken": {"bearer": ADMIN_TOKEN},
            }
        },
    }
)
schema = schemathesis.openapi.from_path(DOCUMENT, config=CONFIG)


@schema.parametrize()
@settings(
    max_examples=50,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=list(HealthCheck),
)
def test_the_app_keeps_to_its_document(case: schemathesis.Case, app: Flask) -> None:
    # The schema is read from the file at import and the app exists only in this test:
    # the check's own probes (ignored_auth) go through the schema's transport.
    case.operation.schema.app = app
    case.call_and_validate(app=app)
