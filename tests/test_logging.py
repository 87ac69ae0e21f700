"""Logs are JSON, carry their context, and never hold a token or an unmasked email.

The end-to-end test runs real users through the real processes (gunicorn,
two Celery workers, beat, the fake HubSpot), with a permanent failure, an
email HubSpot rejects and echoes back, and a 401 that pauses the destination,
then reads everything the run wrote: every log file of the stack and every
stored delivery and attempt.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from sqlalchemy import select

from idsync.logs import json_formatter, register_secrets, scrub
from models.tables import Delivery, DeliveryAttempt, DestinationState
from tests.events import auth0_event
from tests.processes import INGEST_TOKEN, ServiceStack, iter_logs, wait_for

HUBSPOT_TOKEN = "fake-token"
EMAILS = {
    "auth0|log-alice": "Alice.Liddell@example.com",
    "auth0|log-bob": "bob.builder@example.org",
    "auth0|log-carol": "carol@@example.com",  # HubSpot rejects it and quotes it back
    "auth0|log-dave": "dave.jones@example.net",
}
NEW_ALICE = "alice.l@example.co.uk"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger that writes through ``json_formatter`` into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(json_formatter("test"))
    logger = logging.getLogger("idsync.test_logging")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, buffer
    logger.removeHandler(handler)
    structlog.contextvars.clear_contextvars()


def test_lines_are_masked_json_with_their_context(
    captured: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, buffer = captured
    register_secrets(["s3cret-hubspot-token"])
    structlog.contextvars.bind_contextvars(delivery_id=7, event_id="evt_1", destination="hubspot")
    try:
        raise ValueError("upsert of Jane.Doe@Example.com refused")
    except ValueError:
        logger.exception(
            "call to %s failed",
            "https://api.hubapi.com/x?hapikey=abc123",
            extra={
                "headers": {"Authorization": "Bearer abc.def", "X-Token": "s3cret-hubspot-token"},
                "emails": ["john.doe@example.com"],
            },
        )
    line = json.loads(buffer.getvalue())
    text = buffer.getvalue()
    assert line["delivery_id"] == 7 and line["event_id"] == "evt_1"
    assert line["destination"] == "hubspot" and line["process_name"] == "test"
    assert line["emails"] == ["j***@example.com"]
    assert "J***@Example.com" in line["exception"]
    for secret in ("Jane.Doe", "john.doe", "abc.def", "abc123", "s3cret-hubspot-token"):
        assert secret not in text


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("john.doe@example.com", "j***@example.com"),
        (
            "Email address carol@@example.com is invalid",
            "Email address c***@example.com is invalid",
        ),
        ("Authorization: Bearer abc", "Authorization: Bearer ***"),
        ("{'authorization': 'xyz'}", "{'authorization': '***'}"),
        ("postgresql://idsync:pw@db:5432/idsync", "postgresql://idsync:***@db:5432/idsync"),
        ("worker1@host ready", "worker1@host ready"),  # a Celery node name, not an email
        ("j***@example.com", "j***@example.com"),  # masking twice changes nothing
    ],
)
def test_scrub(raw: str, masked: str) -> None:
    assert scrub(raw) == masked


def _post_and_wait(e2e: ServiceStack, document: dict[str, Any], expected: int) -> None:
    assert e2e.post(document).status_code == 202
    e2e.wait_finished(expected)


def _paused(e2e: ServiceStack) -> bool:
    with e2e.sessions() as session:
        state = session.get(DestinationState, "hubspot")
        return bool(state and state.paused)


def _stored_text(e2e: ServiceStack) -> str:
    """Every stored delivery and attempt, every column, as one text."""
    with e2e.sessions() as session:
        rows: list[Any] = [
            *session.scalars(select(Delivery)),
            *session.scalars(select(DeliveryAttempt)),
        ]
        return "\n".join(
            repr({column.key: getattr(row, column.key) for column in row.__table__.columns})
            for row in rows
        )


@pytest.mark.e2e
def test_no_token_or_email_in_logs_or_attempts(e2e: ServiceStack) -> None:
    alice, bob, carol, dave = EMAILS.values()
    _post_and_wait(e2e, auth0_event("user.created", "auth0|log-alice", email=alice, at=0), 1)
    # A permanent failure: the update of Alice's linked contact answers 400.
    e2e.hubspot.fail_next(1, status=400)
    changed = auth0_event(
        "user.updated", "auth0|log-alice", email=NEW_ALICE, previous_email=alice, at=10
    )
    _post_and_wait(e2e, changed, 2)
    _post_and_wait(e2e, auth0_event("user.created", "auth0|log-bob", email=bob, at=0), 3)
    _post_and_wait(e2e, auth0_event("user.created", "auth0|log-carol", email=carol, at=0), 4)
    # A rejected token pauses the destination; the probe resumes it once it works again.
    e2e.hubspot.set_token("rotated")
    assert e2e.post(auth0_event("user.created", "auth0|log-dave", email=dave)).status_code == 202
    wait_for(lambda: _paused(e2e), 30, "the 401 to pause HubSpot")
    e2e.hubspot.set_token(HUBSPOT_TOKEN)
    e2e.wait_finished(5)

    reasons = sorted(reason or "" for _status, reason in e2e.statuses())
    assert e2e.statuses().count(("failed", "rejected")) == 2, reasons
    stored = _stored_text(e2e)
    logs = {path.name: text for path, text in iter_logs(e2e.workdir)}
    assert {"ingest.log", "worker1.log", "worker2.log", "beat.log"} <= set(logs)
    everything = {"stored deliveries and attempts": stored, **logs}
    raw = [email.lower() for email in (*EMAILS.values(), NEW_ALICE)]
    for name, text in everything.items():
        lowered = text.lower()
        for secret in (INGEST_TOKEN, HUBSPOT_TOKEN, *raw):
            assert secret not in lowered, f"{secret!r} found in {name}"
    # HubSpot quoted Carol's address in its error: it was stored, masked.
    assert "c***@example.com" in stored
    _check_json_lines(logs)


def _check_json_lines(logs: dict[str, str]) -> None:
    """Every log record is one JSON object; requests and tasks carry their context."""
    records = []
    for name, text in logs.items():
        for line in text.splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
            else:
                # Only Celery's start-up banner and warnings printed before logging starts.
                assert not name.startswith("ingest"), f"not JSON in {name}: {line!r}"
    requests_ = [r for r in records if r.get("logger") == "gunicorn.access"]
    assert any(r["method"] == "POST" and r["path"] == "/events/auth0" for r in requests_)
    for record in requests_:
        assert not {key.lower() for key in record} & {"authorization", "headers", "query"}
    pauses = [r for r in records if "paused" in r["event"] and r["logger"] == "workers.delivery"]
    assert pauses, "the pause was not logged"
    assert {"task_id", "destination", "delivery_id"} <= set(pauses[-1])
    batches = [r for r in records if r["event"] == "batch delivered"]
    assert batches and all(r["destination"] == "hubspot" and r["task_id"] for r in batches)
    assert {r["process_name"] for r in records} >= {"ingest", "worker", "beat"}
