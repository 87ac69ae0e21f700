"""``idsync demo`` runs the whole service on the embedded default and checks HubSpot's state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def run_demo(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
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
        env=env | variables,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # the embedded files live in the demo's own folder
    return result


def test_demo_exits_zero_with_the_expected_hubspot_state(tmp_path: Path) -> None:
    result = run_demo(tmp_path)
    assert "Demo passed: one live contact (Ann, new email)" in result.stdout
    assert "ann.lee@example.com" in result.stdout


def test_the_demo_checks_every_destination_that_destinations_names(tmp_path: Path) -> None:
    result = run_demo(
        tmp_path, DESTINATIONS="hubspot,salesforce,segment,braze,licenses", LICENSES_KIND="webhook"
    )
    lines = result.stdout.splitlines()
    for label in ("hubspot", "salesforce", "segment", "braze", "licenses (webhook)"):
        assert any(line.startswith(f"ok   {label}: ") for line in lines), (label, lines[-8:])
    assert "Demo passed: all 5 destinations" in result.stdout


def test_the_demo_refuses_a_kind_it_has_no_simulator_for() -> None:
    from idsync.demo_destinations import start_destination

    with pytest.raises(ValueError, match="unknown kind"):
        start_destination("crm", {}, lambda fake: fake)
