"""The markdown report: one table (the machine, then each benchmark's rows), then notes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime

from bench.backfill import TARGET_SECONDS, TARGET_USERS, BackfillResult
from bench.bare_loop import BareLoopResult, BarePass
from bench.common import Machine, code_revision
from bench.delivery import BacklogResult, DeliveryOptions, PhaseResult
from bench.ingest import IngestOptions, IngestResult
from bench.isolation import (
    CAPS,
    LEASE_SECONDS,
    SETTLE_SECONDS,
    WEBHOOK_TIMEOUT_SECONDS,
    WORKER_CONCURRENCY,
    IsolationResult,
    IsolationSide,
)
from bench.webhook import WebhookResult, WebhookSide
from workers.destinations.webhook.adapter import PARALLEL_REQUESTS

HEADER = ("benchmark", "measure", "result", "target", "met")


@dataclass(frozen=True)
class Row:
    benchmark: str
    measure: str
    result: str
    target: str = ""
    met: str = ""


@dataclass
class Report:
    """Rows and notes collected from whatever benchmarks ran."""

    command: str
    machine: Machine
    load_generator: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    revision: str = field(default_factory=code_revision)

    def markdown(self) -> str:
        lines = [
            f"# idsync benchmarks, {self.started:%Y-%m-%d %H:%M} UTC",
            "",
            f"`{self.command}`",
            "",
            "| " + " | ".join(HEADER) + " |",
            "|" + "---|" * len(HEADER),
        ]
        for row in self._machine_rows() + self.rows:
            cells = (row.benchmark, row.measure, row.result, row.target, row.met)
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        if self.notes:
            lines += ["", *(f"- {note}" for note in self.notes)]
        return "\n".join(lines) + "\n"

    def _machine_rows(self) -> list[Row]:
        m = self.machine
        return [
            Row("machine", "CPU", m.cpu),
            Row("machine", "cores", str(m.cores)),
            Row("machine", "Python", m.python),
            Row("machine", "PostgreSQL", m.postgres),
            Row("machine", "Redis", m.redis),
            Row("machine", "load generator", self.load_generator),
            Row("code", "idsync revision", self.revision),
        ]


def number(value: float, digits: int = 0) -> str:
    """``1234.5`` -> ``1,234`` (or with ``digits`` decimals); NaN as ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def verdict(value: float, limit: float, *, at_least: bool) -> str:
    """``yes`` or ``no`` with how far from the target, relative to the target."""
    if math.isnan(value):
        return "n/a"
    met = value >= limit if at_least else value <= limit
    if met:
        return "yes"
    return f"no ({(value - limit) / limit:+.0%} vs target)"


def verdict_below(value: float, limit: float) -> str:
    """For strict upper bounds (``< limit``)."""
    if math.isnan(value):
        return "n/a"
    return "yes" if value < limit else f"no ({(value - limit) / limit:+.0%} vs target)"


# Ingest


SERVER_LABELS = {
    "idsync": "idsync `POST /events/auth0`",
    "bare": "bare Flask: parse JSON, answer 202",
    "floor": "floor: parse, INSERT one row, COMMIT",
}


def _client(options: IngestOptions) -> str:
    if options.client == "wrk":
        return f"wrk -t{options.threads} -c{options.connections}"
    return f"Python client with {options.connections} connections (a process each)"


