"""The fake Braze answers as Braze's REST API documents: auth, shapes, limits and errors.

Every test talks real HTTP to the fake (``idsync/fakes/braze.py``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from idsync.fakes.braze import (
    DEFAULT_KEY,
    INVALID_EMAIL,
    MISSING_IDENTIFIER,
    NO_VALID_DATA,
    REFUSED_ID,
    FakeBraze,
)

ROOT = Path(__file__).resolve().parent.parent
AUTH = {"Authorization": f"Bearer {DEFAULT_KEY}"}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeBraze]:
    with FakeBraze() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeBraze) -> FakeBraze:
    server.reset()
    return server


def track(fake: FakeBraze, *attributes: dict[str, Any], headers: Any = None) -> requests.Response:
    return requests.post(
        f"{fake.url}/users/track",
        json={"attributes": list(attributes)},
        headers=AUTH if headers is None else headers,
        timeout=5,
    )


def delete(fake: FakeBraze, ids: list[str]) -> requests.Response:
    return requests.post(
        f"{fake.url}/users/delete", json={"external_ids": ids}, headers=AUTH, timeout=5
    )


def test_attributes_merge_into_the_profile_and_null_removes_one(fake: FakeBraze) -> None:
    first = track(fake, {"external_id": "auth0|1", "email": "a@example.com", "first_name": "A"})
    assert first.status_code == 201
    assert first.json() == {"message": "success", "attributes_processed": 1}
    track(fake, {"external_id": "auth0|1", "first_name": None, "plan": "pro"})
    assert fake.profile("auth0|1") == {"email": "a@example.com", "plan": "pro"}
    assert fake.stats()["records_written"] == 2


def test_every_api_answer_carries_the_rate_limit_headers(fake: FakeBraze) -> None:
    for answer in (
        track(fake, {"external_id": "auth0|1"}),
        track(fake, {"external_id": "auth0|1"}, headers={}),
        delete(fake, ["auth0|1"]),
    ):
        limit = int(answer.headers["X-RateLimit-Limit"])
        remaining = int(answer.headers["X-RateLimit-Remaining"])
        reset = int(answer.headers["X-RateLimit-Reset"])
        assert limit == 200 and 0 <= remaining <= limit
        assert time.time() - 1 < reset <= time.time() + 1.5  # epoch seconds, this window's end


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        ({}, 401, "Invalid API Key"),
        ({"Authorization": "Bearer someone-elses-key"}, 401, "Invalid API Key"),
        ({"Authorization": DEFAULT_KEY}, 401, "Invalid API Key"),  # no Bearer scheme
        (AUTH, 201, "success"),
    ],
)
def test_the_key_is_a_bearer_token(
    fake: FakeBraze, headers: dict[str, str], status: int, message: str
) -> None:
    answer = track(fake, {"external_id": "auth0|1"}, headers=headers)
    assert (answer.status_code, answer.json()["message"]) == (status, message)
    assert (fake.profile("auth0|1") is not None) is (status == 201)


def test_a_revoked_key_is_refused_until_restored(fake: FakeBraze) -> None:
    fake.revoke()
    assert track(fake, {"external_id": "auth0|1"}).status_code == 401
    fake.restore()
    assert track(fake, {"external_id": "auth0|1"}).status_code == 201


def test_a_key_without_the_permission_is_403_access_denied(fake: FakeBraze) -> None:
    fake.set_permissions({"users.track"})
    assert track(fake, {"external_id": "auth0|1"}).status_code == 201
    refused = delete(fake, ["auth0|1"])
    assert (refused.status_code, refused.json()) == (403, {"message": "Access Denied"})
    assert fake.profile("auth0|1") is not None


def test_invalid_objects_fail_alone_named_by_index(fake: FakeBraze) -> None:
    fake.refuse({"auth0|refused"})
    answer = track(
        fake,
        {"external_id": "auth0|ok", "email": "ok@example.com"},
        {"external_id": "auth0|bad", "email": "not-an-email"},
        {"first_name": "Nobody"},
        {"external_id": "auth0|refused"},
    )
    assert answer.status_code == 201
    assert answer.json() == {
        "message": "success",
        "attributes_processed": 1,
        "errors": [
            {"type": INVALID_EMAIL, "input_array": "attributes", "index": 1},
            {"type": MISSING_IDENTIFIER, "input_array": "attributes", "index": 2},
            {"type": REFUSED_ID, "input_array": "attributes", "index": 3},
        ],
    }
    assert set(fake.profiles()) == {"auth0|ok"}


def test_a_call_without_valid_data_is_a_fatal_400(fake: FakeBraze) -> None:
    empty = track(fake)
    assert (empty.status_code, empty.json()) == (400, {"message": NO_VALID_DATA})
    invalid = track(fake, {"external_id": "auth0|1", "email": "nope"})
    assert invalid.status_code == 400
    assert invalid.json()["errors"] == [
        {"type": INVALID_EMAIL, "input_array": "attributes", "index": 0}
    ]
    assert fake.profiles() == {}


def test_seventy_five_objects_per_track_and_fifty_ids_per_delete(fake: FakeBraze) -> None:
    users = [{"external_id": f"auth0|{n}"} for n in range(76)]
    over = track(fake, *users)
    assert (over.status_code, over.json()["message"]) == (400, "Max Input Length Exceeded")
    assert track(fake, *users[:75]).status_code == 201
    ids = [f"auth0|{n}" for n in range(51)]
    refused = delete(fake, ids)
    assert refused.status_code == 400
    assert refused.json()["message"] == (
        "The max number of external_ids and aliases per request was exceeded"
    )
    assert len(fake.profiles()) == 75
    fake.set_limits(200, track_limit=50)  # a "Monthly Active Users CY 24-25" workspace
    assert track(fake, *users[:51]).status_code == 400


def test_deleted_profiles_are_gone_for_good_and_a_new_track_starts_afresh(
    fake: FakeBraze,
) -> None:
    track(fake, {"external_id": "auth0|1", "first_name": "A"}, {"external_id": "auth0|2"})
    answer = delete(fake, ["auth0|1", "auth0|unknown"])
    assert (answer.status_code, answer.json()) == (201, {"deleted": 2, "message": "success"})
    assert fake.deleted() == {"auth0|1": {"first_name": "A"}}
    assert set(fake.profiles()) == {"auth0|2"}
    track(fake, {"external_id": "auth0|1", "email": "new@example.com"})
    assert fake.profile("auth0|1") == {"email": "new@example.com"}


def test_records_over_the_ceiling_are_429_and_apply_nothing(fake: FakeBraze) -> None:
    fake.set_limits(100)  # records per second
    users = [{"external_id": f"auth0|{n}"} for n in range(60)]
    # Start right after a window turns, so both calls share it.
    time.sleep(1 - time.time() % 1 + 0.01)
    assert track(fake, *users).status_code == 201
    throttled = track(fake, *(dict(u, plan="x") for u in users))
    assert throttled.status_code == 429
    assert throttled.headers["X-RateLimit-Remaining"] == "40"
    reset = int(throttled.headers["X-RateLimit-Reset"])
    assert 0 < reset - time.time() <= 1
    assert all("plan" not in profile for profile in fake.profiles().values())
    time.sleep(max(0.0, reset - time.time()) + 0.01)
    assert track(fake, *users).status_code == 201  # the next window admits it
    stats = fake.stats()
    assert (stats["throttled"], stats["records_written"], stats["requests"]) == (1, 120, 3)


def test_a_request_alone_in_its_window_is_admitted_whatever_its_size(fake: FakeBraze) -> None:
    fake.set_limits(10)
    time.sleep(1 - time.time() % 1 + 0.01)
    assert track(fake, *({"external_id": f"auth0|{n}"} for n in range(20))).status_code == 201


def test_switches_over_http_fail_slow_and_read_back(fake: FakeBraze) -> None:
    control = f"{fake.url}/_fake"
    requests.post(f"{control}/fail", json={"count": 1, "status": 503}, timeout=5)
    failed = track(fake, {"external_id": "auth0|1"})
    assert (failed.status_code, failed.json()) == (503, {"message": "Injected failure (503)"})
    assert "X-RateLimit-Reset" in failed.headers
    requests.post(f"{control}/slow", json={"count": 1, "seconds": 0.5}, timeout=5)
    started = time.monotonic()
    assert track(fake, {"external_id": "auth0|1", "first_name": "A"}).status_code == 201
    assert time.monotonic() - started >= 0.5
    requests.post(f"{control}/revoke", timeout=5)
    assert track(fake, {"external_id": "auth0|2"}).status_code == 401
    requests.post(f"{control}/restore", timeout=5)
    requests.post(f"{control}/refuse", json={"external_ids": ["auth0|3"]}, timeout=5)
    assert track(fake, {"external_id": "auth0|3"}).status_code == 400
    records = requests.get(f"{control}/records", timeout=5).json()
    assert records == {"records": {"auth0|1": {"first_name": "A"}}, "deleted": {}}
    stats = requests.get(f"{control}/stats", timeout=5).json()
    assert {key: stats[key] for key in ("records_written", "requests", "throttled")} == {
        "records_written": 1,
        "requests": 4,
        "throttled": 0,
    }
    requests.post(f"{control}/reset", timeout=5)
    assert fake.profiles() == {} and fake.stats()["requests"] == 0


def test_a_fail_switch_can_name_objects_like_braze_does(fake: FakeBraze) -> None:
    fake.fail(1, 400, "Bad syntax", [{"type": "bad", "input_array": "attributes", "index": 0}])
    answer = track(fake, {"external_id": "auth0|1"})
    assert answer.json() == {
        "message": "Bad syntax",
        "errors": [{"type": "bad", "input_array": "attributes", "index": 0}],
    }


def test_it_runs_as_a_process_and_prints_its_url() -> None:
    command = [sys.executable, "-m", "idsync.fakes.braze", "--port", "0"]
    with subprocess.Popen(
        [*command, "--records-per-second", "50"], stdout=subprocess.PIPE, text=True, cwd=ROOT
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            answer = requests.post(
                f"{url}/users/track", json={"attributes": []}, headers=AUTH, timeout=5
            )
            assert answer.status_code == 400 and answer.headers["X-RateLimit-Limit"] == "50"
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert process.returncode == 0
