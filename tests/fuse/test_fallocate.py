"""fallocate through a real mount (issue 9, item 13; README "What is not promised").

pyfuse3 (3.5, the version installed) registers no fallocate handler with libfuse, so the
kernel's FUSE_FALLOCATE gets ENOSYS from libfuse and the kernel answers `fallocate(2)` with
EOPNOTSUPP, for every mode, from then on. What these tests check:
- every fallocate(2) mode answers EOPNOTSUPP, changes nothing, and the mount keeps working;
- posix_fallocate(3), which glibc then emulates by writing zeros, extends the file, keeps the
  bytes that were there, and the result reaches SRC at write-back.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from tests.helpers import Mount, describe, write_file

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]

KIB = 1 << 10

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40

MODES = {
    "0": 0,
    "KEEP_SIZE": FALLOC_FL_KEEP_SIZE,
    "PUNCH_HOLE": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "ZERO_RANGE": FALLOC_FL_ZERO_RANGE,
    "ZERO_RANGE|KEEP_SIZE": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
    "COLLAPSE_RANGE": FALLOC_FL_COLLAPSE_RANGE,
    "INSERT_RANGE": FALLOC_FL_INSERT_RANGE,
    "UNSHARE_RANGE": FALLOC_FL_UNSHARE_RANGE,
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """0, or the errno of fallocate(2)."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return 0
    return ctypes.get_errno()


def test_fallocate_modes_answer_eopnotsupp_and_change_nothing(mounted: Mount) -> None:
    path = mounted.mnt / "f"
    data = os.urandom(64 * KIB)
    write_file(path, data)
    fd = os.open(path, os.O_RDWR)
    try:
        for name, mode in MODES.items():
            for offset, length in ((0, 4 * KIB), (16 * KIB, 128 * KIB)):
                code = fallocate(fd, mode, offset, length)
                assert code == errno.EOPNOTSUPP, f"fallocate mode {name} [{offset}, +{length}): errno {code}"
        assert os.fstat(fd).st_size == len(data)
        assert os.pread(fd, len(data) + 1, 0) == data
        os.pwrite(fd, b"still writable", 0)  # the mount keeps serving the file
    finally:
        os.close(fd)
    done = mounted.sync()
    assert done.returncode == 0, describe(done)
    assert (mounted.src / "f").read_bytes() == b"still writable" + data[14:]
    assert mounted.alive


def test_posix_fallocate_extends_the_file_and_reaches_the_project(mounted: Mount) -> None:
    path = mounted.mnt / "grown"
    head = os.urandom(10 * KIB)
    write_file(path, head)
    fd = os.open(path, os.O_RDWR)  # glibc's emulation reads before it writes: not O_WRONLY
    try:
        os.posix_fallocate(fd, 0, 1024 * KIB)
        assert os.fstat(fd).st_size == 1024 * KIB
        os.posix_fallocate(fd, 0, 4 * KIB)  # inside the file: no change
        assert os.fstat(fd).st_size == 1024 * KIB
        os.fsync(fd)
    finally:
        os.close(fd)
    expected = head + bytes(1024 * KIB - len(head))
    assert path.read_bytes() == expected
    done = mounted.sync()
    assert done.returncode == 0, describe(done)
    assert (mounted.src / "grown").read_bytes() == expected
    done = mounted.umount()
    assert (mounted.src / "grown").read_bytes() == expected
