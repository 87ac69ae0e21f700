"""Webhook throughput: signed messages per second to a local receiver, next to the engine alone.

Both sides drain the same backlog of new users, one ``licenses`` delivery each
(``LICENSES_KIND=webhook``), written to the outbox as ``record_event`` does and
copied into one database per side. Each side calls ``workers.delivery.run_batch``
in a loop in this process (all the Celery task does), with the same settings and
batch size; only the destination differs:

- memory: a destination that answers every intent at once, in memory: the
  engine's own pace (claim, plan, record), the most any destination can reach.
- webhook: the real adapter (a signed Standard Webhooks message per user,
  ``PARALLEL_REQUESTS`` at once over a keep-alive session, the shared Redis rate
  limiter at a generous limit) sending to ``python -m idsync.fakes.webhook_receiver``
  in a process of its own, which verifies every signature and timestamp with the
  ``standardwebhooks`` package and answers 401 when one fails.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench.common import MachineCpu, cpu_seconds, own_database, own_redis_prefix, stack_pid
from bench.delivery import insert_backlog, status_counts
from idsync.fakes.webhook_receiver import DEFAULT_PATH, DEFAULT_SECRET
from idsync.settings import Settings
from idsync.stack import Stack, free_port
from workers.delivery import run_batch
from workers.destinations.base import ContactClaim, Destination, Intent, Outcome, Verdict
from workers.runtime import build_runtime

WEBHOOK = "licenses"
SIDES = ("memory", "webhook")


@dataclass
class WebhookOptions:
    users: int
    rate_limit: int  # requests per second the webhook destination may send
    batch_size: int


@dataclass
class WebhookSide:
    name: str
    elapsed: float  # seconds from the first claim to the empty one
    batches: int
    statuses: dict[str, int]
    cpu: dict[str, float]  # CPU seconds by process
    busy: float  # CPU seconds the whole machine was busy meanwhile
    calls: int  # HTTP calls recorded in the deliveries' attempts
    call_ms: float | None  # their mean duration, request sent to answer read

    @property
    def delivered(self) -> int:
        return sum(n for label, n in self.statuses.items() if label.split(":")[0] == "succeeded")

    @property
    def rate(self) -> float:
        """Deliveries that succeeded per second."""
        return self.delivered / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cores_busy(self) -> float:
        return self.busy / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cores_other(self) -> float:
        """Cores that went to processes outside the benchmark, on average."""
        if self.elapsed <= 0:
            return 0.0
        return max(0.0, self.busy - sum(self.cpu.values())) / self.elapsed


@dataclass
class WebhookResult:
    options: WebhookOptions
    sides: dict[str, WebhookSide]
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Webhook messages per second over the in-memory destination's deliveries per second."""
        memory = self.sides["memory"].rate
        return self.sides["webhook"].rate / memory if memory else math.nan


class MemoryDestination:
    """Answers every intent at once, in memory: no HTTP, no vendor rules, no database."""

    name = WEBHOOK
    clears_with: str | None = None

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    def deliver(
        self, intents: list[Intent], *, claim: ContactClaim, deadline: float
    ) -> dict[str, Outcome]:
        """Succeed for every intent, linking each new user to a record id of its own."""
        return {
            intent.key: Outcome(
                Verdict.SUCCEEDED,
                external_id=intent.link.external_id or f"r{next(self._ids)}",
                email=intent.user.email,
            )
            for intent in intents
        }

    def probe(self) -> str | None:
        return None

    def read(self, external_ids: list[str]) -> dict[str, dict[str, Any]] | None:
        return None

    def close(self) -> None:
        """Nothing to release."""


def receiver_command(port: int) -> list[str]:
    """The fake Standard Webhooks receiver as a process of its own."""
    return [
        sys.executable,
        "-m",
        "idsync.fakes.webhook_receiver",
        "--port",
        str(port),
        "--secret",
        DEFAULT_SECRET,
    ]


def _settings(
    url: str, redis_url: str, prefix: str, webhook_url: str, options: WebhookOptions
) -> Settings:
    """Both sides' settings: one webhook destination, its batch size and rate limit."""
    return Settings(
        database_url=url,
        celery_broker_url=redis_url,
        redis_url=redis_url,
        redis_key_prefix=prefix,
        destinations=(WEBHOOK,),
        destination_env={
            "LICENSES_KIND": "webhook",
            "LICENSES_URL": webhook_url,
            "LICENSES_SECRET": DEFAULT_SECRET,
            "LICENSES_RATE_LIMIT": f"{options.rate_limit}/1s",
            "LICENSES_BATCH_SIZE": str(options.batch_size),
        },
    )


