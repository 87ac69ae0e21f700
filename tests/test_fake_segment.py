"""The fake Segment behaves like Segment's HTTP Tracking API, over real HTTP.

The facts it is held to: ``shared/reference/destinations.md`` ("Segment") and
segment-docs, "HTTP API Source" (auth, limits, errors, rate limits).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from idsync.fakes.segment import FakeSegment

KEY = "test-write-key"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeSegment]:
    with FakeSegment(KEY, records_per_second=50) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeSegment) -> FakeSegment:
    server.reset()
    return server


def identify(user_id: str, message_id: str, **traits: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": user_id, "messageId": message_id, "traits": traits}


def post(
    fake: FakeSegment,
    body: Any,
    *,
    path: str = "/v1/batch",
    key: str | None = KEY,
    raw: bytes | None = None,
) -> requests.Response:
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(
        fake.url + path,
        data=data,
        auth=(key, "") if key is not None else None,
        headers={"Content-Type": "application/json"},
        timeout=5,
    )


def control(fake: FakeSegment, action: str, **body: Any) -> requests.Response:
    method = "GET" if action in ("stats", "records", "dropped", "requests") else "POST"
    return requests.request(method, f"{fake.url}/_fake/{action}", json=body, timeout=5)


# Writes


def test_a_batch_is_accepted_with_200_success_and_traits_merge_in_arrival_order(
    fake: FakeSegment,
) -> None:
    first = [identify("u1", "m1", email="a@example.com", firstName="Ann")]
    assert post(fake, {"batch": first}).json() == {"success": True}
    later = [
        identify("u1", "m2", firstName=None, lastName="Lee"),
        {"type": "track", "userId": "u1", "messageId": "m3", "event": "User Deleted"},
        identify("u2", "m4", email="b@example.com"),
    ]
    answer = post(fake, {"batch": later})
    assert (answer.status_code, answer.json()) == (200, {"success": True})
    records = fake.records()
    assert list(records) == ["u1", "u2"]
    assert records["u1"]["traits"] == {
        "email": "a@example.com",
        "firstName": None,
        "lastName": "Lee",
    }
    assert [i["traits"] for i in records["u1"]["identifies"]] == [
        {"email": "a@example.com", "firstName": "Ann"},
        {"firstName": None, "lastName": "Lee"},
    ]
    assert [t["event"] for t in records["u1"]["tracks"]] == ["User Deleted"]
    assert records["u1"]["message_ids"] == ["m1", "m2", "m3"]
    assert fake.stats()["records_written"] == 4


def test_the_single_calls_take_one_message_and_the_key_in_the_body(fake: FakeSegment) -> None:
    body = {"userId": "u1", "traits": {"plan": "pro"}, "messageId": "s1", "writeKey": KEY}
    assert post(fake, body, path="/v1/identify", key=None).status_code == 200
    track = {"userId": "u1", "event": "Signed Up", "messageId": "s2"}
    assert post(fake, track, path="/v1/track").status_code == 200
    user = fake.user("u1")
    assert user is not None
    assert (user.traits, [t["event"] for t in user.tracks]) == ({"plan": "pro"}, ["Signed Up"])


def test_a_repeated_message_id_is_answered_200_and_applied_once(fake: FakeSegment) -> None:
    for name in ("Ann", "Anna"):
        assert post(fake, {"batch": [identify("u1", "same", firstName=name)]}).status_code == 200
    assert fake.records()["u1"]["traits"] == {"firstName": "Ann"}
    stats = fake.stats()
    assert (stats["records_written"], stats["duplicates"]) == (1, 1)


# Errors Segment does answer: size and JSON


def test_malformed_json_is_400_and_keeps_nothing(fake: FakeSegment) -> None:
    answer = post(fake, None, raw=b'{"batch": [')
    assert answer.status_code == 400
    assert answer.json()["message"] == "Invalid JSON"
    assert (fake.records(), fake.stats()["refused"]) == ({}, 1)


def test_a_message_over_32_kb_refuses_its_whole_batch(fake: FakeSegment) -> None:
    big = identify("u2", "m2", bio="x" * (32 * 1024))
    answer = post(fake, {"batch": [identify("u1", "m1"), big]})
    assert answer.status_code == 400
    assert "message 1 of the batch" in answer.json()["message"]
    assert fake.records() == {}
    single = post(fake, {"userId": "u1", "traits": {"bio": "x" * 33000}}, path="/v1/identify")
    assert single.status_code == 400


def test_a_batch_over_500_kb_is_400_though_each_message_fits(fake: FakeSegment) -> None:
    messages = [identify(f"u{n}", f"m{n}", bio="x" * 30_000) for n in range(17)]
    assert len(json.dumps({"batch": messages})) > 500_000
    answer = post(fake, {"batch": messages})
    assert answer.status_code == 400
    assert "batch is" in answer.json()["message"]
    assert post(fake, {"batch": messages[:16]}).status_code == 200


# What Segment answers 200 and drops


def test_a_wrong_or_revoked_write_key_is_200_but_drops_everything(fake: FakeSegment) -> None:
    assert post(fake, {"batch": [identify("u1", "m1")]}, key="not-the-key").json() == {
        "success": True
    }
    assert post(fake, {"batch": [identify("u1", "m2")]}, key=None).status_code == 200
    fake.revoke()
    assert post(fake, {"batch": [identify("u1", "m3")]}).status_code == 200
    fake.restore()
    assert post(fake, {"batch": [identify("u1", "m4")]}).status_code == 200
    assert fake.records()["u1"]["message_ids"] == ["m4"]
    dropped = fake.dropped()
    assert [d["reason"] for d in dropped] == ["invalid_write_key"] * 3
    assert [d["message"]["messageId"] for d in dropped] == ["m1", "m2", "m3"]
    assert fake.stats()["dropped"] == 3


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"type": "identify", "traits": {}}, "no_user_anon_id"),
        ({"type": "track", "userId": "u1"}, "missing_event"),
        ({"type": "identify", "userId": "u1", "messageId": "m" * 100}, "message_id_too_long"),
        ({"type": "delete", "userId": "u1"}, "invalid_type"),
    ],
)
def test_an_invalid_message_is_answered_200_and_dropped(
    fake: FakeSegment, message: dict[str, Any], reason: str
) -> None:
    answer = post(fake, {"batch": [message, identify("u2", "ok")]})
    assert answer.status_code == 200
    assert [d["reason"] for d in fake.dropped()] == [reason]
    assert list(fake.records()) == ["u2"]


def test_a_batch_of_more_than_2500_messages_is_200_and_dropped(fake: FakeSegment) -> None:
    messages = [{"type": "identify", "userId": "u", "messageId": str(n)} for n in range(2501)]
    with FakeSegment(KEY, records_per_second=10_000) as roomy:
        assert post(roomy, {"batch": messages}).status_code == 200
        assert roomy.records() == {}
        assert roomy.stats()["dropped"] == 2501


# The rate ceiling


def test_more_messages_a_second_than_the_ceiling_are_429_with_retry_after(
    fake: FakeSegment,
) -> None:
    batch = [identify(f"u{n}", f"m{n}") for n in range(40)]
    assert post(fake, {"batch": batch}).status_code == 200
    over = post(fake, {"batch": [identify(f"v{n}", f"n{n}") for n in range(11)]})
    assert over.status_code == 429
    assert over.headers["Retry-After"] == over.headers["X-RateLimit-Reset"] == "1"
    assert over.json()["code"] == "rate_limit_exceeded"
    assert post(fake, {"batch": [identify("w", "w1")]}).status_code == 200  # 41 of 50
    assert fake.stats()["throttled"] == 1
    time.sleep(1.0)
    assert post(fake, {"batch": [identify(f"v{n}", f"n{n}") for n in range(11)]}).ok
    assert fake.stats()["records_written"] == 52


def test_a_request_larger_than_the_ceiling_passes_an_empty_window(fake: FakeSegment) -> None:
    batch = [identify(f"u{n}", f"m{n}") for n in range(80)]
    assert post(fake, {"batch": batch}).status_code == 200
    assert post(fake, {"batch": [identify("x", "x1")]}).status_code == 429


# Switches


def test_fail_answers_the_status_keeps_nothing_then_recovers(fake: FakeSegment) -> None:
    fake.fail(2, 503, retry_after=4)
    for _ in range(2):
        answer = post(fake, {"batch": [identify("u1", "m1")]})
        assert (answer.status_code, answer.headers["Retry-After"]) == (503, "4")
    assert fake.records() == {}
    assert post(fake, {"batch": [identify("u1", "m1")]}).status_code == 200
    assert [entry.status for entry in fake.requests_log] == [503, 503, 200]


def test_slow_applies_at_once_and_answers_late(fake: FakeSegment) -> None:
    fake.slow(1, 0.6)
    started = time.monotonic()
    thread = threading.Thread(target=post, args=(fake, {"batch": [identify("u1", "m1")]}))
    thread.start()
    fake.wait_for_records(1, timeout=0.5)  # applied before the answer
    thread.join()
    assert time.monotonic() - started >= 0.6


def test_a_request_held_across_a_reset_keeps_nothing_in_the_fresh_state(
    fake: FakeSegment,
) -> None:
    fake.slow(1, 5)
    thread = threading.Thread(target=post, args=(fake, {"batch": [identify("u1", "m1")]}))
    thread.start()
    fake.wait_for_records(1)
    fake.reset()  # answers the held request at once
    thread.join(timeout=2)
    assert not thread.is_alive()
    assert (fake.records(), fake.requests_log, fake.stats()["requests"]) == ({}, [], 0)


def test_the_switches_work_over_http(fake: FakeSegment) -> None:
    assert control(fake, "fail", count=1, status=500).ok
    assert post(fake, {"batch": [identify("u1", "m1")]}).status_code == 500
    assert control(fake, "revoke").ok
    post(fake, {"batch": [identify("u1", "m2")]})
    assert control(fake, "restore").ok
    post(fake, {"batch": [identify("u1", "m3", plan="pro")]})
    assert control(fake, "slow", count=1, seconds=0.3).ok
    started = time.monotonic()
    post(fake, {"batch": [identify("u2", "m4")]})
    assert time.monotonic() - started >= 0.3
    stats = control(fake, "stats").json()
    assert {k: stats[k] for k in ("requests", "records_written", "throttled", "dropped")} == {
        "requests": 4,
        "records_written": 2,
        "throttled": 0,
        "dropped": 1,
    }
    assert control(fake, "records").json()["u1"]["traits"] == {"plan": "pro"}
    assert control(fake, "dropped").json()[0]["reason"] == "invalid_write_key"
    assert [r["status"] for r in control(fake, "requests").json()] == [500, 200, 200, 200]
    assert control(fake, "reset").ok
    assert control(fake, "stats").json()["requests"] == 0


def test_runs_as_its_own_process() -> None:
    command = [
        sys.executable,
        "-m",
        "idsync.fakes.segment",
        "--port",
        "0",
        "--write-key",
        "K",
        "--records-per-second",
        "1",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        batch = {"batch": [identify("u1", "m1"), identify("u1", "m2")]}
        first = requests.post(f"{url}/v1/batch", json=batch, auth=("K", ""), timeout=5)
        second = requests.post(f"{url}/v1/batch", json=batch, auth=("K", ""), timeout=5)
        assert (first.status_code, second.status_code) == (200, 429)
        assert requests.get(f"{url}/_fake/stats", timeout=5).json()["records_written"] == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
