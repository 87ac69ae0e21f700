"""A fake HubSpot CRM contacts API: a real HTTP server on loopback, for tests and the demo.

It behaves like the parts of HubSpot's v3 contacts API that idsync relies on
(see ``shared/reference/hubspot.md``): unique lowercase emails, 409 with
"Existing ID", batches of at most 100 inputs, 207 partial failures when every
input has an ``objectWriteTraceId``, a rolling rate limit answered with 429, and
204 on archive, and reads of contact property definitions (with the scopes they
need). Test switches inject faults: whole-call errors, 429s, answers held after
the write ("answer late"), writes held before they land ("apply late"), and a
seeded random mix of those. The same switches are reachable over HTTP under
``/_fake/`` (no auth, not rate limited) so that another process can drive a fake
started with ``python -m idsync.fakes.hubspot``. ``reset()`` starts a new
generation: a request still in flight from before it neither writes into the
fresh account nor shows in its log and counts; it is answered 503.
"""

from __future__ import annotations

import argparse
import hmac
import itertools
import json
import random
import re
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from flask import Flask, Response, g, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException

from idsync.fakes.server import FakeServer, run_until_signal

CONTACTS = "/crm/v3/objects/contacts"
PROPERTIES = "/crm/v3/properties/contacts"
READ_SCOPE = "crm.objects.contacts.read"
WRITE_SCOPE = "crm.objects.contacts.write"
SCHEMA_READ_SCOPE = "crm.schemas.contacts.read"
BATCH_LIMIT = 100
FIRST_ID = 101
DEFAULT_PROPERTIES = frozenset(
    [
        "email",
        "firstname",
        "lastname",
        "phone",
        "company",
        "jobtitle",
        "lifecyclestage",
        "idsync_deprovisioned",
        "idsync_user_id",
        "hs_object_id",
    ]
)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_NO_CREDENTIALS = "Authentication credentials not found."
_NON_UNIQUE = "Unable to perform update/upsert by non-unique 0-1 property"
_FAULT_CATEGORIES = {
    400: "VALIDATION_ERROR",
    401: "INVALID_AUTHENTICATION",
    403: "MISSING_SCOPES",
    404: "OBJECT_NOT_FOUND",
    409: "CONFLICT",
    423: "LOCKED",
    429: "RATE_LIMITS",
}
# The scope each route needs (the batch route: read for batch/read, write otherwise).
_ROUTE_SCOPES = {
    "create": WRITE_SCOPE,
    "read": READ_SCOPE,
    "update": WRITE_SCOPE,
    "archive": WRITE_SCOPE,
    "property": SCHEMA_READ_SCOPE,
}
_SCOPES_DOC = "https://developers.hubspot.com/scopes"
# Labels of HubSpot's own contact properties; any other known property is a custom one.
_HUBSPOT_DEFINED = {
    "email": "Email",
    "firstname": "First Name",
    "lastname": "Last Name",
    "phone": "Phone Number",
    "company": "Company Name",
    "jobtitle": "Job Title",
    "lifecyclestage": "Lifecycle Stage",
    "hs_object_id": "Record ID",
}


class ApiError(Exception):
    """An error answer in HubSpot's shape, for a whole call or for one batch input."""

    def __init__(self, status: int, category: str, message: str, **context: list[str]) -> None:
        super().__init__(message)
        self.status, self.category, self.message, self.context = status, category, message, context

    def body(self, trace_id: str | None = None) -> dict[str, Any]:
        """The JSON error object HubSpot sends, naming the input's trace id when given."""
        body: dict[str, Any] = {"status": "error", "category": self.category}
        body |= {"message": self.message, "correlationId": str(uuid.uuid4())}
        context = self.context | ({"objectWriteTraceId": [trace_id]} if trace_id else {})
        return body | ({"context": context} if context else {})


def _not_found(key: str) -> ApiError:
    return ApiError(404, "OBJECT_NOT_FOUND", f"resource not found: {key}", ids=[key])


def _conflict(existing_id: str) -> ApiError:
    return ApiError(409, "CONFLICT", f"Contact already exists. Existing ID: {existing_id}")


def _invalid(message: str) -> ApiError:
    return ApiError(400, "VALIDATION_ERROR", message)


def _property_problem(name: str, error: str, message: str) -> dict[str, Any]:
    return {"isValid": False, "message": message, "error": error, "name": name}


def _invalid_properties(problems: list[dict[str, Any]]) -> ApiError:
    return _invalid("Property values were not valid: " + json.dumps(problems))


def _invalid_email(email: str) -> ApiError:
    problem = _property_problem("email", "INVALID_EMAIL", f"Email address {email} is invalid")
    return _invalid_properties([problem])


def _missing_scope(scope: str) -> tuple[Response, int]:
    """HubSpot's 403 for a token without ``scope``: category MISSING_SCOPES, scopes named."""
    message = (
        "This app hasn't been granted all required scopes to make this call. "
        f"Read more about required scopes here: {_SCOPES_DOC}."
    )
    body = ApiError(403, "MISSING_SCOPES", message).body() | {
        "errors": [
            {
                "message": "One or more of the following scopes are required.",
                "context": {"requiredScopes": [scope]},
            }
        ],
        "links": {"scopes": _SCOPES_DOC},
    }
    return jsonify(body), 403


