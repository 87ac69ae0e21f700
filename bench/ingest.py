"""Ingest: ``POST /events/auth0`` under gunicorn next to a bare Flask endpoint and a durable floor.

The three servers run at once under the same gunicorn command (``ingest_command``
with only the app swapped), each idle while another is loaded; rounds alternate
A B C A B C so that drift of the machine touches all three alike. During each
round the CPU time of the server's processes, of the PostgreSQL backends of its
database and of Redis is read from /proc, and so is what the rest of the machine
used meanwhile (other load skews every number).
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from bench.baselines import FLOOR_SCHEMA, FLOOR_URL_VARIABLE
from bench.common import (
    MachineCpu,
    cpu_seconds,
    fixture,
    own_database,
    own_redis_prefix,
    process_tree,
    stack_pid,
)
from bench.load import LoadResult, LoadSpec, run_load
from idsync.stack import Stack, free_port, ingest_command

INGEST_TOKEN = "bench-ingest-token"  # noqa: S105 - a throwaway token for loopback traffic
IDSYNC_APP = "ingest:create_app()"
SERVERS = {
    "idsync": IDSYNC_APP,
    "bare": "bench.baselines:bare_app()",
    "floor": "bench.baselines:floor_app()",
}
UNIQUE = "@@UNIQUE@@"


@dataclass
class IngestOptions:
    workers: int
    connections: int
    threads: int
    rounds: int
    round_seconds: float
    warmup_seconds: float
    client: str  # "wrk" or "python"
    wrk: str | None = None  # the wrk binary, when not the one on PATH


@dataclass
class CpuUse:
    """CPU seconds spent while one server was loaded."""

    app: float = 0.0  # the gunicorn arbiter and workers
    postgres: float = 0.0  # backends connected to the server's database
    redis: float = 0.0  # the Redis server (idsync's wake-up tokens and publishes)
    client: float = 0.0  # the load generator
    other: float = 0.0  # everything else on the machine meanwhile
    busy: float = 0.0  # all of the above: busy CPU seconds of the machine

    def add(self, other: CpuUse) -> None:
        for name in ("app", "postgres", "redis", "client", "other", "busy"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class IngestResult:
    options: IngestOptions
    command: list[str]
    results: dict[str, LoadResult]
    cpu: dict[str, CpuUse]
    stored: dict[str, int]  # rows in each durable server's database afterwards
    accepted: dict[str, int]  # 2xx answers of each server, warm-up included
    notes: list[str] = field(default_factory=list)

    def ratio(self, numerator: str, denominator: str) -> float:
        below = self.results[denominator].rate
        return self.results[numerator].rate / below if below else float("nan")

    def p99_ratio(self, baseline: str = "bare") -> float:
        """idsync's p99 latency over ``baseline``'s."""
        return self.results["idsync"].percentile_ms(99) / self.results[baseline].percentile_ms(99)

    def cpu_ms(self, server: str, part: str) -> float:
        """CPU milliseconds of ``part`` per accepted request of ``server``."""
        ok = self.results[server].ok
        return 1000 * getattr(self.cpu[server], part) / ok if ok else float("nan")


def body_parts() -> list[str]:
    """A real ``user.created`` delivery, split where its unique value goes (id, user, email)."""
    document = fixture("user_created.json")
    document["id"] = f"evt_{UNIQUE}"
    for user in (document["data"]["object"], document["data"]["previous_object"]):
        user["user_id"] = f"auth0|{UNIQUE}"
        user["email"] = f"u{UNIQUE}@example.com"
    return json.dumps(document).split(UNIQUE)


def server_command(app: str, port: int, workers: int) -> list[str]:
    """``ingest_command`` with only its app swapped, so every server runs alike."""
    command = ingest_command(port, workers=workers)
    if IDSYNC_APP not in command:
        raise RuntimeError(f"ingest_command() no longer names {IDSYNC_APP}: {command}")
    return [app if part == IDSYNC_APP else part for part in command]


def _count(url: str, table: str) -> int:
    with psycopg.connect(url) as connection:
        row = connection.execute(f"SELECT count(*) FROM {table}").fetchone()  # noqa: S608
    return int(row[0]) if row else 0


class _CpuMeter:
    """Reads the CPU time of one server's processes, its database's backends and Redis."""

    def __init__(self, admin_url: str, redis_url: str) -> None:
        self.admin_url = admin_url
        client = redis.Redis.from_url(redis_url)
        try:
            self.redis_pid = int(client.info("server")["process_id"])
        finally:
            client.close()

    def _backends(self, database: str) -> list[int]:
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            rows = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,)
            ).fetchall()
        return [int(row[0]) for row in rows]

    def snapshot(self, app_pid: int, database: str) -> dict[str, dict[int, float]]:
        return {
            "app": {pid: cpu_seconds(pid) for pid in process_tree(app_pid)},
            "postgres": {pid: cpu_seconds(pid) for pid in self._backends(database)},
            "redis": {self.redis_pid: cpu_seconds(self.redis_pid)},
        }

    @staticmethod
    def spent(before: dict[int, float], after: dict[int, float]) -> float:
        """CPU used between two snapshots; processes born meanwhile count from zero."""
        return sum(max(0.0, seconds - before.get(pid, 0.0)) for pid, seconds in after.items())


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_ingest(
    options: IngestOptions,
    *,
    admin_url: str,
    redis_url: str,
    run_id: str,
    workdir: Path,
    schema: str,
) -> IngestResult:
    """Measure the three servers in alternating rounds; everything is torn down afterwards.

    idsync's database starts as a copy of ``schema``, a migrated empty database.
    """
    prefix = f"idsync-bench-{run_id}-ingest"
    names = {"idsync": f"idsync_bench_{run_id}_ingest", "floor": f"idsync_bench_{run_id}_floor"}
    with (
        own_database(admin_url, names["idsync"], template=schema) as idsync_url,
        own_database(admin_url, names["floor"]) as floor_url,
        own_redis_prefix(redis_url, prefix),
    ):
        env = {
            "DATABASE_URL": idsync_url,
            "CELERY_BROKER_URL": redis_url,
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": prefix,
            "INGEST_TOKEN": INGEST_TOKEN,
            FLOOR_URL_VARIABLE: floor_url,
        }
        stack = Stack(env=env, workdir=workdir)
        with psycopg.connect(floor_url, autocommit=True) as connection:
            connection.execute(FLOOR_SCHEMA)
        ports = {name: free_port() for name in SERVERS}
        try:
            for name, app in SERVERS.items():
                stack.start(f"gunicorn-{name}", server_command(app, ports[name], options.workers))
            for name in SERVERS:
                stack.wait_for_http(f"http://127.0.0.1:{ports[name]}/healthz", timeout=60)
            rounds = _Rounds(
                options,
                ports,
                workdir,
                stack,
                _CpuMeter(admin_url, redis_url),
                databases={**names, "bare": names["floor"]},
            )
            rounds.run()
            stored = {
                "idsync": _count(idsync_url, "events"),
                "floor": _count(floor_url, "received_events"),
            }
        finally:
            stack.stop_all()
    result = IngestResult(
        options=options,
        command=server_command("APP", 0, options.workers),
        results=rounds.results,
        cpu=rounds.cpu,
        stored=stored,
        accepted=rounds.accepted,
    )
    _check(result, rounds.runs)
    return result


def _check(result: IngestResult, runs: int) -> None:
    """Note anything that makes the numbers suspect: errors, or 2xx without a stored row."""
    for name, load in result.results.items():
        if load.responses != load.ok or load.socket_errors:
            result.notes.append(
                f"ingest {name}: {load.responses - load.ok} non-2xx answers and "
                f"{load.socket_errors} socket errors in the measured rounds"
            )
    # Requests in flight when a round ends are stored but never counted by the client.
    in_flight = result.options.connections * runs
    for name, rows in result.stored.items():
        accepted = result.accepted[name]
        if not accepted <= rows <= accepted + in_flight:
            result.notes.append(f"ingest {name}: {accepted} answers 2xx but {rows} rows stored")


class _Rounds:
    """Warm-up, then A B C A B C ... rounds, with the CPU each round cost."""

    def __init__(
        self,
        options: IngestOptions,
        ports: dict[str, int],
        workdir: Path,
        stack: Stack,
        meter: _CpuMeter,
        databases: dict[str, str],
    ) -> None:
        self.options, self.ports, self.workdir, self.stack = options, ports, workdir, stack
        self.meter, self.databases = meter, databases
        self.parts = body_parts()
        self.headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {INGEST_TOKEN}",
        }
        self.results = {name: LoadResult() for name in SERVERS}
        self.cpu = {name: CpuUse() for name in SERVERS}
        self.accepted = dict.fromkeys(SERVERS, 0)
        self.runs = 0

    def _spec(self, name: str, tag: str, seconds: float) -> LoadSpec:
        return LoadSpec(
            host="127.0.0.1",
            port=self.ports[name],
            path="/events/auth0",
            headers=self.headers,
            body_parts=self.parts,
            connections=self.options.connections,
            threads=self.options.threads,
            seconds=seconds,
            tag=tag,
        )

    def _load(self, name: str, tag: str, seconds: float) -> tuple[LoadResult, CpuUse]:
        self.stack.check_alive()
        app_pid = stack_pid(self.stack, f"gunicorn-{name}")
        database = self.databases[name]
        before = self.meter.snapshot(app_pid, database)
        client_before = _children_cpu()
        machine = MachineCpu()
        result = run_load(
            self._spec(name, tag, seconds), self.workdir, self.options.client, self.options.wrk
        )
        busy_seconds = machine.busy_seconds()
        after = self.meter.snapshot(app_pid, database)
        use = CpuUse(**{part: _CpuMeter.spent(before[part], after[part]) for part in before})
        use.client = _children_cpu() - client_before
        use.busy = busy_seconds
        use.other = max(0.0, use.busy - use.app - use.postgres - use.redis - use.client)
        self.accepted[name] += result.ok
        self.runs += 1
        return result, use

    def run(self) -> None:
        if self.options.warmup_seconds > 0:
            for name in SERVERS:
                self._load(name, f"warm-{name}", self.options.warmup_seconds)
        for number in range(self.options.rounds):
            for name in SERVERS:
                result, use = self._load(name, f"r{number}-{name}", self.options.round_seconds)
                self.results[name].add(result)
                self.cpu[name].add(use)
