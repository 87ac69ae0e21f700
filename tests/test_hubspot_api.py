"""The HubSpot contacts client, against the fake HubSpot and (for what it cannot do) `responses`."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import responses

from idsync.fakes.hubspot import FakeHubSpot
from workers.destinations.hubspot.client import (
    CallRecord,
    HubSpotAuthError,
    HubSpotBadRequest,
    HubSpotClient,
    HubSpotConflict,
    HubSpotError,
    HubSpotNotFound,
    HubSpotRateLimited,
    HubSpotServerError,
    HubSpotTransportError,
    RateLimitInfo,
)

TOKEN = "pat-na1-00000000-secret-token"
MOCK_URL = "https://api.hubapi.test"
CONTACTS = "/crm/v3/objects/contacts"

Calls = list[tuple[CallRecord, RateLimitInfo | None]]


@pytest.fixture
def fake() -> Iterator[FakeHubSpot]:
    with FakeHubSpot(token=TOKEN) as server:
        yield server


@pytest.fixture
def calls() -> Calls:
    return []


@pytest.fixture
def client(fake: FakeHubSpot, calls: Calls) -> Iterator[HubSpotClient]:
    with HubSpotClient(fake.url + "/", TOKEN, on_call=lambda *call: calls.append(call)) as api:
        yield api


@pytest.fixture
def mocked(calls: Calls) -> Iterator[tuple[HubSpotClient, responses.RequestsMock]]:
    with (
        responses.RequestsMock() as mock,
        HubSpotClient(MOCK_URL, TOKEN, on_call=lambda *call: calls.append(call)) as api,
    ):
        yield api, mock


def test_single_contact_round_trip(client: HubSpotClient) -> None:
    created = client.create_contact({"email": "Ada+crm@Example.com", "firstname": "Ada"})
    contact_id = created["id"]
    assert client.get_contact(contact_id)["properties"]["firstname"] == "Ada"
    by_email = client.get_contact_by_email("ada+crm@example.com", ["firstname", "phone"])
    assert by_email is not None
    assert by_email["id"] == contact_id
    assert by_email["properties"]["phone"] is None
    updated = client.update_contact(contact_id, {"firstname": "", "lastname": "Lovelace"})
    assert updated["properties"]["lastname"] == "Lovelace"
    assert updated["properties"].get("firstname") is None
    client.archive_contact(contact_id)
    assert client.get_contact(contact_id) is None
    assert client.get_contact_by_email("ada+crm@example.com") is None
    client.archive_contact(contact_id)  # archiving twice is fine


def test_merged_id_answers_with_the_survivor(client: HubSpotClient, fake: FakeHubSpot) -> None:
    old = client.create_contact({"email": "old@example.com"})["id"]
    survivor = client.create_contact({"email": "new@example.com"})["id"]
    fake.merge(old, survivor)
    assert client.update_contact(old, {"firstname": "S"})["id"] == survivor


def test_batch_upsert_maps_results_and_partial_errors_by_trace_id(
    client: HubSpotClient, fake: FakeHubSpot
) -> None:
    existing = client.create_contact({"email": "ada@example.com"})["id"]
    outcome = client.batch_upsert_by_email(
        [
            ("t-ada", "ADA@example.com", {"firstname": "Ada"}),
            ("t-bob", "bob@example.com", {"firstname": "Bob"}),
            ("t-bad", "not-an-email", {"firstname": "X"}),
        ]
    )
    assert set(outcome.results) == {"t-ada", "t-bob"}
    assert outcome.results["t-ada"]["id"] == existing
    assert outcome.results["t-ada"]["new"] is False
    assert outcome.results["t-bob"]["new"] is True
    error = outcome.errors["t-bad"]
    assert isinstance(error, HubSpotBadRequest)
    assert "INVALID_EMAIL" in error.message
    assert fake.contact_by_email("bob@example.com") is not None


def test_batch_update_maps_not_found_and_conflict(client: HubSpotClient) -> None:
    ada = client.create_contact({"email": "ada@example.com"})["id"]
    bob = client.create_contact({"email": "bob@example.com"})["id"]
    outcome = client.batch_update(
        [
            ("ok", ada, {"firstname": "Ada"}),
            ("gone", "999", {"firstname": "X"}),
            ("taken", bob, {"email": "ada@example.com"}),
        ]
    )
    assert outcome.results["ok"]["properties"]["firstname"] == "Ada"
    assert isinstance(outcome.errors["gone"], HubSpotNotFound)
    conflict = outcome.errors["taken"]
    assert isinstance(conflict, HubSpotConflict)
    assert conflict.existing_id == ada


def test_batch_read_and_archive(client: HubSpotClient, fake: FakeHubSpot) -> None:
    ids = [client.create_contact({"email": f"u{n}@example.com"})["id"] for n in range(3)]
    found = client.batch_read_by_email(["U0@example.com", "u1@example.com", "nobody@example.com"])
    assert {email: contact["id"] for email, contact in found.items()} == {
        "u0@example.com": ids[0],
        "u1@example.com": ids[1],
    }
    client.batch_archive([*ids, "424242"])
    assert fake.contacts() == []


@pytest.mark.parametrize(
    ("method", "inputs"),
    [
        ("batch_upsert_by_email", [(f"t{n}", f"u{n}@example.com", {}) for n in range(101)]),
        ("batch_update", [(f"t{n}", str(n), {}) for n in range(101)]),
        ("batch_read_by_email", [f"u{n}@example.com" for n in range(101)]),
        ("batch_archive", [str(n) for n in range(101)]),
        ("batch_update", [("same", "1", {}), ("same", "2", {})]),
    ],
)
def test_oversized_or_ambiguous_batches_are_refused_before_sending(
    client: HubSpotClient, calls: Calls, method: str, inputs: list[Any]
) -> None:
    with pytest.raises(ValueError, match=r"at most 100|own trace id"):
        getattr(client, method)(inputs)
    assert calls == []


def test_empty_batches_make_no_call(client: HubSpotClient, calls: Calls) -> None:
    assert client.batch_upsert_by_email([]).results == {}
    assert client.batch_update([]).errors == {}
    assert client.batch_read_by_email([]) == {}
    client.batch_archive([])
    assert calls == []


def _invalid_email(client: HubSpotClient, fake: FakeHubSpot) -> None:
    client.create_contact({"email": "not-an-email"})


def _missing_property(client: HubSpotClient, fake: FakeHubSpot) -> None:
    client.create_contact({"email": "ada@example.com", "favourite_colour": "blue"})


def _wrong_token(client: HubSpotClient, fake: FakeHubSpot) -> None:
    fake.set_token("rotated")
    client.get_contact("101")


def _unknown_id(client: HubSpotClient, fake: FakeHubSpot) -> None:
    client.update_contact("999", {"firstname": "X"})


def _duplicate(client: HubSpotClient, fake: FakeHubSpot) -> None:
    fake.seed_contact({"email": "ada@example.com"})
    client.create_contact({"email": "ada@example.com"})


def _rolling_limit(client: HubSpotClient, fake: FakeHubSpot) -> None:
    contact_id = fake.seed_contact({"email": "ada@example.com"})
    fake.set_rate_limit(2, 10)
    for _ in range(3):
        client.get_contact(contact_id)


def _injected(status: int, category: str | None = None) -> Callable[..., None]:
    def call(client: HubSpotClient, fake: FakeHubSpot) -> None:
        fake.fail_next(1, status, category)
        client.create_contact({"email": "ada@example.com"})

    call.__name__ = f"injected_{status}_{category or ''}".rstrip("_")
    return call


def _daily_limit(client: HubSpotClient, fake: FakeHubSpot) -> None:
    fake.rate_limit_next(1, policy="DAILY")
    client.get_contact("101")


@pytest.mark.parametrize(
    ("call", "error_type", "status", "expected"),
    [
        (_invalid_email, HubSpotBadRequest, 400, {"missing_property": False}),
        (_missing_property, HubSpotBadRequest, 400, {"missing_property": True}),
        (_wrong_token, HubSpotAuthError, 401, {"category": "INVALID_AUTHENTICATION"}),
        (_injected(403), HubSpotAuthError, 403, {"category": "MISSING_SCOPES"}),
        (_unknown_id, HubSpotNotFound, 404, {"category": "OBJECT_NOT_FOUND"}),
        (_duplicate, HubSpotConflict, 409, {"existing_id": "101"}),
        (_rolling_limit, HubSpotRateLimited, 429, {"policy_name": "TEN_SECONDLY_ROLLING"}),
        (_daily_limit, HubSpotRateLimited, 429, {"policy_name": "DAILY", "retry_after": None}),
        (_injected(500), HubSpotServerError, 500, {}),
        (_injected(503), HubSpotServerError, 503, {}),
        (_injected(423), HubSpotServerError, 423, {"category": "LOCKED"}),
        (_injected(500, "RATE_LIMITS"), HubSpotRateLimited, 500, {"category": "RATE_LIMITS"}),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_error_answers_raise_typed_errors(
    client: HubSpotClient,
    fake: FakeHubSpot,
    calls: Calls,
    call: Any,
    error_type: type[HubSpotError],
    status: int,
    expected: dict[str, Any],
) -> None:
    with pytest.raises(error_type) as caught:
        call(client, fake)
    error = caught.value
    assert error.status == status
    assert error.correlation_id
    for name, value in expected.items():
        assert getattr(error, name) == value
    record, ratelimit = calls[-1]
    assert record.status == status
    assert record.correlation_id == error.correlation_id
    assert record.error_category
    assert record.response_excerpt
    assert ratelimit is not None


def test_on_call_reports_each_call_with_rate_limit_info(
    client: HubSpotClient, fake: FakeHubSpot, calls: Calls
) -> None:
    client.create_contact({"email": "ada@example.com"})
    client.get_contact_by_email("ada@example.com")
    with pytest.raises(HubSpotNotFound):
        client.update_contact("999", {"firstname": "X"})
    records = [record for record, _ in calls]
    assert [(r.method, r.status) for r in records] == [("POST", 201), ("GET", 200), ("PATCH", 404)]
    assert records[0].path == CONTACTS
    assert records[1].path == f"{CONTACTS}/a***@example.com?idProperty=email"
    assert all(r.duration_ms > 0 for r in records)
    assert records[0].response_excerpt is None and records[0].error_category is None
    assert records[2].error_category == "OBJECT_NOT_FOUND"
    assert calls[0][1] == RateLimitInfo(
        max=100, remaining=99, interval_ms=10000, daily=250000, daily_remaining=249999
    )
    assert calls[2][1] is not None and calls[2][1].remaining == 97


def test_the_token_never_shows(client: HubSpotClient, fake: FakeHubSpot, calls: Calls) -> None:
    errors: list[HubSpotError] = []
    for action in (_duplicate, _invalid_email, _unknown_id, _injected(500), _wrong_token):
        with pytest.raises(HubSpotError) as caught:
            action(client, fake)
        errors.append(caught.value)
    texts = [
        repr(client),
        *map(repr, calls),
        *map(str, errors),
        *map(repr, errors),
        *(repr(error.__dict__) for error in errors),
    ]
    assert calls and all(TOKEN not in text for text in texts)


def test_a_slow_answer_is_a_transport_error(fake: FakeHubSpot, calls: Calls) -> None:
    fake.slow_next(1, 2.0)
    api = HubSpotClient(fake.url, TOKEN, timeout=(1.0, 0.1), on_call=lambda *c: calls.append(c))
    with api, pytest.raises(HubSpotTransportError) as caught:
        api.get_contact("101")
    assert caught.value.status is None
    assert caught.value.category == "TIMEOUT"
    assert calls[0][0].status is None and calls[0][1] is None


def test_nothing_listening_is_a_transport_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api = HubSpotClient(f"http://127.0.0.1:{port}", TOKEN)
    with api, pytest.raises(HubSpotTransportError) as caught:
        api.get_contact_by_email("ada@example.com")
    assert caught.value.category == "CONNECTION_ERROR"
    assert "ada@" not in str(caught.value)


# Cases the fake cannot produce, with `responses`.


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), ("0.5", 0.5), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), ("soon", None)],
)
def test_retry_after_is_honoured(mocked: Any, header: str, seconds: float | None) -> None:
    api, mock = mocked
    body = {"status": "error", "errorType": "RATE_LIMIT", "policyName": "SECONDLY"}
    mock.get(f"{MOCK_URL}{CONTACTS}/101", status=429, json=body, headers={"Retry-After": header})
    with pytest.raises(HubSpotRateLimited) as caught:
        api.get_contact("101")
    assert caught.value.retry_after == seconds
    assert caught.value.policy_name == "SECONDLY"


def test_rate_limits_category_on_500_is_rate_limited(mocked: Any) -> None:
    api, mock = mocked
    body = {"status": "error", "category": "RATE_LIMITS", "message": "slow down"}
    mock.post(f"{MOCK_URL}{CONTACTS}", status=500, json=body)
    with pytest.raises(HubSpotRateLimited) as caught:
        api.create_contact({"email": "ada@example.com"})
    assert caught.value.policy_name is None
    assert caught.value.retry_after is None


def test_non_json_error_body_still_gives_a_typed_error(mocked: Any, calls: Calls) -> None:
    api, mock = mocked
    page = "<html>" + "Bad gateway " * 100 + "</html>"
    mock.patch(f"{MOCK_URL}{CONTACTS}/101", status=502, body=page, content_type="text/html")
    with pytest.raises(HubSpotServerError) as caught:
        api.update_contact("101", {"firstname": "Ada"})
    assert caught.value.status == 502
    assert caught.value.category is None
    record = calls[0][0]
    assert record.error_category == "HTTP_502"
    assert record.response_excerpt is not None and len(record.response_excerpt) == 500
    assert calls[0][1] is None


def test_success_without_json_is_a_server_error(mocked: Any) -> None:
    api, mock = mocked
    mock.get(f"{MOCK_URL}{CONTACTS}/101", status=200, body="<html>login</html>")
    with pytest.raises(HubSpotServerError, match="not a JSON object"):
        api.get_contact("101")


@pytest.mark.parametrize(
    ("failure", "category"),
    [
        (requests.ConnectionError("refused"), "CONNECTION_ERROR"),
        (requests.ConnectTimeout("connect timeout"), "TIMEOUT"),
        (requests.ReadTimeout("read timeout"), "TIMEOUT"),
    ],
)
def test_no_answer_is_a_transport_error(
    mocked: Any, calls: Calls, failure: Exception, category: str
) -> None:
    api, mock = mocked
    mock.delete(f"{MOCK_URL}{CONTACTS}/101", body=failure)
    with pytest.raises(HubSpotTransportError) as caught:
        api.archive_contact("101")
    assert (caught.value.status, caught.value.category) == (None, category)
    assert caught.value.__cause__ is None
    record = calls[0][0]
    assert (record.method, record.path, record.status) == ("DELETE", f"{CONTACTS}/101", None)
    assert (record.error_category, record.response_excerpt, calls[0][1]) == (category, None, None)


def test_batch_results_without_trace_ids_map_by_id_and_email(mocked: Any) -> None:
    api, mock = mocked
    contact = {"id": "5", "properties": {"email": "ada@example.com"}}
    mock.post(f"{MOCK_URL}{CONTACTS}/batch/update", json={"results": [contact]})
    mock.post(
        f"{MOCK_URL}{CONTACTS}/batch/upsert",
        status=207,
        json={
            "results": [contact | {"new": False}],
            "errors": [{"status": "error", "category": "VALIDATION_ERROR", "message": "bad"}],
        },
    )
    updated = api.batch_update([("t1", "5", {}), ("t2", "6", {})])
    assert updated.results == {"t1": contact}
    assert updated.errors["t2"].category == "MISSING_RESULT"
    upserted = api.batch_upsert_by_email([("a", "ADA@example.com", {}), ("b", "b@x.com", {})])
    assert upserted.results["a"]["new"] is False
    assert isinstance(upserted.errors["b"], HubSpotBadRequest)
    sent = mock.calls[1].request
    assert sent.url.endswith("/batch/upsert?idProperty=email")
    assert sent.headers["Authorization"] == f"Bearer {TOKEN}"
    assert sent.headers["User-Agent"] == "idsync"
