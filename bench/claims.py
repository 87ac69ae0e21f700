"""Claims at every depth: what one claim costs, and the drain rate, at 10,000 to 1,000,000 pending.

A first backfill of a large company leaves a million deliveries pending. The claim
must cost the same then as with ten thousand, or a worker spends its time finding
work instead of sending it. This benchmark fills one database in steps (10,000,
then 100,000, then 1,000,000 pending ``hubspot`` deliveries, each with its event's
payload and an existing link, as after a first pass), with set-based SQL
(``generate_series``), and at each depth measures:

- the claim: ``models.outbox.claim_due`` for 100 users, payloads loaded, timed in
  this process and rolled back, so every repetition claims from the same depth;
- the unthrottled drain: ``workers.delivery.run_batch`` in a loop (all the Celery
  task does) against the in-process fake HubSpot with no rate limit, for a few
  seconds; new users per second.

The step to the next depth tops the pending count back up, so the drained rows
do not lower it.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, event

from bench.common import fixture, own_database, own_redis_prefix
from bench.report import Row, number, verdict
from idsync.settings import Settings
from idsync.stack import Stack, fake_hubspot_command, free_port
from ingest.validation import without_context
from models.outbox import claim_due
from workers.delivery import run_batch
from workers.runtime import Runtime, build_runtime

DESTINATION = "hubspot"
SOURCE = "urn:auth0:claims.auth0app.com"
CLAIM_USERS = 100
CLAIM_TARGET_MS = 5.0
UNLIMITED = 1_000_000  # requests per second: no rate limit in practice
TOKEN = "claims-bench-token"  # noqa: S105 - the fake's credential, not a secret


@dataclass
class ClaimsOptions:
    max_depth: int  # pending deliveries at the deepest step: 10,000 x 10^k up to it
    claims: int  # claims timed at each depth
    drain_seconds: float  # how long the unthrottled drain runs at each depth


@dataclass
class DepthResult:
    depth: int  # pending deliveries when the claims were timed
    seed_seconds: float  # how long the set-based SQL took to add the rows
    claims: list[ClaimTiming]  # 100 users each
    claimed_users: int  # users in the last claim (100 unless the backlog ran short)
    drained: int  # deliveries that succeeded in the drain
    drain_seconds: float

    def median(self, part: str) -> float:
        """The median of one part of the claims' timing: ``work``, ``sql`` or ``commit``."""
        return statistics.median(getattr(timing, part) for timing in self.claims)

    def p90(self, part: str) -> float:
        ordered = sorted(getattr(timing, part) for timing in self.claims)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]

    @property
    def drain_rate(self) -> float:
        return self.drained / self.drain_seconds if self.drain_seconds > 0 else 0.0


@dataclass
class ClaimsResult:
    options: ClaimsOptions
    depths: list[DepthResult]
    notes: list[str] = field(default_factory=list)


def depths(max_depth: int) -> list[int]:
    """10,000, 100,000, ... up to ``max_depth`` (which is always the last)."""
    steps = []
    depth = 10_000
    while depth < max_depth:
        steps.append(depth)
        depth *= 10
    return [*steps, max_depth]


# Set-based set-up


def _payload_template() -> str:
    """A real ``user.created`` as ingest stores it (no ``data.context``), as JSON text."""
    document = without_context(fixture("user_created.json"))
    document["source"] = SOURCE
    document["data"].pop("previous_object", None)  # a new user has no previous state
    return json.dumps(document)


# Events numbered (first, last], each a new user with its own id, email and event id, one
# pending delivery to DESTINATION and an existing link (as a claim finds it after a first
# pass). Three INSERT ... SELECT statements, no round trip per row.
_SEED_EVENTS = """
INSERT INTO events (source, event_id, type, subject, event_time, object_updated_at,
                    status, body_sha256, payload)
SELECT %(source)s, 'evt_claims_' || n, 'user.created', 'auth0|claims' || lpad(n::text, 8, '0'),
       %(base)s::timestamptz + n * interval '1 millisecond',
       %(base)s::timestamptz + n * interval '1 millisecond',
       'accepted', md5(n::text) || md5(n::text),
       jsonb_set(jsonb_set(jsonb_set(%(template)s::jsonb,
           '{id}', to_jsonb('evt_claims_' || n)),
           '{data,object,user_id}', to_jsonb('auth0|claims' || lpad(n::text, 8, '0'))),
           '{data,object,email}', to_jsonb('claims.user' || n || '@example.com'))
FROM generate_series(%(first)s + 1, %(last)s) AS n
"""
_SEED_DELIVERIES = """
INSERT INTO deliveries (event_pk, destination, source, subject, status)
SELECT id, %(destination)s, source, subject, 'pending' FROM events WHERE id > %(after)s
"""
_SEED_LINKS = """
INSERT INTO links (destination, source, subject)
SELECT %(destination)s, source, subject FROM events WHERE id > %(after)s
ON CONFLICT DO NOTHING
"""


