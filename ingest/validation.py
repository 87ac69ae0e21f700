"""Turn an Auth0 Event Stream delivery (one structured CloudEvent) into a ``NewEvent``."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

from models.ordering import parse_time
from models.outbox import NewEvent
from models.tables import EventStatus

HANDLED_TYPES = frozenset({"user.created", "user.updated", "user.deleted"})
JSON_MEDIA_TYPES = frozenset({"application/json", "application/cloudevents+json"})


class InvalidEvent(ValueError):
    """The body is JSON but not an event idsync can store; the message says why."""


@dataclass(frozen=True)
class Envelope:
    """The CloudEvent attributes idsync reads, taken before the data is checked."""

    source: str
    event_id: str
    type: str
    time: Any
    tenant: str | None


def _required_string(document: dict[str, Any], name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value.strip():
        raise InvalidEvent(f"CloudEvent attribute '{name}' is missing or not a non-empty string")
    return value


def read_envelope(document: object) -> Envelope:
    """The CloudEvent 1.0 envelope of ``document``, or ``InvalidEvent``."""
    if not isinstance(document, dict):
        raise InvalidEvent("the body must be one CloudEvent as a JSON object")
    if document.get("specversion") != "1.0":
        raise InvalidEvent("CloudEvent attribute 'specversion' must be \"1.0\"")
    tenant = document.get("a0tenant")
    return Envelope(
        source=_required_string(document, "source"),
        event_id=_required_string(document, "id"),
        type=_required_string(document, "type"),
        time=document.get("time"),
        tenant=tenant if isinstance(tenant, str) else None,
    )


def without_context(document: dict[str, Any]) -> dict[str, Any]:
    """The event without ``data.context`` (the end user's IP address and location)."""
    stored = copy.copy(document)
    data = stored.get("data")
    if isinstance(data, dict) and "context" in data:
        stored["data"] = {key: value for key, value in data.items() if key != "context"}
    return stored


def to_new_event(document: dict[str, Any], body: bytes) -> NewEvent:
    """Validate ``document`` as an Auth0 event and describe how to store it.

    The type is checked before the user fields, so event types idsync does not
    handle are stored as ignored instead of being rejected.
    """
    envelope = read_envelope(document)
    event_time = parse_time(envelope.time)
    if event_time is None:
        raise InvalidEvent("CloudEvent attribute 'time' is missing or not an RFC 3339 timestamp")
    common = {
        "source": envelope.source,
        "event_id": envelope.event_id,
        "type": envelope.type,
        "event_time": event_time,
        "payload": without_context(document),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    if envelope.type not in HANDLED_TYPES:
        return NewEvent(
            **common,  # type: ignore[arg-type]
            subject=None,
            object_updated_at=None,
            status=EventStatus.IGNORED,
            ignore_reason="unhandled_type",
        )
    data = document.get("data")
    user = data.get("object") if isinstance(data, dict) else None
    user_id = user.get("user_id") if isinstance(user, dict) else None
    if not isinstance(user_id, str) or not user_id.strip():
        raise InvalidEvent(f"a {envelope.type} event needs data.object.user_id")
    assert isinstance(user, dict)
    is_test = document.get("a0purpose") == "test"
    return NewEvent(
        **common,  # type: ignore[arg-type]
        subject=user_id,
        object_updated_at=parse_time(user.get("updated_at")),
        status=EventStatus.IGNORED if is_test else EventStatus.ACCEPTED,
        ignore_reason="test_event" if is_test else None,
    )
