"""A fake Auth0 Management API and Event Stream: a real HTTP server on loopback, for tests.

It behaves like the parts of Auth0 that idsync relies on (see
``shared/reference/auth0-management.md``):

- ``POST /oauth/token``: client credentials, the audience checked, tokens that
  expire after ``token_expires_in`` seconds (a call with an expired one is a 401).
- ``GET|PATCH /api/v2/event-streams/{id}``: the stream and its status. It is
  disabled after ``consecutive_threshold`` consecutive or ``total_threshold``
  total failed events, and a PATCH to ``enabled`` is refused (409) while the
  total is at or above ``total_threshold``.
- ``GET .../deliveries``: failed deliveries as a bare array with no cursor,
  ``take`` at most 100, ``date_from`` inclusive and ``date_to`` exclusive in
  whole-second RFC 3339 (sub-second times are a 400), ``event.data`` encoded as a
  JSON string. Auth0 does not document which id ``from`` expects, so
  ``from_reading`` chooses: ``"after"`` (the page starts after that id) or ``"at"``
  (the page starts at it).
- ``POST .../redeliver``: 202 echoing the filter; it sends the failed events of
  the window to the webhook again in a background thread, as Auth0 does, and an
  event that gets through no longer counts as failed. 409 while some of them
  are still being redelivered.
- ``GET /api/v2/users/{id}``, ``POST /api/v2/jobs/users-exports``,
  ``GET /api/v2/jobs/{id}``: a job goes pending -> processing -> completed over
  ``job_seconds``; its ``location`` serves NDJSON (gzip with ``export_gzip``),
  valid for 60 seconds like Auth0's link.
- Every API answer carries ``x-ratelimit-limit``, ``-remaining`` and ``-reset``
  (Unix seconds); past ``rate_limit`` requests per ``window_seconds`` the answer
  is 429.

``emit(events)`` plays the Event Stream: it posts each CloudEvent to
``webhook_url`` with the bearer token, 4 attempts, and records the event as a
failed delivery when none got a 2xx. While the stream is disabled, ``emit``
sends nothing and records nothing (``dropped`` keeps them for tests): that is
why idsync warns that events of a disabled period may never have been produced.

The same controls are reachable over HTTP under ``/_fake/`` (no auth, not rate
limited), for a fake started with ``python -m idsync.fakes.auth0 --port N``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from flask import Flask, Response, jsonify, request

from idsync.fakes.server import FakeServer, run_until_signal

ALL_SCOPES = frozenset(
    {
        "read:event_streams",
        "update:event_streams",
        "read:event_deliveries",
        "update:event_deliveries",
        "read:users",
    }
)
MAX_TAKE = 100
DEFAULT_TAKE = 50
LINK_SECONDS = 60  # Auth0's export download link lasts 60 seconds.
_WHOLE_SECOND = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)$")
_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def random_id(prefix: str, length: int = 26) -> str:
    """An Auth0-style id: ``prefix`` and random characters, ``length`` in all (``est_...``)."""
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length - len(prefix)))


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


class _ApiError(Exception):
    """An answer in the Management API's error shape."""

    def __init__(self, status: int, message: str, error_code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code

    def response(self) -> tuple[Response, int]:
        names = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
        names |= {409: "Conflict", 429: "Too Many Requests"}
        body: dict[str, Any] = {"statusCode": self.status, "error": names.get(self.status, "Error")}
        body["message"] = self.message
        if self.error_code:
            body["errorCode"] = self.error_code
        return jsonify(body), self.status


@dataclass
class FailedDelivery:
    """An event the stream could not deliver, as Auth0 keeps it."""

    event: dict[str, Any]
    time: datetime
    attempts: list[dict[str, Any]] = field(default_factory=list)
    redelivering: bool = False

    @property
    def id(self) -> str:
        return str(self.event["id"])

    def to_json(self, stream_id: str) -> dict[str, Any]:
        """The documented shape: ``event.data`` is the event contents encoded as a string."""
        event = {key: self.event.get(key) for key in ("id", "source", "specversion", "type")}
        event |= {"time": self.event.get("time"), "data": json.dumps(self.event.get("data"))}
        return {
            "id": self.id,
            "event_stream_id": stream_id,
            "status": "failed",
            "event_type": self.event.get("type"),
            "attempts": list(self.attempts),
            "event": event,
        }


@dataclass(frozen=True)
class WebhookAnswer:
    """One attempt to post an event to the webhook, and idsync's answer (None: no answer)."""

    event_id: str
    status: int | None
    redelivery: bool


@dataclass
class _Job:
    id: str
    created: float
    connection_id: str | None
    fields: list[dict[str, str]]
    format: str
    limit: int | None
    users: list[dict[str, Any]]
    created_at: str = field(default_factory=lambda: _iso(datetime.now(UTC)))


def _lookup(user: dict[str, Any], name: str) -> Any:
    value: Any = user
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def generated_user(number: int, *, at: datetime | None = None) -> dict[str, Any]:
    """A plausible Auth0 user, numbered: for benchmarks and large exports."""
    moment = _iso(at or datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=number))
    return {
        "user_id": f"auth0|gen{number:07d}",
        "email": f"user{number:07d}@example.com",
        "email_verified": True,
        "given_name": f"Given{number}",
        "family_name": f"Family{number}",
        "name": f"Given{number} Family{number}",
        "created_at": moment,
        "updated_at": moment,
        "blocked": False,
        "identities": [
            {
                "connection": "Username-Password-Authentication",
                "provider": "auth0",
                "user_id": f"gen{number:07d}",
                "isSocial": False,
            }
        ],
        "app_metadata": {"plan": "pro"},
        "user_metadata": {},
    }


