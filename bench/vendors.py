"""Vendors: Salesforce, Segment and Braze each drained at their fake's ceiling.

Each fake runs as a process of its own (``python -m idsync.fakes.<kind>``) with a
ceiling of records per second (``--records-per-second``, at most 200 here), which
it enforces as its vendor does: Segment and Braze answer 429, Salesforce 403
``REQUEST_LIMIT_EXCEEDED``. idsync's ``<NAME>_RATE_LIMIT`` is set to match: the
requests a batch of new users takes (Salesforce: one lookup by email, then the
upsert; Segment and Braze: one call) at the pace that carries the ceiling's
records, with ``<NAME>_BATCH_SIZE`` users per batch.

One ``celery -A workers worker`` and beat serve the three destinations
(``DESTINATIONS=salesforce,segment,braze``); the vendors are drained one after
the other, each from a backlog of new users written to the outbox (as
``record_event`` does) for that destination alone, then woken. The clock starts
at the backlog's commit and stops at the last ``finished_at`` (the database's
clock); the fake counts its answers, and how many were its limit's.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import requests

from bench.common import own_database, own_redis_prefix
from bench.delivery import drain_timing, finished_count, insert_backlog, status_counts
from bench.report import Row, number, verdict, verdict_below
from idsync.fakes.braze import DEFAULT_KEY as BRAZE_KEY
from idsync.fakes.salesforce import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from idsync.fakes.segment import DEFAULT_WRITE_KEY
from idsync.settings import Settings
from idsync.stack import Stack, beat_command, free_port, worker_command
from idsync.wakeups import Waker

MAX_CEILING = 200  # records per second: what one worker on two cores feeds with room
POLL_SECONDS = 0.25
WORKER_CONCURRENCY = 3  # the drained vendor's deliver tasks, and a slot for the sweep


@dataclass(frozen=True)
class Vendor:
    """One vendor's fake, its batch, and the requests one batch of new users takes."""

    name: str  # the destination, and the kind
    batch_size: int
    calls_per_batch: int
    limit_answer: str  # how the fake refuses a request over its ceiling
    # Deliver tasks at once (``<NAME>_CONCURRENCY``): with two, one task claims and
    # records its batch while the other waits for an answer.
    concurrency: int = 2

    def rate_limit(self, ceiling: int) -> str:
        """``<NAME>_RATE_LIMIT`` that lets through the ceiling's records and no more."""
        per_second = ceiling * self.calls_per_batch / self.batch_size
        if per_second.is_integer():
            return f"{int(per_second)}/1s"
        return f"{self.calls_per_batch}/{self.batch_size / ceiling:g}s"

    def settings(self, url: str, ceiling: int) -> dict[str, str]:
        """The destination's variables, pointing at its fake."""
        prefix = f"{self.name.upper()}_"
        credentials = {
            "salesforce": {
                "LOGIN_URL": url,
                "CLIENT_ID": DEFAULT_CLIENT_ID,
                "CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
            },
            "segment": {"WRITE_KEY": DEFAULT_WRITE_KEY, "BASE_URL": url},
            "braze": {"REST_ENDPOINT": url, "API_KEY": BRAZE_KEY},
        }[self.name]
        values = credentials | {
            "RATE_LIMIT": self.rate_limit(ceiling),
            "BATCH_SIZE": str(self.batch_size),
            "CONCURRENCY": str(self.concurrency),
        }
        return {prefix + key: value for key, value in values.items()}


VENDORS = (
    # A batch of 200 new users: two SOQL lookups of 100 emails each (adoption of
    # Contacts made by hand), then one Collections upsert. One task at a time, so
    # that any three requests in a row hold one upsert: the fake's ceiling counts
    # the records of Collections calls, idsync's limit counts requests.
    Vendor("salesforce", 200, 3, "403 REQUEST_LIMIT_EXCEEDED", concurrency=1),
    Vendor("segment", 100, 1, "429"),
    # 50 objects per /users/track: 4 requests a second carry 200 records.
    Vendor("braze", 50, 1, "429"),
)


