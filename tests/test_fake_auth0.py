"""The fake Auth0 behaves like the Auth0 idsync relies on (shared/reference/auth0-management.md)."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from flask import Flask, request

from idsync.fakes.auth0 import FakeAuth0, generated_user
from idsync.fakes.server import FakeServer
from tests.events import auth0_event

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


class Receiver(FakeServer):
    """A webhook that answers ``status`` and keeps the ids and tokens it was sent."""

    label = "test receiver"

    def __init__(self) -> None:
        super().__init__()
        self.status = 202
        self.received: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.app = Flask(__name__)
        self.app.add_url_rule("/events/auth0", "receive", self._receive, methods=["POST"])

    def _receive(self) -> tuple[str, int]:
        with self._lock:
            self.received.append((request.json["id"], request.headers.get("Authorization", "")))
        return "", self.status


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


@pytest.fixture
def fake(receiver: Receiver) -> Iterator[FakeAuth0]:
    with FakeAuth0(webhook_token="hook-token") as server:
        server.webhook_url = f"{receiver.url}/events/auth0"
        yield server


def token(fake: FakeAuth0, **overrides: str) -> requests.Response:
    body = {
        "grant_type": "client_credentials",
        "client_id": fake.client_id,
        "client_secret": fake.client_secret,
        "audience": f"https://{fake.domain}/api/v2/",
    } | overrides
    return requests.post(f"{fake.url}/oauth/token", data=body, timeout=5)


def api(fake: FakeAuth0) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token(fake).json()['access_token']}"
    return session


def events(count: int, start: datetime = NOW, step: float = 1.0) -> list[dict[str, Any]]:
    return [
        auth0_event("user.updated", f"auth0|u{n}", email=f"u{n}@example.com", at=start)
        | {"time": (start + timedelta(seconds=n * step)).isoformat().replace("+00:00", "Z")}
        for n in range(count)
    ]


def deliveries(fake: FakeAuth0, session: requests.Session, **params: Any) -> requests.Response:
    query = {"statuses": "failed"} | params
    url = f"{fake.url}/api/v2/event-streams/{fake.stream_id}/deliveries"
    return session.get(url, params=query, timeout=5)


def test_token_checks_credentials_and_audience_and_expires(fake: FakeAuth0) -> None:
    assert token(fake, client_secret="wrong").status_code == 401
    wrong_audience = token(fake, audience=f"https://{fake.domain}/api/v2")
    assert wrong_audience.status_code == 403
    answer = token(fake).json()
    assert answer["token_type"] == "Bearer" and answer["expires_in"] == 86400
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {answer['access_token']}"
    stream_url = f"{fake.url}/api/v2/event-streams/{fake.stream_id}"
    assert session.get(stream_url, timeout=5).json()["status"] == "enabled"
    fake.expire_tokens()
    expired = session.get(stream_url, timeout=5)
    assert expired.status_code == 401 and "Expired" in expired.json()["message"]


def test_failed_deliveries_have_the_documented_shape(fake: FakeAuth0, receiver: Receiver) -> None:
    receiver.status = 503
    sent = events(3)
    assert fake.emit(sent) == [503, 503, 503]
    # Four attempts each, with the stream's bearer token.
    assert len(receiver.received) == 12
    assert {auth for _, auth in receiver.received} == {"Bearer hook-token"}
    session = api(fake)
    page = deliveries(
        fake, session, date_from="2026-12-01T12:00:00Z", date_to="2026-12-01T12:00:02Z", take=100
    ).json()
    assert isinstance(page, list) and [d["id"] for d in page] == [e["id"] for e in sent[:2]]
    first = page[0]
    assert first["status"] == "failed" and first["event_stream_id"] == fake.stream_id
    assert len(first["attempts"]) == 4 and first["attempts"][0]["error_message"] == "HTTP 503"
    assert isinstance(first["event"]["data"], str)
    assert json.loads(first["event"]["data"]) == sent[0]["data"]
    assert deliveries(fake, session, take=101).status_code == 400
    sub_second = deliveries(fake, session, date_from="2026-12-01T12:00:00.500Z")
    assert sub_second.status_code == 400


def test_a_4xx_fails_at_once(fake: FakeAuth0, receiver: Receiver) -> None:
    receiver.status = 401
    assert fake.emit(events(1)) == [401]
    assert len(receiver.received) == 1 and fake.total_failures == 1


@pytest.mark.parametrize("reading", ["after", "at"])
def test_from_pages_in_either_reading(fake: FakeAuth0, receiver: Receiver, reading: str) -> None:
    fake.from_reading = reading
    receiver.status = 500
    fake.attempts = 1
    sent = events(5, step=0)  # all in one second
    fake.emit(sent)
    session = api(fake)
    first = deliveries(fake, session, take=2).json()
    after = deliveries(fake, session, take=2, **{"from": first[-1]["id"]}).json()
    ordered = sorted(e["id"] for e in sent)
    assert [d["id"] for d in first] == ordered[:2]
    expected = ordered[2:4] if reading == "after" else ordered[1:3]
    assert [d["id"] for d in after] == expected


def test_stream_disables_drops_events_and_reenables_below_the_total(
    fake: FakeAuth0, receiver: Receiver
) -> None:
    receiver.status = 500
    fake.attempts, fake.consecutive_threshold, fake.total_threshold = 1, 5, 8
    # The fifth consecutive failure disables the stream: the sixth event is never sent.
    assert fake.emit(events(6)) == [500] * 5 + [None]
    assert fake.status == "disabled" and fake.total_failures == 5
    assert fake.emit(events(1, start=NOW + timedelta(minutes=1))) == [None]
    assert len(fake.dropped) == 2
    session = api(fake)
    stream_url = f"{fake.url}/api/v2/event-streams/{fake.stream_id}"
    # Below the total threshold it may be re-enabled; at or above it, not.
    fake.total_threshold = 5
    refused = session.patch(stream_url, json={"status": "enabled"}, timeout=5)
    assert refused.status_code == 409
    receiver.status = 202
    redeliver = session.post(
        f"{stream_url}/redeliver",
        json={"date_from": "2026-12-01T12:00:00Z", "date_to": "2026-12-01T13:00:00Z"},
        timeout=5,
    )
    assert redeliver.status_code == 202
    assert redeliver.json()["date_from"] == "2026-12-01T12:00:00Z"
    fake.wait_redeliveries()
    assert fake.total_failures == 0
    assert sum(1 for answer in fake.answers if answer.redelivery) == 5
    enabled = session.patch(stream_url, json={"status": "enabled"}, timeout=5)
    assert enabled.status_code == 200 and enabled.json()["status"] == "enabled"


def test_redeliver_is_refused_while_a_redelivery_runs(fake: FakeAuth0, receiver: Receiver) -> None:
    receiver.status = 500
    fake.attempts = 1
    fake.emit(events(1))
    session = api(fake)
    url = f"{fake.url}/api/v2/event-streams/{fake.stream_id}/redeliver"
    fake.failed[next(iter(fake.failed))].redelivering = True
    assert session.post(url, json={}, timeout=5).status_code == 409


def test_users_and_an_export_job(fake: FakeAuth0) -> None:
    fake.job_seconds = 0.3
    fake.export_gzip = True
    fake.add_users([generated_user(n) for n in range(3)], connection_id="con_a")
    fake.add_users([generated_user(9)], connection_id="con_b")
    session = api(fake)
    user = session.get(f"{fake.url}/api/v2/users/auth0%7Cgen0000001", timeout=5)
    assert user.status_code == 200 and user.json()["email"] == "user0000001@example.com"
    assert session.get(f"{fake.url}/api/v2/users/auth0%7Cnone", timeout=5).status_code == 404
    fields = [{"name": "user_id"}, {"name": "email"}, {"name": "app_metadata"}]
    body = {"format": "json", "fields": fields, "connection_id": "con_a"}
    job = session.post(f"{fake.url}/api/v2/jobs/users-exports", json=body, timeout=5).json()
    assert job["status"] == "pending" and job["type"] == "users_export"
    seen = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        state = session.get(f"{fake.url}/api/v2/jobs/{job['id']}", timeout=5).json()
        seen.append(state["status"])
        if state["status"] == "completed":
            break
        time.sleep(0.05)
    assert seen[-1] == "completed" and "processing" in seen
    download = requests.get(state["location"], timeout=5)
    assert download.content[:2] == b"\x1f\x8b"
    rows = [json.loads(line) for line in gzip.decompress(download.content).splitlines()]
    assert [row["user_id"] for row in rows] == [f"auth0|gen000000{n}" for n in range(3)]
    assert rows[0] == {
        "user_id": "auth0|gen0000000",
        "email": "user0000000@example.com",
        "app_metadata": {"plan": "pro"},
    }
    expired = state["location"].split("?")[0] + "?expires=1"
    assert requests.get(expired, timeout=5).status_code == 403


def test_rate_limit_headers_and_429(fake: FakeAuth0) -> None:
    session = api(fake)
    fake.rate_limit, fake.window_seconds = 3, 60
    url = f"{fake.url}/api/v2/event-streams/{fake.stream_id}"
    answers = [session.get(url, timeout=5) for _ in range(5)]
    assert [a.status_code for a in answers][-1] == 429
    limited = answers[-1]
    assert limited.headers["x-ratelimit-limit"] == "3"
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert int(limited.headers["x-ratelimit-reset"]) >= int(time.time())


def test_http_controls_drive_a_fake_in_another_process(fake: FakeAuth0, receiver: Receiver) -> None:
    receiver.status = 500
    assert requests.post(f"{fake.url}/_fake/users", json={"generate": 4}, timeout=5).ok
    emitted = requests.post(f"{fake.url}/_fake/emit", json={"events": events(2)}, timeout=30)
    assert emitted.json()["result"] == [500, 500]
    state = requests.get(f"{fake.url}/_fake/state", timeout=5).json()["result"]
    assert state["users"] == 4 and state["failed"] == 2 and state["status"] == "enabled"
