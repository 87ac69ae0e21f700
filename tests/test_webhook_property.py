"""Property: whatever the body, the webhook's answer is true.

For any body (valid events with random mutations, strings with NULs and
unpaired surrogates, deep nesting, numbers beyond a double, bytes that are not
JSON), ``POST /events/auth0`` answers 2xx if and only if the event and one
delivery per configured destination were committed, quarantines exactly the
bodies it answers 422, gives the same answer to the same body again (a 4xx body
can never succeed; a stored one is then a duplicate), and never answers 5xx
while the database is up. In-process through the Flask test client, on
PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import event, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select

from idsync.settings import Settings
from ingest import create_app
from models.tables import Delivery, Event, EventStatus, Quarantine
from tests.events import auth0_event

BEARER = {"Authorization": "Bearer test-ingest-token"}
HUGE = "__huge_number__"  # replaced in the encoded body by a literal no double can hold

# Characters PostgreSQL's text and JSONB refuse, and others that stress a codec.
AWKWARD = ["\x00", "\ud800", "\udbff", "\udc00", "\udfff", "\ufffd", "\u2028", "é", "𝄞", '"', "\\"]
awkward_text = st.lists(st.one_of(st.characters(), st.sampled_from(AWKWARD)), max_size=12).map(
    "".join
)
strings = st.one_of(
    awkward_text,
    st.integers(250, 260).map(lambda n: "x" * n),  # around the column lengths
    st.integers(95, 105).map(lambda n: "user." + "y" * (n - 5)),  # around type's length
)
times = st.one_of(
    st.sampled_from(
        [
            "9999-12-31T23:59:59-01:00",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59Z",
            "0001-01-01T00:00:00Z",
            "1969-07-20T20:17:40Z",
            "2025-02-30T00:00:00Z",
            "2025-03-01T12:00:00",
            "2025-03-01T12:00:00\x00Z",
            "2025-03-01T12:00:00+23:59",
        ]
    ),
    st.datetimes(timezones=st.timezones()).map(lambda moment: moment.isoformat()),
)
numbers = st.one_of(
    st.integers(),
    st.floats(),  # NaN and infinities included
    st.just(HUGE),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | strings,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(strings, children, max_size=3)
    ),
    max_leaves=8,
)


def nested(levels: int) -> Any:
    value: Any = {}
    for _ in range(levels - 1):
        value = [value]
    return value


PATHS = [
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "a0purpose",
    "data",
    "data.object",
    "data.object.user_id",
    "data.object.updated_at",
    "data.object.email",
    "data.object.given_name",
    "data.object.app_metadata",
    "data.previous_object",
    "data.context",
]
replacements = st.one_of(
    strings,
    times,
    json_values,
    st.integers(58, 66).map(nested),  # around the depth limit, deep inside the event
    st.just(HUGE),
)


@st.composite
def mutated_events(draw: Any) -> Any:
    """A real-shaped event with a few fields deleted, spoiled or replaced by hostile values."""
    kind = draw(st.sampled_from(["user.created", "user.updated", "user.deleted", "org.created"]))
    document = auth0_event(kind, draw(st.sampled_from(["auth0|1", "auth0|2"])), email="a@b.co")
    if draw(st.integers(0, 3)) == 0:
        document["a0purpose"] = "test"
    for path in draw(st.lists(st.sampled_from(PATHS), max_size=2)):
        *parents, last = path.split(".")
        target: Any = document
        for key in parents:
            target = target.get(key) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue
        current = target.get(last)
        how = draw(st.sampled_from(["delete", "replace", "spoil", "spoil", "stretch"]))
        if how == "delete":
            target.pop(last, None)
        elif how == "replace" or not isinstance(current, str):
            target[last] = draw(replacements)
        elif how == "spoil":  # one awkward character somewhere in the real value
            at = draw(st.integers(0, len(current)))
            target[last] = current[:at] + draw(st.sampled_from(AWKWARD)) + current[at:]
        else:  # lengthened to around its column's length
            target[last] = current + "z" * draw(st.integers(90 - len(current), 260 - len(current)))
    return document


def encoded(document: Any) -> bytes:
    text = json.dumps(document)  # NUL and surrogates as \u escapes; NaN and Infinity bare
    return text.replace(json.dumps(HUGE), "1e400").encode()


bodies = st.one_of(
    mutated_events().map(encoded),
    mutated_events().map(encoded),
    mutated_events().map(encoded),
    json_values.map(encoded),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.binary(max_size=64),
    st.sampled_from([b"NaN", b"-Infinity", b"1" + b"0" * 5000, b"{}", b"[]", b"null"]),
)


@pytest.fixture
def client(settings: Settings, db: None) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["idsync"].engine.dispose()


def outbox(client: FlaskClient) -> tuple[list[Event], list[Delivery], list[str]]:
    with client.application.extensions["idsync"].sessions() as session:
        return (
            list(session.scalars(select(Event))),
            list(session.scalars(select(Delivery))),
            list(session.scalars(select(Quarantine.body))),
        )


def assert_without_context(quarantined: str) -> None:
    """A quarantined body that is JSON holds no data.context (the end user's IP)."""
    try:
        kept = json.loads(quarantined)
    except (ValueError, RecursionError):
        return
    if isinstance(kept, dict) and isinstance(kept.get("data"), dict):
        assert "context" not in kept["data"]


def empty(client: FlaskClient) -> None:
    with client.application.extensions["idsync"].sessions.begin() as session:
        session.execute(delete(Quarantine))
        session.execute(delete(Event))  # deliveries go with their events


def post(client: FlaskClient, body: bytes) -> Any:
    return client.post("/events/auth0", data=body, content_type="application/json", headers=BEARER)


@settings(max_examples=150, deadline=None)
@given(body=bodies)
def test_every_answer_is_true_for_any_body(
    client: FlaskClient, settings: Settings, body: bytes
) -> None:
    empty(client)
    answer = post(client, body)
    assert answer.status_code < 500, answer.get_data(as_text=True)
    event(f"{answer.status_code} {answer.json.get('error', answer.json['status'])[:40]}")
    events, deliveries, quarantined = outbox(client)
    if 200 <= answer.status_code < 300:
        assert len(events) == 1, answer.json
        stored = events[0]
        assert answer.json["id"] == stored.event_id
        expected = settings.destinations if stored.status is EventStatus.ACCEPTED else ()
        assert sorted(d.destination for d in deliveries) == sorted(expected)
        assert all(d.event_pk == stored.id for d in deliveries)
        assert answer.json["status"] == ("accepted" if expected else "ignored")
        assert quarantined == []
    else:
        assert (events, deliveries) == ([], []), answer.json
        assert len(quarantined) == (1 if answer.status_code == 422 else 0), answer.json
        for kept in quarantined:
            assert_without_context(kept)
        assert answer.json["status"] == "rejected" and answer.json["error"]
    again = post(client, body)
    if 200 <= answer.status_code < 300:
        assert (again.status_code, again.json["status"]) == (200, "duplicate")
    else:
        assert (again.status_code, again.json) == (answer.status_code, answer.json)
    assert len(outbox(client)[0]) == len(events)
