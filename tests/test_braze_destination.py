"""The Braze destination against the fake Braze over real HTTP: writes, errors, limits, settings.

One test runs it through the real engine (``run_batch``) with ``DESTINATIONS=braze``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from idsync.destinations import build_adapter
from idsync.fakes.braze import DEFAULT_KEY, FakeBraze
from idsync.settings import Settings
from ingest import create_app
from models.tables import Delivery, Link
from tests.events import auth0_event
from workers.delivery import run_batch
from workers.destinations.base import Headroom, Intent, LinkState, Outcome, UserState, Verdict
from workers.destinations.braze.adapter import BrazeDestination, record_id
from workers.destinations.braze.settings import Config
from workers.ratelimit import LocalRateLimiter

TIMEOUT, CONNECT_TIMEOUT = 0.6, 0.4


def user(event_type: str = "user.updated", **fields: Any) -> UserState:
    profile = {
        "user_id": "auth0|1",
        "email": "jane@example.com",
        "given_name": "Jane",
        "family_name": "Doe",
    } | fields
    profile = {key: value for key, value in profile.items() if value is not None}
    return UserState.from_event(event_type, {"data": {"object": profile}})


def intent(key: str = "1", state: UserState | None = None, **options: Any) -> Intent:
    return Intent(key=key, user=state or user(), link=options.pop("link", LinkState()), **options)


def linked(outcome: Outcome) -> LinkState:
    """The link the engine keeps after ``outcome``."""
    return LinkState(
        external_id=outcome.external_id,
        deprovisioned=outcome.deprovisioned,
        properties_hash=outcome.properties_hash,
    )


class Claims:
    """The engine's claim: every profile may be taken, except those in ``owned``."""

    def __init__(self, owned: set[str] | None = None) -> None:
        self.owned = owned or set()
        self.asked: list[tuple[str, str]] = []

    def __call__(self, key: str, record: str) -> bool:
        self.asked.append((key, record))
        return record not in self.owned


def deliver(
    destination: BrazeDestination, *intents: Intent, within: float = 10.0, claim: Any = None
) -> dict[str, Outcome]:
    return destination.deliver(
        list(intents), claim=claim or Claims(), deadline=time.monotonic() + within
    )


@pytest.fixture(scope="module")
def server() -> Iterator[FakeBraze]:
    with FakeBraze(records_per_second=10_000) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeBraze) -> FakeBraze:
    server.reset()
    return server


def config(url: str, **values: str) -> Config:
    env = {
        "BRAZE_REST_ENDPOINT": url,
        "BRAZE_API_KEY": DEFAULT_KEY,
        "BRAZE_TIMEOUT_SECONDS": str(TIMEOUT),
        "BRAZE_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT),
    } | {f"BRAZE_{k.upper()}": v for k, v in values.items()}
    return Config.from_env("braze", "braze", env)


@pytest.fixture
def make(fake: FakeBraze) -> Iterator[Any]:
    built: list[BrazeDestination] = []

    def build(limiter: Any = None, on_headroom: Any = None, **values: str) -> BrazeDestination:
        destination = BrazeDestination(
            config(fake.url, **values),
            limiter or LocalRateLimiter(limit=1000, window=1.0),
            on_headroom=on_headroom,
        )
        built.append(destination)
        return destination

    yield build
    for destination in built:
        destination.close()


# Writes


def test_a_user_becomes_a_profile_keyed_by_its_user_id(fake: FakeBraze, make: Any) -> None:
    claims = Claims()
    outcome = deliver(make(), intent(), claim=claims)["1"]
    assert (outcome.verdict, outcome.external_id, outcome.email) == (
        Verdict.SUCCEEDED,
        "auth0|1",
        "jane@example.com",
    )
    assert claims.asked == [("1", "auth0|1")]  # taken before the first write
    assert fake.profile("auth0|1") == {
        "email": "jane@example.com",
        "first_name": "Jane",
        "last_name": "Doe",
        "idsync_deprovisioned": False,
    }
    [call] = outcome.calls
    assert (call.request, call.status, call.error_category) == (
        "POST /users/track attributes=1",
        201,
        None,
    )