@dataclass
class VendorsOptions:
    users: int  # new users each vendor drains
    ceiling: int  # records per second each fake admits
    timeout: float  # seconds one drain may take at most
    sweep_seconds: float = 1.0


@dataclass
class VendorDrain:
    vendor: Vendor
    elapsed: float  # backlog commit to the last finished delivery (or to the stop), seconds
    steady_rate: float | None
    complete: bool
    statuses: dict[str, int]
    requests: int  # answered by the fake (token and lookups included)
    limited: int  # of which the fake's limit answer

    @property
    def synced(self) -> int:
        return sum(n for label, n in self.statuses.items() if label.split(":")[0] == "succeeded")

    @property
    def rate(self) -> float:
        return self.synced / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def limited_share(self) -> float:
        return self.limited / self.requests if self.requests else math.nan


@dataclass
class VendorsResult:
    options: VendorsOptions
    drains: list[VendorDrain]
    notes: list[str] = field(default_factory=list)


def fake_command(vendor: str, port: int, ceiling: int) -> list[str]:
    """A vendor's fake as a process of its own, at ``ceiling`` records per second."""
    return [
        sys.executable,
        "-m",
        f"idsync.fakes.{vendor}",
        "--port",
        str(port),
        "--records-per-second",
        str(ceiling),
    ]


def _fake_stats(url: str) -> dict[str, Any]:
    response = requests.get(f"{url}/_fake/stats", timeout=30)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def run_vendors(
    options: VendorsOptions,
    *,
    admin_url: str,
    redis_url: str,
    run_id: str,
    workdir: Path,
    schema: str,
) -> VendorsResult:
    """Drain ``options.users`` new users into each vendor's fake, one vendor after another.

    The database starts as a copy of ``schema``, a migrated empty database.
    """
    if not 1 <= options.ceiling <= MAX_CEILING:
        raise ValueError(f"--vendor-ceiling must be 1 to {MAX_CEILING} records per second")
    prefix = f"idsync-bench-{run_id}-vendors"
    database = f"idsync_bench_{run_id}_vendors"
    fakes = {vendor.name: f"http://127.0.0.1:{free_port()}" for vendor in VENDORS}
    with (
        own_database(admin_url, database, template=schema) as url,
        own_redis_prefix(redis_url, prefix),
    ):
        env = {
            "DATABASE_URL": url,
            "CELERY_BROKER_URL": redis_url,
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": prefix,
            "DESTINATIONS": ",".join(vendor.name for vendor in VENDORS),
            "SWEEP_SECONDS": f"{options.sweep_seconds:g}",
        }
        for vendor in VENDORS:
            env |= vendor.settings(fakes[vendor.name], options.ceiling)
        stack = Stack(env=env, workdir=workdir)
        waker = Waker(
            Settings(
                database_url=url,
                celery_broker_url=redis_url,
                redis_url=redis_url,
                redis_key_prefix=prefix,
            )
        )
        try:
            for vendor in VENDORS:
                port = int(fakes[vendor.name].rsplit(":", 1)[1])
                stack.start(vendor.name, fake_command(vendor.name, port, options.ceiling))
            for vendor in VENDORS:
                stack.wait_for_http(f"{fakes[vendor.name]}/_fake/stats", timeout=60)
            stack.start("worker", worker_command(concurrency=WORKER_CONCURRENCY, name="vendors"))
            stack.wait_for_log("worker", "ready", timeout=90)
            stack.start("beat", beat_command(workdir / "celerybeat-schedule"))
            stack.wait_for_log("beat", "Starting", timeout=60)
            drains = [
                _drain(
                    vendor,
                    options,
                    url=url,
                    fake_url=fakes[vendor.name],
                    run_id=run_id,
                    stack=stack,
                    waker=waker,
                )
                for vendor in VENDORS
            ]
        finally:
            waker.close()
            stack.stop_all()
    result = VendorsResult(options=options, drains=drains)
    for drain in drains:
        others = {k: n for k, n in drain.statuses.items() if k.split(":")[0] != "succeeded"}
        if others or not drain.complete:
            result.notes.append(
                f"vendors {drain.vendor.name}: {drain.synced} of {options.users} synced: "
                f"{drain.statuses}"
            )
    return result


