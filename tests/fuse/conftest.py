"""Fixtures for tests that run against one real mount.

Every test in this directory is marked `fuse` (tests/conftest.py), so it skips without a usable
/dev/fuse, or fails under SAFEFS_REQUIRE_FUSE=1. `mount_factory` itself is defined in
tests/conftest.py because the multihost tier needs it too.
"""

from __future__ import annotations

import pytest

from tests.helpers import Mount, MountFactory


@pytest.fixture
def mounted(mount_factory: MountFactory) -> Mount:
    """One daemon with the defaults: tmp_path/src mounted at tmp_path/mnt, cache at
    tmp_path/cache, write-back delay 0.5 s. Torn down (and reaped) by mount_factory.
    """
    return mount_factory()