def test_an_update_sends_every_mapped_field_and_null_for_the_absent(
    fake: FakeBraze, make: Any
) -> None:
    destination = make()
    first = deliver(destination, intent())["1"]
    claims = Claims()
    changed = intent("2", user(family_name=None, phone_number="+15550100"), link=linked(first))
    second = deliver(destination, changed, claim=claims)["2"]
    assert second.verdict is Verdict.SUCCEEDED and claims.asked == []  # the link holds it
    assert fake.profile("auth0|1") == {
        "email": "jane@example.com",
        "first_name": "Jane",
        "phone": "+15550100",
        "idsync_deprovisioned": False,
    }


def test_an_unchanged_user_is_skipped_without_a_call_unless_forced_or_uncertain(
    fake: FakeBraze, make: Any
) -> None:
    destination = make()
    link = linked(deliver(destination, intent())["1"])
    requests_before = len(fake.requests_log)
    same = deliver(destination, intent("2", link=link))["2"]
    assert (same.verdict, same.reason, same.calls) == (Verdict.SKIPPED, "unchanged", [])
    assert len(fake.requests_log) == requests_before
    forced = deliver(destination, intent("3", link=link, force=True))["3"]
    uncertain = LinkState(
        external_id=link.external_id, properties_hash=link.properties_hash, uncertain=True
    )
    unsure = deliver(destination, intent("4", link=uncertain))["4"]
    assert forced.verdict is unsure.verdict is Verdict.SUCCEEDED
    assert len(fake.requests_log) == requests_before + 2


def test_a_profile_another_users_link_holds_is_never_written(fake: FakeBraze, make: Any) -> None:
    outcome = deliver(make(), intent(), claim=Claims(owned={"auth0|1"}))["1"]
    assert (outcome.verdict, outcome.reason) == (Verdict.FAILED, "contact_owned")
    assert fake.requests_log == []


def test_a_batch_is_cut_at_the_batch_size(fake: FakeBraze, make: Any) -> None:
    intents = [intent(str(n), user(user_id=f"auth0|{n}")) for n in range(80)]
    outcomes = deliver(make(), *intents)
    assert {o.verdict for o in outcomes.values()} == {Verdict.SUCCEEDED}
    assert [r.objects for r in fake.requests_log] == [75, 5]
    assert len(fake.profiles()) == 80


def test_a_long_user_id_is_kept_in_the_link_as_a_digest(fake: FakeBraze, make: Any) -> None:
    long_id = "samlp|corporate-directory|" + "x" * 80 + "@example.com"
    outcome = deliver(make(), intent("1", user(user_id=long_id)))["1"]
    assert outcome.external_id == record_id(long_id) and len(outcome.external_id) == 64
    assert fake.profile(long_id) is not None  # Braze gets the user id itself


# Deprovisioning


def test_mark_sets_the_attribute_and_a_return_clears_it(fake: FakeBraze, make: Any) -> None:
    destination = make()
    link = linked(deliver(destination, intent())["1"])
    blocked = deliver(destination, intent("2", user(blocked=True), link=link))["2"]
    assert (blocked.verdict, blocked.deprovisioned) == (Verdict.SUCCEEDED, True)
    assert fake.profile("auth0|1") == {
        "email": "jane@example.com",
        "first_name": "Jane",
        "last_name": "Doe",
        "idsync_deprovisioned": True,
    }
    again = deliver(destination, intent("3", user(blocked=True), link=linked(blocked)))["3"]
    assert (again.verdict, again.reason) == (Verdict.SKIPPED, "unchanged")
    back = deliver(destination, intent("4", user(blocked=False), link=linked(blocked)))["4"]
    assert (back.verdict, back.deprovisioned) == (Verdict.SUCCEEDED, False)
    assert fake.profile("auth0|1")["idsync_deprovisioned"] is False  # type: ignore[index]


