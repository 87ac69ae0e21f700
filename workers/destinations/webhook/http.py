"""One webhook POST with a wall-clock deadline, and what its answer was.

``requests`` applies its read timeout to each socket read, so a receiver that
trickles its answer could hold a call far longer than the timeout. Here the
answer is read against the call's own deadline, and only its first bytes are
kept: a webhook answer is an acknowledgement, not data.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests
import urllib3

# Enough of an answer for an excerpt; the rest is not read.
MAX_ANSWER_BYTES = 64 * 1024
# A receiver naming a longer wait than this is answered again after this long.
MAX_RETRY_AFTER_SECONDS = 24 * 3600.0


class CallDeadlineExceeded(requests.Timeout):
    """The whole call, answer included, took longer than its deadline."""


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
        content = read_before(response, deadline)
    except requests.RequestException as error:
        return Answer(
            status=None,
            text="",
            location=None,
            retry_after=None,
            duration_ms=_ms_since(started),
            error_category=_category(error),
            maybe_delivered=_maybe_sent(error),
        )
    return Answer(
        status=response.status_code,
        text=content.decode(response.encoding or "utf-8", errors="replace"),
        location=response.headers.get("Location"),
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        duration_ms=_ms_since(started),
    )


def read_before(
    response: requests.Response, deadline: float, limit: int = MAX_ANSWER_BYTES
) -> bytes:
    """Up to ``limit`` bytes of the answer, read by ``deadline`` or CallDeadlineExceeded.

    Before each read the socket's timeout shrinks to the time left, so no single
    read carries the call past its deadline. An answer longer than ``limit`` is
    cut and its connection closed rather than drained.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        while size < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CallDeadlineExceeded("the answer did not arrive within the call's deadline")
            _set_socket_timeout(response, left)
            chunk = response.raw.read1(min(64 * 1024, limit - size), decode_content=True)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (urllib3.exceptions.ReadTimeoutError, TimeoutError) as error:
        response.close()
        raise CallDeadlineExceeded(str(error)) from None
    except urllib3.exceptions.HTTPError as error:
        response.close()
        if time.monotonic() >= deadline:  # the shrunken socket timeout cut the read short
            raise CallDeadlineExceeded(
                "the answer did not arrive within the call's deadline"
            ) from None
        raise requests.ConnectionError(str(error)) from None
    except CallDeadlineExceeded:
        response.close()
        raise
    if size >= limit:
        response.close()
    else:
        response.raw.release_conn()  # read whole: the connection goes back to the pool
    return b"".join(chunks)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay seconds or an HTTP date)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def _set_socket_timeout(response: requests.Response, seconds: float) -> None:
    connection = getattr(response.raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _category(error: requests.RequestException) -> str:
    if isinstance(error, requests.Timeout):
        return "TIMEOUT"
    if isinstance(error, requests.ConnectionError):
        return "CONNECTION_ERROR"
    return "REQUEST_ERROR"


def _maybe_sent(error: requests.RequestException) -> bool:
    """Whether the request may have reached the receiver before ``error`` ended the call."""
    if isinstance(error, requests.ConnectTimeout | requests.exceptions.SSLError):
        return False  # no connection, or no TLS session to send it over
    if isinstance(error, requests.ConnectionError) and not isinstance(error, requests.Timeout):
        reason = getattr(error.args[0], "reason", None) if error.args else None
        return not isinstance(reason, urllib3.exceptions.NewConnectionError)
    return True


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000
