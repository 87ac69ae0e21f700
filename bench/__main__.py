"""``python -m bench``: run the benchmarks and print one markdown table.

``make bench`` runs them all; ``--quick`` runs each briefly; ``--only`` picks some;
``--profile ingest|delivery`` shows where idsync's time goes instead. Every size and
duration is an option (``--help``). Targets are reported, never asserted: the exit
status is 0 whenever the benchmarks ran, whatever they measured, and 1 when one of
them failed (its row says why; the others still run).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import redis

from bench.backfill import BackfillOptions, run_backfill_bench
from bench.bare_loop import BareLoop
from bench.claims import ClaimsOptions, claims_rows, run_claims
from bench.common import (
    PG_ADMIN_URL,
    REDIS_URL,
    ROOT,
    MachineCpu,
    describe_machine,
    find_wrk,
    migrated_schema,
    wrk_version,
)
from bench.delivery import BacklogResult, DeliveryOptions, Phase, PhaseResult, run_backlog
from bench.ingest import IngestOptions, run_ingest
from bench.ingest_depth import IngestDepthOptions, ingest_depth_rows, run_ingest_depth
from bench.isolation import IsolationOptions, run_isolation
from bench.load import WRK_MISSING
from bench.report import (
    Report,
    Row,
    backfill_rows,
    bare_loop_rows,
    capacity_row,
    delivery_rows,
    ingest_rows,
    isolation_rows,
    naive_rows,
    webhook_rows,
)
from bench.vendors import MAX_CEILING, VendorsOptions, run_vendors, vendors_rows
from bench.webhook import WebhookOptions, run_webhook

BENCHMARKS = (
    "ingest",
    "delivery",
    "naive",
    "isolation",
    "webhook",
    "claims",
    "backfill",
    "vendors",
)
UNLIMITED = 1_000_000  # requests per second: no rate limit in practice

# (full run, --quick) defaults of every size and duration.
DEFAULTS: dict[str, tuple[float, float]] = {
    "rounds": (3, 1),
    "round_seconds": (15, 3),
    "warmup_seconds": (3, 1),
    "events": (20_000, 1_000),
    "updates": (5_000, 500),
    "capacity_events": (4_000, 300),
    "fast_events": (10_000, 1_000),
    "delivery_timeout": (300, 90),
    "naive_events": (2_000, 200),
    "naive_seconds": (40, 10),
    "quiet_wait": (30, 10),
    "isolation_users": (20_000, 1_000),
    "webhook_users": (5_000, 500),
    "claims_depth": (1_000_000, 100_000),
    "claims_count": (30, 10),
    "claims_drain_seconds": (10, 3),
    "claims_ingest_rounds": (3, 1),
    "claims_ingest_seconds": (10, 3),
    "backfill_users": (100_000, 5_000),
    "vendor_users": (4_000, 600),
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short runs of every benchmark")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"{', '.join(BENCHMARKS)} (repeat or comma-separate)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench-results" / "latest.md",
        help="where to write the markdown (default: bench-results/latest.md)",
    )
    parser.add_argument(
        "--pg-admin-url",
        default=PG_ADMIN_URL,
        help="a database URL to create and drop the benchmarks' databases with",
    )
    parser.add_argument("--redis-url", default=REDIS_URL)
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the processes' logs (always kept when a benchmark fails)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        metavar="S",
        help="wait up to S seconds before each benchmark for the machine to "
        "be idle (default 30, quick 10; 0 to start at once)",
    )
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.35,
        metavar="CORES",
        help="idle means fewer than CORES cores busy (default 0.35)",
    )

    ingest = parser.add_argument_group("ingest")
    ingest.add_argument(
        "--client",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (auto: wrk if installed, else the Python client)",
    )
    ingest.add_argument("--wrk", metavar="PATH", help="the wrk binary (default: wrk on PATH)")
    ingest.add_argument(
        "--ingest-workers",
        type=int,
        default=2,
        help="gunicorn --workers for all three servers (default 2)",
    )
    ingest.add_argument("--connections", type=int, default=8, help="concurrent connections")
    ingest.add_argument("--threads", type=int, default=2, help="wrk threads")
    ingest.add_argument("--rounds", type=int, help="rounds per server (default 3, quick 1)")
    ingest.add_argument("--round-seconds", type=float, help="seconds per round (15, quick 3)")
    ingest.add_argument("--warmup-seconds", type=float, help="warm-up per server (3, quick 1)")

    delivery = parser.add_argument_group("delivery and naive")
    delivery.add_argument(
        "--events", type=int, help="new-user backlog of the delivery benchmark (20000, quick 1000)"
    )
    delivery.add_argument(
        "--updates",
        type=int,
        help="then updates to as many of those users (5000, quick 500; 0: none)",
    )
    delivery.add_argument(
        "--rate-limit",
        type=int,
        default=2,
        help="requests per window, for the fake HubSpot and idsync (default 2: a ceiling of "
        "200 contacts/s, within what two cores feed; see --capacity-events)",
    )
    delivery.add_argument("--window", type=float, default=1.0, help="seconds (default 1)")
    delivery.add_argument(
        "--fast-rate-limit",
        type=int,
        default=10,
        help="then the same again at this many requests per window (default 10: a ceiling of "
        "1,000 contacts/s; 0: skip)",
    )
    delivery.add_argument(
        "--fast-events",
        type=int,
        help="new-user backlog at --fast-rate-limit, then as many updates as --updates "
        "allows (10000, quick 1000)",
    )
    delivery.add_argument(
        "--capacity-events",
        type=int,
        help="first measure the workers without a rate limit on this many new users and "
        "updates, to show the ceiling is within reach (4000, quick 300; 0: skip)",
    )
    delivery.add_argument(
        "--worker-concurrency", type=int, default=2, help="celery worker --concurrency (default 2)"
    )
    delivery.add_argument(
        "--deliver-tasks",
        type=int,
        default=1,
        help="HUBSPOT_CONCURRENCY: HubSpot deliver tasks at once (default 1, as in idsync)",
    )
    delivery.add_argument("--sweep-seconds", type=float, default=1.0)
    delivery.add_argument(
        "--delivery-timeout", type=float, help="most seconds one backlog may take (300, quick 90)"
    )
    delivery.add_argument(
        "--naive-events", type=int, help="sample for HUBSPOT_BATCH_SIZE=1 (2000, quick 200)"
    )
    delivery.add_argument(
        "--naive-seconds", type=float, help="how long the naive mode runs on it (40, quick 10)"
    )

    isolation = parser.add_argument_group(
        "isolation (HubSpot beside a webhook that never answers, at --rate-limit/--window)"
    )
    isolation.add_argument(
        "--isolation-users",
        type=int,
        help="new users posted through ingest and drained by each side (20000, quick 1000)",
    )

    webhook = parser.add_argument_group("webhook (throughput against the in-memory destination)")
    webhook.add_argument(
        "--webhook-users", type=int, help="new users each side delivers (5000, quick 500)"
    )
    webhook.add_argument(
        "--webhook-rate-limit",
        type=int,
        default=1000,
        help="LICENSES_RATE_LIMIT, per second (default 1000: generous)",
    )
    webhook.add_argument(
        "--webhook-batch-size",
        type=int,
        default=50,
        help="LICENSES_BATCH_SIZE for both sides (default 50, the kind's default)",
    )

    claims = parser.add_argument_group("claims (the claim and the drain at growing backlogs)")
    claims.add_argument(
        "--claims-depth",
        type=int,
        help="pending deliveries at the deepest step, from 10,000 by tens (1000000, quick 100000)",
    )
    claims.add_argument("--claims-count", type=int, help="claims timed per depth (30, quick 10)")
    claims.add_argument(
        "--claims-drain-seconds", type=float, help="drain time per depth (10, quick 3)"
    )
    claims.add_argument(
        "--claims-ingest-rounds",
        type=int,
        help="rounds of the store path on the empty and the full outbox (3, quick 1)",
    )
    claims.add_argument(
        "--claims-ingest-seconds", type=float, help="seconds per such round (10, quick 3)"
    )

    backfill = parser.add_argument_group("backfill (idsync backfill from the fake Auth0)")
    backfill.add_argument(
        "--backfill-users", type=int, help="users in the fake tenant (100000, quick 5000)"
    )

    vendors = parser.add_argument_group(
        "vendors (Salesforce, Segment and Braze, each at its fake's ceiling)"
    )
    vendors.add_argument(
        "--vendor-users", type=int, help="new users each vendor drains (4000, quick 600)"
    )
    vendors.add_argument(
        "--vendor-ceiling",
        type=int,
        default=MAX_CEILING,
        help=f"records per second each fake admits, and idsync's limit matched to it "
        f"(default and most {MAX_CEILING})",
    )

    profile = parser.add_argument_group("profiling (instead of the benchmarks)")
    profile.add_argument("--profile", choices=("ingest", "delivery", "limiter"))
    profile.add_argument("--profiler", choices=("cpu", "wall", "cprofile"), default="cpu")
    profile.add_argument("--profile-seconds", type=float, default=15)
    profile.add_argument("--profile-events", type=int, default=2000)

    args = parser.parse_args(argv)
    column = 1 if args.quick else 0
    for name, values in DEFAULTS.items():
        if getattr(args, name) is None:
            value = values[column]
            setattr(args, name, int(value) if float(value).is_integer() else value)
    only = [part.strip() for item in args.only for part in item.split(",") if part.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    args.only = [name for name in BENCHMARKS if name in only] if only else list(BENCHMARKS)
    return args


def choose_client(requested: str, wrk: str | None) -> str | None:
    """The load generator to use, or None when wrk was asked for and is missing.

    Without wrk, say so and how to install it; ``auto`` then falls back to the
    Python client, ``wrk`` stops.
    """
    if requested == "python":
        return "python"
    if find_wrk(wrk) is not None:
        return "wrk"
    print(f"bench: {WRK_MISSING}", file=sys.stderr)
    return None if requested == "wrk" else "python"


def wait_for_quiet(seconds: float, threshold: float) -> float:
    """Wait up to ``seconds`` for fewer than ``threshold`` cores to be busy; the last reading."""
    deadline = time.monotonic() + seconds
    busy = 0.0
    while True:
        cpu = MachineCpu()
        time.sleep(2)
        busy = cpu.busy_seconds() / 2
        if busy < threshold or time.monotonic() >= deadline:
            return busy
        print(
            f"bench: waiting for the machine to calm down ({busy:.2f} cores busy)", file=sys.stderr
        )


class Runner:
    """Runs the chosen benchmarks into one report."""

    def __init__(self, args: argparse.Namespace, report: Report, client: str) -> None:
        self.args, self.report, self.client = args, report, client
        self.run_id = uuid.uuid4().hex[:8]
        self.workdir = Path(tempfile.mkdtemp(prefix="idsync-bench-"))
        client_ = redis.Redis.from_url(args.redis_url)
        try:
            self.redis_pid = int(client_.info("server")["process_id"])
        finally:
            client_.close()
        self.created: PhaseResult | None = None
        self._cleanup = ExitStack()
        self._schema: str | None = None

    def schema(self) -> str:
        """The run's migrated empty database, which every benchmark's database copies."""
        if self._schema is None:
            self._schema = self._cleanup.enter_context(
                migrated_schema(
                    self.args.pg_admin_url,
                    f"idsync_bench_{self.run_id}_schema",
                    self._dir("schema"),
                )
            )
        return self._schema

    def _quiet(self, name: str) -> None:
        if self.args.quiet_wait <= 0:
            return
        busy = wait_for_quiet(self.args.quiet_wait, self.args.quiet_threshold)
        if busy >= self.args.quiet_threshold:
            self.report.notes.append(
                f"{name}: the machine was busy ({busy:.2f} cores) with other work when it "
                f"started; its numbers are lower than on an idle machine"
            )

    def _say(self, text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def ingest(self) -> None:
        args = self.args
        self._quiet("ingest")
        self._say("ingest: idsync, bare and floor servers in alternating rounds")
        options = IngestOptions(
            workers=args.ingest_workers,
            connections=args.connections,
            threads=args.threads,
            rounds=args.rounds,
            round_seconds=args.round_seconds,
            warmup_seconds=args.warmup_seconds,
            client=self.client,
            wrk=find_wrk(args.wrk),
        )
        result = run_ingest(
            options,
            admin_url=args.pg_admin_url,
            redis_url=args.redis_url,
            run_id=self.run_id,
            workdir=self._dir("ingest"),
            schema=self.schema(),
        )
        self.report.rows += ingest_rows(result, self.report.machine.cores)
        self.report.notes += result.notes

    def _options(self) -> DeliveryOptions:
        args = self.args
        return DeliveryOptions(
            rate_limit=args.rate_limit,
            window=args.window,
            concurrency=args.worker_concurrency,
            deliver_tasks=args.deliver_tasks,
            sweep_seconds=args.sweep_seconds,
            timeout=args.delivery_timeout,
        )

    def _backlog(
        self,
        phases: list[Phase],
        batch_size: int,
        label: str,
        options: DeliveryOptions | None = None,
        baseline: BareLoop | None = None,
    ) -> BacklogResult:
        return run_backlog(
            options or self._options(),
            phases,
            batch_size=batch_size,
            label=label,
            admin_url=self.args.pg_admin_url,
            redis_url=self.args.redis_url,
            redis_pid=self.redis_pid,
            run_id=self.run_id,
            workdir=self._dir(label),
            schema=self.schema(),
            baseline=baseline,
        )

    def capacity(self) -> None:
        """What the same workers deliver on this machine when no rate limit holds them back."""
        args = self.args
        count = args.capacity_events
        self._say(f"delivery: capacity without a rate limit, {count} new users and updates")
        options = replace(self._options(), rate_limit=UNLIMITED, window=1.0)
        phases = [Phase("created", count), Phase("updated", count)]
        bare = BareLoop(
            count, admin_url=args.pg_admin_url, run_id=self.run_id, schema=self.schema()
        )
        result = self._backlog(
            phases, batch_size=100, label="capacity", options=options, baseline=bare
        )
        self.report.rows.append(capacity_row(result, self._options()))
        self.report.rows += bare_loop_rows(result, bare.result)
        self.report.notes += result.notes

    def delivery(self) -> None:
        args = self.args
        self._quiet("delivery")
        if args.capacity_events:
            self.capacity()
        self._say(f"delivery: {args.events} new users, then {args.updates} updates")
        phases = [Phase("created", args.events)]
        if args.updates:
            phases.append(Phase("updated", min(args.updates, args.events)))
        result = self._backlog(phases, batch_size=100, label="delivery")
        self.created = result.phases[0]
        self.report.rows += delivery_rows(result, self.report.machine.cores)
        self.report.notes += result.notes
        if args.fast_rate_limit and args.fast_events:
            self._fast_delivery()

    def _fast_delivery(self) -> None:
        """The same workers at a higher rate limit: whether they keep up with its ceiling."""
        args = self.args
        events, updates = args.fast_events, min(args.updates, args.fast_events)
        self._say(
            f"delivery: {events} new users, then {updates} updates, "
            f"at {args.fast_rate_limit}/{args.window:g}s"
        )
        phases = [Phase("created", events)] + ([Phase("updated", updates)] if updates else [])
        options = replace(self._options(), rate_limit=args.fast_rate_limit)
        result = self._backlog(phases, batch_size=100, label="fast", options=options)
        self.report.rows += delivery_rows(result, self.report.machine.cores)
        self.report.notes += result.notes

    def naive(self) -> None:
        args = self.args
        self._quiet("naive")
        source = "from the delivery benchmark"
        if self.created is None:
            self._say(f"naive: batched reference on {args.naive_events} new users")
            reference = self._backlog(
                [Phase("created", args.naive_events)], batch_size=100, label="reference"
            )
            self.created, source = reference.phases[0], "on the same sample"
        self._say(
            f"naive: {args.naive_events} new users, one call per event, {args.naive_seconds:g} s"
        )
        phases = [Phase("created", args.naive_events, seconds=args.naive_seconds)]
        result = self._backlog(phases, batch_size=1, label="naive")
        self.report.rows += naive_rows(result, self.created, source)
        self.report.notes += result.notes

    def isolation(self) -> None:
        args = self.args
        self._quiet("isolation")
        self._say(
            f"isolation: {args.isolation_users} new users through ingest, then HubSpot alone "
            "and beside a webhook that never answers"
        )
        options = IsolationOptions(
            users=args.isolation_users,
            rate_limit=args.rate_limit,
            window=args.window,
            sweep_seconds=args.sweep_seconds,
            timeout=args.delivery_timeout,
            ingest_workers=args.ingest_workers,
            connections=args.connections,
        )
        result = run_isolation(
            options,
            admin_url=args.pg_admin_url,
            redis_url=args.redis_url,
            redis_pid=self.redis_pid,
            run_id=self.run_id,
            workdir=self._dir("isolation"),
            schema=self.schema(),
        )
        self.report.rows += isolation_rows(result)
        self.report.notes += result.notes

    def webhook(self) -> None:
        args = self.args
        self._quiet("webhook")
        self._say(
            f"webhook: {args.webhook_users} users to a local receiver and to memory, "
            "through run_batch"
        )
        options = WebhookOptions(
            users=args.webhook_users,
            rate_limit=args.webhook_rate_limit,
            batch_size=args.webhook_batch_size,
        )
        result = run_webhook(
            options,
            admin_url=args.pg_admin_url,
            redis_url=args.redis_url,
            run_id=self.run_id,
            workdir=self._dir("webhook"),
            schema=self.schema(),
        )
        self.report.rows += webhook_rows(result)
        self.report.notes += result.notes

    def claims(self) -> None:
        args = self.args
        self._quiet("claims")
        self._say(f"claims: claim time and unthrottled drain up to {args.claims_depth} pending")
        options = ClaimsOptions(
            max_depth=args.claims_depth,
            claims=args.claims_count,
            drain_seconds=args.claims_drain_seconds,
        )
        result = run_claims(
            options,
            admin_url=args.pg_admin_url,
            redis_url=args.redis_url,
            run_id=self.run_id,
            workdir=self._dir("claims"),
            schema=self.schema(),
        )
        self.report.rows += claims_rows(result)
        self.report.notes += result.notes
        self._say(f"claims: the store path with {args.claims_depth} events stored, against empty")
        depth = run_ingest_depth(
            IngestDepthOptions(
                stored=args.claims_depth,
                rounds=args.claims_ingest_rounds,
                round_seconds=args.claims_ingest_seconds,
            ),
            admin_url=args.pg_admin_url,
            run_id=self.run_id,
            schema=self.schema(),
        )
        self.report.rows += ingest_depth_rows(depth)

    def backfill(self) -> None:
        args = self.args
        self._quiet("backfill")
        self._say(f"backfill: {args.backfill_users} users from the fake Auth0, twice")
        result = run_backfill_bench(
            BackfillOptions(users=args.backfill_users),
            admin_url=args.pg_admin_url,
            redis_url=args.redis_url,
            run_id=self.run_id,
            workdir=self._dir("backfill"),
            schema=self.schema(),
        )
        self.report.rows += backfill_rows(result)
        self.report.notes += result.notes

    def vendors(self) -> None:
        args = self.args
        self._quiet("vendors")
        self._say(
            f"vendors: {args.vendor_users} new users each to Salesforce, Segment and Braze "
            f"at {args.vendor_ceiling} records/s"
        )
        result = run_vendors(
            VendorsOptions(
                users=args.vendor_users,
                ceiling=args.vendor_ceiling,
                timeout=args.delivery_timeout,
                sweep_seconds=args.sweep_seconds,
            ),
            admin_url=args.pg_admin_url,
            redis_url=args.redis_url,
            run_id=self.run_id,
            workdir=self._dir("vendors"),
            schema=self.schema(),
        )
        self.report.rows += vendors_rows(result)
        self.report.notes += result.notes

    def _dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(exist_ok=True)
        return path

    def run(self) -> bool:
        """Run every chosen benchmark; a failed one becomes a row, and the rest still run."""
        failed = False
        with self._cleanup:
            for name in self.args.only:
                try:
                    getattr(self, name)()
                except Exception as error:  # reported in the table; the exit status says so
                    failed = True
                    message = " ".join(str(error).split())[:400]
                    self.report.rows.append(
                        Row(name, "failed", f"{type(error).__name__}: {message}")
                    )
                    self._say(f"{name} failed: {error}")
        if failed or self.args.keep_logs:
            self.report.notes.append(f"processes' logs kept in {self.workdir}")
            self._say(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return not failed


def run_profile(args: argparse.Namespace, client: str) -> int:
    from bench.profile import profile_delivery, profile_ingest, profile_limiter

    workdir = Path(tempfile.mkdtemp(prefix="idsync-bench-profile-"))
    run_id = uuid.uuid4().hex[:8]
    if args.profile == "ingest":
        options = IngestOptions(
            workers=args.ingest_workers,
            connections=args.connections,
            threads=args.threads,
            rounds=1,
            round_seconds=args.profile_seconds,
            warmup_seconds=0,
            client=client,
            wrk=find_wrk(args.wrk),
        )
        text = profile_ingest(
            options,
            admin_url=args.pg_admin_url,
            redis_url=args.redis_url,
            run_id=run_id,
            workdir=workdir,
            seconds=args.profile_seconds,
            profiler=args.profiler,
        )
    elif args.profile == "limiter":
        text = profile_limiter(
            redis_url=args.redis_url,
            run_id=run_id,
            workdir=workdir,
            seconds=args.profile_seconds,
            limit=args.rate_limit,
            window=args.window,
        )
    else:
        text = profile_delivery(
            admin_url=args.pg_admin_url,
            redis_url=args.redis_url,
            run_id=run_id,
            workdir=workdir,
            events=args.profile_events,
            profiler=args.profiler,
        )
    print(text)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    needs_load = args.profile == "ingest" or (not args.profile and "ingest" in args.only)
    client = choose_client(args.client, args.wrk) if needs_load else "python"
    if client is None:
        return 2
    if args.profile:
        return run_profile(args, client)
    version = wrk_version(find_wrk(args.wrk)) if client == "wrk" else None
    generator = version or "Python client of bench/load.py (wrk not found or not chosen)"
    report = Report(
        command=shlex.join(["python", "-m", "bench", *argv]),
        machine=describe_machine(args.pg_admin_url, args.redis_url),
        load_generator=generator if "ingest" in args.only else "n/a (no ingest benchmark)",
    )
    if "ingest" in args.only and client == "python" and args.client == "auto":
        report.notes.append(WRK_MISSING)
    succeeded = Runner(args, report, client).run()
    text = report.markdown()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"bench: written to {args.out}", file=sys.stderr)
    return 0 if succeeded else 1


if __name__ == "__main__":
    raise SystemExit(main())
