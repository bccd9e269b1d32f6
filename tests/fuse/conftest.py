"""Fixtures for tests that run against one real mount.

Every test in this directory is marked `fuse` (tests/conftest.py), so it skips without a usable
/dev/fuse, or fails under SAFEFS_REQUIRE_FUSE=1. `mount_factory` itself is defined in
tests/conftest.py because the multihost tier needs it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faultfs import FaultFS
from tests.helpers import Mount, MountFactory, is_mounted


@pytest.fixture
def mounted(mount_factory: MountFactory) -> Mount:
    """One daemon with the defaults: tmp_path/src mounted at tmp_path/mnt, cache at
    tmp_path/cache, write-back delay 0.5 s. Torn down (and reaped) by mount_factory.
    """
    return mount_factory()


@pytest.fixture
def nfs(tmp_path: Path) -> Iterator[FaultFS]:
    """A FaultFS (a pass-through FUSE layer that can fail, hang or slow requests) over
    tmp_path/real, mounted at tmp_path/nfs: the project's NFS server for fault tests."""
    real, mnt = tmp_path / "real", tmp_path / "nfs"
    real.mkdir()
    mnt.mkdir()
    ffs = FaultFS.start(real, mnt, log_path=tmp_path / "faultfs.log")
    try:
        yield ffs
    finally:
        problems = ffs.stop()
        assert not problems, f"faultfs cleanup: {problems}"
        assert not is_mounted(mnt), f"faultfs still mounted at {mnt} after stop"
