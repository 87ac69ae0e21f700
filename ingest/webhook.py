"""``POST /events/auth0``: store one Auth0 event durably, then wake the workers.

Every 2xx means the event is committed; nothing enters the outbox otherwise.
Auth0 never retries a 4xx, so 4xx is kept for bodies that can never succeed,
and a database that cannot commit answers 503 so that Auth0 tries again. A 422
promises that the body was quarantined: when even that cannot be committed, the
answer is 503 as well.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog
from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy.exc import DataError, SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from ingest.auth import presented_secret, secret_matches
from ingest.validation import (
    JSON_MEDIA_TYPES,
    InvalidEvent,
    NotJson,
    clean_text,
    parse_json,
    quarantine_text,
    read_envelope,
    to_new_event,
)
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


def _unavailable() -> tuple[Response, int]:
    response, status = _reject(503, "the outbox database is unavailable; retry later")
    response.headers["Retry-After"] = "1"
    return response, status


def _column_text(value: object) -> str | None:
    return clean_text(value)[:255] if isinstance(value, str) else None


def _quarantine(body: bytes, reason: str, document: Any | None) -> tuple[Response, int]:
    """Keep an authenticated body that failed validation, for operators, and answer 422."""
    fields = document if isinstance(document, dict) else {}
    try:
        with transaction(current_app.extensions["idsync"].sessions) as session:
            session.add(
                Quarantine(
                    reason=reason,
                    source=_column_text(fields.get("source")),
                    event_id=_column_text(fields.get("id")),
                    body=quarantine_text(body, document),
                )
            )
    except DataError:
        log.exception("rejected a body (%s) and could not quarantine it", reason)
    except SQLAlchemyError as error:
        log.error(
            "rejected a body (%s) but could not quarantine it: database unavailable (%s)",
            reason,
            type(error).__name__,
        )
        return _unavailable()
    else:
        log.warning("rejected a body and quarantined it: %s", reason)
    return _reject(422, reason)


def _read_body(limit: int) -> bytes:
    """The request body, or ``RequestEntityTooLarge`` when it is over ``limit`` bytes.

    Werkzeug refuses a declared Content-Length over the limit itself, but it cuts
    a chunked body (no Content-Length) at the limit and returns the prefix as if
    it were whole. gunicorn ends a chunked body's stream (``wsgi.input_terminated``),
    so read one byte past the limit to tell a body at the limit from a longer one.
    """
    if request.content_length is not None or "wsgi.input_terminated" not in request.environ:
        return request.get_data(cache=False)
    stream, chunks, size = request.input_stream, [], 0
    while size <= limit:
        chunk = stream.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise RequestEntityTooLarge()
    return b"".join(chunks)


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
    limit = state.settings.ingest_max_body_bytes
    try:
        body = _read_body(limit)
    except RequestEntityTooLarge:
        return _reject(413, f"body over {limit} bytes")
    try:
        document = parse_json(body)
    except NotJson:
        return _reject(400, "the body is not valid JSON")
    except InvalidEvent as error:
        return _quarantine(body, str(error), None)
    try:
        if not _source_allowed(document):
            return _reject(403, "this event source is not in INGEST_ALLOWED_SOURCES")
        event = to_new_event(document, body)
        structlog.contextvars.bind_contextvars(event_id=event.event_id)
    except InvalidEvent as error:
        return _quarantine(body, str(error), document)
    return _store(event, body, document)


def _store(event: NewEvent, body: bytes, document: Any) -> tuple[Response, int]:
    state = current_app.extensions["idsync"]
    try:
        with transaction(state.sessions) as session:
            recorded = record_event(
                session=session, event=event, destinations=state.settings.destinations
            )
    except DataError as error:
        # Validation should have caught this value: the database refuses this body,
        # and would refuse every retry of it, so keep it and say so.
        code = getattr(error.orig, "sqlstate", None)
        log.error("event %s refused by the database (SQLSTATE %s)", event.event_id, code)
        return _quarantine(body, f"the database refused a value of this event ({code})", document)
    except SQLAlchemyError as error:
        log.error(
            "event %s not stored: database unavailable (%s)", event.event_id, type(error).__name__
        )
        return _unavailable()
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
