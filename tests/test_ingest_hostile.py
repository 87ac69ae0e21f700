"""Hostile bodies on ``POST /events/auth0``: every answer tells the truth, on real PostgreSQL.

2xx means committed; 4xx means this body can never succeed, and an authenticated
JSON body answered 422 is quarantined (without ``data.context``); 503 means only
that the database cannot commit right now. PostgreSQL's text and JSONB refuse
NUL characters and unpaired surrogates, and its columns have lengths: each of
those used to reach the database and come back as a 503 or a 500.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from werkzeug.test import EnvironBuilder, run_wsgi_app
from werkzeug.wrappers import Response

from idsync.settings import Settings
from idsync.stack import Stack, free_port, ingest_command
from ingest import create_app, store
from models.db import transaction
from models.ordering import order_key
from models.outbox import NewEvent
from models.tables import Delivery, Event, Quarantine
from tests.conftest import REDIS_URL
from tests.events import auth0_event
from tests.processes import TcpProxy
from workers.maintenance import purge_finished

TOKEN = "test-ingest-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 256 * 1024  # INGEST_MAX_BODY_BYTES by default
NUL, SURROGATE = "\x00", "\ud800"


@pytest.fixture
def client(settings: Settings, db: None) -> Iterator[FlaskClient]:
    app = create_app(settings)
    yield app.test_client()
    app.extensions["idsync"].engine.dispose()


def event(**user: Any) -> dict[str, Any]:
    """A real-shaped user.created event; ``user`` adds fields to ``data.object``."""
    document = auth0_event("user.created", "auth0|hostile", email="ada@example.com")
    document["data"]["object"].update({"given_name": "Ada", "app_metadata": {"plan": "pro"}})
    document["data"]["object"].update(user)
    return document


def changed(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``document`` with the dotted ``path`` set to ``value``."""
    result = copy.deepcopy(document)
    *parents, last = path.split(".")
    target = result
    for key in parents:
        target = target[key]
    target[last] = value
    return result


def encoded(document: Any) -> bytes:
    """JSON as a sender writes it: NUL and surrogates as \\u escapes, NaN as NaN."""
    return json.dumps(document).encode()


def post(client: FlaskClient, body: bytes) -> Any:
    return client.post("/events/auth0", data=body, content_type="application/json", headers=BEARER)


def stored(sessions: Any) -> tuple[list[Event], int, list[Quarantine]]:
    with sessions() as session:
        return (
            list(session.scalars(select(Event))),
            session.scalar(select(func.count(Delivery.id))) or 0,
            list(session.scalars(select(Quarantine))),
        )


def assert_quarantined(answer: Any, sessions: Any, naming: str) -> Quarantine:
    """422 naming ``naming``, nothing in the outbox, one quarantine row without context."""
    assert answer.status_code == 422, answer.get_data(as_text=True)
    assert naming in answer.json["error"], answer.json
    events, deliveries, quarantined = stored(sessions)
    assert (events, deliveries) == ([], 0)
    assert len(quarantined) == 1
    row = quarantined[0]
    assert row.reason == answer.json["error"]
    assert "\x00" not in row.body
    try:
        kept = json.loads(row.body)
    except (ValueError, RecursionError):
        return row
    if isinstance(kept, dict) and isinstance(kept.get("data"), dict):
        assert "context" not in kept["data"], "the end user's IP and location were kept"
    return row


def with_character(value: str, character: str) -> str:
    return value[:5] + character + value[5:]


KEY_FIELDS = ["id", "source", "type", "time", "data.object.user_id"]


def named(field: str) -> str:
    """How an error message names ``field``: a CloudEvent attribute in quotes, or its path."""
    return field if "." in field else f"'{field}'"


@pytest.mark.parametrize("character", [NUL, SURROGATE], ids=["nul", "surrogate"])
@pytest.mark.parametrize("field", KEY_FIELDS)
def test_unstorable_character_in_a_key_field_is_422_naming_it_and_quarantined(
    client: FlaskClient, sessions: Any, field: str, character: str
) -> None:
    document = event()
    original = document["data"]["object"]["user_id"] if "." in field else document[field]
    answer = post(client, encoded(changed(document, field, with_character(original, character))))
    row = assert_quarantined(answer, sessions, naming=named(field))
    assert "\\u0000" in row.body or "\\ud800" in row.body  # the evidence is kept, escaped


@pytest.mark.parametrize(
    ("field", "length"),
    [("id", 256), ("source", 256), ("data.object.user_id", 256), ("type", 101)],
)
def test_key_field_longer_than_its_column_is_422_naming_it_and_quarantined(
    client: FlaskClient, sessions: Any, field: str, length: int
) -> None:
    prefix = "user.updated" if field == "type" else "x"
    value = prefix + "x" * (length - len(prefix))
    answer = post(client, encoded(changed(event(), field, value)))
    assert_quarantined(answer, sessions, naming=named(field))


