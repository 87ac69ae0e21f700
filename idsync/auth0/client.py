"""A small client of Auth0's Management API: the calls recovery, backfill and reconcile need.

One machine-to-machine token from the client-credentials grant, kept until
shortly before it expires: a new token per call is a documented cause of 429s
(https://auth0.com/docs/secure/tokens/access-tokens/management-api-access-tokens/get-management-api-access-tokens-for-production).
A 429 waits until ``x-ratelimit-reset`` (Unix seconds), or ``Retry-After`` where
the token quota sends it, within a bound
(https://auth0.com/docs/troubleshoot/customer-support/operational-policies/rate-limit-policy/management-api-endpoint-rate-limits).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import requests

from idsync.settings import Settings

# Refresh a token this long before Auth0 says it expires (at most a tenth of its life).
TOKEN_MARGIN_SECONDS = 300.0
# The longest a single call waits out 429s before giving up with an error.
MAX_RATE_WAIT_SECONDS = 30.0
DOWNLOAD_CHUNK_BYTES = 64 * 1024
_REQUIRED = (
    ("auth0_domain", "AUTH0_DOMAIN"),
    ("auth0_client_id", "AUTH0_CLIENT_ID"),
    ("auth0_client_secret", "AUTH0_CLIENT_SECRET"),
)


class Auth0Error(Exception):
    """A Management API call that did not succeed; ``status`` is None when nothing answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def missing_auth0(settings: Settings, *, stream: bool = True) -> str | None:
    """Why the Management API cannot be used with ``settings``, or None when it can.

    ``stream=False`` asks only for what calls outside the Event Stream need
    (backfill and reconcile read users; recovery also needs AUTH0_EVENT_STREAM_ID).
    """
    required = (
        [*_REQUIRED, ("auth0_event_stream_id", "AUTH0_EVENT_STREAM_ID")] if stream else _REQUIRED
    )
    missing = [variable for field, variable in required if not getattr(settings, field)]
    if not missing:
        return None
    names = ", ".join(missing)
    verb = "is" if len(missing) == 1 else "are"
    return f"{names} {verb} not set"


def recovery_off(settings: Settings) -> str | None:
    """Why recovery cannot run with ``settings`` (a line for /readyz and the CLI), or None.

    Beat's schedule asks it too, so it lives here, below the recovery pass and ingest.
    """
    missing = missing_auth0(settings)
    return f"recovery off: {missing}" if missing else None


def rfc3339(moment: datetime) -> str:
    """``2026-11-29T17:00:00Z``: the whole-second UTC form the deliveries API accepts."""
    if moment.microsecond:
        raise ValueError(f"Auth0 takes whole seconds only, not {moment.isoformat()}")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _message(answer: requests.Response) -> str:
    """Auth0's own words from an error body (``message`` or ``error_description``)."""
    try:
        body = answer.json()
    except ValueError:
        return answer.text[:200]
    if isinstance(body, dict):
        return str(
            body.get("message") or body.get("error_description") or body.get("error") or body
        )
    return str(body)[:200]


