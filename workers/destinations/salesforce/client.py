"""Salesforce REST client: a client-credentials token, one HTTP call per method, typed errors.

The caller (the Salesforce destination) decides what to retry; this module
only says what happened. Facts it relies on (developer.salesforce.com):

- "OAuth 2.0 Client Credentials Flow for Server-to-Server Integration":
  ``POST {My Domain}/services/oauth2/token`` with ``grant_type=client_credentials``,
  form-encoded, answers ``access_token`` and ``instance_url``; API calls go to
  ``instance_url``. No refresh token: a new token is fetched the same way.
- "Status Codes and Error Responses": error bodies are JSON arrays
  ``[{"message", "errorCode", "fields"}]``; an expired session is 401
  ``INVALID_SESSION_ID``; the token endpoint answers ``{"error", "error_description"}``.
- "Limit Info Header": every REST answer carries ``Sforce-Limit-Info: api-usage=N/M``.

Every request first passes ``before_request`` (the destination's deadline and
rate limiter), token requests included, and is reported to ``on_call`` as a
:class:`CallRecord` that is safe to store: no host, no token, emails masked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from idsync.logs import scrub
from workers.destinations.base import Headroom
from workers.destinations.http import maybe_sent, read_before, transport_category

EXCERPT_LIMIT = 500
TOKEN_PATH = "/services/oauth2/token"  # noqa: S105 - a path, not a secret
COLLECTION_LIMIT = 200
_LIMIT_INFO = re.compile(r"api-usage=(\d+)/(\d+)")
# Whole-call codes that mean the configuration is wrong, not the data: a mapped or
# external id field that does not exist, an object the integration user cannot see,
# an org without API access ("Status Codes and Error Responses").
MISCONFIGURED_CODES = frozenset(
    {
        "INVALID_FIELD",
        "INVALID_FIELD_FOR_INSERT_UPDATE",
        "INVALID_TYPE",
        "NOT_FOUND",
        "INSUFFICIENT_ACCESS",
        "INSUFFICIENT_ACCESS_OR_READONLY",
        "API_DISABLED_FOR_ORG",
        "API_CURRENTLY_DISABLED",
    }
)


@dataclass(frozen=True)
class CallRecord:
    """One HTTP call to Salesforce, safe to store: no host, token or unmasked email."""

    method: str
    path: str
    status: int | None
    duration_ms: float
    error_category: str | None
    response_excerpt: str | None


class SalesforceError(Exception):
    """Salesforce refused a call (or never answered), with the first error it named."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        fields: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.fields = fields or []

    def __str__(self) -> str:
        head = " ".join(str(part) for part in ("Salesforce", self.status, self.code) if part)
        return f"{head}: {self.message}"


class SalesforceTransportError(SalesforceError):
    """No answer: connection refused or reset, timeout.

    ``maybe_applied`` is True when the request may have reached Salesforce: a
    write may still land.
    """

    def __init__(self, message: str, *, maybe_applied: bool = False, **fields: Any) -> None:
        super().__init__(message, **fields)
        self.maybe_applied = maybe_applied


class SalesforceAuthError(SalesforceError):
    """The token endpoint refused the client (``invalid_client``, ``invalid_grant``), or a
    fresh token was refused too: no call will succeed until someone fixes the app."""


class SalesforceMisconfigured(SalesforceError):
    """The object, a field or API access is missing: the mapping or the org needs a human."""


class SalesforceLimitExceeded(SalesforceError):
    """403 ``REQUEST_LIMIT_EXCEEDED``: the 24-hour allocation or the concurrency cap is spent."""

    @property
    def daily(self) -> bool:
        """Whether the 24-hour allocation is spent (not the cap on concurrent long calls)."""
        text = self.message.lower()
        return "totalrequests" in text or ("concurrent" not in text and "longtxn" not in text)


class SalesforceServerError(SalesforceError):
    """5xx, or an answer of a shape Salesforce does not send: worth retrying later."""


class SalesforceBadRequest(SalesforceError):
    """Another 4xx: Salesforce refused this request's content."""


@dataclass(frozen=True)
class Token:
    """An access token and the instance its API calls go to."""

    access_token: str
    instance_url: str


BeforeRequest = Callable[[], None]
OnCall = Callable[[CallRecord, Headroom | None], None]


