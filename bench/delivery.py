"""Delivery: drain a backlog from the outbox to a fake HubSpot process at its rate limit.

The backlog is written straight into the outbox with the SQL ``record_event`` runs
(events, then one ``hubspot`` delivery each, in one transaction), from real Auth0
payloads. Then the real processes run: ``celery -A workers worker`` and beat from
``idsync.stack``, against ``python -m idsync.fakes.hubspot`` with the same limit as
idsync's ``HUBSPOT_RATE_LIMIT``. The clock starts when the first wake-up is
published and stops at the last delivery's ``finished_at`` (the database's clock).

Two kinds of backlog:

- ``created``: new users. idsync looks each one up by email (one batch read per
  100) and then upserts them (one batch upsert per 100): two requests per batch.
- ``updated``: the same users, linked by the ``created`` phase, with a changed
  name: one batch update per 100.

The naive comparison runs the ``created`` kind with ``HUBSPOT_BATCH_SIZE=1``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import requests
from sqlalchemy import insert, text

from bench.common import (
    MachineCpu,
    cpu_seconds,
    fixture,
    own_database,
    own_redis_prefix,
    process_tree,
    stack_pid,
    status_kb,
)
from idsync.settings import Settings
from idsync.stack import (
    Stack,
    beat_command,
    fake_hubspot_command,
    free_port,
    worker_command,
)
from idsync.wakeups import Waker
from ingest.validation import to_new_event
from models.db import make_engine
from models.tables import FINISHED, Delivery, DeliveryStatus, Event

HUBSPOT_TOKEN = "bench-hubspot-token"  # noqa: S105 - the fake's token, loopback only
SOURCE = "urn:auth0:bench.auth0app.com"
BASE_TIME = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
INSERT_CHUNK = 2000
POLL_SECONDS = 0.25


@dataclass
class DeliveryOptions:
    rate_limit: int  # requests per window, for the fake and for idsync alike
    window: float  # seconds
    concurrency: int  # prefork children of the one celery worker
    sweep_seconds: float
    timeout: float  # seconds a phase may take at most
    deliver_tasks: int = 1  # HUBSPOT_CONCURRENCY: HubSpot deliver tasks at once

    @property
    def ceiling(self) -> float:
        """Contacts per second if every allowed request carried a full batch of 100."""
        return self.rate_limit / self.window * 100


@dataclass(frozen=True)
class Phase:
    kind: str  # "created" or "updated"
    events: int
    seconds: float | None = None  # stop after this long instead of at the end of the backlog


@dataclass
class PhaseResult:
    phase: Phase
    batch_size: int
    elapsed: float  # wake-up to the last finished delivery (or to the stop), seconds
    finished: int
    synced: int  # deliveries that succeeded
    statuses: dict[str, int]
    steady_rate: float | None  # 10% -> 90% of the backlog finished
    requests: int  # answered by the fake during the phase
    rate_limited: int  # of which 429
    by_route: dict[str, int]  # requests by method and path
    cpu: dict[str, float]  # CPU seconds by process group
    busy: float  # CPU seconds the whole machine was busy during ``wall``
    wall: float  # seconds the phase was watched (a little longer than ``elapsed``)
    complete: bool  # every delivery of the phase finished in time
    allowed: float  # requests per second the rate limit allows
    pacing: Pacing

    @property
    def rate(self) -> float:
        """Contacts synced per second, from the wake-up on."""
        return self.synced / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.requests if self.requests else 0.0

    @property
    def budget_used(self) -> float:
        """Requests sent per second as a share of what the rate limit allows."""
        return self.requests / self.elapsed / self.allowed if self.elapsed > 0 else 0.0

    @property
    def cores_busy(self) -> float:
        """How many cores the whole machine kept busy on average."""
        return self.busy / self.wall if self.wall > 0 else 0.0

    @property
    def cores_other(self) -> float:
        """How many cores went to processes outside the benchmark, on average."""
        return max(0.0, self.busy - sum(self.cpu.values())) / self.wall if self.wall > 0 else 0.0


@dataclass
class BacklogResult:
    options: DeliveryOptions
    batch_size: int
    phases: list[PhaseResult]
    memory_kb: dict[str, int]  # peak resident memory (VmHWM) per worker process
    notes: list[str] = field(default_factory=list)


# The backlog


def user_document(kind: str, number: int, run_id: str) -> dict[str, Any]:
    """A real Auth0 ``user.created`` / ``user.updated`` delivery for bench user ``number``."""
    document = copy.copy(fixture("user_created.json"))
    created = BASE_TIME + timedelta(milliseconds=number)
    moment = created + (timedelta(days=1) if kind == "updated" else timedelta())
    template = document["data"]["object"]
    user = {
        **template,
        "user_id": f"auth0|bench{number:07d}",
        "email": f"bench.user{number}@example.com",
        "given_name": "Benchmark" if kind == "updated" else "Bench",
        "family_name": f"User{number}",
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "updated_at": moment.isoformat().replace("+00:00", "Z"),
    }
    previous = {**user, "given_name": "Bench", "updated_at": user["created_at"]}
    document.update(
        id=f"evt_bench_{run_id}_{kind}_{number}",
        type=f"user.{kind}",
        source=SOURCE,
        time=moment.isoformat().replace("+00:00", "Z"),
        data={**document["data"], "object": user, "previous_object": previous},
    )
    return document


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def insert_backlog(
    database_url: str,
    kind: str,
    count: int,
    run_id: str,
    destinations: tuple[str, ...] = ("hubspot",),
) -> tuple[int, datetime]:
    """Record ``count`` events with their deliveries in one transaction, as ``record_event`` does.

    Each event gets one delivery per destination. Returns the first new delivery id and
    the database's clock after the commit.
    """
    events = []
    for number in range(count):
        document = user_document(kind, number, run_id)
        events.append(to_new_event(document, json.dumps(document).encode()))
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            first = connection.execute(text("SELECT coalesce(max(id), 0) + 1 FROM deliveries"))
            first_id = int(first.scalar_one())
            for chunk in _chunks(events, INSERT_CHUNK):
                rows = [
                    {
                        "source": e.source,
                        "event_id": e.event_id,
                        "type": e.type,
                        "subject": e.subject,
                        "event_time": e.event_time,
                        "object_updated_at": e.object_updated_at,
                        "status": e.status,
                        "ignore_reason": e.ignore_reason,
                        "body_sha256": e.body_sha256,
                        "payload": e.payload,
                    }
                    for e in chunk
                ]
                ids = (
                    connection.execute(
                        insert(Event).returning(Event.id, sort_by_parameter_order=True), rows
                    )
                    .scalars()
                    .all()
                )
                connection.execute(
                    insert(Delivery),
                    [
                        {
                            "event_pk": pk,
                            "destination": destination,
                            "source": e.source,
                            "subject": e.subject,
                            "status": DeliveryStatus.PENDING,
                        }
                        for pk, e in zip(ids, chunk, strict=True)
                        for destination in destinations
                    ],
                )
        with engine.connect() as connection:
            now = connection.execute(text("SELECT clock_timestamp()")).scalar_one()
    finally:
        engine.dispose()
    return first_id, now


# Measuring a phase


class FakeControl:
    """The fake HubSpot process's control routes."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _get(self, route: str) -> Any:
        response = requests.get(f"{self.url}/_fake/{route}", timeout=30)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        """Answers by route and status, their total, and how many were 429."""
        return self._get("stats")  # type: ignore[no-any-return]

    def requests_log(self) -> list[dict[str, Any]]:
        """Every API request answered so far, in the order they finished."""
        return self._get("requests")  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Pacing:
    """How far apart HubSpot requests went out, from the fake's log."""

    gaps: int
    mean_gap: float  # seconds between consecutive requests
    after_full: int  # gaps that follow an answer reporting a full window (Remaining: 0)
    mean_after_full: float

    @classmethod
    def of(cls, log: list[dict[str, Any]], limit: int, window: float) -> Pacing:
        records = sorted(log, key=lambda record: float(record["started"]))
        starts = [float(record["started"]) for record in records]
        gaps: list[float] = []
        full: list[float] = []
        for index in range(1, len(records)):
            answered = float(records[index - 1]["finished"])
            # The fake counts what started within the window before it answered.
            in_window = sum(1 for start in starts[:index] if answered - window < start <= answered)
            gap = starts[index] - starts[index - 1]
            gaps.append(gap)
            if in_window >= limit:
                full.append(gap)
        return cls(
            gaps=len(gaps),
            mean_gap=sum(gaps) / len(gaps) if gaps else 0.0,
            after_full=len(full),
            mean_after_full=sum(full) / len(full) if full else 0.0,
        )