class FakeAuth0(FakeServer):
    """Auth0's Management API for one tenant with one Event Stream, and the stream itself."""

    label = "fake Auth0"

    def __init__(
        self,
        *,
        domain: str = "idsync-test.eu.auth0.com",
        client_id: str = "fake-client-id",
        client_secret: str = "fake-client-secret",  # noqa: S107 - a fake's fixed secret
        stream_id: str | None = None,
        webhook_url: str | None = None,
        webhook_token: str | None = None,
        token_expires_in: float = 86400,
        consecutive_threshold: int = 500,
        total_threshold: int = 5000,
        from_reading: str = "after",
        rate_limit: int = 1000,
        window_seconds: float = 1.0,
        attempts: int = 4,
        job_seconds: float = 0.6,
        export_gzip: bool = False,
        scopes: Iterable[str] = ALL_SCOPES,
        port: int = 0,
    ) -> None:
        super().__init__(port)
        if from_reading not in ("after", "at"):
            raise ValueError("from_reading is 'after' or 'at'")
        self.domain, self.client_id, self.client_secret = domain, client_id, client_secret
        self.stream_id = stream_id or random_id("est_")
        self.webhook_url, self.webhook_token = webhook_url, webhook_token
        self.token_expires_in = token_expires_in
        self.consecutive_threshold, self.total_threshold = consecutive_threshold, total_threshold
        self.from_reading = from_reading
        self.rate_limit, self.window_seconds = rate_limit, window_seconds
        self.attempts, self.job_seconds, self.export_gzip = attempts, job_seconds, export_gzip
        self.scopes = frozenset(scopes)
        self._lock = threading.RLock()
        self._http = requests.Session()
        self._redeliveries: list[threading.Thread] = []
        self.reset()
        self.app = self._build_app()

    # State and test switches

    def reset(self) -> None:
        """Forget every event, user, job, token and count; the stream is enabled again."""
        with self._lock:
            self.status = "enabled"
            self.failed: dict[str, FailedDelivery] = {}
            self.delivered: set[str] = set()
            self.dropped: list[dict[str, Any]] = []
            self.answers: list[WebhookAnswer] = []
            self.consecutive_failures = 0
            self.users: dict[str, dict[str, Any]] = {}
            self.connections: dict[str, str] = {}  # user_id -> connection id
            self.jobs: dict[str, _Job] = {}
            self.tokens: dict[str, float] = {}  # token -> expiry (monotonic)
            self.token_requests = 0
            self.requests_log: list[tuple[str, str, int]] = []
            self._window_start, self._window_count = time.time(), 0
            self._forced_429 = 0

    @property
    def total_failures(self) -> int:
        """Events that are failed now; a redelivery that gets through takes one off."""
        with self._lock:
            return len(self.failed)

    def failed_ids(self) -> set[str]:
        with self._lock:
            return set(self.failed)

    def rate_limit_next(self, count: int) -> None:
        """Answer the next ``count`` API requests 429, whatever the bucket holds."""
        with self._lock:
            self._forced_429 = count

    def expire_tokens(self) -> None:
        """Every token issued so far is expired from now on."""
        with self._lock:
            self.tokens = dict.fromkeys(self.tokens, 0.0)

    def add_users(
        self, users: Iterable[dict[str, Any]], connection_id: str = "con_default"
    ) -> None:
        """Users of the tenant, as ``GET /api/v2/users/{id}`` and exports show them."""
        with self._lock:
            for user in users:
                self.users[str(user["user_id"])] = dict(user)
                self.connections[str(user["user_id"])] = connection_id

    def remove_user(self, user_id: str) -> None:
        with self._lock:
            self.users.pop(user_id, None)

    def emit(self, events: Iterable[dict[str, Any]]) -> list[int | None]:
        """Play the Event Stream: post each event to the webhook; the last answer of each.

        An event that gets no 2xx within ``attempts`` tries is kept as a failed
        delivery; a 4xx fails it at once, as Auth0 does. While the stream is
        disabled nothing is sent or kept.
        """
        results: list[int | None] = []
        for event in events:
            with self._lock:
                if self.status != "enabled":
                    self.dropped.append(event)
                    results.append(None)
                    continue
            results.append(self._deliver(event, redelivery=False))
        return results

    def _deliver(self, event: dict[str, Any], *, redelivery: bool) -> int | None:
        attempts: list[dict[str, Any]] = []
        status: int | None = None
        for _ in range(self.attempts):
            status, error = self._post(event)
            attempts.append(
                {
                    "status": "succeeded" if status and status < 300 else "failed",
                    "timestamp": _iso(datetime.now(UTC)),
                    "error_message": error,
                }
            )
            with self._lock:
                self.answers.append(WebhookAnswer(str(event["id"]), status, redelivery))
            if status is not None and (status < 300 or 400 <= status < 500):
                break
        self._record(event, attempts, succeeded=status is not None and status < 300)
        return status

    def _post(self, event: dict[str, Any]) -> tuple[int | None, str | None]:
        if not self.webhook_url:
            return None, "no webhook URL configured"
        headers = {"Authorization": f"Bearer {self.webhook_token or ''}"}
        try:
            answer = self._http.post(self.webhook_url, json=event, headers=headers, timeout=5)
        except requests.RequestException as error:
            return None, f"{type(error).__name__}: {error}"[:200]
        problem = None if answer.status_code < 300 else f"HTTP {answer.status_code}"
        return answer.status_code, problem

    def _record(
        self, event: dict[str, Any], attempts: list[dict[str, Any]], succeeded: bool
    ) -> None:
        event_id = str(event["id"])
        with self._lock:
            if succeeded:
                self.failed.pop(event_id, None)
                self.delivered.add(event_id)
                self.consecutive_failures = 0
                return
            kept = self.failed.get(event_id)
            if kept is None:
                kept = self.failed[event_id] = FailedDelivery(event, _parse(str(event["time"])))
            kept.attempts.extend(attempts)
            kept.redelivering = False
            self.consecutive_failures += 1
            if (
                self.consecutive_failures >= self.consecutive_threshold
                or len(self.failed) >= self.total_threshold
            ):
                self.status = "disabled"

    def wait_redeliveries(self, timeout: float = 30) -> None:
        """Wait until every redelivery started so far has finished."""
        deadline = time.monotonic() + timeout
        for thread in list(self._redeliveries):
            thread.join(max(0.0, deadline - time.monotonic()))

    def before_stop(self) -> None:
        self.wait_redeliveries(10)
        self._http.close()

    # The HTTP app

    def _build_app(self) -> Flask:
        app = Flask(__name__)
        app.before_request(self._limit)
        app.after_request(self._headers)
        app.add_url_rule("/oauth/token", "token", self._token, methods=["POST"])
        stream = "/api/v2/event-streams/<stream_id>"
        app.add_url_rule(stream, "stream", self._stream, methods=["GET", "PATCH"])
        app.add_url_rule(f"{stream}/deliveries", "deliveries", self._deliveries)
        app.add_url_rule(f"{stream}/redeliver", "redeliver", self._redeliver, methods=["POST"])
        app.add_url_rule("/api/v2/users/<path:user_id>", "user", self._user)
        app.add_url_rule(
            "/api/v2/jobs/users-exports", "export", self._start_export, methods=["POST"]
        )
        app.add_url_rule("/api/v2/jobs/<job_id>", "job", self._job)
        app.add_url_rule("/downloads/<job_id>", "download", self._download)
        app.add_url_rule("/_fake/<action>", "control", self._control, methods=["GET", "POST"])
        app.register_error_handler(_ApiError, lambda error: error.response())
        return app

    def _limit(self) -> tuple[Response, int] | None:
        """The rate limit: a fixed window of ``rate_limit`` requests per ``window_seconds``."""
        if request.path.startswith(("/_fake/", "/downloads/")):
            return None
        with self._lock:
            now = time.time()
            if now - self._window_start >= self.window_seconds:
                self._window_start, self._window_count = now, 0
            self._window_count += 1
            forced = self._forced_429 > 0
            self._forced_429 -= 1 if forced else 0
            if forced or self._window_count > self.rate_limit:
                return _ApiError(
                    429, "Global limit has been reached", "too_many_requests"
                ).response()
        return None

    def _headers(self, response: Response) -> Response:
        if not request.path.startswith(("/_fake/", "/downloads/")):
            with self._lock:
                reset = math.ceil(self._window_start + self.window_seconds)
                remaining = max(0, self.rate_limit - self._window_count)
                if response.status_code == 429:
                    remaining = 0
            response.headers["x-ratelimit-limit"] = str(self.rate_limit)
            response.headers["x-ratelimit-remaining"] = str(remaining)
            response.headers["x-ratelimit-reset"] = str(reset)
            with self._lock:
                self.requests_log.append((request.method, request.path, response.status_code))
        return response

    def _token(self) -> tuple[Response, int]:
        body = request.get_json(silent=True) if request.is_json else request.form.to_dict()
        body = body if isinstance(body, dict) else {}
        with self._lock:
            self.token_requests += 1
        if body.get("grant_type") != "client_credentials":
            return jsonify(error="unsupported_grant_type", error_description="Unsupported"), 400
        if (
            body.get("client_id") != self.client_id
            or body.get("client_secret") != self.client_secret
        ):
            return jsonify(error="access_denied", error_description="Unauthorized"), 401
        audience = f"https://{self.domain}/api/v2/"
        if body.get("audience") != audience:
            description = f"Service not enabled within domain: {body.get('audience')}"
            return jsonify(error="access_denied", error_description=description), 403
        token = secrets.token_urlsafe(24)
        with self._lock:
            self.tokens[token] = time.monotonic() + self.token_expires_in
        answer = {"access_token": token, "token_type": "Bearer", "scope": " ".join(self.scopes)}
        return jsonify(answer | {"expires_in": self.token_expires_in}), 200

    def _authorize(self, scope: str) -> None:
        header = request.headers.get("Authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else ""
        with self._lock:
            expiry = self.tokens.get(token)
        if expiry is None:
            raise _ApiError(401, "Invalid token", "invalid_token")
        if expiry <= time.monotonic():
            raise _ApiError(401, "Expired token received for JSON Web Token validation")
        if scope not in self.scopes:
            raise _ApiError(
                403, f"Insufficient scope, expected any of: {scope}", "insufficient_scope"
            )

    def _own_stream(self, stream_id: str) -> None:
        if stream_id != self.stream_id:
            raise _ApiError(404, "The event stream does not exist", "inexistent_event_stream")

    def _stream_json(self) -> dict[str, Any]:
        return {
            "id": self.stream_id,
            "name": "idsync",
            "status": self.status,
            "subscriptions": [
                {"event_type": kind} for kind in ("user.created", "user.updated", "user.deleted")
            ],
            "destination": {
                "type": "webhook",
                "configuration": {
                    "webhook_endpoint": self.webhook_url,
                    "webhook_authorization": {"method": "bearer"},
                },
            },
        }

    def _stream(self, stream_id: str) -> tuple[Response, int]:
        self._authorize("read:event_streams" if request.method == "GET" else "update:event_streams")
        self._own_stream(stream_id)
        if request.method == "GET":
            with self._lock:
                return jsonify(self._stream_json()), 200
        body = request.get_json(silent=True)
        status = body.get("status") if isinstance(body, dict) else None
        if status not in ("enabled", "disabled"):
            raise _ApiError(400, "Payload validation error: 'status' must be enabled or disabled")
        with self._lock:
            if status == "enabled" and len(self.failed) >= self.total_threshold:
                raise _ApiError(
                    409,
                    f"The event stream cannot be enabled while it has {len(self.failed)} failed "
                    f"events (the limit is {self.total_threshold}); redeliver them first",
                )
            self.status = status
            if status == "enabled":
                self.consecutive_failures = 0
            return jsonify(self._stream_json()), 200

    def _window(self, values: dict[str, Any]) -> tuple[datetime | None, datetime | None]:
        bounds: list[datetime | None] = []
        for name in ("date_from", "date_to"):
            text = values.get(name)
            if text is None:
                bounds.append(None)
                continue
            if not isinstance(text, str) or not _WHOLE_SECOND.match(text):
                raise _ApiError(
                    400,
                    f"Query validation error: '{name}' must be RFC 3339 without fractional seconds",
                )
            bounds.append(_parse(text))
        return bounds[0], bounds[1]

    def _selected(self, values: dict[str, Any]) -> list[FailedDelivery]:
        """Failed events in ``date_from`` (inclusive) .. ``date_to`` (exclusive), in order."""
        start, end = self._window(values)
        with self._lock:
            rows = sorted(self.failed.values(), key=lambda row: (row.time, row.id))
        return [
            row
            for row in rows
            if (start is None or row.time >= start) and (end is None or row.time < end)
        ]

    def _deliveries(self, stream_id: str) -> tuple[Response, int]:
        self._authorize("read:event_deliveries")
        self._own_stream(stream_id)
        statuses = request.args.get("statuses", "failed")
        if statuses.split(",") != ["failed"]:
            raise _ApiError(400, "Query validation error: 'statuses' must be failed")
        take_text = request.args.get("take", str(DEFAULT_TAKE))
        if not take_text.isdigit() or not 1 <= int(take_text) <= MAX_TAKE:
            raise _ApiError(400, f"Query validation error: 'take' must be 1 to {MAX_TAKE}")
        rows = self._selected(request.args.to_dict())
        start = request.args.get("from")
        if start is not None:
            ids = [row.id for row in rows]
            if start not in ids:
                raise _ApiError(400, f"Query validation error: no delivery {start} in this range")
            position = ids.index(start) + (1 if self.from_reading == "after" else 0)
            rows = rows[position:]
        page = rows[: int(take_text)]
        return jsonify([row.to_json(self.stream_id) for row in page]), 200

    def _redeliver(self, stream_id: str) -> tuple[Response, int]:
        self._authorize("update:event_deliveries")
        self._own_stream(stream_id)
        body = request.get_json(silent=True) or {}
        if not isinstance(body, dict):
            raise _ApiError(400, "Payload validation error: expected an object")
        rows = self._selected(body)
        with self._lock:
            if any(row.redelivering for row in rows):
                raise _ApiError(409, "One or more events is not in a state that allows redelivery")
            for row in rows:
                row.redelivering = True
        thread = threading.Thread(target=self._redeliver_rows, args=(rows,), daemon=True)
        self._redeliveries.append(thread)
        thread.start()
        echo = {key: body[key] for key in ("date_from", "date_to", "event_types") if key in body}
        return jsonify(echo | {"statuses": ["failed"]}), 202

    def _redeliver_rows(self, rows: list[FailedDelivery]) -> None:
        for row in rows:
            self._deliver(row.event, redelivery=True)

    def _user(self, user_id: str) -> tuple[Response, int]:
        self._authorize("read:users")
        with self._lock:
            user = self.users.get(user_id)
        if user is None:
            raise _ApiError(404, "The user does not exist.", "inexistent_user")
        return jsonify(user), 200

    def _start_export(self) -> tuple[Response, int]:
        self._authorize("read:users")
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise _ApiError(400, "Payload validation error: expected an object")
        fields = body.get("fields") or [{"name": "user_id"}, {"name": "email"}]
        if not isinstance(fields, list) or not all(
            isinstance(item, dict) and isinstance(item.get("name"), str) for item in fields
        ):
            raise _ApiError(400, "Payload validation error: 'fields' must be [{\"name\": ...}]")
        export_format = body.get("format", "csv")
        if export_format not in ("json", "csv"):
            raise _ApiError(400, "Payload validation error: 'format' must be json or csv")
        connection_id = body.get("connection_id")
        with self._lock:
            users = [
                user
                for user_id, user in self.users.items()
                if connection_id is None or self.connections.get(user_id) == connection_id
            ]
            job = _Job(
                id=random_id("job_", 20),
                created=time.monotonic(),
                connection_id=connection_id,
                fields=fields,
                format=export_format,
                limit=body.get("limit"),
                users=users[: body["limit"]] if body.get("limit") else users,
            )
            self.jobs[job.id] = job
        return jsonify(self._job_json(job)), 201

    def _job_json(self, job: _Job) -> dict[str, Any]:
        elapsed = time.monotonic() - job.created
        answer: dict[str, Any] = {
            "type": "users_export",
            "id": job.id,
            "created_at": job.created_at,
            "format": job.format,
            "fields": job.fields,
        }
        if job.connection_id:
            answer["connection_id"] = job.connection_id
        if elapsed < self.job_seconds / 3:
            return answer | {"status": "pending"}
        if elapsed < self.job_seconds:
            done = int(100 * elapsed / self.job_seconds)
            left = math.ceil(self.job_seconds - elapsed)
            return answer | {
                "status": "processing",
                "percentage_done": done,
                "time_left_seconds": left,
            }
        expires = int(time.time()) + LINK_SECONDS
        location = f"{self.url}/downloads/{job.id}?expires={expires}"
        return answer | {"status": "completed", "percentage_done": 100, "location": location}

    def _job(self, job_id: str) -> tuple[Response, int]:
        self._authorize("read:users")
        with self._lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise _ApiError(404, "The job does not exist.", "inexistent_job")
        return jsonify(self._job_json(job)), 200

    def _download(self, job_id: str) -> Response | tuple[Response, int]:
        with self._lock:
            job = self.jobs.get(job_id)
        expires = request.args.get("expires", "")
        if job is None or not expires.isdigit() or int(expires) < time.time():
            # S3's answer to an expired or forged presigned link.
            return Response("<Error><Code>AccessDenied</Code></Error>", 403, mimetype="text/xml")
        lines = self._export_lines(job)
        if self.export_gzip:
            return Response(_gzipped(lines), mimetype="application/gzip")
        return Response(lines, mimetype="application/x-ndjson")

    def _export_lines(self, job: _Job) -> Iterator[bytes]:
        for user in job.users:
            row = {}
            for item in job.fields:
                value = _lookup(user, item["name"])
                if value is not None:
                    row[item.get("export_as") or item["name"]] = value
            yield json.dumps(row).encode() + b"\n"

    # Controls over HTTP, for a fake in another process

    def _control(self, action: str) -> tuple[Response, int]:
        body = request.get_json(silent=True) or {}
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "state": lambda _: self.state(),
            "reset": lambda _: self.reset(),
            "emit": lambda b: self.emit(b.get("events", [])),
            "users": self._control_users,
            "configure": self._configure,
            "rate_limit_next": lambda b: self.rate_limit_next(int(b.get("count", 1))),
        }
        handler = handlers.get(action)
        if handler is None:
            return jsonify(error=f"unknown control {action!r}", known=sorted(handlers)), 404
        return jsonify(result=handler(body)), 200

    def _control_users(self, body: dict[str, Any]) -> int:
        users = list(body.get("users", []))
        first = int(body.get("first", 0))
        users += [
            generated_user(number) for number in range(first, first + int(body.get("generate", 0)))
        ]
        self.add_users(users, body.get("connection_id", "con_default"))
        return len(users)

    def _configure(self, body: dict[str, Any]) -> dict[str, Any]:
        names = {
            "webhook_url",
            "webhook_token",
            "token_expires_in",
            "consecutive_threshold",
            "total_threshold",
            "from_reading",
            "rate_limit",
            "window_seconds",
            "attempts",
            "job_seconds",
            "export_gzip",
        }
        unknown = set(body) - names
        if unknown:
            raise _ApiError(400, f"unknown settings: {sorted(unknown)}")
        for name, value in body.items():
            setattr(self, name, value)
        return self.state()

    def state(self) -> dict[str, Any]:
        """What a test asserts on: the stream's status and failure counts, and the tenant."""
        with self._lock:
            return {
                "stream_id": self.stream_id,
                "status": self.status,
                "failed": len(self.failed),
                "consecutive_failures": self.consecutive_failures,
                "delivered": len(self.delivered),
                "dropped": len(self.dropped),
                "users": len(self.users),
                "token_requests": self.token_requests,
            }