def test_key_fields_at_their_column_length_are_accepted(client: FlaskClient, sessions: Any) -> None:
    document = event()
    document["id"] = "i" * 255
    document["source"] = "s" * 255
    document["data"]["object"]["user_id"] = "u" * 255
    assert post(client, encoded(document)).status_code == 202
    ignored = changed(document, "type", "t" * 100)
    ignored["id"] = "j" * 255
    assert post(client, encoded(ignored)).status_code == 202
    events, deliveries, _ = stored(sessions)
    assert len(events) == 2 and deliveries == 1


@pytest.mark.parametrize(
    "value", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"], ids=["after", "before"]
)
@pytest.mark.parametrize("field", ["time", "data.object.updated_at"])
def test_time_out_of_range_after_its_offset_is_422_naming_it_and_quarantined(
    client: FlaskClient, sessions: Any, field: str, value: str
) -> None:
    answer = post(client, encoded(changed(event(), field, value)))
    assert_quarantined(answer, sessions, naming=named(field))


def nested(levels: int) -> Any:
    """``levels`` arrays, one inside the other."""
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_event_nested_deeper_than_64_levels_is_too_deep_and_quarantined(
    client: FlaskClient, sessions: Any
) -> None:
    # The event is level 1, data 2, data.object 3: user_metadata's arrays start at 4.
    answer = post(client, encoded(event(user_metadata=nested(62))))
    assert_quarantined(answer, sessions, naming="too_deep")


def test_event_nested_64_levels_is_accepted(client: FlaskClient, sessions: Any) -> None:
    answer = post(client, encoded(event(user_metadata=nested(61))))
    assert answer.status_code == 202, answer.json
    events, _, _ = stored(sessions)
    assert len(events) == 1


def test_body_nested_beyond_the_parsers_recursion_is_too_deep_and_quarantined(
    client: FlaskClient, sessions: Any
) -> None:
    depth = 100_000
    answer = post(client, b"[" * depth + b"]" * depth)
    assert_quarantined(answer, sessions, naming="too_deep")


@pytest.mark.parametrize(
    "literal",
    ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, "9" * 5000],
    ids=["nan", "infinity", "-infinity", "1e400", "-1e400", "401-digits", "5000-digits"],
)
def test_non_finite_number_is_422_and_quarantined(
    client: FlaskClient, sessions: Any, literal: str
) -> None:
    body = encoded(event(user_metadata={"score": "__number__"}))
    answer = post(client, body.replace(b'"__number__"', literal.encode()))
    assert_quarantined(answer, sessions, naming="non_finite_number")


@pytest.mark.parametrize(
    ("path", "value", "kept"),
    [
        ("data.object.given_name", f"Ada{NUL} Lovelace", "Ada Lovelace"),
        ("data.object.given_name", f"Ada{SURROGATE}", "Ada\ufffd"),
        ("data.object.app_metadata.plan", f"{NUL}{SURROGATE}x{NUL}", "\ufffdx"),
        ("data.previous_object.name", f"\udc00{NUL}", "\ufffd"),
        ("a0stream", f"est{NUL}1", "est1"),
    ],
    ids=["nul-name", "surrogate-name", "metadata", "previous-object", "attribute"],
)
def test_unstorable_character_elsewhere_is_accepted_cleaned(
    client: FlaskClient, sessions: Any, path: str, value: str, kept: str
) -> None:
    answer = post(client, encoded(changed(event(), path, value)))
    assert answer.status_code == 202, answer.json
    events, deliveries, quarantined = stored(sessions)
    assert len(events) == 1 and deliveries == 1 and quarantined == []
    payload: Any = events[0].payload
    assert "context" not in payload["data"]
    for key in path.split("."):
        payload = payload[key]
    assert payload == kept


def test_unstorable_character_in_a_key_name_is_accepted_cleaned(
    client: FlaskClient, sessions: Any
) -> None:
    document = event(user_metadata={f"hob{NUL}by": "chess", f"x{SURROGATE}": 1})
    assert post(client, encoded(document)).status_code == 202
    events, _, _ = stored(sessions)
    payload: Any = events[0].payload
    assert payload["data"]["object"]["user_metadata"] == {"hobby": "chess", "x\ufffd": 1}


