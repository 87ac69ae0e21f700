"""The webhook destination signs, sends and judges answers as Standard Webhooks asks.

Every test talks real HTTP to the fake receiver, which verifies each request
with the ``standardwebhooks`` package; nothing is mocked.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from standardwebhooks.webhooks import Webhook

from idsync.destinations import build_adapter
from idsync.fakes.hubspot import FakeHubSpot
from idsync.fakes.webhook_receiver import FakeWebhookReceiver
from idsync.settings import Settings
from tests.events import auth0_event
from tests.pipeline import Pipeline
from workers.destinations.base import Intent, LinkState, UserState, Verdict
from workers.destinations.webhook.adapter import WebhookDestination
from workers.destinations.webhook.settings import (
    Config,
    WebhookSettings,
    WebhookSettingsError,
    missing,
)
from workers.ratelimit import LocalRateLimiter

ROOT = Path(__file__).resolve().parent.parent
AUTH0 = ROOT / "tests" / "fixtures" / "auth0"
SCHEMA = json.loads((ROOT / "docs" / "webhook-payload.schema.json").read_text())
NEW_SECRET = "whsec_" + base64.b64encode(b"the-new-secret-of-32-random-byte").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"the-old-secret-of-32-random-byte").decode()
TIMEOUT, CONNECT_TIMEOUT = 0.6, 0.4


@dataclass(frozen=True)
class EngineIntent(Intent):
    """An intent with the optional attributes the adapter reads when the engine has them."""

    event_id: str | None = None
    source: str | None = None
    event_time: datetime | str | None = None
    message_id: str | None = None


def user(event_type: str = "user.updated", **fields: Any) -> UserState:
    profile = {
        "user_id": "auth0|1",
        "email": "Jane.Doe@Example.com",
        "given_name": "Jane",
        "family_name": "Doe",
        "updated_at": "2025-02-01T12:34:56.789Z",
    } | fields
    profile = {key: value for key, value in profile.items() if value is not None}
    return UserState.from_event(event_type, {"data": {"object": profile}})


def intent(key: str = "1", state: UserState | None = None, **options: Any) -> Intent:
    return EngineIntent(
        key=key, user=state or user(), link=options.pop("link", LinkState()), **options
    )


def never_claimed(_key: str, _record: str) -> bool:
    raise AssertionError("a webhook destination never claims records")


def deliver(destination: WebhookDestination, *intents: Intent, within: float = 10.0):
    return destination.deliver(
        list(intents), claim=never_claimed, deadline=time.monotonic() + within
    )


@pytest.fixture(scope="module")
def server() -> Iterator[FakeWebhookReceiver]:
    with FakeWebhookReceiver([NEW_SECRET]) as receiver:
        yield receiver


@pytest.fixture
def receiver(server: FakeWebhookReceiver) -> FakeWebhookReceiver:
    server.reset()
    server.set_secrets([NEW_SECRET])
    return server


def make_settings(url: str, **overrides: Any) -> WebhookSettings:
    values = {
        "url": url,
        "secrets": (NEW_SECRET, OLD_SECRET),
        "timeout_seconds": TIMEOUT,
        "connect_timeout_seconds": CONNECT_TIMEOUT,
    }
    return WebhookSettings(**(values | overrides))


@pytest.fixture
def make(receiver: FakeWebhookReceiver) -> Iterator[Any]:
    built: list[WebhookDestination] = []

    def build(
        limiter: LocalRateLimiter | None = None, *, url: str | None = None, **overrides: Any
    ) -> WebhookDestination:
        parallel = overrides.pop("parallel_requests", 8)
        destination = WebhookDestination(
            "licenses",
            make_settings(url or receiver.url, **overrides),
            limiter or LocalRateLimiter(limit=1000, window=1.0),
            parallel_requests=parallel,
        )
        built.append(destination)
        return destination

    yield build
    for destination in built:
        destination.close()


@pytest.fixture
def destination(make: Any) -> WebhookDestination:
    return make()


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


# Signing


def test_each_secret_of_a_rotation_verifies_the_message_alone(
    receiver: FakeWebhookReceiver, destination: WebhookDestination
) -> None:
    assert deliver(destination, intent("1"))["1"].verdict is Verdict.SUCCEEDED
    receiver.set_secrets([OLD_SECRET])  # a receiver not yet told of the new secret
    assert deliver(destination, intent("2"))["2"].verdict is Verdict.SUCCEEDED
    assert receiver.message_ids() == ["msg_1", "msg_2"]
    for entry in receiver.requests_log:
        headers = {
            "webhook-id": entry.message_id or "",
            "webhook-timestamp": entry.timestamp or "",
            "webhook-signature": entry.signature or "",
        }
        assert len((entry.signature or "").split(" ")) == 2
        for secret in (NEW_SECRET, OLD_SECRET):
            assert Webhook(secret).verify(entry.body, headers)["data"]["user_id"] == "auth0|1"
        assert abs(int(entry.timestamp or 0) - time.time()) < 5


def test_a_receiver_with_another_secret_pauses_the_destination(
    receiver: FakeWebhookReceiver, destination: WebhookDestination
) -> None:
    receiver.set_secrets(["whsec_" + base64.b64encode(b"x" * 32).decode()])
    outcome = deliver(destination, intent())["1"]
    assert (outcome.verdict, outcome.reason, outcome.status_code) == (
        Verdict.PAUSE,
        "signature_refused",
        401,
    )
    assert "LICENSES_SECRET" in (outcome.message or "")
    assert receiver.messages() == []


def test_the_webhook_id_is_the_same_on_every_retry_of_a_delivery(
    receiver: FakeWebhookReceiver, destination: WebhookDestination
) -> None:
    receiver.answer_next(1, 503)
    receiver.slow_next(1, TIMEOUT + CONNECT_TIMEOUT + 0.5)  # kept, but answered too late
    first = deliver(destination, intent("42"))["42"]
    second = deliver(destination, intent("42"))["42"]
    third = deliver(destination, intent("42"))["42"]
    assert (first.verdict, first.uncertain) == (Verdict.RETRY, False)
    assert (second.verdict, second.uncertain) == (Verdict.RETRY, True)
    assert third.verdict is Verdict.SUCCEEDED
    assert {entry.message_id for entry in receiver.requests_log} == {"msg_42"}
    assert len(receiver.requests_log) == 3
    assert len(receiver.received("msg_42")) == 2  # the late one and the retry
    assert len(receiver.messages()) == 1  # which the receiver tells apart by id


def test_an_engine_message_id_and_a_resync_get_ids_of_their_own(
    receiver: FakeWebhookReceiver, destination: WebhookDestination
) -> None:
    sent = deliver(destination, intent("7"))["7"]
    link = LinkState(external_id="auth0|1", properties_hash=sent.properties_hash)
    resync = deliver(destination, intent("7", link=link, force=True))["7"]
    deliver(destination, intent("8", message_id="msg_8.2 x"))
    assert resync.verdict is Verdict.SUCCEEDED and resync.reason is None
    first, again, named = receiver.message_ids()
    assert first == "msg_7" and again.startswith("msg_7_r")
    assert named == "msg_8_2_x"  # no full stop: it delimits the signed content


# Answers


TRANSIENT = Verdict.RETRY
PERMANENT = Verdict.FAILED
DESTINATION_WIDE = Verdict.PAUSE


@pytest.mark.parametrize(
    ("answer", "verdict", "reason", "counts"),
    [
        pytest.param({"status": 200}, Verdict.SUCCEEDED, None, True, id="200"),
        pytest.param({"status": 204}, Verdict.SUCCEEDED, None, True, id="204"),
        pytest.param({"status": 401}, DESTINATION_WIDE, "signature_refused", False, id="401"),
        pytest.param({"status": 403}, DESTINATION_WIDE, "signature_refused", False, id="403"),
        pytest.param({"status": 410}, DESTINATION_WIDE, "endpoint_gone", False, id="410"),
        pytest.param(
            {"status": 301, "location": "https://new.example.com/hook"},
            DESTINATION_WIDE,
            "redirected",
            False,
            id="301",
        ),
        pytest.param(
            {"status": 307, "location": "https://new.example.com/hook"},
            DESTINATION_WIDE,
            "redirected",
            False,
            id="307",
        ),
        pytest.param({"status": 408}, TRANSIENT, "receiver_timeout", True, id="408"),
        pytest.param({"status": 429, "retry_after": 7}, TRANSIENT, "rate_limited", False, id="429"),
        pytest.param({"status": 500}, TRANSIENT, "server_error", True, id="500"),
        pytest.param({"status": 502}, TRANSIENT, "server_error", True, id="502"),
        pytest.param({"status": 503, "retry_after": 3}, TRANSIENT, "server_error", True, id="503"),
        pytest.param({"hang": True}, TRANSIENT, "timeout", True, id="timeout"),
        pytest.param(
            {"status": 400, "body": "bad email jane.doe@example.com"},
            PERMANENT,
            "rejected",
            True,
            id="400",
        ),
        pytest.param({"status": 404}, PERMANENT, "rejected", True, id="404"),
        pytest.param({"status": 422}, PERMANENT, "rejected", True, id="422"),
    ],
)
def test_every_answer_maps_to_its_verdict(
    receiver: FakeWebhookReceiver,
    destination: WebhookDestination,
    answer: dict[str, Any],
    verdict: Verdict,
    reason: str | None,
    counts: bool,
) -> None:
    if answer.pop("hang", False):
        receiver.hang_next(1)
    elif answer["status"] != 200:
        receiver.answer_next(1, **answer)
    started = time.monotonic()
    outcome = deliver(destination, intent())["1"]
    assert time.monotonic() - started < TIMEOUT + CONNECT_TIMEOUT + 0.5
    assert (outcome.verdict, outcome.reason, outcome.counts_against_budget) == (
        verdict,
        reason,
        counts,
    )
    [call] = outcome.calls
    assert call.request == "POST /webhooks/idsync webhook-id=msg_1"
    assert call.status == answer.get("status")
    if verdict is Verdict.SUCCEEDED:
        assert outcome.external_id is None  # no remote record, so the link keeps none
        assert call.error_category is None
        return
    assert outcome.status_code == answer.get("status")
    assert outcome.uncertain is (reason == "timeout")  # sent, answer never came
    assert "retry_after" not in answer or outcome.retry_after == answer["retry_after"]
    if "location" in answer:
        assert answer["location"] in (outcome.message or "")
    if reason == "endpoint_gone":
        assert "endpoint gone" in (outcome.message or "")
    if "body" in answer:
        assert "j***@example.com" in (outcome.message or "")
        assert "jane.doe" not in (call.response_excerpt or "") + (outcome.message or "")


def test_a_refused_connection_is_retried_and_certainly_not_delivered(make: Any) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    outcome = deliver(make(url=f"http://127.0.0.1:{port}/hook"), intent())["1"]
    assert (outcome.verdict, outcome.reason, outcome.uncertain) == (
        Verdict.RETRY,
        "connection_error",
        False,
    )
    assert outcome.calls[0].error_category == "CONNECTION_ERROR"


def test_a_429_holds_back_the_batch_and_the_shared_limiter(
    receiver: FakeWebhookReceiver, make: Any
) -> None:
    limiter = LocalRateLimiter(limit=1000, window=1.0)
    destination = make(limiter, parallel_requests=1)
    receiver.answer_next(1, 429, retry_after=30)
    outcomes = deliver(destination, *(intent(str(key)) for key in range(4)))
    assert len(receiver.requests_log) == 1
    assert {o.verdict for o in outcomes.values()} == {Verdict.RETRY}
    assert all(not o.counts_against_budget and o.retry_after == 30 for o in outcomes.values())
    assert not limiter.wait_for_capacity(timeout=0)  # every worker waits the 30 s out


def test_a_pause_stops_the_sends_not_yet_started(receiver: FakeWebhookReceiver, make: Any) -> None:
    receiver.answer_next(10, 410)
    outcomes = deliver(make(parallel_requests=2), *(intent(str(key)) for key in range(10)))
    assert {o.verdict for o in outcomes.values()} == {Verdict.PAUSE}
    assert len(receiver.requests_log) <= 2
    assert sum(len(o.calls) for o in outcomes.values()) == len(receiver.requests_log)


# Deadlines and concurrency


def test_nothing_is_sent_after_the_deadline(
    receiver: FakeWebhookReceiver, destination: WebhookDestination
) -> None:
    outcomes = deliver(destination, intent("1"), intent("2"), within=-0.1)
    assert receiver.requests_log == []
    assert all(o.reason == "batch_deadline" for o in outcomes.values())
    assert all(not o.counts_against_budget and not o.calls for o in outcomes.values())


def test_no_send_starts_after_the_deadline_while_waiting_for_the_limiter(
    receiver: FakeWebhookReceiver, make: Any
) -> None:
    destination = make(LocalRateLimiter(limit=2, window=60.0))
    deadline = time.monotonic() + 0.5
    outcomes = destination.deliver(
        [intent(str(key)) for key in range(5)], claim=never_claimed, deadline=deadline
    )
    verdicts = sorted(o.verdict.value for o in outcomes.values())
    assert verdicts == ["retry", "retry", "retry", "succeeded", "succeeded"]
    assert len(receiver.requests_log) == 2
    assert all(entry.arrived <= deadline for entry in receiver.requests_log)
    waiting = [o for o in outcomes.values() if o.verdict is Verdict.RETRY]
    assert all(not o.counts_against_budget and not o.calls for o in waiting)


def test_a_batch_is_sent_concurrently(receiver: FakeWebhookReceiver, make: Any) -> None:
    receiver.slow_next(8, 0.4)
    destination = make(timeout_seconds=2.0)
    started = time.monotonic()
    outcomes = deliver(destination, *(intent(str(key)) for key in range(8)))
    assert time.monotonic() - started < 1.5  # 8 x 0.4 s one after the other
    assert {o.verdict for o in outcomes.values()} == {Verdict.SUCCEEDED}
    assert len(receiver.messages()) == 8


def test_one_batch_after_another_reuses_the_kept_alive_connections(
    receiver: FakeWebhookReceiver, make: Any
) -> None:
    destination = make(parallel_requests=2)
    for batch in range(3):
        outcomes = deliver(destination, *(intent(f"{batch}_{key}") for key in range(6)))
        assert {o.verdict for o in outcomes.values()} == {Verdict.SUCCEEDED}
    assert len(receiver.messages()) == 18
    assert receiver.connections_opened <= 2


# Payload


def test_an_unchanged_user_is_not_sent_again(
    receiver: FakeWebhookReceiver, destination: WebhookDestination
) -> None:
    sent = deliver(destination, intent("1", event_id="evt_1"))["1"]
    link = LinkState(external_id="auth0|1", properties_hash=sent.properties_hash)
    again = deliver(destination, intent("2", link=link, event_id="evt_2"))["2"]
    assert (again.verdict, again.reason, again.calls) == (Verdict.SUCCEEDED, "unchanged", [])
    assert again.properties_hash == sent.properties_hash
    changed = intent("3", user(given_name="Janet"), link=link)
    blocked = intent("4", user(blocked=True), link=link)
    outcomes = deliver(destination, changed, blocked)
    assert [o.reason for o in outcomes.values()] == [None, None]
    assert sorted(receiver.message_ids()) == ["msg_1", "msg_3", "msg_4"]  # sent concurrently


def test_an_unchanged_user_is_sent_while_another_message_may_still_land(
    receiver: FakeWebhookReceiver, destination: WebhookDestination
) -> None:
    sent = deliver(destination, intent("1"))["1"]
    # A later state went out and its answer never came; now the user is back to the first.
    link = LinkState(external_id="auth0|1", properties_hash=sent.properties_hash, uncertain=True)
    again = deliver(destination, intent("3", link=link))["3"]
    assert (again.verdict, again.reason, len(again.calls)) == (Verdict.SUCCEEDED, None, 1)
    assert receiver.message_ids() == ["msg_1", "msg_3"]


@pytest.mark.parametrize(
    ("fixture", "kind"),
    [
        ("user_created.json", "user.upserted"),
        ("user_updated.json", "user.upserted"),
        ("user_deleted.json", "user.deleted"),
        ("user_deleted_minimal.json", "user.deleted"),
    ],
)
def test_auth0_events_become_messages_the_schema_describes(
    receiver: FakeWebhookReceiver, destination: WebhookDestination, fixture: str, kind: str
) -> None:
    event = json.loads((AUTH0 / fixture).read_text())
    state = UserState.from_event(event["type"], event)
    pending = intent(
        "1", state, event_id=event["id"], source=event["source"], event_time=event["time"]
    )
    assert deliver(destination, pending)["1"].verdict is Verdict.SUCCEEDED
    [message] = receiver.messages()
    validator().validate(message)
    data = message["data"]
    assert message["type"] == kind
    assert message["timestamp"] == event["time"].replace("Z", ".000Z")
    assert (data["event_id"], data["source"]) == (event["id"], event["source"])
    assert data["user_id"] == event["data"]["object"]["user_id"]
    assert set(data["profile"]) == {
        "email",
        "given_name",
        "family_name",
        "name",
        "phone_number",
        "blocked",
    }


def test_a_blocked_user_is_deprovisioned_and_fields_keep_their_json_type(
    receiver: FakeWebhookReceiver, make: Any, tmp_path: Path
) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(
        json.dumps(
            {
                "email": "email",
                "blocked": "blocked",
                "app_metadata.plan": "plan",
                "app_metadata.seats": "seats",
                "app_metadata.roles": "roles",
                "nickname": "nickname",
            }
        )
    )
    destination = make(property_map=str(mapping))
    metadata = {"plan": "pro", "seats": 12, "roles": ["admin"]}
    state = user(blocked=True, app_metadata=metadata)
    outcome = deliver(destination, intent("1", state))["1"]
    assert (outcome.verdict, outcome.deprovisioned) == (Verdict.SUCCEEDED, True)
    [message] = receiver.messages()
    validator().validate(message)
    assert message["type"] == "user.deprovisioned"
    assert message["timestamp"] == "2025-02-01T12:34:56.789Z"  # the profile's updated_at
    assert message["data"]["deprovisioned"] is True
    assert message["data"]["email"] == "jane.doe@example.com"
    assert message["data"]["event_id"] is None and message["data"]["source"] is None
    assert message["data"]["profile"] == {
        "email": "Jane.Doe@Example.com",
        "blocked": True,
        "plan": "pro",
        "seats": 12,
        "roles": ["admin"],
        "nickname": None,
    }


def test_the_schema_refuses_what_idsync_never_sends() -> None:
    good = {
        "type": "user.upserted",
        "timestamp": "2025-02-01T12:34:56.000Z",
        "data": {
            "user_id": "auth0|1",
            "email": None,
            "previous_email": None,
            "deprovisioned": False,
            "event_id": None,
            "source": None,
            "profile": {},
        },
    }
    validator().validate(good)
    bad = [
        good | {"type": "user.created"},
        good | {"timestamp": "yesterday"},
        good | {"data": good["data"] | {"deprovisioned": True}},
        good | {"data": {k: v for k, v in good["data"].items() if k != "user_id"}},
        good | {"extra": 1},
    ]
    for message in bad:
        assert not validator().is_valid(message), message


# Probe


def test_the_probe_sends_a_signed_ping(
    receiver: FakeWebhookReceiver, destination: WebhookDestination
) -> None:
    assert destination.probe() is None
    [ping] = receiver.messages()
    validator().validate(ping)
    assert ping["type"] == "idsync.ping" and ping["data"] == {}


@pytest.mark.parametrize(
    ("status", "words"),
    [(401, "LICENSES_SECRET"), (410, "endpoint gone"), (500, "HTTP 500"), (302, "redirects")],
)
def test_the_probe_says_why_the_endpoint_refuses(
    receiver: FakeWebhookReceiver, destination: WebhookDestination, status: int, words: str
) -> None:
    receiver.answer_next(1, status, location="https://elsewhere.example.com/")
    reason = destination.probe()
    assert reason is not None and words in reason


def test_the_probe_of_an_unreachable_endpoint_says_so(make: Any) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    reason = make(url=f"http://127.0.0.1:{port}/hook").probe()
    assert reason is not None and "no answer" in reason


# Settings


def test_settings_come_from_the_destinations_own_variables(tmp_path: Path) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text('{"email": "mail"}')
    environ = {
        "LICENSES_URL": "https://hooks.example.com/idsync",
        "LICENSES_SECRET": f"{NEW_SECRET}, {OLD_SECRET}",
        "LICENSES_RATE_LIMIT": "10/1s",
        "LICENSES_TIMEOUT_SECONDS": "20",
        "LICENSES_PROPERTY_MAP": str(mapping),
        "LICENSES_BATCH_SIZE": "25",
        "BILLING_URL": "https://other.example.com/",
    }
    settings = WebhookSettings.from_env("licenses", environ)
    assert settings.secrets == (NEW_SECRET, OLD_SECRET)
    assert (settings.rate, settings.timeout_seconds, settings.batch_size) == ((10, 1.0), 20.0, 25)
    assert settings.call_seconds == pytest.approx(23.05)
    assert settings.mapping() == {"email": "mail"}
    assert NEW_SECRET not in repr(settings)
    defaults = WebhookSettings(url="http://127.0.0.1:9/", secrets=NEW_SECRET)
    assert (defaults.rate, defaults.timeout_seconds, defaults.batch_size) == ((50, 1.0), 15.0, 50)
    assert set(defaults.mapping().values()) == {
        "email",
        "given_name",
        "family_name",
        "name",
        "phone_number",
        "blocked",
    }


def test_missing_says_what_a_destination_lacks() -> None:
    assert missing("licenses", {}) == "LICENSES_URL is not set"
    assert missing("licenses", {"LICENSES_URL": "https://x.example.com"}) == (
        "LICENSES_SECRET is not set"
    )
    both = {"LICENSES_URL": "https://x.example.com", "LICENSES_SECRET": NEW_SECRET}
    assert missing("licenses", both) is None
    with pytest.raises(WebhookSettingsError, match="LICENSES_SECRET is not set"):
        WebhookSettings.from_env("licenses", {"LICENSES_URL": "https://x.example.com"})


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("LICENSES_URL", "http://hooks.example.com/", "https://"),
        ("LICENSES_URL", "ftp://hooks.example.com/", "https://"),
        ("LICENSES_SECRET", "not-a-whsec", "whsec_"),
        ("LICENSES_SECRET", "whsec_!!!!", "base64"),
        ("LICENSES_SECRET", "whsec_" + base64.b64encode(b"short").decode(), "24 to 64"),
        ("LICENSES_RATE_LIMIT", "fast", "rate limit"),
        ("LICENSES_TIMEOUT_SECONDS", "0", "greater than 0"),
        ("LICENSES_BATCH_SIZE", "0", "greater than or equal to 1"),
        ("LICENSES_PROPERTY_MAP", "/nonexistent/map.json", "not a readable JSON file"),
    ],
)
def test_a_wrong_variable_is_named_in_the_error(variable: str, value: str, words: str) -> None:
    environ = {"LICENSES_URL": "https://hooks.example.com/", "LICENSES_SECRET": NEW_SECRET}
    with pytest.raises(WebhookSettingsError) as error:
        WebhookSettings.from_env("licenses", environ | {variable: value})
    assert f"{variable}:" in str(error.value)
    assert words in str(error.value)
    if variable == "LICENSES_SECRET":
        assert value not in str(error.value)


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/h", "http://127.5.6.7/h", "http://localhost/h", "http://[::1]/h"]
)
def test_plain_http_is_allowed_on_loopback_only(url: str) -> None:
    assert WebhookSettings(url=url, secrets=NEW_SECRET).url == url


# The registry of kinds


def test_the_registry_reads_a_webhook_destination_and_builds_its_adapter(
    receiver: FakeWebhookReceiver,
) -> None:
    settings = Settings(
        destinations="hubspot,licenses",
        destination_env={
            "LICENSES_KIND": "webhook",
            "LICENSES_URL": receiver.url,
            "LICENSES_SECRET": f"{NEW_SECRET},{OLD_SECRET}",
            "LICENSES_CONCURRENCY": "2",
        },
    )
    config = settings.destination("licenses")
    assert isinstance(config, Config)
    assert (config.kind, config.rate, config.batch_size, config.concurrency) == (
        "webhook",
        (50, 1.0),
        50,
        2,
    )
    assert config.call_seconds == pytest.approx(18.05)
    assert config.missing() is None
    assert NEW_SECRET in settings.secrets and NEW_SECRET not in repr(config)
    destination = build_adapter(config, settings, LocalRateLimiter(limit=10, window=1.0))
    try:
        assert isinstance(destination, WebhookDestination)
        assert (destination.name, destination.clears_with) == ("licenses", None)
        assert destination.read(["auth0|1"]) is None
        assert deliver(destination, intent())["1"].verdict is Verdict.SUCCEEDED
    finally:
        destination.close()
    assert receiver.message_ids() == ["msg_1"]


def test_an_incomplete_destination_says_what_it_lacks_without_loading_the_adapter() -> None:
    script = """
