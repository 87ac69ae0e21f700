"""Isolation: HubSpot at its rate limit beside a webhook destination that never answers.

One backlog of new users is posted through the real ingest (gunicorn, with
``DESTINATIONS=hubspot,licenses``: one delivery per destination and user), then
copied into one database per side (``CREATE DATABASE ... TEMPLATE``), so both
sides start from the same rows. Each side runs its own fake HubSpot process, one
``celery -A workers worker`` with more slots than the destinations' caps add up
to, and beat, with the same settings but for ``DESTINATIONS``:

- alone: ``DESTINATIONS=hubspot``; the webhook's rows stay untouched.
- beside: ``DESTINATIONS=hubspot,licenses``, ``LICENSES_KIND=webhook`` pointing
  at a ``FakeWebhookReceiver`` told to hold every request unanswered, so every
  webhook call runs into its deadline (connect timeout + ``LICENSES_TIMEOUT_SECONDS``)
  while the sweep keeps publishing the webhook's due work.

The clock starts when the destinations are woken and stops at HubSpot's last
``finished_at`` (the database's clock); beside / alone, in contacts per second,
is what a hanging destination costs HubSpot.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psycopg

from bench.common import MachineCpu, own_database, own_redis_prefix
from bench.delivery import (
    HUBSPOT_TOKEN,
    FakeControl,
    StackProcesses,
    cpu_spent,
    database_clock,
    measure_drain,
    status_counts,
    user_document,
)
from bench.ingest import INGEST_TOKEN
from bench.load import LoadResult, PostSpec, post_all
from idsync.fakes.webhook_receiver import DEFAULT_SECRET, FakeWebhookReceiver
from idsync.settings import Settings
from idsync.stack import (
    Stack,
    beat_command,
    fake_hubspot_command,
    free_port,
    ingest_command,
    worker_command,
)
from idsync.wakeups import Waker

WEBHOOK = "licenses"
WEBHOOK_TIMEOUT_SECONDS = 15.0
# The start-up rule for a 3.05 s connect timeout (the default) and 15 s timeout:
# LEASE_SECONDS >= 2 x (3.05 + 15) + 5 = 41.1, SETTLE_SECONDS > 3.05 + 15.
LEASE_SECONDS = 45
SETTLE_SECONDS = 20
CAPS = {"hubspot": 1, WEBHOOK: 1}  # <NAME>_CONCURRENCY
WORKER_CONCURRENCY = sum(CAPS.values()) + 1
SIDES: dict[str, tuple[str, ...]] = {"alone": ("hubspot",), "beside": ("hubspot", WEBHOOK)}
# More requests than a run can send: the receiver holds every one of them.
HELD_REQUESTS = 1_000_000


@dataclass
class IsolationOptions:
    users: int
    rate_limit: int  # HubSpot requests per window, for the fake and for idsync alike
    window: float
    sweep_seconds: float
    timeout: float  # seconds one side may take at most
    ingest_workers: int
    connections: int  # of the client posting the backlog

    @property
    def ceiling(self) -> float:
        """Contacts per second if every allowed request carried a full batch of 100."""
        return self.rate_limit / self.window * 100

    @property
    def rate_limit_text(self) -> str:
        return f"{self.rate_limit}/{self.window:g}s"


@dataclass
class IsolationSide:
    name: str
    destinations: tuple[str, ...]
    elapsed: float  # wake-up to HubSpot's last finished delivery (or to the stop), seconds
    steady_rate: float | None
    finished: int
    complete: bool
    statuses: dict[str, int]  # HubSpot's deliveries by status[:reason]
    requests: int  # answered by the fake HubSpot
    rate_limited: int  # of which 429
    webhook_statuses: dict[str, int]  # the webhook's deliveries by status[:reason]
    webhook_attempts: int
    held: int  # webhook requests that reached the receiver (none is answered)
    cpu: dict[str, float]
    busy: float
    wall: float

    @property
    def synced(self) -> int:
        return sum(n for label, n in self.statuses.items() if label.split(":")[0] == "succeeded")

    @property
    def rate(self) -> float:
        """HubSpot contacts synced per second, from the wake-up on."""
        return self.synced / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def webhook_delivered(self) -> int:
        return sum(
            n for label, n in self.webhook_statuses.items() if label.split(":")[0] == "succeeded"
        )

    @property
    def cores_busy(self) -> float:
        return self.busy / self.wall if self.wall > 0 else 0.0

    @property
    def cores_other(self) -> float:
        """Cores that went to processes outside the benchmark, on average."""
        return max(0.0, self.busy - sum(self.cpu.values())) / self.wall if self.wall > 0 else 0.0


@dataclass
class IsolationResult:
    options: IsolationOptions
    posted: LoadResult
    sides: dict[str, IsolationSide]
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """HubSpot's contacts per second beside the hanging webhook over alone."""
        alone = self.sides["alone"].rate
        return self.sides["beside"].rate / alone if alone else math.nan


