"""The small interface every destination implements.

A destination receives one ``Intent`` per user (the newest state idsync wants
that user to have there, and what it knows of the user's link) and answers one
``Outcome`` per intent. It maps and sends and reports; it never opens database
sessions or writes rows: the worker owns state.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True)
class UserState:
    """What the newest event says about a user."""

    subject: str
    email: str | None  # lowercased
    previous_email: str | None  # lowercased, from data.previous_object
    deprovisioned: bool  # deleted, or blocked
    deleted: bool
    profile: dict[str, Any]  # data.object, the whole user

    @classmethod
    def from_event(cls, event_type: str, payload: dict[str, Any]) -> UserState:
        """Read the user out of a stored Auth0 event."""
        data = payload.get("data") or {}
        user = data.get("object") or {}
        previous = data.get("previous_object") or {}
        deleted = event_type == "user.deleted"
        return cls(
            subject=str(user.get("user_id")),
            email=_email(user.get("email")),
            previous_email=_email(previous.get("email")),
            deprovisioned=deleted or user.get("blocked") is True,
            deleted=deleted,
            profile=user,
        )


def _email(value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return value.strip().lower()


@dataclass(frozen=True)
class LinkState:
    """What idsync remembers of the user at this destination."""

    external_id: str | None = None
    deprovisioned: bool = False
    properties_hash: str | None = None
    last_email: str | None = None
    # A call's outcome is unknown: read the record back before writing to it.
    uncertain: bool = False
    # Seconds until a write with an unknown outcome can no longer land (0: none can).
    settling_for: float = 0.0

    @property
    def live_id(self) -> str | None:
        """The linked contact id while the link is live."""
        return None if self.deprovisioned else self.external_id


@dataclass(frozen=True)
class Intent:
    """Bring one user to ``user`` at the destination."""

    key: str  # unique in a batch: the delivery id
    user: UserState
    link: LinkState
    force: bool = False  # an operator's resync: send even when nothing changed
    # The Auth0 event behind it, for destinations that pass them on.
    event_id: str | None = None
    source: str | None = None
    event_time: datetime | None = None
    # Stable across retries and replays, new for each operator's resync: what a
    # receiver dedupes on (``msg_<delivery id>_<resync count>``).
    message_id: str | None = None


class Verdict(enum.StrEnum):
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"  # permanent for this delivery
    RETRY = "retry"  # transient: try again later
    PAUSE = "pause"  # the destination is misconfigured: stop them all


@dataclass(frozen=True)
class CallSummary:
    """One HTTP call made for an intent, for the delivery's attempt history."""

    request: str
    status: int | None
    duration_ms: float
    error_category: str | None
    response_excerpt: str | None


@dataclass
class Outcome:
    """What happened to one intent, and what the link should say afterwards."""

    verdict: Verdict
    reason: str | None = None
    message: str | None = None
    status_code: int | None = None
    # The link after a success: the contact id (None: unlinked), and how it looks now.
    external_id: str | None = None
    created: bool | None = None  # None: unchanged from the link
    properties_hash: str | None = None
    email: str | None = None
    deprovisioned: bool = False
    # For RETRY: whether it spends the attempt budget, and a wait the destination named.
    counts_against_budget: bool = True
    retry_after: float | None = None
    # A write was sent but its answer never came (timeout, lost connection): it may
    # still land, so the link stays uncertain for SETTLE_SECONDS.
    uncertain: bool = False
    # For PAUSE: only an operator may resume (the destination said "stop", e.g. 410 Gone);
    # otherwise a successful probe resumes it.
    resume_by_hand: bool = False
    calls: list[CallSummary] = field(default_factory=list)


class LimiterTimeout(Exception):
    """No request slot could be had in time; try the work again later."""


class Limiter(Protocol):
    """A destination's request budget, shared by every worker (``workers/ratelimit.py``)."""

    def acquire(self, timeout: float) -> None:
        """Take one request slot within ``timeout`` seconds, or raise ``LimiterTimeout``."""
        ...

    def block_for(self, seconds: float) -> None:
        """Let nobody send for ``seconds`` (the destination said its window is spent)."""
        ...

    def wait_for_capacity(self, timeout: float) -> bool:
        """Whether a slot is free within ``timeout`` seconds, without taking it."""
        ...


@dataclass(frozen=True)
class Headroom:
    """The rate-limit headroom a destination reported on one answer (None: not sent)."""

    max: int | None
    remaining: int | None
    interval_ms: int | None
    daily: int | None
    daily_remaining: int | None


ContactClaim = Callable[[str, str], bool]
"""(intent key, record id) -> whether the intent's user now holds the record.

Called before writing to a record found by a lookup: True once the user's link
holds it (atomically, across workers), False when another user's live link does.
"""


class Destination(Protocol):
    """A system idsync keeps in step with the identity provider."""

    name: str
    # What a mapped field absent from the newest event is sent as: HubSpot clears a
    # property with "", most JSON APIs with null.
    clears_with: str | None

    def deliver(
        self, intents: list[Intent], *, claim: ContactClaim, deadline: float
    ) -> dict[str, Outcome]:
        """Bring each intent's user to its state; answer one outcome per intent key.

        No call starts after ``deadline`` (a ``time.monotonic()`` value): what was
        not sent by then answers RETRY without spending the budget.
        """
        ...

    def probe(self) -> str | None:
        """None when the destination accepts our credentials and mapping, else why not."""
        ...

    def read(self, external_ids: list[str]) -> dict[str, dict[str, Any]] | None:
        """The linked records by id with their mapped fields (absent: no such record).

        None when the destination cannot be read (a webhook): verification and
        reconciliation then rely on what idsync sent.
        """
        ...

    def close(self) -> None:
        """Release connections."""
        ...
