"""Timestamps through a real mount match what the mount showed (issue 9 item 11).

What these tests check:
- `touch` right after a create never moves the mtime backwards: safefs stamps files from the
  clock the kernel uses for UTIME_NOW and its own mtime updates.
- Writing back through a staging rename (a changed file, a new file) leaves the parent
  directory's mtime on SRC equal to the mount's, also for the project's root.

Rules: mounts come only from the fixtures; no sleeps as synchronisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import MountFactory, describe

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

LONG_DELAY = ("--writeback-delay", "600")  # nothing is written back before the test syncs


def test_touch_right_after_create_never_moves_mtime_back(mount_factory: MountFactory) -> None:
    m = mount_factory()
    backwards = []
    for n in range(200):
        path = m.mnt / f"f{n}"
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
        try:
            created = os.fstat(fd).st_mtime_ns
            os.utime(fd)  # touch: UTIME_NOW
            touched = os.fstat(fd).st_mtime_ns
        finally:
            os.close(fd)
        if touched < created:
            backwards.append((n, created - touched))
    assert not backwards, f"touch moved mtime backwards in {len(backwards)} of 200 tries (try, ns): {backwards[:10]}"


def test_directory_times_on_src_match_the_mount_after_write_back(mount_factory: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "old").write_bytes(b"old contents")
    (src / "top").write_bytes(b"top")
    past = 1_500_000_000_123_456_789
    for d in (src / "d", src):
        os.utime(d, ns=(past, past))
    m = mount_factory(src, None, None, *LONG_DELAY)

    (m.mnt / "d" / "old").write_bytes(b"changed through the mount")  # published by a staging rename
    (m.mnt / "top").write_bytes(b"changed too")
    (m.mnt / "d" / "new").write_bytes(b"new file")  # the mount's d mtime moves now
    done = m.sync("--timeout", "30", timeout=90)
    assert done.returncode == 0, describe(done)
    assert (src / "d" / "old").read_bytes() == b"changed through the mount"
    for rel in ("d", "."):
        mount_st, src_st = os.stat(m.mnt / rel), os.stat(src / rel)
        assert src_st.st_mtime_ns == mount_st.st_mtime_ns, (
            f"{rel}: mtime on SRC {src_st.st_mtime_ns}, in the mount {mount_st.st_mtime_ns}"
        )
