"""The bare loop: the least a delivery worker can do, as the capacity phase's baseline.

One Python process (the benchmark's own), psycopg 3 and ``requests.Session``, no
SQLAlchemy and no Celery, on an autocommit connection:

1. claim up to 100 pending deliveries with one ``UPDATE deliveries ... WHERE id IN
   (SELECT id ... FOR UPDATE SKIP LOCKED LIMIT 100) RETURNING`` that also returns each
   user's Auth0 profile (and, for updates, the contact id the first pass wrote);
2. send them to the fake HubSpot as one batch call: ``batch/upsert`` by email for new
   users, ``batch/update`` by contact id for linked ones;
3. mark them succeeded with one ``UPDATE`` (writing the new contacts' ids).

It runs on idsync's own tables (a copy of the migrated schema, with their indexes),
filled by the same ``insert_backlog`` as the capacity phase (then analyzed), in a
database of its own so the two runs share no rows; and against the same fake HubSpot
process, before idsync's workers start (the fake is reset afterwards). It keeps no
history, no links table, no ordering per user, no retries: the floor under what idsync's
worker does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import psycopg
import requests

from bench.common import cpu_seconds, own_database, process_tree
from bench.delivery import (
    HUBSPOT_TOKEN,
    cpu_spent,
    database_clock,
    drain_timing,
    insert_backlog,
)

BATCH = 100
CONTACTS = "/crm/v3/objects/contacts"
PROPERTY_MAP = {  # idsync's default HubSpot property map
    "email": "email",
    "given_name": "firstname",
    "family_name": "lastname",
    "phone_number": "phone",
}

_CLAIM = """
UPDATE deliveries AS d SET status = 'in_progress', attempts = d.attempts + 1
FROM events AS e
WHERE d.id IN (
    SELECT id FROM deliveries
    WHERE destination = 'hubspot' AND status = 'pending' AND held IS NULL
    ORDER BY priority, next_attempt_at, id
    LIMIT %s FOR UPDATE SKIP LOCKED
) AND e.id = d.event_pk
RETURNING d.id, e.payload #> '{{data,object}}', {contact_id}
"""
# New users have no contact yet; linked users' contact id is the one their first
# delivery wrote.
_CLAIM_NEW = _CLAIM.format(contact_id="NULL::text")
_CLAIM_LINKED = _CLAIM.format(
    contact_id="""(
    SELECT p.external_id FROM deliveries AS p
    WHERE p.destination = d.destination AND p.source = d.source AND p.subject = d.subject
      AND p.status = 'succeeded' AND p.external_id IS NOT NULL
    LIMIT 1)"""
)
_SUCCEEDED = """
UPDATE deliveries
SET status = 'succeeded', finished_at = clock_timestamp(),
    external_id = (%(contact_ids)s::text[])[array_position(%(ids)s::bigint[], id)]
WHERE id = ANY(%(ids)s::bigint[])
"""


@dataclass
class BarePass:
    kind: str  # "created" or "updated"
    users: int
    elapsed: float  # first claim to the last finished delivery, seconds
    synced: int
    cpu: dict[str, float]  # CPU seconds by process group

    @property
    def rate(self) -> float:
        """Contacts synced per second."""
        return self.synced / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class BareLoopResult:
    passes: list[BarePass] = field(default_factory=list)

    def of(self, kind: str) -> BarePass | None:
        return next((done for done in self.passes if done.kind == kind), None)


def _properties(profile: dict[str, Any]) -> dict[str, str]:
    properties = {prop: str(profile.get(name) or "") for name, prop in PROPERTY_MAP.items()}
    properties["email"] = properties["email"].strip().lower()
    return properties


def _send(
    session: requests.Session, base_url: str, claimed: list[tuple[Any, ...]]
) -> list[str | None]:
    """One batch call for the claimed rows; the contact id of each, in order."""
    if claimed[0][2] is None:
        inputs = [
            {"id": _properties(profile)["email"], "idProperty": "email"}
            | {"properties": _properties(profile)}
            for _, profile, _ in claimed
        ]
        url, params = f"{base_url}{CONTACTS}/batch/upsert", {"idProperty": "email"}
    else:
        inputs = [
            {"id": contact_id, "properties": _properties(profile)}
            for _, profile, contact_id in claimed
        ]
        url, params = f"{base_url}{CONTACTS}/batch/update", {}
    response = session.post(url, params=params, json={"inputs": inputs}, timeout=30)
    response.raise_for_status()
    answer = response.json()
    if answer.get("errors"):
        raise RuntimeError(f"the fake HubSpot refused part of a batch: {answer['errors'][:1]}")
    by_email = {
        str(result["properties"]["email"]): str(result["id"]) for result in answer["results"]
    }
    return [by_email.get(_properties(profile)["email"]) for _, profile, _ in claimed]


def drain(
    connection: psycopg.Connection[Any], session: requests.Session, base_url: str, kind: str
) -> int:
    """Claim, send and mark batches until none is pending; how many deliveries were sent."""
    claim = _CLAIM_LINKED if kind == "updated" else _CLAIM_NEW
    sent = 0
    while True:
        claimed = connection.execute(claim, (BATCH,)).fetchall()
        if not claimed:
            return sent
        contact_ids = _send(session, base_url, claimed)
        ids = [row[0] for row in claimed]
        connection.execute(_SUCCEEDED, {"ids": ids, "contact_ids": contact_ids})
        sent += len(claimed)


class BareLoop:
    """The bare loop's passes (new users, then updates to them) against one fake HubSpot.

    Called with the fake's URL and process id; keeps what it measured in ``result``.
    """

    def __init__(self, users: int, *, admin_url: str, run_id: str, schema: str) -> None:
        self.users, self.admin_url, self.run_id, self.schema = users, admin_url, run_id, schema
        self.database = f"idsync_bench_{run_id}_bare"
        self.result = BareLoopResult()

    def _cpu(self, fake_pid: int) -> dict[str, dict[int, float]]:
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.database,)
            ).fetchall()
        groups = {
            "bare loop": [os.getpid()],
            "PostgreSQL backends": [int(row[0]) for row in rows],
            "fake HubSpot": process_tree(fake_pid),
        }
        return {name: {pid: cpu_seconds(pid) for pid in pids} for name, pids in groups.items()}

    def __call__(self, fake_url: str, fake_pid: int) -> None:
        with (
            own_database(self.admin_url, self.database, template=self.schema) as url,
            psycopg.connect(url, autocommit=True) as connection,
            requests.Session() as session,
        ):
            session.headers["Authorization"] = f"Bearer {HUBSPOT_TOKEN}"
            for kind in ("created", "updated"):
                first_id, _ = insert_backlog(url, kind, self.users, self.run_id)
                # As autovacuum would soon after a bulk insert: without statistics the
                # planner takes the new rows for none and scans them for every batch.
                connection.execute("ANALYZE deliveries, events")
                before = self._cpu(fake_pid)
                started = database_clock(connection)
                synced = drain(connection, session, fake_url, kind)
                cpu = cpu_spent(before, self._cpu(fake_pid))
                elapsed, _ = drain_timing(connection, first_id, started, None)
                self.result.passes.append(BarePass(kind, self.users, elapsed, synced, cpu))
        # The fake starts idsync's run empty, as it started the bare loop's.
        requests.post(f"{fake_url}/_fake/reset", timeout=30).raise_for_status()
