"""tests/faultfs.py works: it passes bytes and names through, injects errors, hangs and
releases operations, delays them measurably, and always unmounts when stopped.

Each test mounts its own faultfs over tmp_path/real at tmp_path/nfs; the `nfs` fixture stops it
(lazy unmount, reap) and checks it is unmounted, whatever happens.
"""

from __future__ import annotations

import errno
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.faultfs import FaultFS, FaultFSError
from tests.helpers import is_mounted

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(60)]


@pytest.fixture
def ffs(nfs: FaultFS) -> FaultFS:
    """The fuse tier's FaultFS (tests/fuse/conftest.py `nfs`), under the name these tests use."""
    return nfs


def test_bytes_and_names_pass_through(ffs: FaultFS) -> None:
    real, mnt = ffs.real, ffs.mnt
    (real / "from-real").write_bytes(b"written on the export")
    assert (mnt / "from-real").read_bytes() == b"written on the export"

    data = os.urandom(3 * 1024 * 1024 + 17)
    (mnt / "dir" / "sub").mkdir(parents=True)
    with open(mnt / "dir" / "sub" / "f", "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    assert (real / "dir" / "sub" / "f").read_bytes() == data
    assert os.stat(mnt / "dir" / "sub" / "f").st_ino == os.stat(real / "dir" / "sub" / "f").st_ino

    os.rename(mnt / "dir", mnt / "moved")
    assert (mnt / "moved" / "sub" / "f").read_bytes() == data
    os.link(mnt / "moved" / "sub" / "f", mnt / "hard")
    os.symlink("moved/sub/f", mnt / "soft")
    assert os.stat(mnt / "hard").st_nlink == 2
    assert os.readlink(mnt / "soft") == "moved/sub/f"
    os.setxattr(mnt / "hard", "user.k", b"v")
    assert os.getxattr(real / "moved" / "sub" / "f", "user.k") == b"v"
    os.truncate(mnt / "hard", 5)
    assert (real / "hard").read_bytes() == data[:5]
    os.utime(mnt / "hard", ns=(1_000_000_001, 2_000_000_002))
    assert os.stat(real / "hard").st_mtime_ns == 2_000_000_002

    name = b"not-utf8-\xff"
    (mnt / os.fsdecode(name)).write_bytes(b"x")
    assert name in os.listdir(os.fsencode(real))
    assert sorted(os.listdir(mnt)) == sorted(os.listdir(real))

    os.unlink(mnt / "soft")
    (real / "gone").mkdir()
    os.rmdir(mnt / "gone")
    assert not (real / "soft").exists() and not (real / "gone").exists()


def test_rename_flags_pass_through(ffs: FaultFS) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    (ffs.mnt / "a").write_bytes(b"A")
    (ffs.mnt / "b").write_bytes(b"B")
    noreplace, exchange = 1, 2
    assert libc.renameat2(-100, bytes(ffs.mnt / "a"), -100, bytes(ffs.mnt / "b"), noreplace) == -1
    assert ctypes.get_errno() == errno.EEXIST
    assert libc.renameat2(-100, bytes(ffs.mnt / "a"), -100, bytes(ffs.mnt / "b"), exchange) == 0
    assert (ffs.real / "a").read_bytes() == b"B" and (ffs.real / "b").read_bytes() == b"A"


def test_injected_errors_hit_only_what_they_name(ffs: FaultFS) -> None:
    (ffs.real / "bad").mkdir()
    (ffs.real / "bad" / "f").write_bytes(b"data")
    (ffs.real / "good").write_bytes(b"data")

    ffs.fail("read", "EIO", "/bad")
    with pytest.raises(OSError) as caught:
        (ffs.mnt / "bad" / "f").read_bytes()
    assert caught.value.errno == errno.EIO
    assert (ffs.mnt / "good").read_bytes() == b"data"

    ffs.fail("create", "ENOSPC", "/bad")
    with pytest.raises(OSError) as caught:
        (ffs.mnt / "bad" / "new").write_bytes(b"x")
    assert caught.value.errno == errno.ENOSPC
    assert not (ffs.real / "bad" / "new").exists()  # a failed operation had no effect

    ffs.fail("open", "EACCES", "/good", times=1)
    with pytest.raises(PermissionError):
        (ffs.mnt / "good").read_bytes()
    assert (ffs.mnt / "good").read_bytes() == b"data"  # times=1: only once

    ffs.fail("getattr,lookup", "ESTALE")
    with pytest.raises(OSError) as caught:
        os.stat(ffs.mnt / "good")
    assert caught.value.errno == errno.ESTALE

    counters = ffs.counters()
    assert counters["failed"]["read"] >= 1 and counters["failed"]["create"] == 1  # the kernel may retry a read
    ffs.clear()
    assert (ffs.mnt / "bad" / "f").read_bytes() == b"data"
    with pytest.raises(FaultFSError):
        ffs.fail("read", "ENOTANERRNO")


def test_hang_holds_an_operation_until_released(ffs: FaultFS) -> None:
    (ffs.real / "slow").write_bytes(b"eventually")
    (ffs.real / "other").write_bytes(b"meanwhile")
    ffs.hang("read", "/slow")
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit((ffs.mnt / "slow").read_bytes)
        ffs.wait_hung(1)
        # The rest of the filesystem keeps answering while one request is held.
        assert (ffs.mnt / "other").read_bytes() == b"meanwhile"
        time.sleep(0.2)
        assert not pending.done()
        assert ffs.release() == 1
        assert pending.result(timeout=10) == b"eventually"
    assert ffs.counters()["hung_total"] == 1


def test_stop_unmounts_even_with_a_hung_operation(tmp_path: Path) -> None:
    real, mnt = tmp_path / "real", tmp_path / "mnt"
    real.mkdir()
    mnt.mkdir()
    (real / "f").write_bytes(b"x")
    fs = FaultFS.start(real, mnt)
    try:
        fs.hang("getattr,lookup,open")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(os.stat, mnt / "f")
            fs.wait_hung(1)
            assert fs.stop() == []
            assert not is_mounted(mnt)
            assert fs.proc.poll() is not None
            pending.exception(timeout=10)  # answered (or failed), not stuck
    finally:
        fs.stop()


def test_latency_is_measurable(ffs: FaultFS) -> None:
    (ffs.real / "f").write_bytes(b"x")

    def stat_seconds() -> float:
        start = time.monotonic()
        for _ in range(5):
            os.stat(ffs.mnt / "f")
        return (time.monotonic() - start) / 5

    ffs.latency(30, "meta")
    slow = stat_seconds()
    ffs.latency(0)
    fast = stat_seconds()
    assert slow >= 0.030  # at least the lookup paid it (entry and attr timeouts are 0)
    assert fast < slow / 2
    assert ffs.counters()["latency_ms"] == {"meta": 0.0, "data": 0.0}


def test_out_of_band_changes_answer_like_nfs(ffs: FaultFS) -> None:
    (ffs.mnt / "f").write_bytes(b"12345")
    with open(ffs.mnt / "f", "rb") as held:
        os.unlink(ffs.real / "f")  # deleted on the export behind the client's back
        assert os.fstat(held.fileno()).st_size == 5  # an open file keeps its attributes
        assert held.read() == b"12345"
    with pytest.raises(FileNotFoundError):
        os.stat(ffs.mnt / "f")
