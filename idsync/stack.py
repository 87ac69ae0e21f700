"""Run idsync's processes as children: ingest (gunicorn), Celery worker and beat.

``idsync up``, ``idsync demo`` and the end-to-end tests all start the same
commands that docker-compose runs, through this one class.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _bin(name: str) -> str:
    """A console script of this environment, wherever the interpreter lives."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def migrate_command() -> list[str]:
    return [_bin("alembic"), "-c", str(ROOT / "alembic.ini"), "upgrade", "head"]


def ingest_command(port: int, workers: int = 2) -> list[str]:
    # The children run in their own working directory, so name the config file:
    # it makes the logs JSON and sums /metrics over the gunicorn workers.
    return [
        _bin("gunicorn"),
        "ingest:create_app()",
        "--config",
        str(ROOT / "gunicorn.conf.py"),
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--no-control-socket",
        "--access-logfile",
        "-",
    ]


def worker_command(concurrency: int = 2, name: str = "worker") -> list[str]:
    return [
        _bin("celery"),
        "-A",
        "workers",
        "worker",
        "-E",
        "--loglevel",
        "INFO",
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
    ]


def fake_hubspot_command(port: int, token: str, rate_limit: int, window: float) -> list[str]:
    """The HubSpot simulator as a process of its own (benchmarks run it apart)."""
    return [
        sys.executable,
        "-m",
        "idsync.fakes.hubspot",
        "--port",
        str(port),
        "--token",
        token,
        "--rate-limit",
        str(rate_limit),
        "--window",
        f"{window:g}",
    ]


def beat_command(schedule_file: Path) -> list[str]:
    return [
        _bin("celery"),
        "-A",
        "workers",
        "beat",
        "--loglevel",
        "INFO",
        "--schedule",
        str(schedule_file),
    ]


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


@dataclass
class Stack:
    """A set of idsync child processes sharing one environment."""

    env: Mapping[str, str]
    workdir: Path
    children: dict[str, Child] = field(default_factory=dict)

    def _environment(self) -> dict[str, str]:
        merged = {**os.environ, **self.env}
        merged["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), merged.get("PYTHONPATH")]))
        merged.setdefault("PYTHONUNBUFFERED", "1")
        return merged

    def run(self, command: list[str], timeout: float = 120) -> None:
        """Run a one-shot command (the migration) and fail loudly if it fails."""
        result = subprocess.run(
            command,
            cwd=self.workdir,
            env=self._environment(),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {result.returncode}:\n"
                f"{result.stderr.decode(errors='replace')[-3000:]}"
            )

    def start(self, name: str, command: list[str]) -> Child:
        """Start a long-running child, its output going to ``<workdir>/<name>.log``."""
        log_path = self.workdir / f"{name}.log"
        log_file = log_path.open("ab")
        process = subprocess.Popen(
            command,
            cwd=self.workdir,
            env=self._environment(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        child = Child(name, process, log_path, log_file)
        self.children[name] = child
        return child

    def log(self, name: str) -> str:
        return self.children[name].log_path.read_text(errors="replace")

    def wait_for_http(self, url: str, timeout: float = 30) -> None:
        """Wait until ``url`` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if requests.get(url, timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{url} did not answer 200 within {timeout}s")

    def wait_for_log(self, name: str, text: str, timeout: float = 30) -> None:
        """Wait until child ``name`` has written ``text`` to its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if text in self.log(name):
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"{name} did not log {text!r} within {timeout}s:\n{self.log(name)[-2000:]}"
        )

    def check_alive(self) -> None:
        for child in self.children.values():
            code = child.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"{child.name} exited with {code}:\n{self.log(child.name)[-3000:]}"
                )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a child's whole process group and forget it."""
        child = self.children.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, sig)
        child.process.wait(timeout=30)
        child.log_file.close()

    def stop(self, name: str, timeout: float = 20) -> None:
        """Stop a child gracefully (SIGTERM), then forcefully."""
        child = self.children.pop(name)
        try:
            os.killpg(child.process.pid, signal.SIGTERM)
            child.process.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait(timeout=10)
        child.log_file.close()

    def stop_all(self) -> None:
        for name in reversed(list(self.children)):
            self.stop(name)