def test_delete_removes_the_profile_in_calls_of_fifty(fake: FakeBraze, make: Any) -> None:
    destination = make(deprovision="delete")
    users = [user(user_id=f"auth0|{n}") for n in range(60)]
    created = deliver(destination, *(intent(str(n), u) for n, u in enumerate(users)))
    gone = deliver(
        destination,
        *(
            intent(str(n), user("user.deleted", user_id=f"auth0|{n}"), link=linked(created[str(n)]))
            for n in range(60)
        ),
    )
    assert {(o.verdict, o.deprovisioned) for o in gone.values()} == {(Verdict.SUCCEEDED, True)}
    assert [r.objects for r in fake.requests_log if r.path == "/users/delete"] == [50, 10]
    assert fake.profiles() == {} and len(fake.deleted()) == 60
    assert gone["0"].calls[0].request == "POST /users/delete external_ids=50"


def test_a_user_never_written_is_not_written_to_deprovision_it(fake: FakeBraze, make: Any) -> None:
    for mode in ("mark", "delete"):
        outcome = deliver(make(deprovision=mode), intent("1", user("user.deleted")))["1"]
        assert (outcome.verdict, outcome.reason) == (Verdict.SKIPPED, "not_linked")
    assert fake.requests_log == []


# Errors


def test_objects_braze_refuses_fail_alone_with_its_words(fake: FakeBraze, make: Any) -> None:
    fake.refuse({"auth0|2"})
    outcomes = deliver(
        make(),
        intent("1", user(user_id="auth0|1")),
        intent("2", user(user_id="auth0|2")),
        intent("3", user(user_id="auth0|3", email="not-an-email")),
    )
    assert outcomes["1"].verdict is Verdict.SUCCEEDED
    assert (outcomes["2"].verdict, outcomes["2"].reason) == (
        Verdict.FAILED,
        "external_id_disallowed",
    )
    assert "blacklisted and disallowed" in (outcomes["2"].message or "")
    assert (outcomes["3"].verdict, outcomes["3"].reason) == (Verdict.FAILED, "invalid_email")
    assert outcomes["3"].calls[0].error_category == "INPUT_ERROR"
    assert set(fake.profiles()) == {"auth0|1"}


def test_a_refused_call_naming_objects_fails_them_and_resends_the_rest(
    fake: FakeBraze, make: Any
) -> None:
    errors = [
        {"type": "'email' is not a valid email address", "input_array": "attributes", "index": 1}
    ]
    fake.fail(1, 400, "Valid data must be provided", errors)
    outcomes = deliver(make(), *(intent(str(n), user(user_id=f"auth0|{n}")) for n in range(3)))
    assert (outcomes["1"].verdict, outcomes["1"].reason) == (Verdict.FAILED, "invalid_email")
    for key in ("0", "2"):
        assert (outcomes[key].verdict, outcomes[key].reason) == (Verdict.RETRY, "batch_refused")
        assert not outcomes[key].counts_against_budget


@pytest.mark.parametrize(
    ("status", "message", "verdict", "reason", "counts", "uncertain"),
    [
        (400, "Bad syntax", Verdict.FAILED, "rejected", True, False),
        (400, "Max Input Length Exceeded", Verdict.PAUSE, "batch_too_large", False, False),
        (401, None, Verdict.PAUSE, "invalid_api_key", False, False),
        (403, None, Verdict.PAUSE, "access_denied", False, False),
        (404, "Not Found", Verdict.PAUSE, "wrong_endpoint", False, False),
        (429, None, Verdict.RETRY, "throttled", False, False),
        (500, None, Verdict.RETRY, "server_error", True, True),
        (502, None, Verdict.RETRY, "server_error", True, False),
        (503, None, Verdict.RETRY, "server_error", True, False),
    ],
)
def test_every_answer_maps_to_its_verdict(
    fake: FakeBraze,
    make: Any,
    status: int,
    message: str | None,
    verdict: Verdict,
    reason: str,
    counts: bool,
    uncertain: bool,
) -> None:
    fake.fail(1, status, message)
    outcome = deliver(make(), intent())["1"]
    assert (outcome.verdict, outcome.reason, outcome.counts_against_budget, outcome.uncertain) == (
        verdict,
        reason,
        counts,
        uncertain,
    )
    assert outcome.status_code == status and outcome.calls[0].status == status
    if verdict is Verdict.PAUSE:
        assert "BRAZE_" in (outcome.message or "")
    assert fake.profiles() == {}


