"""The Auth0 Event Stream Action in ``deploy/auth0/``, tested by Node's own test runner.

The Action is JavaScript that Auth0 runs, so its tests are JavaScript too
(``node --test``, against a stub of ``fetch``); this test runs them as part of
the suite and fails when any of them fails or none ran.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ACTION_DIR = Path(__file__).resolve().parent.parent / "deploy" / "auth0"


def test_the_action_passes_its_node_tests() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Action's tests need Node.js 18 or later")
    files = sorted(str(path) for path in ACTION_DIR.glob("*.test.js"))
    assert files, f"no *.test.js in {ACTION_DIR}"
    # Files are named one by one: Node 20 reads a directory argument, Node 22 a glob.
    completed = subprocess.run(
        [node, "--test", *files],
        cwd=ACTION_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    passed = re.search(r"^# pass (\d+)$", completed.stdout, re.MULTILINE)
    failed = re.search(r"^# fail (\d+)$", completed.stdout, re.MULTILINE)
    assert passed and failed, output[-4000:]
    assert int(failed.group(1)) == 0
    assert int(passed.group(1)) >= 10, "the Action's suite ran fewer tests than it holds"
