"""``python -m bench --profile ingest|delivery``: where idsync's CPU time goes.

- ingest: the idsync gunicorn server (the benchmark's command plus the hooks of
  ``bench.gunicorn_profile``) under the benchmark's load; every worker's profile is merged.
- delivery: ``workers.delivery.run_batch`` (all the Celery task does, in a loop) called
  in this process on a backlog in a database of its own, against a fake HubSpot process
  whose limit is high enough never to make it wait.
- limiter: how much of the request budget the HubSpot adapter's limiter lets through
  when requests are spread out, with and without its block-on-``Remaining: 0`` rule.

The default profiler is ``bench.sampler`` on CPU time (``--profiler cpu``: low overhead,
fair shares); ``--profiler wall`` samples wall time instead, which also shows waiting on
PostgreSQL and HTTP; ``--profiler cprofile`` (ingest only) uses cProfile on CPU time
(exact call counts, but its overhead inflates call-heavy code). The delivery profile
also samples ``pg_stat_activity``, to show which statements keep PostgreSQL busy.
"""

from __future__ import annotations

import io
import pstats
import sysconfig
from pathlib import Path
from typing import Any

from bench.common import ROOT, cpu_seconds, own_database, own_redis_prefix, stack_pid
from bench.ingest import IDSYNC_APP, INGEST_TOKEN, IngestOptions, body_parts, server_command
from bench.load import LoadSpec, run_load
from bench.sampler import Samples
from idsync.stack import Stack, fake_hubspot_command, free_port, migrate_command

PROJECT_DIRS = tuple(f"{ROOT / name}/" for name in ("ingest", "models", "workers", "idsync"))
STDLIB = sysconfig.get_paths()["stdlib"]
SKIP_REQUESTS = 200  # per gunicorn worker, before profiling starts

Key = tuple[str, str, str]  # (label, file suffix, function)

INGEST_KEYS: list[Key] = [
    ("gunicorn sync worker: whole request", "gunicorn/workers/sync.py", "handle_request"),
    ("  gunicorn access log line (gunicorn.conf.py JsonLogger)", "gunicorn.conf.py", "access"),
    ("  idsync/logs.py: JSON log formatting (access log)", "structlog/stdlib.py", "format"),
    ("  Flask wsgi_app (routing, context, response)", "flask/app.py", "wsgi_app"),
    ("    ingest/webhook.py:receive_auth0_event", "ingest/webhook.py", "receive_auth0_event"),
    ("      json.loads of the body", "json/__init__.py", "loads"),
    ("      ingest/store.py:store_document", "ingest/store.py", "store_document"),
    ("        ingest/validation.py:to_new_event", "ingest/validation.py", "to_new_event"),
    ("        ingest/store.py:document_sha256", "ingest/store.py", "document_sha256"),
    ("        models/outbox.py:commit_event (one INSERT)", "models/outbox.py", "commit_event"),
    ("          SQLAlchemy pool checkout", "sqlalchemy/engine/base.py", "raw_connection"),
    ("          the statement on the DBAPI cursor", "models/outbox.py", "_execute_on_cursor"),
    ("        idsync/wakeups.py:Waker.wake", "idsync/wakeups.py", "wake"),
    ("          Redis SET NX", "redis/commands/core.py", "set"),
    ("          Celery send_task", "celery/app/base.py", "send_task"),
    ("      ingest/webhook.py:_answer (jsonify, metrics)", "ingest/webhook.py", "_answer"),
    ("psycopg: every statement (in any of the above)", "psycopg/cursor.py", "execute"),
]

DELIVERY_KEYS: list[Key] = [
    ("workers/delivery.py:run_batch (one batch)", "workers/delivery.py", "run_batch"),
    ("  models/outbox.py:claim_due", "models/outbox.py", "claim_due"),
    ("  HubSpotDestination.deliver", "workers/destinations/hubspot/adapter.py", "deliver"),
    ("    HTTP to the fake (requests)", "requests/sessions.py", "request"),
    ("  models/outbox.py:live_contacts_of_others", "models/outbox.py", "live_contacts_of_others"),
    ("  recording outcomes: _Recorder.record_user", "workers/delivery.py", "record_user"),
    ("  recording outcomes: _Recorder.flush", "workers/delivery.py", "flush"),
    ("  SQLAlchemy Session.commit", "sqlalchemy/orm/session.py", "commit"),
    ("psycopg: every statement", "psycopg/cursor.py", "execute"),
]


