"""The operator's tools against cross-site requests and hostile stored data.

The admin JSON API takes only a bearer token, which a browser never adds by
itself; email addresses are masked in any script; a stored payload nested
deeper than anything renders, and a CRLF in the sign-in's ``next``, get a clear
answer; stored strings reach neither rich's markup nor the terminal's escape
sequences. Everything runs against the real database, through the Flask app
and the ``idsync`` command line.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from idsync.fake_hubspot import FakeHubSpot
from idsync.settings import Settings
from models.tables import DestinationState
from tests.pipeline import Pipeline

ADMIN_TOKEN = "admin-secret-token"
SECRET_KEY = "admin-page-secret-key-for-tests"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


@pytest.fixture
def pipeline(
    settings: Settings, sessions: sessionmaker[Session], hubspot: FakeHubSpot
) -> Iterator[Pipeline]:
    """The shared pipeline with the admin API and the admin page on."""
    configured = settings.model_copy(
        update={
            "retry_schedule": ("0s",) * 4,
            "admin_token": ADMIN_TOKEN,
            "secret_key": SECRET_KEY,
        }
    )
    pipe = Pipeline(configured, sessions, hubspot)
    yield pipe
    pipe.destination.close()
    pipe.app.extensions["idsync"].engine.dispose()


def sign_in(pipeline: Pipeline, next_page: str | None = None) -> Any:
    query = {"next": next_page} if next_page is not None else {}
    form = pipeline.client.get("/admin/login", query_string=query)
    match = _CSRF.search(form.get_data(as_text=True))
    assert match, "the sign-in form carries a CSRF token"
    return pipeline.client.post(
        "/admin/login",
        query_string=query,
        data={"csrf_token": match.group(1), "token": ADMIN_TOKEN},
    )


# The admin JSON API takes a bearer token only


def basic(user: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


ADMIN_ROUTES = [
    ("get", "/admin/deliveries"),
    ("get", "/admin/deliveries/1"),
    ("post", "/admin/deliveries/1/replay"),
    ("post", "/admin/replay"),
    ("post", "/admin/destinations/hubspot/pause"),
    ("post", "/admin/destinations/hubspot/resume"),
]


@pytest.mark.parametrize("user", ["", "admin"])
def test_the_admin_api_refuses_http_basic_even_with_the_right_token(
    pipeline: Pipeline, user: str
) -> None:
    # A browser that once signed in with Basic replays it on any cross-site form post.
    for method, path in ADMIN_ROUTES:
        response = getattr(pipeline.client, method)(
            path, headers=basic(user, ADMIN_TOKEN), json={"status": "failed"}
        )
        assert response.status_code == 401, (path, response.json)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    with pipeline.sessions() as session:
        assert session.scalars(select(DestinationState)).all() == []
    assert pipeline.client.get("/admin/deliveries", headers=BEARER).status_code == 200