import sys
from idsync.settings import Settings
for env in ({"LICENSES_SECRET": sys.argv[1]}, {"LICENSES_URL": "https://hooks.example.com/"}):
    env["LICENSES_KIND"] = "webhook"
    print(Settings(destinations="licenses", destination_env=env).destination("licenses").missing())
print("workers.destinations.webhook.adapter" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", script, NEW_SECRET],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert result.stdout.splitlines() == [
        "LICENSES_URL is not set",
        "LICENSES_SECRET is not set",
        "False",
    ]


def test_two_tenants_users_with_one_user_id_both_reach_the_receiver(
    settings: Settings, sessions: Any, hubspot: FakeHubSpot, receiver: FakeWebhookReceiver
) -> None:
    """A receiver tells users apart by (source, user_id): the link keeps no record id."""
    configured = settings.model_copy(
        update={
            "destinations": ("licenses",),
            "ingest_allowed_sources": (),
            "destination_env": {
                "LICENSES_KIND": "webhook",
                "LICENSES_URL": receiver.url,
                "LICENSES_SECRET": NEW_SECRET,
                "LICENSES_TIMEOUT_SECONDS": str(TIMEOUT),
                "LICENSES_CONNECT_TIMEOUT_SECONDS": str(CONNECT_TIMEOUT),
            },
        }
    )
    pipeline = Pipeline(configured, sessions, hubspot)
    adapter = WebhookDestination(
        "licenses",
        make_settings(receiver.url),
        LocalRateLimiter(limit=1000, window=1.0),
    )
    try:
        for tenant in ("a", "b"):
            event = auth0_event(
                "user.created",
                "auth0|same",
                email=f"same@{tenant}.example.com",
                source=f"urn:auth0:{tenant}.example.com",
            )
            assert pipeline.post(event).status_code == 202
        pipeline.drain_with(adapter)
        assert pipeline.deliveries() == [("succeeded", None), ("succeeded", None)]
    finally:
        adapter.close()
        pipeline.close()
    sources = sorted(message["data"]["source"] for message in receiver.messages())
    assert sources == ["urn:auth0:a.example.com", "urn:auth0:b.example.com"]
