"""Liveness, readiness and metrics endpoints (keep them on an internal network)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from idsync.auth0.recovery import recovery_status
from ingest.metrics import OutboxCollector, exposition
from models.guard import held_counts
from models.tables import DestinationState

log = logging.getLogger(__name__)
blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
def healthz() -> Response:
    """200 while the process lives."""
    return jsonify(status="ok")


def _broker_state(state: Any) -> str:
    try:
        with state.waker.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=1)
    except Exception as error:  # any failure means "not reachable"
        return f"unreachable: {type(error).__name__}"
    return "ok"


def destination_report(settings: Any, states: dict[str, DestinationState]) -> dict[str, str]:
    """``ok`` or ``paused: <why>`` for each enabled destination."""
    report = {}
    for name in settings.destinations:
        stored = states.get(name)
        missing = settings.destination(name).missing()
        if missing:
            report[name] = f"paused: {missing}"
        elif stored is not None and stored.paused:
            report[name] = f"paused: {stored.paused_reason or 'by an operator'}"
        else:
            report[name] = "ok"
    return report


def guard_report(settings: Any, held: dict[str, int]) -> dict[str, str]:
    """Per destination: the deprovision guard's limit, or how many deprovisions it holds.

    Held deprovisions do not make /readyz fail: everything else keeps flowing.
    """
    report = {}
    for name in settings.destinations:
        limit = settings.deprovision_guard_of(name)
        count = held.get(name, 0)
        if count:
            report[name] = (
                f"holding {count} deprovisions for approval: idsync destinations "
                f"approve-deprovisions {name}"
            )
        elif limit is None:
            report[name] = "off"
        else:
            report[name] = f"ok (at most {limit[0]} per {limit[1]:g} s)"
    return report


@blueprint.get("/readyz")
def readyz() -> tuple[Response, int]:
    """200 when the database answers; broker, destinations and recovery are reported, not
    required."""
    state = current_app.extensions["idsync"]
    try:
        with state.sessions() as session:
            session.execute(text("SELECT 1"))
            states = {row.name: row for row in session.scalars(select(DestinationState))}
            guard = guard_report(state.settings, held_counts(session=session))
            recovery = recovery_status(session, state.settings).line()
    except SQLAlchemyError as error:
        return jsonify(status="unavailable", database=f"error: {type(error).__name__}"), 503
    return jsonify(
        status="ok",
        database="ok",
        broker=_broker_state(state),
        destinations=destination_report(state.settings, states),
        deprovision_guard=guard,
        auth0_recovery=recovery,
    ), 200


@blueprint.get("/metrics")
def metrics() -> Response:
    """Prometheus exposition: this ingest's counters, then the outbox as it is now."""
    state = current_app.extensions["idsync"]
    outbox = OutboxCollector(
        sessions=state.sessions, settings=state.settings, redis=_redis_or_none(state)
    )
    body, content_type = exposition(outbox)
    return Response(body, content_type=content_type)


def _redis_or_none(state: Any) -> Any:
    """The waker's Redis client (short timeouts), where destinations' headroom is kept."""
    try:
        return state.waker.redis
    except Exception as error:  # a bad REDIS_URL only hides the headroom
        log.warning("metrics: no Redis client (%s)", type(error).__name__)
        return None
