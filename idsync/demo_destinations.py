"""The demo's destinations: a local simulator per destination, and the end state each must reach.

``idsync demo`` delivers to the destinations ``DESTINATIONS`` names (``hubspot``
when unset), each of any kind with a simulator in ``idsync/fakes/``: HubSpot,
Salesforce, Segment, Braze and signed webhooks. Every destination gets its own
simulator on loopback and the settings that point at it; after the scripted
events, each is checked against what the newest event of every demo user says:

- Ann: created, then her email changed (``ann.lee@example.com``); an older update
  that arrives last changes nothing.
- Bob: blocked by SCIM deactivation. Cat: deleted, by an event without an email.
- Dan: a user without an email (HubSpot and the webhook key nothing on an email
  alone; the others key by the Auth0 ``user_id``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from idsync.destinations import kind_of
from idsync.fakes.braze import DEFAULT_KEY as BRAZE_KEY
from idsync.fakes.braze import FakeBraze
from idsync.fakes.hubspot import FakeHubSpot
from idsync.fakes.salesforce import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, FakeSalesforce
from idsync.fakes.segment import DEFAULT_WRITE_KEY, FakeSegment
from idsync.fakes.webhook_receiver import DEFAULT_SECRET, FakeWebhookReceiver

# The local simulator's own token: it guards nothing but the demo's fake HubSpot.
DEMO_HUBSPOT_TOKEN = "demo-hubspot-token"  # noqa: S105
ANN, BOB, CAT, DAN = (f"auth0|demo-{name}" for name in ("ann", "bob", "cat", "dan"))
HUBSPOT_PASSED = (
    "one live contact (Ann, new email), Bob archived after SCIM deactivation, Cat "
    "archived without an email, Dan skipped for want of an email."
)


@dataclass
class DemoDestination:
    """One destination of the demo: its simulator, the settings that point at it, its check."""

    name: str
    kind: str
    fake: Any  # a running simulator from idsync/fakes
    settings: dict[str, str]
    # () -> the problems with the simulator's end state (none: it is right), and what is right.
    check: Callable[[], list[str]]
    passed: str

    def verdict(self) -> tuple[bool, str]:
        """Whether the end state is right, and one line that says what it holds."""
        label = self.name if self.name == self.kind else f"{self.name} ({self.kind})"
        problems = self.check()
        if problems:
            return False, f"{label}: " + "; ".join(problems)
        return True, f"{label}: {self.passed}"


def demo_destinations(env: Mapping[str, str]) -> list[str]:
    """The destinations the demo delivers to: ``DESTINATIONS``, else ``hubspot``."""
    names = [part.strip() for part in env.get("DESTINATIONS", "").split(",") if part.strip()]
    return list(dict.fromkeys(names)) or ["hubspot"]


def start_destination(
    name: str, env: Mapping[str, str], enter: Callable[[AbstractContextManager[Any]], Any]
) -> DemoDestination:
    """Start the simulator of destination ``name`` (``enter`` keeps it running) and describe it.

    ValueError for a kind the demo has no simulator of.
    """
    kind = kind_of(name, env)
    prefix = f"{name.upper()}_"
    if kind == "hubspot":
        hubspot = enter(FakeHubSpot(token=DEMO_HUBSPOT_TOKEN, rate_limit=100, window_seconds=10))
        return DemoDestination(
            name,
            kind,
            hubspot,
            {
                f"{prefix}TOKEN": DEMO_HUBSPOT_TOKEN,
                f"{prefix}BASE_URL": hubspot.url,
                f"{prefix}DEPROVISION": "archive",
            },
            lambda: hubspot_problems(hubspot),
            HUBSPOT_PASSED,
        )
    if kind == "salesforce":
        salesforce = enter(FakeSalesforce())
        return DemoDestination(
            name,
            kind,
            salesforce,
            {
                f"{prefix}LOGIN_URL": salesforce.url,
                f"{prefix}CLIENT_ID": DEFAULT_CLIENT_ID,
                f"{prefix}CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
                f"{prefix}DEPROVISION": "mark",
            },
            lambda: salesforce_problems(salesforce),
            "Ann's Contact has her new email, Bob's and Cat's are marked "
            "Idsync_Deprovisioned__c, Dan's is keyed by his user_id alone.",
        )
    if kind == "segment":
        segment = enter(FakeSegment())
        return DemoDestination(
            name,
            kind,
            segment,
            {f"{prefix}WRITE_KEY": DEFAULT_WRITE_KEY, f"{prefix}BASE_URL": segment.url},
            lambda: segment_problems(segment),
            "Ann identified with her new email, Bob and Cat identified deprovisioned "
            "with a track each, Dan identified by his user_id.",
        )
    if kind == "braze":
        braze = enter(FakeBraze())
        return DemoDestination(
            name,
            kind,
            braze,
            {
                f"{prefix}REST_ENDPOINT": braze.url,
                f"{prefix}API_KEY": BRAZE_KEY,
                f"{prefix}DEPROVISION": "mark",
            },
            lambda: braze_problems(braze),
            "Ann's profile has her new email, Bob's and Cat's carry "
            "idsync_deprovisioned, Dan's is keyed by his user_id.",
        )
    if kind == "webhook":
        receiver = enter(FakeWebhookReceiver())
        return DemoDestination(
            name,
            kind,
            receiver,
            {f"{prefix}URL": receiver.url, f"{prefix}SECRET": DEFAULT_SECRET},
            lambda: webhook_problems(receiver),
            "every message verified; the last one says Ann upserted with her new "
            "email, Bob deprovisioned, Cat deleted, Dan upserted.",
        )
    raise ValueError(f"the demo has no simulator for destination {name!r} of kind {kind!r}")


# The end states


def hubspot_problems(fake: FakeHubSpot) -> list[str]:
    """One live contact (Ann, new email, first name Ann); Bob and Cat archived."""
    live = {c["properties"].get("email"): c["properties"] for c in fake.contacts()}
    archived = {
        c["properties"].get("email")
        for c in fake.contacts(include_archived=True)
        if c.get("archived")
    }
    problems = []
    if set(live) != {"ann.lee@example.com"}:
        problems.append(f"live contacts are {sorted(map(str, live))}, expected ann.lee@example.com")
    elif live["ann.lee@example.com"].get("firstname") != "Ann":
        problems.append(f"Ann's first name is {live['ann.lee@example.com'].get('firstname')!r}")
    if archived != {"bob@example.com", "cat@example.com"}:
        problems.append(
            f"archived contacts are {sorted(map(str, archived))}, expected Bob's, Cat's"
        )
    return problems


def salesforce_problems(fake: FakeSalesforce) -> list[str]:
    """One Contact per user: Ann's current, Bob's and Cat's marked, Dan's live."""
    records: dict[str, list[dict[str, Any]]] = {}
    for record in fake.records("Contact"):
        records.setdefault(str(record.get("Auth0_User_Id__c")), []).append(record)
    expected: dict[str, dict[str, Any]] = {
        ANN: {
            "Email": "ann.lee@example.com",
            "FirstName": "Ann",
            "LastName": "Lee",
            "Idsync_Deprovisioned__c": False,
        },
        BOB: {"Email": "bob@example.com", "Idsync_Deprovisioned__c": True},
        CAT: {"Email": "cat@example.com", "Idsync_Deprovisioned__c": True},
        DAN: {"FirstName": "Dan", "Idsync_Deprovisioned__c": False},
    }
    problems = []
    for user, fields in expected.items():
        found = records.pop(user, [])
        if len(found) != 1:
            problems.append(f"{user} has {len(found)} Contacts")
        elif (got := {k: found[0].get(k) for k in fields}) != fields:
            problems.append(f"{user} is {got}, expected {fields}")
    if records:
        problems.append(f"unexpected Contacts for {sorted(records)}")
    return problems


def segment_problems(fake: FakeSegment) -> list[str]:
    """Each user's traits as the newest event says; a track for Bob's block and Cat's delete."""
    users = fake.records()
    expected: dict[str, dict[str, Any]] = {
        ANN: {"email": "ann.lee@example.com", "firstName": "Ann", "deprovisioned": False},
        BOB: {"email": "bob@example.com", "deprovisioned": True},
        CAT: {"deprovisioned": True},
        DAN: {"firstName": "Dan", "deprovisioned": False},
    }
    tracks = {BOB: ["User Deprovisioned"], CAT: ["User Deleted"]}
    problems = []
    for user, traits in expected.items():
        held = users.get(user)
        if held is None:
            problems.append(f"{user} was never identified")
            continue
        if (got := {k: held["traits"].get(k) for k in traits}) != traits:
            problems.append(f"{user}'s traits are {got}, expected {traits}")
        if (events := [t["event"] for t in held["tracks"]]) != tracks.get(user, []):
            problems.append(f"{user}'s tracks are {events}")
    return problems


