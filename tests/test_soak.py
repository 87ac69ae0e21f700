"""Soak: many events with random faults; afterwards every event is accounted for.

The suite runs a short version; ``make soak`` runs 5,000 events
(IDSYNC_SOAK_EVENTS sets the size).
"""

from __future__ import annotations

import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from models.commands import replay
from models.queries import DeliveryFilter
from models.tables import Delivery, Event
from tests.events import auth0_event
from tests.processes import ServiceStack

pytestmark = pytest.mark.e2e

EVENTS = int(os.environ.get("IDSYNC_SOAK_EVENTS", "400"))
# The transient statuses the soak injects; a delivery whose budget they spend ends
# ``retries_exhausted`` with the last of them.
INJECTED_STATUSES = (500, 502, 503, 423)


def check_failure_reasons(e2e: ServiceStack, invalid_events: set[str]) -> None:
    """Every delivery that did not succeed says why, and the why fits the faults injected.

    Only events with an invalid email may be ``rejected``; anything else may fail only
    by spending its retry budget on the injected transient errors; skips are ``stale``.
    """
    with e2e.sessions() as session:
        rows = session.execute(
            select(
                Event.event_id, Delivery.status, Delivery.reason, Delivery.last_status_code
            ).join(Delivery)
        ).all()
    reasons = Counter(
        (row.status.value, row.reason) for row in rows if row.status.value != "succeeded"
    )
    print(f"soak: {len(rows)} deliveries; not succeeded by (status, reason): {dict(reasons)}")
    unexpected = []
    for row in rows:
        status, reason = row.status.value, row.reason
        if status == "skipped":
            ok = reason == "stale"
        elif status == "failed" and reason == "rejected":
            ok = row.event_id in invalid_events
        elif status == "failed":
            ok = reason == "retries_exhausted" and row.last_status_code in INJECTED_STATUSES
        else:
            ok = status == "succeeded"
        if not ok:
            unexpected.append((row.event_id, status, reason, row.last_status_code))
    assert not unexpected, (unexpected[:20], dict(reasons))


def test_soak_with_random_faults_accounts_for_every_event(e2e: ServiceStack) -> None:
    rng = random.Random(EVENTS)
    users = max(10, EVENTS // 8)
    newest: dict[str, tuple[int, str, str]] = {}
    documents = []
    invalid_events: set[str] = set()
    for n in range(EVENTS):
        user = f"auth0|soak{rng.randrange(users)}"
        email = f"{user[6:]}.{rng.randrange(3)}@example.com"
        if rng.random() < 0.01:
            email = f"{user[6:]} invalid"  # a permanent failure HubSpot rejects
        name = rng.choice(["Ann", "Bo", "Cy", "Di"])
        document = auth0_event("user.updated", user, email=email, given_name=name, at=n)
        documents.append(document)
        if " invalid" in email:
            invalid_events.add(document["id"])
        newest[user] = (n, email, name)
    rng.shuffle(documents)

    def post_with_faults(chunk: list) -> None:
        for document in chunk:
            fault = rng.random()
            if fault < 0.02:
                e2e.hubspot.fail_next(rng.randint(1, 3), status=rng.choice([500, 502, 503, 423]))
            elif fault < 0.03:
                e2e.hubspot.rate_limit_next(rng.randint(1, 4), retry_after=0.2)
            elif fault < 0.04:
                e2e.hubspot.slow_next(1, 0.3)
            assert e2e.post(document).status_code == 202

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(post_with_faults, [documents[i::4] for i in range(4)]))
    e2e.wait_finished(EVENTS, timeout=max(120, EVENTS / 10))
    check_failure_reasons(e2e, invalid_events)
    # Fault storms can outlast a delivery's (short, in tests) retry budget: those end
    # failed with their reason, and the operator's replay brings them home.
    with e2e.sessions() as session, session.begin():
        exhausted = DeliveryFilter(status="failed")
        replayed = replay(session=session, filter=exhausted).replayed
    if replayed:
        e2e.wait_finished(EVENTS, timeout=120)

    with e2e.sessions() as session:
        rows = session.execute(
            select(Event.subject, Delivery.status, Delivery.reason).join(Delivery)
        ).all()
    assert len(rows) == EVENTS
    for row in rows:
        assert row.status.value in ("succeeded", "skipped", "failed")
        if row.status.value != "succeeded":
            assert row.reason, row  # skipped and failed always say why
    live = {c["properties"]["email"]: c["properties"] for c in e2e.hubspot.contacts()}
    for user, (_n, email, name) in newest.items():
        if " invalid" in email:
            failed = [r for r in rows if r.subject == user and r.status.value == "failed"]
            assert failed and failed[0].reason in ("rejected", "retries_exhausted")
            continue
        history = [(r.status.value, r.reason) for r in rows if r.subject == user]
        assert email in live, (user, email, history)
        assert live[email]["firstname"] == name, (user, name, history)