def _calls(log: list[dict[str, Any]]) -> dict[str, int]:
    """Requests by method and path, contact ids and emails in paths left out."""
    counts: dict[str, int] = {}
    for record in log:
        path = str(record["path"])
        if "/batch/" not in path:
            path = path.rsplit("/", 1)[0] + "/{id}"
        name = f"{record['method']} {path.removeprefix('/crm/v3/objects/contacts')}"
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def database_clock(connection: psycopg.Connection[Any]) -> datetime:
    """The database server's clock, which ``finished_at`` is written with."""
    row = connection.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


_FINISHED = tuple(status.value for status in FINISHED)


def finished_count(
    connection: psycopg.Connection[Any], first_id: int, destination: str = "hubspot"
) -> int:
    """How many of ``destination``'s deliveries from ``first_id`` on have finished."""
    row = connection.execute(
        "SELECT count(*) FROM deliveries WHERE id >= %s AND destination = %s AND status = ANY(%s)",
        (first_id, destination, list(_FINISHED)),
    ).fetchone()
    return int(row[0]) if row else 0


def drain_timing(
    connection: psycopg.Connection[Any],
    first_id: int,
    started: datetime,
    stopped: datetime | None,
    destination: str = "hubspot",
) -> tuple[float, float | None]:
    """Seconds from ``started`` to the last finish (or ``stopped``), and the 10%->90% rate."""
    row = connection.execute(
        """
        SELECT max(finished_at),
               percentile_disc(0.1) WITHIN GROUP (ORDER BY finished_at),
               percentile_disc(0.9) WITHIN GROUP (ORDER BY finished_at),
               count(*)
        FROM deliveries WHERE id >= %s AND destination = %s AND status = 'succeeded'
        """,
        (first_id, destination),
    ).fetchone()
    assert row is not None
    last, p10, p90, count = row
    end = stopped or last or started
    elapsed = (end - started).total_seconds()
    steady = None
    if p10 is not None and p90 is not None and p90 > p10:
        steady = 0.8 * count / (p90 - p10).total_seconds()
    return elapsed, steady