def _package(path: str) -> str:
    """Who owns a file: an idsync folder, a site-package, or the standard library."""
    if path.startswith(PROJECT_DIRS):
        return "idsync: " + Path(path).relative_to(ROOT).parts[0] + "/"
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if path.startswith(STDLIB):
        return "stdlib: " + Path(path).relative_to(STDLIB).parts[0].removesuffix(".py")
    return path


def sample_report(samples: Samples, title: str, units: int, per: str, keys: list[Key]) -> str:
    """Chosen functions' inclusive CPU share, then CPU by package and idsync's own functions."""
    total = max(samples.samples, 1)
    cpu = samples.cpu_seconds
    clock = "CPU" if samples.clock == "cpu" else "wall"
    each = 1000 * cpu / max(units, 1)
    unit = per.removesuffix("s")
    lines = [
        f"## {title}",
        "",
        f"{samples.samples} samples of {cpu:.1f} {clock} s over {units} {per} = {each:.2f} "
        f"{clock} ms per {unit} (sampling adds a little)",
        "",
        f"| function (inclusive: on the stack) | share of {clock} time | {clock} ms per {unit} |",
        "|---|---|---|",
    ]
    for label, suffix, function in keys:
        count = samples.inclusive_of(suffix, function)
        lines.append(f"| {label} | {count / total:.0%} | {each * count / total:.2f} |")
    by_package: dict[str, int] = {}
    for (path, _name), count in samples.exclusive.items():
        by_package[_package(path)] = by_package.get(_package(path), 0) + count
    lines += ["", f"| code running (exclusive) | share of {clock} time |", "|---|---|"]
    for package, count in sorted(by_package.items(), key=lambda item: -item[1])[:14]:
        lines.append(f"| {package} | {count / total:.0%} |")
    own = sorted(
        (
            (count, f"{Path(path).relative_to(ROOT)}:{name}")
            for (path, name), count in samples.inclusive.items()
            if path.startswith(PROJECT_DIRS)
        ),
        reverse=True,
    )[:20]
    lines += ["", f"| idsync function (inclusive) | share of {clock} time |", "|---|---|"]
    lines += [f"| {label} | {count / total:.0%} |" for count, label in own]
    return "\n".join(lines) + "\n"


def cprofile_report(paths: list[Path], title: str, limit: int = 30) -> str:
    stream = io.StringIO()
    stats = pstats.Stats(*(str(p) for p in paths), stream=stream)
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)
    return f"## {title}\n\n{stream.getvalue()}"


def _with_profile_config(command: list[str], env: dict[str, str]) -> list[str]:
    """The command with ``bench.gunicorn_profile`` as its config, which loads the original."""
    profiled = list(command)
    for flag in ("--config", "-c"):
        if flag in profiled:
            index = profiled.index(flag) + 1
            env["BENCH_BASE_GUNICORN_CONFIG"] = profiled[index]
            profiled[index] = "python:bench.gunicorn_profile"
            return profiled
    return [*profiled, "--config", "python:bench.gunicorn_profile"]


def profile_ingest(
    options: IngestOptions,
    *,
    admin_url: str,
    redis_url: str,
    run_id: str,
    workdir: Path,
    seconds: float,
    profiler: str,
) -> str:
    """Profile the idsync ingest server under the benchmark's load."""
    profile_dir = workdir / "profiles"
    profile_dir.mkdir(exist_ok=True)
    prefix = f"idsync-bench-{run_id}-profile"
    with (
        own_database(admin_url, f"idsync_bench_{run_id}_profile") as url,
        own_redis_prefix(redis_url, prefix),
    ):
        env = {
            "DATABASE_URL": url,
            "CELERY_BROKER_URL": redis_url,
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": prefix,
            "INGEST_TOKEN": INGEST_TOKEN,
            "BENCH_PROFILE_DIR": str(profile_dir),
            "BENCH_PROFILER": "cprofile" if profiler == "cprofile" else "sample",
            "BENCH_PROFILE_CLOCK": "wall" if profiler == "wall" else "cpu",
            "BENCH_PROFILE_SKIP": str(SKIP_REQUESTS),
        }
        stack = Stack(env=env, workdir=workdir)
        stack.run(migrate_command())
        port = free_port()
        command = _with_profile_config(server_command(IDSYNC_APP, port, options.workers), env)
        stack.start("gunicorn-profile", command)
        try:
            stack.wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
            spec = LoadSpec(
                host="127.0.0.1",
                port=port,
                path="/events/auth0",
                headers={
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {INGEST_TOKEN}",
                },
                body_parts=body_parts(),
                connections=options.connections,
                threads=options.threads,
                seconds=seconds,
                tag="profile",
            )
            result = run_load(spec, workdir, options.client, options.wrk)
        finally:
            stack.stop_all()
    title = f"ingest: idsync's {options.workers} gunicorn workers at {result.rate:.0f} req/s"
    if profiler == "cprofile":
        return cprofile_report(sorted(profile_dir.glob("*.prof")), title)
    paths = sorted(profile_dir.glob("*.samples.json"))
    if not paths:
        raise RuntimeError("no gunicorn worker wrote a profile; see the logs in " + str(workdir))
    profiled = result.responses - SKIP_REQUESTS * len(paths)
    return sample_report(Samples.load(paths), title, profiled, "requests", INGEST_KEYS)


