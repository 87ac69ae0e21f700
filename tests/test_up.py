"""``idsync up`` on the embedded default: it starts, accepts events, and stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from idsync.stack import free_port
from tests.events import auth0_event
from tests.processes import wait_for

pytestmark = pytest.mark.e2e


def test_up_runs_until_interrupted(tmp_path: Path) -> None:
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL", "INGEST_TOKEN", "HUBSPOT_TOKEN")
    }
    env["COLUMNS"] = "200"
    log = tmp_path / "up.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "idsync"), "up", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            found = wait_for(
                lambda: re.search(r"Ingest token: (\S+)", log.read_text()),
                90,
                "idsync up to print its token",
            )
            token = found.group(1)
            answer = requests.post(
                f"http://127.0.0.1:{port}/events/auth0",
                json=auth0_event("user.created", "auth0|up", email="up@example.com"),
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            assert answer.status_code == 202
            ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
            # Without HUBSPOT_TOKEN the destination waits, and says why.
            assert ready["destinations"]["hubspot"].startswith("paused")
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert (tmp_path / "idsync.db").exists()  # the embedded outbox, in the working folder
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
        except requests.ConnectionError:
            break  # the ingest server is gone with its parent
        time.sleep(0.2)
    else:
        raise AssertionError("ingest still answers after Ctrl-C")
