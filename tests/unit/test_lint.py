"""The code stays linted and typed: `ruff check` over safefs, tests and scripts, and `mypy` over
the safefs package, both with the configuration in pyproject.toml, report nothing.

Each check fails with the tool's own report, so the failure says what to fix. `ruff format` is
not run: the code is formatted by hand (see pyproject.toml).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.timeout(300)


def tool(name: str) -> Path:
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        pytest.fail(f"{exe} missing: run scripts/setup ({name} is in the test extra)")
    return exe


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=REPO, capture_output=True, text=True, timeout=240)


def test_ruff_finds_nothing() -> None:
    done = run(tool("ruff"), "check", "--no-cache", "safefs", "tests", "scripts")
    assert done.returncode == 0, f"ruff check failed:\n{done.stdout}{done.stderr}"


def test_mypy_finds_nothing_in_the_package() -> None:
    # The files (safefs/) and the settings come from [tool.mypy]; no cache, so a stale one
    # cannot hide an error.
    done = run(tool("mypy"), "--no-incremental", "--cache-dir", "/dev/null")
    assert done.returncode == 0, f"mypy failed:\n{done.stdout}{done.stderr}"
