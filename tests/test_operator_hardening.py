"""The operator's tools against cross-site requests and hostile stored data.

The admin JSON API takes only a bearer token, which a browser never adds by
itself; email addresses are masked in any script; a stored payload nested
deeper than anything renders, and a CRLF in the sign-in's ``next``, get a clear
answer; stored strings reach neither rich's markup nor the terminal's escape
sequences. Everything runs against the real database, through the Flask app
and the ``idsync`` command line.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import example, given
from hypothesis import strategies as st
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from idsync.cli import main
from idsync.fakes.hubspot import FakeHubSpot
from idsync.logs import mask_email, scrub
from idsync.settings import Settings
from models.db import transaction
from models.tables import Delivery, DeliveryAttempt, DestinationState, Event
from models.views import masked
from tests.conftest import REDIS_URL
from tests.events import auth0_event
from tests.pipeline import Pipeline

ADMIN_TOKEN = "admin-secret-token"
SECRET_KEY = "admin-page-secret-key-for-tests"
BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


@pytest.fixture
def pipeline(
    settings: Settings, sessions: sessionmaker[Session], hubspot: FakeHubSpot
) -> Iterator[Pipeline]:
    """The shared pipeline with the admin API and the admin page on."""
    configured = settings.model_copy(
        update={
            "retry_schedule": ("0s",) * 4,
            "admin_token": ADMIN_TOKEN,
            "secret_key": SECRET_KEY,
        }
    )
    pipe = Pipeline(configured, sessions, hubspot)
    yield pipe
    pipe.close()


def sign_in(pipeline: Pipeline, next_page: str | None = None) -> Any:
    query = {"next": next_page} if next_page is not None else {}
    form = pipeline.client.get("/admin/login", query_string=query)
    match = _CSRF.search(form.get_data(as_text=True))
    assert match, "the sign-in form carries a CSRF token"
    return pipeline.client.post(
        "/admin/login",
        query_string=query,
        data={"csrf_token": match.group(1), "token": ADMIN_TOKEN},
    )


# The admin JSON API takes a bearer token only


def basic(user: str, password: str) -> dict[str, str]:
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {encoded}"}


ADMIN_ROUTES = [
    ("get", "/admin/deliveries"),
    ("get", "/admin/deliveries/1"),
    ("post", "/admin/deliveries/1/replay"),
    ("post", "/admin/replay"),
    ("post", "/admin/destinations/hubspot/pause"),
    ("post", "/admin/destinations/hubspot/resume"),
]


@pytest.mark.parametrize("user", ["", "admin"])
def test_the_admin_api_refuses_http_basic_even_with_the_right_token(
    pipeline: Pipeline, user: str
) -> None:
    # A browser that once signed in with Basic replays it on any cross-site form post.
    for method, path in ADMIN_ROUTES:
        response = getattr(pipeline.client, method)(
            path, headers=basic(user, ADMIN_TOKEN), json={"status": "failed"}
        )
        assert response.status_code == 401, (path, response.json)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    with pipeline.sessions() as session:
        assert session.scalars(select(DestinationState)).all() == []
    assert pipeline.client.get("/admin/deliveries", headers=BEARER).status_code == 200


# Email masking


def test_non_ascii_addresses_are_masked() -> None:
    assert scrub("upsert of JÖHN@EXÄMPLE.com refused") == "upsert of J***@EXÄMPLE.com refused"
    assert mask_email("ΓΙΑΝΝΗΣ@παράδειγμα.ελ") == "Γ***@παράδειγμα.ελ"
    assert scrub("Email address δοκιμή@例え.テスト is invalid") == (
        "Email address δ***@例え.テスト is invalid"
    )


# Characters that end an address in running text, before and after it.
_BEFORE = ["", " ", "upsert of ", "<", '"email": "', "'", "mailto:", "email=", "(", "\n", "/"]
_AFTER = ["", " ", " refused", ">", '"}', ".", ",", ")", ";", "\n", "&x=1", "/x"]
_LETTER = st.characters(categories=["L"])
_NAME_CHARACTER = st.characters(categories=["L", "M", "N"])
local_parts = st.builds(
    lambda first, rest: first + rest,
    _NAME_CHARACTER | st.sampled_from("._%+-!#$^~"),
    st.text(_NAME_CHARACTER | st.sampled_from("._%+-'!#$^~"), max_size=20),
)
labels = st.text(_NAME_CHARACTER | st.just("-"), min_size=1, max_size=12)
top_level_domains = st.builds(
    lambda first, rest: first + rest, _LETTER, st.text(_NAME_CHARACTER, min_size=1, max_size=6)
)
domains = st.builds(
    lambda names, top: ".".join([*names, top]),
    st.lists(labels, min_size=1, max_size=3),
    top_level_domains,
)


@given(
    local=local_parts,
    domain=domains,
    before=st.sampled_from(_BEFORE),
    after=st.sampled_from(_AFTER),
)
@example(local="JÖHN", domain="EXÄMPLE.com", before="", after="")
@example(local="ΓΙΑΝΝΗΣ", domain="παράδειγμα.ελ", before="Email address ", after=" is invalid")
@example(local="नमस्ते", domain="उदाहरण.भारत", before="", after="")
def test_any_address_keeps_only_the_first_character_of_its_local_part(
    local: str, domain: str, before: str, after: str
) -> None:
    """The rule is ``j***@example.com``: the rest of the local part is never in clear."""
    masked = f"{local[0]}***@{domain}"
    assert mask_email(f"{local}@{domain}") == masked
    assert scrub(f"{before}{local}@{domain}{after}") == f"{before}{masked}{after}"
    assert scrub(masked) == masked, "masking twice changes nothing"


# Hosts without a top-level domain, which scrub() leaves alone (a Celery node, worker1@host).
hosts = st.text(st.characters(categories=["L", "N"]), min_size=1, max_size=12)


@given(
    local=local_parts,
    host=hosts,
    before=st.sampled_from(_BEFORE),
    after=st.sampled_from(_AFTER),
)
@example(local="ann", host="localhost", before="", after="")
@example(local="γιάννης", host="localhost", before="", after="")
@example(local="नमस्ते", host="localhost", before="sent to '", after="'.")
@example(local="o'brien", host="host", before="", after="")
def test_views_mask_an_address_without_a_top_level_domain_in_any_script(
    local: str, host: str, before: str, after: str
) -> None:
    shown = f"{local[0]}***@{host}"
    assert masked({"email": f"{local}@{host}"}) == {"email": shown}
    assert masked(f"{before}{local}@{host}{after}") == f"{before}{shown}{after}"
    assert masked(shown) == shown, "masking twice changes nothing"


def test_masking_long_text_takes_one_pass() -> None:
    started = time.monotonic()
    for text in ("a" * 100_000, "a@" * 50_000, "a." * 50_000 + "@b", "x@" + "b." * 50_000):
        assert scrub(text) == text
    assert time.monotonic() - started < 5, "masking is quadratic in the text's length"


def test_the_admin_api_masks_non_ascii_addresses(pipeline: Pipeline) -> None:
    pipeline.post(auth0_event("user.created", "auth0|gr", email="ΓΙΑΝΝΗΣ@παράδειγμα.ελ"))
    pipeline.post(auth0_event("user.created", "auth0|de", email="JÖHN@EXÄMPLE.com"))
    for delivery_id in (1, 2):
        body = pipeline.client.get(f"/admin/deliveries/{delivery_id}", headers=BEARER)
        assert body.status_code == 200
        text = json.dumps(body.json, ensure_ascii=False)
        assert "ΙΑΝΝΗΣ" not in text and "ÖHN" not in text
    assert "Γ***@παράδειγμα.ελ" in json.dumps(
        pipeline.client.get("/admin/deliveries/1", headers=BEARER).json, ensure_ascii=False
    )


# A payload nested deeper than anything renders


def nested(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = {"inner": value}
    return value


def stored_with_deep_payload(pipeline: Pipeline, levels: int = 600) -> int:
    """One delivery whose stored event holds an object ``levels`` deep (stored before
    ingest limited nesting, or written by hand)."""
    pipeline.post(auth0_event("user.created", "auth0|deep", email="deep@example.com"))
    with transaction(pipeline.sessions) as session:
        event = session.scalars(select(Event)).one()
        payload = dict(event.payload or {})
        payload["data"] = {**payload["data"], "deep": nested(levels)}
        session.execute(update(Event).where(Event.id == event.id).values(payload=payload))
        return session.scalars(select(Delivery.id)).one()


def test_the_admin_api_shows_a_deeply_nested_payload_truncated(pipeline: Pipeline) -> None:
    delivery_id = stored_with_deep_payload(pipeline)
    response = pipeline.client.get(f"/admin/deliveries/{delivery_id}", headers=BEARER)
    assert response.status_code == 200, response.data[:300]
    payload = response.json["event"]["payload"]
    assert payload["data"]["object"]["email"] == "d***@example.com"
    text = json.dumps(payload)
    assert "truncated" in text and "bottom" not in text


def test_the_admin_page_shows_a_deeply_nested_payload_truncated(pipeline: Pipeline) -> None:
    delivery_id = stored_with_deep_payload(pipeline)
    sign_in(pipeline)
    page = pipeline.client.get(f"/admin/ui/deliveries/{delivery_id}")
    assert page.status_code == 200, page.data[:300]
    body = page.get_data(as_text=True)
    assert "truncated" in body and "d***@example.com" in body


def test_deliveries_show_prints_a_deeply_nested_payload_truncated(
    env: dict[str, str], pipeline: Pipeline
) -> None:
    delivery_id = stored_with_deep_payload(pipeline)
    for extra in ([], ["--json"]):
        result = idsync("deliveries", "show", str(delivery_id), *extra)
        assert result.exit_code == 0, (extra, result.output[-300:], result.exception)
        assert "truncated" in result.output and "bottom" not in result.output
        assert "d***@example.com" in result.output and "deep@" not in result.output


# The sign-in's next= parameter


@pytest.mark.parametrize(
    "target",
    [
        "/admin/\r\nSet-Cookie: idsync_admin=forged",
        "/admin/?status=failed\r\n",
        "/admin/\nLocation: https://evil.example/",
        "/admin/\x00",
        "/admin/\t/x",
    ],
    ids=["crlf-header", "trailing-crlf", "lf", "nul", "tab"],
)
def test_a_control_character_in_next_redirects_to_the_admin_index(
    pipeline: Pipeline, target: str
) -> None:
    response = sign_in(pipeline, next_page=target)
    assert response.status_code == 302, response.data[:300]
    assert response.location == "/admin/"
    assert "evil" not in str(response.headers) and "forged" not in str(response.headers)


# The command line prints stored text as text


HOSTILE_SUBJECTS = ["[/]", "[link=https://evil.example]x[/link]", "\x1b[31mred"]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, database_url: str, redis_prefix: str) -> dict[str, str]:
    """The environment an operator's shell would have, pointing at the test outbox."""
    values = {
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": REDIS_URL,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": redis_prefix,
        "DESTINATIONS": "hubspot",
        "HUBSPOT_TOKEN": "fake-token",
        "COLUMNS": "250",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    return values


def idsync(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def hostile_rows(pipeline: Pipeline) -> list[int]:
    """A delivery per hostile user_id, with an attempt whose stored texts are hostile too."""
    for subject in HOSTILE_SUBJECTS:
        answer = pipeline.post(auth0_event("user.created", subject, email="x@example.com"))
        assert answer.status_code == 202, answer.json
    with transaction(pipeline.sessions) as session:
        ids = list(session.scalars(select(Delivery.id).order_by(Delivery.id)))
        for delivery_id, subject in zip(ids, HOSTILE_SUBJECTS, strict=True):
            session.execute(
                update(Delivery).where(Delivery.id == delivery_id).values(last_error=subject)
            )
            session.add(
                DeliveryAttempt(
                    delivery_id=delivery_id,
                    request_summary=f"PATCH {subject}",
                    outcome="retry",
                    error_category=subject,
                    response_excerpt=f"HubSpot said {subject}",
                )
            )
    return ids


def assert_shown_as_text(result: Result) -> None:
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    assert "\x1b" not in result.output, "an escape sequence reached the terminal"
    for subject in HOSTILE_SUBJECTS:
        assert subject.replace("\x1b", "") in result.output


def test_deliveries_prints_stored_markup_and_escapes_as_text(
    env: dict[str, str], pipeline: Pipeline
) -> None:
    hostile_rows(pipeline)
    assert_shown_as_text(idsync("deliveries"))


@pytest.mark.parametrize("index", range(len(HOSTILE_SUBJECTS)))
def test_deliveries_show_prints_stored_markup_and_escapes_as_text(
    env: dict[str, str], pipeline: Pipeline, index: int
) -> None:
    delivery_id = hostile_rows(pipeline)[index]
    result = idsync("deliveries", "show", str(delivery_id))
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    assert "\x1b" not in result.output, "an escape sequence reached the terminal"
    subject = HOSTILE_SUBJECTS[index].replace("\x1b", "")
    assert result.output.count(subject) >= 4  # subject, last error, attempt, payload


# What fuzzing the admin API found: the request's fault is a 400 or 404, never a 5xx


def test_an_id_beyond_the_id_column_is_not_found(pipeline: Pipeline) -> None:
    huge = 2**63
    for method, path in [
        ("get", f"/admin/deliveries/{huge}"),
        ("post", f"/admin/deliveries/{huge}/replay"),
    ]:
        response = getattr(pipeline.client, method)(path, headers=BEARER)
        assert response.status_code == 404, (path, response.json)
    sign_in(pipeline)
    assert pipeline.client.get(f"/admin/ui/deliveries/{huge}").status_code == 404


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("cursor", str(2**63)),
        ("subject", "auth0|\x00"),
        ("since", "9999-12-31T23:59:59-23:59"),
        ("until", "99999999999999999999w"),
    ],
)
def test_a_filter_the_database_cannot_take_is_a_400(
    pipeline: Pipeline, name: str, value: str
) -> None:
    listed = pipeline.client.get("/admin/deliveries", query_string={name: value}, headers=BEARER)
    assert listed.status_code == 400, listed.json
    assert name in listed.json["error"] or "since and until" in listed.json["error"]
    replayed = pipeline.client.post(
        "/admin/replay", json={name: value, "dry_run": True}, headers=BEARER
    )
    assert replayed.status_code == 400, replayed.json
    sign_in(pipeline)
    assert pipeline.client.get("/admin/", query_string={name: value}).status_code == 400


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b'{"status": "failed", "x": ' + b"[" * 5_000 + b"]" * 5_000],
    ids=["deep", "deep-inside"],
)
def test_a_json_body_nested_past_the_parser_is_a_400(pipeline: Pipeline, body: bytes) -> None:
    for path in ("/admin/replay", "/admin/destinations/hubspot/pause"):
        response = pipeline.client.post(
            path, data=body, content_type="application/json", headers=BEARER
        )
        assert response.status_code == 400, (path, response.json)


@pytest.mark.parametrize(
    "body",
    ['"maintenance"', "[1]", '{"reason": "x", "reson": "typo"}', '{"reason": "a\\u0000b"}', "no"],
)
def test_pause_refuses_a_body_that_is_not_a_reason(pipeline: Pipeline, body: str) -> None:
    response = pipeline.client.post(
        "/admin/destinations/hubspot/pause",
        data=body,
        content_type="application/json",
        headers=BEARER,
    )
    assert response.status_code == 400, response.json
    with pipeline.sessions() as session:
        assert session.scalars(select(DestinationState)).all() == []
    paused = pipeline.client.post("/admin/destinations/hubspot/pause", headers=BEARER)
    assert paused.status_code == 200 and paused.json["paused"] is True