def _property_json(name: str, created_at: str) -> dict[str, Any]:
    """A contact property definition as ``GET /crm/v3/properties/contacts/{name}`` gives it.

    The fake knows names, not types: every property is a single-line text field.
    """
    hubspot_defined = name in _HUBSPOT_DEFINED
    return {
        "name": name,
        "label": _HUBSPOT_DEFINED.get(name) or name.replace("_", " ").capitalize(),
        "type": "string",
        "fieldType": "text",
        "description": "",
        "groupName": "contactinformation",
        "options": [],
        "displayOrder": -1,
        "calculated": False,
        "externalOptions": False,
        "hasUniqueValue": False,
        "hidden": False,
        "hubspotDefined": hubspot_defined,
        "formField": True,
        "dataSensitivity": "non_sensitive",
        "modificationMetadata": {
            "archivable": not hubspot_defined,
            "readOnlyDefinition": hubspot_defined,
            "readOnlyValue": name == "hs_object_id",
        },
        "createdAt": created_at,
        "updatedAt": created_at,
        "archived": False,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _touch(ids: Iterable[str] = (), emails: Iterable[str] = ()) -> None:
    """Note which contacts the current request touched, for the overlap checks of tests."""
    if has_request_context() and "touched_ids" in g:
        g.touched_ids.update(ids)
        g.touched_emails.update(email for email in emails if email)


@dataclass
class _Contact:
    id: str
    properties: dict[str, str]
    created_at: str
    updated_at: str
    archived: bool = False
    merged_into: str | None = None

    def to_json(self, requested: Iterable[str] = ()) -> dict[str, Any]:
        properties: dict[str, str | None] = {name: None for name in requested}
        properties |= self.properties
        properties |= {"hs_object_id": self.id, "createdate": self.created_at}
        properties["lastmodifieddate"] = self.updated_at
        return {
            "id": self.id,
            "properties": properties,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "archived": self.archived,
        }


class _Store:
    """The contacts of one fake account; callers hold the fake's lock."""

    def __init__(self, known_properties: Iterable[str]) -> None:
        self.known = set(known_properties)
        self.contacts: dict[str, _Contact] = {}
        self.owners: dict[str, str] = {}  # email of a live contact -> its id
        self.next_id = FIRST_ID
        self.created_at = _now()
        # Inside ``all_or_nothing``: what each changed contact and email owner was before.
        self._before: dict[str, _Contact | None] | None = None
        self._owners_before: dict[str, str | None] = {}

    @contextmanager
    def all_or_nothing(self) -> Iterator[None]:
        """Writes in the block are undone if it raises: a batch that fails as a whole.

        Only what the block changes is remembered, so a batch costs the same in an
        account of ten contacts as in one of a million.
        """
        self._before, self._owners_before, next_id = {}, {}, self.next_id
        try:
            yield
        except BaseException:
            for cid, contact in self._before.items():
                if contact is None:
                    del self.contacts[cid]
                else:
                    self.contacts[cid] = contact
            for email, owner in self._owners_before.items():
                if owner is None:
                    self.owners.pop(email, None)
                else:
                    self.owners[email] = owner
            self.next_id = next_id
            raise
        finally:
            self._before, self._owners_before = None, {}

    def _remember(self, contact_id: str) -> None:
        """Keep ``contact_id``'s state from before the batch changes it (None: new)."""
        if self._before is None or contact_id in self._before:
            return
        contact = self.contacts.get(contact_id)
        self._before[contact_id] = (
            None if contact is None else replace(contact, properties=dict(contact.properties))
        )

    def _own(self, email: str, contact_id: str | None) -> None:
        """Point ``email`` at ``contact_id`` (None: at nobody), remembering the old owner."""
        if self._before is not None and email not in self._owners_before:
            self._owners_before[email] = self.owners.get(email)
        if contact_id is None:
            self.owners.pop(email, None)
        else:
            self.owners[email] = contact_id

    def find(self, key: str, *, by_email: bool = False) -> _Contact:
        """The live contact with this id (following merges) or email; 404 otherwise."""
        if by_email:
            _touch(emails=[key.lower()])
            contact_id = self.owners.get(key.lower(), "")
        elif key.isdigit():
            contact_id = key
        else:
            raise ApiError(
                404, "OBJECT_NOT_FOUND", "Object not found.  objectId are usually numeric."
            )
        contact = self.contacts.get(contact_id)
        while contact is not None and contact.merged_into:
            contact = self.contacts.get(contact.merged_into)
        if contact is None or contact.archived:
            raise _not_found(key)
        _touch([contact.id], [contact.properties.get("email", "")])
        return contact

    def create(self, properties: object) -> _Contact:
        values = self._validated(properties)
        owner = self.owners.get(values.get("email", ""))
        if owner is not None:
            raise _conflict(owner)
        contact = _Contact(str(self.next_id), {}, _now(), _now())
        self._remember(contact.id)
        self.next_id += 1
        self.contacts[contact.id] = contact
        self._write(contact, values)
        return contact

    def update(self, contact: _Contact, properties: object) -> _Contact:
        values = self._validated(properties)
        owner = self.owners.get(values.get("email", ""))
        if owner is not None and owner != contact.id:
            raise _conflict(owner)
        self._write(contact, values)
        return contact

    def archive(self, key: str) -> None:
        try:
            contact = self.find(key)
        except ApiError:
            return  # HubSpot answers 204 for unknown ids too.
        contact.archived = True
        self.owners = {email: cid for email, cid in self.owners.items() if cid != contact.id}

    def merge(self, from_id: str, into_id: str) -> None:
        source, target = self.find(from_id), self.find(into_id)
        if source.id == target.id:
            raise _invalid("Cannot merge a contact into itself")
        source.merged_into = target.id
        for email, owner in self.owners.items():
            if owner == source.id:
                self.owners[email] = target.id  # the old email now finds the survivor

    def _write(self, contact: _Contact, values: dict[str, str]) -> None:
        self._remember(contact.id)
        old_email = contact.properties.get("email", "")
        for name, value in values.items():
            if value == "":
                contact.properties.pop(name, None)
            else:
                contact.properties[name] = value
        new_email = contact.properties.get("email", "")
        if new_email != old_email:
            if self.owners.get(old_email) == contact.id:
                self._own(old_email, None)
            if new_email:
                self._own(new_email, contact.id)
        contact.updated_at = _now()
        _touch([contact.id], [old_email, new_email])

    def _validated(self, properties: object) -> dict[str, str]:
        if not isinstance(properties, dict):
            raise _invalid("Invalid input JSON: 'properties' must be an object")
        values = {
            str(name): "" if value is None else str(value) for name, value in properties.items()
        }
        values.pop("hs_object_id", None)  # read-only: the id decides it
        problems = [
            _property_problem(name, "PROPERTY_DOESNT_EXIST", f'Property "{name}" does not exist')
            for name in values
            if name not in self.known
        ]
        if problems:
            raise _invalid_properties(problems)
        if values.get("email"):
            values["email"] = email = values["email"].strip().lower()
            if not _EMAIL.match(email):
                raise _invalid_email(email)
        return values


@dataclass(frozen=True)
class RequestRecord:
    """One API request the fake answered: when it ran and which contacts it touched.

    ``fault`` names the injected fault that shaped the answer, if any (``fail``,
    ``rate_limit``, ``apply_late``, ``answer_late``), and ``delay`` how long it was
    held in all.
    """

    method: str
    path: str
    status: int
    started: float
    finished: float
    contact_ids: frozenset[str]
    emails: frozenset[str]
    fault: str | None = None
    delay: float = 0.0

    def overlaps(self, other: RequestRecord) -> bool:
        """Whether both requests touched one contact while both were in flight."""
        shared = (self.contact_ids & other.contact_ids) or (self.emails & other.emails)
        return bool(shared) and self.started < other.finished and other.started < self.finished

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "contact_ids": sorted(self.contact_ids),
            "emails": sorted(self.emails),
        }