class ManagementClient:
    """Auth0 Management API calls for one tenant, with a cached token and 429 waits.

    Safe to share between threads: the token is fetched under a lock.
    """

    def __init__(
        self,
        *,
        base_url: str,
        domain: str,
        client_id: str,
        client_secret: str,
        stream_id: str | None = None,
        timeout: tuple[float, float] = (3.05, 30.0),
        max_rate_wait: float = MAX_RATE_WAIT_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.domain, self.stream_id = domain, stream_id
        self._client_id, self._client_secret = client_id, client_secret
        self.timeout, self.max_rate_wait, self._sleep = timeout, max_rate_wait, sleep
        self.session = requests.Session()
        self._token: str | None = None
        self._token_until = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, stream: bool = True) -> ManagementClient | None:
        """A client for the configured tenant; None when ``missing_auth0`` names a gap."""
        if missing_auth0(settings, stream=stream):
            return None
        assert settings.auth0_domain and settings.auth0_client_id and settings.auth0_client_secret
        assert settings.auth0_base_url
        return cls(
            base_url=settings.auth0_base_url,
            domain=settings.auth0_domain,
            client_id=settings.auth0_client_id,
            client_secret=settings.auth0_client_secret,
            stream_id=settings.auth0_event_stream_id,
        )

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> ManagementClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # The token

    def _access_token(self) -> str:
        with self._lock:
            if self._token is None or time.monotonic() >= self._token_until:
                self._token, lifetime = self._fetch_token()
                margin = min(TOKEN_MARGIN_SECONDS, lifetime / 10)
                self._token_until = time.monotonic() + lifetime - margin
            return self._token

    def _forget_token(self) -> None:
        with self._lock:
            self._token = None

    def _fetch_token(self) -> tuple[str, float]:
        """A client-credentials token for ``https://{domain}/api/v2/`` (with the trailing slash)."""
        body = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
            "audience": f"https://{self.domain}/api/v2/",
        }
        answer = self._send("POST", "/oauth/token", data=body, authorized=False)
        if answer.status_code != 200:
            raise Auth0Error(
                f"Auth0 refused the client credentials ({answer.status_code}: {_message(answer)}); "
                "check AUTH0_DOMAIN, AUTH0_CLIENT_ID and AUTH0_CLIENT_SECRET",
                answer.status_code,
            )
        token = answer.json()
        return str(token["access_token"]), float(token.get("expires_in", 86400))

    # Sending

    def _rate_wait(self, answer: requests.Response) -> float:
        """Seconds until Auth0 adds requests to the bucket (``x-ratelimit-reset``)."""
        retry_after = answer.headers.get("Retry-After", "")
        if retry_after.replace(".", "", 1).isdigit():
            return float(retry_after)
        reset = answer.headers.get("x-ratelimit-reset", "")
        if reset.isdigit():
            return max(0.0, int(reset) - time.time())
        return 1.0

    def _send(
        self, method: str, path: str, *, authorized: bool = True, **kwargs: Any
    ) -> requests.Response:
        """One call, waiting out 429s (at most ``max_rate_wait`` in all) and renewing a
        token Auth0 no longer takes (one 401 per call)."""
        waited, renewed = 0.0, False
        while True:
            headers = {"Authorization": f"Bearer {self._access_token()}"} if authorized else {}
            try:
                answer = self.session.request(
                    method, self.base_url + path, headers=headers, timeout=self.timeout, **kwargs
                )
            except requests.RequestException as error:
                raise Auth0Error(f"Auth0 {method} {path} did not answer: {error}") from error
            if answer.status_code == 401 and authorized and not renewed:
                self._forget_token()
                renewed = True
                continue
            if answer.status_code != 429:
                return answer
            delay = min(max(self._rate_wait(answer), 0.05), 10.0)
            if waited + delay > self.max_rate_wait:
                raise Auth0Error(
                    f"Auth0 {method} {path} stayed rate limited for {waited:.0f}s", 429
                )
            self._sleep(delay)
            waited += delay

    def _call(
        self, method: str, path: str, *, expect: tuple[int, ...] = (200,), **kwargs: Any
    ) -> Any:
        answer = self._send(method, path, **kwargs)
        if answer.status_code not in expect:
            raise Auth0Error(
                f"Auth0 {method} {path} answered {answer.status_code}: {_message(answer)}",
                answer.status_code,
            )
        return answer.json() if answer.content else None

    def _stream_path(self) -> str:
        if not self.stream_id:
            raise Auth0Error("AUTH0_EVENT_STREAM_ID is not set")
        return f"/api/v2/event-streams/{quote(self.stream_id, safe='')}"

    # Event Streams (https://auth0.com/docs/customize/events/event-testing-observability-and-failure-recovery)

    def get_stream(self) -> dict[str, Any]:
        """The Event Stream, with its ``status`` (``enabled`` or ``disabled``)."""
        return dict(self._call("GET", self._stream_path()))

    def list_failed_deliveries(
        self, date_from: datetime, date_to: datetime, take: int = 100, from_: str | None = None
    ) -> list[dict[str, Any]]:
        """One page of failed deliveries with ``date_from <= time < date_to``.

        The answer is a bare array with no cursor: a full page (``take`` items)
        means there may be more
        (https://auth0.com/docs/api/management/v2/event-streams/get-event-deliveries).
        """
        if not 1 <= take <= 100:
            raise ValueError("take is 1 to 100")
        params = {
            "statuses": "failed",
            "date_from": rfc3339(date_from),
            "date_to": rfc3339(date_to),
            "take": str(take),
        }
        if from_ is not None:
            params["from"] = from_
        page = self._call("GET", f"{self._stream_path()}/deliveries", params=params)
        if not isinstance(page, list):
            raise Auth0Error(f"Auth0 listed deliveries as {type(page).__name__}, not an array")
        return page

    def redeliver(self, date_from: datetime, date_to: datetime) -> bool:
        """Ask Auth0 to send the window's failed events again; False on 409.

        409 means "one or more events is not in a state that allows redelivery"
        (https://auth0.com/docs/api/management/v2/event-streams/post-redeliver).
        """
        body = {
            "date_from": rfc3339(date_from),
            "date_to": rfc3339(date_to),
            "statuses": ["failed"],
        }
        answer = self._send("POST", f"{self._stream_path()}/redeliver", json=body)
        if answer.status_code == 409:
            return False
        if answer.status_code not in (200, 202):
            raise Auth0Error(
                f"Auth0 refused the redelivery ({answer.status_code}: {_message(answer)})",
                answer.status_code,
            )
        return True

    def enable_stream(self) -> dict[str, Any]:
        """Turn a disabled stream back on (``PATCH`` ``{"status": "enabled"}``)."""
        path = self._stream_path()
        return dict(self._call("PATCH", path, json={"status": "enabled"}))

    # Users (https://auth0.com/docs/manage-users/user-migration/bulk-user-exports)

    def start_users_export(self, fields: list[str], connection_id: str | None = None) -> str:
        """Start an NDJSON export of ``fields`` for all users, or one connection's; the job id."""
        body: dict[str, Any] = {"format": "json", "fields": [{"name": name} for name in fields]}
        if connection_id:
            body["connection_id"] = connection_id
        job = self._call("POST", "/api/v2/jobs/users-exports", json=body, expect=(200, 201))
        return str(job["id"])

    def get_job(self, job_id: str) -> dict[str, Any]:
        """A job's ``status``, ``percentage_done`` and, once completed, ``location``
        (https://auth0.com/docs/api/management/v2/jobs/get-jobs-by-id)."""
        return dict(self._call("GET", f"/api/v2/jobs/{quote(job_id, safe='')}"))

    def download(self, location: str) -> Iterator[bytes]:
        """The export file at ``location``, streamed in chunks, as stored (it may be gzip).

        The link is a presigned storage URL valid for 60 seconds, not the API: it is
        fetched without the Management token.
        """
        try:
            answer = requests.get(location, stream=True, timeout=self.timeout)
        except requests.RequestException as error:
            raise Auth0Error(f"the export download did not answer: {error}") from error
        with answer:
            if answer.status_code != 200:
                raise Auth0Error(
                    f"the export download answered {answer.status_code} (the link lasts "
                    "60 seconds; ask the job again for a new one)",
                    answer.status_code,
                )
            yield from answer.iter_content(DOWNLOAD_CHUNK_BYTES)

    def get_user(self, user_id: str) -> dict[str, Any] | None:
        """The user as Auth0 holds it now; None when Auth0 has no such user (404)."""
        answer = self._send("GET", f"/api/v2/users/{quote(user_id, safe='')}")
        if answer.status_code == 404:
            return None
        if answer.status_code != 200:
            raise Auth0Error(
                f"Auth0 GET user answered {answer.status_code}: {_message(answer)}",
                answer.status_code,
            )
        return dict(answer.json())
