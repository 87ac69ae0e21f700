"""The Salesforce destination against the fake org over real HTTP: writes, errors, settings.

Nothing is mocked: every test talks to ``idsync.fakes.salesforce`` on loopback,
and the engine test runs ``workers.delivery.run_batch`` on the real PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from idsync.destinations import build_adapter
from idsync.fakes.salesforce import FakeSalesforce
from idsync.settings import Settings
from ingest import create_app
from models.tables import Delivery, Link
from tests.events import auth0_event
from workers.delivery import run_batch
from workers.destinations.base import Headroom, Intent, LinkState, Outcome, UserState, Verdict
from workers.destinations.salesforce.adapter import SalesforceDestination
from workers.destinations.salesforce.settings import Config
from workers.ratelimit import LocalRateLimiter

TIMEOUT, CONNECT_TIMEOUT = 0.8, 0.4


@pytest.fixture(scope="module")
def server() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeSalesforce) -> FakeSalesforce:
    server.reset()
    return server


def env(url: str, **extra: str) -> dict[str, str]:
    return {
        "SALESFORCE_LOGIN_URL": url,
        "SALESFORCE_CLIENT_ID": "fake-client-id",
        "SALESFORCE_CLIENT_SECRET": "fake-client-secret",
        "SALESFORCE_TIMEOUT_SECONDS": str(TIMEOUT),
        "SALESFORCE_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT),
    } | extra


def config(url: str, **extra: str) -> Config:
    built = Config.from_env("salesforce", "salesforce", env(url, **extra))
    assert isinstance(built, Config)
    return built


@pytest.fixture
def make(fake: FakeSalesforce) -> Iterator[Any]:
    built: list[SalesforceDestination] = []

    def build(limiter: LocalRateLimiter | None = None, **extra: Any) -> SalesforceDestination:
        headroom = extra.pop("on_headroom", None)
        destination = SalesforceDestination(
            config(fake.url, **extra),
            limiter or LocalRateLimiter(limit=1000, window=1.0),
            on_headroom=headroom,
        )
        built.append(destination)
        return destination

    yield build
    for destination in built:
        destination.close()


def user(user_id: str = "auth0|1", event_type: str = "user.updated", **fields: Any) -> UserState:
    profile = {"user_id": user_id} | {k: v for k, v in fields.items() if v is not None}
    previous = fields.pop("previous", None)
    data: dict[str, Any] = {"object": profile}
    if previous:
        data["previous_object"] = profile | {"email": previous}
        profile.pop("previous", None)
    return UserState.from_event(event_type, {"data": data})


def intent(key: str, state: UserState, link: LinkState | None = None, **kw: Any) -> Intent:
    return Intent(key=key, user=state, link=link or LinkState(), **kw)


def claim_all(_key: str, _record: str) -> bool:
    return True


def deliver(
    destination: SalesforceDestination, *intents: Intent, claim: Any = claim_all, within: float = 10
) -> dict[str, Outcome]:
    return destination.deliver(list(intents), claim=claim, deadline=time.monotonic() + within)


def linked(outcome: Outcome, **kw: Any) -> LinkState:
    return LinkState(
        external_id=outcome.external_id,
        properties_hash=outcome.properties_hash,
        last_email=outcome.email,
        deprovisioned=outcome.deprovisioned,
        **kw,
    )


JANE = {"email": "Jane@Example.com", "given_name": "Jane", "family_name": "Doe"}


# Creates, updates, unchanged


def test_a_new_user_is_created_by_upsert_on_the_external_id(
    make: Any, fake: FakeSalesforce
) -> None:
    seen: list[Headroom] = []
    outcome = deliver(make(on_headroom=seen.append), intent("1", user(**JANE)))["1"]
    assert (outcome.verdict, outcome.created) == (Verdict.SUCCEEDED, True)
    [record] = fake.records("Contact")
    assert record["Id"] == outcome.external_id and len(record["Id"]) == 18
    assert (record["Email"], record["LastName"], record["Auth0_User_Id__c"]) == (
        "jane@example.com",
        "Doe",
        "auth0|1",
    )
    assert record["Idsync_Deprovisioned__c"] is False
    token, query, upsert = (c.request for c in outcome.calls)  # the token is fetched first
    assert token == "POST /services/oauth2/token" and query.startswith("GET query")
    assert upsert == "PATCH /services/data/v62.0/composite/sobjects/Contact/Auth0_User_Id__c"
    assert seen and seen[-1].daily == 100_000 and seen[-1].daily_remaining == 100_000 - 2


def test_an_update_follows_the_user_and_clears_absent_fields_with_null(
    make: Any, fake: FakeSalesforce
) -> None:
    destination = make()
    first = deliver(destination, intent("1", user(phone_number="+1 555", **JANE)))["1"]
    changed = user(email="jane.new@example.com", given_name="Janet", family_name="Doe")
    second = deliver(destination, intent("2", changed, linked(first)))["2"]
    assert (second.verdict, second.external_id, second.created) == (
        Verdict.SUCCEEDED,
        first.external_id,
        None,
    )
    [record] = fake.records("Contact")
    assert (record["Email"], record["FirstName"]) == ("jane.new@example.com", "Janet")
    assert "Phone" not in record  # absent from the newest event: cleared
    assert [c.request.split(" ")[0] for c in second.calls] == ["PATCH"]  # no lookup when linked


def test_an_unchanged_profile_is_skipped_without_a_call(make: Any, fake: FakeSalesforce) -> None:
    destination = make()
    first = deliver(destination, intent("1", user(**JANE)))["1"]
    requests = fake.stats()["requests"]
    again = deliver(destination, intent("2", user(**JANE), linked(first)))["2"]
    assert (again.verdict, again.reason, again.calls) == (Verdict.SKIPPED, "unchanged", [])
    forced = deliver(destination, intent("3", user(**JANE), linked(first), force=True))["3"]
    uncertain = deliver(destination, intent("4", user(**JANE), linked(first, uncertain=True)))["4"]
    assert forced.verdict is uncertain.verdict is Verdict.SUCCEEDED
    assert fake.stats()["requests"] == requests + 2


def test_a_create_without_last_name_falls_back_but_never_overwrites_one(
    make: Any, fake: FakeSalesforce
) -> None:
    destination = make()
    named = deliver(destination, intent("1", user(email="a@example.com", name="Ada Lovelace")))
    local = deliver(destination, intent("2", user("auth0|2", email="bob@example.com")))
    assert {o.verdict for o in (named["1"], local["2"])} == {Verdict.SUCCEEDED}
    names = {r["Auth0_User_Id__c"]: r["LastName"] for r in fake.records("Contact")}
    assert names == {"auth0|1": "Ada Lovelace", "auth0|2": "bob"}
    # A linked record keeps its last name when the profile has none: never the fallback.
    again = deliver(
        destination, intent("3", user(email="a@example.com", given_name="Ada"), linked(named["1"]))
    )
    assert again["3"].verdict is Verdict.SUCCEEDED
    assert fake.record(str(named["1"].external_id))["LastName"] == "Ada Lovelace"  # type: ignore[index]


def test_a_lead_gets_the_default_company(make: Any, fake: FakeSalesforce) -> None:
    destination = make(SALESFORCE_OBJECT="lead", SALESFORCE_DEFAULT_COMPANY="Self-serve")
    outcome = deliver(destination, intent("1", user(**JANE)))["1"]
    assert outcome.verdict is Verdict.SUCCEEDED
    [lead] = fake.records("Lead")
    assert lead["Id"].startswith("00Q") and lead["Company"] == "Self-serve"


# Adoption of a sales team's records


def test_a_contact_found_by_email_is_claimed_and_gets_the_external_id(
    make: Any, fake: FakeSalesforce
) -> None:
    existing = fake.seed("Contact", {"Email": "jane@example.com", "LastName": "Sales-Doe"})
    claims: list[tuple[str, str]] = []

    def claim(key: str, record: str) -> bool:
        claims.append((key, record))
        return True

    destination = make()
    outcome = deliver(destination, intent("1", user(email="jane@example.com")), claim=claim)["1"]
    assert (outcome.verdict, outcome.external_id, outcome.created) == (
        Verdict.SUCCEEDED,
        existing,
        False,
    )
    assert claims == [("1", existing)]
    [record] = fake.records("Contact")
    assert (record["Auth0_User_Id__c"], record["LastName"]) == ("auth0|1", "Sales-Doe")
    # The next write finds it by the External ID: still one record.
    deliver(
        destination, intent("2", user(email="jane@example.com", given_name="J"), linked(outcome))
    )
    assert len(fake.records("Contact")) == 1


def test_an_adoption_refused_half_way_is_healed_not_duplicated(
    make: Any, fake: FakeSalesforce
) -> None:
    existing = fake.seed("Contact", {"Email": "jane@example.com", "LastName": "Sales"})
    fake.record_error("FIELD_CUSTOM_VALIDATION_EXCEPTION", existing)
    destination = make()
    refused = deliver(destination, intent("1", user(email="jane@example.com")))["1"]
    assert refused.reason == "field_custom_validation_exception"
    # The claim left the link on the record, which has no External ID yet.
    again = deliver(destination, intent("2", user(email="jane@example.com"), LinkState(existing)))
    assert again["2"].external_id == existing
    [record] = fake.records("Contact")
    assert record["Auth0_User_Id__c"] == "auth0|1"
    assert again["2"].calls[-1].request == "PATCH /services/data/v62.0/composite/sobjects"


def test_the_previous_email_finds_the_contact_after_an_email_change(
    make: Any, fake: FakeSalesforce
) -> None:
    existing = fake.seed("Contact", {"Email": "old@example.com", "LastName": "Doe"})
    state = user(email="new@example.com", previous="old@example.com")
    outcome = deliver(make(), intent("1", state))["1"]
    assert outcome.external_id == existing
    assert fake.record(existing)["Email"] == "new@example.com"  # type: ignore[index]


def test_several_matches_end_ambiguous_and_an_owned_one_is_left_alone(
    make: Any, fake: FakeSalesforce
) -> None:
    for _ in range(2):
        fake.seed("Contact", {"Email": "twin@example.com", "LastName": "Twin"})
    owned = fake.seed("Contact", {"Email": "owned@example.com", "LastName": "Owned"})
    outcomes = deliver(
        make(),
        intent("1", user(email="twin@example.com")),
        intent("2", user("auth0|2", email="owned@example.com")),
        claim=lambda key, record: False,
    )
    assert (outcomes["1"].verdict, outcomes["1"].reason) == (Verdict.FAILED, "ambiguous_match")
    assert "t***@example.com" in (outcomes["1"].message or "")
    assert (outcomes["2"].verdict, outcomes["2"].reason) == (Verdict.FAILED, "contact_owned")
    assert all("Auth0_User_Id__c" not in r for r in fake.records("Contact"))
    assert fake.record(owned) is not None


# Deprovisioning


def test_mark_sets_the_checkbox_and_an_unblock_clears_it(make: Any, fake: FakeSalesforce) -> None:
    destination = make()
    created = deliver(destination, intent("1", user(**JANE)))["1"]
    blocked = deliver(destination, intent("2", user(blocked=True, **JANE), linked(created)))["2"]
    assert (blocked.verdict, blocked.deprovisioned) == (Verdict.SUCCEEDED, True)
    record = fake.record(str(created.external_id))
    assert record is not None and record["Idsync_Deprovisioned__c"] is True
    assert record["FirstName"] == "Jane"  # the mark alone: nothing else touched
    again = deliver(destination, intent("3", user(blocked=True, **JANE), linked(blocked)))["3"]
    assert (again.verdict, again.reason) == (Verdict.SKIPPED, "unchanged")
    live = deliver(destination, intent("4", user(**JANE), linked(blocked)))["4"]
    assert (live.verdict, live.deprovisioned, live.external_id) == (
        Verdict.SUCCEEDED,
        False,
        created.external_id,
    )
    assert fake.record(str(created.external_id))["Idsync_Deprovisioned__c"] is False  # type: ignore[index]


def test_delete_removes_the_record_and_a_deleted_one_counts_as_done(
    make: Any, fake: FakeSalesforce
) -> None:
    destination = make(SALESFORCE_DEPROVISION="delete")
    one = deliver(destination, intent("1", user(**JANE)))["1"]
    two = deliver(destination, intent("2", user("auth0|2", email="b@example.com")))["2"]
    fake.delete_by_hand(str(two.external_id))
    outcomes = deliver(
        destination,
        intent("3", user(event_type="user.deleted"), linked(one)),
        intent("4", user("auth0|2", event_type="user.deleted"), linked(two)),
    )
    assert (outcomes["3"].verdict, outcomes["3"].deprovisioned) == (Verdict.SUCCEEDED, True)
    assert (outcomes["4"].verdict, outcomes["4"].reason) == (Verdict.SUCCEEDED, "not_found")
    assert fake.records("Contact") == []
    assert outcomes["3"].calls[-1].request.startswith("DELETE /services/data/v62.0/composite")


@pytest.mark.parametrize("mode", ["mark", "delete"])
def test_a_user_never_linked_and_deprovisioned_is_skipped_without_creating(
    make: Any, fake: FakeSalesforce, mode: str
) -> None:
    outcome = deliver(make(SALESFORCE_DEPROVISION=mode), intent("1", user(blocked=True, **JANE)))[
        "1"
    ]
    assert (outcome.verdict, outcome.reason, outcome.calls) == (
        Verdict.SKIPPED,
        "never_linked",
        [],
    )
    assert fake.records("Contact") == []


# Errors


@pytest.mark.parametrize(
    ("code", "email"),
    [
        ("DUPLICATES_DETECTED", "jane@example.com"),
        ("REQUIRED_FIELD_MISSING", "jane@example.com"),
        ("DUPLICATE_VALUE", "jane@example.com"),
        ("FIELD_CUSTOM_VALIDATION_EXCEPTION", "jane@example.com"),
        ("INVALID_EMAIL_ADDRESS", "not-an-email"),
    ],
)
def test_a_refused_record_fails_alone_with_salesforces_message(
    make: Any, fake: FakeSalesforce, code: str, email: str
) -> None:
    if code != "INVALID_EMAIL_ADDRESS":
        fake.record_error(code, email, message=f"{code} says no")
    outcomes = deliver(
        make(),
        intent("1", user(email=email, family_name="Doe")),
        intent("2", user("auth0|2", email="ok@example.com", family_name="Ok")),
    )
    assert (outcomes["1"].verdict, outcomes["1"].reason) == (Verdict.FAILED, code.lower())
    assert code in (outcomes["1"].message or "")
    assert outcomes["2"].verdict is Verdict.SUCCEEDED
    assert [r["Auth0_User_Id__c"] for r in fake.records("Contact")] == ["auth0|2"]


def test_a_linked_record_deleted_by_hand_is_created_again_with_a_last_name(
    make: Any, fake: FakeSalesforce
) -> None:
    destination = make()
    first = deliver(destination, intent("1", user(email="a@example.com")))["1"]
    fake.delete_by_hand(str(first.external_id))
    state = user(email="a@example.com", given_name="A")
    again = deliver(destination, intent("2", state, linked(first)))["2"]
    assert (again.verdict, again.created) == (Verdict.SUCCEEDED, True)
    assert again.external_id != first.external_id
    [record] = fake.records("Contact")
    assert (record["Id"], record["LastName"]) == (again.external_id, "a")
    assert [c.status for c in again.calls] == [200, 200]  # refused once, then created


def test_a_locked_row_and_a_5xx_are_retried_with_budget(make: Any, fake: FakeSalesforce) -> None:
    destination = make()
    fake.record_error("UNABLE_TO_LOCK_ROW", "jane@example.com")
    locked = deliver(destination, intent("1", user(**JANE)))["1"]
    assert (locked.verdict, locked.reason, locked.counts_against_budget) == (
        Verdict.RETRY,
        "unable_to_lock_row",
        True,
    )
    fake.fail(1, 503, "SERVER_UNAVAILABLE")
    down = deliver(destination, intent("2", user(**JANE)))["2"]
    assert (down.verdict, down.reason, down.status_code, down.counts_against_budget) == (
        Verdict.RETRY,
        "server_error",
        503,
        True,
    )
    assert deliver(destination, intent("3", user(**JANE)))["3"].verdict is Verdict.SUCCEEDED


@pytest.mark.parametrize(
    ("used", "reason", "wait"),
    [(100_000, "daily_limit_exceeded", 900.0), (None, "concurrent_limit_exceeded", 5.0)],
)
def test_request_limit_exceeded_waits_without_spending_the_budget(
    make: Any, fake: FakeSalesforce, used: int | None, reason: str, wait: float
) -> None:
    limiter = LocalRateLimiter(limit=1000, window=1.0)
    destination = make(limiter)
    assert destination.probe() is None  # a token in hand
    if used is not None:
        fake.set_limits(used=used)
    else:
        fake.set_limits(max_concurrent=0)
    outcomes = deliver(destination, intent("1", user(**JANE)), intent("2", user("auth0|2")))
    for outcome in outcomes.values():
        assert (outcome.verdict, outcome.reason, outcome.counts_against_budget) == (
            Verdict.RETRY,
            reason,
            False,
        )
        assert outcome.retry_after == wait and outcome.status_code == 403
    assert not limiter.wait_for_capacity(timeout=0)  # every worker waits it out
    assert fake.stats()["throttled"] == 1


@pytest.mark.parametrize(
    ("switch", "words"),
    [
        (lambda f: f.fail(1, 403, "INSUFFICIENT_ACCESS"), "INSUFFICIENT_ACCESS"),
        (lambda f: f.fail(1, 403, "API_DISABLED_FOR_ORG"), "API_DISABLED_FOR_ORG"),
        (lambda f: f.fail(1, 404, "NOT_FOUND"), "NOT_FOUND"),
        (lambda f: f.remove_field("Contact", "Phone"), "INVALID_FIELD"),
        (lambda f: f.revoke(), "invalid_client"),
        (lambda f: f.revoke("invalid_grant"), "invalid_grant"),
    ],
)
def test_misconfiguration_pauses_the_destination(
    make: Any, fake: FakeSalesforce, switch: Any, words: str
) -> None:
    switch(fake)
    outcome = deliver(make(), intent("1", user(phone_number="+1", **JANE)))["1"]
    assert (outcome.verdict, outcome.counts_against_budget) == (Verdict.PAUSE, False)
    assert words in (outcome.message or "")
    assert fake.records("Contact") == []


def test_an_expired_session_gets_one_new_token(make: Any, fake: FakeSalesforce) -> None:
    destination = make()
    assert deliver(destination, intent("1", user(**JANE)))["1"].verdict is Verdict.SUCCEEDED
    fake.expire_tokens()
    outcome = deliver(destination, intent("2", user("auth0|2", email="b@example.com")))["2"]
    assert outcome.verdict is Verdict.SUCCEEDED
    assert [c.status for c in outcome.calls] == [
        401,
        200,
        200,
        200,
    ]  # expired, token, query, upsert
    assert fake.stats()["tokens_issued"] == 2


def test_nothing_is_sent_after_the_deadline(make: Any, fake: FakeSalesforce) -> None:
    outcomes = deliver(make(), intent("1", user(**JANE)), within=-0.1)
    assert (outcomes["1"].reason, outcomes["1"].counts_against_budget) == (
        "batch_deadline",
        False,
    )
    assert fake.stats()["requests"] == 0


def test_a_write_that_timed_out_is_uncertain_and_lands_once(
    make: Any, fake: FakeSalesforce
) -> None:
    destination = make()
    assert destination.probe() is None
    first = deliver(destination, intent("1", user(**JANE)))["1"]
    fake.slow(1, TIMEOUT + CONNECT_TIMEOUT + 0.3)
    started = time.monotonic()
    lost = deliver(
        destination,
        intent(
            "2", user(email="jane@example.com", given_name="Late", family_name="Doe"), linked(first)
        ),
    )["2"]
    assert time.monotonic() - started < TIMEOUT + CONNECT_TIMEOUT + 0.5
    assert (lost.verdict, lost.reason, lost.uncertain) == (
        Verdict.RETRY,
        "timeout_or_connection",
        True,
    )
    # An unlinked user whose create timed out is found by its External ID, not created twice.
    fake.slow(1, TIMEOUT + CONNECT_TIMEOUT + 0.3)
    unseen = deliver(destination, intent("3", user("auth0|3", name="Cee")))["3"]  # no lookup
    assert unseen.uncertain
    time.sleep(0.4)
    found = deliver(
        destination, intent("4", user("auth0|3", name="Cee"), LinkState(uncertain=True))
    )["4"]
    assert found.verdict is Verdict.SUCCEEDED
    assert "by Auth0_User_Id__c" in found.calls[0].request  # looked up before writing
    assert [r["Auth0_User_Id__c"] for r in fake.records("Contact")] == ["auth0|1", "auth0|3"]


# Probe and read


def test_the_probe_names_a_missing_field(make: Any, fake: FakeSalesforce) -> None:
    destination = make()
    assert destination.probe() is None
    fake.remove_field("Contact", "Idsync_Deprovisioned__c")
    assert "Idsync_Deprovisioned__c" in (destination.probe() or "")
    assert make(SALESFORCE_DEPROVISION="delete").probe() is None  # delete needs no checkbox
    fake.remove_field("Contact", "Auth0_User_Id__c")
    fake.add_field("Contact", "Auth0_User_Id__c")  # a plain text field, not an External ID
    fake.add_field("Contact", "Idsync_Deprovisioned__c")
    assert "not an External ID field" in (destination.probe() or "")


def test_read_returns_records_by_id_and_leaves_out_missing_ones(
    make: Any, fake: FakeSalesforce
) -> None:
    destination = make()
    one = deliver(destination, intent("1", user(**JANE)))["1"]
    gone = fake.seed("Contact", {"LastName": "Gone"})
    fake.delete_by_hand(gone)
    found = destination.read([str(one.external_id).lower(), gone])
    assert list(found) == [str(one.external_id).lower()]  # 18-char ids ignore case
    assert found[str(one.external_id).lower()]["Email"] == "jane@example.com"


# Settings


def test_settings_defaults_and_missing_credentials() -> None:
    settings = Settings(destinations="salesforce", destination_env={})
    defaults = settings.destination("salesforce")
    assert isinstance(defaults, Config)
    assert defaults.missing() == "SALESFORCE_LOGIN_URL is not set"
    assert (defaults.rate, defaults.batch_size, defaults.object, defaults.api_version) == (
        (1, 1.0),
        200,
        "Contact",
        "62.0",
    )
    assert (defaults.external_id_field, defaults.deprovision, defaults.deprovision_field) == (
        "Auth0_User_Id__c",
        "mark",
        "Idsync_Deprovisioned__c",
    )
    assert defaults.limit_wait_seconds == 900.0
    assert defaults.mapping()["family_name"] == "LastName"
    partial = config("https://acme.my.salesforce.com")
    assert partial.missing() is None and "fake-client-secret" in partial.secrets()
    assert "fake-client-secret" not in repr(partial)
    no_secret = {
        "SALESFORCE_LOGIN_URL": "https://acme.my.salesforce.com",
        "SALESFORCE_CLIENT_ID": "x",
    }
    assert Config.from_env("salesforce", "salesforce", no_secret).missing() == (
        "SALESFORCE_CLIENT_SECRET is not set"
    )


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("SALESFORCE_OBJECT", "Account", "must be Contact or Lead"),
        ("SALESFORCE_API_VERSION", "45.0", "too old"),
        ("SALESFORCE_API_VERSION", "latest", "not an API version"),
        ("SALESFORCE_LOGIN_URL", "http://acme.my.salesforce.com", "https://"),
        ("SALESFORCE_LOGIN_URL", "https://login.salesforce.com", "My Domain"),
        ("SALESFORCE_BATCH_SIZE", "201", "less than or equal to 200"),
        ("SALESFORCE_DEPROVISION", "archive", "'mark' or 'delete'"),
        ("SALESFORCE_LIMIT_WAIT", "soon", "not a duration"),
        ("SALESFORCE_EXTERNAL_ID_FIELD", "bad field", "not a Salesforce field API name"),
        ("SALESFORCE_PROPERTY_MAP", "/nonexistent.json", "not a readable JSON file"),
    ],
)
def test_a_wrong_variable_is_named_in_the_error(variable: str, value: str, words: str) -> None:
    with pytest.raises(ValueError) as error:
        Config.from_env(
            "salesforce", "salesforce", env("https://acme.my.salesforce.com") | {variable: value}
        )
    assert variable in str(error.value) and words in str(error.value)
    assert "fake-client-secret" not in str(error.value)


def test_the_registry_builds_a_paused_adapter_that_says_why() -> None:
    settings = Settings(destinations="salesforce", destination_env={"SALESFORCE_CLIENT_ID": "x"})
    destination = build_adapter(
        settings.destination("salesforce"), settings, LocalRateLimiter(limit=1, window=1)
    )
    try:
        assert destination.clears_with is None
        assert destination.probe() == "SALESFORCE_LOGIN_URL is not set"
        outcome = deliver(destination, intent("1", user(**JANE)))["1"]
        assert (outcome.verdict, outcome.message) == (
            Verdict.PAUSE,
            "SALESFORCE_LOGIN_URL is not set",
        )
    finally:
        destination.close()


# Through the engine


def test_events_reach_salesforce_through_the_engine(
    settings: Settings, sessions: Any, fake: FakeSalesforce
) -> None:
    chosen = settings.model_copy(
        update={
            "destinations": ("salesforce",),
            "destination_env": env(fake.url),
            "retry_schedule": ("0s",) * 4,
        }
    )
    existing = fake.seed("Contact", {"Email": "sales@example.com", "LastName": "Known"})
    app = create_app(chosen)
    client = app.test_client()
    destination = build_adapter(
        chosen.destination("salesforce"), chosen, LocalRateLimiter(limit=1000, window=1.0)
    )

    def post(*documents: dict[str, Any]) -> None:
        for document in documents:
            answer = client.post(
                "/events/auth0",
                json=document,
                headers={"Authorization": "Bearer test-ingest-token"},
            )
            assert answer.status_code == 202, answer.get_json()

    def drain() -> list[tuple[str, str | None]]:
        for _ in range(5):
            if run_batch(sessions=sessions, settings=chosen, destination=destination).claimed == 0:
                break
        with sessions() as session:
            rows = session.scalars(select(Delivery).order_by(Delivery.id)).all()
            return [(r.status.value, r.reason) for r in rows]

    try:
        post(
            auth0_event("user.created", "auth0|e1", email="e1@example.com", family_name="One"),
            auth0_event("user.created", "auth0|e2", email="sales@example.com"),
            auth0_event(
                "user.updated", "auth0|e1", email="e1@example.com", family_name="Uno", at=5
            ),
        )
        assert sorted(drain(), key=str) == sorted(
            [
                ("skipped", "stale"),
                ("succeeded", None),
                ("succeeded", "adopted"),
            ],
            key=str,
        )
        post(auth0_event("user.updated", "auth0|e2", email="sales@example.com", blocked=True, at=9))
        assert drain()[-1] == ("succeeded", None)
    finally:
        destination.close()
        app.extensions["idsync"].engine.dispose()
    with sessions() as session:
        links = {link.subject: link for link in session.scalars(select(Link)).all()}
    records = {r["Auth0_User_Id__c"]: r for r in fake.records("Contact")}
    assert records["auth0|e1"]["LastName"] == "Uno"
    assert records["auth0|e2"]["Id"] == existing and records["auth0|e2"]["LastName"] == "Known"
    assert records["auth0|e2"]["Idsync_Deprovisioned__c"] is True
    assert links["auth0|e2"].external_id == existing and links["auth0|e2"].deprovisioned
    assert links["auth0|e1"].external_id == records["auth0|e1"]["Id"]
    assert links["auth0|e1"].created_contact is True and links["auth0|e2"].created_contact is False