@dataclass
class _Fault:
    remaining: int
    status: int = 500
    category: str | None = None
    policy: str = "TEN_SECONDLY_ROLLING"
    retry_after: float | None = None
    seconds: float = 0.0

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> _Fault:
        """A fault as the control API describes it: ``{"kind": ..., "count": n, ...}``."""
        fields = {"status", "category", "policy", "retry_after", "seconds"}
        return cls(int(body.get("count", 1)), **{k: v for k, v in body.items() if k in fields})


FAULT_KINDS = ("fail", "rate_limit", "apply_late", "answer_late")
_FAULT_ALIASES = {"slow": "apply_late"}  # the older name of apply_late


@dataclass(frozen=True)
class _Decision:
    """What the random faults chose for one admitted request."""

    kind: str  # "fail", "apply_late" or "answer_late"
    seconds: float = 0.0
    status: int = 500


class _RandomFaults:
    """Seeded random faults: the same seed and the same sequence of calls, the same faults.

    Every admitted call draws three numbers whatever it gets, so one call's fate
    never shifts the draws of the calls after it.
    """

    def __init__(
        self,
        seed: int,
        *,
        answer_late: float,
        apply_late: float,
        error: float,
        max_delay: float,
        statuses: Iterable[int],
    ) -> None:
        self.statuses = tuple(int(status) for status in statuses)
        fractions = (answer_late, apply_late, error)
        if any(not 0 <= fraction <= 1 for fraction in fractions) or sum(fractions) > 1:
            raise _invalid("Fault fractions must each lie in [0, 1] and add up to at most 1")
        if max_delay < 0:
            raise _invalid("max_delay must not be negative")
        if not self.statuses or any(not 400 <= status <= 599 for status in self.statuses):
            raise _invalid("statuses must be a non-empty list of 4xx or 5xx codes")
        self.answer_late, self.apply_late, self.error = fractions
        self.max_delay = max_delay
        # Not security: a reproducible choice of faults for tests.
        self._rng = random.Random(seed)  # noqa: S311

    def draw(self) -> _Decision | None:
        roll = self._rng.random()
        seconds = self._rng.uniform(0, self.max_delay)
        status = self.statuses[int(self._rng.random() * len(self.statuses))]
        if roll < self.error:
            return _Decision("fail", status=status)
        if roll < self.error + self.answer_late:
            return _Decision("answer_late", seconds=seconds)
        if roll < self.error + self.answer_late + self.apply_late:
            return _Decision("apply_late", seconds=seconds)
        return None


