"""HubSpot CRM v3 contacts client: one HTTP call per method, typed errors, no retries.

The caller (the HubSpot destination) decides what to retry; this module only
says what happened. Every call is reported to ``on_call`` with a
:class:`CallRecord` that is safe to store: no host, no token, emails masked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import requests

from idsync.logs import mask_email, scrub
from workers.destinations.base import Headroom
from workers.destinations.http import (
    maybe_sent,
    parse_retry_after,
    read_before,
    transport_category,
)

CONTACTS = "/crm/v3/objects/contacts"
PROPERTIES = "/crm/v3/properties/contacts"
BATCH_LIMIT = 100
EXCERPT_LIMIT = 500
DEFAULT_TIMEOUT = (3.05, 10.0)

_EXISTING_ID = re.compile(r"Existing ID:\s*(\d+)")
_RATE_LIMIT_CATEGORIES = frozenset({"RATE_LIMITS", "RATE_LIMIT"})
# A per-input error in a 207 has no HTTP status of its own; its category says which one.
_CATEGORY_STATUS = {"VALIDATION_ERROR": 400, "OBJECT_NOT_FOUND": 404, "CONFLICT": 409}


@dataclass(frozen=True)
class RateLimitInfo(Headroom):
    """The rate-limit headroom HubSpot reported on one answer."""

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimitInfo | None:
        """Parse the ``X-HubSpot-RateLimit-*`` headers; None when there are none."""
        names = ("Max", "Remaining", "Interval-Milliseconds", "Daily", "Daily-Remaining")
        values = [_int_or_none(headers.get(f"X-HubSpot-RateLimit-{name}")) for name in names]
        if all(value is None for value in values):
            return None
        return cls(*values)


@dataclass(frozen=True)
class CallRecord:
    """One HTTP call to HubSpot, safe to store: no host, token or unmasked email."""

    method: str
    path: str
    status: int | None
    duration_ms: float
    error_category: str | None
    response_excerpt: str | None
    correlation_id: str | None


OnCall = Callable[[CallRecord, RateLimitInfo | None], None]
Contact = dict[str, Any]  # {"id": ..., "properties": {...}, ...} as HubSpot sends it
BatchInput = tuple[str, str, dict[str, str]]  # (trace id, email or contact id, properties)


class HubSpotError(Exception):
    """HubSpot refused a call (or never answered), with the fields of its error body."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        category: str | None = None,
        correlation_id: str | None = None,
        sub_category: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.category = category
        self.correlation_id = correlation_id
        self.sub_category = sub_category
        self.context = context

    def __str__(self) -> str:
        head = " ".join(str(part) for part in ("HubSpot", self.status, self.category) if part)
        tail = f" (correlation id {self.correlation_id})" if self.correlation_id else ""
        return f"{head}: {self.message}{tail}"


