"""One call to Segment's HTTP Tracking API, with a wall-clock deadline, and what it answered.

The answer is read against the call's own deadline (``workers/destinations/http.py``)
and only its first bytes are kept: Segment answers ``{"success": true}`` or a short
error, never data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter

from workers.destinations.http import (
    MAX_RETRY_AFTER_SECONDS,
    maybe_sent,
    parse_retry_after,
    read_before,
    transport_category,
)
from workers.destinations.segment.settings import basic_credentials

BATCH_PATH = "/v1/batch"
MAX_ANSWER_BYTES = 16 * 1024
# An X-RateLimit-Reset this large is a moment (epoch seconds), not a delay.
EPOCH_THRESHOLD = 1e9


@dataclass(frozen=True)
class Answer:
    """What one POST got back: an HTTP answer, or the transport error that replaced it."""

    status: int | None
    text: str
    retry_after: float | None  # Retry-After, else X-RateLimit-Reset, in seconds
    location: str | None
    duration_ms: float
    error_category: str | None = None  # TIMEOUT, CONNECTION_ERROR, REQUEST_ERROR
    maybe_delivered: bool = False  # no answer, but the request may have reached Segment


class SegmentClient:
    """POSTs batches to one Segment source over one kept-alive connection."""

    def __init__(
        self, base_url: str, write_key: str, *, connect_timeout: float, timeout: float
    ) -> None:
        self.url = base_url.rstrip("/") + BATCH_PATH
        self.connect_timeout, self.timeout = connect_timeout, timeout
        self._session = requests.Session()
        pooled = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
        self._session.mount("https://", pooled)
        self._session.mount("http://", pooled)
        self._session.headers.update(
            {
                "User-Agent": "idsync",
                "Content-Type": "application/json",
                "Authorization": f"Basic {basic_credentials(write_key)}",
            }
        )

    def close(self) -> None:
        self._session.close()

    def post_batch(self, body: bytes) -> Answer:
        """POST ``body`` to ``/v1/batch`` once, never following a redirect, within the deadline."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.connect_timeout + self.timeout
        try:
            response = self._session.post(
                self.url,
                data=body,
                timeout=(self.connect_timeout, self.timeout),
                allow_redirects=False,
                stream=True,
            )
            content = read_before(response, deadline, limit=MAX_ANSWER_BYTES)
        except requests.RequestException as error:
            return Answer(
                status=None,
                text="",
                retry_after=None,
                location=None,
                duration_ms=_ms_since(started),
                error_category=transport_category(error),
                maybe_delivered=maybe_sent(error),
            )
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is None:
            retry_after = reset_seconds(response.headers.get("X-RateLimit-Reset"))
        return Answer(
            status=response.status_code,
            text=content.decode(response.encoding or "utf-8", errors="replace"),
            retry_after=retry_after,
            location=response.headers.get("Location"),
            duration_ms=_ms_since(started),
        )


def reset_seconds(value: str | None) -> float | None:
    """Seconds until ``X-RateLimit-Reset``, which Segment sends with a 429 beside Retry-After.

    segment-docs, "HTTP API Source", "Rate limits": both headers hold "the number
    of seconds after which you can retry"; an epoch value is read as a moment.
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if seconds != seconds:  # NaN
        return None
    if seconds > EPOCH_THRESHOLD:
        seconds -= time.time()
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