def seed_pending(url: str, *, first: int, last: int) -> float:
    """Add users ``first + 1`` to ``last`` with one pending delivery each; seconds taken."""
    started = time.monotonic()
    with psycopg.connect(url) as connection:
        after = connection.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()
        assert after is not None
        connection.execute(
            _SEED_EVENTS,
            {
                "source": SOURCE,
                "base": "2025-03-01T12:00:00Z",
                "template": _payload_template(),
                "first": first,
                "last": last,
            },
        )
        params = {"destination": DESTINATION, "after": after[0]}
        connection.execute(_SEED_DELIVERIES, params)
        connection.execute(_SEED_LINKS, params)
        connection.commit()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE events, deliveries, links")
    return time.monotonic() - started


def pending_count(url: str) -> int:
    with psycopg.connect(url) as connection:
        row = connection.execute(
            "SELECT count(*) FROM deliveries WHERE status = 'pending'"
        ).fetchone()
    assert row is not None
    return int(row[0])


# Measuring one depth


def _settings(url: str, redis_url: str, prefix: str, fake_url: str) -> Settings:
    return Settings(
        database_url=url,
        celery_broker_url=redis_url,
        redis_url=redis_url,
        redis_key_prefix=prefix,
        destinations=(DESTINATION,),
        hubspot_token=TOKEN,
        hubspot_base_url=fake_url,
        destination_env={"HUBSPOT_RATE_LIMIT": f"{UNLIMITED}/1s", "HUBSPOT_BATCH_SIZE": "100"},
    )


@dataclass
class ClaimTiming:
    """One claim, split where its time goes (milliseconds)."""

    work: float  # claim_due from its first statement to its return (SQL and Python)
    sql: float  # of which the statements, from send to the last row read
    commit: float  # the COMMIT after it (a WAL flush: the disk's, not the claim's cost)


