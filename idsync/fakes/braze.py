"""A fake Braze REST API (``/users/track``, ``/users/delete``): a real HTTP server on loopback.

It answers as Braze documents (``shared/reference/destinations.md``, "Braze";
Braze's "POST: Track users", "POST: Delete users" and "API errors and
responses" pages):

- Bearer auth: a missing or unknown key is 401 ``{"message": "Invalid API Key"}``;
  a key without the endpoint's permission (``users.track``, ``users.delete``) is
  403 ``{"message": "Access Denied"}``.
- ``/users/track``: at most 75 objects across ``attributes``, ``events`` and
  ``purchases`` (400 ``Max Input Length Exceeded`` above; the limit is a setting,
  50 for "Monthly Active Users CY 24-25" workspaces). Attributes objects are
  checked one by one: an object without an identifier, with an invalid email or
  with an external id refused by a switch fails alone, named by its index in
  ``errors`` of a 201 ``{"message": "success", ...}``; when no object is valid the
  answer is a 400 with the same ``errors``. Attributes are merged into the
  profile of their ``external_id``; ``null`` removes one.
- ``/users/delete``: at most 50 ``external_ids`` (400 above); the profiles are
  removed for good and kept aside for tests to see.
- Every API answer carries ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and
  ``X-RateLimit-Reset`` (epoch seconds). Where Braze counts requests, the fake
  counts records (attributes objects and deleted ids) per fixed window, so that a
  benchmark can reach its ceiling on one machine: a request that would pass it
  is answered 429 and applies nothing (a request alone in its window is always
  admitted).

Which words Braze uses for a per-object error is not documented beyond
"provided external_id is blacklisted and disallowed"; the others are the fake's.

Test switches, as methods and over HTTP under ``/_fake/<action>`` (no auth, not
rate limited): ``reset``, ``fail`` (the next N requests answer a status),
``slow`` (the next N requests are applied, then answered N seconds late),
``revoke`` / ``restore`` the key, ``permissions``, ``refuse`` (external ids whose
objects fail), ``limits``; ``GET /_fake/stats`` and ``GET /_fake/records``.
``python -m idsync.fakes.braze --port N`` runs it as a process.
"""

from __future__ import annotations

import argparse
import hmac
import math
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from idsync.fakes.server import FakeServer, run_until_signal

TRACK = "/users/track"
DELETE = "/users/delete"
DEFAULT_KEY = "fake-braze-rest-api-key"
TRACK_LIMIT = 75
DELETE_LIMIT = 50
DEFAULT_RECORDS_PER_SECOND = 200
PERMISSIONS = frozenset({"users.track", "users.delete"})
_ROUTE_PERMISSION = {TRACK: "users.track", DELETE: "users.delete"}
_IDENTIFIERS = ("external_id", "braze_id", "user_alias", "email", "phone")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
NO_VALID_DATA = "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."
MISSING_IDENTIFIER = "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"
REFUSED_ID = "provided external_id is blacklisted and disallowed"
INVALID_EMAIL = "'email' is not a valid email address"
TOO_MANY_OBJECTS = "Max Input Length Exceeded"
TOO_MANY_IDS = "The max number of external_ids and aliases per request was exceeded"