class StackProcesses:
    """CPU and peak memory of the processes a phase runs.

    ``others`` names processes outside the stack that take part (label -> pid).
    """

    def __init__(
        self,
        stack: Stack,
        admin_url: str,
        database: str,
        redis_pid: int,
        others: dict[str, int] | None = None,
    ) -> None:
        self.stack, self.admin_url, self.database = stack, admin_url, database
        self.redis_pid = redis_pid
        self.others = others or {}
        self.peak_kb: dict[int, int] = {}
        self.labels: dict[int, str] = {}

    def _groups(self) -> dict[str, list[int]]:
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.database,)
            ).fetchall()
        return {
            "celery worker": process_tree(stack_pid(self.stack, "worker")),
            "celery beat": process_tree(stack_pid(self.stack, "beat")),
            "fake HubSpot": process_tree(stack_pid(self.stack, "fake")),
            "PostgreSQL backends": [int(row[0]) for row in rows],
            "Redis": [self.redis_pid],
            **{label: [pid] for label, pid in self.others.items()},
        }

    def cpu(self) -> dict[str, dict[int, float]]:
        return {
            name: {pid: cpu_seconds(pid) for pid in pids} for name, pids in self._groups().items()
        }

    def sample_memory(self) -> None:
        main = stack_pid(self.stack, "worker")
        for pid in process_tree(main):
            kb = status_kb(pid, "VmHWM")
            if kb is None:
                continue
            if pid not in self.labels:
                children = sum(1 for label in self.labels.values() if label != "main")
                self.labels[pid] = "main" if pid == main else f"child {children + 1}"
            self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), kb)

    def memory(self) -> dict[str, int]:
        return {self.labels[pid]: kb for pid, kb in self.peak_kb.items()}


