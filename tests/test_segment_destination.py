"""The Segment destination maps, batches and judges answers as Segment's tracking API asks.

Every test talks real HTTP to the fake Segment (``idsync/fakes/segment.py``);
nothing is mocked. The last tests run the destination through the real engine
(ingest, the outbox in PostgreSQL, ``run_batch``) with ``DESTINATIONS=segment``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from idsync.destinations import build_adapter
from idsync.fakes.hubspot import FakeHubSpot
from idsync.fakes.segment import FakeSegment
from idsync.settings import Settings
from models.tables import DeliveryAttempt
from tests.events import auth0_event
from tests.pipeline import Pipeline
from workers.delivery import is_paused, run_batch
from workers.destinations.base import Intent, LinkState, Outcome, UserState, Verdict
from workers.destinations.segment.adapter import MAX_BATCH_BYTES, SegmentDestination
from workers.destinations.segment.settings import Config
from workers.ratelimit import LocalRateLimiter

KEY = "seg-write-key-0123456789"
TIMEOUT, CONNECT_TIMEOUT = 0.6, 0.4
EVENT_TIME = "2025-02-01T12:34:56.789Z"
# A request size that holds one test user's identify (about 300 bytes), not two.
ONE_USER_BYTES = 450


def user(event_type: str = "user.updated", **fields: Any) -> UserState:
    profile = {
        "user_id": "auth0|1",
        "email": "jane.doe@example.com",
        "given_name": "Jane",
        "family_name": "Doe",
        "updated_at": EVENT_TIME,
    } | fields
    profile = {key: value for key, value in profile.items() if value is not None}
    return UserState.from_event(event_type, {"data": {"object": profile}})


def intent(key: str = "1", state: UserState | None = None, **options: Any) -> Intent:
    options.setdefault("message_id", f"msg_{key}_0")
    return Intent(key=key, user=state or user(), link=options.pop("link", LinkState()), **options)


def linked(outcome: Outcome, *, deprovisioned: bool = False) -> LinkState:
    """The link the engine keeps after ``outcome`` succeeded."""
    return LinkState(
        external_id=outcome.external_id,
        properties_hash=outcome.properties_hash,
        deprovisioned=deprovisioned,
    )


def never_claimed(_key: str, _record: str) -> bool:
    raise AssertionError("Segment has no records to claim")


def deliver(destination: SegmentDestination, *intents: Intent, within: float = 10.0):
    return destination.deliver(
        list(intents), claim=never_claimed, deadline=time.monotonic() + within
    )


def config(url: str, **overrides: Any) -> Config:
    values = {
        "name": "segment",
        "kind": "segment",
        "write_key": KEY,
        "base_url": url,
        "timeout_seconds": TIMEOUT,
        "connect_timeout_seconds": CONNECT_TIMEOUT,
    }
    return Config(**(values | overrides))


@pytest.fixture(scope="module")
def server() -> Iterator[FakeSegment]:
    with FakeSegment(KEY, records_per_second=10_000) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeSegment) -> FakeSegment:
    server.reset()
    return server


@pytest.fixture
def make(fake: FakeSegment) -> Iterator[Any]:
    built: list[SegmentDestination] = []

    def build(
        limiter: LocalRateLimiter | None = None,
        *,
        url: str | None = None,
        max_batch_bytes: int = MAX_BATCH_BYTES,
        **overrides: Any,
    ) -> SegmentDestination:
        destination = SegmentDestination(
            config(url or fake.url, **overrides),
            limiter or LocalRateLimiter(limit=1000, window=1.0),
            max_batch_bytes=max_batch_bytes,
        )
        built.append(destination)
        return destination

    yield build
    for destination in built:
        destination.close()


@pytest.fixture
def destination(make: Any) -> SegmentDestination:
    return make()


# Creates, updates, unchanged


def test_a_user_becomes_one_identify_keyed_by_its_auth0_id(
    fake: FakeSegment, destination: SegmentDestination
) -> None:
    outcome = deliver(destination, intent("42", message_id="msg_42_3"))["42"]
    assert (outcome.verdict, outcome.reason) == (Verdict.SUCCEEDED, "accepted")
    assert outcome.external_id == "auth0|1"  # no record id: the user's id stands for it
    assert (outcome.email, outcome.deprovisioned) == ("jane.doe@example.com", False)
    assert "accepted by Segment" in (outcome.message or "")
    [call] = outcome.calls
    assert call.request.startswith("POST /v1/batch messageId=42_3 (1 messages")
    assert call.status == 200 and call.error_category is None
    assert call.response_excerpt == 'accepted by Segment (HTTP 200): {"success":true}'
    record = fake.records()["auth0|1"]
    assert record["traits"] == {
        "email": "jane.doe@example.com",
        "firstName": "Jane",
        "lastName": "Doe",
        "phone": None,
        "deprovisioned": False,
    }
    assert record["message_ids"] == ["42_3"]
    [entry] = fake.requests_log
    assert entry.write_key_valid and entry.path == "/v1/batch"


def test_the_timestamp_is_the_event_time(
    fake: FakeSegment, destination: SegmentDestination
) -> None:
    event = json.loads((Path(__file__).parent / "fixtures/auth0/user_updated.json").read_text())
    state = UserState.from_event(event["type"], event)
    sent = deliver(destination, intent("1", state, event_time=event["time"]))["1"]
    assert sent.verdict is Verdict.SUCCEEDED
    record = fake.records()[event["data"]["object"]["user_id"]]
    [identify] = record["identifies"]
    assert identify["timestamp"] == event["time"].replace("Z", ".000Z")


def test_an_update_sends_absent_fields_as_null_and_an_unchanged_user_nothing(
    fake: FakeSegment, destination: SegmentDestination
) -> None:
    first = deliver(destination, intent("1", user(phone_number="+15550100")))["1"]
    again = deliver(destination, intent("2", user(phone_number="+15550100"), link=linked(first)))
    assert (again["2"].verdict, again["2"].reason, again["2"].calls) == (
        Verdict.SKIPPED,
        "unchanged",
        [],
    )
    assert again["2"].properties_hash == first.properties_hash
    changed = deliver(destination, intent("3", user(given_name="Janet"), link=linked(first)))
    assert changed["3"].verdict is Verdict.SUCCEEDED
    traits = fake.records()["auth0|1"]["traits"]
    assert (traits["firstName"], traits["phone"]) == ("Janet", None)  # the phone is cleared
    assert destination.clears_with is None
    assert len(fake.requests_log) == 2


def test_an_unchanged_user_is_sent_while_another_write_may_still_land(
    fake: FakeSegment, destination: SegmentDestination
) -> None:
    first = deliver(destination, intent("1"))["1"]
    link = LinkState(external_id="auth0|1", properties_hash=first.properties_hash, uncertain=True)
    again = deliver(destination, intent("2", link=link))["2"]
    assert (again.verdict, len(again.calls)) == (Verdict.SUCCEEDED, 1)
    forced = deliver(destination, intent("3", link=linked(first), force=True))["3"]
    assert forced.verdict is Verdict.SUCCEEDED and len(forced.calls) == 1
    assert fake.records()["auth0|1"]["message_ids"] == ["1_0", "2_0", "3_0"]


def test_message_ids_follow_the_delivery_and_its_resyncs(
    fake: FakeSegment, destination: SegmentDestination
) -> None:
    deliver(destination, intent("7", message_id="msg_7_0"))
    deliver(destination, intent("7", message_id="msg_7_0"))  # a retry: Segment drops it
    deliver(destination, intent("7", message_id="msg_7_1"))  # an operator's resync
    sent = deliver(destination, intent("8", message_id=None))["8"]
    resent = deliver(destination, intent("8", message_id=None, link=linked(sent), force=True))
    ids = fake.records()["auth0|1"]["message_ids"]
    assert ids[:3] == ["7_0", "7_1", "8"]
    assert ids[3].startswith("8_r") and resent["8"].verdict is Verdict.SUCCEEDED
    assert fake.stats()["duplicates"] == 1


# Deprovisioning


def test_a_block_sends_the_deprovisioned_trait_and_a_track_after_the_identify(
    fake: FakeSegment, destination: SegmentDestination
) -> None:
    live = deliver(destination, intent("1"))["1"]
    blocked = deliver(destination, intent("2", user(blocked=True), link=linked(live)))["2"]
    assert (blocked.verdict, blocked.deprovisioned) == (Verdict.SUCCEEDED, True)
    assert "+track (2 messages" in blocked.calls[0].request
    record = fake.records()["auth0|1"]
    assert record["traits"]["deprovisioned"] is True
    assert record["message_ids"] == ["1_0", "2_0", "2_0_track"]  # identify first
    [track] = record["tracks"]
    assert (track["event"], track["properties"]["reason"]) == ("User Deprovisioned", "blocked")
    # Still blocked, renamed: the traits change, the user is not deprovisioned twice.
    renamed = intent(
        "3", user(blocked=True, given_name="J"), link=linked(blocked, deprovisioned=True)
    )
    assert deliver(destination, renamed)["3"].verdict is Verdict.SUCCEEDED
    # Unblocked: live again, no event.
    back = deliver(destination, intent("4", link=linked(blocked, deprovisioned=True)))["4"]
    assert back.deprovisioned is False
    record = fake.records()["auth0|1"]
    assert len(record["tracks"]) == 1 and record["traits"]["deprovisioned"] is False


def test_a_delete_sends_the_deleted_event_and_clears_nothing(fake: FakeSegment, make: Any) -> None:
    destination = make(deleted_event="Account Removed", deprovisioned_event="Account Blocked")
    live = deliver(destination, intent("1"))["1"]
    minimal = UserState.from_event(
        "user.deleted", {"data": {"object": {"user_id": "auth0|1", "deleted_at": EVENT_TIME}}}
    )
    gone = deliver(destination, intent("2", minimal, link=linked(live)))["2"]
    assert (gone.verdict, gone.deprovisioned) == (Verdict.SUCCEEDED, True)
    record = fake.records()["auth0|1"]
    assert record["traits"] == {
        "email": "jane.doe@example.com",  # the stub of a deleted user says nothing of it
        "firstName": "Jane",
        "lastName": "Doe",
        "phone": None,
        "deprovisioned": True,
    }
    assert record["identifies"][-1]["traits"] == {"deprovisioned": True}
    [track] = record["tracks"]
    assert (track["event"], track["messageId"]) == ("Account Removed", "2_0_track")
    assert track["timestamp"] == EVENT_TIME


# Size limits


def test_a_message_over_32_kb_fails_alone_without_a_call(
    fake: FakeSegment, make: Any, tmp_path: Path
) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"email": "email", "app_metadata.bio": "bio"}))
    destination = make(property_map=str(mapping))
    huge = user(user_id="auth0|big", app_metadata={"bio": "x" * (32 * 1024)})
    outcomes = deliver(
        destination, intent("1"), intent("2", huge), intent("3", user(user_id="auth0|3"))
    )
    assert (outcomes["2"].verdict, outcomes["2"].reason, outcomes["2"].calls) == (
        Verdict.FAILED,
        "too_large",
        [],
    )
    assert "32 KB" in (outcomes["2"].message or "")
    assert "SEGMENT_PROPERTY_MAP" in (outcomes["2"].message or "")
    assert outcomes["1"].verdict is outcomes["3"].verdict is Verdict.SUCCEEDED
    assert sorted(fake.records()) == ["auth0|1", "auth0|3"]
    assert len(fake.requests_log) == 1


def test_batches_are_cut_by_size_under_500_kb(fake: FakeSegment, make: Any, tmp_path: Path) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"email": "email", "app_metadata.bio": "bio"}))
    destination = make(property_map=str(mapping))
    users = [
        intent(str(n), user(user_id=f"auth0|{n}", app_metadata={"bio": "x" * 30_000}))
        for n in range(40)
    ]
    outcomes = deliver(destination, *users)
    assert {o.verdict for o in outcomes.values()} == {Verdict.SUCCEEDED}
    sizes = [entry.body_bytes for entry in fake.requests_log]
    assert len(sizes) == 3 and all(size <= MAX_BATCH_BYTES for size in sizes)
    assert sum(entry.messages for entry in fake.requests_log) == 40
    assert len(fake.records()) == 40 and fake.stats()["refused"] == 0


def test_a_refused_batch_is_split_until_the_refused_user_is_alone(
    fake: FakeSegment, destination: SegmentDestination
) -> None:
    # Segment refuses the batch, its first half, and the first user alone.
    fake.fail(3, 400, body='{"message":"Request entity too large"}')
    users = [intent(str(n), user(user_id=f"auth0|{n}")) for n in range(4)]
    outcomes = deliver(destination, *users)
    refused = outcomes["0"]
    assert (refused.verdict, refused.reason, refused.status_code) == (
        Verdict.FAILED,
        "too_large",
        400,
    )
    assert "Request entity too large" in (refused.message or "")
    assert [outcomes[str(n)].verdict for n in range(1, 4)] == [Verdict.SUCCEEDED] * 3
    assert [entry.messages for entry in fake.requests_log] == [0, 0, 0, 1, 2]
    assert [len(outcomes[str(n)].calls) for n in range(4)] == [3, 3, 2, 2]
    assert sorted(fake.records()) == ["auth0|1", "auth0|2", "auth0|3"]


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (400, '{"code":"invalid_request","message":"Invalid JSON"}', "rejected"),
        (400, '{"message":"message exceeds the maximum size"}', "too_large"),
        (413, "Payload Too Large", "too_large"),
        (422, "unprocessable", "rejected"),
    ],
)
def test_a_refusal_of_one_user_fails_it_with_segments_answer(
    fake: FakeSegment, destination: SegmentDestination, status: int, body: str, reason: str
) -> None:
    fake.fail(1, status, body=body)
    outcome = deliver(destination, intent())["1"]
    assert (outcome.verdict, outcome.reason, outcome.status_code) == (
        Verdict.FAILED,
        reason,
        status,
    )
    assert body[:20] in (outcome.message or "")
    assert outcome.calls[0].error_category == f"HTTP_{status}"


# Answers that wait, retry or pause


@pytest.mark.parametrize(
    ("status", "retry_after", "verdict", "reason", "counts"),
    [
        pytest.param(429, 7, Verdict.RETRY, "rate_limited", False, id="429"),
        pytest.param(500, None, Verdict.RETRY, "server_error", True, id="500"),
        pytest.param(503, 3, Verdict.RETRY, "server_error", True, id="503"),
        pytest.param(408, None, Verdict.RETRY, "request_timeout", True, id="408"),
        pytest.param(401, None, Verdict.PAUSE, "credentials_refused", False, id="401"),
        pytest.param(403, None, Verdict.PAUSE, "credentials_refused", False, id="403"),
        pytest.param(404, None, Verdict.PAUSE, "wrong_endpoint", False, id="404"),
        pytest.param(301, None, Verdict.PAUSE, "redirected", False, id="301"),
    ],
)
def test_every_answer_maps_to_its_verdict_and_holds_back_the_rest(
    fake: FakeSegment,
    make: Any,
    status: int,
    retry_after: int | None,
    verdict: Verdict,
    reason: str,
    counts: bool,
) -> None:
    limiter = LocalRateLimiter(limit=1000, window=1.0)
    destination = make(limiter, max_batch_bytes=ONE_USER_BYTES)  # one user per request
    fake.fail(1, status, retry_after=retry_after)
    users = [intent(str(n), user(user_id=f"auth0|{n}")) for n in range(3)]
    outcomes = deliver(destination, *users)
    first = outcomes["0"]
    assert (first.verdict, first.reason, first.counts_against_budget) == (verdict, reason, counts)
    assert first.status_code == status and first.uncertain is False
    assert first.retry_after == retry_after or (status == 500 and first.retry_after is None)
    assert len(fake.requests_log) == 1  # the rest were not sent
    rest = [outcomes["1"], outcomes["2"]]
    assert all(not o.calls and not o.counts_against_budget for o in rest)
    if verdict is Verdict.PAUSE:
        assert {o.verdict for o in rest} == {Verdict.PAUSE}
        assert "SEGMENT_BASE_URL" in (first.message or "")
    if status == 429:
        assert {o.reason for o in rest} == {"throttled"}
        assert not limiter.wait_for_capacity(timeout=0)  # every worker waits the 7 s out
    elif verdict is Verdict.RETRY:
        assert {o.reason for o in rest} == {"not_sent"}


def test_the_fakes_own_ceiling_is_waited_out_with_x_ratelimit_reset(make: Any) -> None:
    with FakeSegment(KEY, records_per_second=2) as tight:
        limiter = LocalRateLimiter(limit=1000, window=1.0)
        destination = make(limiter, url=tight.url, max_batch_bytes=ONE_USER_BYTES)
        users = [intent(str(n), user(user_id=f"auth0|{n}")) for n in range(4)]
        outcomes = deliver(destination, *users)
        verdicts = [outcomes[str(n)].verdict for n in range(4)]
        assert verdicts == [Verdict.SUCCEEDED, Verdict.SUCCEEDED, Verdict.RETRY, Verdict.RETRY]
        throttled = outcomes["2"]
        assert (throttled.reason, throttled.retry_after) == ("rate_limited", 1.0)
        assert throttled.counts_against_budget is False
        assert tight.stats()["throttled"] == 1


def test_a_timed_out_write_is_retried_uncertain_and_segment_drops_the_repeat(
    fake: FakeSegment, destination: SegmentDestination
) -> None:
    fake.slow(1, TIMEOUT + CONNECT_TIMEOUT + 0.5)  # applied, but answered too late
    started = time.monotonic()
    first = deliver(destination, intent("5"), intent("6", user(user_id="auth0|6")))
    assert time.monotonic() - started < TIMEOUT + CONNECT_TIMEOUT + 0.5
    assert {(o.verdict, o.reason, o.uncertain) for o in first.values()} == {
        (Verdict.RETRY, "timeout", True)
    }
    assert first["5"].calls[0].error_category == "TIMEOUT"
    retry = deliver(destination, intent("5", link=LinkState(uncertain=True)))["5"]
    assert retry.verdict is Verdict.SUCCEEDED
    assert fake.records()["auth0|1"]["message_ids"] == ["5_0"]
    assert fake.stats()["duplicates"] == 1


def test_a_refused_connection_is_retried_and_certainly_not_delivered(make: Any) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    outcome = deliver(make(url=f"http://127.0.0.1:{port}"), intent())["1"]
    assert (outcome.verdict, outcome.reason, outcome.uncertain) == (
        Verdict.RETRY,
        "connection_error",
        False,
    )
    assert outcome.counts_against_budget is True


def test_a_revoked_write_key_is_recorded_as_accepted_and_never_claimed_applied(
    fake: FakeSegment, destination: SegmentDestination
) -> None:
    fake.revoke()
    outcome = deliver(destination, intent())["1"]
    assert (outcome.verdict, outcome.reason) == (Verdict.SUCCEEDED, "accepted")
    assert "answers 200 also to messages it drops" in (outcome.message or "")
    assert "applied" not in (outcome.message or "") + (outcome.calls[0].response_excerpt or "")
    assert fake.records() == {}
    assert [d["reason"] for d in fake.dropped()] == ["invalid_write_key"]


# Deadlines


def test_nothing_is_sent_after_the_deadline(
    fake: FakeSegment, destination: SegmentDestination
) -> None:
    outcomes = deliver(destination, intent("1"), intent("2", user(user_id="auth0|2")), within=-0.1)
    assert fake.requests_log == []
    assert all(o.reason == "batch_deadline" for o in outcomes.values())
    assert all(not o.counts_against_budget and not o.calls for o in outcomes.values())


def test_no_request_starts_after_the_deadline_while_waiting_for_the_limiter(
    fake: FakeSegment, make: Any
) -> None:
    destination = make(LocalRateLimiter(limit=1, window=60.0), max_batch_bytes=ONE_USER_BYTES)
    deadline = time.monotonic() + 0.4
    users = [intent(str(n), user(user_id=f"auth0|{n}")) for n in range(3)]
    outcomes = destination.deliver(users, claim=never_claimed, deadline=deadline)
    assert [outcomes[str(n)].verdict for n in range(3)] == [
        Verdict.SUCCEEDED,
        Verdict.RETRY,
        Verdict.RETRY,
    ]
    assert len(fake.requests_log) == 1
    waiting = [outcomes["1"], outcomes["2"]]
    assert all(not o.counts_against_budget and not o.calls for o in waiting)


# Probe and registry


def test_the_probe_posts_an_empty_batch_and_says_why_it_fails(fake: FakeSegment, make: Any) -> None:
    destination = make()
    assert destination.probe() is None
    assert [entry.messages for entry in fake.requests_log] == [0]
    fake.fail(1, 404)
    assert "SEGMENT_BASE_URL" in (destination.probe() or "")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert "no answer" in (make(url=f"http://127.0.0.1:{port}").probe() or "")


def test_the_registry_builds_a_segment_destination_that_cannot_be_read(
    fake: FakeSegment,
) -> None:
    settings = Settings(
        destinations="segment",
        destination_env={"SEGMENT_WRITE_KEY": KEY, "SEGMENT_BASE_URL": fake.url},
    )
    configured = settings.destination("segment")
    assert isinstance(configured, Config) and configured.missing() is None
    assert KEY in settings.secrets and KEY not in repr(configured)
    destination = build_adapter(configured, settings, LocalRateLimiter(limit=10, window=1.0))
    try:
        assert isinstance(destination, SegmentDestination)
        assert (destination.name, destination.clears_with) == ("segment", None)
        assert destination.read(["auth0|1"]) is None
        assert deliver(destination, intent())["1"].verdict is Verdict.SUCCEEDED
    finally:
        destination.close()
    with pytest.raises(ValueError, match="SEGMENT_WRITE_KEY is not set"):
        build_adapter(Settings(destinations="segment").destination("segment"), settings, None)


# Settings


def test_settings_defaults_and_the_eu_endpoint_by_its_base_url_alone() -> None:
    defaults = Settings(destinations="segment").destination("segment")
    assert isinstance(defaults, Config)
    assert (defaults.base_url, defaults.rate, defaults.batch_size) == (
        "https://api.segment.io",
        (50, 1.0),
        100,
    )
    assert (defaults.timeout_seconds, defaults.connect_timeout_seconds) == (10.0, 3.05)
    assert (defaults.deprovisioned_event, defaults.deleted_event) == (
        "User Deprovisioned",
        "User Deleted",
    )
    assert defaults.mapping() == {
        "email": "email",
        "given_name": "firstName",
        "family_name": "lastName",
        "phone_number": "phone",
    }
    assert defaults.missing() == "SEGMENT_WRITE_KEY is not set"
    eu = Settings(
        destinations="segment,eu",
        destination_env={
            "EU_KIND": "segment",
            "EU_BASE_URL": "https://events.eu1.segmentapis.com/",
            "EU_WRITE_KEY": "eu-key",
            "EU_RATE_LIMIT": "20/1s",
            "EU_BATCH_SIZE": "250",
        },
    ).destination("eu")
    assert isinstance(eu, Config)
    assert (eu.base_url, eu.rate, eu.batch_size, eu.missing()) == (
        "https://events.eu1.segmentapis.com",
        (20, 1.0),
        250,
        None,
    )


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("SEGMENT_BASE_URL", "http://api.segment.io", "must use https://"),
        ("SEGMENT_BASE_URL", "https://api.segment.io/v1", "without a path"),
        ("SEGMENT_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("SEGMENT_BATCH_SIZE", "2000", "less than or equal to 1250"),
        ("SEGMENT_RATE_LIMIT", "fast", "rate limit"),
        ("SEGMENT_TIMEOUT_SECONDS", "0", "greater than 0"),
        ("SEGMENT_PROPERTY_MAP", "/nonexistent/map.json", "not a readable JSON file"),
        ("SEGMENT_DELETED_EVENT", "  ", "event name of 1 to 200"),
        ("SEGMENT_WRITE_KEY", "key with spaces", "write key alone"),
    ],
)
def test_a_wrong_variable_is_named_in_the_error(variable: str, value: str, words: str) -> None:
    with pytest.raises(ValueError) as error:
        Config.from_env("segment", "segment", {variable: value})
    assert f"{variable}:" in str(error.value)
    assert words in str(error.value)
    if variable == "SEGMENT_WRITE_KEY":
        assert value not in str(error.value)


def test_settings_refuse_a_bad_segment_variable_at_start_up() -> None:
    env = {"SEGMENT_BASE_URL": "http://segment.example.com"}
    with pytest.raises(ValueError, match="SEGMENT_BASE_URL must use https://"):
        Settings(destinations="segment", destination_env=env)


def test_a_map_onto_the_deprovisioned_trait_is_refused(tmp_path: Path) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text('{"blocked": "deprovisioned"}')
    env = {"SEGMENT_PROPERTY_MAP": str(mapping)}
    with pytest.raises(ValueError, match="the trait idsync sets itself"):
        Settings(destinations="segment", destination_env=env).destination("segment")


# Through the engine


@pytest.fixture
def segment_pipeline(
    settings: Settings, sessions: Any, hubspot: FakeHubSpot, fake: FakeSegment
) -> Iterator[Pipeline]:
    env = {
        "SEGMENT_WRITE_KEY": KEY,
        "SEGMENT_BASE_URL": fake.url,
        "SEGMENT_TIMEOUT_SECONDS": "1",
        "SEGMENT_CONNECT_TIMEOUT_SECONDS": "0.5",
    }
    chosen = settings.model_copy(
        update={"destinations": ("segment",), "destination_env": env, "retry_schedule": ("0s",) * 4}
    )
    pipe = Pipeline(chosen, sessions, hubspot)
    yield pipe
    pipe.close()


def test_the_engine_delivers_creates_blocks_and_deletes_to_segment(
    segment_pipeline: Pipeline, fake: FakeSegment
) -> None:
    pipe = segment_pipeline
    config = pipe.settings.destination("segment")
    destination = build_adapter(config, pipe.settings, LocalRateLimiter(limit=100, window=1.0))
    try:
        for n in range(3):
            email = f"u{n}@example.com"
            pipe.post(auth0_event("user.created", f"auth0|{n}", email=email, given_name="A"))
        pipe.post(
            auth0_event("user.updated", "auth0|1", email="u1@example.com", blocked=True, at=5)
        )
        pipe.post(auth0_event("user.deleted", "auth0|2", at=5))
        pipe.drain_with(destination)
        # The same state again is not sent; a replayed older event is stale.
        pipe.post(
            auth0_event("user.updated", "auth0|0", email="u0@example.com", given_name="A", at=9)
        )
        pipe.drain_with(destination)
    finally:
        destination.close()
    assert sorted(pipe.deliveries()) == [
        ("skipped", "stale"),
        ("skipped", "stale"),
        ("skipped", "unchanged"),
        ("succeeded", "accepted"),
        ("succeeded", "accepted"),
        ("succeeded", "accepted"),
    ]
    links = {n: pipe.link(f"auth0|{n}") for n in range(3)}
    assert [links[n].external_id for n in range(3)] == ["auth0|0", "auth0|1", "auth0|2"]
    assert [links[n].deprovisioned for n in range(3)] == [False, True, True]
    records = fake.records()
    assert [t["event"] for t in records["auth0|1"]["tracks"]] == ["User Deprovisioned"]
    assert [t["event"] for t in records["auth0|2"]["tracks"]] == ["User Deleted"]
    assert records["auth0|0"]["traits"]["firstName"] == "A"
    with pipe.sessions() as session:
        excerpts = set(session.scalars(select(DeliveryAttempt.response_excerpt)))
    assert excerpts == {'accepted by Segment (HTTP 200): {"success":true}'}


def test_without_a_write_key_the_engine_keeps_segment_paused(
    segment_pipeline: Pipeline, fake: FakeSegment
) -> None:
    pipe = segment_pipeline
    keyless = pipe.settings.model_copy(update={"destination_env": {"SEGMENT_BASE_URL": fake.url}})
    assert keyless.destination("segment").missing() == "SEGMENT_WRITE_KEY is not set"
    pipe.post(auth0_event("user.created", "auth0|1", email="u1@example.com"))
    with pipe.sessions() as session:
        assert is_paused(session, keyless, "segment")
    never = SegmentDestination(config(fake.url), LocalRateLimiter(limit=10, window=1.0))
    try:
        report = run_batch(sessions=pipe.sessions, settings=keyless, destination=never)
    finally:
        never.close()
    assert report.claimed == 0 and fake.requests_log == []
    assert pipe.deliveries() == [("pending", None)]