class BrazeError(Exception):
    """An answer in Braze's shape: ``{"message": ..., "errors": [...]}``."""

    def __init__(self, status: int, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors

    def response(self) -> tuple[Response, int]:
        body: dict[str, Any] = {"message": self.message}
        if self.errors:
            body["errors"] = self.errors
        return jsonify(body), self.status


@dataclass
class _Fault:
    kind: str  # "fail" or "slow"
    status: int = 500
    message: str | None = None
    errors: list[dict[str, Any]] | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class RequestRecord:
    """One API request as the fake answered it."""

    path: str
    status: int
    objects: int  # attributes objects or external ids in the body
    external_ids: tuple[str, ...]
    fault: str | None = None


@dataclass
class _State:
    """Everything ``reset`` forgets."""

    key: str
    revoked: bool = False
    permissions: frozenset[str] = PERMISSIONS
    refused: set[str] = field(default_factory=set)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    deleted: dict[str, dict[str, Any]] = field(default_factory=dict)
    faults: deque[_Fault] = field(default_factory=deque)
    window: int = -1  # index of the current rate window
    used: int = 0  # records admitted in it
    stats: Counter[str] = field(default_factory=Counter)
    log: list[RequestRecord] = field(default_factory=list)


class FakeBraze(FakeServer):
    """A Braze workspace on 127.0.0.1 with test switches; use as a context manager."""

    label = "fake Braze"

    def __init__(
        self,
        api_key: str = DEFAULT_KEY,
        *,
        records_per_second: int = DEFAULT_RECORDS_PER_SECOND,
        window_seconds: float = 1.0,
        track_limit: int = TRACK_LIMIT,
        port: int = 0,
    ) -> None:
        super().__init__(port)
        self._initial = (api_key, records_per_second, window_seconds, track_limit)
        self._lock = threading.Lock()
        self._release = threading.Event()  # set to answer every slow request now
        self.app = self._build_app()
        self.reset()

    # Switches

    def reset(self) -> None:
        """Forget every profile, switch, counter and log; back to the constructor's settings."""
        api_key, per_second, window, track_limit = self._initial
        with self._lock:
            self._release.set()
            self._release = threading.Event()
            self._state = _State(key=api_key)
            self._limit = max(1, round(per_second * window))
            self._window_seconds = window
            self._track_limit = track_limit

    def before_stop(self) -> None:
        """Answer slow requests at once, so that stopping does not wait for them."""
        self._release.set()

    def fail(
        self,
        n: int,
        status: int = 500,
        message: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        """The next ``n`` API requests answer ``status`` with a message; nothing is applied.

        ``errors`` adds Braze's ``errors`` list, e.g. ``[{"type": "...", "index": 0}]``.
        """
        self._add(n, _Fault("fail", status=status, message=message, errors=errors))

    def slow(self, n: int, seconds: float) -> None:
        """The next ``n`` API requests are applied at once and answered ``seconds`` later."""
        self._add(n, _Fault("slow", seconds=seconds))

    def revoke(self) -> None:
        """The key stops working (someone deleted it in the dashboard): every call is 401."""
        with self._lock:
            self._state.revoked = True

    def restore(self) -> None:
        """The key works again."""
        with self._lock:
            self._state.revoked = False

    def set_permissions(self, permissions: list[str] | set[str] | frozenset[str]) -> None:
        """The key holds only these permissions (``users.track``, ``users.delete``)."""
        with self._lock:
            self._state.permissions = frozenset(permissions)

    def refuse(self, external_ids: list[str] | set[str]) -> None:
        """Objects for these external ids fail with Braze's "blacklisted and disallowed"."""
        with self._lock:
            self._state.refused = set(external_ids)

    def set_limits(
        self,
        records_per_second: int,
        window_seconds: float = 1.0,
        track_limit: int | None = None,
    ) -> None:
        """A new ceiling (records per second over windows of ``window_seconds``), from now."""
        with self._lock:
            self._limit = max(1, round(records_per_second * window_seconds))
            self._window_seconds = window_seconds
            self._track_limit = self._track_limit if track_limit is None else track_limit
            self._state.window, self._state.used = -1, 0

    def seed(self, external_id: str, attributes: dict[str, Any]) -> None:
        """A profile as if someone had made it in Braze."""
        with self._lock:
            self._state.profiles[external_id] = dict(attributes)

    # Observation

    def profiles(self) -> dict[str, dict[str, Any]]:
        """Live profiles by external id: their merged attributes."""
        with self._lock:
            return {key: dict(value) for key, value in self._state.profiles.items()}

    def profile(self, external_id: str) -> dict[str, Any] | None:
        """One live profile's attributes, or None."""
        with self._lock:
            found = self._state.profiles.get(external_id)
            return dict(found) if found is not None else None

    def deleted(self) -> dict[str, dict[str, Any]]:
        """Deleted profiles by external id, as they were when deleted."""
        with self._lock:
            return {key: dict(value) for key, value in self._state.deleted.items()}

    @property
    def requests_log(self) -> list[RequestRecord]:
        """Every API request answered, in order."""
        with self._lock:
            return list(self._state.log)

    def stats(self) -> dict[str, Any]:
        """Records written (attributes objects applied and profiles deleted), requests, 429s."""
        with self._lock:
            counts = self._state.stats
            return {
                "records_written": counts["attributes"] + counts["deleted"],
                "attributes_written": counts["attributes"],
                "deleted": counts["deleted"],
                "requests": counts["requests"],
                "throttled": counts["throttled"],
                "by_status": {k[7:]: v for k, v in counts.items() if k.startswith("status:")},
            }

    # Request pipeline

    def _add(self, n: int, fault: _Fault) -> None:
        with self._lock:
            self._state.faults.extend(fault for _ in range(max(0, n)))

    def _before(self) -> Any:
        if request.path.startswith("/_fake/"):
            return None
        g.records, g.ids, g.fault, g.hold = 0, (), None, 0.0
        with self._lock:
            g.state = self._state  # a request from before a reset stays out of the new log
            self._state.stats["requests"] += 1
            fault = self._state.faults.popleft() if self._state.faults else None
            if fault is not None and fault.kind == "fail":
                g.fault = "fail"
                return self._injected(fault)
            if fault is not None:
                g.fault, g.hold = "slow", fault.seconds
            self._authorize()
        return None

    def _authorize(self) -> None:
        """401 for a missing or unknown key, 403 for a key without the route's permission."""
        given = request.headers.get("Authorization", "")
        scheme, _, key = given.partition(" ")
        state = self._state
        good = scheme.lower() == "bearer" and hmac.compare_digest(
            key.strip().encode(), state.key.encode()
        )
        if not good or state.revoked:
            raise BrazeError(401, "Invalid API Key")
        permission = _ROUTE_PERMISSION.get(request.path)
        if permission is not None and permission not in state.permissions:
            raise BrazeError(403, "Access Denied")

    def _injected(self, fault: _Fault) -> tuple[Response, int]:
        words = {429: "API rate limit exceeded", 401: "Invalid API Key", 403: "Access Denied"}
        message = fault.message or words.get(fault.status, f"Injected failure ({fault.status})")
        return BrazeError(fault.status, message, fault.errors).response()

    def _admit(self, records: int) -> None:
        """Count ``records`` into the current window, or 429 when they would pass its ceiling."""
        state = self._state
        window = math.floor(time.time() / self._window_seconds)
        if window != state.window:
            state.window, state.used = window, 0
        if state.used and state.used + records > self._limit:
            state.stats["throttled"] += 1
            raise BrazeError(429, "API rate limit exceeded")
        state.used += records

    def _limit_headers(self) -> dict[str, str]:
        state = self._state
        window = math.floor(time.time() / self._window_seconds)
        used = state.used if window == state.window else 0
        reset = math.ceil((window + 1) * self._window_seconds)
        return {
            "X-RateLimit-Limit": str(self._limit),
            "X-RateLimit-Remaining": str(max(0, self._limit - used)),
            "X-RateLimit-Reset": str(reset),
        }

    def _after(self, response: Response) -> Response:
        if request.path.startswith("/_fake/"):
            return response
        if g.get("hold") and response.status_code < 300:
            self._release.wait(g.hold)
        with self._lock:
            response.headers.update(self._limit_headers())
            if g.get("state") is not self._state:
                return response
            self._state.stats[f"status:{response.status_code}"] += 1
            self._state.log.append(
                RequestRecord(
                    request.path,
                    response.status_code,
                    g.get("records", 0),
                    g.get("ids", ()),
                    g.get("fault"),
                )
            )
        return response

    # Braze routes

    def _track(self) -> tuple[Response, int]:
        body = _json_object()
        arrays = {name: body.get(name, []) for name in ("attributes", "events", "purchases")}
        if not all(isinstance(items, list) for items in arrays.values()):
            raise BrazeError(400, "Bad syntax")
        total = sum(len(items) for items in arrays.values())
        attributes = arrays["attributes"]
        g.records = len(attributes)
        g.ids = tuple(str(o.get("external_id")) for o in attributes if isinstance(o, dict))
        if total > self._track_limit:
            raise BrazeError(400, TOO_MANY_OBJECTS)
        if total == 0:
            raise BrazeError(400, NO_VALID_DATA)
        with self._lock:
            self._admit(total)
            errors = [
                {"type": problem, "input_array": "attributes", "index": index}
                for index, item in enumerate(attributes)
                if (problem := self._problem(item))
            ]
            bad = {error["index"] for error in errors}
            valid = [item for index, item in enumerate(attributes) if index not in bad]
            others = len(arrays["events"]) + len(arrays["purchases"])
            if not valid and not others:
                raise BrazeError(400, NO_VALID_DATA, errors)
            for item in valid:
                self._merge(item)
        answer: dict[str, Any] = {"message": "success"}
        if attributes:
            answer["attributes_processed"] = len(valid)
        for name in ("events", "purchases"):
            if arrays[name]:
                answer[f"{name}_processed"] = len(arrays[name])
        if errors:
            answer["errors"] = errors
        return jsonify(answer), 201

    def _problem(self, item: object) -> str | None:
        """Why Braze would refuse one attributes object, or None."""
        if not isinstance(item, dict) or not any(item.get(name) for name in _IDENTIFIERS):
            return MISSING_IDENTIFIER
        external_id = item.get("external_id")
        if not isinstance(external_id, str) or not external_id:
            return "the fake Braze keys profiles by a string external_id only"
        if external_id in self._state.refused:
            return REFUSED_ID
        email = item.get("email")
        if email is not None and not (isinstance(email, str) and _EMAIL.match(email)):
            return INVALID_EMAIL
        return None

    def _merge(self, item: dict[str, Any]) -> None:
        """Merge one attributes object into its profile: ``null`` removes an attribute."""
        external_id = str(item["external_id"])
        profile = self._state.profiles.setdefault(external_id, {})
        for name, value in item.items():
            if name in ("external_id", "_update_existing_only"):
                continue
            if value is None:
                profile.pop(name, None)
            else:
                profile[name] = value
        self._state.stats["attributes"] += 1

    def _delete(self) -> tuple[Response, int]:
        body = _json_object()
        ids = body.get("external_ids", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise BrazeError(400, "Bad syntax")
        g.records, g.ids = len(ids), tuple(ids)
        if len(ids) > DELETE_LIMIT:
            raise BrazeError(400, TOO_MANY_IDS)
        with self._lock:
            self._admit(len(ids))
            for external_id in ids:
                profile = self._state.profiles.pop(external_id, None)
                if profile is not None:
                    self._state.deleted[external_id] = profile
                    self._state.stats["deleted"] += 1
        return jsonify(deleted=len(ids), message="success"), 201

    # Control routes: no auth, not counted, not rate limited.

    def _control(self, action: str) -> Any:
        body = _json_object() if request.method == "POST" and request.content_length else {}
        match request.method, action:
            case "GET", "stats":
                return jsonify(self.stats())
            case "GET", "records":
                return jsonify(records=self.profiles(), deleted=self.deleted())
            case "GET", "requests":
                return jsonify([record.__dict__ for record in self.requests_log])
            case "POST", "reset":
                self.reset()
            case "POST", "fail":
                self.fail(
                    int(body.get("count", 1)), int(body.get("status", 500)), body.get("message")
                )
            case "POST", "slow":
                self.slow(int(body.get("count", 1)), float(_field(body, "seconds")))
            case "POST", "revoke":
                self.revoke()
            case "POST", "restore":
                self.restore()
            case "POST", "permissions":
                self.set_permissions(_field(body, "permissions"))
            case "POST", "refuse":
                self.refuse(_field(body, "external_ids"))
            case "POST", "limits":
                self.set_limits(
                    int(_field(body, "records_per_second")),
                    float(body.get("window_seconds", 1.0)),
                    body.get("track_limit"),
                )
            case _:
                raise BrazeError(404, f"No control route {request.method} {action}")
        return Response(status=204)

    def _build_app(self) -> Flask:
        app = Flask(__name__)
        app.before_request(self._before)
        app.after_request(self._after)
        app.register_error_handler(BrazeError, lambda error: error.response())
        app.register_error_handler(HTTPException, _http_error)
        app.add_url_rule(TRACK, "track", self._track, methods=["POST"])
        app.add_url_rule(DELETE, "delete", self._delete, methods=["POST"])
        app.add_url_rule("/_fake/<action>", "control", self._control, methods=["GET", "POST"])
        return app


def _json_object() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise BrazeError(400, "Bad syntax")
    return body


def _field(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise BrazeError(400, f"'{name}' is required")
    return body[name]


def _http_error(error: HTTPException) -> tuple[Response, int]:
    status = error.code or 500
    return jsonify(message=error.name), status


def main(argv: list[str] | None = None) -> int:
    """Run a fake Braze until SIGTERM or SIGINT; prints its URL on the first line."""
    parser = argparse.ArgumentParser(prog="python -m idsync.fakes.braze", description=__doc__)
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument("--api-key", default=DEFAULT_KEY)
    parser.add_argument(
        "--records-per-second",
        type=int,
        default=DEFAULT_RECORDS_PER_SECOND,
        help="records (attributes objects, deleted ids) admitted per second before a 429",
    )
    parser.add_argument("--window", type=float, default=1.0, help="rate window in seconds")
    parser.add_argument(
        "--track-limit", type=int, default=TRACK_LIMIT, help="objects per /users/track request"
    )
    args = parser.parse_args(argv)
    fake = FakeBraze(
        args.api_key,
        records_per_second=args.records_per_second,
        window_seconds=args.window,
        track_limit=args.track_limit,
        port=args.port,
    )
    return run_until_signal(fake)


if __name__ == "__main__":
    raise SystemExit(main())
