"""Braze: one user profile per Auth0 user, written with ``/users/track`` attributes.

The rules (``shared/reference/destinations.md``, "Braze", and Braze's "POST: Track
users" page, https://www.braze.com/docs/api/endpoints/user_data/post_user_track):

- A profile's ``external_id`` is the Auth0 ``user_id``; Braze creates the profile
  on the first write and updates it after. Only attributes are sent: they are
  idempotent, so a retry or a late duplicate changes nothing, while events are
  not ("No idempotency key on /users/track").
- Every mapped attribute is sent on every write, ``null`` when the newest event
  lacks it ("To remove a profile attribute, set it to null", Braze's "User
  attributes object"). A user whose attributes equal what was last sent is not
  sent again (Braze counts a data point for every attribute written).
- Up to ``<NAME>_BATCH_SIZE`` (at most 75) objects go in one request. A 201 whose
  ``errors`` name objects by ``index`` fails those alone, with Braze's words; the
  others succeeded. A whole-call 400 fails the call's users with Braze's message,
  unless its ``errors`` name the objects at fault: then only those fail and the
  rest are sent again without them.
- Deprovisioning (a delete, or ``blocked: true``) sets the custom attribute
  ``idsync_deprovisioned: true`` (``mark``), or deletes the profile with
  ``/users/delete``, 50 ids at most per call (``delete``: irreversible, Braze's
  "POST: Delete users"). A user idsync never wrote is not written to deprovision it.
- 401 and 403 pause the destination (a revoked key, a key without the
  permission), as do a 404 or a redirect (the REST endpoint is not the
  workspace's cluster) and a 400 saying the batch is too large for the workspace.
  A 429 waits until ``X-RateLimit-Reset`` without spending the attempt budget;
  5xx and timeouts are retried, and a timed-out write is marked uncertain.
- Braze cannot read profiles back by id in bulk (``/users/export/ids`` is
  limited to 250 requests a minute for newer workspaces), so ``read`` answers
  None: verification re-sends the newest state, which attributes make safe.

Before the first write for a user, the user's link takes the profile id
(``claim``), so that two users who share a ``user_id`` (two Auth0 tenants) never
write into one profile: the second ends ``failed: contact_owned`` unsent.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from idsync.logs import register_secrets, scrub
from workers.destinations.base import (
    CallSummary,
    ContactClaim,
    Headroom,
    Intent,
    Limiter,
    LimiterTimeout,
    Outcome,
    Verdict,
)
from workers.destinations.braze.client import Answer, BrazeClient
from workers.destinations.braze.settings import DELETE_LIMIT, Config
from workers.destinations.mapping import profile_field

if TYPE_CHECKING:
    from idsync.settings import Settings

TRACK = "/users/track"
DELETE = "/users/delete"
# A worker holding claims waits at most this long for a request slot (and never more
# than a quarter of its lease), so that no claim's lease expires while it waits.
LIMITER_WAIT_SECONDS = 20.0
# The links table keeps record ids of up to 64 characters; longer user ids are
# kept as a digest of themselves, which is as unique.
MAX_RECORD_ID = 64
EXCERPT_LIMIT = 500
# A 429 without X-RateLimit-Reset or Retry-After waits one window of Braze's limit.
DEFAULT_THROTTLE_SECONDS = 3.0
# Braze answers a request over the workspace's object limit with these words
# ("API errors and responses": "Max Input Length Exceeded", "The max number of
# external_ids and aliases per request was exceeded").
_TOO_LARGE = re.compile(r"max input length|max number of", re.IGNORECASE)


def build(
    config: Config,
    settings: Settings,
    limiter: Limiter,
    on_headroom: Callable[[Headroom], None] | None = None,
) -> BrazeDestination:
    """The adapter of one Braze destination (the registry's entry point)."""
    limiter_wait = min(LIMITER_WAIT_SECONDS, settings.lease_seconds / 4)
    return BrazeDestination(config, limiter, limiter_wait=limiter_wait, on_headroom=on_headroom)


def record_id(user_id: str) -> str:
    """The id a user's link keeps for its Braze profile: the user id, or a digest if too long."""
    if len(user_id) <= MAX_RECORD_ID:
        return user_id
    digest = hashlib.sha256(user_id.encode()).hexdigest()
    return f"sha256:{digest}"[:MAX_RECORD_ID]


def state_hash(state: dict[str, Any]) -> str:
    """A stable fingerprint of the state a write brings a profile to."""
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


@dataclass
class _Write:
    """One user's object in a ``/users/track`` call, or its id in a ``/users/delete`` call."""

    intent: Intent
    body: dict[str, Any]  # the attributes object; empty for a delete
    properties_hash: str
    deprovisioned: bool
    claim: bool  # the link does not hold the profile yet: take it before writing
    delete: bool = False  # a /users/delete of the profile rather than attributes

    @property
    def key(self) -> str:
        return self.intent.key

    @property
    def external_id(self) -> str:
        return self.intent.user.subject


@dataclass
class _Batch:
    """What the calls of one ``deliver`` share: the deadline, the outcomes, whether to stop."""

    deadline: float
    claim: ContactClaim
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    halted: Outcome | None = None  # what every write not yet sent gets instead


class BrazeDestination:
    """Plans ``/users/track`` and ``/users/delete`` calls for a batch and reads their answers."""

    # Braze removes an attribute set to null; there is no other "cleared" value.
    clears_with: str | None = None

    def __init__(
        self,
        config: Config,
        limiter: Limiter,
        *,
        limiter_wait: float = LIMITER_WAIT_SECONDS,
        on_headroom: Callable[[Headroom], None] | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.limiter = limiter
        self.limiter_wait = limiter_wait
        self.batch_size = config.batch_size
        self.mapping = config.mapping()
        self._prefix = config.prefix
        self._key = config.api_key or ""
        self._on_headroom = on_headroom
        register_secrets([self._key])
        self.client = BrazeClient(
            config.rest_endpoint or "",
            self._key,
            connect_timeout=config.connect_timeout_seconds,
            timeout=config.timeout_seconds,
        )

    def __repr__(self) -> str:
        return f"BrazeDestination(name={self.name!r}, client={self.client!r})"

    def close(self) -> None:
        """Close the pooled connections."""
        self.client.close()

    def read(self, external_ids: list[str]) -> dict[str, dict[str, Any]] | None:
        """None: Braze has no bulk read by id; verification re-sends the newest state instead."""
        return None

    # Planning

    def deliver(
        self, intents: list[Intent], *, claim: ContactClaim, deadline: float
    ) -> dict[str, Outcome]:
        """Bring each user's profile to its newest state; no call starts after ``deadline``."""
        batch = _Batch(deadline, claim)
        tracks: list[_Write] = []
        deletes: list[_Write] = []
        for intent in intents:
            planned = self._plan(intent)
            if isinstance(planned, Outcome):
                batch.outcomes[intent.key] = planned
            else:
                (deletes if planned.delete else tracks).append(planned)
        for start in range(0, len(tracks), self.batch_size):
            self._send(TRACK, tracks[start : start + self.batch_size], batch)
        for start in range(0, len(deletes), DELETE_LIMIT):
            self._send(DELETE, deletes[start : start + DELETE_LIMIT], batch)
        return batch.outcomes

    def _plan(self, intent: Intent) -> _Write | Outcome:
        """The write that brings this user to its newest state, or its outcome without one."""
        user, link = intent.user, intent.link
        # The link takes the profile id before the first call, which may then be refused
        # (a revoked key): only a state that reached Braze (or may have) makes it written.
        written = link.external_id is not None and (
            link.properties_hash is not None or link.uncertain
        )
        holds = link.external_id == record_id(user.subject) and not link.deprovisioned and written
        if user.deprovisioned and not written:
            return Outcome(
                Verdict.SKIPPED,
                reason="not_linked",
                message="idsync never wrote this user to Braze; there is nothing to deprovision",
            )
        write = self._write_for(intent, claim=not holds)
        if isinstance(write, Outcome):
            return write
        # The profile may hold another state while a write whose answer never came can land.
        settled = not link.uncertain and not intent.force
        same = write.properties_hash == link.properties_hash
        if settled and same and (holds or (link.deprovisioned and user.deprovisioned)):
            return Outcome(Verdict.SKIPPED, reason="unchanged")
        return write

    def _write_for(self, intent: Intent, *, claim: bool) -> _Write | Outcome:
        user = intent.user
        mark = self.config.deprovision_attribute
        if user.deprovisioned and self.config.deprovision == "delete":
            return _Write(intent, {}, state_hash({"deleted": True}), True, claim, delete=True)
        if user.deprovisioned:
            # The mark alone: a delete often carries no profile, which must not wipe it.
            body = {"external_id": user.subject, mark: True}
            return _Write(intent, body, state_hash({"mark": mark, "value": True}), True, claim)
        attributes = {
            target: profile_field(user.profile, source) for source, target in self.mapping.items()
        }
        state: dict[str, Any] = {"attributes": attributes}
        body = {"external_id": user.subject, **attributes}
        if self.config.deprovision == "mark":
            state["mark"] = mark
            if claim or intent.link.uncertain or intent.link.deprovisioned:
                # A profile this link did not hold live may carry the mark (or get it late).
                body[mark] = False
        try:
            json.dumps(body, allow_nan=False)
        except (TypeError, ValueError) as error:
            return Outcome(Verdict.FAILED, reason="unencodable", message=scrub(str(error))[:300])
        return _Write(intent, body, state_hash(state), False, claim)

    # Sending

    def _send(self, path: str, writes: list[_Write], batch: _Batch) -> None:
        """One call for ``writes``, unless the batch stopped, ran out of time, or lost a claim."""
        if batch.halted is not None:
            self._answer_all(writes, batch, replace(batch.halted, calls=[]))
            return
        writes = [write for write in writes if self._claimed(write, batch)]
        if not writes:
            return
        left = batch.deadline - time.monotonic()
        if left <= 0:
            self._answer_all(writes, batch, _batch_deadline())
            return
        try:
            self.limiter.acquire(min(self.limiter_wait, left))
        except LimiterTimeout as error:
            self._answer_all(writes, batch, _limiter_busy(str(error)))
            return
        if time.monotonic() >= batch.deadline:
            self._answer_all(writes, batch, _batch_deadline())
            return
        if path == TRACK:
            answer = self.client.post(TRACK, {"attributes": [write.body for write in writes]})
            shown = f"POST {TRACK} attributes={len(writes)}"
        else:
            answer = self.client.post(DELETE, {"external_ids": [w.external_id for w in writes]})
            shown = f"POST {DELETE} external_ids={len(writes)}"
        self._note_rate_limit(answer)
        summary = self._summary(shown, answer)
        for key, outcome in self._judge(path, writes, answer, batch).items():
            # An object Braze refused carries its own error: its attempt says so.
            own = outcome.calls[0] if outcome.calls else None
            outcome.calls = [
                summary
                if own is None
                else replace(
                    summary,
                    error_category=own.error_category,
                    response_excerpt=own.response_excerpt,
                )
            ]
            batch.outcomes[key] = outcome

    def _claimed(self, write: _Write, batch: _Batch) -> bool:
        """Whether the user holds its profile now; another user's live link answers False."""
        if not write.claim or batch.claim(write.key, record_id(write.external_id)):
            return True
        batch.outcomes[write.key] = Outcome(
            Verdict.FAILED,
            reason="contact_owned",
            message=(
                f"the Braze profile {record_id(write.external_id)!r} belongs to another "
                "user's link (two Auth0 tenants with one user_id?)"
            ),
        )
        return False

    def _answer_all(self, writes: list[_Write], batch: _Batch, outcome: Outcome) -> None:
        for write in writes:
            batch.outcomes[write.key] = replace(outcome, calls=list(outcome.calls))

    def _note_rate_limit(self, answer: Answer) -> None:
        """Feed the headroom gauge; a spent window that our limiter did not see blocks everyone.

        When our own window is full too, it already paces the next request. When it
        still has room, someone else spends the workspace's budget (another
        integration): then every worker waits for the reset.
        """
        rate_limit = answer.rate_limit
        if rate_limit is None:
            return
        if self._on_headroom is not None:
            self._on_headroom(rate_limit.headroom())
        wait = rate_limit.seconds_to_reset(time.time())
        spent = rate_limit.remaining == 0 and bool(wait) and answer.status != 429
        if spent and wait and self.limiter.wait_for_capacity(timeout=0):
            self.limiter.block_for(wait)

    # Answers

    def _judge(
        self, path: str, writes: list[_Write], answer: Answer, batch: _Batch
    ) -> dict[str, Outcome]:
        """Each write's outcome from the call's answer."""
        status = answer.status
        if status is None:
            reason = "timeout" if answer.error_category == "TIMEOUT" else "connection_error"
            failed = Outcome(
                Verdict.RETRY,
                reason=reason,
                message=f"no answer from Braze ({answer.error_category})",
                uncertain=answer.maybe_sent,
            )
            return {write.key: replace(failed) for write in writes}
        if 200 <= status < 300:
            return self._accepted(writes, answer)
        stop = self._stop(path, answer)
        if stop is not None:
            batch.halted = replace(stop, calls=[], uncertain=False)
            return {write.key: replace(stop) for write in writes}
        if status == 400:
            return self._refused(path, writes, answer)
        if status >= 500:
            retry = Outcome(
                Verdict.RETRY,
                reason="server_error",
                message=f"Braze answered HTTP {status}: {self._excerpt(answer.message)}",
                status_code=status,
                retry_after=answer.retry_after,
                # A 500 or 504 may come after the write was applied; 502 and 503 come before.
                uncertain=status not in (502, 503),
            )
            return {write.key: replace(retry) for write in writes}
        rejected = self._failure("rejected", f"Braze refused the call (HTTP {status})", answer)
        return {write.key: replace(rejected) for write in writes}

    def _stop(self, path: str, answer: Answer) -> Outcome | None:
        """The outcome of an answer that concerns the whole destination: a pause or a 429."""
        status, prefix = answer.status or 0, self._prefix
        said = self._excerpt(answer.message)
        if status == 401:
            return _pause(
                "invalid_api_key",
                f"Braze refused {prefix}API_KEY (HTTP 401: {said}); check the key, and that "
                f"{prefix}REST_ENDPOINT is your workspace's cluster",
                status,
            )
        if status == 403:
            permission = "users.track" if path == TRACK else "users.delete"
            return _pause(
                "access_denied",
                f"Braze refused the call (HTTP 403: {said}): the key in {prefix}API_KEY needs "
                f"the {permission} permission, and the workspace must be active",
                status,
            )
        if status == 404 or 300 <= status < 400:
            return _pause(
                "wrong_endpoint",
                f"Braze answered HTTP {status} to POST {path}: {prefix}REST_ENDPOINT is not a "
                "Braze REST endpoint (e.g. https://rest.iad-01.braze.com)",
                status,
            )
        if status == 400 and _TOO_LARGE.search(answer.message):
            return _pause(
                "batch_too_large",
                f"Braze refused the batch as too large ({said}); lower {prefix}BATCH_SIZE "
                "(workspaces on the Monthly Active Users CY 24-25 plan take 50)",
                status,
            )
        if status == 429:
            wait = self._throttle_wait(answer)
            self.limiter.block_for(wait)
            return Outcome(
                Verdict.RETRY,
                reason="throttled",
                message=f"Braze's rate limit is spent (HTTP 429: {said}); waiting {wait:.1f}s",
                status_code=status,
                counts_against_budget=False,
                retry_after=wait,
            )
        return None

    def _throttle_wait(self, answer: Answer) -> float:
        """Until ``X-RateLimit-Reset`` (epoch seconds), else ``Retry-After``, else one window."""
        if answer.rate_limit is not None:
            wait = answer.rate_limit.seconds_to_reset(time.time())
            if wait is not None:
                return max(wait, 0.1)
        if answer.retry_after is not None:
            return answer.retry_after
        return DEFAULT_THROTTLE_SECONDS

    def _accepted(self, writes: list[_Write], answer: Answer) -> dict[str, Outcome]:
        """A 2xx: every write succeeded but those its ``errors`` name by index."""
        named, unplaced = self._placed_errors(writes, answer)
        outcomes: dict[str, Outcome] = {}
        for index, write in enumerate(writes):
            if index in named:
                outcomes[write.key] = self._input_failure(named[index], answer)
            elif unplaced and len(writes) == 1:
                outcomes[write.key] = self._input_failure(unplaced[0], answer)
            elif unplaced:
                # An error Braze did not place: send them all again (attributes are
                # idempotent) until it is placed or the budget is spent.
                outcomes[write.key] = Outcome(
                    Verdict.RETRY,
                    reason="unplaced_error",
                    message=f"Braze reported an error for no named object: {unplaced[0]}",
                    status_code=answer.status,
                )
            else:
                outcomes[write.key] = self._success(write)
        return outcomes

    def _refused(self, path: str, writes: list[_Write], answer: Answer) -> dict[str, Outcome]:
        """A whole-call 400: the objects it names fail; without names, every write fails."""
        named, _unplaced = self._placed_errors(writes, answer) if path == TRACK else ({}, [])
        if not named:
            rejected = self._failure("rejected", "Braze refused the call (HTTP 400)", answer)
            return {write.key: replace(rejected) for write in writes}
        outcomes: dict[str, Outcome] = {}
        for index, write in enumerate(writes):
            if index in named:
                outcomes[write.key] = self._input_failure(named[index], answer)
            else:
                # Nothing of a refused call was applied: send it again without the bad ones.
                outcomes[write.key] = Outcome(
                    Verdict.RETRY,
                    reason="batch_refused",
                    message=f"sent again without the objects Braze refused: {answer.message}",
                    status_code=answer.status,
                    counts_against_budget=False,
                    retry_after=0.0,
                )
        return outcomes

    def _placed_errors(
        self, writes: list[_Write], answer: Answer
    ) -> tuple[dict[int, str], list[str]]:
        """Error types by the index of the attributes object they name, and those unplaced."""
        named: dict[int, str] = {}
        unplaced: list[str] = []
        for error in answer.errors:
            kind = str(error.get("type") or error.get("message") or "unknown error")
            index = error.get("index")
            array = error.get("input_array", "attributes")
            if array != "attributes":
                continue  # idsync sends no events or purchases
            if isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(writes):
                named.setdefault(index, kind)
            else:
                unplaced.append(kind)
        return named, unplaced

    def _input_failure(self, kind: str, answer: Answer) -> Outcome:
        said = self._excerpt(kind)
        return Outcome(
            Verdict.FAILED,
            reason=error_reason(kind),
            message=f"Braze refused this user's attributes: {said}",
            status_code=answer.status,
            calls=[CallSummary("", answer.status, 0.0, "INPUT_ERROR", said)],
        )

    def _failure(self, reason: str, head: str, answer: Answer) -> Outcome:
        return Outcome(
            Verdict.FAILED,
            reason=reason,
            message=f"{head}: {self._excerpt(answer.message)}",
            status_code=answer.status,
        )

    def _success(self, write: _Write) -> Outcome:
        user = write.intent.user
        return Outcome(
            Verdict.SUCCEEDED,
            external_id=record_id(user.subject),
            properties_hash=write.properties_hash,
            email=user.email,
            deprovisioned=write.deprovisioned,
        )

    # Records

    def _summary(self, shown: str, answer: Answer) -> CallSummary:
        ok = answer.status is not None and 200 <= answer.status < 300 and not answer.errors
        category = answer.error_category or (None if ok else f"HTTP_{answer.status}")
        return CallSummary(
            request=shown[:255],
            status=answer.status,
            duration_ms=answer.duration_ms,
            error_category=category,
            response_excerpt=None if ok or answer.status is None else self._excerpt(answer.text),
        )

    def _excerpt(self, text: str) -> str:
        """The start of Braze's words, without the key or unmasked emails."""
        if self._key:
            text = text.replace(self._key, "***")
        return scrub(text.strip())[:EXCERPT_LIMIT] or "(empty answer)"

    # Probe

    def probe(self) -> str | None:
        """None when Braze accepts the key for the calls this destination makes, else why not.

        Braze has no endpoint that only checks a key. The probe posts an empty
        ``attributes`` array to ``/users/track`` (and, with ``delete``, an empty
        ``external_ids`` to ``/users/delete``), which writes nothing and costs no
        data point: Braze answers 401 or 403 for a key it refuses, and otherwise a
        400 that there was no data, which means the key got past its check.
        """
        problem = self.config.missing()
        if problem:
            return problem
        calls: list[tuple[str, dict[str, Any]]] = [(TRACK, {"attributes": []})]
        if self.config.deprovision == "delete":
            calls.append((DELETE, {"external_ids": []}))
        for path, body in calls:
            try:
                self.limiter.acquire(self.limiter_wait)
            except LimiterTimeout as error:
                return f"no request slot: {error}"
            answer = self.client.post(path, body)
            self._note_rate_limit(answer)
            refusal = self._probe_refusal(path, answer)
            if refusal is not None:
                return refusal
        return None

    def _probe_refusal(self, path: str, answer: Answer) -> str | None:
        status = answer.status
        if status is None:
            return f"unreachable: no answer from Braze ({answer.error_category})"
        if status in (401, 403, 404) or 300 <= status < 400:
            stop = self._stop(path, answer)
            return stop.message if stop is not None else None
        if status >= 500:
            return f"unreachable: Braze answered HTTP {status}: {self._excerpt(answer.message)}"
        return None  # 2xx, a 400 about the empty body, or a 429: the key was accepted


def error_reason(kind: str) -> str:
    """A short snake_case reason from one of Braze's per-object error types."""
    text = kind.lower()
    if "blacklisted" in text or "blocklisted" in text or "disallowed" in text:
        return "external_id_disallowed"
    if "email" in text:
        return "invalid_email"
    if "phone" in text:
        return "invalid_phone"
    if "required" in text:
        return "missing_identifier"
    slug = re.sub(r"[^a-z0-9]+", "_", text).strip("_")
    return slug[:48] or "rejected"


def _pause(reason: str, message: str, status: int) -> Outcome:
    return Outcome(
        Verdict.PAUSE,
        reason=reason,
        message=scrub(message),
        status_code=status,
        counts_against_budget=False,
    )


def _batch_deadline() -> Outcome:
    return Outcome(
        Verdict.RETRY,
        reason="batch_deadline",
        message="the batch reached its deadline before this call could start",
        counts_against_budget=False,
        retry_after=0.0,
    )


def _limiter_busy(message: str) -> Outcome:
    return Outcome(
        Verdict.RETRY,
        reason="limiter_busy",
        message=message,
        counts_against_budget=False,
        retry_after=5.0,
    )
