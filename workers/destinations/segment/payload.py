"""The Segment messages for one user: an ``identify``, and a ``track`` when deprovisioned.

What Segment's HTTP Tracking API takes (segment-docs, "HTTP API Source"):

- ``identify``: ``userId`` (the Auth0 ``user_id``), ``traits`` (the mapped
  fields, JSON types kept, ``null`` when absent from the newest event, and
  ``deprovisioned``), ``timestamp`` (when the event happened, RFC 3339) and
  ``messageId``, which Segment deduplicates on: ``<delivery id>_<resync count>``,
  the same on every retry and replay of a delivery, new for an operator's resync.
- A deprovisioning (``blocked: true``) that is new for this user adds a ``track``
  named by ``<NAME>_DEPROVISIONED_EVENT``; a delete adds one named by
  ``<NAME>_DELETED_EVENT``. Its ``messageId`` is the identify's plus ``_track``,
  and it follows the identify in the same batch.
- A delete event's user is often a stub: its identify carries the mapped fields
  the event does hold and ``deprovisioned: true``, and clears nothing.

The fingerprint that decides "unchanged" covers the traits and whether the user
is live, blocked or deleted; the track is part of a change, not of the state.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from workers.destinations.base import Intent, UserState
from workers.destinations.mapping import profile_field
from workers.destinations.segment.settings import DEPROVISIONED_TRAIT

LIVE, BLOCKED, DELETED = "live", "blocked", "deleted"
# segment-docs, "Spec: Common fields": messageId is limited to 100 characters.
MAX_MESSAGE_ID = 100
TRACK_SUFFIX = "_track"
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


@dataclass(frozen=True)
class UserMessages:
    """What one user's delivery sends: its messages as encoded, and the state's fingerprint."""

    key: str  # the intent's key
    message_id: str  # the identify's; the track's adds TRACK_SUFFIX
    encoded: tuple[bytes, ...]  # identify first, then the track if any
    properties_hash: str

    @property
    def size(self) -> int:
        """Bytes these messages add to a batch body, separators included."""
        return sum(len(message) for message in self.encoded) + len(self.encoded)

    @property
    def largest(self) -> int:
        return max(len(message) for message in self.encoded)


@dataclass(frozen=True)
class EventNames:
    """The names of the two tracks: a deprovisioning and a delete."""

    deprovisioned: str
    deleted: str


def build_messages(intent: Intent, mapping: dict[str, str], events: EventNames) -> UserMessages:
    """The messages that bring Segment to ``intent.user``'s newest state.

    ValueError when a field cannot be written as JSON.
    """
    user = intent.user
    base = message_id(intent)
    timestamp = event_timestamp(intent)
    traits = user_traits(user, mapping)
    state_hash = properties_hash(state_of(user), traits)
    identify = {
        "type": "identify",
        "messageId": base,
        "userId": user.subject,
        "timestamp": timestamp,
        "traits": traits,
        "context": {"library": {"name": "idsync"}},
    }
    messages = [identify]
    if wants_track(intent, state_hash):
        messages.append(
            {
                "type": "track",
                "messageId": base + TRACK_SUFFIX,
                "userId": user.subject,
                "timestamp": timestamp,
                "event": events.deleted if user.deleted else events.deprovisioned,
                "properties": {
                    "reason": DELETED if user.deleted else BLOCKED,
                    "auth0_event_id": intent.event_id,
                },
                "context": {"library": {"name": "idsync"}},
            }
        )
    encoded = tuple(encode(message) for message in messages)
    return UserMessages(intent.key, base, encoded, state_hash)


def wants_track(intent: Intent, state_hash: str) -> bool:
    """Whether a deprovisioned user's change is also told as a ``track`` event.

    A delete always is; a block only when the user was live at Segment before,
    so that a blocked user whose name changes is not deprovisioned twice. A state
    Segment was already sent (an operator's resync, a verification) is not told
    again; a retry of an unanswered write keeps its track, under the same id.
    """
    user, link = intent.user, intent.link
    if not user.deprovisioned or state_hash == link.properties_hash:
        return False
    return user.deleted or not link.deprovisioned


def state_of(user: UserState) -> str:
    """``deleted``, ``blocked`` or ``live``."""
    if user.deleted:
        return DELETED
    return BLOCKED if user.deprovisioned else LIVE


def user_traits(user: UserState, mapping: dict[str, str]) -> dict[str, Any]:
    """The mapped fields under their trait names, and ``deprovisioned``.

    An absent field is ``null`` (Segment keeps a trait until told otherwise),
    except in a delete, whose stub of a user says nothing about absent fields.
    """
    traits = {target: profile_field(user.profile, source) for source, target in mapping.items()}
    if user.deleted:
        traits = {name: value for name, value in traits.items() if value is not None}
    traits[DEPROVISIONED_TRAIT] = user.deprovisioned
    return traits


def properties_hash(state: str, traits: dict[str, Any]) -> str:
    """A stable fingerprint of what an identify says."""
    said = {"state": state, "traits": traits}
    return hashlib.sha256(json.dumps(said, sort_keys=True, default=str).encode()).hexdigest()


def message_id(intent: Intent) -> str:
    """``<delivery id>_<resync count>``: the engine's ``msg_<delivery id>_<resyncs>`` less ``msg_``.

    Without an engine id (a direct call), the intent's key; an operator's resync
    then adds a fingerprint of the state last sent, so that Segment does not
    drop it as a duplicate of the first send.
    """
    explicit = intent.message_id
    if explicit:
        return _safe(explicit.removeprefix("msg_"))
    base = _safe(intent.key)
    if not intent.force:
        return base
    sent = hashlib.sha256((intent.link.properties_hash or "").encode()).hexdigest()
    return f"{base}_r{sent[:12]}"


def event_timestamp(intent: Intent) -> str:
    """When the event happened: the engine's event time, else the user's own times, else now."""
    profile = intent.user.profile
    candidates: list[object] = [intent.event_time]
    if intent.user.deleted:
        candidates.append(profile.get("deleted_at"))
    candidates.append(profile.get("updated_at"))
    for candidate in candidates:
        when = _datetime_or_none(candidate)
        if when is None:
            continue
        try:
            return rfc3339(when)
        except (OverflowError, ValueError):  # a year-1 time east of UTC, say
            continue
    return rfc3339(datetime.now(UTC))


def rfc3339(when: datetime) -> str:
    """``2025-02-01T12:34:56.000Z``: UTC, milliseconds, ``Z``."""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode(message: dict[str, Any]) -> bytes:
    """Compact JSON, ASCII only: the bytes a message adds to a batch, as Segment counts them."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("ascii")


def batch_body(users: list[UserMessages]) -> bytes:
    """``{"batch": [...]}`` of these users' messages, in order."""
    return b'{"batch":[' + b",".join(m for user in users for m in user.encoded) + b"]}"


BATCH_OVERHEAD = len(batch_body([]))


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text)[: MAX_MESSAGE_ID - len(TRACK_SUFFIX)]


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
