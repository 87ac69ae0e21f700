"""The fake HubSpot behaves like HubSpot's contacts API, over real HTTP."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from idsync.fakes.hubspot import FakeHubSpot

TOKEN = "test-token"
CONTACTS = "/crm/v3/objects/contacts"
RATE_HEADERS = [
    "X-HubSpot-RateLimit-Max",
    "X-HubSpot-RateLimit-Remaining",
    "X-HubSpot-RateLimit-Interval-Milliseconds",
    "X-HubSpot-RateLimit-Daily",
    "X-HubSpot-RateLimit-Daily-Remaining",
]


class Api:
    """A small authenticated caller of one fake, so tests read like HubSpot calls."""

    def __init__(self, fake: FakeHubSpot, session: requests.Session) -> None:
        self.fake, self.session = fake, session

    def __call__(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.fake.url + path, timeout=5, **kwargs)

    def create(self, **properties: str) -> requests.Response:
        return self("POST", CONTACTS, json={"properties": properties})

    def batch(self, operation: str, inputs: list[dict[str, Any]], **kwargs: Any):
        return self("POST", f"{CONTACTS}/batch/{operation}", json={"inputs": inputs}, **kwargs)

    def control(self, method: str, action: str, **body: Any) -> requests.Response:
        return requests.request(method, f"{self.fake.url}/_fake/{action}", json=body, timeout=5)


@pytest.fixture
def fake() -> Iterator[FakeHubSpot]:
    with FakeHubSpot(token=TOKEN) as server:
        yield server


@pytest.fixture
def api(fake: FakeHubSpot) -> Iterator[Api]:
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        yield Api(fake, session)


def upsert(email: str, trace: str | None = None, **properties: str) -> dict[str, Any]:
    item: dict[str, Any] = {"id": email, "idProperty": "email", "properties": properties}
    return item | ({"objectWriteTraceId": trace} if trace else {})


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_create_read_and_ids_start_at_101(api: Api) -> None:
    created = api.create(email="Ada@Example.com", firstname="Ada")
    assert created.status_code == 201
    contact = created.json()
    assert contact["id"] == "101"
    assert contact["properties"]["email"] == "ada@example.com"
    by_id = api("GET", f"{CONTACTS}/101").json()
    by_email = api("GET", f"{CONTACTS}/ada%40example.com", params={"idProperty": "email"}).json()
    assert by_id["properties"]["firstname"] == by_email["properties"]["firstname"] == "Ada"
    assert api.create(email="bob@example.com").json()["id"] == "102"


def test_duplicate_email_is_409_naming_the_existing_id(api: Api) -> None:
    first = api.create(email="ada@example.com").json()
    again = api.create(email="ADA@example.com")
    assert again.status_code == 409
    body = again.json()
    assert body["category"] == "CONFLICT"
    assert body["message"] == f"Contact already exists. Existing ID: {first['id']}"
    assert body["correlationId"]


def test_email_with_plus_reads_back_when_quoted(api: Api) -> None:
    api.create(email="a+tag@example.com")
    found = api("GET", f"{CONTACTS}/a%2Btag%40example.com", params={"idProperty": "email"})
    assert found.status_code == 200


def test_email_path_without_id_property_is_404(api: Api) -> None:
    api.create(email="ada@example.com")
    answer = api("GET", f"{CONTACTS}/ada%40example.com")
    assert answer.status_code == 404
    assert "objectId are usually numeric" in answer.json()["message"]


@pytest.mark.parametrize(
    ("properties", "marker"),
    [
        ({"email": "not-an-email"}, "INVALID_EMAIL"),
        ({"email": "ada@example.com", "favourite_colour": "blue"}, "PROPERTY_DOESNT_EXIST"),
    ],
)
def test_invalid_properties_are_400(api: Api, properties: dict[str, str], marker: str) -> None:
    answer = api.create(**properties)
    assert answer.status_code == 400
    assert answer.json()["category"] == "VALIDATION_ERROR"
    assert marker in answer.json()["message"]


def test_known_properties_are_settable(api: Api, fake: FakeHubSpot) -> None:
    fake.set_known_properties(["email", "favourite_colour"])
    assert api.create(email="ada@example.com", favourite_colour="blue").status_code == 201
    assert api.create(email="bob@example.com", firstname="Bob").status_code == 400


def test_patch_updates_clears_and_404s(api: Api) -> None:
    contact_id = api.create(email="ada@example.com", firstname="Ada", lastname="L").json()["id"]
    patched = api("PATCH", f"{CONTACTS}/{contact_id}", json={"properties": {"firstname": ""}})
    assert patched.status_code == 200
    assert patched.json()["properties"].get("firstname") is None
    assert patched.json()["properties"]["lastname"] == "L"
    missing = api("PATCH", f"{CONTACTS}/999", json={"properties": {"firstname": "X"}})
    assert missing.status_code == 404
    assert missing.json()["category"] == "OBJECT_NOT_FOUND"


def test_patch_to_an_email_owned_by_another_contact_is_409(api: Api) -> None:
    ada = api.create(email="ada@example.com").json()["id"]
    bob = api.create(email="bob@example.com").json()["id"]
    answer = api("PATCH", f"{CONTACTS}/{bob}", json={"properties": {"email": "ada@example.com"}})
    assert answer.status_code == 409
    assert f"Existing ID: {ada}" in answer.json()["message"]


def test_email_change_frees_the_old_email(api: Api, fake: FakeHubSpot) -> None:
    ada = api.create(email="ada@example.com").json()["id"]
    api("PATCH", f"{CONTACTS}/{ada}", json={"properties": {"email": "ada@new.example"}})
    assert fake.contact_by_email("ada@example.com") is None
    assert fake.contact_by_email("ada@new.example")["id"] == ada
    assert api.create(email="ada@example.com").status_code == 201


def test_delete_is_204_for_unknown_ids_and_archived_is_hidden(api: Api, fake: FakeHubSpot) -> None:
    assert api("DELETE", f"{CONTACTS}/987654").status_code == 204
    contact_id = api.create(email="ada@example.com").json()["id"]
    assert api("DELETE", f"{CONTACTS}/{contact_id}").status_code == 204
    assert api("GET", f"{CONTACTS}/{contact_id}").status_code == 404
    assert api("PATCH", f"{CONTACTS}/{contact_id}", json={"properties": {}}).status_code == 404
    assert fake.contacts() == []
    assert [c["archived"] for c in fake.contacts(include_archived=True)] == [True]


def test_archived_email_is_free_and_makes_a_new_contact(api: Api) -> None:
    old_id = api.create(email="ada@example.com").json()["id"]
    api("DELETE", f"{CONTACTS}/{old_id}")
    new_id = api.create(email="ada@example.com").json()["id"]
    assert new_id != old_id
    upserted = api.batch("upsert", [upsert("ada@example.com")]).json()["results"][0]
    assert upserted["id"] == new_id
    assert upserted["new"] is False


def test_batches_take_at_most_100_inputs(api: Api) -> None:
    inputs = [upsert(f"user{n}@example.com") for n in range(101)]
    answer = api.batch("upsert", inputs)
    assert answer.status_code == 400
    assert answer.json()["category"] == "VALIDATION_ERROR"
    assert api.batch("upsert", inputs[:100]).status_code == 200


def test_upsert_reports_new_and_echoes_trace_ids(api: Api) -> None:
    existing = api.create(email="ada@example.com").json()["id"]
    inputs = [upsert("ADA@example.com", "t1", firstname="Ada"), upsert("bob@example.com", "t2")]
    answer = api.batch("upsert", inputs, params={"idProperty": "email"})
    assert answer.status_code == 200
    results = {result["objectWriteTraceId"]: result for result in answer.json()["results"]}
    assert results["t1"]["id"] == existing
    assert results["t1"]["new"] is False
    assert results["t1"]["properties"]["firstname"] == "Ada"
    assert results["t2"]["new"] is True


def test_batch_with_trace_ids_is_207_and_applies_the_good_inputs(
    api: Api, fake: FakeHubSpot
) -> None:
    inputs = [upsert("ada@example.com", "good"), upsert("not-an-email", "bad")]
    answer = api.batch("upsert", inputs)
    assert answer.status_code == 207
    body = answer.json()
    assert body["numErrors"] == 1
    assert [result["objectWriteTraceId"] for result in body["results"]] == ["good"]
    assert body["errors"][0]["context"]["objectWriteTraceId"] == ["bad"]
    assert "INVALID_EMAIL" in body["errors"][0]["message"]
    assert fake.contact_by_email("ada@example.com") is not None


def test_batch_without_trace_ids_fails_whole_and_applies_nothing(
    api: Api, fake: FakeHubSpot
) -> None:
    answer = api.batch("upsert", [upsert("ada@example.com"), upsert("not-an-email")])
    assert answer.status_code == 400
    assert "INVALID_EMAIL" in answer.json()["message"]
    assert fake.contacts() == []


def test_a_failed_batch_undoes_its_updates_email_moves_and_ids(api: Api, fake: FakeHubSpot) -> None:
    ada = api.create(email="ada@example.com", firstname="Ada").json()["id"]
    inputs = [
        {"id": ada, "properties": {"email": "ada@new.example.com", "firstname": "Adele"}},
        {"properties": {"email": "bob@example.com"}},
        {"properties": {"email": "not-an-email"}},
    ]
    assert api.batch("update", inputs[:1] + inputs[2:]).status_code == 400
    assert api.batch("create", inputs[1:]).status_code == 400
    assert [
        (c["id"], c["properties"]["email"], c["properties"]["firstname"]) for c in fake.contacts()
    ] == [(ada, "ada@example.com", "Ada")]
    assert fake.contact_by_email("ada@new.example.com") is None
    assert fake.contact_by_email("ada@example.com")["id"] == ada  # type: ignore[index]
    # The ids the failed create took are free again, as if it never ran.
    assert api.create(email="bob@example.com").json()["id"] == str(int(ada) + 1)


def test_a_batch_write_leaves_the_rest_of_the_account_alone(api: Api, fake: FakeHubSpot) -> None:
    """A batch costs the same in a large account: it copies none of the other contacts."""
    others = [api.create(email=f"u{n}@example.com").json()["id"] for n in range(20)]
    before = {cid: fake._store.contacts[cid] for cid in others}
    assert api.batch("upsert", [upsert("new@example.com"), upsert("u0@example.com")]).ok
    assert all(fake._store.contacts[cid] is before[cid] for cid in others)


def test_batch_update_partial_failure_covers_404_and_409(api: Api) -> None:
    ada = api.create(email="ada@example.com").json()["id"]
    bob = api.create(email="bob@example.com").json()["id"]
    inputs = [
        {"id": ada, "objectWriteTraceId": "ok", "properties": {"firstname": "Ada"}},
        {"id": "999", "objectWriteTraceId": "gone", "properties": {"firstname": "X"}},
        {"id": bob, "objectWriteTraceId": "taken", "properties": {"email": "ada@example.com"}},
    ]
    body = api.batch("update", inputs).json()
    categories = {e["context"]["objectWriteTraceId"][0]: e["category"] for e in body["errors"]}
    assert categories == {"gone": "OBJECT_NOT_FOUND", "taken": "CONFLICT"}
    assert body["results"][0]["properties"]["firstname"] == "Ada"


@pytest.mark.parametrize(
    ("operation", "inputs", "message"),
    [
        ("update", [{"id": "ada@example.com", "properties": {}}], "non-unique 0-1 property"),
        ("upsert", [upsert("a@example.com"), upsert("A@example.com")], "Duplicate IDs"),
        ("update", [{"id": "101", "properties": {}}] * 2, "Duplicate IDs"),
    ],
)
def test_batch_refusals(
    api: Api, operation: str, inputs: list[dict[str, Any]], message: str
) -> None:
    api.create(email="ada@example.com")
    answer = api.batch(operation, inputs)
    assert answer.status_code == 400
    assert message in answer.json()["message"]


def test_batch_read_by_email_reports_missing_in_207(api: Api) -> None:
    api.create(email="ada@example.com")
    inputs = [{"id": "ada@example.com"}, {"id": "nobody@example.com"}]
    answer = api("POST", f"{CONTACTS}/batch/read", json={"idProperty": "email", "inputs": inputs})
    assert answer.status_code == 207
    body = answer.json()
    assert [r["properties"]["email"] for r in body["results"]] == ["ada@example.com"]
    assert body["errors"][0]["category"] == "OBJECT_NOT_FOUND"
    assert body["errors"][0]["context"]["ids"] == ["nobody@example.com"]


def test_batch_create_and_archive(api: Api, fake: FakeHubSpot) -> None:
    created = api.batch(
        "create", [{"properties": {"email": f"u{n}@example.com"}} for n in range(3)]
    )
    assert created.status_code == 201
    ids = [result["id"] for result in created.json()["results"]]
    archived = api.batch("archive", [{"id": contact_id} for contact_id in [*ids, "555"]])
    assert archived.status_code == 204
    assert fake.contacts() == []


def test_rolling_limit_answers_429_without_retry_after(api: Api, fake: FakeHubSpot) -> None:
    fake.set_rate_limit(5, 2.0)
    answers = [api("GET", f"{CONTACTS}/101") for _ in range(6)]
    assert [a.status_code for a in answers] == [404] * 5 + [429]
    limited = answers[-1]
    assert limited.json()["policyName"] == "TEN_SECONDLY_ROLLING"
    assert limited.json()["errorType"] == "RATE_LIMIT"
    assert "ten_secondly_rolling" in limited.json()["message"]
    assert "Retry-After" not in limited.headers
    assert limited.headers["X-HubSpot-RateLimit-Remaining"] == "0"
    wait_for(lambda: api("GET", f"{CONTACTS}/101").status_code == 404)
    assert fake.stats()["rate_limited"] >= 1


def test_a_one_second_window_names_the_secondly_policy(api: Api, fake: FakeHubSpot) -> None:
    """Clients wait out the window a 429 names: a 1 s window must not say ten seconds."""
    fake.set_rate_limit(2, 1.0)
    answers = [api("GET", f"{CONTACTS}/101") for _ in range(3)]
    assert [a.status_code for a in answers] == [404, 404, 429]
    assert answers[-1].json()["policyName"] == "SECONDLY"
    assert "secondly" in answers[-1].json()["message"]


def test_daily_limit_answers_429_daily(api: Api, fake: FakeHubSpot) -> None:
    fake.set_rate_limit(100, 10, daily_limit=2)
    statuses = [api("GET", f"{CONTACTS}/101").status_code for _ in range(3)]
    assert statuses == [404, 404, 429]
    assert api("GET", f"{CONTACTS}/101").json()["policyName"] == "DAILY"


def test_every_answer_carries_rate_limit_headers(api: Api, fake: FakeHubSpot) -> None:
    answers = [api.create(email="ada@example.com"), api("GET", f"{CONTACTS}/999")]
    fake.rate_limit_next(1)
    answers.append(api("GET", f"{CONTACTS}/101"))
    assert [a.status_code for a in answers] == [201, 404, 429]
    for answer in answers:
        assert all(header in answer.headers for header in RATE_HEADERS)
    first = answers[0].headers
    assert first["X-HubSpot-RateLimit-Max"] == "100"
    assert first["X-HubSpot-RateLimit-Remaining"] == "99"
    assert first["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"
    assert first["X-HubSpot-RateLimit-Daily-Remaining"] == "249999"


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}"])
def test_wrong_or_missing_token_is_401(fake: FakeHubSpot, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    answer = requests.get(f"{fake.url}{CONTACTS}/101", headers=headers, timeout=5)
    assert answer.status_code == 401
    assert answer.json()["category"] == "INVALID_AUTHENTICATION"
    assert "X-HubSpot-Auth-Failure" in answer.headers


def test_token_can_be_rotated(api: Api, fake: FakeHubSpot) -> None:
    fake.set_token("rotated")
    assert api("GET", f"{CONTACTS}/101").status_code == 401
    api.session.headers["Authorization"] = "Bearer rotated"
    assert api("GET", f"{CONTACTS}/101").status_code == 404


@pytest.mark.parametrize("status", [500, 502, 503, 423])
def test_fail_next_answers_the_status_then_recovers(
    api: Api, fake: FakeHubSpot, status: int
) -> None:
    fake.fail_next(2, status=status)
    statuses = [api.create(email=f"u{n}@example.com").status_code for n in range(3)]
    assert statuses == [status, status, 201]
    assert len(fake.contacts()) == 1


def test_rate_limit_next_can_send_retry_after(api: Api, fake: FakeHubSpot) -> None:
    fake.rate_limit_next(1, policy="SECONDLY", retry_after=2)
    limited = api("GET", f"{CONTACTS}/101")
    assert limited.status_code == 429
    assert limited.json()["policyName"] == "SECONDLY"
    assert limited.headers["Retry-After"] == "2"


def test_slow_requests_on_one_contact_show_up_as_overlapping(fake: FakeHubSpot) -> None:
    contact_id = fake.seed_contact({"email": "ada@example.com"})
    fake.slow_next(2, 0.3)
    statuses: list[int] = []

    def call(method: str, **kwargs: Any) -> None:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {TOKEN}"
            statuses.append(
                Api(fake, session)(method, f"{CONTACTS}/{contact_id}", **kwargs).status_code
            )

    patch = {"properties": {"firstname": "Ada"}}
    threads = [
        threading.Thread(target=call, args=("PATCH",), kwargs={"json": patch}),
        threading.Thread(target=call, args=("GET",)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200, 200]
    log = fake.requests_log
    assert all(record.finished - record.started >= 0.3 for record in log)
    assert all(contact_id in record.contact_ids for record in log)
    assert [set(pair) for pair in fake.overlaps()] == [set(log)]


def test_merged_id_reads_and_updates_the_survivor(api: Api, fake: FakeHubSpot) -> None:
    old = api.create(email="old@example.com").json()["id"]
    survivor = api.create(email="survivor@example.com").json()["id"]
    fake.merge(old, survivor)
    assert api("GET", f"{CONTACTS}/{old}").json()["id"] == survivor
    patched = api("PATCH", f"{CONTACTS}/{old}", json={"properties": {"firstname": "S"}})
    assert patched.json()["id"] == survivor
    assert [c["id"] for c in fake.contacts()] == [survivor]


def test_control_api(api: Api, fake: FakeHubSpot) -> None:
    seeded = api.control("POST", "contacts", properties={"email": "seed@example.com"})
    assert seeded.status_code == 201
    seed_id = seeded.json()["id"]
    assert api.control("POST", "faults", kind="fail", count=1, status=503).status_code == 204
    assert api("GET", f"{CONTACTS}/{seed_id}").status_code == 503
    api.control("POST", "faults", kind="rate_limit", count=1, policy="DAILY")
    assert api("GET", f"{CONTACTS}/{seed_id}").json()["policyName"] == "DAILY"
    other = api.create(email="other@example.com").json()["id"]
    assert api.control("POST", "merge", from_id=other, into_id=seed_id).status_code == 204
    listed = api.control("GET", "contacts").json()["results"]
    assert {(c["id"], c["mergedInto"]) for c in listed} == {(seed_id, None), (other, seed_id)}
    stats = api.control("GET", "stats").json()
    assert stats["rate_limited"] == 1
    assert stats["requests"][f"GET {CONTACTS}/<path:contact_id>"] == {"503": 1, "429": 1}
    assert len(api.control("GET", "requests").json()) == stats["total"] == 3
    api.control("POST", "token", token="new-token")
    assert api("GET", f"{CONTACTS}/{seed_id}").status_code == 401
    assert api.control("POST", "reset").status_code == 204
    assert fake.contacts(include_archived=True) == []
    assert api("GET", f"{CONTACTS}/{seed_id}").status_code == 404  # token is back to TOKEN
    assert api.control("POST", "faults", kind="boom").status_code == 400


def test_runs_as_its_own_process() -> None:
    command = [sys.executable, "-m", "idsync.fakes.hubspot", "--port", "0", "--token", "T"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        created = {"properties": {"email": "a@example.com"}}
        headers = {"Authorization": "Bearer T"}
        answer = requests.post(f"{url}{CONTACTS}", json=created, headers=headers, timeout=5)
        assert answer.status_code == 201
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


# Contact property definitions and scopes

PROPERTIES = "/crm/v3/properties/contacts"


def test_known_property_reads_as_hubspot_describes_it(api: Api, fake: FakeHubSpot) -> None:
    answer = api("GET", f"{PROPERTIES}/firstname")
    assert answer.status_code == 200
    assert all(header in answer.headers for header in RATE_HEADERS)
    prop = answer.json()
    assert {key: prop[key] for key in ("name", "label", "type", "fieldType", "groupName")} == {
        "name": "firstname",
        "label": "First Name",
        "type": "string",
        "fieldType": "text",
        "groupName": "contactinformation",
    }
    assert prop["hubspotDefined"] is True
    assert prop["archived"] is False
    assert prop["modificationMetadata"]["archivable"] is False
    custom = api("GET", f"{PROPERTIES}/idsync_user_id").json()
    assert custom["hubspotDefined"] is False
    assert custom["modificationMetadata"]["archivable"] is True
    fake.set_known_properties(["email", "favourite_colour"])
    assert api("GET", f"{PROPERTIES}/favourite_colour").json()["name"] == "favourite_colour"
    assert api("GET", f"{PROPERTIES}/firstname").status_code == 404


def test_unknown_property_is_404_object_not_found(api: Api) -> None:
    answer = api("GET", f"{PROPERTIES}/favourite_colour")
    assert answer.status_code == 404
    body = answer.json()
    assert body["status"] == "error"
    assert body["category"] == "OBJECT_NOT_FOUND"
    assert "favourite_colour" in body["message"]
    assert body["correlationId"]


def test_property_read_without_the_schema_scope_is_403_missing_scopes(
    api: Api, fake: FakeHubSpot
) -> None:
    contact_id = api.create(email="ada@example.com").json()["id"]
    assert api.control("POST", "scopes", missing=["crm.schemas.contacts.read"]).status_code == 204
    answer = api("GET", f"{PROPERTIES}/email")
    assert answer.status_code == 403
    body = answer.json()
    assert body["category"] == "MISSING_SCOPES"
    assert body["errors"][0]["context"]["requiredScopes"] == ["crm.schemas.contacts.read"]
    assert body["correlationId"]
    # Only the schema scope is gone: contacts still read and write.
    assert api("GET", f"{CONTACTS}/{contact_id}").status_code == 200
    assert api.create(email="bob@example.com").status_code == 201
    fake.reset()
    assert api("GET", f"{PROPERTIES}/email").status_code == 200


def test_missing_write_scope_refuses_writes_and_applies_nothing(
    api: Api, fake: FakeHubSpot
) -> None:
    fake.set_missing_scopes(["crm.objects.contacts.write"])
    created = api.create(email="ada@example.com")
    assert created.status_code == 403
    assert created.json()["errors"][0]["context"]["requiredScopes"] == [
        "crm.objects.contacts.write"
    ]
    assert api.batch("upsert", [upsert("ada@example.com")]).status_code == 403
    assert api.batch("read", [{"id": "101"}]).status_code == 207  # allowed; 101 is missing
    assert fake.contacts(include_archived=True) == []


def test_property_reads_need_the_token_and_count_against_the_limit(
    api: Api, fake: FakeHubSpot
) -> None:
    anonymous = requests.get(f"{fake.url}{PROPERTIES}/email", timeout=5)
    assert anonymous.status_code == 401
    assert anonymous.json()["category"] == "INVALID_AUTHENTICATION"
    fake.set_rate_limit(2, 10)
    statuses = [api("GET", f"{PROPERTIES}/email").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    route = f"GET {PROPERTIES}/<name>"
    assert fake.stats()["requests"][route] == {"401": 1, "200": 2, "429": 1}


# Late answers and late writes


def test_answer_late_applies_at_once_and_answers_after_the_hold(fake: FakeHubSpot) -> None:
    fake.answer_late_next(1, 0.6)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"properties": {"email": "ada@example.com"}}
    with pytest.raises(requests.ReadTimeout):
        requests.post(f"{fake.url}{CONTACTS}", json=body, headers=headers, timeout=0.2)
    # The client gave up, yet the contact exists already: the write came before the hold.
    assert fake.contact_by_email("ada@example.com") is not None
    wait_for(lambda: len(fake.requests_log) == 1)
    record = fake.requests_log[0]
    assert (record.status, record.fault) == (201, "answer_late")
    assert record.delay == 0.6
    assert record.finished - record.started >= 0.6
    # Only the next call was held.
    answer = requests.post(f"{fake.url}{CONTACTS}", json=body, headers=headers, timeout=5)
    assert answer.status_code == 409


def test_apply_late_lands_after_a_newer_write(fake: FakeHubSpot) -> None:
    contact_id = fake.seed_contact({"email": "ada@example.com", "firstname": "Seed"})
    path = f"{fake.url}{CONTACTS}/{contact_id}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    fake.apply_late_next(1, 0.6)
    older = {"properties": {"firstname": "Older"}}
    with pytest.raises(requests.ReadTimeout):
        requests.patch(path, json=older, headers=headers, timeout=0.2)
    assert fake.contact_by_email("ada@example.com")["properties"]["firstname"] == "Seed"
    newer = {"properties": {"firstname": "Newer"}}
    assert requests.patch(path, json=newer, headers=headers, timeout=5).status_code == 200
    assert fake.contact_by_email("ada@example.com")["properties"]["firstname"] == "Newer"
    # The write the client gave up on lands later and wins.
    wait_for(lambda: fake.in_flight() == 0 and len(fake.requests_log) == 2)
    assert fake.contact_by_email("ada@example.com")["properties"]["firstname"] == "Older"
    assert [(r.status, r.fault) for r in fake.requests_log] == [
        (200, None),
        (200, "apply_late"),
    ]


def test_late_faults_over_http(api: Api, fake: FakeHubSpot) -> None:
    for kind in ("answer_late", "apply_late", "slow"):
        answer = api.control("POST", "faults", kind=kind, count=1, seconds=0.2)
        assert answer.status_code == 204, kind
    answers = [api.create(email=f"u{n}@example.com") for n in range(4)]
    assert [a.status_code for a in answers] == [201] * 4
    records = api.control("GET", "requests").json()
    # Both late queues are taken by the first call; "slow" is apply_late's older name.
    assert [(r["fault"], r["delay"]) for r in records] == [
        ("apply_late+answer_late", 0.4),
        ("apply_late", 0.2),
        (None, 0.0),
        (None, 0.0),
    ]
    assert api.control("GET", "in_flight").json() == {"in_flight": 0}


# Seeded random faults


def random_fault_run(fake: FakeHubSpot, api: Api, seed: int) -> list[tuple[int, str | None]]:
    fake.reset()
    fake.seed_contact({"email": "seed@example.com"})
    fake.set_random_faults(
        seed, answer_late=0.2, apply_late=0.2, error=0.3, max_delay=0.02, statuses=[500, 404, 409]
    )
    for n in range(40):
        api.create(email=f"u{n}@example.com")
    return [(record.status, record.fault) for record in fake.requests_log]


def test_random_faults_repeat_for_a_seed(api: Api, fake: FakeHubSpot) -> None:
    first = random_fault_run(fake, api, seed=7)
    first_delays = [record.delay for record in fake.requests_log]
    # A failed call applied nothing: exactly the answered creates exist, and the seed.
    created = sum(1 for status, _ in first if status == 201)
    assert len(fake.contacts()) == created + 1
    assert random_fault_run(fake, api, seed=7) == first
    assert [record.delay for record in fake.requests_log] == first_delays
    assert random_fault_run(fake, api, seed=8) != first
    faults = {fault for _, fault in first}
    assert faults == {None, "fail", "answer_late", "apply_late"}
    assert {status for status, fault in first if fault == "fail"} <= {500, 404, 409}
    assert {status for status, fault in first if fault != "fail"} == {201}
    assert all(0 <= delay <= 0.02 for delay in first_delays)


def test_random_errors_have_hubspot_bodies_and_apply_nothing(api: Api, fake: FakeHubSpot) -> None:
    seed_id = fake.seed_contact({"email": "seed@example.com", "firstname": "Seed"})
    fake.set_random_faults(1, error=1.0, statuses=[409])
    duplicate = api.create(email="seed@example.com")
    assert duplicate.status_code == 409
    assert duplicate.json()["category"] == "CONFLICT"
    assert duplicate.json()["message"] == f"Contact already exists. Existing ID: {seed_id}"
    patch = {"properties": {"firstname": "Changed"}}
    assert api("PATCH", f"{CONTACTS}/{seed_id}", json=patch).status_code == 409
    # An email change names the contact that owns the new email, as a real 409 does.
    fake.set_random_faults(None)
    other_id = api.create(email="other@example.com").json()["id"]
    fake.set_random_faults(1, error=1.0, statuses=[409])
    taken = {"properties": {"email": "seed@example.com"}}
    conflict = api("PATCH", f"{CONTACTS}/{other_id}", json=taken)
    assert conflict.json()["message"] == f"Contact already exists. Existing ID: {seed_id}"
    fake.set_random_faults(1, error=1.0, statuses=[404])
    missing = api("PATCH", f"{CONTACTS}/{seed_id}", json=patch)
    assert missing.status_code == 404
    assert missing.json()["category"] == "OBJECT_NOT_FOUND"
    fake.set_random_faults(1, error=1.0, statuses=[500])
    failed = api.batch("upsert", [upsert("new@example.com")])
    assert failed.status_code == 500
    assert failed.json()["category"] == "INTERNAL_ERROR"
    emails_and_names = [
        (c["properties"]["email"], c["properties"].get("firstname")) for c in fake.contacts()
    ]
    assert emails_and_names == [("seed@example.com", "Seed"), ("other@example.com", None)]
    fake.set_random_faults(None)
    assert api.create(email="new@example.com").status_code == 201


def test_random_faults_over_http_and_off_after_reset(api: Api, fake: FakeHubSpot) -> None:
    body = {"seed": 3, "error": 1.0, "statuses": [503]}
    assert api.control("POST", "random_faults", **body).status_code == 204
    assert api("GET", f"{CONTACTS}/101").status_code == 503
    bad = api.control("POST", "random_faults", seed=3, error=0.8, answer_late=0.5)
    assert bad.status_code == 400
    assert api.control("POST", "random_faults", seed=3, statuses=[200]).status_code == 400
    assert api.control("POST", "random_faults", seed=None).status_code == 204
    assert api("GET", f"{CONTACTS}/101").status_code == 404
    api.control("POST", "random_faults", **body)
    api.control("POST", "reset")
    assert api("GET", f"{CONTACTS}/101").status_code == 404


# reset() starts a new generation


def _post_in_background(fake: FakeHubSpot, email: str) -> tuple[threading.Thread, list]:
    answers: list[requests.Response] = []
    body = {"properties": {"email": email}}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    thread = threading.Thread(
        target=lambda: answers.append(
            requests.post(f"{fake.url}{CONTACTS}", json=body, headers=headers, timeout=30)
        )
    )
    thread.start()
    return thread, answers


@pytest.mark.parametrize("fault", ["slow_next", "answer_late_next"])
def test_request_held_across_reset_neither_applies_nor_counts(
    api: Api, fake: FakeHubSpot, fault: str
) -> None:
    getattr(fake, fault)(1, 20)
    thread, answers = _post_in_background(fake, "old@example.com")
    wait_for(lambda: fake.in_flight() == 1)
    fake.reset()
    # The hold is cut short: the old request ends now, not 20 seconds later.
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert answers[0].status_code == 503
    assert fake.in_flight() == 0
    assert fake.contacts(include_archived=True) == []
    assert fake.requests_log == []
    assert fake.stats()["total"] == 0
    # The new generation works from a clean start.
    assert api.create(email="old@example.com").json()["id"] == "101"
    assert len(fake.requests_log) == 1
