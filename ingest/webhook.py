"""``POST /events/auth0``: store one Auth0 event durably, then wake the workers.

Every 2xx means the event is committed; nothing enters the outbox otherwise.
Auth0 never retries a 4xx, so 4xx is kept for bodies that can never succeed,
and a database that cannot commit answers 503 so that Auth0 tries again.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import structlog
from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from ingest.auth import presented_secret, secret_matches
from ingest.validation import JSON_MEDIA_TYPES, InvalidEvent, read_envelope, to_new_event
from models.db import transaction
from models.outbox import NewEvent, Recorded, record_event
from models.tables import EventStatus, Quarantine

log = logging.getLogger(__name__)
blueprint = Blueprint("webhook", __name__)


def _answer(code: int, **body: Any) -> tuple[Response, int]:
    current_app.extensions["idsync"].metrics.event_received(body["status"], code)
    return jsonify(body), code


def _reject(code: int, error: str) -> tuple[Response, int]:
    return _answer(code, status="rejected", error=error)


def _quarantine(body: bytes, reason: str, document: object) -> None:
    """Keep an authenticated body that failed validation, for operators to inspect."""
    fields = document if isinstance(document, dict) else {}
    source, event_id = fields.get("source"), fields.get("id")
    try:
        with transaction(current_app.extensions["idsync"].sessions) as session:
            session.add(
                Quarantine(
                    reason=reason,
                    source=source[:255] if isinstance(source, str) else None,
                    event_id=event_id[:255] if isinstance(event_id, str) else None,
                    body=body.decode("utf-8", errors="replace"),
                )
            )
    except SQLAlchemyError:
        log.exception("could not quarantine a rejected body")


def _source_allowed(document: dict[str, Any]) -> bool:
    allowed = current_app.extensions["idsync"].settings.ingest_allowed_sources
    if not allowed:
        return True
    envelope = read_envelope(document)
    return envelope.source in allowed or envelope.tenant in allowed


@blueprint.post("/events/auth0")
def receive_auth0_event() -> tuple[Response, int]:
    """Store one CloudEvent from an Auth0 Event Stream."""
    structlog.contextvars.clear_contextvars()
    state = current_app.extensions["idsync"]
    if not secret_matches(
        presented_secret(request.headers.get("Authorization")), state.settings.ingest_token
    ):
        response, status = _reject(401, "missing or invalid credentials")
        response.headers["WWW-Authenticate"] = 'Bearer realm="idsync"'
        return response, status
    if request.mimetype not in JSON_MEDIA_TYPES:
        return _reject(
            415, "send one CloudEvent as application/json or application/cloudevents+json"
        )
    try:
        body = request.get_data(cache=False)
    except RequestEntityTooLarge:
        return _reject(413, f"body over {state.settings.ingest_max_body_bytes} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _reject(400, "the body is not valid JSON")
    try:
        if not _source_allowed(document):
            return _reject(403, "this event source is not in INGEST_ALLOWED_SOURCES")
        event = to_new_event(document, body)
        structlog.contextvars.bind_contextvars(event_id=event.event_id)
    except InvalidEvent as error:
        _quarantine(body, str(error), document)
        return _reject(422, str(error))
    return _store(event)


def _store(event: NewEvent) -> tuple[Response, int]:
    state = current_app.extensions["idsync"]
    try:
        with transaction(state.sessions) as session:
            recorded = record_event(
                session=session, event=event, destinations=state.settings.destinations
            )
    except SQLAlchemyError as error:
        log.error(
            "event %s not stored: database unavailable (%s)", event.event_id, type(error).__name__
        )
        response, status = _reject(503, "the outbox database is unavailable; retry later")
        response.headers["Retry-After"] = "1"
        return response, status
    if recorded.duplicate:
        return _duplicate(event, recorded)
    for destination in recorded.destinations:
        state.waker.wake(destination)
    if event.status is EventStatus.IGNORED:
        return _answer(202, status="ignored", reason=event.ignore_reason, id=event.event_id)
    return _answer(202, status="accepted", id=event.event_id, deliveries=len(recorded.destinations))


def _duplicate(event: NewEvent, recorded: Recorded) -> tuple[Response, int]:
    if recorded.stored_sha256 != event.body_sha256:
        log.warning(
            "event %s from %s repeated with a different body; kept the first",
            event.event_id,
            event.source,
        )
    return _answer(200, status="duplicate", id=event.event_id)