class _PgActivity:
    """Samples ``pg_stat_activity`` of one database: which statements keep PostgreSQL busy."""

    def __init__(self, admin_url: str, database: str, interval: float = 0.01) -> None:
        import threading

        self.admin_url, self.database, self.interval = admin_url, database, interval
        self.polls = 0
        self.active: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import re

        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            while not self._stop.is_set():
                rows = connection.execute(
                    "SELECT query FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
                    "AND pid <> pg_backend_pid()",
                    (self.database,),
                ).fetchall()
                self.polls += 1
                for (query,) in rows:
                    key = re.sub(r"\s+", " ", str(query))[:120]
                    self.active[key] = self.active.get(key, 0) + 1
                self._stop.wait(self.interval)

    def __enter__(self) -> _PgActivity:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def report(self, limit: int = 10) -> str:
        total = max(sum(self.active.values()), 1)
        lines = [
            f"PostgreSQL: {sum(self.active.values())} samples of an active statement in "
            f"{self.polls} polls of pg_stat_activity ({total / max(self.polls, 1):.2f} busy "
            "backends on average)",
            "",
            "| statement (first 120 characters) | share of active time |",
            "|---|---|",
        ]
        top = sorted(self.active.items(), key=lambda item: -item[1])[:limit]
        lines += [f"| `{query}` | {count / total:.0%} |" for query, count in top]
        return "\n".join(lines) + "\n"


def profile_delivery(
    *,
    admin_url: str,
    redis_url: str,
    run_id: str,
    workdir: Path,
    events: int,
    profiler: str,
) -> str:
    """Profile ``run_batch`` in this process on a ``created`` then an ``updated`` backlog."""
    import sys
    import time

    from bench.delivery import HUBSPOT_TOKEN, insert_backlog
    from bench.sampler import Sampler
    from idsync.settings import Settings
    from workers.delivery import run_batch
    from workers.runtime import build_runtime

    prefix = f"idsync-bench-{run_id}-profile"
    database = f"idsync_bench_{run_id}_profile"
    reports = []
    with own_database(admin_url, database) as url, own_redis_prefix(redis_url, prefix):
        stack = Stack(env={"DATABASE_URL": url}, workdir=workdir)
        stack.run(migrate_command())
        port = free_port()
        fake = [sys.executable, "-m", "idsync.fakes.hubspot", "--port", str(port)]
        stack.start("fake", [*fake, "--token", HUBSPOT_TOKEN, "--rate-limit", "1000000"])
        try:
            stack.wait_for_http(f"http://127.0.0.1:{port}/_fake/stats", timeout=60)
            settings = Settings(
                database_url=url,
                celery_broker_url=redis_url,
                redis_url=redis_url,
                redis_key_prefix=prefix,
                hubspot_token=HUBSPOT_TOKEN,
                hubspot_base_url=f"http://127.0.0.1:{port}",
                hubspot_rate_limit="1000000/1s",
            )
            runtime = build_runtime(settings)
            adapter = runtime.destination("hubspot")
            for kind in ("created", "updated"):
                insert_backlog(url, kind, events, run_id)
                fake_cpu = cpu_seconds(stack_pid(stack, "fake"))
                sampler = Sampler(clock="wall" if profiler == "wall" else "cpu")
                batches = handled = 0
                started = time.perf_counter()
                with _PgActivity(admin_url, database) as activity:
                    sampler.start()
                    while True:
                        report = run_batch(
                            sessions=runtime.sessions, settings=settings, destination=adapter
                        )
                        if report.claimed == 0:
                            break
                        batches, handled = batches + 1, handled + report.claimed
                    sampler.stop()
                wall = time.perf_counter() - started
                fake_cpu = cpu_seconds(stack_pid(stack, "fake")) - fake_cpu
                title = (
                    f"delivery, {kind} backlog: one process, no rate limit: {handled} deliveries "
                    f"in {batches} batches, {wall:.1f}s wall = {handled / wall:.0f} contacts/s, "
                    f"{1000 * wall / max(batches, 1):.0f} ms wall per batch; "
                    f"fake HubSpot used {fake_cpu:.1f} CPU s"
                )
                reports.append(
                    sample_report(Samples.of(sampler), title, handled, "deliveries", DELIVERY_KEYS)
                )
                reports.append(activity.report())
            runtime.engine.dispose()
        finally:
            stack.stop_all()
    return "\n".join(reports)


