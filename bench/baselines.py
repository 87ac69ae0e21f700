"""The two baselines of the ingest benchmark, as app factories for the same gunicorn command.

- ``bare_app()``: parse the JSON body and answer 202; what Flask under gunicorn costs.
- ``floor_app()``: parse it, insert it as one row and commit; the least work a durable
  acknowledgement needs. Its one table lives in a database of the benchmark's own
  (``BENCH_FLOOR_DATABASE_URL``), keyed by (source, event id) like any at-least-once
  receiver must be, and stores the body as it came (no re-serialising).
"""

from __future__ import annotations

import json
import os
from typing import Any

import psycopg
from flask import Flask, Response, jsonify, request

FLOOR_URL_VARIABLE = "BENCH_FLOOR_DATABASE_URL"
FLOOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS received_events (
    id bigserial PRIMARY KEY,
    source text NOT NULL,
    event_id text NOT NULL,
    payload jsonb NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT uq_received_events_source_event_id UNIQUE (source, event_id)
)
"""
_INSERT = (
    "INSERT INTO received_events (source, event_id, payload) VALUES (%s, %s, %s::jsonb) "
    "ON CONFLICT (source, event_id) DO NOTHING"
)


def _health(app: Flask) -> None:
    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        return jsonify(status="ok"), 200


def bare_app() -> Flask:
    """Parse the CloudEvent and answer 202, storing nothing."""
    app = Flask(__name__)
    _health(app)

    @app.post("/events/auth0")
    def receive() -> tuple[Response, int]:
        document = json.loads(request.get_data(cache=False))
        return jsonify(status="accepted", id=document.get("id")), 202

    return app


class _FloorStore:
    """One PostgreSQL connection per gunicorn worker, opened on first use (after the fork)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection: psycopg.Connection[Any] | None = None

    def insert(self, source: str, event_id: str, body: str) -> None:
        if self.connection is None or self.connection.closed:
            self.connection = psycopg.connect(self.url)
        try:
            self.connection.execute(_INSERT, (source, event_id, body))
            self.connection.commit()
        except psycopg.Error:
            self.connection.close()
            raise


def floor_app() -> Flask:
    """Parse the CloudEvent, insert it as one row, commit, answer 202."""
    app = Flask(__name__)
    _health(app)
    store = _FloorStore(os.environ[FLOOR_URL_VARIABLE])

    @app.post("/events/auth0")
    def receive() -> tuple[Response, int]:
        body = request.get_data(cache=False)
        document = json.loads(body)
        try:
            store.insert(document["source"], document["id"], body.decode())
        except psycopg.Error:
            return jsonify(status="rejected", error="database unavailable"), 503
        return jsonify(status="accepted", id=document["id"]), 202

    return app
