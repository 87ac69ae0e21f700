"""HTTP helpers every adapter shares: a wall-clock deadline per call, and what a failure means.

``requests`` applies its read timeout to each socket read, so a destination
that trickles its answer could hold a call far longer than the timeout. Here
the answer is read against the call's own deadline: before each read the
socket's timeout shrinks to the time left.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests
import urllib3

CHUNK_BYTES = 64 * 1024
# A destination naming a longer wait than this is asked again after this long.
MAX_RETRY_AFTER_SECONDS = 24 * 3600.0


class CallDeadlineExceeded(requests.Timeout):
    """The whole call, answer included, took longer than its deadline."""


def read_before(response: requests.Response, deadline: float, *, limit: int | None = None) -> bytes:
    """The answer (up to ``limit`` bytes), read by ``deadline`` or CallDeadlineExceeded.

    Before each read the socket's timeout shrinks to the time left, so no single
    read carries the call past its deadline. An answer longer than ``limit`` is
    cut and its connection closed rather than drained.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        while limit is None or size < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CallDeadlineExceeded("the answer did not arrive within the call's deadline")
            _set_socket_timeout(response, left)
            wanted = CHUNK_BYTES if limit is None else min(CHUNK_BYTES, limit - size)
            chunk = response.raw.read1(wanted, decode_content=True)
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
    if limit is not None and size >= limit:
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


def transport_category(error: requests.RequestException) -> str:
    """TIMEOUT, CONNECTION_ERROR or REQUEST_ERROR: the attempt's error category."""
    if isinstance(error, requests.Timeout):
        return "TIMEOUT"
    if isinstance(error, requests.ConnectionError):
        return "CONNECTION_ERROR"
    return "REQUEST_ERROR"


def maybe_sent(error: requests.RequestException) -> bool:
    """Whether the request may have reached the destination before ``error`` ended the call."""
    if isinstance(error, requests.ConnectTimeout | requests.exceptions.SSLError):
        return False  # no connection, or no TLS session to send it over
    if isinstance(error, requests.ConnectionError) and not isinstance(error, requests.Timeout):
        reason = getattr(error.args[0], "reason", None) if error.args else None
        return not isinstance(reason, urllib3.exceptions.NewConnectionError)
    return True