def test_a_429_waits_for_the_reset_and_holds_back_every_worker(fake: FakeBraze, make: Any) -> None:
    limiter = LocalRateLimiter(limit=1000, window=1.0)
    destination = make(limiter, batch_size="1")
    fake.fail(1, 429)
    outcomes = deliver(destination, *(intent(str(n), user(user_id=f"auth0|{n}")) for n in range(3)))
    assert len(fake.requests_log) == 1  # the batch stops at the first 429
    assert {(o.verdict, o.reason) for o in outcomes.values()} == {(Verdict.RETRY, "throttled")}
    [wait] = {o.retry_after or 0.0 for o in outcomes.values()}
    assert 0 < wait <= 1.5  # until X-RateLimit-Reset
    assert all(not o.counts_against_budget for o in outcomes.values())
    assert not limiter.wait_for_capacity(timeout=0)


def test_the_fakes_ceiling_is_met_by_waiting_not_by_failing(fake: FakeBraze, make: Any) -> None:
    fake.set_limits(100)
    destination = make()
    time.sleep(1 - time.time() % 1 + 0.01)
    first = deliver(destination, *(intent(f"a{n}", user(user_id=f"a{n}")) for n in range(75)))
    second = deliver(destination, *(intent(f"b{n}", user(user_id=f"b{n}")) for n in range(75)))
    assert {o.verdict for o in first.values()} == {Verdict.SUCCEEDED}
    assert {(o.verdict, o.reason) for o in second.values()} == {(Verdict.RETRY, "throttled")}
    assert fake.stats()["throttled"] == 1


def test_every_answer_feeds_the_headroom_gauge(fake: FakeBraze, make: Any) -> None:
    seen: list[Headroom] = []
    deliver(make(on_headroom=seen.append), intent())
    [headroom] = seen
    assert (headroom.max, headroom.remaining) == (10_000, 9_999)


def test_a_timed_out_write_is_retried_and_marked_uncertain(fake: FakeBraze, make: Any) -> None:
    fake.slow(1, TIMEOUT + CONNECT_TIMEOUT + 0.5)
    started = time.monotonic()
    outcome = deliver(make(), intent())["1"]
    assert time.monotonic() - started < TIMEOUT + CONNECT_TIMEOUT + 0.4
    assert (outcome.verdict, outcome.reason, outcome.uncertain) == (Verdict.RETRY, "timeout", True)
    assert outcome.counts_against_budget and outcome.calls[0].error_category == "TIMEOUT"


def test_nothing_is_sent_after_the_deadline(fake: FakeBraze, make: Any) -> None:
    outcomes = deliver(make(), intent("1"), intent("2", user(user_id="auth0|2")), within=-0.1)
    assert fake.requests_log == []
    assert {(o.reason, o.counts_against_budget) for o in outcomes.values()} == {
        ("batch_deadline", False)
    }


def test_a_revoked_key_pauses_and_the_rest_of_the_batch_waits(fake: FakeBraze, make: Any) -> None:
    fake.revoke()
    destination = make(batch_size="1")
    outcomes = deliver(destination, *(intent(str(n), user(user_id=f"auth0|{n}")) for n in range(3)))
    assert {o.verdict for o in outcomes.values()} == {Verdict.PAUSE}
    assert len(fake.requests_log) == 1
    assert DEFAULT_KEY not in json.dumps([o.message for o in outcomes.values()])


