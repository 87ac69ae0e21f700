"""A fake Salesforce org: OAuth client credentials and the REST calls idsync makes, on loopback.

It behaves like the parts of the Salesforce REST API the Salesforce destination
relies on (``shared/reference/destinations.md``; developer.salesforce.com):

- ``POST /services/oauth2/token`` (client credentials, form-encoded): checks the
  client id and secret, answers ``access_token`` and ``instance_url`` (this
  fake's URL), or 400 ``{"error": "invalid_client", "error_description": ...}``.
- ``/services/data/vXX.X/...``: ``sobjects/{Object}/describe``; ``query`` for the
  one SOQL shape idsync sends (``SELECT ... FROM ... WHERE f IN ('a', ...) [AND
  g = null]``, anything else 400 ``MALFORMED_QUERY``); sObject Collections upsert
  by External ID, update by ``Id``, delete by ids and retrieve by ids, at most 200
  records, with per-record results in request order.
- Errors are JSON arrays ``[{"message", "errorCode", "fields"}]``; an unknown or
  expired token is 401 ``INVALID_SESSION_ID``; every API answer carries
  ``Sforce-Limit-Info: api-usage=N/M``; the 24-hour allocation and a
  records-per-second ceiling (Salesforce has none; the fake has one so that a
  benchmark can reach it) answer 403 ``REQUEST_LIMIT_EXCEEDED``.
- Contacts need ``LastName`` (Leads ``Company`` too): ``REQUIRED_FIELD_MISSING``;
  a malformed email is ``INVALID_EMAIL_ADDRESS``; the External ID field is
  unique (``DUPLICATE_VALUE``). Ids look like Salesforce's: 15 characters
  (case-sensitive) or 18 (with the case checksum, compared case-insensitively).

Test switches, as methods and over HTTP under ``/_fake/<action>`` (no auth, not
rate limited): ``reset``, ``fail`` (the next N API requests answer a status and
error code), ``slow`` (the next N API requests are applied, then answered N
seconds later), ``revoke``/``restore`` the app's credentials, ``expire_tokens``,
``remove_field``/``add_field``, ``record_error`` (the next N writes of one record,
matched by email, External ID or id, fail with a code such as
``DUPLICATES_DETECTED``, ``UNABLE_TO_LOCK_ROW`` or
``FIELD_CUSTOM_VALIDATION_EXCEPTION``), ``limits``, ``seed``; ``GET
/_fake/stats`` and ``GET /_fake/records`` observe it.
"""

from __future__ import annotations

import argparse
import copy
import hmac
import re
import secrets
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from idsync.fakes.server import FakeServer, run_until_signal

DEFAULT_CLIENT_ID = "fake-client-id"
DEFAULT_CLIENT_SECRET = "fake-client-secret"  # noqa: S105 - the fake's well-known default
COLLECTION_LIMIT = 200
MIN_VERSION, MAX_VERSION = 31, 66
ID_PREFIXES = {"Contact": "003", "Lead": "00Q"}
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CHECKSUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_QUERY = re.compile(
    r"^\s*SELECT\s+(?P<fields>\w+(?:\s*,\s*\w+)*)\s+FROM\s+(?P<object>\w+)\s+WHERE\s+"
    r"(?P<key>\w+)\s+IN\s*\((?P<values>.*)\)(?:\s+AND\s+(?P<null>\w+)\s*=\s*null)?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_LITERAL = re.compile(r"\s*'((?:\\.|[^'\\])*)'\s*(,|$)")
_VERSION = re.compile(r"^v(\d+)\.0$")


def _field(name: str, kind: str = "string", **extra: Any) -> dict[str, Any]:
    """A field as ``sObject Describe`` lists it (the parts idsync reads, and a few more)."""
    return {
        "name": name,
        "label": name.removesuffix("__c").replace("_", " "),
        "type": kind,
        "custom": name.endswith("__c"),
        "externalId": False,
        "unique": False,
        "nillable": True,
        "createable": kind != "id",
        "updateable": kind != "id",
    } | extra


def default_fields(sobject: str) -> dict[str, dict[str, Any]]:
    """The fields of a fresh org's Contact or Lead, with idsync's two custom fields."""
    fields = [
        _field("Id", "id", nillable=False),
        _field("FirstName"),
        _field("LastName", nillable=False),
        _field("Name", createable=False, updateable=False),
        _field("Email", "email"),
        _field("Phone", "phone"),
        _field("Title"),
        _field("Auth0_User_Id__c", externalId=True, unique=True),
        _field("Idsync_Deprovisioned__c", "boolean", nillable=False),
    ]
    if sobject == "Lead":
        fields += [_field("Company", nillable=False), _field("Status", "picklist")]
    return {f["name"]: f for f in fields}


