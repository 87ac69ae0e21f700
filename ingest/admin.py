"""The admin JSON API: find failed deliveries, read their cause, replay them.

Registered only when ``ADMIN_TOKEN`` is set, and meant for an internal network.
Every request needs ``Authorization: Bearer $ADMIN_TOKEN`` (HTTP Basic is refused,
see ``_bearer``). Answers mask emails and never contain credentials. The HTML
admin page is a separate blueprint, so only the JSON routes below belong here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from idsync.destinations import read_headroom
from ingest.auth import presented_secret, secret_matches
from models.commands import (
    ReplayResult,
    destination_states,
    pause_destination,
    replay,
    resume_destination,
)
from models.db import transaction
from models.guard import approve_deprovisions, held_counts
from models.queries import (
    DeliveryDetail,
    DeliveryFilter,
    counts_by_status,
    delivery_detail,
    list_deliveries,
)
from models.tables import FINISHED
from models.views import (
    delivery_view,
    destination_view,
    destination_views,
    detail_view,
    replay_view,
)

log = logging.getLogger(__name__)
blueprint = Blueprint("admin", __name__)

# Ids are BIGINT: a larger number in a path finds nothing, without asking the database.
MAX_ID = 2**63 - 1


def _error(code: int, message: str) -> tuple[Response, int]:
    return jsonify(status="error", error=message), code


def _state() -> Any:
    return current_app.extensions["idsync"]


def _bearer(authorization: str | None) -> bytes | None:
    """The token of ``Authorization: Bearer <token>``; any other scheme counts as none.

    HTTP Basic is refused on purpose: a browser caches Basic credentials and sends
    them with any request, a forged cross-site form post included, and this API is
    exempt from CSRF checks because a browser never adds a bearer token by itself.
    """
    scheme, _, _ = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return presented_secret(authorization)


@blueprint.before_request
def _authenticate() -> tuple[Response, int] | None:
    """Every admin route needs the admin token as a bearer token (HTTP Basic is refused)."""
    token = _state().settings.admin_token
    if token and secret_matches(_bearer(request.headers.get("Authorization")), [token]):
        return None
    response, code = _error(401, "missing or invalid admin token (Authorization: Bearer ...)")
    response.headers["WWW-Authenticate"] = 'Bearer realm="idsync-admin"'
    return response, code


@blueprint.errorhandler(SQLAlchemyError)
def _database_error(error: SQLAlchemyError) -> tuple[Response, int]:
    log.error("admin request failed: database unavailable (%s)", type(error).__name__)
    return _error(503, "the outbox database is unavailable; retry later")


def find_delivery(*, session: Session, delivery_id: int) -> DeliveryDetail | None:
    """The delivery with this id, or None; an id beyond the column's range is none either."""
    if not 1 <= delivery_id <= MAX_ID:
        return None
    return delivery_detail(session=session, delivery_id=delivery_id)


def _storable(text: str) -> bool:
    """Whether PostgreSQL can hold or compare ``text`` (no NUL, no unpaired surrogate)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def delivery_filter(params: Mapping[str, Any]) -> DeliveryFilter:
    """The filter an HTTP request names, or a ``ValueError`` that says what is wrong.

    On top of ``DeliveryFilter.from_params``, text the database cannot compare, a
    cursor past the id column's range and a time past year 9999 are the request's
    fault (400), not an unavailable database (503) or a crash (500).
    """
    for name, value in params.items():
        if isinstance(value, str) and not _storable(value):
            raise ValueError(f"{name} holds a NUL character or an unpaired surrogate")
    try:
        item = DeliveryFilter.from_params(params)
    except OverflowError:
        raise ValueError("since and until must lie between the years 1 and 9999") from None
    if item.cursor is not None and item.cursor > MAX_ID:
        raise ValueError("cursor must be the next_cursor of a previous page")
    return item


def _json_body() -> Any:
    """The request's JSON body; None when it is absent, not JSON, or nested too deep."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        return None


def shown_detail(detail: DeliveryDetail) -> dict[str, Any]:
    """The masked view of ``detail``, its payload cut at ``SHOWN_DEPTH`` levels."""
    return detail_view(detail)


def _wake(destinations: tuple[str, ...]) -> None:
    """Tell the workers that work waits (best effort: the sweep is the backstop)."""
    for destination in destinations:
        _state().waker.wake(destination)


@blueprint.get("/admin/deliveries")
def list_route() -> tuple[Response, int]:
    """Deliveries newest first, filtered by the query string, with counts by status."""
    try:
        item = delivery_filter(request.args.to_dict())
    except ValueError as error:
        return _error(400, str(error))
    with transaction(_state().sessions) as session:
        rows, next_cursor = list_deliveries(session=session, filter=item)
        body = {
            "deliveries": [delivery_view(row) for row in rows],
            "next_cursor": next_cursor,
            "counts": counts_by_status(session=session),
        }
    return jsonify(body), 200


@blueprint.get("/admin/deliveries/<int:delivery_id>")
def detail_route(delivery_id: int) -> tuple[Response, int]:
    """One delivery with its event (masked) and every attempt."""
    with transaction(_state().sessions) as session:
        detail = find_delivery(session=session, delivery_id=delivery_id)
        if detail is None:
            return _error(404, f"no delivery with id {delivery_id}")
        body = shown_detail(detail)
    return jsonify(body), 200


