"""Migrations are the schema: ``alembic upgrade head`` on an empty database matches the models."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory

from tests.conftest import PG_ADMIN_URL, ROOT

ALEMBIC = str(Path(sys.executable).parent / "alembic")


def alembic(url: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ALEMBIC, "-c", str(ROOT / "alembic.ini"), *args],
        env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
def test_upgrade_head_on_empty_database_then_check_finds_nothing(kind: str, tmp_path: Path) -> None:
    name = f"idsync_migrate_{uuid.uuid4().hex[:8]}"
    if kind == "postgresql":
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    else:
        url = f"sqlite:///{tmp_path / 'idsync.db'}"
    try:
        # Run from another folder: alembic.ini finds its scripts wherever it is called from.
        upgrade = alembic(url, "upgrade", "head", cwd=tmp_path)
        assert upgrade.returncode == 0, upgrade.stderr
        check = alembic(url, "check")
        assert check.returncode == 0, check.stderr + check.stdout
        assert "No new upgrade operations detected" in check.stdout + check.stderr
        downgrade = alembic(url, "downgrade", "base")
        assert downgrade.returncode == 0, downgrade.stderr
    finally:
        if kind == "postgresql":
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrations_have_one_head() -> None:
    """Two branches merged without a merge revision leave ``alembic upgrade head`` ambiguous."""
    scripts = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini")))
    heads = scripts.get_heads()
    assert len(heads) == 1, (
        f"alembic has {len(heads)} heads {sorted(heads)}: point one migration's down_revision "
        "at the other, or add a merge revision (alembic merge heads)"
    )