def required_fields(sobject: str) -> list[str]:
    """Fields a record of ``sobject`` cannot be without."""
    return ["LastName", "Company"] if sobject == "Lead" else ["LastName"]


def id18(id15: str) -> str:
    """The 18-character form of a 15-character id: three letters encoding its case."""
    suffix = ""
    for start in (0, 5, 10):
        bits = sum(1 << i for i, char in enumerate(id15[start : start + 5]) if char.isupper())
        suffix += _CHECKSUM[bits]
    return id15 + suffix


class ApiError(Exception):
    """A whole-call error in Salesforce's shape: ``[{"message", "errorCode", "fields"}]``."""

    def __init__(self, status: int, code: str, message: str, fields: list[str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields or []

    def response(self) -> tuple[Response, int]:
        body = [{"message": self.message, "errorCode": self.code, "fields": self.fields}]
        return jsonify(body), self.status


class RecordError(Exception):
    """One record's refusal inside a Collections call, reported in its result."""

    def __init__(self, code: str, message: str, fields: list[str] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.fields = code, message, fields or []

    def body(self) -> dict[str, Any]:
        return {"statusCode": self.code, "message": self.message, "fields": self.fields}


@dataclass
class _Record:
    id: str  # 18 characters
    sobject: str
    fields: dict[str, Any]
    deleted: bool = False

    def to_json(self, names: list[str] | None = None, version: str = "62.0") -> dict[str, Any]:
        values = {"Id": self.id} | self.fields
        if names is not None:
            values = {name: values.get(name) for name in names}
        url = f"/services/data/v{version}/sobjects/{self.sobject}/{self.id}"
        return {"attributes": {"type": self.sobject, "url": url}} | values


@dataclass
class _Fault:
    remaining: int
    status: int = 500
    code: str = "UNKNOWN_EXCEPTION"
    message: str | None = None
    seconds: float = 0.0


@dataclass
class _RecordFault:
    code: str
    match: str  # an email, External ID value or record id, compared without case
    remaining: int
    message: str | None = None


@dataclass
class _Org:
    """Everything one fake org holds; callers hold the fake's lock."""

    fields: dict[str, dict[str, dict[str, Any]]]
    records: dict[str, _Record] = field(default_factory=dict)  # lowercased 18-char id -> record
    next_number: int = 1
    # (object, lowercased field) -> lowercased text value -> lowercased ids of records holding it
    index: defaultdict[tuple[str, str], defaultdict[str, set[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set))
    )

    def new_id(self, sobject: str) -> str:
        number, digits = self.next_number, ""
        self.next_number += 1
        while number:
            number, digit = divmod(number, 62)
            digits = _BASE62[digit] + digits
        return id18(ID_PREFIXES[sobject] + "Hs" + digits.rjust(10, "0"))

    def find(self, record_id: str) -> _Record | None:
        """The record with this 15-character (case-sensitive) or 18-character id."""
        if len(record_id) == 15:
            record_id = id18(record_id)
        if len(record_id) != 18:
            return None
        return self.records.get(record_id.lower())

    def matching(self, sobject: str, name: str, value: Any) -> list[_Record]:
        """Live records of ``sobject`` whose field ``name`` equals ``value``, ignoring case."""
        if name == "Id":
            found = self.find(str(value))
            return [found] if found and not found.deleted and found.sobject == sobject else []
        by_value = self.index.get((sobject, name.lower()))
        ids = by_value.get(str(value).lower(), set()) if by_value is not None else set()
        return [self.records[i] for i in sorted(ids) if not self.records[i].deleted]

    def store(self, record: _Record, fields: dict[str, Any]) -> None:
        """Give ``record`` these fields, keeping the index of text values in step."""
        for name, value in record.fields.items():
            if isinstance(value, str):
                self.index[(record.sobject, name.lower())][value.lower()].discard(record.id.lower())
        record.fields = fields
        self.records[record.id.lower()] = record
        for name, value in fields.items():
            if isinstance(value, str):
                self.index[(record.sobject, name.lower())][value.lower()].add(record.id.lower())


class FakeSalesforce(FakeServer):
    """A Salesforce org on 127.0.0.1 with switches for tests; use as a context manager."""

    label = "fake Salesforce"

    def __init__(
        self,
        port: int = 0,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        records_per_second: int = 200,
        daily_limit: int = 100_000,
        max_concurrent: int = 25,
    ) -> None:
        super().__init__(port)
        self._initial = (client_id, client_secret, records_per_second, daily_limit, max_concurrent)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.app = self._build_app()
        self.reset()

    # Test switches

    def reset(self) -> None:
        """Forget every record, token, fault and count: back to the constructor's settings."""
        client_id, client_secret, per_second, daily, concurrent = self._initial
        with self._lock:
            self._wake.set()
            self._wake = threading.Event()
            self._client_id, self._client_secret = client_id, client_secret
            self._records_per_second, self._daily_limit = per_second, daily
            self._max_concurrent = concurrent
            self._revoked: str | None = None
            self._tokens: set[str] = set()
            self._org = _Org({name: default_fields(name) for name in ID_PREFIXES})
            self._faults: deque[_Fault] = deque()
            self._slow: deque[_Fault] = deque()
            self._record_faults: list[_RecordFault] = []
            self._window: deque[tuple[float, int]] = deque()
            self._daily_used = 0
            self._in_flight = 0
            self._stats: Counter[str] = Counter()
            self._routes: Counter[str] = Counter()

    def fail(
        self, count: int = 1, status: int = 500, code: str | None = None, message: str | None = None
    ) -> None:
        """The next ``count`` API requests answer ``status`` with ``code``; nothing is applied."""
        default = {401: "INVALID_SESSION_ID", 403: "INSUFFICIENT_ACCESS", 404: "NOT_FOUND"}
        fault = _Fault(count, status, code or default.get(status, "UNKNOWN_EXCEPTION"), message)
        with self._lock:
            self._faults.append(fault)

    def slow(self, count: int, seconds: float) -> None:
        """The next ``count`` API requests are applied at once and answered ``seconds`` later."""
        with self._lock:
            self._slow.append(_Fault(count, seconds=seconds))

    def revoke(self, error: str = "invalid_client") -> None:
        """The app's credentials stop working: issued tokens die, the token endpoint refuses."""
        with self._lock:
            self._revoked = error
            self._tokens.clear()

    def restore(self) -> None:
        """The app's credentials work again (new tokens must be fetched)."""
        with self._lock:
            self._revoked = None

    def expire_tokens(self) -> None:
        """Every issued token expires, as after the org's session timeout."""
        with self._lock:
            self._tokens.clear()

    def remove_field(self, sobject: str, name: str) -> None:
        """``sobject`` loses the field ``name`` (describe, queries and writes stop knowing it)."""
        with self._lock:
            self._org.fields[sobject].pop(name, None)

    def add_field(self, sobject: str, name: str, *, external_id: bool = False) -> None:
        """``sobject`` gains a text field ``name`` (an External ID one if asked)."""
        with self._lock:
            self._org.fields[sobject][name] = _field(
                name, externalId=external_id, unique=external_id
            )

    def record_error(
        self, code: str, match: str, count: int = 1, message: str | None = None
    ) -> None:
        """The next ``count`` writes of the record matched by ``match`` (its email, External
        ID value or id) fail with ``code``: ``DUPLICATES_DETECTED``, ``UNABLE_TO_LOCK_ROW``,
        ``FIELD_CUSTOM_VALIDATION_EXCEPTION``, ``DUPLICATE_VALUE``, ..."""
        with self._lock:
            self._record_faults.append(_RecordFault(code, match.lower(), count, message))

    def set_limits(
        self,
        *,
        daily_limit: int | None = None,
        records_per_second: int | None = None,
        used: int | None = None,
        max_concurrent: int | None = None,
    ) -> None:
        """Change the 24-hour allocation, the calls already used, the ceiling or the cap."""
        with self._lock:
            if daily_limit is not None:
                self._daily_limit = daily_limit
            if used is not None:
                self._daily_used = used
            if records_per_second is not None:
                self._records_per_second = records_per_second
                self._window.clear()
            if max_concurrent is not None:
                self._max_concurrent = max_concurrent

    def seed(self, sobject: str, fields: dict[str, Any]) -> str:
        """A record made by hand in Salesforce (a sales team's Contact); returns its id."""
        with self._lock:
            record = _Record(self._org.new_id(sobject), sobject, {})
            self._org.store(record, dict(fields))
            return record.id

    def delete_by_hand(self, record_id: str) -> None:
        """Someone deletes the record in Salesforce (it goes to the recycle bin)."""
        with self._lock:
            record = self._org.find(record_id)
            if record is not None:
                record.deleted = True

    # Observation

    def records(self, sobject: str | None = None, *, deleted: bool = False) -> list[dict[str, Any]]:
        """Every live record (also deleted ones if asked), oldest first."""
        with self._lock:
            return [
                record.to_json() | ({"IsDeleted": record.deleted} if deleted else {})
                for record in self._org.records.values()
                if (sobject is None or record.sobject == sobject)
                and (deleted or not record.deleted)
            ]

    def record(self, record_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._org.find(record_id)
            return found.to_json() if found and not found.deleted else None

    def stats(self) -> dict[str, Any]:
        """``records_written``, ``requests``, ``throttled``, tokens issued, answers by route."""
        with self._lock:
            return dict(self._stats) | {
                "records_written": self._stats["records_written"],
                "requests": self._stats["requests"],
                "throttled": self._stats["throttled"],
                "api_usage": self._daily_used,
                "by_route": dict(self._routes),
            }

    # Request pipeline

    def before_stop(self) -> None:
        with self._lock:
            self._wake.set()

    def _before(self) -> Response | tuple[Response, int] | None:
        g.api = request.path.startswith("/services/data/")
        g.slow, g.admitted = 0.0, False
        if request.path.startswith("/_fake/"):
            return None
        with self._lock:
            self._stats["requests"] += 1
            g.wake = self._wake
            if not g.api:
                return None
            try:
                self._admit()
            except ApiError as error:
                if error.code == "REQUEST_LIMIT_EXCEEDED":
                    self._stats["throttled"] += 1
                return error.response()
        return None

    def _admit(self) -> None:
        """Refuse the request as Salesforce would, or count it; callers hold the lock."""
        authorization = request.headers.get("Authorization", "")
        token = authorization.removeprefix("Bearer ").strip()
        if not authorization.startswith("Bearer ") or not any(
            hmac.compare_digest(token, known) for known in self._tokens
        ):
            raise ApiError(401, "INVALID_SESSION_ID", "Session expired or invalid")
        version = _VERSION.match(request.path.split("/")[3])
        if not version or not MIN_VERSION <= int(version.group(1)) <= MAX_VERSION:
            raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
        if self._daily_used >= self._daily_limit:
            raise ApiError(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        if self._in_flight >= self._max_concurrent:
            raise ApiError(403, "REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded.")
        self._spend_ceiling(_records_in(request))
        self._daily_used += 1
        self._in_flight += 1
        g.admitted = True
        if self._faults:
            fault = self._take(self._faults)
            raise ApiError(
                fault.status, fault.code, fault.message or f"Injected failure ({fault.status})"
            )
        if self._slow:
            g.slow = self._take(self._slow).seconds

    def _spend_ceiling(self, records: int) -> None:
        """The fake's records-per-second ceiling, answered like the concurrency cap."""
        if records == 0:
            return
        now = time.monotonic()
        while self._window and self._window[0][0] <= now - 1.0:
            self._window.popleft()
        spent = sum(n for _, n in self._window)
        if self._window and spent + records > self._records_per_second:
            raise ApiError(403, "REQUEST_LIMIT_EXCEEDED", "ConcurrentPerOrgLongTxn Limit exceeded.")
        self._window.append((now, records))

    @staticmethod
    def _take(queue: deque[_Fault]) -> _Fault:
        fault = queue[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            queue.popleft()
        return fault

    def _after(self, response: Response) -> Response:
        if request.path.startswith("/_fake/"):
            return response
        if g.get("slow"):
            g.wake.wait(g.slow)
        with self._lock:
            if g.get("api"):
                response.headers["Sforce-Limit-Info"] = (
                    f"api-usage={self._daily_used}/{self._daily_limit}"
                )
            rule = request.url_rule.rule if request.url_rule else request.path
            self._routes[f"{request.method} {rule} {response.status_code}"] += 1
        return response

    def _teardown(self, exc: BaseException | None) -> None:
        if g.get("admitted"):
            with self._lock:
                self._in_flight -= 1

    # OAuth

    def _token(self) -> tuple[Response, int]:
        form = request.form
        with self._lock:
            if form.get("grant_type") != "client_credentials":
                return _oauth_error("unsupported_grant_type", "grant type not supported")
            good = hmac.compare_digest(
                form.get("client_id", ""), self._client_id
            ) and hmac.compare_digest(form.get("client_secret", ""), self._client_secret)
            if not good or self._revoked == "invalid_client":
                return _oauth_error("invalid_client", "invalid client credentials")
            if self._revoked:
                return _oauth_error(self._revoked, "no client credentials user enabled")
            token = f"00DHs0000000001!{secrets.token_urlsafe(24)}"
            self._tokens.add(token)
            self._stats["tokens_issued"] += 1
        issued = str(int(time.time() * 1000))
        return jsonify(
            access_token=token,
            instance_url=self.url,
            id=f"{self.url}/id/00DHs0000000001EAA/005Hs000000001AAA",
            token_type="Bearer",  # noqa: S106 - the scheme's name, not a secret
            issued_at=issued,
            signature=secrets.token_urlsafe(32),
            scope="api",
        ), 200

    # REST API

    def _describe(self, version: str, sobject: str) -> Response:
        with self._lock:
            fields = self._fields_of(sobject, status=404)
            return jsonify(
                name=sobject,
                label=sobject,
                custom=False,
                createable=True,
                updateable=True,
                deletable=True,
                fields=[dict(f) for f in fields.values()],
            )

    def _query(self, version: str) -> Response:
        soql = request.args.get("q", "")
        parsed = _QUERY.match(soql)
        if not parsed:
            raise ApiError(
                400,
                "MALFORMED_QUERY",
                "This fake parses only: SELECT f, ... FROM "
                "Object WHERE f IN ('a', ...) [AND g = null]",
            )
        values = _literals(parsed.group("values"))
        names = [name.strip() for name in parsed.group("fields").split(",")]
        sobject, key, empty = parsed.group("object"), parsed.group("key"), parsed.group("null")
        with self._lock:
            known = self._fields_of(sobject, status=400)
            lower = {name.lower(): name for name in known}
            for name in [*names, key, *([empty] if empty else [])]:
                if name.lower() not in lower:
                    raise ApiError(
                        400, "INVALID_FIELD", f"No such column '{name}' on entity '{sobject}'."
                    )
            key = lower[key.lower()]
            matches = {
                r.id: r for v in dict.fromkeys(values) for r in self._org.matching(sobject, key, v)
            }
            found = [
                record.to_json([lower[n.lower()] for n in names], version[1:])
                for record in matches.values()
                if not empty or _get(record, lower[empty.lower()]) in (None, "")
            ]
        return jsonify(totalSize=len(found), done=True, records=found)

    def _upsert(self, version: str, sobject: str, external: str) -> Response:
        body = _collection_body()
        with self._lock:
            known = self._fields_of(sobject, status=404)
            if external not in known or not known[external].get("externalId"):
                raise ApiError(
                    404,
                    "NOT_FOUND",
                    f"Provided external ID field does not exist or is not accessible: {external}",
                )
            records = self._checked(body, sobject, known)
            return self._apply(
                body, records, lambda org, r: self._upsert_one(org, sobject, external, r)
            )

    def _update(self, version: str) -> Response:
        body = _collection_body()
        with self._lock:
            types = {str((r.get("attributes") or {}).get("type")) for r in body["records"]}
            sobject = next(iter(types)) if len(types) == 1 else ""
            known = self._fields_of(sobject, status=400)
            records = self._checked(body, sobject, known)
            return self._apply(body, records, lambda org, r: self._update_one(org, sobject, r))

    def _delete(self, version: str) -> Response:
        ids = [i for i in request.args.get("ids", "").split(",") if i]
        _check_count(ids)
        results = []
        with self._lock:
            for record_id in ids:
                record = self._org.find(record_id)
                if record is None:
                    error = RecordError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id")
                    results.append({"id": record_id, "success": False, "errors": [error.body()]})
                elif record.deleted:
                    error = RecordError("ENTITY_IS_DELETED", "entity is deleted")
                    results.append({"id": record.id, "success": False, "errors": [error.body()]})
                else:
                    record.deleted = True
                    self._stats["records_written"] += 1
                    results.append({"id": record.id, "success": True, "errors": []})
        return jsonify(results)

    def _retrieve(self, version: str, sobject: str) -> Response:
        ids = [i for i in request.args.get("ids", "").split(",") if i]
        names = [n for n in request.args.get("fields", "").split(",") if n]
        _check_count(ids)
        if not names:
            raise ApiError(400, "MALFORMED_QUERY", "The fields parameter is required")
        with self._lock:
            known = self._fields_of(sobject, status=404)
            for name in names:
                if name not in known:
                    raise ApiError(
                        400, "INVALID_FIELD", f"No such column '{name}' on entity '{sobject}'."
                    )
            answer: list[dict[str, Any] | None] = []
            for record_id in ids:
                record = self._org.find(record_id)
                ok = record is not None and not record.deleted and record.sobject == sobject
                answer.append(record.to_json(names, version[1:]) if ok and record else None)
        return jsonify(answer)

    # Collections: checks and per-record writes (callers hold the lock)

    def _fields_of(self, sobject: str, *, status: int) -> dict[str, dict[str, Any]]:
        if sobject not in self._org.fields:
            if status == 404:
                raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
            raise ApiError(400, "INVALID_TYPE", f"sObject type '{sobject}' is not supported.")
        return self._org.fields[sobject]

    @staticmethod
    def _checked(
        body: dict[str, Any], sobject: str, known: dict[str, dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The records' fields, or the whole-call 400 Salesforce gives a malformed request."""
        checked = []
        for record in body["records"]:
            if (record.get("attributes") or {}).get("type") != sobject:
                raise ApiError(
                    400, "INVALID_TYPE", "Every record needs attributes.type " + repr(sobject)
                )
            fields = {k: v for k, v in record.items() if k != "attributes"}
            for name in fields:
                if name not in known:
                    raise ApiError(
                        400,
                        "INVALID_FIELD",
                        f"No such column '{name}' on sobject of type {sobject}",
                        [name],
                    )
                if not known[name]["updateable"] and name != "Id":
                    raise ApiError(
                        400,
                        "INVALID_FIELD_FOR_INSERT_UPDATE",
                        f"Unable to create/update fields: {name}.",
                        [name],
                    )
            checked.append(fields)
        return checked

    def _apply(self, body: dict[str, Any], records: list[dict[str, Any]], write: Any) -> Response:
        """Write each record on its own, or all or none when ``allOrNone`` asks for it."""
        # Each write is checked before it changes anything, so a failed record leaves no
        # trace; only all-or-none needs a copy to throw away.
        all_or_none = body.get("allOrNone") is True
        trial = copy.deepcopy(self._org) if all_or_none else self._org
        results: list[dict[str, Any]] = []
        for fields in records:
            try:
                results.append(write(trial, fields))
            except RecordError as error:
                results.append({"success": False, "errors": [error.body()]})
        failed = any(not r["success"] for r in results)
        if all_or_none and failed:
            rolled = RecordError("ALL_OR_NONE_OPERATION_ROLLED_BACK", "Record rolled back")
            return jsonify(
                [
                    r if not r["success"] else {"success": False, "errors": [rolled.body()]}
                    for r in results
                ]
            )
        self._org = trial
        self._stats["records_written"] += sum(1 for r in results if r["success"])
        return jsonify(results)

    def _upsert_one(
        self, org: _Org, sobject: str, external: str, fields: dict[str, Any]
    ) -> dict[str, Any]:
        value = fields.get(external)
        if value in (None, ""):
            raise RecordError("MISSING_ARGUMENT", f"{external} not specified", [external])
        if "Id" in fields:
            raise RecordError("INVALID_FIELD", "Id is not allowed in an upsert by External ID")
        matches = org.matching(sobject, external, value)
        if len(matches) > 1:
            ids = ", ".join(r.id for r in matches)
            raise RecordError(
                "DUPLICATE_EXTERNAL_ID",
                f"{external}: more than one record found for external id field: [{ids}]",
                [external],
            )
        self._injected(fields, matches[0] if matches else None)
        if matches:
            self._write(org, matches[0], fields)
            return {"id": matches[0].id, "success": True, "errors": [], "created": False}
        record = self._create(org, sobject, fields)
        return {"id": record.id, "success": True, "errors": [], "created": True}

    def _update_one(self, org: _Org, sobject: str, fields: dict[str, Any]) -> dict[str, Any]:
        record_id = str(fields.get("Id") or "")
        record = org.find(record_id)
        if record is None or record.sobject != sobject:
            code = (
                "MALFORMED_ID" if len(record_id) not in (15, 18) else "INVALID_CROSS_REFERENCE_KEY"
            )
            raise RecordError(code, f"invalid cross reference id: {record_id}", ["Id"])
        if record.deleted:
            raise RecordError("ENTITY_IS_DELETED", "entity is deleted")
        self._injected(fields, record)
        self._write(org, record, {k: v for k, v in fields.items() if k != "Id"})
        return {"id": record.id, "success": True, "errors": []}

    def _injected(self, fields: dict[str, Any], record: _Record | None) -> None:
        """A record_error switch that matches this record: its error, once per write."""
        keys = {str(v).lower() for v in fields.values() if isinstance(v, str)}
        if record is not None:
            keys |= {record.id.lower(), record.id[:15].lower()}
            keys |= {str(v).lower() for v in record.fields.values() if isinstance(v, str)}
        for fault in self._record_faults:
            if fault.remaining > 0 and fault.match in keys:
                fault.remaining -= 1
                raise RecordError(
                    fault.code,
                    fault.message or _DEFAULT_MESSAGES.get(fault.code, f"Injected {fault.code}"),
                )

    def _create(self, org: _Org, sobject: str, fields: dict[str, Any]) -> _Record:
        record = _Record(org.new_id(sobject), sobject, {})
        self._validate(org, record, fields, creating=True)
        org.store(record, {k: v for k, v in fields.items() if v not in (None, "")})
        return record

    def _write(self, org: _Org, record: _Record, fields: dict[str, Any]) -> None:
        self._validate(org, record, fields, creating=False)
        values = dict(record.fields)
        for name, value in fields.items():
            if value is None or value == "":
                values.pop(name, None)
            else:
                values[name] = value
        org.store(record, values)

    def _validate(
        self, org: _Org, record: _Record, fields: dict[str, Any], *, creating: bool
    ) -> None:
        merged = ({} if creating else dict(record.fields)) | fields
        missing = [n for n in required_fields(record.sobject) if merged.get(n) in (None, "")]
        if missing:
            raise RecordError(
                "REQUIRED_FIELD_MISSING",
                f"Required fields are missing: [{', '.join(missing)}]",
                missing,
            )
        email = fields.get("Email")
        if email not in (None, "") and not _EMAIL.match(str(email)):
            raise RecordError(
                "INVALID_EMAIL_ADDRESS", f"Email: invalid email address: {email}", ["Email"]
            )
        for name, meta in org.fields[record.sobject].items():
            value = fields.get(name)
            if not meta.get("unique") or value in (None, ""):
                continue
            for other in org.matching(record.sobject, name, value):
                if other.id != record.id:
                    raise RecordError(
                        "DUPLICATE_VALUE",
                        f"duplicate value found: {name} duplicates value on record with id: "
                        f"{other.id}",
                        [name],
                    )

    # Control API for other processes: no auth, not counted.

    def _control(self, action: str) -> Any:
        body = request.get_json(silent=True) or {}
        match request.method, action:
            case "GET", "stats":
                return jsonify(self.stats())
            case "GET", "records":
                return jsonify(records=self.records(request.args.get("object"), deleted=True))
            case "POST", "reset":
                self.reset()
            case "POST", "fail":
                self.fail(
                    int(body.get("count", 1)),
                    int(body.get("status", 500)),
                    body.get("code"),
                    body.get("message"),
                )
            case "POST", "slow":
                self.slow(int(body.get("count", 1)), float(body.get("seconds", 1.0)))
            case "POST", "revoke":
                self.revoke(str(body.get("error", "invalid_client")))
            case "POST", "restore":
                self.restore()
            case "POST", "expire_tokens":
                self.expire_tokens()
            case "POST", "remove_field":
                self.remove_field(str(body.get("object", "Contact")), str(body["name"]))
            case "POST", "add_field":
                self.add_field(
                    str(body.get("object", "Contact")),
                    str(body["name"]),
                    external_id=bool(body.get("external_id")),
                )
            case "POST", "record_error":
                self.record_error(
                    str(body["code"]),
                    str(body["match"]),
                    int(body.get("count", 1)),
                    body.get("message"),
                )
            case "POST", "limits":
                self.set_limits(
                    **{
                        k: int(body[k])
                        for k in ("daily_limit", "records_per_second", "used", "max_concurrent")
                        if k in body
                    }
                )
            case "POST", "seed":
                record_id = self.seed(str(body.get("object", "Contact")), dict(body["fields"]))
                return jsonify(id=record_id), 201
            case _:
                raise ApiError(404, "NOT_FOUND", f"No control route {request.method} {action}")
        return Response(status=204)

    def _build_app(self) -> Flask:
        app = Flask(__name__)
        app.before_request(self._before)
        app.after_request(self._after)
        app.teardown_request(self._teardown)
        app.register_error_handler(ApiError, lambda error: error.response())
        app.register_error_handler(KeyError, _missing_key)
        app.register_error_handler(HTTPException, _http_error)
        data = "/services/data/<version>"
        app.add_url_rule("/services/oauth2/token", "token", self._token, methods=["POST"])
        app.add_url_rule(f"{data}/sobjects/<sobject>/describe", "describe", self._describe)
        app.add_url_rule(f"{data}/query", "query", self._query)
        collections = f"{data}/composite/sobjects"
        app.add_url_rule(collections, "update", self._update, methods=["PATCH"])
        app.add_url_rule(collections, "delete", self._delete, methods=["DELETE"])
        app.add_url_rule(f"{collections}/<sobject>", "retrieve", self._retrieve)
        app.add_url_rule(
            f"{collections}/<sobject>/<external>", "upsert", self._upsert, methods=["PATCH"]
        )
        app.add_url_rule("/_fake/<action>", "control", self._control, methods=["GET", "POST"])
        return app


_DEFAULT_MESSAGES = {
    "DUPLICATES_DETECTED": "Use one of these records?",
    "UNABLE_TO_LOCK_ROW": "unable to obtain exclusive access to this record or 1 records",
    "FIELD_CUSTOM_VALIDATION_EXCEPTION": "A validation rule refused this record",
    "DUPLICATE_VALUE": "duplicate value found",
}


def _get(record: _Record, name: str) -> Any:
    return record.id if name == "Id" else record.fields.get(name)


def _literals(text: str) -> list[str]:
    """The SOQL string literals of an IN list, unescaped; MALFORMED_QUERY otherwise."""
    values, position = [], 0
    while position < len(text):
        match = _LITERAL.match(text, position)
        if not match:
            raise ApiError(400, "MALFORMED_QUERY", f"unexpected token near: {text[position:][:40]}")
        values.append(re.sub(r"\\(.)", r"\1", match.group(1)))
        position = match.end()
        if match.group(2) == "" and position < len(text):
            raise ApiError(400, "MALFORMED_QUERY", "unexpected token after the IN list")
    if not values:
        raise ApiError(400, "MALFORMED_QUERY", "an IN list needs at least one value")
    return values


def _collection_body() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        raise ApiError(400, "JSON_PARSER_ERROR", "Expected a JSON object with a records list")
    if not all(isinstance(r, dict) for r in body["records"]):
        raise ApiError(400, "JSON_PARSER_ERROR", "Every record must be a JSON object")
    _check_count(body["records"])
    return body


def _check_count(items: list[Any]) -> None:
    if len(items) > COLLECTION_LIMIT:
        raise ApiError(
            400,
            "EXCEEDED_ID_LIMIT",
            f"record limit reached. cannot submit more than {COLLECTION_LIMIT} records into "
            "this call",
        )


def _records_in(req: Any) -> int:
    """How many records a Collections call writes, deletes or reads, for the fake's
    per-second ceiling (describe and queries count none)."""
    if req.method == "PATCH":
        body = req.get_json(force=True, silent=True)
        records = body.get("records") if isinstance(body, dict) else None
        return len(records) if isinstance(records, list) else 0
    ids = req.args.get("ids") if "/composite/sobjects" in req.path else None
    return len(ids.split(",")) if ids else 0


def _oauth_error(error: str, description: str) -> tuple[Response, int]:
    return jsonify(error=error, error_description=description), 400


def _missing_key(error: KeyError) -> tuple[Response, int]:
    return ApiError(400, "MISSING_ARGUMENT", f"missing {error}").response()


def _http_error(error: HTTPException) -> tuple[Response, int]:
    status = error.code or 500
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(status, "UNKNOWN_EXCEPTION")
    return ApiError(status, code, error.description or error.name).response()


def main(argv: list[str] | None = None) -> int:
    """Run a fake Salesforce org until SIGTERM or SIGINT; prints its URL on the first line."""
    parser = argparse.ArgumentParser(prog="python -m idsync.fakes.salesforce", description=__doc__)
    parser.add_argument("--port", type=int, default=8098)
    parser.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    parser.add_argument("--client-secret", default=DEFAULT_CLIENT_SECRET)
    parser.add_argument(
        "--records-per-second", type=int, default=200, help="ceiling on records read or written"
    )
    parser.add_argument("--daily-limit", type=int, default=100_000, help="API calls per 24 h")
    parser.add_argument("--max-concurrent", type=int, default=25)
    args = parser.parse_args(argv)
    fake = FakeSalesforce(
        args.port,
        client_id=args.client_id,
        client_secret=args.client_secret,
        records_per_second=args.records_per_second,
        daily_limit=args.daily_limit,
        max_concurrent=args.max_concurrent,
    )
    return run_until_signal(fake)


if __name__ == "__main__":
    raise SystemExit(main())