def braze_problems(fake: FakeBraze) -> list[str]:
    """Each user's profile attributes as the newest event says."""
    profiles = fake.profiles()
    expected: dict[str, dict[str, Any]] = {
        ANN: {"email": "ann.lee@example.com", "first_name": "Ann", "idsync_deprovisioned": False},
        BOB: {"email": "bob@example.com", "idsync_deprovisioned": True},
        CAT: {"email": "cat@example.com", "idsync_deprovisioned": True},
        DAN: {"first_name": "Dan", "idsync_deprovisioned": False},
    }
    problems = []
    for user, attributes in expected.items():
        profile = profiles.get(user)
        if profile is None:
            problems.append(f"{user} has no profile")
        elif (got := {k: profile.get(k) for k in attributes}) != attributes:
            problems.append(f"{user}'s profile is {got}, expected {attributes}")
    return problems


def webhook_problems(receiver: FakeWebhookReceiver) -> list[str]:
    """The newest message of each user says its newest state; every request was verified."""
    last = {m["data"]["user_id"]: m for m in receiver.messages()}
    expected = {
        ANN: ("user.upserted", "ann.lee@example.com"),
        BOB: ("user.deprovisioned", "bob@example.com"),
        CAT: ("user.deleted", None),
        DAN: ("user.upserted", None),
    }
    problems = []
    for user, (kind, email) in expected.items():
        message = last.get(user)
        if message is None:
            problems.append(f"{user} got no message")
        elif (message["type"], message["data"]["email"]) != (kind, email):
            problems.append(f"{user}'s last message is {message['type']} {message['data']}")
    if not all(
        r.verified for r in receiver.requests_log if r.status is not None and r.status < 300
    ):
        problems.append("a message was accepted without a valid signature")
    return problems
