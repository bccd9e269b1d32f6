"""POSIX semantics of the mount, served from the local cache. Knows nothing of pyfuse3.

Every request of the kernel becomes one method here; those on open files and a file's
attributes (open, read, write, fsync, release, setattr) are carried out by files.py. Changes
land in the cache (content files and the inode table) and are acknowledged once the journal
has committed them; the flusher (flusher.py) carries them to the backing tree later. Reads
of bytes not yet in the cache fetch just the blocks they need from the backing tree.

Invariants:
- Nothing changes the namespace or content unless `lease.require_writable()` allowed it at
  the start of the request (the seam where the lease plugs in; until then always yes).
- A write is acknowledged only after its bytes are in the cache file and the journal knows
  the range is dirty (`InodeTable.commit`).
- Every namespace change appends an op to the journal's log in the same commit that changes
  the cache view, so the backing tree can be brought to the same state by replaying it.
- Fetched bytes never overwrite bytes written meanwhile (content.py: fetches, eviction, the
  inode locks and the thread hops, shared with the flusher, which does not know this module
  and hears of changes only through `on_change`).
- The root of the project's `.safefs` control directory is invisible and cannot be created.
- The kernel caches an absent name only while it is remembered (`note_absent`, negative.py); a
  name that may have appeared behind the kernel's back (a refreshed or distrusted directory)
  has its absence invalidated before anyone can act on it (coherence.py: listing, refresh
  and revalidation against the backing tree).

Threading: methods are called on the trio thread (by fuse_ops) and touch memory only there.
Calls into the backing tree run in worker threads behind the `backing` limiter (they may hang
on NFS), so a hung NFS server never blocks requests that the cache can answer. Local work runs
inline on the trio thread (`in_cache`, journal commits): content-file reads and writes and
LMDB transactions without sync stay in the page cache and cost less than a thread trip. They
can block only while the local disk is saturated (the kernel throttling dirty pages), which
stalls the whole mount briefly, as it would stall any local program; device flushes (fsync)
are the part that waits for the disk, and those run in worker threads (`InodeTable.sync`).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from safefs import ranges, records
from safefs.backing import Backing
from safefs.cache import ContentCache
from safefs.clock import Clock
from safefs.coherence import Coherence, hidden
from safefs.config import MountConfig
from safefs.content import Content, FsStats, Limiters
from safefs.errors import FsError
from safefs.files import Files
from safefs.inodes import ROOT_INO, Inode, InodeTable
from safefs.negative import NegativeNames
from safefs.ports import AlwaysWritable, Invalidator, NoInvalidator

T = TypeVar("T")
NAME_MAX = 255
XATTR_CREATE, XATTR_REPLACE = 1, 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


@dataclasses.dataclass
class DirHandle:
    ino: int
    entries: list[tuple[bytes, int]]


class Filesystem:
    def __init__(
        self,
        table: InodeTable,
        cache: ContentCache,
        backing: Backing,
        config: MountConfig,
        clock: Clock,
        limiters: Limiters,
        gate: Any = None,
        invalidator: Invalidator | None = None,
    ) -> None:
        self.table = table
        self.cache = cache
        self.backing = backing
        self.config = config
        self.clock = clock
        self.limiters = limiters
        self.gate = gate or AlwaysWritable()
        self.invalidator = invalidator or NoInvalidator()
        self.content = Content(table, cache, backing, config, limiters)  # shared with the flusher
        self.inode_locks = self.content.inode_locks
        self.stats: FsStats = self.content.stats
        self.negative = NegativeNames(self.invalidator)  # shared with the flusher
        self._dir_handles: dict[int, DirHandle] = {}
        self.coherence = Coherence(table, backing, self.content, self.negative, self.invalidator)
        self.files = Files(table, cache, config, clock, self.content, self.coherence, self.gate)
        self.inject_bug_name: bytes | None = None  # tests: a lookup of this name raises a bug

    def on_role(self, role: str) -> None:
        """Follow the lease keeper's role (subscribed with LeaseKeeper.on_role)."""
        self.follower = role != "writer"

    @property
    def follower(self) -> bool:
        """No local changes at all; the kernel must not keep pages (see on_role)."""
        return self.files.follower

    @follower.setter
    def follower(self, value: bool) -> None:
        self.files.follower = value

    @property
    def on_change(self) -> Callable[[], None]:
        """The daemon wires the flusher's poke here; the files call it too."""
        return self.files.on_change

    @on_change.setter
    def on_change(self, poke: Callable[[], None]) -> None:
        self.files.on_change = poke

    @property
    def kernel_owns_sizes(self) -> bool:
        """The kernel writeback cache is on (see Content.kernel_owns_sizes)."""
        return self.content.kernel_owns_sizes

    @kernel_owns_sizes.setter
    def kernel_owns_sizes(self, value: bool) -> None:
        self.content.kernel_owns_sizes = value

    # -- contents and threads (content.py) -----------------------------------------------
    async def in_cache(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.content.in_cache(fn, *args)

    async def read_backing(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.content.read_backing(fn, *args)

    async def xattrs_of(self, inode: Inode) -> dict[bytes, bytes]:
        return await self.content.xattrs_of(inode)

    async def collect(self, inode: Inode) -> None:
        await self.content.collect(inode)

    def cached_bytes(self) -> int:
        return self.content.cached_bytes()

    # -- start-up ------------------------------------------------------------------------
    async def start(self, boot_id: str) -> None:
        """Create the root inode on first use; after a reboot, distrust clean cached bytes."""
        table = self.table
        if ROOT_INO not in table.inodes:
            st = await self.read_backing(self.backing.lstat, ())
            root = Inode(ROOT_INO, st.st_mode, st.st_uid, st.st_gid, st.st_ctime_ns)
            self.table.update_attrs(root, st)
            root.parent = ROOT_INO
            table.add_root(root)
        if table.meta.get("boot_id") != boot_id:
            # Clean cache bytes were never fsynced: after a host crash they may be garbage.
            for inode in table.inodes.values():
                if inode.present and not inode.dirty and not inode.new:
                    table.drop_present(inode)
            table.set_meta("boot_id", boot_id)
        self.mark_stale()  # the backing tree may have changed while we were not mounted
        # What a crash left behind counts as changed now: it is written back after the usual
        # quiet period (the flusher retries it like any other change).
        now = self.clock.monotonic()
        for seq in table.ops:
            table.op_times[seq] = now
        for inode in table.inodes.values():
            inode.changed_at = now
            if inode.is_reg and inode.origin and len(inode.blinks) > 1:
                table.note_backing_ino(inode.origin[0], inode)
            self.content.cached_bytes_estimate += ranges.total(inode.present)
        # Inodes whose last name went away while the kernel still knew them.
        for inode in list(table.inodes.values()):
            if table.collectable(inode):
                table.drop(inode)
                await self.in_cache(self.cache.delete, inode.ino)
        await table.sync()

    # -- helpers -------------------------------------------------------------------------
    def now_ns(self) -> int:
        return self.clock.wall_ns()  # the kernel's clock for UTIME_NOW (see clock.py)

    def _writable(self) -> None:
        self.gate.require_writable()

    def _dir(self, ino: int) -> Inode:
        inode = self.table.get(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        return inode

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if not name or b"/" in name or name in (b".", b".."):
            raise FsError(errno.EINVAL)

    def _hidden(self, parent: int, name: bytes) -> bool:
        return hidden(parent, name)

    def _changed(self, inode: Inode, *, data: bool = False, attrs: bool = False, times_only: bool = False) -> None:
        self.table.mark_changed(
            inode, self.now_ns(), self.clock.monotonic(), data=data, attrs=attrs, times_only=times_only
        )

    def _log(self, op: records.Op) -> None:
        self.table.append_op(op, self.clock.monotonic())

    def _log_removal(self, d: Inode, op: records.Unlink | records.Rmdir, inode: Inode) -> None:
        """Log the removal of a name, unless it takes with it an object the backing tree never
        got (then the pending create goes instead, see InodeTable.cancel_creation). The
        directory's times moved all the same: they are published as after a replayed op."""
        if not self.table.cancel_creation(inode):
            self._log(op)
        elif d.blinks or d.ino == ROOT_INO:
            self.table.mark_attrs_dirty(d)

    def _dir_changed(self, d: Inode) -> None:
        d.mtime_ns = d.ctime_ns = self.now_ns()
        self.table.mark(d)

    def _new_child(self, parent: Inode, mode: int, uid: int, gid: int) -> Inode:
        if parent.mode & stat.S_ISGID:  # BSD group semantics of a setgid directory
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        inode = self.table.new_inode(mode, uid, gid, self.now_ns(), new=True)
        inode.changed_at = self.clock.monotonic()
        return inode

    # -- coherence with the project (coherence.py) -----------------------------------------
    def mark_stale(self) -> None:
        self.coherence.mark_stale()

    def mark_dir_stale(self, ino: int) -> None:
        self.coherence.mark_dir_stale(ino)

    async def ensure_listed(self, d: Inode) -> None:
        await self.coherence.ensure_listed(d)

    def note_absent(self, parent: int, name: bytes) -> bool:
        """May the kernel cache that `name` is not in `parent`? (See negative.py.)"""
        return self.negative.note(parent, name)

    # -- lookups -------------------------------------------------------------------------
    def remember(self, inode: Inode) -> Inode:
        """Count one more kernel reference (every entry handed to the kernel)."""
        inode.lookups += 1
        return inode

    async def lookup(self, parent: int, name: bytes) -> Inode:
        d = self._dir(parent)
        if name == self.inject_bug_name:
            raise RuntimeError("injected bug (SAFEFS_INJECT_BUG)")
        if name == b".":
            return self.remember(d)
        if name == b"..":
            return self.remember(self.table.get(d.parent or ROOT_INO))
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        await self.ensure_listed(d)
        ino = self.table.child(parent, name)
        if ino is None or self._hidden(parent, name):
            raise FsError(errno.ENOENT)
        return self.remember(self.table.get(ino))

    def getattr(self, ino: int) -> Inode:
        return self.table.get(ino)

    async def forget(self, items: list[tuple[int, int]]) -> None:
        for ino, n in items:
            inode = self.table.inodes.get(ino)
            if inode is None:
                continue
            inode.lookups -= n
            await self.collect(inode)

    # -- namespace changes ---------------------------------------------------------------
    async def _prepare_new_entry(self, parent: int, name: bytes) -> Inode:
        self._writable()
        d = self._dir(parent)
        self._check_name(name)
        if self._hidden(parent, name):
            raise FsError(errno.EPERM, "the .safefs control directory is reserved")
        if not d.links and parent != ROOT_INO:
            raise FsError(errno.ENOENT)  # the directory was removed
        await self.ensure_listed(d)
        if self.table.child(parent, name) is not None:
            raise FsError(errno.EEXIST)
        return d

    async def _add_new(
        self, d: Inode, name: bytes, inode: Inode, op: type[records.Create | records.Mkdir] = records.Create
    ) -> Inode:
        self.table.link(d.ino, name, inode)
        self.negative.made(d.ino, name)
        self._dir_changed(d)
        self._log(op(d.ino, name, inode.ino))
        self.remember(inode)
        await self.table.commit()
        self.on_change()
        return inode

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Inode:
        d = await self._prepare_new_entry(parent, name)
        inode = self._new_child(d, mode, uid, gid)
        inode.rdev = rdev
        return await self._add_new(d, name, inode)

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        d = await self._prepare_new_entry(parent, name)
        inode = self._new_child(d, stat.S_IFDIR | (mode & 0o7777), uid, gid)
        inode.listed = True
        return await self._add_new(d, name, inode, records.Mkdir)

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        d = await self._prepare_new_entry(parent, name)
        inode = self._new_child(d, stat.S_IFLNK | 0o777, uid, gid)
        inode.target = target
        inode.size = len(target)
        return await self._add_new(d, name, inode)

    async def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int) -> tuple[int, Inode]:
        d = await self._prepare_new_entry(parent, name)
        inode = self._new_child(d, stat.S_IFREG | (mode & 0o7777), uid, gid)
        await self._add_new(d, name, inode)
        return self.files.open_handle(inode, flags), inode

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        inode = self.table.get(ino)
        if inode.is_dir:
            raise FsError(errno.EPERM)
        d = await self._prepare_new_entry(new_parent, new_name)
        if not inode.links:
            raise FsError(errno.ENOENT)  # linking an unlinked file is not allowed
        self.table.link(new_parent, new_name, inode)
        self.negative.made(new_parent, new_name)
        self._changed(inode)
        self._dir_changed(d)
        self._log(records.Link(ino, new_parent, new_name))
        self.remember(inode)
        await self.table.commit()
        self.on_change()
        return inode

    async def _existing(self, parent: int, name: bytes) -> tuple[Inode, Inode]:
        d = self._dir(parent)
        await self.ensure_listed(d)
        ino = self.table.child(parent, name)
        if ino is None or self._hidden(parent, name):
            raise FsError(errno.ENOENT)
        return d, self.table.get(ino)

    async def unlink(self, parent: int, name: bytes) -> None:
        self._writable()
        d, inode = await self._existing(parent, name)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        self.table.unlink(parent, name)
        self._changed(inode)
        self._dir_changed(d)
        self._log_removal(d, records.Unlink(parent, name, inode.ino), inode)
        await self.table.commit()
        self.on_change()

    async def rmdir(self, parent: int, name: bytes) -> None:
        self._writable()
        d, inode = await self._existing(parent, name)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        await self.ensure_listed(inode)
        if self.table.names(inode.ino):
            raise FsError(errno.ENOTEMPTY)
        self.table.unlink(parent, name)
        self.negative.drop(inode.ino)
        self._changed(inode)
        self._dir_changed(d)
        self._log_removal(d, records.Rmdir(parent, name, inode.ino), inode)
        await self.table.commit()
        self.on_change()

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """Is directory `ancestor` equal to or above directory `ino`?"""
        seen = 0
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INO or seen > 100_000:
                return False
            ino = self.table.get(ino).parent or ROOT_INO
            seen += 1

    async def rename(self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int) -> None:
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise FsError(errno.EINVAL)
        d_old, src = await self._existing(p_old, n_old)
        d_new = self._dir(p_new)
        self._check_name(n_new)
        if self._hidden(p_new, n_new):
            raise FsError(errno.EPERM, "the .safefs control directory is reserved")
        await self.ensure_listed(d_new)
        dst_ino = self.table.child(p_new, n_new)
        dst = self.table.get(dst_ino) if dst_ino is not None else None
        if src.is_dir and self._is_ancestor(src.ino, p_new):
            raise FsError(errno.EINVAL)  # a directory cannot move below itself
        if flags & RENAME_NOREPLACE and dst is not None:
            raise FsError(errno.EEXIST)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FsError(errno.ENOENT)
            if dst.is_dir and self._is_ancestor(dst.ino, p_old):
                raise FsError(errno.EINVAL)
        elif dst is not None:
            if dst.ino == src.ino:
                return  # both names are links to one file: POSIX says do nothing
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR)
            if dst.is_dir:
                await self.ensure_listed(dst)
                if self.table.names(dst.ino):
                    raise FsError(errno.ENOTEMPTY)
        if src.is_dir:
            await self.ensure_listed(src)  # its children must be known before it moves
        table = self.table
        table.unlink(p_old, n_old)
        if flags & RENAME_EXCHANGE:
            assert dst is not None
            table.unlink(p_new, n_new)
            table.link(p_new, n_new, src)
            table.link(p_old, n_old, dst)
            self._changed(dst)
        else:
            if dst is not None:
                table.unlink(p_new, n_new)
                self._changed(dst)
            table.link(p_new, n_new, src)
        self.negative.made(p_new, n_new)
        self._changed(src)
        self._dir_changed(d_old)
        self._dir_changed(d_new)
        self._log(records.Rename(p_old, n_old, p_new, n_new, flags, src.ino, dst.ino if dst else 0))
        await table.commit()
        self.on_change()

    # -- attributes ----------------------------------------------------------------------
    def readlink(self, ino: int) -> bytes:
        inode = self.table.get(ino)
        if not inode.is_link or inode.target is None:
            raise FsError(errno.EINVAL)
        return inode.target

    # -- xattrs --------------------------------------------------------------------------
    async def getxattr(self, ino: int, name: bytes) -> bytes:
        inode = self.table.get(ino)
        xattrs = await self.xattrs_of(inode)
        try:
            return xattrs[name]
        except KeyError:
            raise FsError(errno.ENODATA) from None

    async def listxattr(self, ino: int) -> list[bytes]:
        return list(await self.xattrs_of(self.table.get(ino)))

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self._writable()
        inode = self.table.get(ino)
        xattrs = await self.xattrs_of(inode)
        if flags & XATTR_CREATE and name in xattrs:
            raise FsError(errno.EEXIST)
        if flags & XATTR_REPLACE and name not in xattrs:
            raise FsError(errno.ENODATA)
        if not name or len(name) > 255:
            raise FsError(errno.ERANGE)
        xattrs[name] = bytes(value)
        self._changed(inode, attrs=True)
        await self.table.commit()
        self.on_change()

    async def removexattr(self, ino: int, name: bytes) -> None:
        self._writable()
        inode = self.table.get(ino)
        xattrs = await self.xattrs_of(inode)
        if name not in xattrs:
            raise FsError(errno.ENODATA)
        del xattrs[name]
        self._changed(inode, attrs=True)
        await self.table.commit()
        self.on_change()

    # -- files (files.py) ----------------------------------------------------------------
    async def setattr(self, ino: int, **changes: int | None) -> Inode:
        """Change mode, uid, gid, size, atime_ns or mtime_ns (see Files.setattr)."""
        return await self.files.setattr(ino, **changes)

    def handle_inode(self, fh: int) -> Inode:
        return self.files.handle_inode(fh)

    async def open(self, ino: int, flags: int) -> tuple[int, bool]:
        """Open a file; returns (handle, whether the kernel may keep its cached pages)."""
        return await self.files.open(ino, flags)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return await self.files.read(fh, offset, size)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        return await self.files.write(fh, offset, data)

    async def fsync(self, fh: int, *, datasync: bool = False) -> None:
        await self.files.fsync(fh, datasync=datasync)

    async def fsyncdir(self) -> None:
        await self.table.sync()

    async def release(self, fh: int) -> None:
        await self.files.release(fh)

    def open_files(self) -> int:
        """How many files the kernel holds open through this mount (a lazy unmount waits for them)."""
        return self.files.open_files()

    # -- directories ---------------------------------------------------------------------
    async def opendir(self, ino: int) -> int:
        d = self._dir(ino)
        await self.ensure_listed(d)
        entries = [(b".", d.ino), (b"..", d.parent or ROOT_INO)]
        entries += [(n, i) for n, i in self.table.names(ino).items() if not self._hidden(ino, n)]
        fh = self.files.new_fh()
        self._dir_handles[fh] = DirHandle(ino, entries)
        return fh

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Inode, int]]:
        """Entries from index `start` on, as (name, inode, index of the next entry)."""
        handle = self._dir_handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        for index in range(start, len(handle.entries)):
            name, ino = handle.entries[index]
            inode = self.table.inodes.get(ino)
            if inode is not None:
                yield name, inode, index + 1

    def releasedir(self, fh: int) -> None:
        self._dir_handles.pop(fh, None)

    async def statfs(self) -> os.statvfs_result:
        return await self.in_cache(self.cache.statvfs)