def _env(
    options: IsolationOptions,
    *,
    database_url: str,
    redis_url: str,
    prefix: str,
    destinations: tuple[str, ...],
    hubspot_url: str,
    webhook_url: str,
) -> dict[str, str]:
    """The environment of every process of one stack; only ``DESTINATIONS`` differs by side."""
    return {
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": redis_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "DESTINATIONS": ",".join(destinations),
        "INGEST_TOKEN": INGEST_TOKEN,
        "HUBSPOT_TOKEN": HUBSPOT_TOKEN,
        "HUBSPOT_BASE_URL": hubspot_url,
        "HUBSPOT_RATE_LIMIT": options.rate_limit_text,
        "HUBSPOT_BATCH_SIZE": "100",
        "HUBSPOT_CONCURRENCY": str(CAPS["hubspot"]),
        "LICENSES_KIND": "webhook",
        "LICENSES_URL": webhook_url,
        "LICENSES_SECRET": DEFAULT_SECRET,
        "LICENSES_TIMEOUT_SECONDS": f"{WEBHOOK_TIMEOUT_SECONDS:g}",
        "LICENSES_CONCURRENCY": str(CAPS[WEBHOOK]),
        "LEASE_SECONDS": str(LEASE_SECONDS),
        "SETTLE_SECONDS": str(SETTLE_SECONDS),
        "SWEEP_SECONDS": f"{options.sweep_seconds:g}",
    }


def _user_body(number: int, run_id: str) -> bytes:
    return json.dumps(user_document("created", number, run_id)).encode()


def _count(url: str, query: str, *params: object) -> int:
    with psycopg.connect(url) as connection:
        row = connection.execute(query, params).fetchone()
    return int(row[0]) if row else 0


def post_backlog(
    options: IsolationOptions,
    *,
    url: str,
    redis_url: str,
    prefix: str,
    webhook_url: str,
    run_id: str,
    workdir: Path,
) -> LoadResult:
    """Post ``options.users`` new users through gunicorn ingest into the database at ``url``."""
    env = _env(
        options,
        database_url=url,
        redis_url=redis_url,
        prefix=prefix,
        destinations=SIDES["beside"],
        hubspot_url=f"http://127.0.0.1:{free_port()}",  # ingest never calls HubSpot
        webhook_url=webhook_url,
    )
    stack = Stack(env=env, workdir=workdir)
    port = free_port()
    try:
        stack.start("ingest", ingest_command(port, workers=options.ingest_workers))
        stack.wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
        posted = post_all(
            PostSpec(
                host="127.0.0.1",
                port=port,
                path="/events/auth0",
                headers={
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {INGEST_TOKEN}",
                },
                body=partial(_user_body, run_id=run_id),
                count=options.users,
                connections=options.connections,
            )
        )
    finally:
        # Every request was answered, so every event is committed: nothing to wait for.
        if "ingest" in stack.children:
            stack.kill("ingest")
        stack.stop_all()
    events = _count(url, "SELECT count(*) FROM events")
    deliveries = _count(url, "SELECT count(*) FROM deliveries")
    expected = options.users * len(SIDES["beside"])
    if posted.ok != options.users or events != options.users or deliveries != expected:
        raise RuntimeError(
            f"ingest accepted {posted.ok} of {options.users} users ({posted.socket_errors} "
            f"socket errors) and stored {events} events with {deliveries} deliveries "
            f"(expected {options.users} and {expected}); see {workdir}/ingest.log"
        )
    return posted


def run_isolation(
    options: IsolationOptions,
    *,
    admin_url: str,
    redis_url: str,
    redis_pid: int,
    run_id: str,
    workdir: Path,
    schema: str,
) -> IsolationResult:
    """Post the backlog once, then drain it alone and beside the hanging webhook.

    The backlog's database starts as a copy of ``schema``, a migrated empty database.
    """
    prefix = f"idsync-bench-{run_id}-isolation"
    template = f"idsync_bench_{run_id}_isolation"
    with FakeWebhookReceiver() as receiver:
        receiver.hang_next(HELD_REQUESTS)
        with (
            own_database(admin_url, template, template=schema) as template_url,
            own_redis_prefix(redis_url, f"{prefix}-ingest"),
        ):
            posted = post_backlog(
                options,
                url=template_url,
                redis_url=redis_url,
                prefix=f"{prefix}-ingest",
                webhook_url=receiver.url,
                run_id=run_id,
                workdir=workdir,
            )
            sides = {
                name: _run_side(
                    options,
                    name,
                    destinations,
                    receiver=receiver,
                    admin_url=admin_url,
                    redis_url=redis_url,
                    redis_pid=redis_pid,
                    template=template,
                    prefix=f"{prefix}-{name}",
                    workdir=workdir,
                )
                for name, destinations in SIDES.items()
            }
    result = IsolationResult(options=options, posted=posted, sides=sides)
    for side in sides.values():
        others = {k: n for k, n in side.statuses.items() if k.split(":")[0] != "succeeded"}
        if others and side.complete:
            result.notes.append(
                f"isolation {side.name}: not every HubSpot delivery succeeded: {others}"
            )
    beside = sides["beside"]
    if not beside.held:
        result.notes.append(
            "isolation beside: no webhook request reached the receiver while HubSpot drained, "
            "so nothing hung beside it"
        )
    if beside.webhook_delivered:
        result.notes.append(
            f"isolation beside: {beside.webhook_delivered} webhook deliveries succeeded "
            "although the receiver was to hold every request"
        )
    return result


