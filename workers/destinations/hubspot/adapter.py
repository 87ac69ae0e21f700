"""HubSpot CRM: keep one contact per Auth0 user, in batches, under the rate limit.

The rules (DESIGN.md, "Delivery semantics for HubSpot"):

- A linked user is updated by contact id, so an email change follows the person.
- An unlinked user is looked up by its previous email, then its current one;
  a contact found is adopted, otherwise one is created with the lowercased
  email. A user without a previous email skips the lookup: creating is the
  lookup, since a 409 names the contact that holds the email, which is adopted.
- A contact held by another user's live link is never touched: ``contact_owned``.
- Deprovisioning (a delete, or ``blocked: true``) archives the linked contact,
  or sets a property with ``DEPROVISION=mark``.
- The newest event is the whole truth for the mapped properties: a mapped field
  that is absent is cleared, unmapped properties are never sent, and nothing is
  sent when the mapped properties equal what was last sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

from idsync.logs import scrub
from idsync.settings import Settings
from workers.destinations.base import (
    CallSummary,
    ContactClaim,
    Headroom,
    Intent,
    Limiter,
    LimiterTimeout,
    LinkState,
    Outcome,
    UserState,
    Verdict,
)
from workers.destinations.hubspot.client import (
    BatchResult,
    CallRecord,
    HubSpotAuthError,
    HubSpotBadRequest,
    HubSpotClient,
    HubSpotConflict,
    HubSpotError,
    HubSpotNotFound,
    HubSpotRateLimited,
    HubSpotTransportError,
    RateLimitInfo,
)
from workers.destinations.hubspot.settings import Config
from workers.destinations.mapping import load_property_map as read_property_map
from workers.destinations.mapping import profile_field

DEFAULT_PROPERTY_MAP = {
    "email": "email",
    "given_name": "firstname",
    "family_name": "lastname",
    "phone_number": "phone",
}
BATCH_LIMIT = 100
log = logging.getLogger(__name__)
# A worker holding claims waits at most this long for a request slot, and never
# more than a quarter of its lease, so that no claim expires while it waits.
LIMITER_WAIT_SECONDS = 20.0


# A 429's policyName says which window to wait out (DAILY: the account's midnight).
SHORT_WINDOWS = {"TEN_SECONDLY_ROLLING": 10.0, "SECONDLY": 1.0}


def build(
    config: Config,
    settings: Settings,
    limiter: Limiter,
    on_headroom: Callable[[Headroom], None] | None = None,
) -> HubSpotDestination:
    """The adapter of one HubSpot destination (the registry's entry point)."""
    return HubSpotDestination(settings, limiter, name=config.name, on_rate_limit_info=on_headroom)


def rate_limit_wait(
    policy: str | None, retry_after: float | None, *, now: datetime, timezone: str
) -> float:
    """Seconds a 429 asks us to wait: ``Retry-After``, else the window its policy names."""
    if retry_after is not None:
        return max(0.0, retry_after)
    if policy == "DAILY":
        local = now.astimezone(ZoneInfo(timezone))
        midnight = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return (midnight - local).total_seconds() + 1
    return SHORT_WINDOWS.get(policy or "", 10.0)


def load_property_map(path: str | None) -> dict[str, str]:
    """The Auth0 field -> HubSpot property map: a JSON file, or the default."""
    return read_property_map(path, DEFAULT_PROPERTY_MAP, "HUBSPOT_PROPERTY_MAP")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def map_properties(profile: dict[str, Any], mapping: dict[str, str]) -> dict[str, str]:
    """HubSpot properties for an Auth0 user: every mapped one, ``""`` when absent.

    The email is lowercased (HubSpot compares it so) and must be text to count.
    """
    properties = {prop: _text(profile_field(profile, field_)) for field_, prop in mapping.items()}
    if "email" in mapping:
        value = profile.get("email")
        properties[mapping["email"]] = value.strip().lower() if isinstance(value, str) else ""
    return properties


def properties_hash(properties: dict[str, str]) -> str:
    """A stable fingerprint of what was sent, to skip sending it twice."""
    return hashlib.sha256(json.dumps(properties, sort_keys=True).encode()).hexdigest()


@dataclass
class _Write:
    """One input of a batch call, and how to read its result."""

    intent: Intent
    target: str  # contact id (update, archive) or email (create)
    properties: dict[str, str] = field(default_factory=dict)
    adopted: bool = False  # found by email rather than linked
    linked: bool = False  # the target is the link's own id (a 404 means: relink)
    archive: bool = False  # a verification of an archive rather than an update


@dataclass
class _Plan:
    updates: list[_Write] = field(default_factory=list)
    creates: list[_Write] = field(default_factory=list)
    adoptions: list[_Write] = field(default_factory=list)  # found by a create's 409
    archives: list[_Write] = field(default_factory=list)
    lookups: list[Intent] = field(default_factory=list)
    verifies: list[_Write] = field(default_factory=list)  # read back, then write if needed
    relinks: list[Intent] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)  # contact ids and emails in this batch