def ingest_rows(result: IngestResult, cores: int) -> list[Row]:
    rows = []
    for name, label in SERVER_LABELS.items():
        load = result.results[name]
        rows.append(
            Row(
                "ingest",
                label,
                f"{number(load.rate)} req/s; p50 {number(load.percentile_ms(50), 1)} ms; "
                f"p99 {number(load.percentile_ms(99), 1)} ms ({number(load.ok)} accepted)",
            )
        )
    to_floor, to_bare, p99 = (
        result.ratio("idsync", "floor"),
        result.ratio("idsync", "bare"),
        result.p99_ratio(),
    )
    rows += [
        Row(
            "ingest",
            "idsync / floor, throughput",
            f"{to_floor:.2f}x",
            ">= 0.8x",
            verdict(to_floor, 0.8, at_least=True),
        ),
        Row(
            "ingest",
            "idsync p99 / floor p99",
            f"{result.p99_ratio('floor'):.2f}x",
            "<= 1.5x",
            verdict(result.p99_ratio("floor"), 1.5, at_least=False),
        ),
        Row(
            "ingest",
            "idsync / bare, throughput",
            f"{to_bare:.2f}x",
            ">= 0.5x",
            verdict(to_bare, 0.5, at_least=True),
        ),
        Row(
            "ingest",
            "idsync p99 / bare p99",
            f"{p99:.2f}x",
            "<= 3x",
            verdict(p99, 3.0, at_least=False),
        ),
        Row(
            "ingest",
            "CPU ms per accepted request: server + PostgreSQL backend (+ Redis)",
            "; ".join(
                f"{name} {number(result.cpu_ms(name, 'app'), 2)} + "
                f"{number(result.cpu_ms(name, 'postgres'), 2)}"
                + (f" (+ {number(result.cpu_ms(name, 'redis'), 2)})" if name == "idsync" else "")
                for name in SERVER_LABELS
            ),
        ),
    ]
    options = result.options
    busy = sum(use.busy for use in result.cpu.values())
    other = sum(use.other for use in result.cpu.values())
    seconds = sum(load.seconds for load in result.results.values())
    rows.append(
        Row(
            "ingest",
            "setup",
            f"gunicorn --workers {options.workers} (sync), {_client(options)}, "
            f"{options.rounds} rounds x {number(options.round_seconds)} s per server "
            f"(A B C ...) after {number(options.warmup_seconds)} s warm-up; machine busy "
            f"{busy / seconds:.2f} of {cores} cores, of which "
            f"{other / seconds:.2f} outside the benchmark",
        )
    )
    return rows


# Delivery and the naive comparison


def _phase_label(phase: PhaseResult) -> str:
    return {"created": "new users (`user.created`)", "updated": "linked users (`user.updated`)"}[
        phase.phase.kind
    ]


def _requests_per_batch(phase: PhaseResult) -> str:
    if not phase.synced:
        return "n/a"
    return f"{phase.requests / phase.synced * 100:.2f} requests per 100 contacts synced"


def _requests(phase: PhaseResult) -> str:
    calls = ", ".join(f"{route} {count}" for route, count in phase.by_route.items())
    return (
        f"{_requests_per_batch(phase)} ({calls}); request budget used "
        f"{phase.budget_used:.2f} of {phase.allowed:g}/s"
    )


def _pacing(phase: PhaseResult, options: DeliveryOptions) -> str:
    pacing = phase.pacing
    if not pacing.gaps:
        return "n/a"
    ideal = options.window / options.rate_limit
    return (
        f"{pacing.mean_gap:.3f} s between requests on average (the limit allows "
        f"{ideal:.3f} s); {pacing.after_full} of {pacing.gaps} gaps follow an answer with "
        f"`X-HubSpot-RateLimit-Remaining: 0` and average {pacing.mean_after_full:.3f} s"
    )


def _cpu_per_thousand(phase: PhaseResult, cores: int) -> str:
    if not phase.finished or phase.elapsed <= 0:
        return "n/a"
    parts = [
        f"{name} {number(seconds * 1000 / phase.finished, 1)}"
        for name, seconds in sorted(phase.cpu.items(), key=lambda item: -item[1])
        if seconds >= 0.05
    ]
    return (
        "; ".join(parts) + " CPU s per 1,000 deliveries; machine busy "
        f"{phase.cores_busy:.2f} of {cores} cores, of which "
        f"{phase.cores_other:.2f} outside the benchmark"
    )


DELIVERY_TARGET = 0.95  # of the ceiling the rate limit allows, at every rate benchmarked


