"""File contents on the host's local disk: one sparse file per inode under `<cache>/data/`.

The cache only stores bytes. Which byte ranges of a file are present or dirty is the
journal's business (see inodes.Inode.present / .dirty); this module never decides it.

Invariants:
- A content file is named after its inode number and is created mode 0600.
- Bytes written with `pwrite` are in the OS page cache when it returns (they survive a killed
  daemon); `fsync` makes them durable.
- Open file descriptors are kept in a small table so hot files are not reopened on every
  request; a descriptor leaves the table when the file is deleted or the table is full
  (least recently used first).
- A descriptor is closed only when it is out of the table and no one has it pinned: a
  descriptor in use (`pin`/`unpin`, `pinned`, and every method here) is never closed, so its
  number is never reused for another file under its user.

Threading: methods run inline on the trio thread (content.Content.in_cache): pread, pwrite,
truncate and unlink work in the page cache and return in microseconds; they block only while
the kernel throttles a disk flooded with dirty pages. `fsync` waits for the device and runs in
a worker thread (InodeTable.sync) while the trio thread goes on writing, so the descriptor
table and the set of files written since their last fsync are guarded by a threading lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from safefs.errors import CacheFull

log = logging.getLogger(__name__)

MAX_OPEN_FILES = 256


class ContentCache:
    def __init__(self, cache_dir: Path, free_space_floor: int) -> None:
        self.data_dir = cache_dir / "data"
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self._floor = free_space_floor
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pins: dict[int, int] = {}  # fd -> how many users have it pinned
        self._retired: set[int] = set()  # pinned fds out of the table: closed at the last unpin
        # Inodes whose content file this process fsynced and has not changed since. Not the
        # other way round: a file written before a restart may still sit in the page cache.
        self._synced: set[int] = set()
        self._lock = threading.Lock()
        self._free_checked_at = 0.0
        self._free_bytes = 0
        self._effective_floor = free_space_floor
        self._nearly_full = False  # warned that the disk is nearly full (re-armed once it is not)

    def path(self, ino: int) -> Path:
        return self.data_dir / f"{ino:x}"

    def fd(self, ino: int) -> int:
        """An open read-write descriptor of the inode's content file (created if missing).

        The caller must not close it. It stays valid only until another call may push it out
        of the table: a caller that uses it across other cache calls pins it (`pinned`).
        """
        with self._lock:
            return self._fd_locked(ino)

    def _fd_locked(self, ino: int) -> int:
        fd = self._fds.get(ino)
        if fd is not None:
            self._fds.move_to_end(ino)
            return fd
        fd = os.open(self.path(ino), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fds[ino] = fd
        while len(self._fds) > MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            self._retire_locked(old)
        return fd

    def _retire_locked(self, fd: int) -> None:
        """`fd` has left the table: close it now, or at its last unpin if it is in use."""
        if fd in self._pins:
            self._retired.add(fd)
        else:
            os.close(fd)

    def pin(self, ino: int) -> int:
        """The inode's descriptor, kept open until the matching `unpin(fd)`."""
        with self._lock:
            fd = self._fd_locked(ino)
            self._pins[fd] = self._pins.get(fd, 0) + 1
            return fd

    def unpin(self, fd: int) -> None:
        with self._lock:
            count = self._pins.pop(fd) - 1
            if count:
                self._pins[fd] = count
            elif fd in self._retired:
                self._retired.discard(fd)
                os.close(fd)

    @contextlib.contextmanager
    def pinned(self, ino: int) -> Iterator[int]:
        fd = self.pin(ino)
        try:
            yield fd
        finally:
            self.unpin(fd)

    def pread(self, ino: int, offset: int, size: int) -> bytes:
        with self.pinned(ino) as fd:
            return self._pread(fd, offset, size)

    @staticmethod
    def _pread(fd: int, offset: int, size: int) -> bytes:
        chunks = []
        while size > 0:
            chunk = os.pread(fd, size, offset)
            if not chunk:  # a hole at the end of a sparse file reads as zeros
                chunks.append(bytes(size))
                break
            chunks.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def pwrite(self, ino: int, offset: int, data: bytes) -> None:
        self._changed(ino)
        view = memoryview(data)
        try:
            with self.pinned(ino) as fd:
                while view:
                    n = os.pwrite(fd, view, offset)
                    view = view[n:]
                    offset += n
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFull("cache: local disk full") from exc
            raise

    def cut(self, ino: int, size: int) -> None:
        """Drop what the content file holds past `size`, bytes no record names (fetched before
        a crash lost their record, say). Costs an fstat when there are none, as there almost
        always are none: no ftruncate, which the local filesystem would journal."""
        with self.pinned(ino) as fd:
            if os.fstat(fd).st_size > size:
                self._changed(ino)
                os.ftruncate(fd, size)

    def truncate(self, ino: int, size: int) -> None:
        self._changed(ino)
        with self.pinned(ino) as fd:
            os.ftruncate(fd, size)

    def _changed(self, ino: int) -> None:
        """Before a change of the content file: the next `fsync` of it must flush."""
        with self._lock:
            self._synced.discard(ino)

    def fsync(self, ino: int) -> None:
        """Make the content file durable; a file unchanged since its last fsync costs nothing.

        An fdatasync: the bytes and the length are what the cache keeps of a content file;
        its own times mean nothing (the journal holds the file's), and flushing them would
        cost the local filesystem a journal commit on every call.

        The file counts as synced from before the flush starts, so a change made while it
        runs unmarks it and is flushed by the next fsync, never forgotten."""
        with self._lock:
            if ino in self._synced:
                return
            self._synced.add(ino)
            fd = self._fds.get(ino)
            if fd is not None:
                self._pins[fd] = self._pins.get(fd, 0) + 1
        try:
            if fd is not None:
                try:
                    os.fdatasync(fd)
                finally:
                    self.unpin(fd)
            elif self.path(ino).exists():
                fd = os.open(self.path(ino), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        except BaseException:
            self._changed(ino)
            raise

    def delete(self, ino: int) -> None:
        with self._lock:
            fd = self._fds.pop(ino, None)
            self._synced.discard(ino)
            if fd is not None:
                self._retire_locked(fd)
        try:
            os.unlink(self.path(ino))
        except FileNotFoundError:
            pass

    def free_space_stale(self, max_age: float = 0.5) -> bool:
        """Is the free-space estimate older than `max_age` seconds (see refresh_free_space)?"""
        return time.monotonic() - self._free_checked_at > max_age

    def refresh_free_space(self) -> None:
        """Ask the disk how much space is free (blocks: statvfs)."""
        st = os.statvfs(self.data_dir)
        self._free_bytes = st.f_bavail * st.f_frsize
        # The floor keeps the disk usable for everyone else, but on a small disk a fixed
        # floor would refuse every write: at most a tenth of the disk.
        self._effective_floor = min(self._floor, st.f_blocks * st.f_frsize // 10)
        self._free_checked_at = time.monotonic()
        nearly_full = self._free_bytes < 2 * self._effective_floor
        if nearly_full and not self._nearly_full:
            log.warning("cache: the cache disk of %s is nearly full (%d MiB free); writes fail with "
                        "ENOSPC below %d MiB free until the write-back or freed space makes room",
                        self.data_dir.parent, self._free_bytes >> 20, self._effective_floor >> 20)  # fmt: skip
        self._nearly_full = nearly_full

    def free_bytes(self) -> int:
        """Bytes the cache may still use on its disk (free space minus the floor), as of the
        last refresh_free_space and the writes charged since. Never blocks."""
        return self._free_bytes - self._effective_floor

    def charge(self, nbytes: int) -> None:
        """Account for bytes just written, so the next free-space estimate is not stale."""
        self._free_bytes -= nbytes

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.data_dir)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                self._retire_locked(fd)
            self._fds.clear()
