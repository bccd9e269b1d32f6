"""ContentCache's table of open files: a pinned descriptor is never closed under its user."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from safefs.cache import MAX_OPEN_FILES, ContentCache

pytestmark = pytest.mark.timeout(60)


def test_a_pinned_descriptor_outlives_eviction_and_delete(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path, 0)
    cache.pwrite(1, 0, b"one")
    with cache.pinned(1) as fd:
        for ino in range(2, MAX_OPEN_FILES + 10):  # pushes inode 1 out of the table
            cache.pwrite(ino, 0, b"x")
        cache.delete(1)
        assert os.pread(fd, 3, 0) == b"one"  # still inode 1's file, not a reused number
    with pytest.raises(OSError):
        os.fstat(fd)  # closed at the last unpin
    cache.close()


def test_close_waits_for_the_last_unpin(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path, 0)
    cache.pwrite(7, 0, b"seven")
    fd = cache.pin(7)
    cache.close()
    assert os.pread(fd, 5, 0) == b"seven"
    cache.unpin(fd)
    with pytest.raises(OSError):
        os.fstat(fd)