class _Stale(Exception):
    """A request admitted before ``reset()``: it must not touch the new generation."""


def _json_body() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise _invalid("Invalid input JSON: expected an object")
    return body


def _batch_inputs(body: dict[str, Any]) -> list[dict[str, Any]]:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(item, dict) for item in inputs):
        raise _invalid("Invalid input JSON: 'inputs' must be a list of objects")
    if len(inputs) > BATCH_LIMIT:
        raise _invalid(f"Too many inputs: {len(inputs)}; a batch takes at most {BATCH_LIMIT}.")
    return inputs


def _batch_answer(
    results: list[dict[str, Any]], errors: list[dict[str, Any]], status: int
) -> tuple[Response, int]:
    body: dict[str, Any] = {"status": "COMPLETE", "results": results}
    body |= {"startedAt": _now(), "completedAt": _now()}
    if errors:
        return jsonify(body | {"numErrors": len(errors), "errors": errors}), 207
    return jsonify(body), status


def _result(contact: _Contact, item: dict[str, Any], **extra: bool) -> dict[str, Any]:
    trace = (
        {"objectWriteTraceId": item["objectWriteTraceId"]} if "objectWriteTraceId" in item else {}
    )
    return contact.to_json() | extra | trace


def _create_input(store: _Store, item: dict[str, Any]) -> dict[str, Any]:
    return _result(store.create(item.get("properties")), item)


def _update_input(store: _Store, item: dict[str, Any]) -> dict[str, Any]:
    return _result(store.update(store.find(str(item.get("id", ""))), item.get("properties")), item)


def _upsert_input(store: _Store, item: dict[str, Any]) -> dict[str, Any]:
    email = str(item.get("id", "")).strip().lower()
    properties = item.get("properties")
    if not isinstance(properties, dict):
        raise _invalid("Invalid input JSON: 'properties' must be an object")
    if not _EMAIL.match(email):
        raise _invalid_email(email)
    # The upsert key is the email: it overrides any email among the properties.
    properties = properties | {"email": email}
    try:
        contact = store.find(email, by_email=True)
    except ApiError:
        return _result(store.create(properties), item, new=True)
    return _result(store.update(contact, properties), item, new=False)


_BatchWrite = Callable[[_Store, dict[str, Any]], dict[str, Any]]
_BATCH_WRITES: dict[str, _BatchWrite] = {
    "create": _create_input,
    "update": _update_input,
    "upsert": _upsert_input,
}


