"""The kernel writeback cache on the writer (issue 10, item 1; DESIGN.md G2).

What these tests check, through a real mount:
- the writer mounts with the writeback cache, a follower without it (`status --json`);
- size, mtime and ctime stay right while the kernel owns them: after writes, truncates,
  O_APPEND writes and mmap writes, on the open file, by path, and on SRC after `sync`;
- `safefs sync` makes the kernel send the pages of a file that is still open and was never
  fsynced, so they reach SRC;
- a closed (never fsynced) file survives kill -9: close() wrote its pages back first;
- a file changed on SRC behind the writer's back shows its new size at the next open,
  although the kernel never takes a cached file's size from the daemon again.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest

from tests.helpers import MountFactory, describe

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

KIB = 1 << 10
LONG_DELAY = ("--writeback-delay", "600")
NO_LOCK_DELAY = ("--lock-delay", "0")


def test_the_writer_has_the_writeback_cache_and_a_follower_not(mount_factory: MountFactory, tmp_path: Path) -> None:
    w = mount_factory(None, None, None, *LONG_DELAY)
    assert w.status()["kernel_writeback_cache"] is True
    f = mount_factory(w.src, None, None, *LONG_DELAY, host_id="other")
    status = f.status()
    assert status["role"] == "follower"
    assert status["kernel_writeback_cache"] is False


def test_size_and_times_while_the_kernel_owns_them(mount_factory: MountFactory) -> None:
    m = mount_factory(None, None, None, *LONG_DELAY)
    path = m.mnt / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        before = os.fstat(fd)
        time.sleep(0.02)  # mtime granularity: the write must move it
        os.pwrite(fd, b"a" * 5000, 0)
        st = os.fstat(fd)
        assert st.st_size == 5000
        assert st.st_mtime_ns > before.st_mtime_ns and st.st_ctime_ns > before.st_ctime_ns
        assert os.stat(path).st_size == 5000  # by path, from another request
        os.ftruncate(fd, 100_000)
        assert os.stat(path).st_size == 100_000
        os.ftruncate(fd, 3000)
        assert os.stat(path).st_size == 3000
        with mmap.mmap(fd, 3000) as mem:
            mem[0:5] = b"MMAP!"
            mem.flush()  # msync(MS_SYNC)
        assert os.stat(path).st_size == 3000
    finally:
        os.close(fd)
    with open(path, "ab") as f:
        f.write(b"tail1")
    with open(path, "ab") as f:
        f.write(b"tail2")
    expected = b"MMAP!" + b"a" * 2995 + b"tail1tail2"
    assert os.stat(path).st_size == len(expected)
    assert path.read_bytes() == expected
    mtime = os.stat(path).st_mtime_ns
    done = m.sync()
    assert done.returncode == 0, describe(done)
    assert (m.src / "f").read_bytes() == expected
    assert os.stat(path).st_size == len(expected)
    assert os.stat(path).st_mtime_ns == mtime, "the write-back moved the file's mtime"


@pytest.mark.parametrize("how", ["sync", "sync --release"])
def test_sync_sends_the_pages_of_a_file_still_open(mount_factory: MountFactory, how: str) -> None:
    m = mount_factory(None, None, None, *LONG_DELAY)
    data = os.urandom(300 * KIB)
    fd = os.open(m.mnt / "open", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # no fsync, no close: the pages may be in the kernel only
        done = m.sync(*how.split()[1:])
        assert done.returncode == 0, describe(done)
        assert (m.src / "open").read_bytes() == data, f"{how} left written pages behind in the kernel"
    finally:
        os.close(fd)


def test_a_closed_file_survives_kill_9(mount_factory: MountFactory) -> None:
    """G2: close() makes the kernel send the file's dirty pages (and wait for their answers)
    before it returns, although safefs has no FLUSH handler."""
    m = mount_factory(None, None, None, *LONG_DELAY)
    data = os.urandom(2 * 1024 * KIB + 7)
    with open(m.mnt / "closed", "wb") as f:
        f.write(data)
    m.kill()
    m2 = mount_factory(m.src, m.mnt, m.cache_dir, *LONG_DELAY, *NO_LOCK_DELAY)
    assert (m2.mnt / "closed").read_bytes() == data, "a closed file lost bytes to kill -9"


@pytest.mark.parametrize("change", ["grown", "shrunk"])
def test_a_change_on_src_shows_its_new_size(mount_factory: MountFactory, tmp_path: Path, change: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"old" * 1000)
    m = mount_factory(src, None, None, *LONG_DELAY)
    assert (m.mnt / "f").read_bytes() == b"old" * 1000  # the kernel now has the inode and its size
    new = b"new" * (2000 if change == "grown" else 10)
    before = os.stat(src / "f")
    (src / "f").write_bytes(new)
    os.utime(src / "f", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert (m.mnt / "f").read_bytes() == new
    assert os.stat(m.mnt / "f").st_size == len(new)
