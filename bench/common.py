"""What every benchmark shares: its own database and Redis keys, the machine, its processes."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

from idsync.stack import Stack, migrate_command

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "auth0"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def database_url(admin_url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``admin_url``."""
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def own_database(admin_url: str, name: str, template: str | None = None) -> Iterator[str]:
    """Create database ``name`` for one benchmark, yield its URL, and drop it afterwards.

    With ``template`` (a database nobody is connected to) it starts as a copy of that one,
    so that the sides of a comparison start from the same rows.
    """
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        create += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(create)
    try:
        yield database_url(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextmanager
def migrated_schema(admin_url: str, name: str, workdir: Path) -> Iterator[str]:
    """Create database ``name`` migrated to head, yield its name, and drop it afterwards.

    The benchmarks of one run copy it (``own_database(..., template=name)``) instead of
    each running the migrations: the same schema, in a fraction of the time.
    """
    with own_database(admin_url, name) as url:
        Stack(env={"DATABASE_URL": url}, workdir=workdir).run(migrate_command())
        yield name


@contextmanager
def own_redis_prefix(url: str, prefix: str) -> Iterator[str]:
    """Yield ``prefix``; afterwards delete the keys under it (never anyone else's, never FLUSH)."""
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(url)
        try:
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.delete(key)
        finally:
            client.close()


@cache
def _fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


def fixture(name: str) -> dict[str, Any]:
    """A fresh copy of one of the real Auth0 payloads kept with the tests."""
    return json.loads(_fixture_text(name))  # type: ignore[no-any-return]


# The machine


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def postgres_version(admin_url: str) -> str:
    with psycopg.connect(admin_url) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "unknown"


def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server").get("redis_version", "unknown"))
    finally:
        client.close()


def find_wrk(explicit: str | None = None) -> str | None:
    """The wrk binary: ``explicit`` if it is an executable file, else wrk on PATH, else None."""
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    return shutil.which("wrk")


def wrk_version(binary: str | None) -> str | None:
    """``wrk``'s version line, or None when there is no wrk binary."""
    if binary is None:
        return None
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = (result.stdout or result.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "wrk"


def code_revision() -> str:
    """The git commit the benchmarked code is at, and how many files differ from it."""
    git = ["git", "--no-optional-locks", "-C", str(ROOT)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        changed = subprocess.run(
            [*git, "status", "--porcelain"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{head} + {len(changed)} uncommitted files" if changed else head


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    python: str
    postgres: str
    redis: str


def describe_machine(admin_url: str, redis_url: str) -> Machine:
    """What the results were measured on."""
    return Machine(
        cpu=cpu_model(),
        cores=len(os.sched_getaffinity(0)),
        python=platform.python_version(),
        postgres=postgres_version(admin_url),
        redis=redis_version(redis_url),
    )


# Processes, read from /proc


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    queue = [pid]
    while queue:
        children = sorted(parents.get(queue.pop(0), []))
        found += children
        queue += children
    return found


def process_tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (``VmHWM``: peak resident memory)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time that ``pid`` has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


class MachineCpu:
    """How busy all cores were between ``start()`` and ``busy_share()``, from /proc/stat."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values[:8]), idle

    def start(self) -> None:
        self._start = self._read()

    def busy_share(self) -> float:
        total, idle = self._read()
        spent = total - self._start[0]
        return 0.0 if spent <= 0 else 1 - (idle - self._start[1]) / spent

    def busy_seconds(self) -> float:
        """CPU seconds all cores together spent busy since ``start()``."""
        total, idle = self._read()
        return ((total - self._start[0]) - (idle - self._start[1])) / _CLOCK_TICKS


def stack_pid(stack: Stack, name: str) -> int:
    return stack.children[name].process.pid


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