class FakeHubSpot(FakeServer):
    """A HubSpot contacts API on 127.0.0.1 with switches for tests; use as a context manager."""

    label = "fake HubSpot"

    def __init__(
        self,
        token: str = "fake-token",  # noqa: S107 - the fake's well-known default, not a secret
        rate_limit: int = 100,
        window_seconds: float = 10.0,
        daily_limit: int = 250000,
        port: int = 0,
        *,
        properties: Iterable[str] = DEFAULT_PROPERTIES,
    ) -> None:
        super().__init__(port)
        self._initial = (token, rate_limit, window_seconds, daily_limit, frozenset(properties))
        self._lock = threading.Lock()
        self._wake = threading.Event()  # set to cut the current holds short
        self._generation = 0
        self._in_flight: Counter[int] = Counter()  # generation -> requests being handled
        self.app = self._build_app()
        self.reset()

    # Lifecycle (start, stop, url and ``with`` come from FakeServer)

    def before_stop(self) -> None:
        """Held (late) requests in flight are cut short."""
        with self._lock:
            self._wake_holds()

    # Test switches

    def reset(self) -> None:
        """Forget every contact, fault, counter and log; back to the constructor's settings.

        It also starts a new generation: requests still in flight (held by a late
        fault, say) are answered 503 at once and neither write into the new account
        nor appear in its log, stats or ``in_flight()``.
        """
        token, rate_limit, window, daily, properties = self._initial
        with self._lock:
            self._generation += 1
            self._wake_holds()
            self._token = token
            self._missing_scopes: frozenset[str] = frozenset()
            self._random: _RandomFaults | None = None
            self._rate_limit, self._window_seconds, self._daily_limit = rate_limit, window, daily
            self._store = _Store(properties)
            self._window: deque[float] = deque()
            self._daily_used = 0
            self._faults: dict[str, deque[_Fault]] = defaultdict(deque)
            self._log: list[RequestRecord] = []
            self._stats: dict[str, Counter[str]] = defaultdict(Counter)

    def set_token(self, token: str) -> None:
        """Accept only ``token`` from now on (a rotated or revoked private app token)."""
        with self._lock:
            self._token = token

    def set_rate_limit(
        self, limit: int, window_seconds: float, daily_limit: int | None = None
    ) -> None:
        """``limit`` requests per rolling ``window_seconds``; the current window starts empty."""
        with self._lock:
            self._rate_limit, self._window_seconds = limit, window_seconds
            self._daily_limit = self._daily_limit if daily_limit is None else daily_limit
            self._window.clear()

    def set_known_properties(self, names: Iterable[str]) -> None:
        """Properties that exist in the account; writing any other answers PROPERTY_DOESNT_EXIST."""
        with self._lock:
            self._store.known = set(names)

    def set_missing_scopes(self, scopes: Iterable[str]) -> None:
        """The token lacks these scopes from now on: calls that need one answer 403.

        Contact reads need ``crm.objects.contacts.read``, writes
        ``crm.objects.contacts.write``, property reads ``crm.schemas.contacts.read``.
        """
        with self._lock:
            self._missing_scopes = frozenset(scopes)

    def fail_next(self, n: int, status: int = 500, category: str | None = None) -> None:
        """The next ``n`` API requests answer ``status`` with a HubSpot-like error body.

        Nothing is applied. A 404 names the object, a 409 the contact the call
        concerns ("Existing ID"), when there is one; other statuses say "Injected
        failure".
        """
        self._add_fault("fail", _Fault(n, status=status, category=category))

    def rate_limit_next(
        self, n: int, policy: str = "TEN_SECONDLY_ROLLING", retry_after: float | None = None
    ) -> None:
        """The next ``n`` API requests answer 429 for ``policy``, with Retry-After if given."""
        self._add_fault("rate_limit", _Fault(n, policy=policy, retry_after=retry_after))

    def apply_late_next(self, n: int, seconds: float) -> None:
        """The next ``n`` API requests are held ``seconds``, then applied and answered.

        The body is read first, so a client that gives up (times out) still sees
        its write land later, possibly after a newer one.
        """
        self._add_fault("apply_late", _Fault(n, seconds=seconds))

    def slow_next(self, n: int, seconds: float) -> None:
        """The older name of ``apply_late_next``."""
        self.apply_late_next(n, seconds)

    def answer_late_next(self, n: int, seconds: float) -> None:
        """The next ``n`` API requests are applied at once, then answered ``seconds`` later."""
        self._add_fault("answer_late", _Fault(n, seconds=seconds))

    def set_random_faults(
        self,
        seed: int | None,
        *,
        answer_late: float = 0.0,
        apply_late: float = 0.0,
        error: float = 0.0,
        max_delay: float = 1.0,
        statuses: Iterable[int] = (500,),
    ) -> None:
        """Give each admitted API request a seeded random fault; ``seed=None`` turns it off.

        Of the calls that pass auth, the limits and the queued faults, the fraction
        ``error`` answers a whole-call error with a status drawn from ``statuses``
        (shaped as ``fail_next`` shapes them), ``answer_late`` is answered late and
        ``apply_late`` applied late, each held a delay drawn from ``[0, max_delay]``.
        Given the seed and the order in which calls arrive, the faults are the same.
        """
        chosen = None
        if seed is not None:
            chosen = _RandomFaults(
                seed,
                answer_late=answer_late,
                apply_late=apply_late,
                error=error,
                max_delay=max_delay,
                statuses=statuses,
            )
        with self._lock:
            self._random = chosen

    def seed_contact(self, properties: dict[str, str]) -> str:
        """Create a contact as if someone had made it in HubSpot; returns its id."""
        with self._lock:
            return self._store.create(properties).id

    def merge(self, from_id: str, into_id: str) -> None:
        """Merge ``from_id`` into ``into_id``: the old id then reads and writes the survivor."""
        with self._lock:
            self._store.merge(from_id, into_id)

    # Observation

    def contacts(self, include_archived: bool = False) -> list[dict[str, Any]]:
        """Every live contact (also archived and merged-away ones if asked), oldest first."""
        with self._lock:
            return [
                contact.to_json() | {"mergedInto": contact.merged_into}
                for contact in self._store.contacts.values()
                if include_archived or not (contact.archived or contact.merged_into)
            ]

    def contact_by_email(self, email: str) -> dict[str, Any] | None:
        """The live contact that owns ``email``, or None."""
        with self._lock:
            contact_id = self._store.owners.get(email.lower())
            return self._store.contacts[contact_id].to_json() if contact_id else None

    def in_flight(self) -> int:
        """API requests of this generation admitted and not answered yet (held ones included)."""
        with self._lock:
            return self._in_flight[self._generation]

    @property
    def requests_log(self) -> list[RequestRecord]:
        """Every API request answered so far, in the order they finished."""
        with self._lock:
            return list(self._log)

    def overlaps(self) -> list[tuple[RequestRecord, RequestRecord]]:
        """Pairs of requests that touched one contact at the same time (should be none)."""
        log = sorted(self.requests_log, key=lambda record: record.started)
        pairs = []
        for index, first in enumerate(log):
            for second in itertools.islice(log, index + 1, None):
                if second.started >= first.finished:
                    break  # sorted by start: no later request overlaps ``first`` either
                if first.overlaps(second):
                    pairs.append((first, second))
        return pairs

    def stats(self) -> dict[str, Any]:
        """Answers by route and status, their total, and how many were 429."""
        with self._lock:
            by_route = {route: dict(statuses) for route, statuses in self._stats.items()}
            return {
                "requests": by_route,
                "total": sum(sum(statuses.values()) for statuses in by_route.values()),
                "rate_limited": sum(statuses.get("429", 0) for statuses in by_route.values()),
            }

    # Request pipeline: auth, limits and faults before the route; headers and log after it.

    def _add_fault(self, kind: str, fault: _Fault) -> None:
        kind = _FAULT_ALIASES.get(kind, kind)
        if kind not in FAULT_KINDS:
            raise _invalid(f"Unknown fault kind {kind!r}: use one of {', '.join(FAULT_KINDS)}")
        with self._lock:
            if fault.remaining > 0:
                self._faults[kind].append(fault)

    def _take_fault(self, kind: str) -> _Fault | None:
        queue = self._faults[kind]
        if not queue:
            return None
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.popleft()
        return fault

    def _before(self) -> Response | tuple[Response, int] | None:
        if request.path.startswith("/_fake/"):
            return None
        g.started, g.touched_ids, g.touched_emails = time.monotonic(), set(), set()
        g.fault, g.hold = None, {}  # the fault's name; fault kind -> seconds held for it
        with self._lock:
            g.generation, g.wake = self._generation, self._wake
            self._in_flight[g.generation] += 1
            answer = self._admit(request.headers.get("Authorization", ""))
        if answer is None and "apply_late" in g.hold:
            # Read the body now: the client may be gone by the time the write lands.
            request.get_data(cache=True)
            g.wake.wait(g.hold["apply_late"])
        return answer

    def _wake_holds(self) -> None:
        """Cut short every hold in flight; callers hold the lock."""
        self._wake.set()
        self._wake = threading.Event()

    def _admit(self, authorization: str) -> Response | tuple[Response, int] | None:
        """Refuse the request as HubSpot would, or count it and choose its faults."""
        expected = f"Bearer {self._token}".encode()
        if not hmac.compare_digest(authorization.encode(), expected):
            message = f"{_NO_CREDENTIALS} This API supports OAuth 2.0 and private app tokens."
            response = jsonify(ApiError(401, "INVALID_AUTHENTICATION", message).body())
            response.headers["X-HubSpot-Auth-Failure"] = _NO_CREDENTIALS
            return response, 401
        scope = self._required_scope()
        if scope in self._missing_scopes:
            return _missing_scope(scope)
        forced = self._take_fault("rate_limit")
        if forced is not None:
            g.fault = "rate_limit"
            return self._rate_limited(forced.policy, forced.retry_after)
        now = time.monotonic()
        self._expire(now)
        if self._daily_used >= self._daily_limit:
            return self._rate_limited("DAILY", None)
        if len(self._window) >= self._rate_limit:
            return self._rate_limited(self._window_policy(), None)
        self._window.append(now)
        self._daily_used += 1
        drawn = self._random.draw() if self._random is not None else None
        failure = self._take_fault("fail")
        if failure is None and drawn is not None and drawn.kind == "fail":
            failure = _Fault(1, status=drawn.status)
        if failure is not None:
            g.fault = "fail"
            error = self._injected_error(failure.status, failure.category)
            return jsonify(error.body()), error.status
        for kind in ("apply_late", "answer_late"):
            late = self._take_fault(kind)
            if late is None and drawn is not None and drawn.kind == kind:
                late = _Fault(1, seconds=drawn.seconds)
            if late is not None:
                g.hold[kind] = late.seconds
        g.fault = "+".join(g.hold) or None
        return None

    @staticmethod
    def _required_scope() -> str:
        endpoint = request.endpoint or ""
        if endpoint == "batch":
            operation = (request.view_args or {}).get("operation")
            return READ_SCOPE if operation == "read" else WRITE_SCOPE
        return _ROUTE_SCOPES.get(endpoint, READ_SCOPE)

    def _injected_error(self, status: int, category: str | None) -> ApiError:
        """A whole-call error shaped as HubSpot words it for ``status``; nothing is applied."""
        if status == 404:
            return _not_found(str((request.view_args or {}).get("contact_id", "contacts")))
        if status == 409:
            existing = self._concerned_contact()
            if existing is not None:
                return _conflict(existing)
            return ApiError(409, "CONFLICT", "Injected conflict (409); no contact is named.")
        category = category or _FAULT_CATEGORIES.get(status, "INTERNAL_ERROR")
        return ApiError(status, category, f"Injected failure ({status}); retry later.")

    def _concerned_contact(self) -> str | None:
        """The live contact a call is about, as a real 409 would name it.

        First the owner of the email it writes (a create, an email change), then
        the contact its first batch input or its path names.
        """
        path_key = (request.view_args or {}).get("contact_id")
        body = request.get_json(force=True, silent=True)
        body = body if isinstance(body, dict) else {}
        inputs = body.get("inputs")
        first = inputs[0] if isinstance(inputs, list) and inputs else body
        first = first if isinstance(first, dict) else {}
        properties = first.get("properties")
        email = properties.get("email") if isinstance(properties, dict) else None
        candidates = []
        if email:
            candidates.append((str(email), True))
        if "id" in first:
            candidates.append((str(first["id"]), self._by_email(body) or "@" in str(first["id"])))
        if path_key:
            candidates.append((str(path_key), self._by_email()))
        for key, by_email in candidates:
            try:
                return self._store.find(key, by_email=by_email).id
            except ApiError:
                continue
        return None

    @contextmanager
    def _fresh(self) -> Iterator[None]:
        """Hold the lock for a route's work, unless the request predates a reset."""
        with self._lock:
            if g.generation != self._generation:
                raise _Stale
            yield

    def _window_policy(self) -> str:
        """The policy a 429 of the rolling window names: the one whose window is ours.

        A client waits out the named window (HubSpot sends no Retry-After), so a fake
        with a one-second window must not send it ten seconds away.
        """
        return "SECONDLY" if self._window_seconds <= 1.0 else "TEN_SECONDLY_ROLLING"

    def _rate_limited(self, policy: str, retry_after: float | None) -> tuple[Response, int]:
        response = jsonify(
            status="error",
            message=f"You have reached your {policy.lower()} limit.",
            errorType="RATE_LIMIT",
            policyName=policy,
            correlationId=str(uuid.uuid4()),
        )
        if retry_after is not None:
            response.headers["Retry-After"] = f"{retry_after:g}"
        return response, 429

    def _limit_headers(self) -> dict[str, str]:
        values = {
            "Max": self._rate_limit,
            "Remaining": max(0, self._rate_limit - len(self._window)),
            "Interval-Milliseconds": round(self._window_seconds * 1000),
            "Daily": self._daily_limit,
            "Daily-Remaining": max(0, self._daily_limit - self._daily_used),
        }
        return {f"X-HubSpot-RateLimit-{name}": str(value) for name, value in values.items()}

    def _expire(self, now: float) -> None:
        while self._window and self._window[0] <= now - self._window_seconds:
            self._window.popleft()

    def _after(self, response: Response) -> Response:
        if request.path.startswith("/_fake/"):
            return response
        if "answer_late" in g.hold:
            g.wake.wait(g.hold["answer_late"])
        finished = time.monotonic()
        route = f"{request.method} {request.url_rule.rule if request.url_rule else request.path}"
        with self._lock:
            if g.generation != self._generation:
                return self._stale_answer()
            self._expire(finished)
            response.headers.update(self._limit_headers())
            self._stats[route][str(response.status_code)] += 1
            self._log.append(
                RequestRecord(
                    method=request.method,
                    path=request.path,
                    status=response.status_code,
                    started=g.started,
                    finished=finished,
                    contact_ids=frozenset(g.touched_ids),
                    emails=frozenset(g.touched_emails),
                    fault=g.fault,
                    delay=sum(g.hold.values()),
                )
            )
        return response

    @staticmethod
    def _stale_answer() -> Response:
        message = "The fake HubSpot was reset while this request was in flight; retry."
        response = jsonify(ApiError(503, "SERVICE_UNAVAILABLE", message).body())
        response.status_code = 503
        return response

    def _finish(self, exc: BaseException | None) -> None:
        if "generation" not in g:
            return
        with self._lock:
            self._in_flight[g.generation] -= 1
            if self._in_flight[g.generation] <= 0:
                del self._in_flight[g.generation]

    # HubSpot routes

    def _create(self) -> tuple[Response, int]:
        body = _json_body()
        with self._fresh():
            return jsonify(self._store.create(body.get("properties")).to_json()), 201

    def _read(self, contact_id: str) -> Response:
        requested = [
            name for value in request.args.getlist("properties") for name in value.split(",")
        ]
        with self._fresh():
            contact = self._store.find(contact_id, by_email=self._by_email())
            return jsonify(contact.to_json(requested))

    def _update(self, contact_id: str) -> Response:
        body = _json_body()
        with self._fresh():
            contact = self._store.find(contact_id, by_email=self._by_email())
            return jsonify(self._store.update(contact, body.get("properties")).to_json())

    def _archive(self, contact_id: str) -> Response:
        with self._fresh():
            self._store.archive(contact_id)
        return Response(status=204)

    def _batch(self, operation: str) -> Any:
        body = _json_body()
        inputs = _batch_inputs(body)
        if operation == "read":
            return self._batch_read(inputs, self._by_email(body), body.get("properties") or [])
        if operation == "archive":
            with self._fresh():
                for item in inputs:
                    self._store.archive(str(item.get("id", "")))
            return Response(status=204)
        write = _BATCH_WRITES.get(operation)
        if write is None:
            raise ApiError(404, "OBJECT_NOT_FOUND", f"Unknown batch operation: {operation}")
        self._check_batch_keys(operation, inputs, self._by_email(body))
        return self._batch_write(write, inputs, 201 if operation == "create" else 200)

    def _batch_write(
        self, write: _BatchWrite, inputs: list[dict[str, Any]], status: int
    ) -> tuple[Response, int]:
        traced = bool(inputs) and all(item.get("objectWriteTraceId") for item in inputs)
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        with self._fresh(), self._store.all_or_nothing():
            for item in inputs:
                try:
                    results.append(write(self._store, item))
                except ApiError as error:
                    if not traced:  # Without trace ids one bad input fails the whole batch.
                        raise ApiError(
                            400, error.category, error.message, **error.context
                        ) from None
                    errors.append(error.body(str(item["objectWriteTraceId"])))
        return _batch_answer(results, errors, status)

    def _batch_read(
        self, inputs: list[dict[str, Any]], by_email: bool, requested: list[str]
    ) -> tuple[Response, int]:
        found: list[dict[str, Any]] = []
        missing: list[str] = []
        with self._fresh():
            for item in inputs:
                key = str(item.get("id", ""))
                try:
                    found.append(self._store.find(key, by_email=by_email).to_json(requested))
                except ApiError:
                    missing.append(key)
        message = "Could not get some CONTACT objects, they may be deleted or not exist."
        errors = [ApiError(404, "OBJECT_NOT_FOUND", message, ids=missing).body()] if missing else []
        return _batch_answer(found, errors, 200)

    def _property(self, name: str) -> Response:
        with self._fresh():
            if name not in self._store.known:
                message = f"Unable to find property {name} for object type contacts"
                raise ApiError(404, "OBJECT_NOT_FOUND", message)
            return jsonify(_property_json(name, self._store.created_at))

    @staticmethod
    def _by_email(body: dict[str, Any] | None = None) -> bool:
        id_property = (body or {}).get("idProperty") or request.args.get("idProperty")
        return id_property == "email"

    @staticmethod
    def _check_batch_keys(operation: str, inputs: list[dict[str, Any]], by_email: bool) -> None:
        """Refuse a whole batch as HubSpot does: wrong key kind or the same key twice."""
        if operation == "create":
            return
        keys = [str(item.get("id", "")).strip().lower() for item in inputs]
        by_email = by_email or any(item.get("idProperty") == "email" for item in inputs)
        if operation == "update" and (by_email or any("@" in key for key in keys)):
            raise _invalid(_NON_UNIQUE)
        if operation == "upsert" and not by_email:
            raise _invalid("This fake upserts by idProperty=email only.")
        duplicates = sorted(key for key, count in Counter(keys).items() if count > 1)
        if duplicates:
            raise _invalid(f"Duplicate IDs found in batch input: {duplicates}")

    # Control API for other processes: no auth, not counted, not logged.

    def _control(self, action: str) -> Any:
        body = _json_body() if request.method == "POST" and request.content_length else {}
        match request.method, action:
            case "GET", "contacts":
                return jsonify(results=self.contacts(include_archived=True))
            case "GET", "stats":
                return jsonify(self.stats())
            case "GET", "requests":
                return jsonify([record.to_json() for record in self.requests_log])
            case "POST", "contacts":
                return jsonify(id=self.seed_contact(_field(body, "properties"))), 201
            case "POST", "faults":
                self._add_fault(str(_field(body, "kind")), _Fault.from_json(body))
            case "POST", "random_faults":
                fractions = ("answer_late", "apply_late", "error", "max_delay")
                self.set_random_faults(
                    _field(body, "seed"),
                    **{name: float(body[name]) for name in fractions if name in body},
                    statuses=body.get("statuses", (500,)),
                )
            case "POST", "scopes":
                self.set_missing_scopes(_field(body, "missing"))
            case "GET", "in_flight":
                return jsonify(in_flight=self.in_flight())
            case "POST", "reset":
                self.reset()
            case "POST", "token":
                self.set_token(str(_field(body, "token")))
            case "POST", "merge":
                self.merge(str(_field(body, "from_id")), str(_field(body, "into_id")))
            case "POST", "limits":
                limit, window = (
                    int(_field(body, "rate_limit")),
                    float(_field(body, "window_seconds")),
                )
                self.set_rate_limit(limit, window, body.get("daily_limit"))
            case "POST", "properties":
                self.set_known_properties(_field(body, "names"))
            case _:
                raise ApiError(404, "OBJECT_NOT_FOUND", f"No control route {action}")
        return Response(status=204)

    def _build_app(self) -> Flask:
        app = Flask(__name__)
        app.before_request(self._before)
        app.after_request(self._after)
        app.teardown_request(self._finish)
        app.register_error_handler(ApiError, lambda error: (jsonify(error.body()), error.status))
        app.register_error_handler(_Stale, lambda _error: self._stale_answer())
        app.register_error_handler(HTTPException, _http_error)
        one = f"{CONTACTS}/<path:contact_id>"
        app.add_url_rule(CONTACTS, "create", self._create, methods=["POST"])
        app.add_url_rule(f"{CONTACTS}/batch/<operation>", "batch", self._batch, methods=["POST"])
        app.add_url_rule(one, "read", self._read, methods=["GET"])
        app.add_url_rule(one, "update", self._update, methods=["PATCH"])
        app.add_url_rule(one, "archive", self._archive, methods=["DELETE"])
        app.add_url_rule(f"{PROPERTIES}/<name>", "property", self._property, methods=["GET"])
        app.add_url_rule("/_fake/<action>", "control", self._control, methods=["GET", "POST"])
        return app


def _field(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise _invalid(f"Invalid input JSON: '{name}' is required")
    return body[name]


def _http_error(error: HTTPException) -> tuple[Response, int]:
    status = error.code or 500
    category = _FAULT_CATEGORIES.get(
        status, "VALIDATION_ERROR" if status < 500 else "INTERNAL_ERROR"
    )
    return jsonify(ApiError(status, category, error.description or error.name).body()), status


def main(argv: list[str] | None = None) -> int:
    """Run a fake HubSpot until SIGTERM or SIGINT; prints its URL on the first line."""
    parser = argparse.ArgumentParser(prog="python -m idsync.fakes.hubspot", description=__doc__)
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--token", default="fake-token")
    parser.add_argument("--rate-limit", type=int, default=100, help="requests per window")
    parser.add_argument("--window", type=float, default=10.0, help="window in seconds")
    parser.add_argument("--daily-limit", type=int, default=250000)
    args = parser.parse_args(argv)
    return run_until_signal(
        FakeHubSpot(args.token, args.rate_limit, args.window, args.daily_limit, args.port)
    )


if __name__ == "__main__":
    raise SystemExit(main())
