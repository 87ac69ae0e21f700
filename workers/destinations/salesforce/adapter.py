"""Salesforce CRM: keep one Contact (or Lead) per Auth0 user, keyed by an External ID field.

The rules (README.md, section "Salesforce"; facts from ``shared/reference/destinations.md``
and developer.salesforce.com, cited where used):

- A new user is created with an sObject Collections upsert keyed by the External
  ID field that holds the Auth0 ``user_id``: a repeated or late create finds the
  same record. A linked user is updated by the record's ``Id`` (the External ID
  written again with it), so an email change follows the person; a linked
  record deleted in Salesforce is created again.
- A user with no link yet first looks for a record the sales team made: one
  with the user's email and an empty External ID. One match is claimed and
  updated by its ``Id`` with the External ID set (so the next upsert finds it);
  several end ``failed: ambiguous_match`` for a human; none means a create.
- ``LastName`` (and a Lead's ``Company``) is required: a create without one is
  filled from the profile's ``name``, then the email's local part; a record
  that exists keeps its own, never overwritten by that fallback nor cleared.
- Deprovisioning (a delete, or ``blocked: true``) sets a checkbox (``mark``) or
  deletes the record (``delete``); a user never linked is skipped, nothing created.
- The newest event is the whole truth for the mapped fields: absent ones are
  cleared with JSON ``null``; an unchanged profile is skipped without a call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from idsync.logs import mask_email, scrub
from workers.destinations.base import (
    CallSummary,
    ContactClaim,
    Headroom,
    Intent,
    Limiter,
    LimiterTimeout,
    Outcome,
    UserState,
    Verdict,
)
from workers.destinations.mapping import profile_field
from workers.destinations.salesforce.client import (
    COLLECTION_LIMIT,
    CallRecord,
    SalesforceAuthError,
    SalesforceBadRequest,
    SalesforceClient,
    SalesforceError,
    SalesforceLimitExceeded,
    SalesforceMisconfigured,
    SalesforceTransportError,
)
from workers.destinations.salesforce.settings import Config

if TYPE_CHECKING:
    from idsync.settings import Settings

log = logging.getLogger(__name__)

# A worker holding claims waits at most this long for a request slot, and never
# more than a quarter of its lease, so that no claim expires while it waits.
LIMITER_WAIT_SECONDS = 20.0
# The cap on concurrent long-running calls frees up within seconds, not hours.
CONCURRENT_LIMIT_WAIT_SECONDS = 5.0
# Emails per SOQL lookup: keeps the query's URL far below Salesforce's 16 KB.
EMAILS_PER_QUERY = 100
FALLBACK_LAST_NAME = "Unknown"
# Per-record codes that mean the mapping is wrong, not the user ("Status Codes
# and Error Responses"): the destination pauses.
MISCONFIGURED_RECORD_CODES = frozenset({"INVALID_FIELD", "INVALID_FIELD_FOR_INSERT_UPDATE"})
# Per-record codes worth another try: a record locked by another transaction.
TRANSIENT_RECORD_CODES = frozenset({"UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE"})
# Per-record codes that say the record is gone (deleted, or never was).
GONE_RECORD_CODES = frozenset({"ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY", "NOT_FOUND"})


def build(
    config: Config,
    settings: Settings,
    limiter: Limiter,
    on_headroom: Callable[[Headroom], None] | None = None,
) -> SalesforceDestination:
    """The adapter of one Salesforce destination (the registry's entry point)."""
    return SalesforceDestination(
        config,
        limiter,
        limiter_wait=min(LIMITER_WAIT_SECONDS, settings.lease_seconds / 4),
        on_headroom=on_headroom,
    )


def fields_hash(values: dict[str, Any]) -> str:
    """A stable fingerprint of the fields a user should have, to skip sending them twice."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def soql_literal(text: str) -> str:
    """``text`` as a quoted SOQL string ("Quoted String Escape Sequences")."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass
class _Write:
    """One record of a Collections call, and what it means for its intent."""

    intent: Intent
    values: dict[str, Any]  # the fields to send
    digest: str  # the hash of the user's mapped fields, kept in the link
    target: str | None = None  # the record id: an update, a delete, or the linked record
    adopted: bool = False  # found by email rather than linked
    deprovision: bool = False  # a mark or a delete


@dataclass
class _Plan:
    upserts: list[_Write] = field(default_factory=list)
    updates: list[_Write] = field(default_factory=list)
    deletes: list[_Write] = field(default_factory=list)
    lookups: list[Intent] = field(default_factory=list)  # unlinked, live: adopt by email?
    recoveries: list[Intent] = field(default_factory=list)  # unlinked, an answer was lost
    taken: set[str] = field(default_factory=set)  # record ids and external ids in this batch

    def unfinished(self, outcomes: dict[str, Outcome]) -> list[Intent]:
        writes = self.upserts + self.updates + self.deletes
        queued = self.lookups + self.recoveries + [w.intent for w in writes]
        return [intent for intent in queued if intent.key not in outcomes]


class _Aborted(Exception):
    """A whole call failed: every unfinished intent of the batch gets ``outcome``."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome


class SalesforceDestination:
    """The Salesforce adapter: plans Collections calls for intents and reads their results."""

    # An absent mapped field is cleared with JSON null.
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
        self.batch_size = min(config.batch_size, COLLECTION_LIMIT)
        self.mapping = config.mapping()
        self.sobject = config.object
        self.required = ["LastName", "Company"] if config.object == "Lead" else ["LastName"]
        self._on_headroom = on_headroom
        self._deadline = float("inf")
        self._records: list[CallRecord] = []
        self._calls: dict[str, list[CallSummary]] = {}
        self._uncertain: set[str] = set()
        self.client = SalesforceClient(
            config.login_url or "",
            config.client_id or "",
            config.client_secret or "",
            config.api_version,
            timeout=(config.connect_timeout_seconds, config.timeout_seconds),
            before_request=self._gate,
            on_call=self._record,
        )

    def __repr__(self) -> str:
        return f"SalesforceDestination(name={self.name!r}, object={self.sobject!r})"

    def close(self) -> None:
        self.client.close()

    # The engine's entry points

    def deliver(
        self, intents: list[Intent], *, claim: ContactClaim, deadline: float
    ) -> dict[str, Outcome]:
        """Bring each intent's user to its newest state, starting no call after ``deadline``."""
        problem = self.config.missing()
        if problem:
            return {i.key: _pause("not_configured", problem) for i in intents}
        outcomes: dict[str, Outcome] = {}
        self._calls = {intent.key: [] for intent in intents}
        self._uncertain = set()
        self._deadline = deadline
        plan = _Plan()
        for intent in intents:
            self._plan(intent, plan, outcomes)
        try:
            self._run(plan, outcomes, claim)
        except _Aborted as aborted:
            for intent in plan.unfinished(outcomes):
                outcomes[intent.key] = _copy(aborted.outcome)
        except Exception as error:
            # A bug or an answer of a shape nobody foresaw must not strand the batch.
            log.exception("Salesforce batch failed unexpectedly")
            message = scrub(f"{type(error).__name__}: {error}")[:1000]
            for intent in plan.unfinished(outcomes):
                outcomes[intent.key] = Outcome(
                    Verdict.RETRY, reason="unexpected_error", message=message
                )
        finally:
            self._deadline = float("inf")
        for intent in intents:
            outcome = outcomes[intent.key]
            outcome.calls = self._calls.get(intent.key, [])
            if intent.key in self._uncertain:
                outcome.uncertain = True
                outcome.email = outcome.email or intent.user.email
        return outcomes

    def probe(self) -> str | None:
        """None when a fresh token works and the object has every field idsync writes."""
        problem = self.config.missing()
        if problem:
            return problem
        try:
            self.client.forget_token()
            self.client.token()
            described = self.client.describe(self.sobject)
        except (SalesforceAuthError, SalesforceMisconfigured) as error:
            return _message(error)
        except (SalesforceError, _Aborted) as error:
            return f"unreachable: {error}"
        return self._field_problem(described)

    def read(self, external_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Records by id with the fields idsync writes; absent: no such record."""
        names = list(dict.fromkeys(["Id", *self._written_fields()]))
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(external_ids), COLLECTION_LIMIT):
            chunk = external_ids[start : start + COLLECTION_LIMIT]
            records = self.client.retrieve(self.sobject, chunk, names)
            for asked, record in zip(chunk, records, strict=True):
                if record is not None:
                    found[asked] = {k: v for k, v in record.items() if k != "attributes"}
        return found

    # Planning

    def desired_fields(self, user: UserState) -> dict[str, Any]:
        """The mapped fields (None when absent), the External ID, and the mark if any."""
        values = {
            target: _value(profile_field(user.profile, source))
            for source, target in self.mapping.items()
        }
        if "email" in self.mapping:
            values[self.mapping["email"]] = user.email
        values[self.config.external_id_field] = user.subject
        if self.config.deprovision == "mark":
            values[self.config.deprovision_field] = False
        return values

    def _plan(self, intent: Intent, plan: _Plan, outcomes: dict[str, Outcome]) -> None:
        user, link = intent.user, intent.link
        if user.deprovisioned:
            self._plan_deprovision(intent, plan, outcomes)
            return
        values = self.desired_fields(user)
        digest = fields_hash(values)
        record_id = link.external_id if self.config.deprovision == "mark" else link.live_id
        if record_id and not link.deprovisioned and _unchanged(intent, digest):
            outcomes[intent.key] = Outcome(Verdict.SKIPPED, reason="unchanged")
        elif record_id:
            # By its Id, the External ID included: a record whose adoption failed half-way
            # (claimed, External ID not yet written) is healed, never duplicated.
            write = _Write(intent, self._for_existing(values), digest, target=record_id)
            self._take(plan, plan.updates, write, outcomes)
        elif link.uncertain:
            plan.recoveries.append(intent)  # a create may have landed: find it first
        elif user.email or user.previous_email:
            plan.lookups.append(intent)
        else:
            self._take(plan, plan.upserts, self._create(intent, values, digest), outcomes)

    def _plan_deprovision(self, intent: Intent, plan: _Plan, outcomes: dict[str, Outcome]) -> None:
        link = intent.link
        mark = {self.config.deprovision_field: True}
        digest = fields_hash(mark)
        if self.config.deprovision == "delete":
            if link.live_id:
                write = _Write(intent, {}, digest, target=link.live_id, deprovision=True)
                self._take(plan, plan.deletes, write, outcomes)
                return
            if link.deprovisioned and link.external_id and not link.uncertain:
                outcomes[intent.key] = Outcome(Verdict.SKIPPED, reason="unchanged")
                return
        elif link.external_id:
            if link.deprovisioned and _unchanged(intent, digest):
                outcomes[intent.key] = Outcome(Verdict.SKIPPED, reason="unchanged")
                return
            write = _Write(intent, mark, digest, target=link.external_id, deprovision=True)
            self._take(plan, plan.updates, write, outcomes)
            return
        if link.uncertain and not link.external_id:
            plan.recoveries.append(intent)
            return
        # Never linked: nothing to mark or delete, and nothing is created for it.
        outcomes[intent.key] = Outcome(Verdict.SKIPPED, reason="never_linked")

    def _create(self, intent: Intent, values: dict[str, Any], digest: str) -> _Write:
        """An upsert that will create the record: required fields filled if absent."""
        record = dict(values)
        profile = intent.user.profile
        if "LastName" in self.required and not record.get("LastName"):
            record["LastName"] = _last_name(profile, intent.user.email)
        if "Company" in self.required and not record.get("Company"):
            record["Company"] = self.config.default_company
        return _Write(intent, record, digest)

    def _for_existing(self, values: dict[str, Any]) -> dict[str, Any]:
        """Fields for a record that exists: a required field is never cleared or replaced."""
        return {
            name: value
            for name, value in values.items()
            if not (name in self.required and value in (None, ""))
        }

    def _take(
        self, plan: _Plan, queue: list[_Write], write: _Write, outcomes: dict[str, Outcome]
    ) -> None:
        """Queue a write unless the batch already touches that record or External ID."""
        keys = {write.target or "", str(write.values.get(self.config.external_id_field) or "")}
        keys.discard("")
        if keys & plan.taken:
            outcomes[write.intent.key] = Outcome(
                Verdict.RETRY,
                reason="busy_record",
                message="another user in this batch touches the same record",
                counts_against_budget=False,
                retry_after=1.0,
            )
            return
        plan.taken |= keys
        queue.append(write)

    # Sending

    def _run(self, plan: _Plan, outcomes: dict[str, Outcome], claim: ContactClaim) -> None:
        if plan.recoveries:
            self._recover(plan, outcomes)
        if plan.lookups:
            self._adopt(plan, outcomes, claim)
        self._send(plan.upserts, outcomes, self._upsert_call)
        self._send(plan.updates, outcomes, self._update_call)
        self._send(self._recreates(plan.updates, outcomes), outcomes, self._upsert_call)
        self._send(plan.deletes, outcomes, self._delete_call)

    def _recover(self, plan: _Plan, outcomes: dict[str, Outcome]) -> None:
        """Users whose create may have landed unseen: look their External ID up first."""
        external = self.config.external_id_field
        found: dict[str, str] = {}
        for start in range(0, len(plan.recoveries), EMAILS_PER_QUERY):
            chunk = plan.recoveries[start : start + EMAILS_PER_QUERY]
            subjects = ", ".join(soql_literal(i.user.subject) for i in chunk)
            # Every literal is escaped by soql_literal; the names are validated settings.
            soql = f"SELECT Id, {external} FROM {self.sobject} WHERE {external} IN ({subjects})"  # noqa: S608
            shown = f"query: Id of {self.sobject} by {external}, {len(chunk)} ids"
            records = self._call(
                [i.key for i in chunk], partial(self.client.query, soql, shown=shown)
            )
            found |= {str(r.get(external) or "").lower(): str(r["Id"]) for r in records}
        for intent in plan.recoveries:
            record_id = found.get(intent.user.subject.lower())
            if record_id is None:
                self._plan_unlinked(intent, plan, outcomes)
            elif intent.user.deprovisioned and self.config.deprovision == "delete":
                write = _Write(intent, {}, fields_hash({}), target=record_id, deprovision=True)
                self._take(plan, plan.deletes, write, outcomes)
            elif intent.user.deprovisioned:
                mark = {self.config.deprovision_field: True}
                write = _Write(intent, mark, fields_hash(mark), target=record_id, deprovision=True)
                self._take(plan, plan.updates, write, outcomes)
            else:
                values = self.desired_fields(intent.user)
                write = _Write(
                    intent, self._for_existing(values), fields_hash(values), target=record_id
                )
                self._take(plan, plan.updates, write, outcomes)

    def _plan_unlinked(self, intent: Intent, plan: _Plan, outcomes: dict[str, Outcome]) -> None:
        if intent.user.deprovisioned:
            outcomes[intent.key] = Outcome(Verdict.SKIPPED, reason="never_linked")
        elif intent.user.email or intent.user.previous_email:
            plan.lookups.append(intent)
        else:
            values = self.desired_fields(intent.user)
            self._take(
                plan, plan.upserts, self._create(intent, values, fields_hash(values)), outcomes
            )

    def _adopt(self, plan: _Plan, outcomes: dict[str, Outcome], claim: ContactClaim) -> None:
        """Find records the sales team made by email (External ID empty); claim one, or create."""
        lookups = [i for i in plan.lookups if i.key not in outcomes]
        emails = sorted({e for i in lookups for e in _emails(i) if e})
        by_email: dict[str, list[dict[str, Any]]] = {}
        for start in range(0, len(emails), EMAILS_PER_QUERY):
            chunk = emails[start : start + EMAILS_PER_QUERY]
            keys = [i.key for i in lookups if set(_emails(i)) & set(chunk)]
            for record in self._call(keys, partial(self._find_by_email, chunk)):
                email = str(record.get("Email") or "").lower()
                by_email.setdefault(email, []).append(record)
        for intent in lookups:
            previous, current = intent.user.previous_email, intent.user.email
            matches = (by_email.get(previous or "") if previous else None) or by_email.get(
                current or "", []
            )
            values = self.desired_fields(intent.user)
            digest = fields_hash(values)
            if not matches:
                self._take(plan, plan.upserts, self._create(intent, values, digest), outcomes)
            elif len(matches) > 1:
                outcomes[intent.key] = self._ambiguous(intent, matches)
            elif not claim(intent.key, str(matches[0]["Id"])):
                outcomes[intent.key] = _owned(str(matches[0]["Id"]))
            else:
                write = _Write(
                    intent,
                    self._for_existing(values),
                    digest,
                    target=str(matches[0]["Id"]),
                    adopted=True,
                )
                self._take(plan, plan.updates, write, outcomes)

    def _find_by_email(self, emails: list[str]) -> list[dict[str, Any]]:
        """Records with these emails and no External ID ("SOQL SELECT Syntax"; Email
        comparisons in SOQL ignore case)."""
        listed = ", ".join(soql_literal(email) for email in emails)
        # Every literal is escaped by soql_literal; the names are validated settings.
        soql = (
            f"SELECT Id, Email, LastName FROM {self.sobject} WHERE Email IN ({listed}) "  # noqa: S608
            f"AND {self.config.external_id_field} = null"
        )
        shown = f"query: Id of {self.sobject} by Email, {len(emails)} emails"
        return self.client.query(soql, shown=shown)

    def _recreates(self, updates: list[_Write], outcomes: dict[str, Outcome]) -> list[_Write]:
        """Linked live users whose record was deleted in Salesforce: created again by
        upsert, with the required fields filled in as for any create."""
        again = []
        for write in updates:
            outcome = outcomes.get(write.intent.key)
            gone = outcome is not None and (outcome.reason or "").upper() in GONE_RECORD_CODES
            if gone and not (write.adopted or write.deprovision):
                del outcomes[write.intent.key]
                values = self.desired_fields(write.intent.user)
                again.append(self._create(write.intent, values, write.digest))
        return again

    def _upsert_call(self, writes: list[_Write]) -> list[dict[str, Any]]:
        records = [w.values for w in writes]
        return self.client.upsert(self.sobject, self.config.external_id_field, records)

    def _update_call(self, writes: list[_Write]) -> list[dict[str, Any]]:
        return self.client.update(self.sobject, [{"Id": w.target} | w.values for w in writes])

    def _delete_call(self, writes: list[_Write]) -> list[dict[str, Any]]:
        return self.client.delete([str(w.target) for w in writes])

    def _send(
        self,
        writes: list[_Write],
        outcomes: dict[str, Outcome],
        call: Callable[[list[_Write]], list[dict[str, Any]]],
    ) -> None:
        for start in range(0, len(writes), self.batch_size):
            for write, result in self._batch(writes[start : start + self.batch_size], call):
                outcomes[write.intent.key] = self._result_outcome(write, result)

    def _batch(
        self, chunk: list[_Write], call: Callable[[list[_Write]], list[dict[str, Any]]]
    ) -> Iterable[tuple[_Write, dict[str, Any] | SalesforceError]]:
        """Each write with its result; a whole-call 400 is split until its cause is alone."""
        try:
            results = self._call([w.intent.key for w in chunk], lambda: call(chunk), write=True)
        except SalesforceBadRequest as error:
            if len(chunk) == 1:
                yield chunk[0], error
                return
            middle = len(chunk) // 2
            yield from self._batch(chunk[:middle], call)
            yield from self._batch(chunk[middle:], call)
            return
        yield from zip(chunk, results, strict=True)

    def _call(self, keys: list[str], send: Callable[[], Any], *, write: bool = False) -> Any:
        """One logical call, its HTTP requests recorded for ``keys``; whole-call errors abort."""
        self._records.clear()
        try:
            return send()
        except SalesforceTransportError as error:
            if write and error.maybe_applied:
                self._uncertain.update(keys)
            raise _Aborted(_retry("timeout_or_connection", error)) from error
        except SalesforceLimitExceeded as error:
            raise _Aborted(self._limit_outcome(error)) from error
        except (SalesforceAuthError, SalesforceMisconfigured) as error:
            raise _Aborted(_pause("misconfigured", _message(error), error.status)) from error
        except SalesforceBadRequest:
            raise
        except SalesforceError as error:  # 5xx, or an answer of the wrong shape
            raise _Aborted(_retry("server_error", error)) from error
        finally:
            for record in self._records:
                summary = _summary(record)
                for key in keys:
                    self._calls.setdefault(key, []).append(summary)

    def _gate(self) -> None:
        """Before every HTTP request: the batch deadline, then a slot of the rate limit."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise _Aborted(_batch_deadline())
        try:
            self.limiter.acquire(min(self.limiter_wait, left))
        except LimiterTimeout as error:
            raise _Aborted(
                Outcome(
                    Verdict.RETRY,
                    reason="limiter_busy",
                    message=str(error),
                    counts_against_budget=False,
                    retry_after=5.0,
                )
            ) from error
        if time.monotonic() >= self._deadline:
            raise _Aborted(_batch_deadline())

    def _record(self, record: CallRecord, headroom: Headroom | None) -> None:
        self._records.append(record)
        if headroom is not None and self._on_headroom is not None:
            self._on_headroom(headroom)

    def _limit_outcome(self, error: SalesforceLimitExceeded) -> Outcome:
        """403 REQUEST_LIMIT_EXCEEDED: every worker waits; the attempt budget is not spent."""
        if error.daily:
            wait, reason = self.config.limit_wait_seconds, "daily_limit_exceeded"
        else:
            wait, reason = CONCURRENT_LIMIT_WAIT_SECONDS, "concurrent_limit_exceeded"
        self.limiter.block_for(wait)
        return Outcome(
            Verdict.RETRY,
            reason=reason,
            message=_message(error),
            status_code=error.status,
            counts_against_budget=False,
            retry_after=wait,
        )

    # Results

    def _result_outcome(self, write: _Write, result: dict[str, Any] | SalesforceError) -> Outcome:
        if isinstance(result, SalesforceError):
            return _failed((result.code or "rejected").lower(), _message(result), result.status)
        if result.get("success") is True and result.get("id"):
            return self._success(write, str(result["id"]), created=result.get("created"))
        code, message, fields = _record_error(result)
        text = scrub(f"{code}: {message}" + (f" (fields: {', '.join(fields)})" if fields else ""))
        if code in MISCONFIGURED_RECORD_CODES:
            return _pause("misconfigured", f"{text}; check {self.config.prefix}PROPERTY_MAP")
        if code in TRANSIENT_RECORD_CODES:
            return Outcome(Verdict.RETRY, reason=code.lower(), message=text)
        if code in GONE_RECORD_CODES and write.deprovision:
            # Deleted in Salesforce already: the user is as deprovisioned as it gets.
            return Outcome(
                Verdict.SUCCEEDED,
                reason="not_found",
                external_id=write.target,
                properties_hash=write.digest,
                email=write.intent.user.email or write.intent.link.last_email,
                deprovisioned=True,
            )
        if code in GONE_RECORD_CODES and write.adopted:
            return Outcome(Verdict.RETRY, reason="record_vanished", message=text)
        return _failed(code.lower(), text, None)

    def _success(self, write: _Write, record_id: str, *, created: Any) -> Outcome:
        intent = write.intent
        if write.adopted:
            was_created: bool | None = False
        elif write.target is None:
            was_created = bool(created) if isinstance(created, bool) else None
        else:
            was_created = None  # the link's own record: unchanged from the link
        return Outcome(
            Verdict.SUCCEEDED,
            reason="adopted" if write.adopted else None,
            external_id=record_id,
            created=was_created,
            properties_hash=write.digest,
            email=intent.user.email or intent.link.last_email,
            deprovisioned=intent.user.deprovisioned,
        )

    def _ambiguous(self, intent: Intent, matches: list[dict[str, Any]]) -> Outcome:
        ids = ", ".join(str(m.get("Id")) for m in matches[:5])
        email = mask_email(intent.user.previous_email or intent.user.email or "")
        external = self.config.external_id_field
        return _failed(
            "ambiguous_match",
            f"{len(matches)} {self.sobject} records have the email {email} and no {external} "
            f"({ids}): merge them, or set {external} to {intent.user.subject!r} on one, then "
            "replay",
            None,
        )

    def _written_fields(self) -> list[str]:
        names = [*self.mapping.values(), self.config.external_id_field]
        if self.config.deprovision == "mark":
            names.append(self.config.deprovision_field)
        return list(dict.fromkeys(names))

    def _field_problem(self, described: dict[str, Any]) -> str | None:
        """Which of the fields idsync writes the object lacks ("sObject Describe")."""
        listed = described.get("fields")
        known = {
            str(f.get("name", "")).lower(): f
            for f in (listed if isinstance(listed, list) else [])
            if isinstance(f, dict)
        }
        missing = [name for name in self._written_fields() if name.lower() not in known]
        if missing:
            return (
                f"INVALID_FIELD: {self.sobject} has no fields {missing}; create them or change "
                f"{self.config.prefix}PROPERTY_MAP / {self.config.prefix}EXTERNAL_ID_FIELD"
            )
        external = known[self.config.external_id_field.lower()]
        if not external.get("externalId"):
            return (
                f"{self.sobject}.{self.config.external_id_field} is not an External ID field: "
                "tick 'External ID' (and 'Unique') on it in Setup"
            )
        return None


def _unchanged(intent: Intent, digest: str) -> bool:
    """Same fields as last sent, no resync, and no write whose answer was lost may land."""
    link = intent.link
    return digest == link.properties_hash and not intent.force and not link.uncertain


def _emails(intent: Intent) -> list[str]:
    return [e for e in (intent.user.previous_email, intent.user.email) if e]


def _value(value: Any) -> Any:
    """A profile value as Salesforce takes it: JSON scalars as they are, objects as text."""
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    if value == "":
        return None
    return value


def _last_name(profile: dict[str, Any], email: str | None) -> str:
    """A last name for a create that has none: the profile's name, then the email's local
    part, then "Unknown"."""
    name = profile.get("name")
    if isinstance(name, str) and name.strip() and name.strip().lower() != (email or ""):
        return name.strip()[:80]
    if email and "@" in email:
        return email.split("@", 1)[0][:80]
    return FALLBACK_LAST_NAME


def _record_error(result: dict[str, Any]) -> tuple[str, str, list[str]]:
    errors = result.get("errors")
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    fields = first.get("fields")
    return (
        str(first.get("statusCode") or "UNKNOWN_ERROR"),
        str(first.get("message") or "Salesforce refused the record without a message"),
        [str(f) for f in fields] if isinstance(fields, list) else [],
    )


def _failed(reason: str, message: str, status: int | None) -> Outcome:
    return Outcome(Verdict.FAILED, reason=reason, message=message[:1000], status_code=status)


def _pause(reason: str, message: str, status: int | None = None) -> Outcome:
    return Outcome(
        Verdict.PAUSE,
        reason=reason,
        message=message[:1000],
        status_code=status,
        counts_against_budget=False,
    )


def _retry(reason: str, error: SalesforceError) -> Outcome:
    return Outcome(Verdict.RETRY, reason=reason, message=_message(error), status_code=error.status)


def _batch_deadline() -> Outcome:
    return Outcome(
        Verdict.RETRY,
        reason="batch_deadline",
        message="the batch reached its deadline before this call could start",
        counts_against_budget=False,
        retry_after=0.0,
    )


def _owned(record_id: str) -> Outcome:
    return _failed("contact_owned", f"record {record_id} belongs to another user's link", None)


def _copy(outcome: Outcome) -> Outcome:
    return Outcome(
        outcome.verdict,
        reason=outcome.reason,
        message=outcome.message,
        status_code=outcome.status_code,
        counts_against_budget=outcome.counts_against_budget,
        retry_after=outcome.retry_after,
    )


def _message(error: Exception) -> str:
    return scrub(str(error))[:1000]


def _summary(record: CallRecord) -> CallSummary:
    return CallSummary(
        request=f"{record.method} {record.path}"[:255],
        status=record.status,
        duration_ms=record.duration_ms,
        error_category=record.error_category,
        response_excerpt=scrub(record.response_excerpt) if record.response_excerpt else None,
    )