def _drain(
    vendor: Vendor,
    options: VendorsOptions,
    *,
    url: str,
    fake_url: str,
    run_id: str,
    stack: Stack,
    waker: Waker,
) -> VendorDrain:
    """Write a backlog for ``vendor`` alone, wake it, and wait for every delivery to finish."""
    before = _fake_stats(fake_url)
    first_id, started = insert_backlog(
        url, "created", options.users, f"{run_id}_{vendor.name}", destinations=(vendor.name,)
    )
    waker.wake(vendor.name)  # the sweep would too, within SWEEP_SECONDS
    deadline = time.monotonic() + options.timeout
    with psycopg.connect(url, autocommit=True) as connection:
        finished = 0
        while time.monotonic() < deadline:
            stack.check_alive()
            finished = finished_count(connection, first_id, vendor.name)
            if finished >= options.users:
                break
            time.sleep(POLL_SECONDS)
        complete = finished >= options.users
        stopped = None
        if not complete:
            row = connection.execute("SELECT clock_timestamp()").fetchone()
            stopped = row[0] if row else None
        elapsed, steady = drain_timing(connection, first_id, started, stopped, vendor.name)
    after = _fake_stats(fake_url)
    return VendorDrain(
        vendor=vendor,
        elapsed=elapsed,
        steady_rate=steady,
        complete=complete,
        statuses=status_counts(url, first_id, vendor.name),
        requests=int(after["requests"]) - int(before["requests"]),
        limited=int(after["throttled"]) - int(before["throttled"]),
    )


def vendors_rows(result: VendorsResult) -> list[Row]:
    """Per vendor: new users per second against the fake's ceiling, and its limit answers."""
    options = result.options
    rows = []
    for drain in result.drains:
        name = drain.vendor.name
        share = drain.rate / options.ceiling
        steady = f"; steady 10%-90%: {number(drain.steady_rate)}/s" if drain.steady_rate else ""
        done = "" if drain.complete else " (timed out: partial)"
        rows += [
            Row(
                "vendors",
                f"{name}: new users synced per second, against its fake's ceiling",
                f"{number(drain.rate)}/s = {share:.2f} x ceiling {number(options.ceiling)}/s "
                f"({number(drain.synced)} of {number(options.users)} in "
                f"{number(drain.elapsed, 1)} s{steady}){done}",
                ">= 0.9x ceiling",
                verdict(share, 0.9, at_least=True),
            ),
            Row(
                "vendors",
                f"{name}: requests answered {drain.vendor.limit_answer} by its fake",
                f"{drain.limited_share:.2%} ({drain.limited} of {drain.requests})",
                "< 1%",
                verdict_below(drain.limited_share, 0.01),
            ),
        ]
    limits = ", ".join(
        f"{v.name.upper()}_RATE_LIMIT={v.rate_limit(options.ceiling)}, "
        f"{v.name.upper()}_BATCH_SIZE={v.batch_size}, "
        f"{v.name.upper()}_CONCURRENCY={v.concurrency}"
        for v in VENDORS
    )
    rows.append(
        Row(
            "vendors",
            "setup",
            f"{number(options.users)} new users per vendor, each fake its own process at "
            f"{number(options.ceiling)} records/s; {limits}; one `celery -A workers worker "
            f"--concurrency {WORKER_CONCURRENCY}` and beat (SWEEP_SECONDS="
            f"{options.sweep_seconds:g}) with DESTINATIONS=salesforce,segment,braze, drained "
            "one vendor at a time; backlog written to the outbox before the wake-up",
        )
    )
    return rows