def _run_side(
    options: IsolationOptions,
    name: str,
    destinations: tuple[str, ...],
    *,
    receiver: FakeWebhookReceiver,
    admin_url: str,
    redis_url: str,
    redis_pid: int,
    template: str,
    prefix: str,
    workdir: Path,
) -> IsolationSide:
    """One side: a copy of the backlog, its own fake HubSpot, worker and beat."""
    database = f"{template}_{name}"
    side_dir = workdir / name
    side_dir.mkdir(exist_ok=True)
    with (
        own_database(admin_url, database, template=template) as url,
        own_redis_prefix(redis_url, prefix),
    ):
        port = free_port()
        fake_url = f"http://127.0.0.1:{port}"
        env = _env(
            options,
            database_url=url,
            redis_url=redis_url,
            prefix=prefix,
            destinations=destinations,
            hubspot_url=fake_url,
            webhook_url=receiver.url,
        )
        stack = Stack(env=env, workdir=side_dir)
        waker = Waker(
            Settings(
                database_url=url,
                celery_broker_url=redis_url,
                redis_url=redis_url,
                redis_key_prefix=prefix,
            )
        )
        try:
            stack.start(
                "fake",
                fake_hubspot_command(port, HUBSPOT_TOKEN, options.rate_limit, options.window),
            )
            stack.wait_for_http(f"{fake_url}/_fake/stats", timeout=60)
            stack.start(
                "worker", worker_command(concurrency=WORKER_CONCURRENCY, name=f"bench-{name}")
            )
            stack.wait_for_log("worker", "ready", timeout=90)
            stack.start("beat", beat_command(side_dir / "celerybeat-schedule"))
            stack.wait_for_log("beat", "Starting", timeout=60)
            return _measure_side(
                options,
                name,
                destinations,
                url=url,
                stack=stack,
                waker=waker,
                fake=FakeControl(fake_url),
                receiver=receiver,
                processes=StackProcesses(
                    stack,
                    admin_url,
                    database,
                    redis_pid,
                    others={"this process (polling, the receiver)": os.getpid()},
                ),
            )
        finally:
            waker.close()
            # A deliver task may sit on a held webhook call; the database is dropped
            # next, so neither beat nor the worker has anything left to finish.
            for child in ("beat", "worker"):
                if child in stack.children:
                    stack.kill(child)
            stack.stop_all()


def _measure_side(
    options: IsolationOptions,
    name: str,
    destinations: tuple[str, ...],
    *,
    url: str,
    stack: Stack,
    waker: Waker,
    fake: FakeControl,
    receiver: FakeWebhookReceiver,
    processes: StackProcesses,
) -> IsolationSide:
    stats_before = fake.stats()
    held_before = len(receiver.requests_log)
    cpu_before = processes.cpu()
    machine, watched = MachineCpu(), time.monotonic()
    with psycopg.connect(url) as connection:
        started = database_clock(connection)
    for destination in destinations:
        waker.wake(destination)  # the sweep would too, within SWEEP_SECONDS
    elapsed, steady, finished, complete = measure_drain(
        options.users,
        options.timeout,
        url=url,
        first_id=0,
        started=started,
        processes=processes,
        stack=stack,
    )
    busy, wall = machine.busy_seconds(), time.monotonic() - watched
    cpu = cpu_spent(cpu_before, processes.cpu())
    stats_after = fake.stats()
    webhook = WEBHOOK in destinations
    return IsolationSide(
        name=name,
        destinations=destinations,
        elapsed=elapsed,
        steady_rate=steady,
        finished=finished,
        complete=complete,
        statuses=status_counts(url, 0),
        requests=stats_after["total"] - stats_before["total"],
        rate_limited=stats_after["rate_limited"] - stats_before["rate_limited"],
        webhook_statuses=status_counts(url, 0, WEBHOOK) if webhook else {},
        webhook_attempts=_webhook_attempts(url) if webhook else 0,
        held=len(receiver.requests_log) - held_before,
        cpu=cpu,
        busy=busy,
        wall=wall,
    )


def _webhook_attempts(url: str) -> int:
    return _count(
        url,
        "SELECT count(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id "
        "WHERE d.destination = %s",
        WEBHOOK,
    )
