"""A fake Segment HTTP Tracking API: a real HTTP server on loopback, for tests and trials.

It behaves like the parts of Segment's HTTP API idsync relies on
(``shared/reference/destinations.md``, "Segment"; segment-docs, "HTTP API Source"):

- ``POST /v1/batch`` with ``{"batch": [...]}``, and the single calls
  ``/v1/identify`` and ``/v1/track``; the write key as HTTP Basic user name
  with an empty password, or as ``writeKey`` in the body.
- 400 for JSON it cannot parse, for a message over 32 KB (a single call, or
  any message of a batch) and for a batch request over 500 KB ("Max request
  size", "Errors": Segment answers ``400 Bad Request`` for both). Nothing of a
  refused request is kept.
- 200 ``{"success": true}`` for everything else, even when the messages are
  dropped: a write key it does not know (missing, wrong or revoked), a message
  without ``userId`` or ``anonymousId``, a track without ``event``, a
  ``messageId`` of 100 characters or more, a batch of more than 2,500 messages.
  Dropped messages are counted and kept apart (``dropped()``), as Segment's
  debugger would show them.
- Deduplication on ``messageId``: a repeat is answered 200 and not applied.
- A ceiling of messages per second (rolling window), answered 429 with
  ``Retry-After`` and ``X-RateLimit-Reset`` in seconds ("Rate limits").

Per ``userId`` it keeps the traits merged in arrival order (a later identify
overwrites a trait, ``null`` included), every identify (``messageId``,
``timestamp``, ``traits``) and every track.

Test switches, as methods and over HTTP under ``/_fake/`` (no auth, not rate
limited): ``reset``, ``fail`` (the next ``count`` requests answer ``status``,
with ``Retry-After`` if given, and keep nothing), ``slow`` (the next ``count``
requests are applied, then answered ``seconds`` late), ``revoke`` / ``restore``
the write key, ``GET /_fake/stats``, ``GET /_fake/records``,
``GET /_fake/dropped`` and ``GET /_fake/requests``. ``reset()`` starts a new
generation: a request still in flight from before it keeps nothing.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import json
import math
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request

from idsync.fakes.server import FakeServer, run_until_signal

DEFAULT_WRITE_KEY = "fake-segment-write-key"
DEFAULT_RECORDS_PER_SECOND = 200
# segment-docs, "HTTP API Source", "Max request size" and "Errors".
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500_000
MAX_BATCH_MESSAGES = 2500
MAX_MESSAGE_ID = 100  # "fewer than 100 characters"
TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
ROUTES = {"/v1/batch": None, "/v1/identify": "identify", "/v1/track": "track"}


@dataclass
class SegmentUser:
    """What Segment holds of one ``userId``: merged traits, identifies and tracks."""

    user_id: str
    traits: dict[str, Any] = field(default_factory=dict)
    identifies: list[dict[str, Any]] = field(default_factory=list)  # messageId, timestamp, traits
    tracks: list[dict[str, Any]] = field(default_factory=list)  # event, properties, ids
    message_ids: list[str] = field(default_factory=list)  # applied, in arrival order


@dataclass(frozen=True)
class TrackingRequest:
    """One request to the tracking API as the fake saw it, and what it answered."""

    path: str
    status: int
    body_bytes: int
    messages: int
    write_key_valid: bool
    applied: int = 0
    duplicates: int = 0
    dropped: int = 0
    fault: str | None = None  # the switch that chose the answer: "fail", "slow"


@dataclass(frozen=True)
class _Fault:
    kind: str  # "fail" or "slow"
    status: int = 200
    seconds: float = 0.0
    retry_after: str | None = None
    body: str | None = None


class _Refused(Exception):
    """A request Segment answers 400: malformed or too large."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class FakeSegment(FakeServer):
    """Segment's tracking API on 127.0.0.1; use as a context manager."""

    label = "fake Segment"

    def __init__(
        self,
        write_key: str = DEFAULT_WRITE_KEY,
        *,
        port: int = 0,
        records_per_second: int = DEFAULT_RECORDS_PER_SECOND,
        window_seconds: float = 1.0,
    ) -> None:
        super().__init__(port)
        if records_per_second < 1 or window_seconds <= 0:
            raise ValueError("records_per_second must be >= 1 and window_seconds > 0")
        self.write_key = write_key
        self.records_per_second = records_per_second
        self.window_seconds = window_seconds
        self._lock = threading.Condition()
        self._release = threading.Event()
        self._generation = 0
        self.reset()
        self.app = self._build_app()

    # Test switches

    def reset(self) -> None:
        """Forget every message, switch and count; answer held requests at once."""
        with self._lock:
            self._generation += 1
            self._release.set()
            self._release = threading.Event()
            self._revoked = False
            self._faults: deque[_Fault] = deque()
            self._users: dict[str, SegmentUser] = {}
            self._seen: set[str] = set()
            self._dropped: list[dict[str, Any]] = []
            self._requests: list[TrackingRequest] = []
            self._window: deque[tuple[float, int]] = deque()
            self._counts = dict.fromkeys(
                ("requests", "records_written", "throttled", "duplicates", "dropped", "refused"),
                0,
            )
            self._lock.notify_all()

    def fail(
        self,
        count: int,
        status: int,
        *,
        retry_after: float | str | None = None,
        body: str | None = None,
    ) -> None:
        """Answer the next ``count`` tracking requests ``status``, keeping nothing."""
        text = None if retry_after is None else str(retry_after)
        self._add(count, _Fault("fail", status, retry_after=text, body=body))

    def slow(self, count: int, seconds: float) -> None:
        """Apply the next ``count`` tracking requests as usual, but answer ``seconds`` late."""
        self._add(count, _Fault("slow", seconds=seconds))

    def revoke(self) -> None:
        """The write key stops being valid: Segment still answers 200, and drops everything."""
        with self._lock:
            self._revoked = True

    def restore(self) -> None:
        """The write key is valid again."""
        with self._lock:
            self._revoked = False

    def before_stop(self) -> None:
        with self._lock:
            self._release.set()

    # What arrived

    def stats(self) -> dict[str, int]:
        """Counts since the last reset: requests, records_written, throttled, and more."""
        with self._lock:
            return dict(self._counts) | {"users": len(self._users)}

    def records(self) -> dict[str, dict[str, Any]]:
        """Every ``userId`` with its merged traits, identifies and tracks, in arrival order."""
        with self._lock:
            return {user_id: asdict(user) for user_id, user in self._users.items()}

    def user(self, user_id: str) -> SegmentUser | None:
        """What the fake holds of one user (a copy), or None."""
        with self._lock:
            found = self._users.get(user_id)
            return None if found is None else copy.deepcopy(found)

    def dropped(self) -> list[dict[str, Any]]:
        """Messages answered 200 but not applied, each with ``reason`` and the message."""
        with self._lock:
            return list(self._dropped)

    @property
    def requests_log(self) -> list[TrackingRequest]:
        """Every tracking request of this generation, in arrival order."""
        with self._lock:
            return list(self._requests)

    def wait_for_records(self, count: int, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
        """Wait until ``count`` messages were applied; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._counts["records_written"] < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{self._counts['records_written']} of {count} messages applied"
                    )
                self._lock.wait(left)
        return self.records()

    # Serving

    def _add(self, count: int, fault: _Fault) -> None:
        with self._lock:
            self._faults.extend([fault] * count)

    def _build_app(self) -> Flask:
        app = Flask("fake_segment")

        @app.post("/v1/batch")
        @app.post("/v1/identify")
        @app.post("/v1/track")
        def track_api() -> tuple[Response, int]:
            return self._tracking_request(request.path, request.get_data())

        @app.post("/_fake/reset")
        def fake_reset() -> Response:
            self.reset()
            return jsonify({"reset": True})

        @app.post("/_fake/fail")
        def fake_fail() -> Response:
            options = request.get_json(force=True, silent=True) or {}
            self.fail(
                int(options.get("count", 1)),
                int(options.get("status", 500)),
                retry_after=options.get("retry_after"),
                body=options.get("body"),
            )
            return jsonify({"queued": True})

        @app.post("/_fake/slow")
        def fake_slow() -> Response:
            options = request.get_json(force=True, silent=True) or {}
            self.slow(int(options.get("count", 1)), float(options.get("seconds", 1.0)))
            return jsonify({"queued": True})

        @app.post("/_fake/revoke")
        def fake_revoke() -> Response:
            self.revoke()
            return jsonify({"revoked": True})

        @app.post("/_fake/restore")
        def fake_restore() -> Response:
            self.restore()
            return jsonify({"revoked": False})

        @app.get("/_fake/stats")
        def fake_stats() -> Response:
            return jsonify(self.stats())

        @app.get("/_fake/records")
        def fake_records() -> Response:
            return jsonify(self.records())

        @app.get("/_fake/dropped")
        def fake_dropped() -> Response:
            return jsonify(self.dropped())

        @app.get("/_fake/requests")
        def fake_requests() -> Response:
            return jsonify([asdict(entry) for entry in self.requests_log])

        return app

    def _tracking_request(self, path: str, raw: bytes) -> tuple[Response, int]:
        """Answer one tracking request the way Segment does, and keep what it would keep."""
        with self._lock:
            generation, release = self._generation, self._release
            self._counts["requests"] += 1
            fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault.kind == "fail":
            self._log(
                generation, TrackingRequest(path, fault.status, len(raw), 0, False, fault="fail")
            )
            return _fault_answer(fault)
        try:
            body, messages = _parse(path, raw)
        except _Refused as refused:
            with self._lock:
                if generation == self._generation:
                    self._counts["refused"] += 1
            self._log(generation, TrackingRequest(path, 400, len(raw), 0, False))
            return _error(400, "invalid_request", refused.message)
        key_valid = self._key_valid(body)
        wait = self._throttle(generation, len(messages))
        if wait is not None:
            self._log(generation, TrackingRequest(path, 429, len(raw), len(messages), key_valid))
            return _throttled(wait)
        applied, duplicates, dropped = self._apply(generation, messages, key_valid)
        entry = TrackingRequest(
            path,
            200,
            len(raw),
            len(messages),
            key_valid,
            applied=applied,
            duplicates=duplicates,
            dropped=dropped,
            fault=fault.kind if fault else None,
        )
        self._log(generation, entry)
        if fault is not None and fault.kind == "slow":
            release.wait(fault.seconds)
        return jsonify({"success": True}), 200

    def _key_valid(self, body: dict[str, Any]) -> bool:
        """Whether the write key (Basic user name, else ``writeKey``) is this source's own."""
        key = _basic_user(request.headers.get("Authorization"))
        if key is None and isinstance(body.get("writeKey"), str):
            key = body["writeKey"]
        with self._lock:
            return key == self.write_key and not self._revoked

    def _throttle(self, generation: int, count: int) -> float | None:
        """Seconds to wait when ``count`` more messages would pass the ceiling, else None.

        A request larger than the whole ceiling passes when the window is empty,
        so that a big batch is slowed down, never refused for ever.
        """
        now = time.monotonic()
        with self._lock:
            while self._window and self._window[0][0] <= now - self.window_seconds:
                self._window.popleft()
            used = sum(n for _, n in self._window)
            if used and used + count > self.records_per_second:
                if generation == self._generation:
                    self._counts["throttled"] += 1
                return max(0.0, self._window[0][0] + self.window_seconds - now)
            if generation == self._generation:
                self._window.append((now, count))
            return None

    def _apply(
        self, generation: int, messages: list[dict[str, Any]], key_valid: bool
    ) -> tuple[int, int, int]:
        """Keep each message Segment would keep: (applied, duplicates, dropped)."""
        applied = duplicates = dropped = 0
        with self._lock:
            if generation != self._generation:
                return 0, 0, 0
            for message in messages:
                reason = _drop_reason(message, key_valid, len(messages))
                if reason is not None:
                    self._dropped.append({"reason": reason, "message": message})
                    dropped += 1
                    continue
                message_id = message.get("messageId") or str(uuid.uuid4())
                if message_id in self._seen:
                    duplicates += 1
                    continue
                self._seen.add(message_id)
                self._keep(message, str(message_id))
                applied += 1
            self._counts["records_written"] += applied
            self._counts["duplicates"] += duplicates
            self._counts["dropped"] += dropped
            self._lock.notify_all()
        return applied, duplicates, dropped

    def _keep(self, message: dict[str, Any], message_id: str) -> None:
        """Apply one accepted message to its user (callers hold the lock)."""
        user_id = str(message.get("userId") or message.get("anonymousId"))
        user = self._users.setdefault(user_id, SegmentUser(user_id))
        user.message_ids.append(message_id)
        if message["type"] == "identify":
            given = message.get("traits")
            traits: dict[str, Any] = given if isinstance(given, dict) else {}
            user.traits.update(traits)
            user.identifies.append(
                {"messageId": message_id, "timestamp": message.get("timestamp"), "traits": traits}
            )
        elif message["type"] == "track":
            user.tracks.append(
                {
                    "event": message["event"],
                    "properties": message.get("properties") or {},
                    "messageId": message_id,
                    "timestamp": message.get("timestamp"),
                }
            )

    def _log(self, generation: int, entry: TrackingRequest) -> None:
        with self._lock:
            if generation == self._generation:
                self._requests.append(entry)


def _parse(path: str, raw: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The request's body and its messages; _Refused for what Segment answers 400."""
    single = ROUTES[path]
    limit = MAX_MESSAGE_BYTES if single else MAX_BATCH_BYTES
    if len(raw) > limit:
        what = "message" if single else "batch"
        raise _Refused(f"the {what} is {len(raw)} bytes; the limit is {limit} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _Refused("Invalid JSON") from None
    if not isinstance(body, dict):
        raise _Refused("the body must be a JSON object")
    if single:
        return body, [body | {"type": body.get("type") or single}]
    batch = body.get("batch")
    if not isinstance(batch, list) or not all(isinstance(m, dict) for m in batch):
        raise _Refused("batch must be an array of message objects")
    for index, message in enumerate(batch):
        size = len(json.dumps(message, separators=(",", ":")).encode())
        if size > MAX_MESSAGE_BYTES:
            raise _Refused(
                f"message {index} of the batch is {size} bytes; the limit is "
                f"{MAX_MESSAGE_BYTES} bytes per message"
            )
    return body, batch


def _drop_reason(message: dict[str, Any], key_valid: bool, batch_length: int) -> str | None:
    """Why Segment would drop this message after answering 200, or None to keep it."""
    if not key_valid:
        return "invalid_write_key"
    if batch_length > MAX_BATCH_MESSAGES:
        return "too_many_messages"
    if message.get("type") not in TYPES:
        return "invalid_type"
    if not message.get("userId") and not message.get("anonymousId"):
        return "no_user_anon_id"
    if message["type"] == "track" and not message.get("event"):
        return "missing_event"
    if len(str(message.get("messageId") or "")) >= MAX_MESSAGE_ID:
        return "message_id_too_long"
    return None


def _basic_user(header: str | None) -> str | None:
    """The user name of an HTTP Basic ``Authorization`` header (the write key), or None."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.split(":", 1)[0]


def _error(status: int, code: str, message: str) -> tuple[Response, int]:
    # The shape Segment's own Python library reads from an error answer: code, message.
    return jsonify({"success": False, "code": code, "message": message}), status


def _throttled(wait: float) -> tuple[Response, int]:
    response, status = _error(429, "rate_limit_exceeded", "Too many requests")
    seconds = str(max(1, math.ceil(wait)))
    response.headers["Retry-After"] = seconds
    response.headers["X-RateLimit-Reset"] = seconds
    return response, status


def _fault_answer(fault: _Fault) -> tuple[Response, int]:
    if fault.body is not None:
        response = Response(fault.body, mimetype="text/plain")
    else:
        response = jsonify(
            {"success": False, "code": "injected", "message": f"injected HTTP {fault.status}"}
        )
    if fault.retry_after is not None:
        response.headers["Retry-After"] = fault.retry_after
    return response, fault.status


def main(argv: list[str] | None = None) -> int:
    """Run a fake Segment until SIGTERM or SIGINT; prints its URL on the first line."""
    parser = argparse.ArgumentParser(prog="python -m idsync.fakes.segment", description=__doc__)
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument("--write-key", default=DEFAULT_WRITE_KEY)
    parser.add_argument(
        "--records-per-second",
        type=int,
        default=DEFAULT_RECORDS_PER_SECOND,
        help="messages per second before answering 429 (default %(default)s)",
    )
    args = parser.parse_args(argv)
    fake = FakeSegment(args.write_key, port=args.port, records_per_second=args.records_per_second)
    return run_until_signal(fake)


if __name__ == "__main__":
    raise SystemExit(main())