def delivery_rows(result: BacklogResult, cores: int) -> list[Row]:
    options = result.options
    at = f"at HUBSPOT_RATE_LIMIT={options.rate_limit}/{options.window:g}s"
    rows = []
    for phase in result.phases:
        share = phase.rate / options.ceiling
        steady = f"; steady 10%-90%: {number(phase.steady_rate)}/s" if phase.steady_rate else ""
        done = "" if phase.complete else " (timed out: partial)"
        rows += [
            Row(
                "delivery",
                f"contacts synced per second {at}, {_phase_label(phase)}",
                f"{number(phase.rate)}/s = {share:.2f} x ceiling {number(options.ceiling)}/s "
                f"({number(phase.synced)} of {number(phase.phase.events)} in "
                f"{number(phase.elapsed, 1)} s{steady}){done}",
                f">= {DELIVERY_TARGET:g}x ceiling",
                verdict(share, DELIVERY_TARGET, at_least=True),
            ),
            Row(
                "delivery",
                f"requests answered 429 {at}, {_phase_label(phase)}",
                f"{phase.share_429:.2%} ({phase.rate_limited} of {phase.requests}); "
                + _requests(phase),
                "< 1%",
                verdict_below(phase.share_429, 0.01),
            ),
            Row("delivery", f"request pacing {at}, {_phase_label(phase)}", _pacing(phase, options)),
            Row("delivery", f"CPU {at}, {_phase_label(phase)}", _cpu_per_thousand(phase, cores)),
        ]
    peak = max(result.memory_kb.values(), default=0) / 1024
    each = ", ".join(f"{label} {kb / 1024:.0f}" for label, kb in result.memory_kb.items())
    rows += [
        Row(
            "delivery",
            f"peak memory per celery worker process (VmHWM) {at}",
            f"max {peak:.0f} MB ({each} MB)",
            "< 250 MB",
            verdict_below(peak, 250),
        ),
        Row(
            "delivery",
            f"setup {at}",
            f"fake HubSpot and HUBSPOT_RATE_LIMIT {options.rate_limit}/{options.window:g}s; "
            f"one `celery -A workers worker --concurrency {options.concurrency}` and beat "
            f"(SWEEP_SECONDS={options.sweep_seconds:g}); HUBSPOT_BATCH_SIZE="
            f"{result.batch_size}, HUBSPOT_CONCURRENCY={options.deliver_tasks}; "
            "backlog written to the outbox before the wake-up",
        ),
    ]
    return rows


def capacity_row(result: BacklogResult, limited: DeliveryOptions) -> Row:
    """The workers' own pace with no rate limit, next to the ceiling of the limited runs."""
    rates = "; ".join(
        f"{_phase_label(phase)} {number(phase.rate)}/s ({number(phase.synced)} in "
        f"{number(phase.elapsed, 1)} s; machine busy {phase.cores_busy:.2f} cores, "
        f"{phase.cores_other:.2f} of them outside the benchmark)"
        for phase in result.phases
    )
    return Row(
        "delivery",
        f"capacity without a rate limit (same workers), vs the ceiling "
        f"{number(limited.ceiling)}/s below",
        rates,
    )


GOAL_NEW_USERS = 1900  # new users per second on a 2-core machine: the goal


def _cpu_ms(cpu: dict[str, float], contacts: int) -> str:
    parts = [
        f"{name} {number(seconds * 1000 / contacts, 2)}"
        for name, seconds in sorted(cpu.items(), key=lambda item: -item[1])
        if seconds > 0
    ]
    return ", ".join(parts) or "n/a"


def _bare_pass(done: BarePass) -> str:
    return f"{number(done.rate)}/s ({number(done.synced)} in {number(done.elapsed, 1)} s)"


def bare_loop_rows(capacity: BacklogResult, bare: BareLoopResult) -> list[Row]:
    """The bare loop's pace, idsync's capacity over it, and both sides' CPU per contact."""
    rows = [
        Row(
            "delivery",
            "bare loop, contacts per second (one process: claim 100, one batch call, one UPDATE)",
            "; ".join(
                f"{_phase_label(phase)} {_bare_pass(done)}"
                for phase in capacity.phases
                if (done := bare.of(phase.phase.kind)) is not None
            ),
        )
    ]
    for phase in capacity.phases:
        done = bare.of(phase.phase.kind)
        if done is None:
            continue
        ratio = phase.rate / done.rate if done.rate else float("nan")
        goal = (
            f"; the goal behind it: {number(GOAL_NEW_USERS)} new users/s"
            if phase.phase.kind == "created"
            else ""
        )
        rows += [
            Row(
                "delivery",
                f"capacity / bare loop, {_phase_label(phase)}",
                f"{number(ratio, 2)}x (idsync {number(phase.rate)}/s vs bare loop "
                f"{number(done.rate)}/s{goal})",
                ">= 0.8x",
                verdict(ratio, 0.8, at_least=True),
            ),
            Row(
                "delivery",
                f"CPU ms per contact without a rate limit, {_phase_label(phase)}",
                f"idsync: {_cpu_ms(phase.cpu, max(phase.synced, 1))}; bare loop: "
                f"{_cpu_ms(done.cpu, max(done.synced, 1))}",
            ),
        ]
    rows.append(
        Row(
            "delivery",
            "bare loop setup",
            "in the benchmark's own process, psycopg 3 (autocommit) and `requests.Session`, "
            "no SQLAlchemy or Celery; idsync's `deliveries` and `events` tables in a database "
            "of its own, copied from the same migrated schema and filled by the same "
            "`insert_backlog` with the same users, then analyzed (idsync's are left to "
            "autovacuum); claim: `UPDATE deliveries ... FROM events "
            "WHERE id IN (SELECT id ... LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING` the "
            "profile (and, for updates, the contact id the first pass wrote); one "
            "`batch/upsert` by email (new users) or `batch/update` by id (linked users) to "
            "the same fake HubSpot process, before idsync's workers start (the fake is reset "
            "after it); one `UPDATE` marking the batch succeeded",
        )
    )
    return rows