class HubSpotDestination:
    """The HubSpot adapter: plans batch calls for intents and reads their answers."""

    def __init__(
        self,
        settings: Settings,
        limiter: Limiter,
        *,
        name: str = "hubspot",
        client: HubSpotClient | None = None,
        on_rate_limit_info: Callable[[Headroom], None] | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        config = settings.destination(name)
        assert isinstance(config, Config), f"{name} is not a HubSpot destination"
        self.config = config
        self.limiter = limiter
        self.mapping = load_property_map(config.property_map)
        self.batch_size = config.batch_size
        self.limiter_wait = min(LIMITER_WAIT_SECONDS, settings.lease_seconds / 4)
        self._records: list[CallRecord] = []
        self._deadline = float("inf")
        self._uncertain: set[str] = set()  # intent keys of writes whose answer never came
        self._on_rate_limit_info = on_rate_limit_info
        self.client = client or HubSpotClient(
            config.base_url,
            config.token or "",
            timeout=(config.connect_timeout_seconds, config.timeout_seconds),
            on_call=self._record,
        )

    clears_with = ""  # HubSpot clears a property with the empty string

    def close(self) -> None:
        self.client.close()

    def read(self, external_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Contacts by id with the mapped properties; merged ids answer with the survivor."""
        names = sorted(set(self.mapping.values()) | {self.config.deprovision_property})
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(external_ids), BATCH_LIMIT):
            self.limiter.acquire(self.limiter_wait)
            chunk = external_ids[start : start + BATCH_LIMIT]
            for contact_id, contact in self.client.batch_read(chunk, names).items():
                found[contact_id] = dict(contact.get("properties") or {})
        return found

    def _record(self, record: CallRecord, info: RateLimitInfo | None) -> None:
        self._records.append(record)
        if info is not None and self._on_rate_limit_info is not None:
            self._on_rate_limit_info(info)
        if info is not None and info.remaining == 0 and info.interval_ms:
            self._window_spent(info.interval_ms / 1000)

    def _window_spent(self, interval: float) -> None:
        """HubSpot says no request is left in its window.

        When our own window agrees (it is full too), it already paces the next
        request. When it still has room, someone else spends this app's budget
        (another integration, a second idsync): then everyone waits the window out.
        """
        if self.limiter.wait_for_capacity(timeout=0):
            self.limiter.block_for(interval)

    # Planning

    def desired_properties(self, user: UserState) -> dict[str, str]:
        """The mapped properties, plus the deprovisioning mark in ``mark`` mode.

        Marking a user sets the mark alone: a delete often carries no profile at
        all, and an empty snapshot must not wipe the contact it marks.
        """
        if self.config.deprovision == "mark" and user.deprovisioned:
            return {self.config.deprovision_property: "true"}
        properties = map_properties(user.profile, self.mapping)
        if self.config.deprovision == "mark":
            properties[self.config.deprovision_property] = ""
        return properties

    def _contact_id(self, intent: Intent) -> str | None:
        """The contact the link points at: a marked contact still belongs to its user."""
        if self.config.deprovision == "mark":
            return intent.link.external_id
        return intent.link.live_id

    def _plan(self, intent: Intent, plan: _Plan, outcomes: dict[str, Outcome]) -> None:
        user, link = intent.user, intent.link
        contact_id = self._contact_id(intent)
        archiving = user.deprovisioned and self.config.deprovision == "archive"
        if link.uncertain and contact_id:
            # An earlier write may have landed late: read back, then write what differs.
            properties = {} if archiving else self.desired_properties(user)
            write = _Write(intent, contact_id, properties, linked=True, archive=archiving)
            self._take(plan, plan.verifies, write, outcomes)
            return
        if link.uncertain:
            plan.lookups.append(intent)  # a create may have landed: look before creating
            return
        if archiving:
            if contact_id:
                self._take(plan, plan.archives, _Write(intent, contact_id, linked=True), outcomes)
            elif link.deprovisioned and link.external_id:
                outcomes[intent.key] = self._success(intent, link.external_id, note="unchanged")
            else:
                plan.lookups.append(intent)
            return
        properties = self.desired_properties(intent.user)
        if contact_id:
            if properties_hash(properties) == link.properties_hash and not intent.force:
                outcomes[intent.key] = self._success(intent, contact_id, note="unchanged")
                return
            write = _Write(intent, contact_id, properties, linked=True)
            self._take(plan, plan.updates, write, outcomes)
        elif not user.deprovisioned and not (user.email or user.previous_email):
            outcomes[intent.key] = Outcome(Verdict.SKIPPED, reason="no_email")
        elif not user.deprovisioned and user.email and user.previous_email in (None, user.email):
            self._take(plan, plan.creates, _Write(intent, user.email, properties), outcomes)
        else:
            plan.lookups.append(intent)

    def _take(
        self, plan: _Plan, queue: list[_Write], write: _Write, outcomes: dict[str, Outcome]
    ) -> None:
        """Queue a write unless the batch already touches that contact or email."""
        keys = {write.target, write.properties.get("email", "")} - {""}
        if keys & plan.taken:
            outcomes[write.intent.key] = Outcome(
                Verdict.RETRY,
                reason="busy_contact",
                message="another user in this batch touches the same contact",
                counts_against_budget=False,
                retry_after=1.0,
            )
            return
        plan.taken |= keys
        queue.append(write)

    def _resolve_lookups(
        self, plan: _Plan, outcomes: dict[str, Outcome], claim: ContactClaim
    ) -> None:
        """Find unlinked users' contacts by email, then adopt, create or archive."""
        emails = sorted({e for i in plan.lookups for e in self._emails(i) if e})
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(emails), BATCH_LIMIT):
            chunk = emails[start : start + BATCH_LIMIT]
            keys = [i.key for i in plan.lookups if set(self._emails(i)) & set(chunk)]
            found |= self._read_by_email(keys, chunk)
        for intent in plan.lookups:
            match = next((found[e] for e in self._emails(intent) if e in found), None)
            self._plan_found(intent, match, plan, outcomes, claim)

    def _read_by_email(self, keys: list[str], emails: list[str]) -> dict[str, dict[str, Any]]:
        """Contacts by email; a 400 is split until the email HubSpot refuses is alone."""
        try:
            found: dict[str, dict[str, Any]] = self._call(
                keys, lambda: self.client.batch_read_by_email(emails)
            )
        except (HubSpotBadRequest, HubSpotNotFound, HubSpotConflict):
            if len(emails) == 1:
                return {}  # unreadable is absent: the write that follows reports why
            middle = len(emails) // 2
            return self._read_by_email(keys, emails[:middle]) | self._read_by_email(
                keys, emails[middle:]
            )
        return found

    def _emails(self, intent: Intent) -> list[str]:
        user = intent.user
        ordered = (
            [user.email, user.previous_email]
            if user.deprovisioned
            else [user.previous_email, user.email]
        )
        if intent.link.uncertain:
            ordered.append(intent.link.last_email)  # where a create with no answer went
        return list(dict.fromkeys(email for email in ordered if email))

    def _plan_found(
        self,
        intent: Intent,
        contact: dict[str, Any] | None,
        plan: _Plan,
        outcomes: dict[str, Outcome],
        claim: ContactClaim,
    ) -> None:
        user = intent.user
        if contact is not None and not claim(intent.key, str(contact["id"])):
            outcomes[intent.key] = _owned(str(contact["id"]))
            return
        if contact is None:
            if intent.link.settling_for > 0:
                # A create with no answer may still land: creating now could make a twin.
                outcomes[intent.key] = Outcome(
                    Verdict.RETRY,
                    reason="settling",
                    message="an earlier write may still land; waiting before creating",
                    counts_against_budget=False,
                    retry_after=intent.link.settling_for,
                )
            elif user.deprovisioned:
                outcomes[intent.key] = Outcome(
                    Verdict.SUCCEEDED, reason="not_found", deprovisioned=True
                )
            elif user.email is None:
                outcomes[intent.key] = Outcome(Verdict.SKIPPED, reason="no_email")
            else:
                properties = self.desired_properties(user)
                self._take(plan, plan.creates, _Write(intent, user.email, properties), outcomes)
            return
        contact_id = str(contact["id"])
        if user.deprovisioned and self.config.deprovision == "archive":
            self._take(plan, plan.archives, _Write(intent, contact_id, adopted=True), outcomes)
            return
        write = _Write(intent, contact_id, self.desired_properties(user), adopted=True)
        self._take(plan, plan.updates, write, outcomes)

    # Sending

    def deliver(
        self, intents: list[Intent], *, claim: ContactClaim, deadline: float
    ) -> dict[str, Outcome]:
        """Bring each intent's user to its newest state in HubSpot, starting no call after
        ``deadline``."""
        outcomes: dict[str, Outcome] = {}
        calls: dict[str, list[CallSummary]] = {i.key: [] for i in intents}
        self._calls = calls
        self._deadline = deadline
        self._uncertain = set()
        pending = intents
        for _pass in range(2):  # the second pass re-plans users whose contact was deleted
            plan = _Plan()
            for intent in pending:
                self._plan(intent, plan, outcomes)
            self._run(plan, outcomes, claim)
            pending = [self._unlinked(intent) for intent in plan.relinks]
            if not pending:
                break
        for intent in pending:
            outcomes[intent.key] = Outcome(
                Verdict.RETRY, reason="relink", message="linked contact vanished twice"
            )
        for intent in intents:
            outcome = outcomes[intent.key]
            outcome.calls = calls.get(intent.key, [])
            if intent.key in self._uncertain:
                outcome.uncertain = True
                outcome.email = outcome.email or intent.user.email
        return outcomes

    @staticmethod
    def _unlinked(intent: Intent) -> Intent:
        link = LinkState(
            last_email=intent.link.last_email,
            uncertain=intent.link.uncertain,
            settling_for=intent.link.settling_for,
        )
        return Intent(key=intent.key, user=intent.user, link=link, force=intent.force)

    def _run(self, plan: _Plan, outcomes: dict[str, Outcome], claim: ContactClaim) -> None:
        try:
            if plan.verifies:
                self._read_back(plan, outcomes)
            if plan.lookups:
                self._resolve_lookups(plan, outcomes, claim)
            self._send_updates(plan, plan.updates, outcomes)
            self._send_creates(plan, plan.creates, outcomes, claim)
            self._send_updates(plan, plan.adoptions, outcomes)
            self._send_archives(plan, plan.archives, outcomes)
        except _BatchAborted as aborted:
            for intent in self._unfinished(plan, outcomes):
                outcomes[intent.key] = aborted.outcome()
            plan.relinks.clear()
        except Exception as error:
            # A bug or an answer of a shape nobody foresaw must not strand the batch:
            # whatever has no outcome yet is tried again, and the error is on record.
            log.exception("HubSpot batch failed unexpectedly")
            outcome = _unexpected(error)
            note = CallSummary(
                "(no answer to record)", None, 0.0, "UNEXPECTED_ERROR", outcome.message
            )
            for intent in self._unfinished(plan, outcomes):
                outcomes[intent.key] = outcome
                self._calls.setdefault(intent.key, []).append(note)
            plan.relinks.clear()

    def _unfinished(self, plan: _Plan, outcomes: dict[str, Outcome]) -> list[Intent]:
        writes = plan.verifies + plan.updates + plan.creates + plan.adoptions + plan.archives
        queued = [w.intent for w in writes]
        return [i for i in plan.lookups + queued + plan.relinks if i.key not in outcomes]

    def _read_back(self, plan: _Plan, outcomes: dict[str, Outcome]) -> None:
        """Read uncertain users' contacts; write only where HubSpot differs from the intent."""
        names = sorted({name for write in plan.verifies for name in write.properties})
        for start in range(0, len(plan.verifies), BATCH_LIMIT):
            chunk = plan.verifies[start : start + BATCH_LIMIT]
            ids = [write.target for write in chunk]
            found: dict[str, dict[str, Any]] = self._call(
                [w.intent.key for w in chunk], partial(self.client.batch_read, ids, names)
            )
            for write in chunk:
                contact = found.get(write.target)
                if write.archive and contact is None:
                    outcomes[write.intent.key] = self._success(
                        write.intent, write.target, note="verified", deprovisioned=True
                    )
                elif write.archive:
                    plan.archives.append(write)
                elif contact is None:
                    plan.relinks.append(write.intent)
                elif _holds(contact, write.properties):
                    outcomes[write.intent.key] = self._success(
                        write.intent,
                        str(contact["id"]),
                        note="verified",
                        properties=write.properties,
                    )
                else:
                    plan.updates.append(write)

    def _send_updates(
        self, plan: _Plan, writes: list[_Write], outcomes: dict[str, Outcome]
    ) -> None:
        def call(chunk: list[_Write]) -> BatchResult:
            return self.client.batch_update([(w.intent.key, w.target, w.properties) for w in chunk])

        for write, result in self._batches(writes, call, outcomes):
            if isinstance(result, HubSpotNotFound) and write.linked:
                plan.relinks.append(write.intent)
            elif isinstance(result, HubSpotConflict):
                outcomes[write.intent.key] = self._failure(result, "email_conflict")
            elif isinstance(result, HubSpotNotFound):
                outcomes[write.intent.key] = self._failure(result, "not_found")
            elif isinstance(result, HubSpotError):
                outcomes[write.intent.key] = self._error_outcome(result)
            else:
                contact_id = str(result["id"])
                created = None if write.linked else False
                outcomes[write.intent.key] = self._success(
                    write.intent, contact_id, properties=write.properties, created=created
                )

    def _send_creates(
        self, plan: _Plan, writes: list[_Write], outcomes: dict[str, Outcome], claim: ContactClaim
    ) -> None:
        def call(chunk: list[_Write]) -> BatchResult:
            return self.client.batch_create([(w.intent.key, w.target, w.properties) for w in chunk])

        for write, result in self._batches(writes, call, outcomes):
            if isinstance(result, HubSpotConflict) and result.existing_id:
                self._adopt(plan, write, result.existing_id, outcomes, claim)
            elif isinstance(result, HubSpotError):
                outcomes[write.intent.key] = self._error_outcome(result)
            else:
                outcomes[write.intent.key] = self._success(
                    write.intent, str(result["id"]), properties=write.properties, created=True
                )

    def _adopt(
        self,
        plan: _Plan,
        write: _Write,
        contact_id: str,
        outcomes: dict[str, Outcome],
        claim: ContactClaim,
    ) -> None:
        """The email belongs to an existing contact: update it, unless another user holds it."""
        if not claim(write.intent.key, contact_id):
            outcomes[write.intent.key] = _owned(contact_id)
            return
        plan.adoptions.append(_Write(write.intent, contact_id, write.properties, adopted=True))

    def _send_archives(
        self, plan: _Plan, writes: list[_Write], outcomes: dict[str, Outcome]
    ) -> None:
        def call(chunk: list[_Write]) -> BatchResult:
            self.client.batch_archive([w.target for w in chunk])
            return BatchResult(results={w.intent.key: {"id": w.target} for w in chunk})

        for write, result in self._batches(writes, call, outcomes):
            if isinstance(result, HubSpotError):
                outcomes[write.intent.key] = self._error_outcome(result)
            else:
                outcomes[write.intent.key] = self._success(
                    write.intent,
                    write.target,
                    deprovisioned=True,
                    created=None if write.linked else False,
                )

    def _batches(
        self,
        writes: list[_Write],
        call: Callable[[list[_Write]], BatchResult],
        outcomes: dict[str, Outcome],
    ) -> Iterable[tuple[_Write, Any]]:
        """Each write with its result or error, splitting whole-batch 400s in halves."""
        for start in range(0, len(writes), self.batch_size):
            yield from self._batch(writes[start : start + self.batch_size], call)

    def _batch(
        self, chunk: list[_Write], call: Callable[[list[_Write]], BatchResult]
    ) -> Iterable[tuple[_Write, Any]]:
        try:
            result = self._call([w.intent.key for w in chunk], lambda: call(chunk), write=True)
        except (HubSpotBadRequest, HubSpotNotFound, HubSpotConflict) as error:
            if isinstance(error, HubSpotBadRequest) and error.missing_property:
                raise _BatchAborted(error) from error
            if len(chunk) == 1:
                yield chunk[0], error
                return
            # One bad input fails a whole batch that HubSpot could not split itself.
            middle = len(chunk) // 2
            yield from self._batch(chunk[:middle], call)
            yield from self._batch(chunk[middle:], call)
            return
        for write in chunk:
            key = write.intent.key
            if key in result.errors:
                self._note_input_error(key, result.errors[key])
                yield write, result.errors[key]
            elif key in result.results:
                yield write, result.results[key]
            else:
                yield write, HubSpotError("HubSpot returned no result for this input")

    def _note_input_error(self, key: str, error: HubSpotError) -> None:
        """A 207 answers 2xx for the call: record this input's own error on its attempt."""
        calls = self._calls.get(key)
        if calls:
            calls[-1] = replace(
                calls[-1],
                status=error.status or calls[-1].status,
                error_category=error.category or "INPUT_ERROR",
                response_excerpt=_message(error)[:500],
            )

    def _call(self, keys: list[str], send: Callable[[], Any], *, write: bool = False) -> Any:
        """Send one request under the shared rate limit, recording it for ``keys``.

        No request starts after the batch deadline, and none waits past it for a slot.
        """
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _BatchAborted(BatchDeadline())
        try:
            self.limiter.acquire(min(self.limiter_wait, left))
        except LimiterTimeout as error:
            raise _BatchAborted(error) from error
        if time.monotonic() >= self._deadline:
            raise _BatchAborted(BatchDeadline())
        self._records.clear()
        try:
            return send()
        except HubSpotTransportError as error:
            if write and error.maybe_applied:
                self._uncertain.update(keys)
            raise _BatchAborted(error) from error
        except HubSpotRateLimited as error:
            wait = self._rate_limit_wait(error)
            self.limiter.block_for(wait)
            raise _BatchAborted(error, wait) from error
        except (HubSpotAuthError, HubSpotBadRequest) as error:
            if isinstance(error, HubSpotBadRequest) and not error.missing_property:
                raise
            raise _BatchAborted(error) from error
        except (HubSpotNotFound, HubSpotConflict):
            raise
        except HubSpotError as error:  # transport, 5xx, 423
            raise _BatchAborted(error) from error
        finally:
            for record in self._records:
                summary = _summary(record)
                for key in keys:
                    self._calls.setdefault(key, []).append(summary)

    def _rate_limit_wait(self, error: HubSpotRateLimited) -> float:
        return rate_limit_wait(
            error.policy_name,
            error.retry_after,
            now=datetime.now(UTC),
            timezone=self.config.timezone,
        )

    # Outcomes

    def _success(
        self,
        intent: Intent,
        contact_id: str,
        *,
        note: str | None = None,
        properties: dict[str, str] | None = None,
        created: bool | None = None,
        deprovisioned: bool | None = None,
    ) -> Outcome:
        return Outcome(
            Verdict.SUCCEEDED,
            reason=note,
            external_id=contact_id,
            created=created,
            properties_hash=properties_hash(properties)
            if properties
            else intent.link.properties_hash,
            email=(properties or {}).get("email") or intent.user.email or intent.link.last_email,
            deprovisioned=intent.user.deprovisioned if deprovisioned is None else deprovisioned,
        )

    @staticmethod
    def _failure(error: HubSpotError, reason: str) -> Outcome:
        return Outcome(
            Verdict.FAILED,
            reason=reason,
            message=_message(error),
            status_code=error.status,
        )

    def _error_outcome(self, error: HubSpotError) -> Outcome:
        if isinstance(error, HubSpotBadRequest) and error.missing_property:
            return _BatchAborted(error).outcome()  # the mapping is wrong, not the user
        if isinstance(error, HubSpotBadRequest):
            return self._failure(error, "rejected")
        if isinstance(error, HubSpotConflict):
            return self._failure(error, "email_conflict")
        return _BatchAborted(error).outcome()

    def record_hash(self, record: dict[str, Any], *, deprovisioned: bool) -> str:
        """The ``properties_hash`` a link would hold for a contact read back (reconcile).

        Normalised as ``desired_properties`` builds what is sent: every mapped
        property (absent: ``""``), the email lowercased, and in ``mark`` mode the
        mark alone for a deprovisioned user.
        """
        if self.config.deprovision == "mark" and deprovisioned:
            names = [self.config.deprovision_property]
        else:
            names = list(dict.fromkeys(self.mapping.values()))
            if self.config.deprovision == "mark":
                names.append(self.config.deprovision_property)
        properties = {name: _text(record.get(name)) for name in names}
        email = self.mapping.get("email")
        if email in properties:
            properties[email] = properties[email].strip().lower()
        return properties_hash(properties)

    def probe(self) -> str | None:
        """Whether HubSpot accepts the token and knows every mapped property; None when so."""
        problem = self.config.missing()
        if problem:
            return problem
        try:
            self.limiter.acquire(self.limiter_wait)
            self.client.get_contact_by_email("idsync-probe@example.invalid")
            return self._missing_properties()
        except (HubSpotAuthError, HubSpotBadRequest) as error:
            return _message(error)
        except (HubSpotError, LimiterTimeout) as error:
            return f"unreachable: {error}"

    def _missing_properties(self) -> str | None:
        """Which mapped properties HubSpot does not have (reading them needs a scope)."""
        names = list(dict.fromkeys(self.mapping.values()))
        if self.config.deprovision == "mark":
            names.append(self.config.deprovision_property)
        missing = []
        for name in names:
            self.limiter.acquire(self.limiter_wait)
            try:
                if self.client.get_property(name) is None:
                    missing.append(name)
            except HubSpotAuthError as error:
                # A token without crm.schemas.contacts.read still syncs contacts.
                log.warning("cannot verify the mapping: %s", _message(error))
                return None
        if missing:
            return f"PROPERTY_DOESNT_EXIST: HubSpot has no contact properties {missing}"
        return None


class BatchDeadline(Exception):
    """The batch reached its deadline: no further call may start inside its lease."""

    def __init__(self) -> None:
        super().__init__("the batch reached its deadline before this call could start")


def _owned(contact_id: str) -> Outcome:
    return Outcome(
        Verdict.FAILED,
        reason="contact_owned",
        message=f"contact {contact_id} belongs to another user's link",
    )


def _unexpected(error: Exception) -> Outcome:
    return Outcome(
        Verdict.RETRY,
        reason="unexpected_error",
        message=scrub(f"{type(error).__name__}: {error}")[:1000],
    )


def _holds(contact: dict[str, Any], properties: dict[str, str]) -> bool:
    """Whether the contact already has every property as ``properties`` wants it."""
    current = contact.get("properties") or {}
    return all(
        (current.get(name) or "").lower() == value
        if name == "email"
        else (current.get(name) or "") == value
        for name, value in properties.items()
    )


class _BatchAborted(Exception):
    """A whole call failed: every unfinished intent of the batch shares its fate."""

    def __init__(self, error: Exception, wait: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.wait = wait

    def outcome(self) -> Outcome:
        error = self.error
        if isinstance(error, BatchDeadline):
            return Outcome(
                Verdict.RETRY,
                reason="batch_deadline",
                message=str(error),
                counts_against_budget=False,
                retry_after=0.0,
            )
        if isinstance(error, LimiterTimeout):
            return Outcome(
                Verdict.RETRY,
                reason="limiter_busy",
                message=str(error),
                counts_against_budget=False,
                retry_after=5.0,
            )
        assert isinstance(error, HubSpotError)
        if isinstance(error, HubSpotRateLimited):
            return Outcome(
                Verdict.RETRY,
                reason=f"rate_limited:{error.policy_name or 'unknown'}",
                message=_message(error),
                status_code=error.status,
                counts_against_budget=False,
                retry_after=self.wait,
            )
        if isinstance(error, HubSpotAuthError) or (
            isinstance(error, HubSpotBadRequest) and error.missing_property
        ):
            return Outcome(
                Verdict.PAUSE,
                reason="misconfigured",
                message=_message(error),
                status_code=error.status,
                counts_against_budget=False,
            )
        if isinstance(error, HubSpotBadRequest | HubSpotNotFound | HubSpotConflict):
            return Outcome(
                Verdict.FAILED, reason="rejected", message=_message(error), status_code=error.status
            )
        category = "timeout_or_connection" if error.status is None else "server_error"
        return Outcome(
            Verdict.RETRY, reason=category, message=_message(error), status_code=error.status
        )


def _message(error: Exception) -> str:
    """HubSpot's message and correlation id, masked for storage."""
    text = getattr(error, "message", None) or str(error)
    correlation = getattr(error, "correlation_id", None)
    if correlation:
        text = f"{text} (correlationId {correlation})"
    return scrub(text)[:1000]


def _summary(record: CallRecord) -> CallSummary:
    return CallSummary(
        request=f"{record.method} {record.path}"[:255],
        status=record.status,
        duration_ms=record.duration_ms,
        error_category=record.error_category,
        response_excerpt=scrub(record.response_excerpt) if record.response_excerpt else None,
    )
