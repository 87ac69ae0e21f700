"""Turn an Auth0 Event Stream delivery (one structured CloudEvent) into a ``NewEvent``.

Everything a body could carry that the database cannot hold is decided here,
before the insert: PostgreSQL's text and JSONB refuse NUL characters and
unpaired surrogates, JSONB refuses NaN and infinities, and the key columns have
lengths. A field idsync keys on (``id``, ``source``, ``type``, ``time``,
``data.object.user_id``) with such a value is rejected; anywhere else the value
is cleaned (NUL removed, a surrogate replaced by U+FFFD) and the event stored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import String

from models.ordering import EARLIEST, LATEST, TimeOutOfRange, parse_time
from models.outbox import NewEvent
from models.tables import Event, EventStatus

HANDLED_TYPES = frozenset({"user.created", "user.updated", "user.deleted"})
JSON_MEDIA_TYPES = frozenset({"application/json", "application/cloudevents+json"})
MAX_DEPTH = 64

TOO_DEEP = f"too_deep: the JSON is nested deeper than {MAX_DEPTH} levels"
NON_FINITE_NUMBER = (
    "non_finite_number: the JSON holds NaN, Infinity or a number beyond a double's range, "
    "which cannot be stored"
)
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# What json.dumps (ASCII output) writes for a NUL or a surrogate: a superset of the unstorable.
_ESCAPED_UNSTORABLE = re.compile(r"\\u(?:0000|d[89a-f])")
# How canonical_json writes a non-finite number: always after ":", "[" or ",".
_NON_FINITE_TOKEN = re.compile(r"[:,\[]-?(?:NaN|Infinity)")


def _column_length(name: str) -> int:
    length = cast(String, Event.__table__.c[name].type).length
    assert length is not None
    return length


# The limits are the events table's own, so a stored event always fits.
MAX_LENGTHS = {
    "source": _column_length("source"),
    "id": _column_length("event_id"),
    "type": _column_length("type"),
    "data.object.user_id": _column_length("subject"),
}


class InvalidEvent(ValueError):
    """The body is JSON but not an event idsync can store; the message says why."""


class NotJson(ValueError):
    """The body is not JSON at all."""


def _integer(text: str) -> int | float:
    # An integer no double can hold would overflow every consumer that reads JSON
    # numbers as doubles; mark it like 1e400 so that it is refused the same way.
    return int(text) if math.isfinite(float(text)) else math.inf


def parse_json(body: bytes) -> Any:
    """The JSON document in ``body``; ``NotJson`` or ``InvalidEvent`` (too deep) if none.

    NaN, Infinity and numbers beyond a double parse to non-finite floats here, so
    that ``storable`` can refuse them by name instead of the database refusing them.
    """
    try:
        return json.loads(body, parse_constant=float, parse_int=_integer)
    except RecursionError as error:
        # The parser recurses per level: it ran out of stack far beyond MAX_DEPTH.
        raise InvalidEvent(TOO_DEEP) from error
    except ValueError as error:  # UnicodeDecodeError included
        raise NotJson(str(error)) from error


def clean_text(text: str) -> str:
    """``text`` without NUL characters, each unpaired surrogate replaced by U+FFFD."""
    if _UNSTORABLE.search(text) is None:
        return text
    return _SURROGATE.sub("\ufffd", text.replace("\x00", ""))


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no spaces: one text whatever spelling carried it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)


def _plainly_storable(value: Any, canonical: str | None) -> bool:
    """Whether ``value`` certainly holds nothing to clean or refuse, decided at C speed.

    Its ``canonical_json`` writes every NUL and unpaired surrogate as an escape
    (``\\u0000``, ``\\udxxx``) and every non-finite number as a bare ``NaN`` or
    ``Infinity``; its brackets bound the nesting depth. A False only means: walk the
    value and see.
    """
    try:
        text = canonical if canonical is not None else canonical_json(value)
    except (ValueError, TypeError, RecursionError):
        return False
    return (
        text.count("[") + text.count("{") <= MAX_DEPTH
        and _ESCAPED_UNSTORABLE.search(text) is None
        and _NON_FINITE_TOKEN.search(text) is None
    )


def storable(value: Any, depth: int = 1, *, canonical: str | None = None) -> Any:
    """The JSON ``value`` as the database can hold it: a copy with strings cleaned
    when any needs it, else ``value`` itself.

    Raises ``InvalidEvent`` when it is nested deeper than ``MAX_DEPTH`` or holds a
    number that is not finite; the recursion stops at ``MAX_DEPTH``. ``canonical``
    is ``canonical_json(value)`` when the caller has it already.
    """
    if depth == 1 and isinstance(value, dict | list) and _plainly_storable(value, canonical):
        return value  # most events: no walk, no copy
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidEvent(NON_FINITE_NUMBER)
    if isinstance(value, dict | list) and depth > MAX_DEPTH:
        raise InvalidEvent(TOO_DEEP)
    if isinstance(value, dict):
        return {clean_text(key): storable(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [storable(item, depth + 1) for item in value]
    return value


def _pruned(value: Any, depth: int = 1) -> Any:
    """``value`` with whatever lies deeper than ``MAX_DEPTH`` replaced by a marker."""
    if isinstance(value, dict | list) and depth > MAX_DEPTH:
        return f"(cut: nested deeper than {MAX_DEPTH} levels)"
    if isinstance(value, dict):
        return {key: _pruned(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_pruned(item, depth + 1) for item in value]
    return value


def quarantine_text(body: bytes, document: Any | None) -> str:
    """What the quarantine keeps of a rejected body: text the database can hold.

    A parsed document is kept as JSON without ``data.context`` (the end user's IP
    address and location), NULs and unpaired surrogates written as JSON escapes.
    A body that could not be parsed (``document`` is None) is kept as decoded text.
    """
    if document is None:
        return body.decode("utf-8", errors="replace").replace("\x00", "\\u0000")
    kept = without_context(document) if isinstance(document, dict) else document
    # json.dumps escapes NUL itself; surrogates only stand inside strings, so
    # writing them as escapes keeps the JSON valid and the evidence exact.
    text = json.dumps(_pruned(kept), ensure_ascii=False)
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _check_key_field(name: str, value: str) -> None:
    """Refuse a value idsync keys on that the database cannot hold as it is."""
    label = f"CloudEvent attribute '{name}'" if "." not in name else name
    if _UNSTORABLE.search(value):
        raise InvalidEvent(
            f"{label} contains a NUL character or an unpaired surrogate, which cannot be stored"
        )
    limit = MAX_LENGTHS.get(name)
    if limit is not None and len(value) > limit:
        raise InvalidEvent(f"{label} is longer than {limit} characters")


def _event_time(value: Any, name: str) -> Any:
    """``parse_time``, with an instant out of range refused by the field's name."""
    label = f"CloudEvent attribute '{name}'" if "." not in name else name
    try:
        return parse_time(value)
    except TimeOutOfRange as error:
        raise InvalidEvent(
            f"{label} is out of range: after its UTC offset it must fall between "
            f"{EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d}"
        ) from error


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


