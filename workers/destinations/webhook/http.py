"""One webhook POST with a wall-clock deadline, and what its answer was.

The answer is read against the call's own deadline (``workers/destinations/http.py``),
and only its first bytes are kept: a webhook answer is an acknowledgement, not data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import requests

from workers.destinations.http import maybe_sent, parse_retry_after, read_before, transport_category

# Enough of an answer for an excerpt; the rest is not read.
MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Answer:
    """What one POST got back: an HTTP answer, or the transport error that replaced it."""

    status: int | None
    text: str
    location: str | None
    retry_after: float | None
    duration_ms: float
    error_category: str | None = None  # TIMEOUT, CONNECTION_ERROR, REQUEST_ERROR
    maybe_delivered: bool = False  # no answer, but the request may have reached the receiver


def post(
    session: requests.Session,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    connect_timeout: float,
    timeout: float,
) -> Answer:
    """POST ``body`` once, never following a redirect, done within connect + timeout."""
    started = time.perf_counter()
    deadline = time.monotonic() + connect_timeout + timeout
    try:
        response = session.post(
            url,
            data=body,
            headers=headers,
            timeout=(connect_timeout, timeout),
            allow_redirects=False,
            stream=True,
        )
        content = read_before(response, deadline, limit=MAX_ANSWER_BYTES)
    except requests.RequestException as error:
        return Answer(
            status=None,
            text="",
            location=None,
            retry_after=None,
            duration_ms=_ms_since(started),
            error_category=transport_category(error),
            maybe_delivered=maybe_sent(error),
        )
    return Answer(
        status=response.status_code,
        text=content.decode(response.encoding or "utf-8", errors="replace"),
        location=response.headers.get("Location"),
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        duration_ms=_ms_since(started),
    )


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
