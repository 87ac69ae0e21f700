"""The Management API client against the fake Auth0: token cache, 429 waits, every call."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from idsync.auth0.client import Auth0Error, ManagementClient, missing_auth0, rfc3339
from idsync.fakes.auth0 import FakeAuth0, generated_user
from idsync.settings import Settings
from tests.events import auth0_event

START = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
END = datetime(2026, 12, 1, 13, 0, 0, tzinfo=UTC)


@pytest.fixture
def fake() -> Iterator[FakeAuth0]:
    # No webhook: every emitted event fails at once and stays failed.
    with FakeAuth0(attempts=1) as server:
        yield server


def client_of(fake: FakeAuth0, **overrides: object) -> ManagementClient:
    settings = Settings(
        auth0_domain=fake.domain,
        auth0_client_id=fake.client_id,
        auth0_client_secret=fake.client_secret,
        auth0_event_stream_id=fake.stream_id,
        auth0_mgmt_base_url=fake.url,
    )
    client = ManagementClient.from_settings(settings)
    assert client is not None
    for name, value in overrides.items():
        setattr(client, name, value)
    return client


def test_missing_settings_switch_the_client_off_with_the_names() -> None:
    assert missing_auth0(Settings()) == (
        "AUTH0_DOMAIN, AUTH0_CLIENT_ID, AUTH0_CLIENT_SECRET, AUTH0_EVENT_STREAM_ID are not set"
    )
    partial = Settings(auth0_domain="t.eu.auth0.com", auth0_client_id="c", auth0_client_secret="s")
    assert missing_auth0(partial) == "AUTH0_EVENT_STREAM_ID is not set"
    assert missing_auth0(partial, stream=False) is None
    assert ManagementClient.from_settings(partial) is None
    assert ManagementClient.from_settings(partial, stream=False) is not None


def test_base_url_defaults_to_the_domain_and_must_be_https_off_loopback() -> None:
    assert Settings(auth0_domain="t.eu.auth0.com").auth0_base_url == "https://t.eu.auth0.com"
    assert Settings(auth0_domain="t.eu.auth0.com").auth0_source == "urn:auth0:t.eu.auth0.com"
    with pytest.raises(ValidationError, match="AUTH0_MGMT_BASE_URL must use https"):
        Settings(auth0_mgmt_base_url="http://auth0.example.com")
    assert Settings(auth0_mgmt_base_url="http://127.0.0.1:9/").auth0_mgmt_base_url == (
        "http://127.0.0.1:9"
    )


def test_the_token_is_cached_and_renewed_when_auth0_stops_taking_it(fake: FakeAuth0) -> None:
    client = client_of(fake)
    for _ in range(5):
        assert client.get_stream()["status"] == "enabled"
    assert fake.token_requests == 1
    fake.expire_tokens()
    assert client.get_stream()["id"] == fake.stream_id
    assert fake.token_requests == 2


def test_a_token_is_renewed_shortly_before_it_expires(fake: FakeAuth0) -> None:
    fake.token_expires_in = 0.5  # renewed a tenth of its life early: after 0.45 s
    client = client_of(fake)
    client.get_stream()
    time.sleep(0.5)
    client.get_stream()
    assert fake.token_requests == 2
    # Renewed before the fake would refuse it: no call met a 401.
    assert [status for _, _, status in fake.requests_log if status == 401] == []


def test_bad_credentials_say_which_settings_to_check(fake: FakeAuth0) -> None:
    client = client_of(fake, _client_secret="wrong")
    with pytest.raises(
        Auth0Error, match="check AUTH0_DOMAIN, AUTH0_CLIENT_ID and AUTH0_CLIENT_SECRET"
    ):
        client.get_stream()


def test_a_429_waits_for_the_reset_then_succeeds(fake: FakeAuth0) -> None:
    waits: list[float] = []
    client = client_of(fake, _sleep=waits.append)
    client.get_stream()
    fake.rate_limit_next(2)
    assert client.get_stream()["status"] == "enabled"
    # The reset is whole Unix seconds after a one-second window: at most two seconds away.
    assert len(waits) == 2 and all(0 < wait <= 2.05 for wait in waits)


def test_a_429_that_lasts_is_an_error_not_a_hang(fake: FakeAuth0) -> None:
    client = client_of(fake, _sleep=lambda _: None, max_rate_wait=3.0)
    client.get_stream()
    fake.rate_limit_next(1000)
    with pytest.raises(Auth0Error, match="stayed rate limited") as raised:
        client.get_stream()
    assert raised.value.status == 429


def test_failed_deliveries_redeliver_and_enable(fake: FakeAuth0) -> None:
    sent = [
        auth0_event("user.created", f"auth0|c{n}", at=START.replace(second=n)) for n in range(3)
    ]
    fake.emit(sent)
    client = client_of(fake)
    page = client.list_failed_deliveries(START, END, take=2)
    assert [d["id"] for d in page] == [e["id"] for e in sent[:2]]
    rest = client.list_failed_deliveries(START, END, take=2, from_=page[-1]["id"])
    assert rest[-1]["id"] == sent[2]["id"]
    assert json.loads(page[0]["event"]["data"]) == sent[0]["data"]
    with pytest.raises(ValueError, match="whole seconds"):
        client.list_failed_deliveries(START.replace(microsecond=5), END)
    assert client.redeliver(START, END) is True
    fake.failed[sent[0]["id"]].redelivering = True
    fake.emit([auth0_event("user.created", "auth0|late", at=START.replace(second=30))])
    assert client.redeliver(START, END) is False  # 409: not in a state that allows redelivery
    fake.status = "disabled"
    assert client.enable_stream()["status"] == "enabled"


def test_users_and_exports(fake: FakeAuth0) -> None:
    fake.add_users([generated_user(1), {"user_id": "samlp|acme|x", "email": "x@acme.test"}])
    fake.export_gzip, fake.job_seconds = True, 0.2
    client = client_of(fake)
    assert client.get_user("samlp|acme|x") == {"user_id": "samlp|acme|x", "email": "x@acme.test"}
    assert client.get_user("auth0|nobody") is None
    job_id = client.start_users_export(["user_id", "email"], connection_id=None)
    deadline = time.monotonic() + 5
    while (job := client.get_job(job_id))["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    data = b"".join(client.download(job["location"]))
    lines = gzip.decompress(data).splitlines()
    assert [json.loads(line)["user_id"] for line in lines] == ["auth0|gen0000001", "samlp|acme|x"]
    with pytest.raises(Auth0Error, match="the link lasts 60 seconds"):
        b"".join(client.download(job["location"].split("?")[0] + "?expires=1"))


def test_rfc3339_is_whole_seconds_in_utc() -> None:
    assert rfc3339(START) == "2026-12-01T12:00:00Z"