def test_rejection_is_logged_with_its_real_cause(
    client: FlaskClient, sessions: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    document = changed(event(), "data.object.user_id", f"auth0|{NUL}")
    assert post(client, encoded(document)).status_code == 422
    text = caplog.text
    assert "database unavailable" not in text
    assert "data.object.user_id" in text and "quarantined" in text


def test_value_the_database_refuses_after_validation_is_422_not_503(
    client: FlaskClient, sessions: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last line of defence: a DataError is the body's fault, not an outage."""
    validate = store.to_new_event

    def let_a_nul_through(document: dict[str, Any], body: bytes, **options: Any) -> NewEvent:
        return dataclasses.replace(validate(document, body, **options), payload={"note": NUL})

    monkeypatch.setattr(store, "to_new_event", let_a_nul_through)
    answer = post(client, encoded(event()))
    assert_quarantined(answer, sessions, naming="the database refused")


def test_quarantine_while_the_database_is_down_is_503_then_422(
    settings: Settings, database_url: str, sessions: Any
) -> None:
    """A 422 promises the body was kept; when it cannot be kept, Auth0 must try again."""
    port = int(database_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(port)
    app = create_app(
        settings.model_copy(
            update={"database_url": database_url.replace(f":{port}/", f":{proxy.port}/")}
        )
    )
    client = app.test_client()
    body = encoded(changed(event(), "id", "x" * 300))
    try:
        proxy.cut()
        answer = post(client, body)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1"
        assert stored(sessions) == ([], 0, [])
        proxy.restore()
        assert_quarantined(post(client, body), sessions, naming="'id'")
    finally:
        app.extensions["idsync"].engine.dispose()
        proxy.close()


def test_quarantine_rows_are_purged_after_retention_days(settings: Settings, sessions: Any) -> None:
    with transaction(sessions) as session:
        session.add_all(
            [Quarantine(reason="old", body="{}"), Quarantine(reason="recent", body="{}")]
        )
    with transaction(sessions) as session:
        session.execute(
            update(Quarantine)
            .where(Quarantine.reason == "old")
            .values(received_at=func.now() - timedelta(days=settings.retention_days, hours=1))
        )
    with transaction(sessions) as session:
        counts = purge_finished(session=session, settings=settings)
    assert counts["quarantine"] == 1
    with sessions() as session:
        assert list(session.scalars(select(Quarantine.reason))) == ["recent"]


def test_order_key_keeps_times_before_1970_and_before_year_1000_in_order() -> None:
    arrival = datetime(2025, 1, 1, tzinfo=UTC)
    moments = [
        datetime(1, 1, 2, tzinfo=UTC),
        datetime(999, 6, 1, tzinfo=UTC),
        datetime(1969, 7, 20, tzinfo=UTC),
        datetime(1969, 7, 21, tzinfo=UTC),
        datetime(2024, 1, 1, tzinfo=UTC),
    ]
    keys = [
        order_key(
            event_time=arrival,
            received_at=arrival,
            object_updated_at=moment,
            event_type="user.updated",
            event_id="evt_same",
        )
        for moment in moments
    ]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert len({len(key) for key in keys}) == 1  # fixed width: text order is time order


# Chunked bodies (Transfer-Encoding: chunked, no Content-Length). gunicorn, the
# production server, sets wsgi.input_terminated and ends the stream itself.


def padded(size: int) -> bytes:
    """A valid event followed by whitespace, ``size`` bytes in all: any prefix that
    holds the event parses, so a body cut at the limit would look acceptable."""
    body = encoded(event())
    return body + b" " * (size - len(body))


def post_chunked(client: FlaskClient, body: bytes) -> Any:
    """What gunicorn hands the app for a chunked body: no CONTENT_LENGTH, a terminated input."""
    environ = EnvironBuilder(
        path="/events/auth0",
        method="POST",
        input_stream=io.BytesIO(body),
        content_type="application/json",
        headers=list(BEARER.items()),
    ).get_environ()
    del environ["CONTENT_LENGTH"]
    environ["wsgi.input_terminated"] = True
    # Straight to the app: the test client would measure the stream and add a length.
    body_iter, status, headers = run_wsgi_app(client.application, environ, buffered=True)
    return Response(b"".join(body_iter), status=status, headers=headers)


@pytest.mark.parametrize(("size", "status"), [(LIMIT, 202), (LIMIT + 1, 413)])
def test_chunked_body_over_the_limit_is_413_in_process(
    client: FlaskClient, sessions: Any, size: int, status: int
) -> None:
    answer = post_chunked(client, padded(size))
    assert answer.status_code == status, answer.json
    events, _, quarantined = stored(sessions)
    assert (len(events), len(quarantined)) == ((1, 0) if status == 202 else (0, 0))


@pytest.mark.e2e
def test_chunked_body_over_the_limit_is_413_through_gunicorn(
    database_url: str, redis_prefix: str, db: None, sessions: Any, tmp_path: Path
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": REDIS_URL,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": redis_prefix,
        "INGEST_TOKEN": TOKEN,
    }
    stack = Stack(env=env, workdir=tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack.start("ingest", ingest_command(port, workers=1))
    try:
        stack.wait_for_http(f"{url}/healthz", timeout=60)

        def send(body: bytes) -> requests.Response:
            chunks = (body[start : start + 16384] for start in range(0, len(body), 16384))
            return requests.post(
                f"{url}/events/auth0",
                data=chunks,  # an iterator: requests sends it chunked, without Content-Length
                headers={**BEARER, "Content-Type": "application/json"},
                timeout=30,
            )

        over = send(padded(LIMIT + 1024))
        assert over.status_code == 413, over.text
        assert stored(sessions) == ([], 0, [])
        at_limit = send(padded(LIMIT))
        assert at_limit.status_code == 202, at_limit.text
        events, _, _ = stored(sessions)
        assert len(events) == 1
    finally:
        stack.stop_all()