def naive_rows(naive: BacklogResult, batched: PhaseResult, batched_source: str) -> list[Row]:
    phase = naive.phases[0]
    ratio = batched.rate / phase.rate if phase.rate else float("nan")
    return [
        Row(
            "naive",
            "one call per event (`HUBSPOT_BATCH_SIZE=1`), new users",
            f"{number(phase.rate, 2)}/s ({number(phase.synced)} of {number(phase.phase.events)} "
            f"synced in {number(phase.elapsed, 1)} s; {phase.share_429:.1%} 429s; "
            f"{_requests_per_batch(phase)})",
        ),
        Row(
            "naive",
            "batched / one call per event, contacts per second",
            f"{number(ratio, 1)}x ({number(batched.rate)}/s {batched_source} vs "
            f"{number(phase.rate, 2)}/s)",
            ">= 20x",
            verdict(ratio, 20, at_least=True),
        ),
    ]


# Isolation: HubSpot beside a webhook that never answers


def _cpu_line(cpu: dict[str, float], count: int, unit: str) -> str:
    parts = [
        f"{name} {number(seconds * 1000 / count, 2)}"
        for name, seconds in sorted(cpu.items(), key=lambda item: -item[1])
        if seconds >= 0.01
    ]
    return "; ".join(parts) + f" CPU s per 1,000 {unit}"


def _side(side: IsolationSide, ceiling: float, users: int) -> str:
    steady = f"; steady 10%-90%: {number(side.steady_rate)}/s" if side.steady_rate else ""
    done = "" if side.complete else " (timed out: partial)"
    return (
        f"{number(side.rate)}/s = {side.rate / ceiling:.2f} x ceiling {number(ceiling)}/s "
        f"({number(side.synced)} of {number(users)} in {number(side.elapsed, 1)} s{steady}; "
        f"{side.rate_limited} of {side.requests} HubSpot requests answered 429; machine busy "
        f"{side.cores_busy:.2f} cores, {side.cores_other:.2f} of them outside the "
        f"benchmark){done}"
    )


