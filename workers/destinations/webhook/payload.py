"""The message a webhook destination sends for one user: ``{"type", "timestamp", "data"}``.

``docs/webhook-payload.schema.json`` describes it for receivers.

- ``type`` follows the newest state: ``user.deleted``, ``user.deprovisioned``
  (blocked), or ``user.upserted``.
- ``timestamp`` is when the event happened, RFC 3339 in UTC: the intent's
  ``event_time`` when the engine provides one, else the user's ``deleted_at``
  (for a delete) or ``updated_at``, else the time of sending.
- ``data`` carries the user's id and emails, whether the user is deprovisioned,
  the Auth0 event id and source when the engine provides them (else null), and
  ``profile``: every mapped field under its target name, keeping its JSON type,
  null when absent.

The fingerprint that decides "unchanged" covers the type and ``data`` without
``event_id``: a new event that changes nothing mapped sends nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from workers.destinations.base import Intent, UserState
from workers.destinations.mapping import profile_field
from workers.destinations.webhook.signing import safe_id_part

UPSERTED = "user.upserted"
DEPROVISIONED = "user.deprovisioned"
DELETED = "user.deleted"
PING = "idsync.ping"


@dataclass(frozen=True)
class Message:
    """One webhook message: its id, its body as sent, and the fingerprint of what it says."""

    id: str
    type: str
    body: bytes
    properties_hash: str


def build_message(intent: Intent, mapping: dict[str, str]) -> Message:
    """The message that brings the receiver to ``intent.user``'s newest state."""
    user = intent.user
    kind = message_type(user)
    data = {
        "user_id": user.subject,
        "email": user.email,
        "previous_email": user.previous_email,
        "deprovisioned": user.deprovisioned,
        "event_id": _text_or_none(getattr(intent, "event_id", None)),
        "source": _text_or_none(getattr(intent, "source", None)),
        "profile": map_profile(user.profile, mapping),
    }
    body = encode({"type": kind, "timestamp": event_timestamp(intent), "data": data})
    return Message(message_id(intent), kind, body, properties_hash(kind, data))


def message_type(user: UserState) -> str:
    """``user.deleted``, ``user.deprovisioned`` or ``user.upserted``."""
    if user.deleted:
        return DELETED
    return DEPROVISIONED if user.deprovisioned else UPSERTED


def message_id(intent: Intent) -> str:
    """The ``webhook-id``: the receiver's idempotency key, the same on every retry.

    It is the intent's ``message_id`` when the engine sets one, else
    ``msg_<delivery id>``. An operator's resync (``force``) re-sends a delivery
    that may have reached the receiver already, under the same delivery id; it
    gets ``_r`` and a fingerprint of the link's last sent state, so that the
    receiver does not drop it as a duplicate while its retries keep one id.
    """
    explicit = getattr(intent, "message_id", None)
    if isinstance(explicit, str) and explicit:
        return safe_id_part(explicit)
    base = f"msg_{safe_id_part(intent.key)}"
    if not intent.force:
        return base
    sent = hashlib.sha256((intent.link.properties_hash or "").encode()).hexdigest()
    return f"{base}_r{sent[:12]}"


def map_profile(profile: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """Every mapped field under its target name, as JSON; null when absent."""
    return {target: profile_field(profile, source) for source, target in mapping.items()}


def event_timestamp(intent: Intent) -> str:
    """When the event happened, RFC 3339 in UTC (see the module's docstring)."""
    profile = intent.user.profile
    candidates = [getattr(intent, "event_time", None)]
    if intent.user.deleted:
        candidates.append(profile.get("deleted_at"))
    candidates.append(profile.get("updated_at"))
    for candidate in candidates:
        when = _datetime_or_none(candidate)
        if when is None:
            continue
        try:
            return rfc3339(when)
        except (OverflowError, ValueError):  # a year 1 time east of UTC, say
            continue
    return rfc3339(datetime.now(UTC))


def rfc3339(when: datetime) -> str:
    """``2025-02-01T12:34:56.000Z``: UTC, milliseconds, ``Z``."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def properties_hash(kind: str, data: dict[str, Any]) -> str:
    """A stable fingerprint of what a message says, the event id left out."""
    said = {"type": kind, "data": {k: v for k, v in data.items() if k != "event_id"}}
    return hashlib.sha256(json.dumps(said, sort_keys=True).encode()).hexdigest()


def encode(message: dict[str, Any]) -> bytes:
    """The bytes sent and signed: compact JSON, ASCII only (any text survives as escapes)."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("ascii")


def _datetime_or_none(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
