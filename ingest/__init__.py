"""The ingest service: the Auth0 webhook, health, metrics and the admin API.

Run it with ``gunicorn "ingest:create_app()"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

from flask import Flask, Response, jsonify
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException

from idsync.logs import configure_logging
from idsync.settings import Settings
from idsync.wakeups import Waker
from ingest.metrics import IngestMetrics
from models.db import make_engine, make_session_factory


@cache
def _openapi_document() -> bytes:
    return resources.files(__name__).joinpath("openapi.json").read_bytes()


@dataclass
class IngestState:
    """What the request handlers share; built once per process by ``create_app``."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    # Records the webhook's events (``models.outbox.commit_event``); autocommit on PostgreSQL.
    recorder: Engine
    waker: Waker
    metrics: IngestMetrics


def create_app(settings: Settings | None = None) -> Flask:
    """Build the ingest Flask app from ``settings`` (default: the environment)."""
    settings = settings or Settings()
    configure_logging(
        "ingest",
        secrets=settings.secrets,
    )
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.ingest_max_body_bytes
    # No ping before each request: that is a round trip on every event. A dead
    # pooled connection fails one request with 503 (Auth0 retries it) and is dropped.
    engine = make_engine(settings.database_url, pool_pre_ping=False, pool_recycle=300)
    recorder = engine
    if engine.dialect.name == "postgresql":
        # Each event is one INSERT statement that commits by itself: a pool of autocommit
        # connections of its own saves the BEGIN and COMMIT round trips of every request.
        recorder = make_engine(
            settings.database_url, autocommit=True, pool_pre_ping=False, pool_recycle=300
        )
        event.listen(engine, "engine_disposed", lambda _engine: recorder.dispose())
    app.extensions["idsync"] = IngestState(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        recorder=recorder,
        waker=Waker(settings),
        metrics=IngestMetrics(),
    )

    from ingest import health, webhook

    app.register_blueprint(webhook.blueprint)
    app.register_blueprint(health.blueprint)
    if settings.admin_token:
        from ingest import admin, admin_page

        app.register_blueprint(admin.blueprint)
        # The webhook and the JSON API authenticate every request with a bearer token,
        # which a browser never sends by itself: only the page's forms need CSRF tokens.
        admin_page.install(app, settings, csrf_exempt=(webhook.blueprint, admin.blueprint))

    @app.get("/openapi.json")
    def openapi_document() -> Response:
        """The OpenAPI 3.1 description of this HTTP surface (``ingest/openapi.json``)."""
        return Response(_openapi_document(), mimetype="application/json")

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> tuple[Response, int]:
        code = error.code or 500
        return jsonify(status="rejected", error=error.description), code

    return app
