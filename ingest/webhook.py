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
from werkzeug.exceptions import RequestEntityTooLarge

from ingest.auth import presented_secret, secret_matches
from ingest.store import NOT_ALLOWED, UNAVAILABLE, StoreResult, quarantine, store_document
from ingest.validation import JSON_MEDIA_TYPES, InvalidEvent, NotJson, parse_json

log = logging.getLogger(__name__)
blueprint = Blueprint("webhook", __name__)


def _answer(code: int, **body: Any) -> tuple[Response, int]:
    current_app.extensions["idsync"].metrics.event_received(body["status"], code)
    return jsonify(body), code


def _reject(code: int, error: str) -> tuple[Response, int]:
    return _answer(code, status="rejected", error=error)


def _unavailable() -> tuple[Response, int]:
    response, status = _reject(503, UNAVAILABLE)
    response.headers["Retry-After"] = "1"
    return response, status


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
        return _answer_result(quarantine(state.sessions, body, str(error), None))
    if isinstance(document, dict) and isinstance(document.get("id"), str):
        structlog.contextvars.bind_contextvars(event_id=document["id"])
    result = store_document(
        sessions=state.sessions,
        settings=state.settings,
        waker=state.waker,
        document=document,
        body=body,
        engine=state.recorder,
    )
    return _answer_result(result)


def _answer_result(result: StoreResult) -> tuple[Response, int]:
    """The webhook's answer to what storing did: 2xx only once it is committed."""
    if result.outcome == "accepted":
        return _answer(202, status="accepted", id=result.event_id, deliveries=result.deliveries)
    if result.outcome == "ignored":
        return _answer(202, status="ignored", reason=result.reason, id=result.event_id)
    if result.outcome == "duplicate":
        return _answer(200, status="duplicate", id=result.event_id)
    if result.outcome == "forbidden":
        return _reject(403, result.reason or NOT_ALLOWED)
    if result.outcome == "unavailable":
        return _unavailable()
    return _reject(422, result.reason or "not a storable event")
