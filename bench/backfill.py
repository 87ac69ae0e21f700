"""Backfill: ``idsync backfill`` stores a tenant's users from the fake Auth0, timed.

The fake Auth0 (``python -m idsync.fakes.auth0 --users N``) runs in a process of
its own with N generated users. ``idsync backfill --json`` runs as the operator
runs it, in its own process, against a copy of the migrated schema: it starts
the export job, polls it, streams the NDJSON download and stores every user as
a ``user.backfill`` event with its HubSpot delivery. The clock covers the whole
command (job, download, store); the command's own figure covers the store
alone. The same command then runs a second time, which must store nothing.
No worker runs: the destinations would drain the backlog at their rate limits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import own_database, own_redis_prefix
from idsync.stack import Stack, free_port

DOMAIN = "bench.eu.auth0.com"
CLIENT_ID, CLIENT_SECRET = "bench-client", "bench-secret"  # the fake's, loopback only
TARGET_USERS, TARGET_SECONDS = 100_000, 30.0
# Runs the CLI in this process and reports its peak resident memory on stderr's last line.
_MEASURED_CLI = (
    "import resource, sys\n"
    "from idsync.cli import main\n"
    "try:\n"
    "    main(['backfill', '--json'], standalone_mode=False)\n"
    "finally:\n"
    "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "    print('peak_rss_kb', peak, file=sys.stderr)\n"
)


@dataclass
class BackfillOptions:
    users: int


@dataclass
class BackfillRun:
    wall: float  # seconds of the whole command
    report: dict[str, Any]  # its --json output
    peak_rss_kb: int


@dataclass
class BackfillResult:
    options: BackfillOptions
    first: BackfillRun
    second: BackfillRun
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Users stored per second, export job and download included."""
        return self.first.report["stored"] / self.first.wall if self.first.wall > 0 else 0.0


def _run_cli(env: dict[str, str], workdir: Path) -> BackfillRun:
    stack = Stack(env=env, workdir=workdir)
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-c", _MEASURED_CLI],
        cwd=workdir,
        env=stack._environment(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    wall = time.monotonic() - started
    if completed.returncode != 0:
        raise RuntimeError(
            f"idsync backfill exited {completed.returncode}: {completed.stderr[-2000:]}"
        )
    rss = [line for line in completed.stderr.splitlines() if line.startswith("peak_rss_kb")]
    return BackfillRun(
        wall=wall,
        report=json.loads(completed.stdout),
        peak_rss_kb=int(rss[-1].split()[1]) if rss else 0,
    )


def run_backfill_bench(
    options: BackfillOptions,
    *,
    admin_url: str,
    redis_url: str,
    run_id: str,
    workdir: Path,
    schema: str,
) -> BackfillResult:
    """Backfill ``options.users`` users from a fake Auth0 process twice, into a fresh outbox."""
    port = free_port()
    fake_url = f"http://127.0.0.1:{port}"
    prefix = f"idsync-bench-{run_id}-backfill"
    with (
        own_database(admin_url, f"idsync_bench_{run_id}_backfill", template=schema) as url,
        own_redis_prefix(redis_url, prefix),
    ):
        stack = Stack(env={}, workdir=workdir)
        stack.start(
            "auth0",
            [
                sys.executable,
                "-m",
                "idsync.fakes.auth0",
                "--port",
                str(port),
                "--domain",
                DOMAIN,
                "--client-id",
                CLIENT_ID,
                "--client-secret",
                CLIENT_SECRET,
                "--users",
                str(options.users),
                "--rate-limit",
                "100000",
            ],
        )
        try:
            stack.wait_for_log("auth0", fake_url, timeout=120)
            env = {
                "DATABASE_URL": url,
                "CELERY_BROKER_URL": redis_url,
                "REDIS_URL": redis_url,
                "REDIS_KEY_PREFIX": prefix,
                "DESTINATIONS": "hubspot",
                "HUBSPOT_TOKEN": "bench-hubspot-token",
                "AUTH0_DOMAIN": DOMAIN,
                "AUTH0_CLIENT_ID": CLIENT_ID,
                "AUTH0_CLIENT_SECRET": CLIENT_SECRET,
                "AUTH0_MGMT_BASE_URL": fake_url,
            }
            first = _run_cli(env, workdir)
            second = _run_cli(env, workdir)
        finally:
            stack.stop_all()
    result = BackfillResult(options=options, first=first, second=second)
    if first.report["stored"] != options.users:
        result.notes.append(f"backfill stored {first.report['stored']} of {options.users} users")
    if second.report["stored"]:
        result.notes.append(f"the second backfill stored {second.report['stored']} users again")
    return result