def to_new_event(
    document: dict[str, Any], body: bytes, *, canonical: str | None = None
) -> NewEvent:
    """Validate ``document`` as an Auth0 event and describe how to store it.

    The type is checked before the user fields, so event types idsync does not
    handle are stored as ignored instead of being rejected. ``canonical`` is
    ``canonical_json(document)`` when the caller has it already.
    """
    cleaned = storable(document, canonical=canonical)
    envelope = read_envelope(document)
    for name, value in (
        ("id", envelope.event_id),
        ("source", envelope.source),
        ("type", envelope.type),
    ):
        _check_key_field(name, value)
    if isinstance(envelope.time, str):
        _check_key_field("time", envelope.time)
    event_time = _event_time(envelope.time, "time")
    if event_time is None:
        raise InvalidEvent("CloudEvent attribute 'time' is missing or not an RFC 3339 timestamp")
    common = {
        "source": envelope.source,
        "event_id": envelope.event_id,
        "type": envelope.type,
        "event_time": event_time,
        "payload": without_context(cleaned),
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
    _check_key_field("data.object.user_id", user_id)
    object_updated_at = _event_time(user.get("updated_at"), "data.object.updated_at")
    is_test = document.get("a0purpose") == "test"
    return NewEvent(
        **common,  # type: ignore[arg-type]
        subject=user_id,
        object_updated_at=object_updated_at,
        status=EventStatus.IGNORED if is_test else EventStatus.ACCEPTED,
        ignore_reason="test_event" if is_test else None,
    )