class SalesforceClient:
    """The REST API of one org over one keep-alive session, authenticated as its app."""

    def __init__(
        self,
        login_url: str,
        client_id: str,
        client_secret: str,
        api_version: str,
        *,
        timeout: tuple[float, float],
        before_request: BeforeRequest | None = None,
        on_call: OnCall | None = None,
    ) -> None:
        self._login_url = login_url.rstrip("/")
        self._client_id = client_id
        self._client_secret = client_secret
        self._api = f"/services/data/v{api_version}"
        self._timeout = timeout
        self._before_request = before_request or (lambda: None)
        self._on_call = on_call
        self._token: Token | None = None  # cached for this process; fetched again on 401
        self._session = requests.Session()
        self._session.headers.update({"Accept": "application/json", "User-Agent": "idsync"})

    def __repr__(self) -> str:
        return f"SalesforceClient(login_url={self._login_url!r})"

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    # Authentication

    def token(self) -> Token:
        """The cached token, or a new one from the token endpoint."""
        if self._token is None:
            self._token = self._fetch_token()
        return self._token

    def forget_token(self) -> None:
        """Drop the cached token: the next call fetches a new one (the probe checks the app)."""
        self._token = None

    def _fetch_token(self) -> Token:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
        }
        response = self._send("POST", self._login_url + TOKEN_PATH, TOKEN_PATH, data=form)
        body = _json_or_none(response)
        if response.status_code != 200 or not isinstance(body, dict):
            raise self._token_error(response, body)
        access_token, instance_url = body.get("access_token"), body.get("instance_url")
        if not isinstance(access_token, str) or not isinstance(instance_url, str):
            raise SalesforceServerError(
                "the token endpoint answered without access_token and instance_url",
                status=response.status_code,
                code="INVALID_RESPONSE",
            )
        return Token(access_token, instance_url.rstrip("/"))

    def _token_error(self, response: requests.Response, body: Any) -> SalesforceError:
        status = response.status_code
        fields = body if isinstance(body, dict) else {}
        code = str(fields.get("error") or f"HTTP_{status}")
        description = str(fields.get("error_description") or "no description")
        message = self._redact(f"token request refused: {code}: {description}")
        if status >= 500:
            return SalesforceServerError(message, status=status, code=code)
        return SalesforceAuthError(message, status=status, code=code)

    # API calls

    def describe(self, sobject: str) -> dict[str, Any]:
        """``GET /sobjects/{SObject}/describe``: the object's fields ("sObject Describe")."""
        return _object(self._api_call("GET", f"/sobjects/{quote(sobject)}/describe"))

    def query(self, soql: str, *, shown: str) -> list[dict[str, Any]]:
        """The records a SOQL query finds, following ``nextRecordsUrl`` ("Query").

        ``shown`` stands for the query in the call record (the query holds emails).
        """
        answer = _object(self._api_call("GET", "/query", params={"q": soql}, shown=shown))
        records = list(_records(answer))
        while not answer.get("done", True) and isinstance(answer.get("nextRecordsUrl"), str):
            path = str(answer["nextRecordsUrl"]).removeprefix(self._api)
            answer = _object(self._api_call("GET", path, shown=f"{shown} (next page)"))
            records += _records(answer)
        return records

    def upsert(
        self, sobject: str, external_id_field: str, records: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Create or update up to 200 records keyed by an External ID field.

        One result per record, in request order: ``{"id", "success", "created",
        "errors"}`` ("Upsert Records Using sObject Collections").
        """
        path = f"/composite/sobjects/{quote(sobject)}/{quote(external_id_field)}"
        return self._collection("PATCH", path, sobject, records)

    def update(self, sobject: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Update up to 200 records by their ``Id`` ("Update Records Using sObject Collections")."""
        return self._collection("PATCH", "/composite/sobjects", sobject, records)

    def delete(self, ids: list[str]) -> list[dict[str, Any]]:
        """Delete up to 200 records by id, each on its own ("Delete Records Using sObject
        Collections"); one result per id, in order."""
        _check_size(ids)
        params = {"ids": ",".join(ids), "allOrNone": "false"}
        return _results(self._api_call("DELETE", "/composite/sobjects", params=params), len(ids))

    def retrieve(
        self, sobject: str, ids: list[str], fields: list[str]
    ) -> list[dict[str, Any] | None]:
        """Up to 200 records by id with ``fields``, in order; None where no record is
        ("Get Records Using sObject Collections")."""
        _check_size(ids)
        params = {"ids": ",".join(ids), "fields": ",".join(fields)}
        answer = self._api_call("GET", f"/composite/sobjects/{quote(sobject)}", params=params)
        if not isinstance(answer, list) or len(answer) != len(ids):
            raise _shape_error("a list with one entry per id")
        return [item if isinstance(item, dict) else None for item in answer]

    def _collection(
        self, method: str, path: str, sobject: str, records: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        _check_size(records)
        body = {
            "allOrNone": False,
            "records": [{"attributes": {"type": sobject}} | record for record in records],
        }
        return _results(self._api_call(method, path, body=body), len(records))

    def _api_call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        shown: str | None = None,
    ) -> Any:
        """One API call with the cached token; an expired session gets one new token."""
        for attempt in (1, 2):
            token = self.token()
            response = self._send(
                method,
                token.instance_url + self._api + path,
                shown or self._api + path,
                params=params,
                json=body,
                auth=_BearerAuth(token.access_token),
            )
            if response.status_code == 401 and attempt == 1:
                self._token = None  # "Session expired or invalid": fetch a new token once
                continue
            if 200 <= response.status_code < 300:
                return _json_or_none(response)
            raise self._api_error(response)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _api_error(self, response: requests.Response) -> SalesforceError:
        status = response.status_code
        code, message, fields = _first_error(_json_or_none(response))
        code = code or f"HTTP_{status}"
        message = self._redact(message or f"Salesforce answered HTTP {status} without a message")
        if status == 401:
            self._token = None
            return SalesforceAuthError(message, status=status, code=code, fields=fields)
        if status == 403 and code == "REQUEST_LIMIT_EXCEEDED":
            return SalesforceLimitExceeded(message, status=status, code=code, fields=fields)
        if status in (403, 404) or code in MISCONFIGURED_CODES:
            return SalesforceMisconfigured(message, status=status, code=code, fields=fields)
        if status >= 500:
            return SalesforceServerError(message, status=status, code=code, fields=fields)
        return SalesforceBadRequest(message, status=status, code=code, fields=fields)

    def _send(
        self,
        method: str,
        url: str,
        shown: str,
        *,
        auth: requests.auth.AuthBase | None = None,
        **kw: Any,
    ) -> requests.Response:
        """Send one request within connect + read timeout, answer included, and report it."""
        self._before_request()
        started = time.perf_counter()
        connect, read = self._timeout
        deadline = time.monotonic() + connect + read
        try:
            response = self._session.request(
                method,
                url,
                timeout=(connect, read),
                allow_redirects=False,
                stream=True,
                # An auth object, never a header: requests then never lets ~/.netrc replace it.
                auth=auth or _NoAuth(),
                **kw,
            )
            response._content = read_before(response, deadline)
            response._content_consumed = True  # type: ignore[attr-defined]
        except requests.RequestException as exc:
            category = transport_category(exc)
            self._report(CallRecord(method, shown, None, _ms_since(started), category, None), None)
            # Not chained: the library's message holds the full URL, emails included.
            raise SalesforceTransportError(
                f"no answer to {method} {shown}: {type(exc).__name__}",
                code=category,
                maybe_applied=maybe_sent(exc),
            ) from None
        status = response.status_code
        ok = 200 <= status < 300
        record = CallRecord(
            method=method,
            path=shown,
            status=status,
            duration_ms=_ms_since(started),
            error_category=None
            if ok
            else _first_error(_json_or_none(response))[0] or f"HTTP_{status}",
            response_excerpt=None if ok else self._redact(response.text)[:EXCERPT_LIMIT],
        )
        self._report(record, limit_info(response.headers))
        return response

    def _report(self, record: CallRecord, headroom: Headroom | None) -> None:
        if self._on_call is not None:
            self._on_call(record, headroom)

    def _redact(self, text: str) -> str:
        """``text`` without the client secret, the token or unmasked emails."""
        for secret in (self._client_secret, self._token.access_token if self._token else ""):
            if secret:
                text = text.replace(secret, "***")
        return scrub(text)


def limit_info(headers: Mapping[str, str]) -> Headroom | None:
    """The 24-hour allocation from ``Sforce-Limit-Info: api-usage=N/M`` ("Limit Info Header")."""
    match = _LIMIT_INFO.search(headers.get("Sforce-Limit-Info") or "")
    if not match:
        return None
    used, allowed = int(match.group(1)), int(match.group(2))
    return Headroom(
        max=None,
        remaining=None,
        interval_ms=None,
        daily=allowed,
        daily_remaining=max(0, allowed - used),
    )


class _BearerAuth(requests.auth.AuthBase):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request


class _NoAuth(requests.auth.AuthBase):
    """No credentials in a header (the token request carries them in its form)."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        return request


def _first_error(body: Any) -> tuple[str | None, str | None, list[str]]:
    """(errorCode, message, fields) of the first error in a Salesforce error array."""
    items = body if isinstance(body, list) else [body]
    for item in items:
        if isinstance(item, dict) and ("errorCode" in item or "message" in item):
            fields = item.get("fields")
            return (
                str(item.get("errorCode") or "") or None,
                str(item.get("message") or "") or None,
                [str(f) for f in fields] if isinstance(fields, list) else [],
            )
    return None, None, []


def _records(answer: dict[str, Any]) -> list[dict[str, Any]]:
    records = answer.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise _shape_error("a query result with a list of records")
    return records


def _results(answer: Any, count: int) -> list[dict[str, Any]]:
    """The per-record results of a Collections call: one object per record, in order."""
    if (
        not isinstance(answer, list)
        or len(answer) != count
        or not all(isinstance(item, dict) for item in answer)
    ):
        raise _shape_error(f"a list of {count} results")
    return answer


def _object(answer: Any) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise _shape_error("a JSON object")
    return answer


def _shape_error(expected: str) -> SalesforceServerError:
    return SalesforceServerError(
        f"Salesforce answered something other than {expected}", code="INVALID_RESPONSE"
    )


def _check_size(items: list[Any]) -> None:
    if len(items) > COLLECTION_LIMIT:
        raise ValueError(
            f"sObject Collections take at most {COLLECTION_LIMIT} records, not {len(items)}"
        )


def _json_or_none(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