def cpu_spent(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """CPU seconds per group between two ``StackProcesses.cpu()`` readings."""
    return {
        name: sum(max(0.0, s - before.get(name, {}).get(pid, 0.0)) for pid, s in pids.items())
        for name, pids in after.items()
    }


def measure_drain(
    expected: int,
    limit: float,
    *,
    url: str,
    first_id: int,
    started: datetime,
    processes: StackProcesses,
    stack: Stack,
    destination: str = "hubspot",
) -> tuple[float, float | None, int, bool]:
    """Wait up to ``limit`` seconds for ``expected`` deliveries of ``destination`` to finish.

    Returns (elapsed since ``started``, steady rate, finished, complete).
    """
    deadline = time.monotonic() + limit
    finished = 0
    with psycopg.connect(url, autocommit=True) as connection:
        while time.monotonic() < deadline:
            stack.check_alive()
            processes.sample_memory()
            finished = finished_count(connection, first_id, destination)
            if finished >= expected:
                break
            time.sleep(POLL_SECONDS)
        complete = finished >= expected
        stopped = None if complete else database_clock(connection)
        finished = finished_count(connection, first_id, destination)
        elapsed, steady = drain_timing(connection, first_id, started, stopped, destination)
    return elapsed, steady, finished, complete


def status_counts(url: str, first_id: int, destination: str = "hubspot") -> dict[str, int]:
    """``destination``'s deliveries from ``first_id`` on by ``status[:reason]``."""
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT status || coalesce(':' || reason, ''), count(*) FROM deliveries "
            "WHERE id >= %s AND destination = %s GROUP BY 1 ORDER BY 1",
            (first_id, destination),
        ).fetchall()
    return {str(label): int(count) for label, count in rows}


