"""The benchmark harness, in miniature: it runs every benchmark and prints a well-formed table.

Speed is not asserted (CI machines differ); the table's shape and its numbers are.
The ingest part uses the Python client through the same path a machine without
wrk takes, so wrk is not needed.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import choose_client, parse_args
from tests.conftest import PG_ADMIN_URL, REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"\d")
TINY = shlex.split(
    "--quiet-wait 0 --rounds 1 --round-seconds 1 --warmup-seconds 0 --connections 2 "
    "--events 150 --updates 100 --capacity-events 50 --rate-limit 20 --delivery-timeout 90 "
    "--fast-rate-limit 40 --fast-events 100 "
    "--naive-events 20 --naive-seconds 3 --isolation-users 200 --webhook-users 200 "
    "--backfill-users 300 --claims-depth 2000 --claims-count 3 --claims-drain-seconds 1 "
    "--claims-ingest-rounds 1 --claims-ingest-seconds 1 --vendor-users 200"
)


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of every row of the report's table, header and separator excluded."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert lines[0] == "| benchmark | measure | result | target | met |"
    assert set(lines[1]) <= set("|-")
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]
    for row in rows:
        assert len(row) == 5, row
    return rows


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_every_benchmark_fills_the_table(tmp_path: Path) -> None:
    out = tmp_path / "latest.md"
    missing_wrk = tmp_path / "no-such-wrk"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            *TINY,
            "--out",
            str(out),
            "--wrk",
            str(missing_wrk),
            "--pg-admin-url",
            PG_ADMIN_URL,
            "--redis-url",
            REDIS_URL,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=580,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "apt-get install -y wrk" in completed.stderr
    markdown = out.read_text()
    assert markdown.strip() in completed.stdout
    rows = table_rows(markdown)
    by_benchmark: dict[str, dict[str, list[str]]] = {}
    for benchmark, measure, result, target, met in rows:
        by_benchmark.setdefault(benchmark, {})[measure] = [result, target, met]
    assert set(by_benchmark) == {
        "machine",
        "code",
        "ingest",
        "delivery",
        "naive",
        "isolation",
        "webhook",
        "claims",
        "backfill",
        "vendors",
    }
    assert {"CPU", "cores", "Python", "PostgreSQL", "Redis", "load generator"} <= set(
        by_benchmark["machine"]
    )
    assert "Python client" in by_benchmark["machine"]["load generator"][0]
    targets = [
        (b, m, cells)
        for b, measures in by_benchmark.items()
        if b not in ("machine", "code")
        for m, cells in measures.items()
        if cells[1]
    ]
    # Four ingest targets, two per delivery phase plus memory at each of two rate limits,
    # the capacity over the bare loop for new and for linked users, the naive ratio, the
    # isolation ratio, the webhook ratio, the claim time at one depth, the store path's
    # ratio with a full outbox, the backfill rate, and per vendor (Salesforce, Segment,
    # Braze) its drain rate against its fake's ceiling and its share of limit answers.
    assert len(targets) == 4 + 2 * (2 * 2 + 1) + 2 + 1 + 1 + 1 + 1 + 1 + 1 + 3 * 2
    for benchmark, measure, (result, _target, met) in targets:
        assert NUMBER.search(result), (benchmark, measure, result)
        assert "n/a" not in result, (benchmark, measure, result)
        assert met == "yes" or met.startswith("no ("), (benchmark, measure, met)
    assert "failed" not in {m for measures in by_benchmark.values() for m in measures}


def test_without_wrk_the_benchmark_says_how_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "no-such-wrk")
    assert choose_client("wrk", missing) is None
    assert "apt-get install -y wrk" in capsys.readouterr().err
    assert choose_client("auto", missing) == "python"
    assert choose_client("python", missing) == "python"


def test_every_size_is_an_option() -> None:
    quick, full = parse_args(["--quick"]), parse_args([])
    assert quick.events < full.events and quick.round_seconds < full.round_seconds
    assert full.events >= 20_000
    assert parse_args(["--only", "ingest,naive"]).only == ["ingest", "naive"]
    assert parse_args(["--only", "webhook", "--only", "isolation"]).only == [
        "isolation",
        "webhook",
    ]
    assert quick.isolation_users < full.isolation_users and full.isolation_users >= 20_000
    assert quick.webhook_users < full.webhook_users
    assert quick.vendor_users < full.vendor_users and full.vendor_ceiling <= 200
    assert "vendors" in parse_args([]).only
    assert parse_args(["--quick", "--events", "7"]).events == 7