def test_a_profile_claimed_before_a_refused_call_is_still_cleared_of_the_mark(
    fake: FakeBraze, make: Any
) -> None:
    # A profile marked deprovisioned by an earlier install; the user is live now.
    fake.seed("auth0|1", {"email": "jane@example.com", "idsync_deprovisioned": True})
    fake.revoke()
    destination = make()
    claims = Claims()
    paused = deliver(destination, intent(), claim=claims)
    assert paused["1"].verdict is Verdict.PAUSE and claims.asked == [("1", "auth0|1")]
    fake.restore()
    # The engine kept the claimed id on the link, with nothing written under it.
    resumed = deliver(destination, intent(link=LinkState(external_id=record_id("auth0|1"))))
    assert resumed["1"].verdict is Verdict.SUCCEEDED
    assert fake.profile("auth0|1") == {
        "email": "jane@example.com",
        "first_name": "Jane",
        "last_name": "Doe",
        "idsync_deprovisioned": False,
    }


def test_a_user_claimed_before_a_refused_call_is_not_written_to_deprovision_it(
    fake: FakeBraze, make: Any
) -> None:
    fake.revoke()
    destination = make()
    assert deliver(destination, intent())["1"].verdict is Verdict.PAUSE
    fake.restore()
    # Blocked before anything reached Braze; the link kept the id it claimed.
    blocked = intent(state=user(blocked=True), link=LinkState(external_id=record_id("auth0|1")))
    outcome = deliver(destination, blocked)["1"]
    assert (outcome.verdict, outcome.reason) == (Verdict.SKIPPED, "not_linked")
    assert fake.profiles() == {}
    # A write whose answer never came may have made the profile: that one is marked.
    unsure = LinkState(external_id=record_id("auth0|1"), uncertain=True)
    marked = deliver(destination, intent(state=user(blocked=True), link=unsure))["1"]
    assert marked.verdict is Verdict.SUCCEEDED
    assert fake.profile("auth0|1") == {"idsync_deprovisioned": True}


# Probe and read


def test_the_probe_checks_the_key_and_the_permissions_it_needs(fake: FakeBraze, make: Any) -> None:
    assert make().probe() is None
    assert make(deprovision="delete").probe() is None
    assert fake.profiles() == {} and fake.stats()["records_written"] == 0
    fake.set_permissions({"users.track"})
    assert make().probe() is None
    reason = make(deprovision="delete").probe()
    assert reason is not None and "users.delete" in reason
    fake.revoke()
    reason = make().probe()
    assert reason is not None and "BRAZE_API_KEY" in reason
    fake.restore()
    fake.fail(1, 500)
    reason = make().probe()
    assert reason is not None and reason.startswith("unreachable")


def test_braze_cannot_be_read_back(make: Any) -> None:
    assert make().read(["auth0|1"]) is None


# Settings


def test_settings_defaults_and_what_is_missing() -> None:
    defaults = Config.from_env("braze", "braze", {})
    assert (defaults.rate, defaults.batch_size, defaults.deprovision) == ((1000, 3.0), 75, "mark")
    assert defaults.missing() == "BRAZE_REST_ENDPOINT is not set"
    endpoint = {"BRAZE_REST_ENDPOINT": "https://rest.iad-01.braze.com"}
    assert Config.from_env("braze", "braze", endpoint).missing() == "BRAZE_API_KEY is not set"
    full = Config.from_env("braze", "braze", endpoint | {"BRAZE_API_KEY": "k-123456789"})
    assert full.missing() is None and full.secrets() == ["k-123456789"]
    assert "k-123456789" not in repr(full)
    assert full.mapping() == {
        "email": "email",
        "given_name": "first_name",
        "family_name": "last_name",
        "phone_number": "phone",
    }


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("BRAZE_REST_ENDPOINT", "http://rest.iad-01.braze.com", "https://"),
        ("BRAZE_BATCH_SIZE", "76", "less than or equal to 75"),
        ("BRAZE_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("BRAZE_DEPROVISION", "archive", "'mark' or 'delete'"),
        ("BRAZE_RATE_LIMIT", "fast", "rate limit"),
        ("BRAZE_PROPERTY_MAP", "/nonexistent/map.json", "not a readable JSON file"),
    ],
)
def test_a_wrong_variable_is_named_in_the_error(variable: str, value: str, words: str) -> None:
    env = {"BRAZE_REST_ENDPOINT": "https://rest.iad-01.braze.com", "BRAZE_API_KEY": "k-123456789"}
    with pytest.raises(ValueError) as raised:
        Config.from_env("braze", "braze", env | {variable: value})
    assert variable in str(raised.value) and words in str(raised.value)
    assert "k-123456789" not in str(raised.value)


