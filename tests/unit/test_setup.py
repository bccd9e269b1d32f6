"""scripts/setup puts `safefs` on PATH (issue 11 item 1): a link to the venv's command, said so.

Run with SAFEFS_BIN_DIR in a temp dir, so the test never touches /usr/local/bin. The venv is
already installed (scripts/test runs setup first), so setup only checks and links here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.timeout(300)


def setup(bin_dir: Path, path: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SAFEFS_BIN_DIR=str(bin_dir), PATH=path)
    return subprocess.run([str(REPO / "scripts" / "setup")], env=env, capture_output=True, text=True, timeout=280)


def test_setup_links_safefs_and_a_new_shell_runs_it(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    done = setup(bin_dir, f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin")
    assert done.returncode == 0, done.stderr
    assert os.readlink(bin_dir / "safefs") == str(REPO / ".venv" / "bin" / "safefs")
    assert f"linked {bin_dir}/safefs" in done.stderr and "not on your PATH" not in done.stderr
    shell = subprocess.run(["env", "-i", f"PATH={bin_dir}:/usr/bin:/bin", "sh", "-c", "safefs --version"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shell.returncode == 0 and shell.stdout.startswith("safefs "), shell
    again = setup(bin_dir, f"{bin_dir}:/usr/bin:/bin")
    assert again.returncode == 0 and "linked" not in again.stderr  # idempotent and quiet


def test_setup_says_when_the_link_dir_is_not_on_path_and_leaves_other_files_alone(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    done = setup(bin_dir, "/usr/sbin:/usr/bin:/sbin:/bin")
    assert done.returncode == 0 and f"{bin_dir} is not on your PATH" in done.stderr, done.stderr
    (bin_dir / "safefs").unlink()
    (bin_dir / "safefs").write_text("#!/bin/sh\necho someone else's safefs\n")
    done = setup(bin_dir, "/usr/sbin:/usr/bin:/sbin:/bin")
    assert done.returncode == 0 and "exists and is not a safefs link; left alone" in done.stderr
    assert "someone else's" in (bin_dir / "safefs").read_text()
