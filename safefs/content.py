"""The cached contents of files: thread hops, inode locks, fetches from the backing tree,
dropping and eviction. Shared by the filesystem (fs.py) and the flusher (flusher.py), which
do not know each other; knows nothing of POSIX requests nor of write-back.

Invariants:
- Fetched bytes never overwrite bytes written meanwhile: a fetch reads the backing tree
  without a lock, then writes only the ranges still missing, under the inode's lock
  (`inode_locks`, the one lock table of inodes that fs and the flusher share).
- Only clean bytes are dropped: eviction skips dirty, new and open files.
- `cached_bytes_estimate` only decides when to count exactly (`maybe_evict`); it may drift.

Threading: trio thread. Calls into the backing tree run in worker threads behind the
`backing` limiter (they may hang on NFS): `in_backing` for calls that change the project
(never abandoned), `read_backing` for side-effect-free ones (abandoned after the backing
timeout). Local cache-file work runs inline (`in_cache`: page-cache work costs less than a
thread trip; see fs.py's docstring).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from safefs import ranges, records
from safefs.backing import Backing, Fingerprint
from safefs.cache import ContentCache
from safefs.config import MountConfig
from safefs.errors import FsError
from safefs.inodes import ROOT_INO, Inode, InodeTable
from safefs.lanes import ThreadLane
from safefs.locks import KeyedLocks

log = logging.getLogger(__name__)

T = TypeVar("T")
FETCH_BLOCK = 128 * 1024  # reads fetch whole aligned blocks of this size
WHOLE_FILE_FETCH = 1 << 20  # a read of a file this small fetches all of it (see fetch)


def fingerprint_tuple(fp: Fingerprint) -> tuple[int, int, int, int]:
    return (fp.ino, fp.size, fp.mtime_ns, fp.ctime_ns)


def same_content(seen: tuple[int, ...] | None, now: tuple[int, ...]) -> bool:
    """Is a backing file still the one safefs fetched or published (by its fingerprint)?

    The ctime is compared too: a rewrite that keeps the size and puts the mtime back
    (`rsync --inplace -t`, `touch -r`) still moves it. safefs's own renames, links and
    unlinks move it as well, so the flusher re-records the fingerprint after each of them.
    """
    return seen is not None and tuple(seen[:4]) == tuple(now[:4])


@dataclasses.dataclass
class Limiters:
    backing: trio.CapacityLimiter  # may hang on NFS: abandonable calls, with timeouts
    cache: trio.CapacityLimiter  # cache files, several at once (reads)
    journal: ThreadLane  # loading the journal at start-up
    flush: trio.CapacityLimiter  # device flushes (fsync of the journal and of cache files)

    @classmethod
    def create(cls) -> Limiters:
        return cls(trio.CapacityLimiter(8), trio.CapacityLimiter(8), ThreadLane("journal"), trio.CapacityLimiter(4))


@dataclasses.dataclass
class FsStats:
    fetches: int = 0
    cache_hits: int = 0
    evictions: int = 0


class Content:
    """The cached bytes of the mount's files, and the way to the backing tree's."""

    def __init__(
        self, table: InodeTable, cache: ContentCache, backing: Backing, config: MountConfig, limiters: Limiters
    ) -> None:
        self.table = table
        self.cache = cache
        self.backing = backing
        self.config = config
        self.limiters = limiters
        self.inode_locks = KeyedLocks()
        self.cached_bytes_estimate = 0
        self.stats = FsStats()
        # The kernel writeback cache is on: the kernel never takes a regular file's size or
        # mtime from us again once it has the inode, so a file changed on the backing tree
        # must become a new inode (see coherence.py), even when nobody has it open.
        self.kernel_owns_sizes = False

    # -- threads -------------------------------------------------------------------------
    async def in_backing(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiters.backing)

    async def in_cache(self, fn: Callable[..., T], *args: Any) -> T:
        """Local cache-file work (pread, pwrite, truncate, unlink, statvfs), run inline: it
        costs microseconds in the page cache, less than a thread trip (see fs.py's docstring)."""
        return fn(*args)

    async def read_backing(self, fn: Callable[..., T], *args: Any) -> T:
        """A side-effect-free call into the backing tree that fails with EIO after a timeout.

        The thread is abandoned on timeout (it may stay stuck in a hung NFS call), which is
        safe only because the call changes nothing.
        """
        with trio.move_on_after(self.config.backing_timeout):
            return await trio.to_thread.run_sync(
                fn, *args, limiter=self.limiters.backing, abandon_on_cancel=True
            )
        raise FsError(errno.EIO, "backing tree did not answer in time")

    async def on_backing(self, inode: Inode, fn: Callable[..., T], *args: Any) -> T:
        """`fn(backing_path_of(inode), *args)`, side-effect free, with the read timeout.

        The flusher moves the backing view one op at a time, and the object moves on the
        project before the view records it: a reader that resolved the path just before can
        miss it. Such a miss (while an op is being replayed, or after one was) is retried with
        the path resolved again; a miss with the view at rest is real.
        """
        for attempt in range(5):
            path = self.table.backing_path(inode.ino) if inode.ino != ROOT_INO else ()
            if path is None:
                raise FsError(errno.EIO, "the file is not on the backing tree")
            version, busy = self.table.view_version, self.table.view_busy
            try:
                return await self.read_backing(fn, path, *args)
            except (FileNotFoundError, NotADirectoryError):
                if not busy and version == self.table.view_version or attempt == 4:
                    raise
            await trio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    async def xattrs_of(self, inode: Inode) -> dict[bytes, bytes]:
        if inode.xattrs is None:
            path = self.table.backing_path(inode.ino) if inode.ino != ROOT_INO else ()
            found: dict[bytes, bytes] = {}
            if path is not None:
                try:
                    found = await self.read_backing(self.backing.getxattrs, path)
                except OSError as exc:
                    log.warning("fs: cannot read xattrs of %r: %s", path, exc)
            if inode.xattrs is None:
                inode.xattrs = found
                self.table.mark(inode)
        return inode.xattrs

    async def collect(self, inode: Inode) -> None:
        """Forget an inode nothing refers to any more, and its content file.

        The drop is left to the next commit: until then a restart finds the inode nameless,
        with no op naming it, and collects it again (the content file may be gone already).
        """
        if self.table.collectable(inode):
            self.table.drop(inode)
            self.cached_bytes_estimate -= ranges.total(inode.present)
            await self.in_cache(self.cache.delete, inode.ino)

    async def fetch(self, inode: Inode, start: int, end: int) -> None:
        """Bring [start, end) of a file into the cache from the backing tree.

        A small file (up to WHOLE_FILE_FETCH) comes whole, in one read of the span of its
        gaps: a cold read of it is one worker trip (the store, the journal record and the
        reply's pread run inline), and no later read of it goes to the project.
        """
        small = inode.size <= WHOLE_FILE_FETCH
        if small:
            start, end = 0, inode.size
        start -= start % FETCH_BLOCK
        end = min(inode.size, end + (-end % FETCH_BLOCK))
        todo = inode.gaps(records.PRESENT, start, end)
        if not todo:
            return
        if small:  # present bytes in between are read again but not stored: one trip
            todo = [(todo[0][0], todo[-1][1])]
        if self.table.backing_path(inode.ino) is None:
            raise FsError(errno.EIO, "bytes of a file not on the backing tree are missing")
        self.stats.fetches += 1
        for lo, hi in todo:
            data = await self.on_backing(inode, self.backing.read, lo, hi - lo)
            if len(data) < hi - lo:  # the file shrank behind our back: the rest reads as zeros
                data += bytes(hi - lo - len(data))
            async with self.inode_locks(inode.ino):
                for s, e in inode.gaps(records.PRESENT, lo, min(hi, inode.size)):
                    await self.in_cache(self.cache.pwrite, inode.ino, s, data[s - lo : e - lo])
                    inode.add_present(s, e)
                    self.cached_bytes_estimate += e - s
                self.table.mark(inode)
        # No transaction of its own: a cold read of many small files would pay one per file.
        # The next commit, or the journal's sync within a second (mount/process.py), carries
        # it; a crash before that costs a second fetch, never a wrong byte (the content file
        # holds the bytes before the record says so).
        await self.maybe_evict()

    async def fill(self, inode: Inode) -> None:
        """Make every byte of the file present in the cache (before publishing or losing its name)."""
        if inode.is_reg and not inode.complete:
            await self.fetch(inode, 0, inode.size)

    # -- eviction ------------------------------------------------------------------------
    async def maybe_evict(self, *, force: bool = False) -> None:
        """Drop clean cached files, least recently used first, while the cache is too big."""
        limit = self.config.cache_size
        if not force and self.cached_bytes_estimate <= limit:
            return
        table = self.table
        total = sum(ranges.total(i.present) for i in table.inodes.values())
        self.cached_bytes_estimate = total
        if not force and total <= limit:
            return
        candidates = [
            i for i in table.inodes.values()
            if i.is_reg and i.present and not i.dirty and not i.new and i.opens <= 0 and not i.attr_dirty
        ]  # fmt: skip
        candidates.sort(key=lambda i: i.accessed_at)
        target = limit * 0.9 if not force else max(0, total - 64 * (1 << 20))
        for inode in candidates:
            if total <= target:
                break
            async with self.inode_locks(inode.ino):
                if inode.dirty or inode.opens > 0:
                    continue
                await self.in_cache(self.cache.delete, inode.ino)
                freed = table.drop_present(inode)
            total -= freed
            self.stats.evictions += 1
        self.cached_bytes_estimate = total
        await table.commit()

    def cached_bytes(self) -> int:
        return sum(ranges.total(i.present) for i in self.table.inodes.values())