class _NoBlock:
    """idsync's limiter without ``block_for``: the same rolling window, nothing more."""

    def __init__(self, limiter: Any) -> None:
        self.limiter = limiter

    def acquire(self, timeout: float) -> None:
        self.limiter.acquire(timeout)

    def block_for(self, seconds: float) -> None:
        """Ignored on purpose: this is the variant being compared."""

    def wait_for_capacity(self, timeout: float) -> bool:
        return bool(self.limiter.wait_for_capacity(timeout))


def profile_limiter(
    *, redis_url: str, run_id: str, workdir: Path, seconds: float, limit: int, window: float
) -> str:
    """Request budget used by the HubSpot adapter's limiter, with and without its block rule.

    One loop takes a slot from ``workers.ratelimit.RedisRateLimiter`` and sends one
    batch read through the adapter's own client, whose answer handler blocks every
    worker for the whole interval when HubSpot reports ``Remaining: 0``. Between
    requests it does ``gap`` seconds of other work, as a worker does with the database.
    """
    import time

    import redis as redis_client
    import requests as http

    from bench.delivery import HUBSPOT_TOKEN
    from idsync.settings import Settings
    from workers.destinations.hubspot.adapter import LIMITER_WAIT_SECONDS, HubSpotDestination
    from workers.ratelimit import RateLimiter, RedisRateLimiter

    prefix = f"idsync-bench-{run_id}-limiter"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack = Stack(env={}, workdir=workdir)
    stack.start(
        "fake",
        fake_hubspot_command(port, HUBSPOT_TOKEN, limit, window),
    )
    settings = Settings(
        hubspot_token=HUBSPOT_TOKEN, hubspot_base_url=url, hubspot_rate_limit=f"{limit}/{window:g}s"
    )
    rows = [
        f"## the HubSpot limiter at {limit}/{window:g}s, {seconds:g} s per line",
        "",
        "| work between requests | block on Remaining: 0 | requests/s | budget used | 429s |",
        "|---|---|---|---|---|",
    ]
    client = redis_client.Redis.from_url(redis_url)
    try:
        stack.wait_for_http(f"{url}/_fake/stats", timeout=60)
        for gap in (0.0, 0.5 * window / limit, window / limit):
            for block in (True, False):
                name = f"{prefix}:{gap:g}:{block}"
                limiter = RedisRateLimiter(client, name=name, limit=limit, window=window)
                chosen: RateLimiter = limiter if block else _NoBlock(limiter)
                adapter = HubSpotDestination(settings, chosen)
                before = http.get(f"{url}/_fake/stats", timeout=10).json()["rate_limited"]
                time.sleep(window * 1.1)  # the fake's window empties
                sent, started = 0, time.monotonic()
                while time.monotonic() - started < seconds:
                    adapter.limiter.acquire(LIMITER_WAIT_SECONDS)
                    adapter.client.batch_read_by_email(["bench@example.com"])
                    sent += 1
                    time.sleep(gap)
                rate = sent / (time.monotonic() - started)
                limited = http.get(f"{url}/_fake/stats", timeout=10).json()["rate_limited"]
                adapter.close()
                rows.append(
                    f"| {gap:.2f} s | {'yes (idsync)' if block else 'no'} | "
                    f"{rate:.2f} | {rate / (limit / window):.0%} | {limited - before} |"
                )
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()
        stack.stop_all()
    return "\n".join(rows) + "\n"