def run_backlog(
    options: DeliveryOptions,
    phases: list[Phase],
    *,
    batch_size: int,
    label: str,
    admin_url: str,
    redis_url: str,
    redis_pid: int,
    run_id: str,
    workdir: Path,
    schema: str,
    baseline: Callable[[str, int], None] | None = None,
) -> BacklogResult:
    """Run ``phases`` one after another through one worker, beat and fake HubSpot.

    The database starts as a copy of ``schema``, a migrated empty database. A
    ``baseline`` runs first against the same fake (given its URL and process id),
    before the backlog is written and the workers start.
    """
    prefix = f"idsync-bench-{run_id}-{label}"
    database = f"idsync_bench_{run_id}_{label}"
    with (
        own_database(admin_url, database, template=schema) as url,
        own_redis_prefix(redis_url, prefix),
    ):
        port = free_port()
        fake_url = f"http://127.0.0.1:{port}"
        env = {
            "DATABASE_URL": url,
            "CELERY_BROKER_URL": redis_url,
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": prefix,
            "HUBSPOT_TOKEN": HUBSPOT_TOKEN,
            "HUBSPOT_BASE_URL": fake_url,
            "HUBSPOT_RATE_LIMIT": f"{options.rate_limit}/{options.window:g}s",
            "HUBSPOT_BATCH_SIZE": str(batch_size),
            "HUBSPOT_CONCURRENCY": str(options.deliver_tasks),
            "SWEEP_SECONDS": f"{options.sweep_seconds:g}",
        }
        stack = Stack(env=env, workdir=workdir)
        settings = Settings(
            database_url=url,
            celery_broker_url=redis_url,
            redis_url=redis_url,
            redis_key_prefix=prefix,
        )
        waker = Waker(settings)
        try:
            stack.start(
                "fake",
                fake_hubspot_command(port, HUBSPOT_TOKEN, options.rate_limit, options.window),
            )
            stack.wait_for_http(f"{fake_url}/_fake/stats", timeout=60)
            fake = FakeControl(fake_url)
            if baseline is not None:
                baseline(fake_url, stack_pid(stack, "fake"))
            first_id, _ = insert_backlog(url, phases[0].kind, phases[0].events, run_id)
            stack.start(
                "worker", worker_command(concurrency=options.concurrency, name=f"bench-{label}")
            )
            stack.wait_for_log("worker", "ready", timeout=90)
            stack.start("beat", beat_command(workdir / f"celerybeat-schedule-{label}"))
            stack.wait_for_log("beat", "Starting", timeout=60)
            processes = StackProcesses(stack, admin_url, database, redis_pid)
            results = []
            for index, phase in enumerate(phases):
                if index > 0:
                    first_id, _ = insert_backlog(url, phase.kind, phase.events, run_id)
                results.append(
                    _run_phase(
                        phase,
                        options=options,
                        batch_size=batch_size,
                        url=url,
                        first_id=first_id,
                        waker=waker,
                        fake=fake,
                        processes=processes,
                        stack=stack,
                    )
                )
            memory = processes.memory()
        finally:
            # A deliver task may be mid-batch; its database is dropped next, so waiting
            # for a warm shutdown would only add time.
            for name in ("beat", "worker"):
                if name in stack.children:
                    stack.kill(name)
            stack.stop_all()
    result = BacklogResult(options=options, batch_size=batch_size, phases=results, memory_kb=memory)
    for done in results:
        others = {k: n for k, n in done.statuses.items() if k.split(":")[0] != "succeeded"}
        if others and done.complete:
            result.notes.append(
                f"{label} {done.phase.kind}: not every delivery succeeded: {others}"
            )
    return result


def _run_phase(
    phase: Phase,
    *,
    options: DeliveryOptions,
    batch_size: int,
    url: str,
    first_id: int,
    waker: Waker,
    fake: FakeControl,
    processes: StackProcesses,
    stack: Stack,
) -> PhaseResult:
    stats_before = fake.stats()
    logged_before = len(fake.requests_log())
    cpu_before = processes.cpu()
    machine, watched = MachineCpu(), time.monotonic()
    with psycopg.connect(url) as connection:
        started = database_clock(connection)
    waker.wake("hubspot")  # the sweep would too, within SWEEP_SECONDS
    limit = min(options.timeout, phase.seconds) if phase.seconds else options.timeout
    elapsed, steady, finished, complete = measure_drain(
        phase.events,
        limit,
        url=url,
        first_id=first_id,
        started=started,
        processes=processes,
        stack=stack,
    )
    busy, wall = machine.busy_seconds(), time.monotonic() - watched
    cpu = cpu_spent(cpu_before, processes.cpu())
    stats_after = fake.stats()
    log = fake.requests_log()[logged_before:]
    calls = _calls(log)
    statuses = status_counts(url, first_id)
    return PhaseResult(
        phase=phase,
        batch_size=batch_size,
        elapsed=elapsed,
        finished=finished,
        synced=sum(n for label, n in statuses.items() if label.split(":")[0] == "succeeded"),
        statuses=statuses,
        steady_rate=steady,
        requests=stats_after["total"] - stats_before["total"],
        rate_limited=stats_after["rate_limited"] - stats_before["rate_limited"],
        by_route=calls,
        cpu=cpu,
        busy=busy,
        wall=wall,
        complete=complete,
        allowed=options.rate_limit / options.window,
        pacing=Pacing.of(log, options.rate_limit, options.window),
    )
