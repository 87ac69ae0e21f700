"""``idsync demo`` runs the whole service on the embedded default and checks HubSpot's state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_demo_exits_zero_with_the_expected_hubspot_state(tmp_path: Path) -> None:
    idsync = Path(sys.executable).parent / "idsync"
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL", "INGEST_TOKEN", "HUBSPOT_TOKEN")
    }
    result = subprocess.run(
        [str(idsync), "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Demo passed" in result.stdout
    assert "ann.lee@example.com" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the embedded files live in the demo's own folder
