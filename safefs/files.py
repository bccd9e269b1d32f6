"""Open files: the handles the kernel holds, and the reads, writes, truncations, attribute
changes and flushes of files through the mount (fs.py hands these requests here).

Invariants:
- Nothing changes unless `gate.require_writable()` allowed it at the start of the request.
- A write is acknowledged only after its bytes are in the cache file and the journal knows
  the range is dirty (`InodeTable.commit_with`), or knew it already (an overwrite of dirty
  bytes); the first overwrite of bytes the project has is recorded as "may be dirty"
  (`unclean`) before the cache file changes. A file with no name (`InodeTable.nameless`) is
  the exception: the next start drops it, so its writes, attributes and fsyncs make nothing
  durable.
- A file's bytes change only under its inode lock (content.py), so fetched bytes never
  overwrite bytes written meanwhile; a read waits for writes still on their way.
- A small file is whole in the cache before it first differs from the project's
  (`_whole_before_diverging`), and a follower's open file is one version (`_snapshot`).
- Handle numbers are never reused while the mount runs; directories take theirs here too
  (`new_fh`), so file and directory handles never share a number.

Threading: trio thread only. Cache-file reads and writes and journal commits run inline (see
fs.py); backing-tree reads go through Content (worker threads, behind the backing limiter);
fsync's device flushes run in worker threads (`InodeTable.sync`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable
from typing import Any

from safefs import kernel_cache, records
from safefs.cache import ContentCache
from safefs.clock import Clock
from safefs.coherence import Coherence
from safefs.config import MountConfig
from safefs.content import Content
from safefs.errors import CacheFull, FsError
from safefs.inodes import Inode, InodeTable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Handle:
    ino: int
    flags: int


class Files:
    """The mount's open files and what is done to a file through it."""

    def __init__(
        self,
        table: InodeTable,
        cache: ContentCache,
        config: MountConfig,
        clock: Clock,
        content: Content,
        coherence: Coherence,
        gate: Any,
    ) -> None:
        self.table = table
        self.cache = cache
        self.config = config
        self.clock = clock
        self.content = content
        self.coherence = coherence
        self.gate = gate
        self.inode_locks = content.inode_locks
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.follower = False  # no local changes at all; the kernel must not keep pages (Filesystem.on_role)
        self.on_change: Callable[[], None] = lambda: None  # the daemon wires the flusher's poke here

    def new_fh(self) -> int:
        """A handle number for a file or a directory (fs.opendir)."""
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _changed(self, inode: Inode, *, data: bool = False, attrs: bool = False, times_only: bool = False) -> None:
        self.table.mark_changed(
            inode, self.clock.wall_ns(), self.clock.monotonic(), data=data, attrs=attrs, times_only=times_only
        )

    def open_handle(self, inode: Inode, flags: int) -> int:
        fh = self.new_fh()
        self._handles[fh] = Handle(inode.ino, flags)
        inode.opens += 1
        return fh

    def handle_inode(self, fh: int) -> Inode:
        try:
            return self.table.get(self._handles[fh].ino)
        except KeyError:
            raise FsError(errno.EBADF) from None

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file; returns (handle, whether the kernel may keep its cached pages)."""
        inode = self.table.get(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            self.gate.require_writable()
        unchanged = None  # the fingerprint check, made for a clean file with cached bytes
        if inode.is_reg and inode.present and not inode.needs_flush and not inode.new:
            unchanged = not await self.coherence.revalidate(inode)
        keep = kernel_cache.keep_pages(follower=self.follower, unchanged=unchanged)
        if self.follower and inode.is_reg and not inode.complete and inode.size <= self.config.publish_threshold:
            await self._snapshot(inode)
        if flags & os.O_TRUNC and inode.is_reg:
            # libfuse negotiates atomic O_TRUNC: the kernel leaves the truncation to us.
            async with self.inode_locks(ino):
                await self._truncate(inode, 0)
            await self.table.commit()
            self.on_change()
        return self.open_handle(inode, flags), keep

    async def _snapshot(self, inode: Inode) -> None:
        """A follower opening a file: fetch all of it now, from one version.

        The writer publishes a file by renaming a whole new one over it (G5). Fetched lazily,
        an open file could get some blocks from the old version and later ones from the new:
        a torn file. Fetched whole at open, with the backing file's fingerprint the same before
        and after, the open file is one version for as long as it stays open (a newer one gets
        a new inode at the next refresh; this one lives on until released, as on a local disk).
        Files above `publish_threshold` are written back in place, by ranges, and not fetched
        whole here: nothing atomic is promised for them.
        """
        for _ in range(3):
            await self.coherence.revalidate(inode)  # take the file as it is now
            await self.content.fill(inode)
            if not await self.coherence.revalidate(inode):
                return  # unchanged while we fetched: one version
        log.warning("fs: %r kept changing while fetched; serving the last fetch",
                    self.table.backing_path(inode.ino))  # fmt: skip

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        inode = self.handle_inode(fh)
        end = min(offset + size, inode.size)
        if offset >= end:
            return b""
        inode.accessed_at = self.clock.monotonic()
        if inode.writing:  # a write's bytes may still be on their way into the cache file
            async with self.inode_locks(inode.ino):
                pass
        if inode.gaps(records.PRESENT, offset, end):
            await self.content.fetch(inode, offset, end)
        else:
            self.content.stats.cache_hits += 1
        return await self.content.in_cache(self.cache.pread, inode.ino, offset, end - offset)

    async def _whole_before_diverging(self, inode: Inode) -> None:
        """Fetch the rest of a small file before a change through the mount.

        Once our version differs from the project's, the project's may change too (someone
        edits it on NFS). The conflict copy must then be our version, and bytes we never
        fetched would have to come from theirs: after that edit the original is nowhere.
        Files above `publish_threshold` are written back by ranges and stay lazily fetched;
        a conflict copy of one may mix in their bytes where ours were never read.
        """
        # Cheap tests first: this runs on every write.
        if inode.is_reg and not inode.new and inode.size <= self.config.publish_threshold and not inode.complete:
            await self.content.fill(inode)

    def _reserve(self, nbytes: int, *, sparse: bool = False) -> None:
        """Refuse a write with ENOSPC before it could fill the cache disk."""
        if sparse:
            return
        if self.cache.free_bytes() < nbytes:
            raise CacheFull("no space left in the cache for more dirty data")
        self.cache.charge(nbytes)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        self.gate.require_writable()
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        inode = self.table.get(handle.ino)
        await self._whole_before_diverging(inode)
        if self.cache.free_space_stale():  # at most twice a second
            await self.content.in_cache(self.cache.refresh_free_space)
        if self.cache.free_bytes() < len(data):
            await self.content.maybe_evict(force=True)
            await self.content.in_cache(self.cache.refresh_free_space)  # count what eviction freed
        self._reserve(len(data))
        async with self.inode_locks(inode.ino):
            if handle.flags & os.O_APPEND and not self.content.kernel_owns_sizes:
                # With the writeback cache the kernel resolved O_APPEND itself, and its WRITEs
                # carry pages of any writer (an mmap too) through whichever handle it picks.
                offset = inode.size
            end = offset + len(data)
            # A file without a name is dropped at the next start (InodeTable.nameless): its
            # bytes need no record before the answer, and the next commit carries them.
            lasting = not self.table.nameless(inode)
            ahead = None
            if lasting and not inode.unclean and inode.gaps(records.DIRTY, offset, min(end, inode.size)):
                # The first overwrite of bytes the project already has: record "may be dirty"
                # before they change, so a kill between the cache write and its commit cannot
                # leave the cache and the project different with nothing marked to write back
                # (replay takes the file's present bytes for dirty). Later writes need no such
                # commit ahead, until a write-back leaves the file clean again.
                self.table.mark_unclean(inode)
                ahead = self.table.render_ahead()
            saved = (inode.size, inode.mtime_ns, inode.ctime_ns)
            changes = []
            if offset > inode.size:  # the gap reads as zeros; the backing file's grows alike
                # The content file may hold bytes past the end that no record names (fetched
                # before the file shrank, their record lost in a crash): cut them first, as a
                # truncate that grows the file does.
                self.cache.cut(inode.ino, inode.size)
                changes.append(inode.add_present(inode.size, offset))
            grown = end - offset if inode.gaps(records.PRESENT, offset, end) else 0
            changes.append(inode.add_present(offset, end))
            changes.append(inode.add_dirty(offset, end))
            inode.size = max(inode.size, end)
            # An overwrite of bytes already recorded dirty changes nothing the journal keeps
            # but the file's times: the bytes' record is committed already, so the write is
            # answered once they are in the cache file (the times go with the next commit).
            rewrite = ahead is None and inode.size == saved[0] and not any(changes)
            self._changed(inode, data=True, times_only=rewrite)
            # The journal learns of the bytes in the same step that writes them; until it
            # returns, reads of this inode wait for the lock (see `read`).
            inode.writing += 1
            try:
                if rewrite or not lasting:
                    self.cache.pwrite(inode.ino, offset, data)
                else:
                    await self.table.commit_with(
                        functools.partial(self.cache.pwrite, inode.ino, offset, data), ahead=ahead
                    )
            except BaseException:
                inode.undo(changes)
                inode.size, inode.mtime_ns, inode.ctime_ns = saved
                self.table.mark(inode)
                raise
            finally:
                inode.writing -= 1
            self.content.cached_bytes_estimate += grown
        self.on_change()
        return len(data)

    async def fsync(self, fh: int, *, datasync: bool = False) -> None:
        inode = self.handle_inode(fh)
        if self.table.nameless(inode):
            return  # unlinked: gone after a crash whatever is flushed (as on a local disk)
        await self.table.sync(functools.partial(self.cache.fsync, inode.ino), data_of=inode if datasync else None)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        inode = self.table.inodes.get(handle.ino)
        if inode is not None:
            inode.opens -= 1
            await self.content.collect(inode)

    def open_files(self) -> int:
        """How many files the kernel holds open through this mount (a lazy unmount waits for them)."""
        return len(self._handles)

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Inode:
        self.gate.require_writable()
        inode = self.table.get(ino)
        if size is not None:
            if inode.is_dir:
                raise FsError(errno.EISDIR)
            if not inode.is_reg:
                raise FsError(errno.EINVAL)
            if size:
                await self._whole_before_diverging(inode)
            async with self.inode_locks(ino):
                await self._truncate(inode, size)
        if mode is not None:
            inode.mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
        if uid is not None and uid != 0xFFFFFFFF:
            inode.uid = uid
        if gid is not None and gid != 0xFFFFFFFF:
            inode.gid = gid
        if atime_ns is not None:
            inode.atime_ns = atime_ns
        if mtime_ns is not None:
            inode.mtime_ns = mtime_ns
        # The kernel sends the times of a file it wrote before each fsync and close.
        times_only = size is None and mode is None and uid in (None, 0xFFFFFFFF) and gid in (None, 0xFFFFFFFF)
        self._changed(inode, attrs=True, times_only=times_only)
        if self.table.nameless(inode):
            # Unlinked (the kernel sends the times of every file it removed as it lets go of
            # it): nothing publishes its attributes, and a restart drops it, so the change
            # needs no commit of its own; the next commit carries it.
            return inode
        await self.table.commit()
        self.on_change()
        return inode

    async def _truncate(self, inode: Inode, size: int) -> None:
        """Change a file's size; called under the inode lock."""
        old = inode.size
        if size == old:
            inode.mtime_ns = self.clock.wall_ns()
            return
        if size > old:
            self._reserve(size - old, sparse=True)
            # The cache file may hold stale bytes past the old end (fetched before a shrink
            # elsewhere); cut them so the new region reads as zeros.
            await self.content.in_cache(self._extend_cache_file, inode.ino, old, size)
            # Present (as zeros) but not dirty: the backing file grows by a truncate too.
            self.table.mark_zeros_present(inode, old, size)
        else:
            self.table.truncate_ranges(inode, size)
            inode.size = size
            self._changed(inode, data=True, attrs=True)
            # The journal first: killed in between, a longer cache file is harmless (bytes
            # past the size are never read), a shorter one under the old size is not.
            await self.table.commit()
            await self.content.in_cache(self.cache.truncate, inode.ino, size)
            return
        inode.size = size
        self._changed(inode, data=True, attrs=True)

    def _extend_cache_file(self, ino: int, old: int, size: int) -> None:
        self.cache.cut(ino, old)
        self.cache.truncate(ino, size)