def _gzipped(lines: Iterable[bytes]) -> Iterator[bytes]:
    """Compress a stream of lines as one gzip member, without holding it whole."""
    compressor = zlib.compressobj(wbits=31)  # 31: a gzip header and trailer
    for line in lines:
        data = compressor.compress(line)
        if data:
            yield data
    yield compressor.flush()


def main(argv: list[str] | None = None) -> int:
    """Run a fake Auth0 until SIGTERM or SIGINT; prints its URL on the first line."""
    parser = argparse.ArgumentParser(prog="python -m idsync.fakes.auth0", description=__doc__)
    parser.add_argument("--port", type=int, default=8098)
    parser.add_argument("--domain", default="idsync-test.eu.auth0.com")
    parser.add_argument("--client-id", default="fake-client-id")
    parser.add_argument("--client-secret", default="fake-client-secret")
    parser.add_argument("--stream-id", default=None)
    parser.add_argument("--rate-limit", type=int, default=1000, help="requests per window")
    parser.add_argument("--window", type=float, default=1.0, help="window in seconds")
    parser.add_argument("--users", type=int, default=0, help="generate this many users")
    parser.add_argument("--export-gzip", action="store_true")
    parser.add_argument("--job-seconds", type=float, default=0.6)
    args = parser.parse_args(argv)
    fake = FakeAuth0(
        domain=args.domain,
        client_id=args.client_id,
        client_secret=args.client_secret,
        stream_id=args.stream_id,
        rate_limit=args.rate_limit,
        window_seconds=args.window,
        export_gzip=args.export_gzip,
        job_seconds=args.job_seconds,
        port=args.port,
    )
    fake.add_users(generated_user(number) for number in range(args.users))
    return run_until_signal(fake)


if __name__ == "__main__":
    raise SystemExit(main())
