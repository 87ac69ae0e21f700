"""The fake Salesforce org answers like the documented REST API: shapes, limits and errors."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from idsync.fakes.salesforce import FakeSalesforce, id18

API = "/services/data/v62.0"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeSalesforce]:
    with FakeSalesforce() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeSalesforce) -> FakeSalesforce:
    server.reset()
    return server


def token(fake: FakeSalesforce, **form: str) -> requests.Response:
    body = {
        "grant_type": "client_credentials",
        "client_id": "fake-client-id",
        "client_secret": "fake-client-secret",
    } | form
    return requests.post(f"{fake.url}/services/oauth2/token", data=body, timeout=5)


@pytest.fixture
def api(fake: FakeSalesforce) -> Any:
    answer = token(fake).json()
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {answer['access_token']}"

    def call(method: str, path: str, **kw: Any) -> requests.Response:
        return session.request(method, answer["instance_url"] + API + path, timeout=5, **kw)

    yield call
    session.close()


def upsert(api: Any, *records: dict[str, Any], all_or_none: bool = False) -> requests.Response:
    body = {
        "allOrNone": all_or_none,
        "records": [{"attributes": {"type": "Contact"}} | r for r in records],
    }
    return api("PATCH", "/composite/sobjects/Contact/Auth0_User_Id__c", json=body)


def test_the_token_endpoint_checks_the_client(fake: FakeSalesforce) -> None:
    good = token(fake)
    assert good.status_code == 200
    body = good.json()
    assert body["instance_url"] == fake.url and body["token_type"] == "Bearer"
    assert {"access_token", "id", "issued_at", "signature"} <= set(body)
    bad = token(fake, client_secret="wrong")
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid_client")
    assert "error_description" in bad.json()
    grant = token(fake, grant_type="password")
    assert grant.json()["error"] == "unsupported_grant_type"
    fake.revoke("invalid_grant")
    assert token(fake).json()["error"] == "invalid_grant"
    fake.restore()
    assert token(fake).status_code == 200


def test_an_unknown_or_expired_token_is_invalid_session_id(fake: FakeSalesforce, api: Any) -> None:
    assert api("GET", "/sobjects/Contact/describe").status_code == 200
    fake.expire_tokens()
    expired = api("GET", "/sobjects/Contact/describe")
    assert expired.status_code == 401
    assert expired.json() == [
        {"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID", "fields": []}
    ]


def test_every_api_answer_carries_the_limit_info_header(fake: FakeSalesforce, api: Any) -> None:
    first = api("GET", "/sobjects/Contact/describe")
    second = api("GET", "/sobjects/Nope/describe")
    assert first.headers["Sforce-Limit-Info"] == "api-usage=1/100000"
    assert second.headers["Sforce-Limit-Info"] == "api-usage=2/100000"
    assert second.status_code == 404 and second.json()[0]["errorCode"] == "NOT_FOUND"
    assert api("GET", "/../v45x/query").status_code == 404


def test_describe_lists_fields_and_a_switch_removes_one(fake: FakeSalesforce, api: Any) -> None:
    fields = {f["name"]: f for f in api("GET", "/sobjects/Contact/describe").json()["fields"]}
    assert fields["Auth0_User_Id__c"]["externalId"] is True
    assert {"Email", "LastName", "Idsync_Deprovisioned__c"} <= set(fields)
    fake.remove_field("Contact", "Phone")
    names = {f["name"] for f in api("GET", "/sobjects/Contact/describe").json()["fields"]}
    assert "Phone" not in names
    refused = upsert(api, {"Auth0_User_Id__c": "a", "LastName": "A", "Phone": "1"})
    assert (refused.status_code, refused.json()[0]["errorCode"]) == (400, "INVALID_FIELD")


def test_upsert_creates_and_updates_in_request_order(fake: FakeSalesforce, api: Any) -> None:
    created = upsert(
        api,
        {"Auth0_User_Id__c": "auth0|1", "LastName": "One", "Email": "one@example.com"},
        {"Auth0_User_Id__c": "auth0|2", "Email": "two@example.com"},
        {"Auth0_User_Id__c": "auth0|3", "LastName": "Three", "Email": "not-an-email"},
    ).json()
    assert [r["success"] for r in created] == [True, False, False]
    assert created[0]["created"] is True and created[0]["id"].startswith("003")
    assert created[1]["errors"] == [
        {
            "statusCode": "REQUIRED_FIELD_MISSING",
            "message": "Required fields are missing: [LastName]",
            "fields": ["LastName"],
        }
    ]
    assert created[2]["errors"][0]["statusCode"] == "INVALID_EMAIL_ADDRESS"
    again = upsert(api, {"Auth0_User_Id__c": "AUTH0|1", "FirstName": "Uno"}).json()
    assert (again[0]["id"], again[0]["created"]) == (created[0]["id"], False)
    cleared = upsert(api, {"Auth0_User_Id__c": "auth0|1", "LastName": None}).json()
    assert cleared[0]["errors"][0]["statusCode"] == "REQUIRED_FIELD_MISSING"
    [record] = fake.records("Contact")
    assert (record["FirstName"], record["LastName"]) == ("Uno", "One")
    assert fake.stats()["records_written"] == 2


def test_all_or_none_rolls_back_and_over_200_records_is_refused(
    fake: FakeSalesforce, api: Any
) -> None:
    rolled = upsert(
        api,
        {"Auth0_User_Id__c": "a", "LastName": "A"},
        {"Auth0_User_Id__c": "b"},
        all_or_none=True,
    ).json()
    assert rolled[0]["errors"][0]["statusCode"] == "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    assert fake.records() == []
    fake.set_limits(records_per_second=1000)  # the ceiling is not what this checks
    many = [{"Auth0_User_Id__c": str(n), "LastName": "X"} for n in range(201)]
    refused = upsert(api, *many)
    assert (refused.status_code, refused.json()[0]["errorCode"]) == (400, "EXCEEDED_ID_LIMIT")


def test_ids_are_15_or_18_characters_and_update_delete_retrieve_use_them(
    fake: FakeSalesforce, api: Any
) -> None:
    record_id = fake.seed("Contact", {"LastName": "Seed", "Email": "s@example.com"})
    assert len(record_id) == 18 and id18(record_id[:15]) == record_id
    body = {
        "allOrNone": False,
        "records": [
            {"attributes": {"type": "Contact"}, "Id": record_id[:15], "FirstName": "Fif"},
            {"attributes": {"type": "Contact"}, "Id": record_id.lower(), "Title": "Lower"},
            {"attributes": {"type": "Contact"}, "Id": "003000000000000AAA", "Title": "X"},
        ],
    }
    updated = api("PATCH", "/composite/sobjects", json=body).json()
    assert [r["success"] for r in updated] == [True, True, False]
    assert updated[2]["errors"][0]["statusCode"] == "INVALID_CROSS_REFERENCE_KEY"
    got = api(
        "GET",
        "/composite/sobjects/Contact",
        params={"ids": f"{record_id},003000000000000AAA", "fields": "Id,FirstName,Title"},
    ).json()
    assert got[1] is None and (got[0]["FirstName"], got[0]["Title"]) == ("Fif", "Lower")
    deleted = api("DELETE", "/composite/sobjects", params={"ids": record_id, "allOrNone": "false"})
    assert deleted.json() == [{"id": record_id, "success": True, "errors": []}]
    twice = api("DELETE", "/composite/sobjects", params={"ids": record_id}).json()
    assert twice[0]["errors"][0]["statusCode"] == "ENTITY_IS_DELETED"


def test_the_query_finds_by_email_with_an_empty_external_id(fake: FakeSalesforce, api: Any) -> None:
    free = fake.seed("Contact", {"LastName": "Free", "Email": "Free@Example.com"})
    fake.seed(
        "Contact", {"LastName": "Taken", "Email": "taken@example.com", "Auth0_User_Id__c": "x"}
    )
    soql = (
        "SELECT Id, Email, LastName FROM Contact WHERE Email IN ('free@example.com', "
        "'taken@example.com', 'o\\'brien@example.com') AND Auth0_User_Id__c = null"
    )
    answer = api("GET", "/query", params={"q": soql}).json()
    assert (answer["totalSize"], answer["done"]) == (1, True)
    assert answer["records"][0]["Id"] == free
    assert answer["records"][0]["attributes"]["type"] == "Contact"
    for bad, code in [
        ("SELECT Id FROM Contact", "MALFORMED_QUERY"),
        ("SELECT Id FROM Contact WHERE Email IN (free@example.com)", "MALFORMED_QUERY"),
        ("SELECT Nope FROM Contact WHERE Email IN ('a')", "INVALID_FIELD"),
    ]:
        refused = api("GET", "/query", params={"q": bad})
        assert (refused.status_code, refused.json()[0]["errorCode"]) == (400, code)


def test_record_errors_hit_only_the_matched_record(fake: FakeSalesforce, api: Any) -> None:
    fake.record_error("DUPLICATES_DETECTED", "dup@example.com")
    fake.record_error("UNABLE_TO_LOCK_ROW", "auth0|lock", count=2)
    results = upsert(
        api,
        {"Auth0_User_Id__c": "auth0|dup", "LastName": "D", "Email": "dup@example.com"},
        {"Auth0_User_Id__c": "auth0|lock", "LastName": "L"},
        {"Auth0_User_Id__c": "auth0|ok", "LastName": "O"},
    ).json()
    codes = [r["errors"][0]["statusCode"] if r["errors"] else None for r in results]
    assert codes == ["DUPLICATES_DETECTED", "UNABLE_TO_LOCK_ROW", None]
    again = upsert(
        api, {"Auth0_User_Id__c": "auth0|dup", "LastName": "D", "Email": "dup@example.com"}
    )
    assert again.json()[0]["success"] is True  # the switch was used up
    taken = upsert(api, {"Auth0_User_Id__c": "x", "LastName": "X"}).json()[0]
    body = {
        "allOrNone": False,
        "records": [
            {"attributes": {"type": "Contact"}, "Id": taken["id"], "Auth0_User_Id__c": "auth0|ok"}
        ],
    }
    unique = api("PATCH", "/composite/sobjects", json=body).json()[0]
    assert unique["errors"][0]["statusCode"] == "DUPLICATE_VALUE"


def test_the_daily_allocation_and_the_ceiling_answer_request_limit_exceeded(
    fake: FakeSalesforce, api: Any
) -> None:
    fake.set_limits(records_per_second=3)
    assert upsert(api, *({"Auth0_User_Id__c": str(n), "LastName": "X"} for n in range(3))).ok
    ceiling = upsert(api, {"Auth0_User_Id__c": "late", "LastName": "X"})
    assert ceiling.status_code == 403
    assert ceiling.json()[0] == {
        "message": "ConcurrentPerOrgLongTxn Limit exceeded.",
        "errorCode": "REQUEST_LIMIT_EXCEEDED",
        "fields": [],
    }
    time.sleep(1.05)
    assert upsert(api, {"Auth0_User_Id__c": "late", "LastName": "X"}).ok
    fake.set_limits(daily_limit=10, used=10)
    spent = api("GET", "/sobjects/Contact/describe")
    assert spent.status_code == 403
    assert spent.json()[0]["message"] == "TotalRequests Limit exceeded."
    assert spent.headers["Sforce-Limit-Info"] == "api-usage=10/10"
    assert fake.stats()["throttled"] == 2


def test_fail_and_slow_switches(fake: FakeSalesforce, api: Any) -> None:
    fake.fail(1, 503, "SERVER_UNAVAILABLE")
    failed = api("GET", "/sobjects/Contact/describe")
    assert (failed.status_code, failed.json()[0]["errorCode"]) == (503, "SERVER_UNAVAILABLE")
    fake.slow(1, 0.5)
    started = time.monotonic()
    assert upsert(api, {"Auth0_User_Id__c": "s", "LastName": "S"}).ok
    assert time.monotonic() - started >= 0.5
    assert len(fake.records()) == 1


def test_the_switches_work_over_http_from_another_process() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "idsync.fakes.salesforce",
            "--port",
            "0",
            "--records-per-second",
            "50",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        control = f"{url}/_fake"
        seeded = requests.post(
            f"{control}/seed", json={"fields": {"LastName": "Http"}}, timeout=5
        ).json()["id"]
        assert requests.post(f"{control}/revoke", json={}, timeout=5).status_code == 204
        refused = requests.post(
            f"{url}/services/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "fake-client-id",
                "client_secret": "fake-client-secret",
            },
            timeout=5,
        )
        assert refused.json()["error"] == "invalid_client"
        records = requests.get(f"{control}/records", timeout=5).json()["records"]
        assert [r["Id"] for r in records] == [seeded]
        stats = requests.get(f"{control}/stats", timeout=5).json()
        assert {"records_written", "requests", "throttled"} <= set(stats)
        assert requests.post(f"{control}/reset", timeout=5).status_code == 204
        assert requests.get(f"{control}/records", timeout=5).json()["records"] == []
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