@blueprint.post("/admin/deliveries/<int:delivery_id>/replay")
def replay_one_route(delivery_id: int) -> tuple[Response, int]:
    """Put one finished delivery back to pending with a fresh attempt budget."""
    with transaction(_state().sessions) as session:
        detail = find_delivery(session=session, delivery_id=delivery_id)
        if detail is None:
            return _error(404, f"no delivery with id {delivery_id}")
        if detail.delivery.status not in FINISHED:
            return _error(
                409, f"delivery {delivery_id} is {detail.delivery.status.value}: still on its way"
            )
        if detail.event.payload is None:
            return _error(
                409, f"the event of delivery {delivery_id} was purged; nothing left to send"
            )
        result = replay(session=session, delivery_ids=[delivery_id])
    _wake(result.destinations)
    return jsonify(replay_view(result, dry_run=False)), 200


@blueprint.post("/admin/replay")
def replay_bulk_route() -> tuple[Response, int]:
    """Replay every delivery the JSON body's filters match (``dry_run``: only count)."""
    body = _json_body()
    if not isinstance(body, dict):
        return _error(400, 'send a JSON object of filters, e.g. {"status": "failed"}')
    dry_run = body.pop("dry_run", False)
    if not isinstance(dry_run, bool):
        return _error(400, "dry_run must be true or false")
    try:
        item = delivery_filter(body)
        with transaction(_state().sessions) as session:
            result: ReplayResult = replay(session=session, filter=item, dry_run=dry_run)
    except ValueError as error:
        return _error(400, str(error))
    if not dry_run:
        log.warning("operator replayed %d deliveries", result.replayed)
        _wake(result.destinations)
    return jsonify(replay_view(result, dry_run=dry_run)), 200


def _known_destination(name: str) -> tuple[Response, int] | None:
    known = _state().settings.destinations
    if name in known:
        return None
    return _error(404, f"unknown destination {name!r}; configured: {', '.join(known)}")


@blueprint.get("/admin/destinations")
def destinations_route() -> tuple[Response, int]:
    """Every configured destination: its pause state (a missing setting included) and counts."""
    with transaction(_state().sessions) as session:
        views = destination_views(
            session=session, settings=_state().settings, headroom=known_headroom(_state())
        )
    return jsonify(views), 200


def known_headroom(state: Any) -> dict[str, dict[str, float]]:
    """Each destination's newest rate-limit headroom; empty when Redis cannot say."""
    try:
        return read_headroom(state.waker.redis, state.settings, list(state.settings.destinations))
    except Exception as error:  # no Redis (or the embedded default): the headroom is unknown
        log.warning("admin: rate-limit headroom not readable (%s)", type(error).__name__)
        return {}


@blueprint.post("/admin/destinations/<name>/pause")
def pause_route(name: str) -> tuple[Response, int]:
    """Pause a destination by hand (body: optional ``{"reason": "..."}``)."""
    unknown = _known_destination(name)
    if unknown:
        return unknown
    # No body is fine; a body that is not {"reason": ...} is a mistake worth saying.
    body = _json_body() if request.get_data() else {}
    if not isinstance(body, dict) or set(body) - {"reason"}:
        return _error(400, 'send no body or a JSON object such as {"reason": "maintenance"}')
    reason = body.get("reason")
    if reason is not None and not (isinstance(reason, str) and _storable(reason)):
        return _error(400, "reason must be text without NUL characters or unpaired surrogates")
    with transaction(_state().sessions) as session:
        pause_destination(session=session, name=name, reason=reason)
        view = destination_view(name, destination_states(session=session).get(name))
    log.warning("destination %s paused by an operator", name)
    return jsonify(view), 200


@blueprint.post("/admin/destinations/<name>/resume")
def resume_route(name: str) -> tuple[Response, int]:
    """Resume a paused destination and wake its workers."""
    unknown = _known_destination(name)
    if unknown:
        return unknown
    with transaction(_state().sessions) as session:
        resume_destination(session=session, name=name)
        view = destination_view(name, destination_states(session=session).get(name))
    log.warning("destination %s resumed by an operator", name)
    _wake((name,))
    return jsonify(view), 200


@blueprint.post("/admin/destinations/<name>/approve-deprovisions")
def approve_deprovisions_route(name: str) -> tuple[Response, int]:
    """Release the deprovisions the guard holds for ``name`` (body: ``{"dry_run": true}``)."""
    unknown = _known_destination(name)
    if unknown:
        return unknown
    body = _json_body() if request.get_data() else {}
    if not isinstance(body, dict) or set(body) - {"dry_run"}:
        return _error(400, 'send no body or a JSON object such as {"dry_run": true}')
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        return _error(400, "dry_run must be true or false")
    with transaction(_state().sessions) as session:
        released = approve_deprovisions(session=session, destination=name, dry_run=dry_run)
        held = held_counts(session=session).get(name, 0)
    if released and not dry_run:
        log.warning("operator approved %d held deprovisions to %s", released, name)
        _wake((name,))
    return jsonify(destination=name, dry_run=dry_run, released=released, held=held), 200