class StatementClock:
    """Adds up the time of every statement run on an engine while it is listening."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.total, self._started = engine, 0.0, 0.0

    def __enter__(self) -> StatementClock:
        event.listen(self.engine, "before_cursor_execute", self._before)
        event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        event.remove(self.engine, "after_cursor_execute", self._after)

    def _before(self, *args: Any) -> None:
        self._started = time.perf_counter()

    def _after(self, *args: Any) -> None:
        self.total += time.perf_counter() - self._started


def time_claims(runtime: Runtime, count: int) -> tuple[list[ClaimTiming], int]:
    """``count`` claims of 100 users each, timed, and the users in the last one.

    Each claim commits, as a worker's does, so the next one takes the next users: a
    rolled-back claim would leave dead row versions at the head of the queue and time
    something no worker meets. The claimed rows wait for their lease to expire, a few
    hundred among the depth's pending rows.
    """
    settings = runtime.settings
    timings, users = [], 0
    for _ in range(count):
        session = runtime.sessions()
        try:
            session.connection()  # checked out of the pool before the clock starts
            with StatementClock(runtime.engine) as clock:
                started = time.perf_counter()
                claim = claim_due(
                    session=session,
                    destination=DESTINATION,
                    max_users=CLAIM_USERS,
                    lease=settings.lease,
                    max_reclaims=settings.max_reclaims,
                )
                # Read every payload, as planning a batch does: loaded, not deferred.
                loaded = [delivery.event.payload for delivery in claim.deliveries]
                claimed = time.perf_counter()
                sql = clock.total
            session.commit()
            committed = time.perf_counter()
        finally:
            session.close()
        users = len(claim.users) if all(loaded) else 0
        timings.append(
            ClaimTiming(
                work=(claimed - started) * 1000,
                sql=sql * 1000,
                commit=(committed - claimed) * 1000,
            )
        )
    return timings, users


def drain(runtime: Runtime, seconds: float) -> tuple[int, float]:
    """``run_batch`` in a loop for about ``seconds``: deliveries that succeeded, and the time."""
    destination = runtime.destination(DESTINATION)
    succeeded = 0
    try:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            report = run_batch(
                sessions=runtime.sessions, settings=runtime.settings, destination=destination
            )
            if not report.claimed:
                break
            succeeded += sum(n for label, n in report.outcomes.items() if label.startswith("succ"))
        elapsed = time.monotonic() - started
    finally:
        destination.close()
    return succeeded, elapsed


def run_claims(
    options: ClaimsOptions,
    *,
    admin_url: str,
    redis_url: str,
    run_id: str,
    workdir: Path,
    schema: str,
) -> ClaimsResult:
    """Fill one database depth by depth; at each, time the claims and drain for a while.

    The database starts as a copy of ``schema``, a migrated empty database.
    """
    database = f"idsync_bench_{run_id}_claims"
    prefix = f"idsync-bench-{run_id}-claims"
    results: list[DepthResult] = []
    with (
        own_database(admin_url, database, template=schema) as url,
        own_redis_prefix(redis_url, prefix),
    ):
        port = free_port()
        fake_url = f"http://127.0.0.1:{port}"
        stack = Stack(env={"DATABASE_URL": url}, workdir=workdir)
        stack.start("fake", fake_hubspot_command(port, TOKEN, UNLIMITED, 1.0))
        runtime = build_runtime(_settings(url, redis_url, prefix, fake_url))
        try:
            stack.wait_for_http(f"{fake_url}/_fake/stats", timeout=60)
            users = 0
            for depth in depths(options.max_depth):
                # Top up to ``depth`` pending: the drain at the last depth used some.
                missing = depth - pending_count(url)
                seeded = seed_pending(url, first=users, last=users + missing)
                users += missing
                at = pending_count(url)
                timings, claimed = time_claims(runtime, options.claims)
                drained, elapsed = drain(runtime, options.drain_seconds)
                results.append(
                    DepthResult(
                        depth=at,
                        seed_seconds=seeded,
                        claims=timings,
                        claimed_users=claimed,
                        drained=drained,
                        drain_seconds=elapsed,
                    )
                )
        finally:
            runtime.engine.dispose()
            if runtime.redis is not None:
                runtime.redis.close()
            stack.stop_all()
    result = ClaimsResult(options=options, depths=results)
    for step in results:
        if step.claimed_users != CLAIM_USERS:
            result.notes.append(
                f"claims at {step.depth:,} pending: the last claim held {step.claimed_users} "
                f"users, not {CLAIM_USERS}"
            )
    return result


# Report rows


def claims_rows(result: ClaimsResult) -> list[Row]:
    """One claim row and one drain row per depth, then how the cost grew with the backlog."""
    rows = []
    for step in result.depths:
        rows.append(
            Row(
                "claims",
                f"one claim of {CLAIM_USERS} users (payloads loaded, links existing) at "
                f"{number(step.depth)} pending, before its COMMIT",
                f"median {number(step.median('work'), 2)} ms (SQL {number(step.median('sql'), 2)}"
                f" ms); p90 {number(step.p90('work'), 2)} ms; then COMMIT median "
                f"{number(step.median('commit'), 2)} ms ({len(step.claims)} claims)",
                f"<= {CLAIM_TARGET_MS:g} ms",
                verdict(step.median("work"), CLAIM_TARGET_MS, at_least=False),
            )
        )
        rows.append(
            Row(
                "claims",
                f"unthrottled drain at {number(step.depth)} pending (`run_batch` in a loop, "
                "fake HubSpot in its own process)",
                f"{number(step.drain_rate)} new users/s ({number(step.drained)} in "
                f"{number(step.drain_seconds, 1)} s)",
            )
        )
    if len(result.depths) > 1:
        first, last = result.depths[0], result.depths[-1]
        claim_growth = last.median("work") / first.median("work")
        drain_growth = last.drain_rate / first.drain_rate if first.drain_rate else math.nan
        rows.append(
            Row(
                "claims",
                f"{number(last.depth)} vs {number(first.depth)} pending",
                f"claim time {number(claim_growth, 2)}x; drain rate {number(drain_growth, 2)}x",
            )
        )
    seeding = ", ".join(f"{number(s.seed_seconds, 1)} s" for s in result.depths)
    rows.append(
        Row(
            "claims",
            "setup",
            f"one database filled in steps by set-based SQL (generate_series; {seeding}), "
            f"DESTINATIONS=hubspot, each claim committed as a worker's is",
        )
    )
    return rows
