"""Real processes for end-to-end tests: gunicorn, Celery workers and beat, the fake HubSpot.

One ``ServiceStack`` runs per test session (starting Celery takes seconds); the
``e2e`` fixture resets the database, the fake and this run's Redis keys between
tests. Conditions are awaited with deadlines, never with fixed sleeps.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import requests
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from idsync.fakes.hubspot import FakeHubSpot
from idsync.stack import Stack, beat_command, free_port, ingest_command, worker_command
from models.tables import FINISHED, Delivery, DeliveryStatus

INGEST_TOKEN = "test-ingest-token"
OUTBOX_TABLES = (
    "delivery_attempts",
    "deliveries",
    "events",
    "links",
    "quarantine",
    "destination_states",
    "reconcile_runs",
    "auth0_recovery_passes",
)


def wait_for(check: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class ServiceStack:
    """ingest + workers + beat against PostgreSQL, Redis and a fake HubSpot."""

    env: dict[str, str]
    workdir: Path
    hubspot: FakeHubSpot
    sessions: sessionmaker[Session]
    port: int = field(default_factory=free_port)
    stack: Stack = field(init=False)
    http: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.stack = Stack(env=self.env, workdir=self.workdir)
        self.http.headers["Authorization"] = f"Bearer {INGEST_TOKEN}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_ingest(self) -> None:
        self.stack.start("ingest", ingest_command(self.port, workers=2))
        self.stack.wait_for_http(f"{self.url}/readyz", timeout=60)

    def start_worker(self, name: str = "worker", concurrency: int = 1) -> None:
        self.stack.start(name, worker_command(concurrency=concurrency, name=name))
        self.stack.wait_for_log(name, "ready", timeout=60)

    def start_beat(self) -> None:
        self.stack.start("beat", beat_command(self.workdir / "celerybeat-schedule"))
        self.stack.wait_for_log("beat", "beat: Starting", timeout=60)

    def post(self, document: dict[str, Any]) -> requests.Response:
        return self.http.post(f"{self.url}/events/auth0", json=document, timeout=10)

    def statuses(self) -> list[tuple[str, str | None]]:
        with self.sessions() as session:
            rows = session.execute(
                select(Delivery.status, Delivery.reason).order_by(Delivery.id)
            ).all()
        return [(row.status.value, row.reason) for row in rows]

    def all_finished(self, expected: int | None = None) -> bool:
        with self.sessions() as session:
            total = session.scalar(select(func.count(Delivery.id)))
            open_ = session.scalar(
                select(func.count(Delivery.id)).where(Delivery.status.not_in(FINISHED))
            )
        return bool(total) and open_ == 0 and (expected is None or total == expected)

    def wait_finished(self, expected: int | None = None, timeout: float = 60) -> None:
        wait_for(
            lambda: self.all_finished(expected),
            timeout,
            f"every delivery finished (now {self.statuses()})",
        )

    def count(self, status: DeliveryStatus) -> int:
        with self.sessions() as session:
            return int(
                session.scalar(select(func.count(Delivery.id)).where(Delivery.status == status))
                or 0
            )

    def reset(self) -> None:
        """Empty the outbox and the fake HubSpot between property-test examples."""
        empty_tables(self.sessions.kw["bind"])
        self.hubspot.reset()

    def stop(self) -> None:
        self.http.close()
        self.stack.stop_all()


def empty_tables(engine: Engine) -> None:
    """TRUNCATE every table; live workers may hold locks, so retry a deadlock."""
    for attempt in range(5):
        try:
            with engine.begin() as connection:
                connection.execute(text("SET LOCAL lock_timeout = '5s'"))
                connection.execute(
                    text(f"TRUNCATE {', '.join(OUTBOX_TABLES)} RESTART IDENTITY CASCADE")
                )
            return
        except OperationalError:
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def flush_prefix(url: str, prefix: str, keep: tuple[str, ...] = ()) -> None:
    """Delete this run's Redis keys (never anyone else's), except those under ``keep``."""
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(f"{prefix}:*"):
            if not key.decode().startswith(keep):
                client.delete(key)
    finally:
        client.close()


class PrivateRedis:
    """A redis-server of the test's own on a free port, to stop and start at will."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 10, "the private Redis to answer")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class TcpProxy:
    """A loopback TCP proxy of the test's own, to cut a connection to a shared server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = True
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and break the open ones."""
        self.open = False
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def stack_env(
    database_url: str, redis_url: str, prefix: str, hubspot: FakeHubSpot, **overrides: str
) -> dict[str, str]:
    """The environment every idsync process of a test stack shares."""
    env = {
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": redis_url,
        "REDIS_URL": redis_url,
        "REDIS_KEY_PREFIX": prefix,
        "INGEST_TOKEN": INGEST_TOKEN,
        "HUBSPOT_TOKEN": "fake-token",
        "HUBSPOT_BASE_URL": hubspot.url,
        "HUBSPOT_RATE_LIMIT": "1000/1s",
        "HUBSPOT_CONNECT_TIMEOUT_SECONDS": "0.5",
        "HUBSPOT_TIMEOUT_SECONDS": "1",
        "LEASE_SECONDS": "8",
        "SETTLE_SECONDS": "3",
        "SWEEP_SECONDS": "0.5",
        "PAUSE_PROBE_SECONDS": "0.5",
        # Twelve attempts, as by default: the fault tests make several calls fail in a row.
        "RETRY_SCHEDULE": "0.2s,0.3s,0.5s,0.5s,1s,1s,1s,1s,1s,1s,1s,1s",
        "RETRY_JITTER": "0",
    }
    env.update(overrides)
    return env


def iter_logs(workdir: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(workdir.glob("*.log")):
        yield path, path.read_text(errors="replace")