def test_a_map_onto_external_id_is_refused(tmp_path: Path) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text('{"email": "external_id"}')
    env = {"BRAZE_PROPERTY_MAP": str(mapping)}
    with pytest.raises(ValueError, match="must not map a field onto external_id"):
        Config.from_env("braze", "braze", env)


# The real engine


def test_the_engine_delivers_through_braze(
    fake: FakeBraze, settings: Settings, sessions: Any
) -> None:
    chosen = Settings(
        **(
            settings.model_dump()
            | {
                "destinations": "braze",
                "destination_env": {
                    "BRAZE_REST_ENDPOINT": fake.url,
                    "BRAZE_API_KEY": DEFAULT_KEY,
                    "BRAZE_TIMEOUT_SECONDS": "1",
                    "BRAZE_CONNECT_TIMEOUT_SECONDS": "0.5",
                },
            }
        )
    )
    app = create_app(chosen)
    client = app.test_client()
    fake.refuse({"auth0|refused"})

    def post(event: dict[str, Any]) -> None:
        answer = client.post(
            "/events/auth0", json=event, headers={"Authorization": "Bearer test-ingest-token"}
        )
        assert answer.status_code == 202

    limiter = LocalRateLimiter(limit=100, window=1.0)
    destination = build_adapter(chosen.destination("braze"), chosen, limiter)
    try:
        assert isinstance(destination, BrazeDestination)
        post(auth0_event("user.created", "auth0|e1", email="e1@example.com", given_name="E"))
        post(auth0_event("user.created", "auth0|e2", email="e2@example.com"))
        post(auth0_event("user.created", "auth0|refused", email="r@example.com"))
        # A user blocked before idsync ever wrote it: nothing to deprovision.
        post(auth0_event("user.updated", "auth0|e3", email="e3@example.com", blocked=True))
        first = run_batch(sessions=sessions, settings=chosen, destination=destination)
        post(auth0_event("user.updated", "auth0|e1", email="e1@example.com", blocked=True, at=5))
        second = run_batch(sessions=sessions, settings=chosen, destination=destination)
    finally:
        destination.close()
        app.extensions["idsync"].engine.dispose()
    assert first.outcomes == {
        "succeeded": 2,
        "skipped:not_linked": 1,
        "failed:external_id_disallowed": 1,
    }
    assert second.outcomes == {"succeeded": 1}
    assert fake.profile("auth0|e1") == {
        "email": "e1@example.com",
        "first_name": "E",
        "idsync_deprovisioned": True,
    }
    assert fake.profile("auth0|e2") == {"email": "e2@example.com", "idsync_deprovisioned": False}
    with sessions() as session:
        links = {link.subject: link for link in session.scalars(select(Link))}
        failed = session.scalars(select(Delivery).where(Delivery.subject == "auth0|refused")).one()
    assert (links["auth0|e1"].external_id, links["auth0|e1"].deprovisioned) == ("auth0|e1", True)
    assert links["auth0|e2"].external_id == "auth0|e2"
    assert "blacklisted" in (failed.last_error or "")