def isolation_rows(result: IsolationResult) -> list[Row]:
    options = result.options
    alone, beside = result.sides["alone"], result.sides["beside"]
    ratio = result.ratio
    posted = result.posted
    return [
        Row(
            "isolation",
            "contacts synced per second, HubSpot alone, new users",
            _side(alone, options.ceiling, options.users),
        ),
        Row(
            "isolation",
            "contacts synced per second, HubSpot beside a webhook that never answers",
            _side(beside, options.ceiling, options.users)
            + f"; the webhook meanwhile: {number(beside.held)} requests held unanswered by "
            f"the receiver, {number(beside.webhook_attempts)} attempts recorded, "
            f"{number(beside.webhook_delivered)} of {number(options.users)} delivered",
        ),
        Row(
            "isolation",
            "beside / alone, HubSpot contacts per second",
            f"{number(ratio, 2)}x ({number(beside.rate)}/s vs {number(alone.rate)}/s)",
            ">= 0.9x",
            verdict(ratio, 0.9, at_least=True),
        ),
        Row(
            "isolation",
            "setup",
            f"{number(options.users)} new users posted through gunicorn ingest "
            f"(`--workers {options.ingest_workers}`, {options.connections} connections, "
            f"{number(posted.rate)} req/s) with DESTINATIONS=hubspot,licenses, then copied "
            f"into one database per side; per side a fake HubSpot and HUBSPOT_RATE_LIMIT="
            f"{options.rate_limit_text}, one `celery -A workers worker --concurrency "
            f"{WORKER_CONCURRENCY}` (caps HUBSPOT_CONCURRENCY={CAPS['hubspot']} + "
            f"LICENSES_CONCURRENCY={CAPS['licenses']}) and beat (SWEEP_SECONDS="
            f"{options.sweep_seconds:g}); LICENSES_KIND=webhook, LICENSES_TIMEOUT_SECONDS="
            f"{WEBHOOK_TIMEOUT_SECONDS:g}, LEASE_SECONDS={LEASE_SECONDS}, SETTLE_SECONDS="
            f"{SETTLE_SECONDS} on both sides; only DESTINATIONS differs (alone: hubspot)",
        ),
    ]


# Webhook throughput


def _drained(side: WebhookSide, users: int, unit: str) -> str:
    calls = (
        f"{number(side.calls)} calls of {number(side.call_ms, 1)} ms on average; "
        if side.call_ms is not None
        else ""
    )
    return (
        f"{number(side.rate)}/s ({number(side.delivered)} of {number(users)} in "
        f"{number(side.elapsed, 1)} s, {side.batches} batches; {calls}"
        f"{_cpu_line(side.cpu, max(side.delivered, 1), unit)}; machine busy "
        f"{side.cores_busy:.2f} cores, {side.cores_other:.2f} of them outside the benchmark)"
    )


def webhook_rows(result: WebhookResult) -> list[Row]:
    options = result.options
    memory, webhook = result.sides["memory"], result.sides["webhook"]
    ratio = result.ratio
    return [
        Row(
            "webhook",
            "signed messages delivered per second to a local receiver that verifies each",
            _drained(webhook, options.users, "messages"),
        ),
        Row(
            "webhook",
            "the engine alone: in-memory destination, same users and settings",
            _drained(memory, options.users, "deliveries"),
        ),
        Row(
            "webhook",
            "webhook / in-memory, deliveries per second",
            f"{number(ratio, 2)}x ({number(webhook.rate)}/s vs {number(memory.rate)}/s)",
            ">= 0.5x",
            verdict(ratio, 0.5, at_least=True),
        ),
        Row(
            "webhook",
            "setup",
            f"{number(options.users)} new users, one delivery each, copied into one database "
            f"per side; `run_batch` in a loop in one process, LICENSES_BATCH_SIZE="
            f"{options.batch_size}; the webhook sends {PARALLEL_REQUESTS} requests at once "
            f"over keep-alive connections under LICENSES_RATE_LIMIT={options.rate_limit}/1s "
            f"to `python -m idsync.fakes.webhook_receiver` (its own process)",
        ),
    ]


# Backfill: idsync backfill against the fake Auth0


def backfill_rows(result: BackfillResult) -> list[Row]:
    """Users stored per second by the whole command, its memory, and the second run."""
    first, second = result.first, result.second
    target_rate = TARGET_USERS / TARGET_SECONDS
    return [
        Row(
            "backfill",
            "users stored per second by `idsync backfill` (export job, download and store)",
            f"{number(result.rate)}/s: {number(first.report['stored'])} users in "
            f"{number(first.wall, 1)} s, of which storing {number(first.report['seconds'], 1)} s",
            f">= {number(target_rate)}/s ({number(TARGET_USERS)} users in {TARGET_SECONDS:g} s)",
            verdict(result.rate, target_rate, at_least=True),
        ),
        Row(
            "backfill",
            "peak resident memory of the backfill process",
            f"{number(first.peak_rss_kb / 1024, 1)} MB for {number(result.options.users)} users "
            f"(chunks of 2,000; the file is streamed)",
        ),
        Row(
            "backfill",
            "the same backfill again",
            f"{number(second.report['stored'])} stored, {number(second.report['existing'])} "
            f"unchanged, in {number(second.wall, 1)} s",
        ),
    ]
