"""The cache's table of open files never closes a descriptor in use (issue 9, item 12).

The cache keeps at most 256 content files open and closes the least recently used one when
another is needed. Write-back copies from a content file's descriptor in a worker thread; if
the table closed that descriptor meanwhile, the kernel would hand its number to the next file
opened and the copy would read another file's bytes (or EBADF). The test makes the window
wide: SRC is a faultfs mount (tests/faultfs.py) that holds the write-back's first write to the
staging file, then more than 256 other files are opened and read through the mount (each read
opens a content file in the cache), then SRC lets the write-back go on. The bytes that reach
SRC must be exactly the file's.
"""

from __future__ import annotations

import os

import pytest

from tests.faultfs import FaultFS
from tests.helpers import MountFactory, describe, write_file

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

MIB = 1 << 20
OTHERS = 300  # more than cache.MAX_OPEN_FILES


def test_write_back_while_more_than_256_other_files_are_open(nfs: FaultFS, mount_factory: MountFactory) -> None:
    (nfs.real / "others").mkdir()
    for i in range(OTHERS):
        (nfs.real / "others" / f"f{i}").write_bytes(b"other %d\n" % i)
    m = mount_factory(nfs.mnt, None, None, "--writeback-delay", "0.2", "--lease-break", "900")
    try:
        # Several copy chunks (backing._COPY_CHUNK is 1 MiB): the copy goes on reading the
        # descriptor after the held write.
        data = os.urandom(4 * MIB)
        nfs.hang("write", "/.safefs/staging", times=1)
        write_file(m.mnt / "big", data)
        nfs.wait_hung(1, timeout=60)  # write-back holds the descriptor of big's content file

        opened = []
        try:
            for i in range(OTHERS):
                fd = os.open(m.mnt / "others" / f"f{i}", os.O_RDONLY)
                opened.append(fd)
                assert os.read(fd, 64) == b"other %d\n" % i
            nfs.release()
            done = m.sync(timeout=120)
            assert done.returncode == 0, describe(done)
            assert (nfs.real / "big").read_bytes() == data
            for i, fd in enumerate(opened):  # the open files still read their own bytes
                assert os.pread(fd, 64, 0) == b"other %d\n" % i
        finally:
            for fd in opened:
                os.close(fd)
    finally:
        nfs.clear()
    done = m.umount()
    assert done.returncode == 0, describe(done)
    assert (nfs.real / "big").read_bytes() == data