def run_webhook(
    options: WebhookOptions,
    *,
    admin_url: str,
    redis_url: str,
    run_id: str,
    workdir: Path,
    schema: str,
) -> WebhookResult:
    """Drain the same backlog with the in-memory destination, then with the real webhook.

    The backlog's database starts as a copy of ``schema``, a migrated empty database.
    """
    prefix = f"idsync-bench-{run_id}-webhook"
    template = f"idsync_bench_{run_id}_webhook"
    port = free_port()
    webhook_url = f"http://127.0.0.1:{port}{DEFAULT_PATH}"
    with own_database(admin_url, template, template=schema) as template_url:
        stack = Stack(env={"DATABASE_URL": template_url}, workdir=workdir)
        insert_backlog(template_url, "created", options.users, run_id, destinations=(WEBHOOK,))
        stack.start("receiver", receiver_command(port))
        try:
            stack.wait_for_log("receiver", webhook_url, timeout=30)
            sides = {}
            for name in SIDES:
                database = f"{template}_{name}"
                with (
                    own_database(admin_url, database, template=template) as url,
                    own_redis_prefix(redis_url, f"{prefix}-{name}"),
                ):
                    settings = _settings(url, redis_url, f"{prefix}-{name}", webhook_url, options)
                    receiver_pid = stack_pid(stack, "receiver") if name == "webhook" else None
                    sides[name] = _drain(
                        name,
                        settings,
                        admin_url=admin_url,
                        database=database,
                        receiver=receiver_pid,
                    )
        finally:
            stack.stop_all()
    result = WebhookResult(options=options, sides=sides)
    for side in sides.values():
        if side.delivered != options.users:
            result.notes.append(
                f"webhook {side.name}: {side.delivered} of {options.users} delivered: "
                f"{side.statuses}"
            )
    return result


def _backends(admin_url: str, database: str) -> list[int]:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)
        ).fetchall()
    return [int(row[0]) for row in rows]


def _drain(
    name: str, settings: Settings, *, admin_url: str, database: str, receiver: int | None
) -> WebhookSide:
    """``run_batch`` until nothing is due, timed; the destination is memory or the webhook."""
    runtime = build_runtime(settings)
    destination: Destination = (
        MemoryDestination() if receiver is None else runtime.destination(WEBHOOK)
    )
    processes = {"this process (engine and sender)": os.getpid()}
    if receiver is not None:
        processes["receiver"] = receiver
    try:
        # Open the pool's connections before the clock starts, as a running worker has them.
        with runtime.sessions() as session:
            session.connection()
        before = {label: cpu_seconds(pid) for label, pid in processes.items()}
        backends = {pid: cpu_seconds(pid) for pid in _backends(admin_url, database)}
        machine = MachineCpu()
        batches = 0
        started = time.monotonic()
        while run_batch(
            sessions=runtime.sessions, settings=settings, destination=destination
        ).claimed:
            batches += 1
        elapsed = time.monotonic() - started
        busy = machine.busy_seconds()
        cpu = {label: cpu_seconds(pid) - before[label] for label, pid in processes.items()}
        cpu["PostgreSQL backends"] = sum(
            max(0.0, cpu_seconds(pid) - backends.get(pid, 0.0))
            for pid in _backends(admin_url, database)
        )
    finally:
        destination.close()
        runtime.engine.dispose()
        if runtime.redis is not None:
            runtime.redis.close()
    calls, call_ms = _calls(settings.database_url)
    return WebhookSide(
        name=name,
        elapsed=elapsed,
        batches=batches,
        statuses=status_counts(settings.database_url, 0, WEBHOOK),
        cpu=cpu,
        busy=busy,
        calls=calls,
        call_ms=call_ms,
    )


def _calls(url: str) -> tuple[int, float | None]:
    """How many HTTP calls the attempts record, and their mean duration in milliseconds."""
    with psycopg.connect(url) as connection:
        row = connection.execute(
            "SELECT count(duration_ms), avg(duration_ms) FROM delivery_attempts"
        ).fetchone()
    if row is None or not row[0]:
        return 0, None
    return int(row[0]), float(row[1])