class HubSpotTransportError(HubSpotError):
    """No answer: connection refused or reset, DNS failure, timeout.

    ``maybe_applied`` is True when the request may have reached HubSpot (a read
    timed out, the connection dropped after sending): a write may still land.
    """

    def __init__(self, message: str, *, maybe_applied: bool = False, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.maybe_applied = maybe_applied


class HubSpotServerError(HubSpotError):
    """5xx or 423 (locked): HubSpot's side, worth retrying later."""


class HubSpotRateLimited(HubSpotError):
    """429 (or a 5xx with category RATE_LIMITS): wait out ``policy_name`` or ``retry_after``."""

    def __init__(
        self,
        message: str,
        *,
        policy_name: str | None = None,
        retry_after: float | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message, **fields)
        self.policy_name = policy_name
        self.retry_after = retry_after


class HubSpotAuthError(HubSpotError):
    """401 or 403: the token is wrong, revoked or lacks a scope; no call will succeed."""


class HubSpotBadRequest(HubSpotError):
    """400: HubSpot refused the input (an invalid email, or a property that does not exist)."""

    @property
    def missing_property(self) -> bool:
        """Whether a mapped property does not exist in the account (a configuration error)."""
        texts = (self.message, self.category or "", self.sub_category or "")
        return any("PROPERTY_DOESNT_EXIST" in text for text in texts)


class HubSpotNotFound(HubSpotError):
    """404: no such contact (never existed, archived, or a non-numeric id)."""


class HubSpotConflict(HubSpotError):
    """409: another contact already has this email; ``existing_id`` names it."""

    @property
    def existing_id(self) -> str | None:
        match = _EXISTING_ID.search(self.message)
        return match.group(1) if match else None


@dataclass
class BatchResult:
    """The outcome of a batch write, per input trace id."""

    results: dict[str, Contact] = field(default_factory=dict)
    errors: dict[str, HubSpotError] = field(default_factory=dict)


class HubSpotClient:
    """The contacts API of one HubSpot account over one keep-alive session."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        on_call: OnCall | None = None,
    ) -> None:
        if not base_url.startswith(("https://", "http://")):
            raise ValueError(f"HubSpot base URL must start with https:// (got {base_url!r})")
        if not token:
            raise ValueError("HubSpot token is empty: set HUBSPOT_TOKEN to a private app token")
        self._base_url = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout
        self._on_call = on_call
        self._session = requests.Session()
        # An auth object, not a header: with session auth set, requests never lets a
        # ~/.netrc entry replace the token.
        self._session.auth = _BearerAuth(token)
        self._session.headers.update({"Accept": "application/json", "User-Agent": "idsync"})

    def __repr__(self) -> str:
        return f"HubSpotClient(base_url={self._base_url!r})"

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    def __enter__(self) -> HubSpotClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get_contact_by_email(
        self, email: str, properties: list[str] | None = None
    ) -> Contact | None:
        """The contact with this email, or None."""
        params = {"idProperty": "email"} | _properties_param(properties)
        path, shown = f"{CONTACTS}/{quote(email, safe='')}", f"{CONTACTS}/{mask_email(email)}"
        return self._get_or_none(path, params, shown)

    def get_contact(self, contact_id: str, properties: list[str] | None = None) -> Contact | None:
        """The contact with this id (merged ids answer with the surviving contact), or None."""
        path = f"{CONTACTS}/{quote(contact_id, safe='')}"
        return self._get_or_none(path, _properties_param(properties), path)

    def create_contact(self, properties: dict[str, str]) -> Contact:
        """Create a contact; a taken email raises HubSpotConflict naming the existing id."""
        return _json(self._call("POST", CONTACTS, body={"properties": properties}))

    def update_contact(self, contact_id: str, properties: dict[str, str]) -> Contact:
        """Update a contact by id; ``""`` clears a property."""
        path = f"{CONTACTS}/{quote(contact_id, safe='')}"
        return _json(self._call("PATCH", path, body={"properties": properties}))

    def archive_contact(self, contact_id: str) -> None:
        """Archive a contact by id (HubSpot answers 204 for unknown ids too)."""
        self._call("DELETE", f"{CONTACTS}/{quote(contact_id, safe='')}")

    def batch_read_by_email(
        self, emails: list[str], properties: list[str] | None = None
    ) -> dict[str, Contact]:
        """Lowercased email -> contact for the emails that exist; missing ones are absent."""
        wanted = list(dict.fromkeys(email.lower() for email in emails))
        _check_batch_size(wanted)
        if not wanted:
            return {}
        body = {
            "idProperty": "email",
            "inputs": [{"id": email} for email in wanted],
            "properties": list(dict.fromkeys(["email", *(properties or [])])),
        }
        answer = _json(self._call("POST", f"{CONTACTS}/batch/read", body=body))
        contacts = {}
        for contact in _results(answer):
            email = (contact.get("properties") or {}).get("email")
            if email:
                contacts[email.lower()] = contact
        return contacts

    def batch_read(
        self, contact_ids: list[str], properties: list[str] | None = None
    ) -> dict[str, Contact]:
        """Contact id -> contact for the ids that exist (archived ones are absent).

        A merged id answers with the surviving contact, under the id that was asked.
        """
        wanted = list(dict.fromkeys(contact_ids))
        _check_batch_size(wanted)
        if not wanted:
            return {}
        body = {
            "inputs": [{"id": contact_id} for contact_id in wanted],
            "properties": list(dict.fromkeys(properties or [])),
        }
        answer = _json(self._call("POST", f"{CONTACTS}/batch/read", body=body))
        contacts: dict[str, Contact] = {}
        for contact in _results(answer):
            asked = str(contact.get("id"))
            merged = _as_list((contact.get("properties") or {}).get("hs_merged_object_ids"))
            for contact_id in [asked, *merged]:
                if contact_id in wanted:
                    contacts[contact_id] = contact
        return contacts

    def get_property(self, name: str) -> dict[str, Any] | None:
        """The contact property ``name`` (needs the crm.schemas.contacts.read scope), or None."""
        path = f"{PROPERTIES}/{quote(name, safe='')}"
        return self._get_or_none(path, {}, path)

    def batch_upsert_by_email(self, inputs: list[BatchInput]) -> BatchResult:
        """Create or update contacts keyed by email; inputs are (trace id, email, properties)."""
        _check_batch(inputs)
        if not inputs:
            return BatchResult()
        body = {
            "inputs": [
                {"id": email.lower(), "idProperty": "email", "objectWriteTraceId": trace_id}
                | {"properties": dict(properties)}
                for trace_id, email, properties in inputs
            ]
        }
        response = self._call(
            "POST", f"{CONTACTS}/batch/upsert", params={"idProperty": "email"}, body=body
        )
        traces = {email.lower(): trace_id for trace_id, email, _ in inputs}
        return _batch_result(_json(response), traces, _result_email, self._redact)

    def batch_create(self, inputs: list[BatchInput]) -> BatchResult:
        """Create contacts; inputs are (trace id, email, properties).

        A taken email fails only its own input, with a 409 whose message names the
        existing contact (``HubSpotConflict.existing_id``).
        """
        _check_batch(inputs)
        if not inputs:
            return BatchResult()
        body = {
            "inputs": [
                {"objectWriteTraceId": trace_id, "properties": dict(properties)}
                for trace_id, _email, properties in inputs
            ]
        }
        response = self._call("POST", f"{CONTACTS}/batch/create", body=body)
        traces = {email.lower(): trace_id for trace_id, email, _ in inputs}
        return _batch_result(_json(response), traces, _result_email, self._redact)

    def batch_update(self, inputs: list[BatchInput]) -> BatchResult:
        """Update contacts by id; inputs are (trace id, contact id, properties)."""
        _check_batch(inputs)
        if not inputs:
            return BatchResult()
        body = {
            "inputs": [
                {"id": contact_id, "objectWriteTraceId": trace_id, "properties": dict(properties)}
                for trace_id, contact_id, properties in inputs
            ]
        }
        response = self._call("POST", f"{CONTACTS}/batch/update", body=body)
        traces = {contact_id: trace_id for trace_id, contact_id, _ in inputs}
        return _batch_result(_json(response), traces, _result_id, self._redact)

    def batch_archive(self, contact_ids: list[str]) -> None:
        """Archive contacts by id (unknown ids are fine)."""
        _check_batch_size(contact_ids)
        if contact_ids:
            body = {"inputs": [{"id": contact_id} for contact_id in contact_ids]}
            self._call("POST", f"{CONTACTS}/batch/archive", body=body)

    def _get_or_none(self, path: str, params: dict[str, str], shown_path: str) -> Contact | None:
        try:
            return _json(self._call("GET", path, params=params, shown_path=shown_path))
        except HubSpotNotFound:
            return None

    def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        shown_path: str | None = None,
    ) -> requests.Response:
        """Send one request, report it to ``on_call``, and raise the typed error for non-2xx.

        The whole call, answer included, ends within connect + read timeout: the
        read timeout of ``requests`` applies to each socket read, so a trickling
        answer is read here against the call's own deadline.
        """
        shown = (shown_path or path) + (f"?{urlencode(params)}" if params else "")
        started = time.perf_counter()
        connect, read = self._timeout
        deadline = time.monotonic() + connect + read
        try:
            response = self._session.request(
                method,
                self._base_url + path,
                params=params,
                json=body,
                timeout=(connect, read),
                allow_redirects=False,
                stream=True,
            )
            # What iter_content would have left behind, so .json() and .text read it.
            response._content = read_before(response, deadline)
            response._content_consumed = True  # type: ignore[attr-defined]
        except requests.RequestException as exc:
            error = _transport_error(method, shown, exc)
            record = CallRecord(method, shown, None, _ms_since(started), error.category, None, None)
            self._report(record, None)
            # Not chained: the library's message holds the full URL, emails included.
            raise error from None
        duration = _ms_since(started)
        ratelimit = RateLimitInfo.from_headers(response.headers)
        status = response.status_code
        if 200 <= status < 300:
            self._report(CallRecord(method, shown, status, duration, None, None, None), ratelimit)
            return response
        error = _error_from_answer(status, _json_or_none(response), response.headers, self._redact)
        record = CallRecord(
            method=method,
            path=shown,
            status=status,
            duration_ms=duration,
            error_category=error.category or f"HTTP_{status}",
            response_excerpt=self._redact(response.text)[:EXCERPT_LIMIT],
            correlation_id=error.correlation_id,
        )
        self._report(record, ratelimit)
        raise error

    def _report(self, record: CallRecord, ratelimit: RateLimitInfo | None) -> None:
        if self._on_call is not None:
            self._on_call(record, ratelimit)

    def _redact(self, text: str) -> str:
        """``text`` without the token, credentials or unmasked emails."""
        return scrub(text.replace(self._token, "***"))


class _BearerAuth(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


def _error_from_answer(
    status: int | None,
    body: Mapping[str, Any] | None,
    headers: Mapping[str, str],
    redact: Callable[[str], str],
) -> HubSpotError:
    """The typed error for a whole-call answer or for one input of a 207."""
    body = body or {}
    category = body.get("category") or body.get("errorType")
    message = str(body.get("message") or f"HubSpot answered HTTP {status} without a message")
    fields: dict[str, Any] = {
        "status": status,
        "category": category,
        "correlation_id": body.get("correlationId") or headers.get("X-HubSpot-Correlation-Id"),
        "sub_category": body.get("subCategory"),
        "context": _dict_or_none(body.get("context")),
    }
    message = redact(message)
    if status == 429 or (category in _RATE_LIMIT_CATEGORIES and (status or 0) >= 500):
        policy = body.get("policyName")
        retry_after = parse_retry_after(headers.get("Retry-After"))
        return HubSpotRateLimited(message, policy_name=policy, retry_after=retry_after, **fields)
    return _ERROR_CLASSES.get(status, _server_or_plain(status))(message, **fields)


_ERROR_CLASSES: dict[int | None, type[HubSpotError]] = {
    400: HubSpotBadRequest,
    401: HubSpotAuthError,
    403: HubSpotAuthError,
    404: HubSpotNotFound,
    409: HubSpotConflict,
    423: HubSpotServerError,
}


def _server_or_plain(status: int | None) -> type[HubSpotError]:
    return HubSpotServerError if status is not None and status >= 500 else HubSpotError


def _transport_error(method: str, shown_path: str, exc: requests.RequestException) -> HubSpotError:
    message = f"no answer to {method} {shown_path}: {type(exc).__name__}"
    return HubSpotTransportError(
        message, category=transport_category(exc), maybe_applied=maybe_sent(exc)
    )


def _batch_result(
    answer: Mapping[str, Any],
    traces: dict[str, str],
    key_of: Callable[[dict[str, Any]], str | None],
    redact: Callable[[str], str],
) -> BatchResult:
    """Map a batch answer back to the inputs' trace ids (``traces`` maps input key -> trace)."""
    known = set(traces.values())
    outcome = BatchResult()
    for result in _results(answer):
        trace_id = result.get("objectWriteTraceId") or traces.get(str(key_of(result) or "").lower())
        if trace_id in known and result.get("id") is not None:
            outcome.results[trace_id] = result
    unmapped: list[HubSpotError] = []
    for item in _results(answer, "errors"):
        status = _CATEGORY_STATUS.get(str(item.get("category")))
        error = _error_from_answer(status, item, {}, redact)
        trace_ids = _error_trace_ids(item, traces) & known
        for trace_id in trace_ids:
            outcome.errors[trace_id] = error
        if not trace_ids:
            unmapped.append(error)
    missing = [t for t in traces.values() if t not in outcome.results and t not in outcome.errors]
    for trace_id in missing:
        # One error and one input without an answer belong together; otherwise say so.
        if len(unmapped) == 1 and len(missing) == 1:
            outcome.errors[trace_id] = unmapped[0]
        else:
            outcome.errors[trace_id] = HubSpotError(
                "HubSpot answered the batch without a result for this input",
                category="MISSING_RESULT",
            )
    return outcome


def _results(answer: Mapping[str, Any], name: str = "results") -> list[dict[str, Any]]:
    """The objects of a batch answer's list, or HubSpotServerError for another shape."""
    items = answer.get(name) or []
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise HubSpotServerError(
            f"HubSpot answered a batch whose {name!r} is not a list of objects",
            category="INVALID_RESPONSE",
        )
    return items


def _error_trace_ids(item: Mapping[str, Any], traces: dict[str, str]) -> set[str]:
    """Trace ids an error names, directly or through the input ids it lists."""
    context = _dict_or_none(item.get("context")) or {}
    named = _as_list(context.get("objectWriteTraceId")) + _as_list(item.get("objectWriteTraceId"))
    if named:
        return set(named)
    keys = _as_list(context.get("ids")) + _as_list(context.get("id"))
    return {traces[key.lower()] for key in keys if key.lower() in traces}


def _result_email(result: dict[str, Any]) -> str | None:
    properties = result.get("properties")
    return properties.get("email") if isinstance(properties, dict) else None


def _result_id(result: dict[str, Any]) -> str | None:
    return result.get("id")


def _check_batch(inputs: list[BatchInput]) -> None:
    _check_batch_size(inputs)
    trace_ids = [trace_id for trace_id, _, _ in inputs]
    if len(set(trace_ids)) != len(trace_ids):
        raise ValueError("every batch input needs its own trace id")


def _check_batch_size(inputs: Sized) -> None:
    count = len(inputs)
    if count > BATCH_LIMIT:
        raise ValueError(f"HubSpot takes at most {BATCH_LIMIT} inputs per batch, not {count}")


def _properties_param(properties: list[str] | None) -> dict[str, str]:
    return {"properties": ",".join(properties)} if properties else {}


def _json(response: requests.Response) -> dict[str, Any]:
    body = _json_or_none(response)
    if body is None:
        raise HubSpotServerError(
            f"HubSpot answered HTTP {response.status_code} with a body that is not a JSON object",
            status=response.status_code,
            category="INVALID_RESPONSE",
        )
    return body


def _json_or_none(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _dict_or_none(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _as_list(value: object) -> list[str]:
    if isinstance(value, list):
        return [str(item) for item in value]
    return [str(value)] if value else []


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
