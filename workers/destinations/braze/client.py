"""One call to Braze's REST API: a POST with the key as Bearer, read against its own deadline.

The client says what came back and nothing more: the adapter decides what an
answer means for each user. Every answer's ``X-RateLimit-*`` headers are read
(``shared/reference/destinations.md``, "Braze": ``X-RateLimit-Reset`` is in epoch
seconds, and the names are lowercase under HTTP/2; ``requests`` reads headers
without regard to case).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import requests

from workers.destinations.base import Headroom
from workers.destinations.http import maybe_sent, parse_retry_after, read_before, transport_category

# Braze's answers are short JSON objects; the rest of a huge one is not read.
MAX_ANSWER_BYTES = 256 * 1024


@dataclass(frozen=True)
class RateLimit:
    """The ``X-RateLimit-*`` headers of one answer (None: not sent)."""

    limit: int | None
    remaining: int | None
    reset: float | None  # epoch seconds

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimit | None:
        """The headers' values; None when the answer carried none of them."""
        values = [
            _number(headers.get(f"X-RateLimit-{name}")) for name in ("Limit", "Remaining", "Reset")
        ]
        if all(value is None for value in values):
            return None
        limit, remaining, reset = values
        return cls(
            None if limit is None else int(limit),
            None if remaining is None else int(remaining),
            reset,
        )

    def headroom(self) -> Headroom:
        """As the metrics' gauges read it; Braze names no window length, so none is given."""
        return Headroom(
            max=self.limit,
            remaining=self.remaining,
            interval_ms=None,
            daily=None,
            daily_remaining=None,
        )

    def seconds_to_reset(self, now: float) -> float | None:
        """How long until the window resets, from the epoch-seconds ``X-RateLimit-Reset``."""
        return None if self.reset is None else max(0.0, self.reset - now)


@dataclass(frozen=True)
class Answer:
    """What one call got back: an HTTP answer, or the transport error that replaced it."""

    status: int | None
    body: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    rate_limit: RateLimit | None = None
    retry_after: float | None = None
    duration_ms: float = 0.0
    error_category: str | None = None  # TIMEOUT, CONNECTION_ERROR, REQUEST_ERROR
    maybe_sent: bool = False  # no answer, but the request may have reached Braze

    @property
    def message(self) -> str:
        """Braze's ``message``, or the start of a body that has none."""
        message = self.body.get("message")
        if isinstance(message, str) and message:
            return message
        return self.text.strip()[:300] or f"HTTP {self.status} without a message"

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The ``errors`` entries that are objects (Braze may send null or strings)."""
        errors = self.body.get("errors")
        if not isinstance(errors, list):
            return []
        return [error for error in errors if isinstance(error, dict)]


class BrazeClient:
    """POSTs to one workspace's REST endpoint over one keep-alive session."""

    def __init__(
        self, rest_endpoint: str, api_key: str, *, connect_timeout: float, timeout: float
    ) -> None:
        self._base = rest_endpoint.rstrip("/")
        self._connect_timeout = connect_timeout
        self._timeout = timeout
        self._session = requests.Session()
        self._session.auth = _BearerAuth(api_key)  # session auth: ~/.netrc never replaces it
        self._session.headers.update(
            {"Content-Type": "application/json", "Accept": "application/json"}
        )
        self._session.headers["User-Agent"] = "idsync"

    def __repr__(self) -> str:
        return f"BrazeClient(rest_endpoint={self._base!r})"

    def close(self) -> None:
        """Close the pooled connections."""
        self._session.close()

    def post(self, path: str, body: dict[str, Any]) -> Answer:
        """POST ``body`` to ``path`` once, never following a redirect, done within the deadline."""
        data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        started = time.perf_counter()
        deadline = time.monotonic() + self._connect_timeout + self._timeout
        try:
            response = self._session.post(
                self._base + path,
                data=data,
                timeout=(self._connect_timeout, self._timeout),
                allow_redirects=False,
                stream=True,
            )
            content = read_before(response, deadline, limit=MAX_ANSWER_BYTES)
        except requests.RequestException as error:
            return Answer(
                status=None,
                duration_ms=_ms_since(started),
                error_category=transport_category(error),
                maybe_sent=maybe_sent(error),
            )
        text = content.decode("utf-8", errors="replace")
        return Answer(
            status=response.status_code,
            body=_json_object(text),
            text=text,
            rate_limit=RateLimit.from_headers(response.headers),
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            duration_ms=_ms_since(started),
        )


class _BearerAuth(requests.auth.AuthBase):
    def __init__(self, key: str) -> None:
        self._key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._key}"
        return request


def _json_object(text: str) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and number == number else None  # NaN is no number


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
