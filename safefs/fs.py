"""POSIX semantics of the mount, served from the local cache. Knows nothing of pyfuse3.

Every request of the kernel becomes one method here. Changes land in the cache (content
files and the inode table) and are acknowledged once the journal has committed them; the
flusher (flusher.py) carries them to the backing tree later. Reads of bytes not yet in the
cache fetch just the blocks they need from the backing tree.

Invariants:
- Nothing changes the namespace or content unless `lease.require_writable()` allowed it at
  the start of the request (the seam where the lease plugs in; until then always yes).
- A write is acknowledged only after its bytes are in the cache file and the journal knows
  the range is dirty (`InodeTable.commit`).
- Every namespace change appends an op to the journal's log in the same commit that changes
  the cache view, so the backing tree can be brought to the same state by replaying it.
- Fetched bytes never overwrite bytes written meanwhile: a fetch reads the backing tree
  without a lock, then writes only the ranges still missing, under the inode's lock.
- The root of the project's `.safefs` control directory is invisible and cannot be created.
- The kernel caches an absent name only while this module remembers it (`note_absent`); a
  name that may have appeared behind the kernel's back (a refreshed or distrusted directory)
  has its absence invalidated before anyone can act on it.

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
import functools
import logging
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import trio

from safefs import kernel_cache, layout, ranges, records
from safefs.backing import Backing, Entry, Fingerprint
from safefs.cache import ContentCache
from safefs.clock import Clock
from safefs.config import MountConfig
from safefs.errors import CacheFull, FsError
from safefs.inodes import ROOT_INO, Inode, InodeTable, op_names
from safefs.lanes import ThreadLane

log = logging.getLogger(__name__)

T = TypeVar("T")
FETCH_BLOCK = 128 * 1024  # reads fetch whole aligned blocks of this size
WHOLE_FILE_FETCH = 1 << 20  # a read of a file this small fetches all of it (see fetch)
NAME_MAX = 255
NEGATIVE_NAMES_MAX = 100_000  # absences the kernel may cache at once (see note_absent)
XATTR_CREATE, XATTR_REPLACE = 1, 2
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class WriteGate(Protocol):
    """What the filesystem asks before changing anything (the lease, DESIGN.md G1/G6)."""

    def require_writable(self) -> int:
        """Return the epoch allowed to write into the cache, or raise ReadOnly."""

    def require_publishable(self) -> int:
        """Return the epoch allowed to change the project, or raise ReadOnly."""

    def publishable(self) -> bool:
        """`require_publishable` as a yes or no, callable from any thread."""


class AlwaysWritable:
    epoch = 0

    def require_writable(self) -> int:
        return 0

    def require_publishable(self) -> int:
        return 0

    def writable(self) -> bool:
        return True

    def publishable(self) -> bool:
        return True


class Invalidator(Protocol):
    """Tells the kernel to forget what it cached. Callers hold no lock while awaiting it."""

    async def invalidate_inode(self, ino: int) -> None: ...
    async def invalidate_entry(self, parent: int, name: bytes) -> None: ...


    def later_inode(self, ino: int) -> None:
        """Queue an invalidation (for callers inside a request that the kernel would block)."""

    def later_entry(self, parent: int, name: bytes) -> None: ...


class NoInvalidator:
    async def invalidate_inode(self, ino: int) -> None:
        pass

    async def invalidate_entry(self, parent: int, name: bytes) -> None:
        pass

    def later_inode(self, ino: int) -> None:
        pass

    def later_entry(self, parent: int, name: bytes) -> None:
        pass


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
class Handle:
    ino: int
    flags: int


@dataclasses.dataclass
class DirHandle:
    ino: int
    entries: list[tuple[bytes, int]]


@dataclasses.dataclass
class FsStats:
    fetches: int = 0
    cache_hits: int = 0
    evictions: int = 0


class KeyedLocks:
    """One trio.Lock per key, created on demand and dropped when nobody holds or waits."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[trio.Lock, int]] = {}

    def __call__(self, key: int) -> _KeyedLock:
        return _KeyedLock(self, key)


class _KeyedLock:
    def __init__(self, owner: KeyedLocks, key: int) -> None:
        self._owner, self._key = owner, key

    async def __aenter__(self) -> None:
        lock, users = self._owner._locks.get(self._key, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._owner._locks[self._key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_user(lock)
            raise

    async def __aexit__(self, *exc: object) -> None:
        lock, _ = self._owner._locks[self._key]
        lock.release()
        self._release_user(lock)

    def _release_user(self, lock: trio.Lock) -> None:
        _, users = self._owner._locks[self._key]
        if users <= 1:
            del self._owner._locks[self._key]
        else:
            self._owner._locks[self._key] = (lock, users - 1)


def fingerprint_tuple(fp: Fingerprint) -> tuple[int, int, int, int]:
    return (fp.ino, fp.size, fp.mtime_ns, fp.ctime_ns)


def same_content(seen: tuple[int, ...] | None, now: tuple[int, ...]) -> bool:
    """Is a backing file still the one safefs fetched or published (by its fingerprint)?

    The ctime is compared too: a rewrite that keeps the size and puts the mtime back
    (`rsync --inplace -t`, `touch -r`) still moves it. safefs's own renames, links and
    unlinks move it as well, so the flusher re-records the fingerprint after each of them.
    """
    return seen is not None and tuple(seen[:4]) == tuple(now[:4])


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
        self.inode_locks = KeyedLocks()
        self._dir_locks = KeyedLocks()
        self._handles: dict[int, Handle] = {}
        self._dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._by_backing_ino: dict[int, int] = {}  # backing st_ino -> inode, for hard links
        self._cached_bytes_estimate = 0
        self.dropped_content: set[int] = set()  # content files to delete (see purge_dropped)
        self._absent: dict[int, set[bytes]] = {}  # names the kernel may cache as absent
        self._absent_count = 0
        self.follower = False  # no local changes at all; the kernel must not keep pages (on_role)
        # The kernel writeback cache is on: the kernel never takes a regular file's size or
        # mtime from us again once it has the inode, so a file changed on the backing tree
        # must become a new inode (see _revalidate), even when nobody has it open.
        self.kernel_owns_sizes = False
        self.stats = FsStats()
        self.on_change: Callable[[], None] = lambda: None  # the flusher pokes itself here
        self.inject_bug_name: bytes | None = None  # tests: a lookup of this name raises a bug

    def on_role(self, role: str) -> None:
        """Follow the lease keeper's role (subscribed with LeaseKeeper.on_role)."""
        self.follower = role != "writer"

    # -- threads -------------------------------------------------------------------------
    async def in_backing(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiters.backing)

    async def in_cache(self, fn: Callable[..., T], *args: Any) -> T:
        """Local cache-file work (pread, pwrite, truncate, unlink, statvfs), run inline: it
        costs microseconds in the page cache, less than a thread trip (see the docstring)."""
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

    # -- start-up ------------------------------------------------------------------------
    async def start(self, boot_id: str) -> None:
        """Create the root inode on first use; after a reboot, distrust clean cached bytes."""
        table = self.table
        if ROOT_INO not in table.inodes:
            st = await self.read_backing(self.backing.lstat, ())
            root = Inode(ROOT_INO, st.st_mode, st.st_uid, st.st_gid, st.st_ctime_ns)
            self._copy_stat(root, st)
            root.parent = ROOT_INO
            table.add_root(root)
        if table.meta.get("boot_id") != boot_id:
            # Clean cache bytes were never fsynced: after a host crash they may be garbage.
            for inode in table.inodes.values():
                if inode.present and not inode.dirty and not inode.new:
                    inode.present = ranges.EMPTY
                    table.mark(inode)
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
                self._by_backing_ino[inode.origin[0]] = inode.ino
            self._cached_bytes_estimate += ranges.total(inode.present)
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
        return parent == ROOT_INO and name == layout.DIR

    def _changed(self, inode: Inode, *, data: bool = False, attrs: bool = False) -> None:
        now = self.now_ns()
        inode.ctime_ns = now
        if data:
            inode.mtime_ns = now
        inode.version += 1
        inode.changed_at = self.clock.monotonic()
        if attrs:
            inode.attr_dirty = True
        self.table.mark(inode)

    def _log(self, op: records.Op) -> None:
        self.table.append_op(op, self.clock.monotonic())

    def _dir_changed(self, d: Inode) -> None:
        d.mtime_ns = d.ctime_ns = self.now_ns()
        self.table.mark(d)

    @staticmethod
    def _copy_stat(inode: Inode, st: os.stat_result) -> None:
        inode.mode = st.st_mode
        inode.uid, inode.gid = st.st_uid, st.st_gid
        inode.size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
        inode.rdev = st.st_rdev
        inode.atime_ns, inode.mtime_ns, inode.ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns

    def _new_child(self, parent: Inode, mode: int, uid: int, gid: int) -> Inode:
        if parent.mode & stat.S_ISGID:  # BSD group semantics of a setgid directory
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        inode = self.table.new_inode(mode, uid, gid, self.now_ns())
        inode.new = True
        inode.changed_at = self.clock.monotonic()
        return inode

    def mark_stale(self) -> None:
        """Distrust every listed directory: the backing tree may have changed (another host
        wrote, or this cache was not mounted). Each is compared again on its next use."""
        for inode in self.table.inodes.values():
            if inode.is_dir and inode.listed:
                inode.stale = True
        for parent in list(self._absent):
            self._forget_absent(parent)

    def mark_dir_stale(self, ino: int) -> None:
        """`mark_stale` for one directory (a generation record named it as changed)."""
        inode = self.table.inodes.get(ino)
        if inode is not None and inode.is_dir and inode.listed:
            inode.stale = True
        self._forget_absent(ino)

    def note_absent(self, parent: int, name: bytes) -> bool:
        """May the kernel cache that `name` is not in `parent`? Yes while we can take it back.

        A negative entry spares a round trip per failed lookup (SQLite looks for its -journal
        and -wal on every transaction; `open(O_CREAT)` looks before it creates). Names made
        through the mount replace the kernel's negative entry themselves; names that appear
        from the backing tree (a refresh, another host's generation) come through `_refresh`
        or `mark_stale`, which invalidate what is remembered here.
        """
        names = self._absent.setdefault(parent, set())
        if name not in names:
            if self._absent_count >= NEGATIVE_NAMES_MAX:
                return False  # cannot remember it, so the kernel must not keep it either
            names.add(name)
            self._absent_count += 1
        return True

    def _forget_absent(self, parent: int) -> None:
        """Queue invalidations of every absence the kernel may cache in `parent`."""
        for name in self._absent.pop(parent, ()):
            self.invalidator.later_entry(parent, name)
            self._absent_count -= 1

    def _drop_absent(self, parent: int) -> None:
        """`parent` is gone: its absences need no invalidation, only forgetting."""
        self._absent_count -= len(self._absent.pop(parent, ()))

    def _name_made(self, parent: int, name: bytes) -> None:
        """`name` now exists in `parent`: the kernel's entry for it is positive again."""
        names = self._absent.get(parent)
        if names is not None and name in names:
            names.discard(name)
            self._absent_count -= 1

    async def ensure_listed(self, d: Inode) -> None:
        """Load a directory's entries from the backing tree the first time it is used, and
        bring them up to date when it is stale."""
        if d.listed:
            if d.stale:
                await self._refresh(d)
            return
        async with self._dir_locks(d.ino):
            if d.listed:
                return
            path = self.table.dir_backing_path(d.ino)
            entries: list[Entry] = []
            if path is not None:
                entries = await self.read_backing(self.backing.listdir, path)
            for entry in entries:
                if self._hidden(d.ino, entry.name) or self.table.child(d.ino, entry.name) is not None:
                    continue
                self.table.link(d.ino, entry.name, self._inode_from_backing(d.ino, entry))
            d.listed = True
            self.table.mark(d)
            await self.table.commit()

    async def _refresh(self, d: Inode) -> None:
        """Compare a stale directory with the backing tree and take over what changed there.

        Entries with changes of our own still to write back, and names a pending op changes
        (an unlink or a rename not written back yet), are left alone: the cache is
        authoritative for them (and the flusher's conflict rules apply when it publishes, or
        `recover` for a mount that lost its lease). Every other name follows the project, so
        a fenced ex-writer still sees what the new writer publishes in such a directory.
        Kernel invalidations are queued, not awaited: this runs inside a request on `d`, and
        the kernel needs `d`'s lock to drop a name.
        """
        async with self._dir_locks(d.ino):
            if not d.stale:
                return
            path = self.table.dir_backing_path(d.ino)
            if path is None:
                d.stale = False
                return
            entries = await self.read_backing(self.backing.listdir, path)
            table = self.table
            pending = {name for op in table.ops.values() for parent, name in op_names(op) if parent == d.ino}
            found = {e.name: e for e in entries if not self._hidden(d.ino, e.name) and e.name not in pending}
            for name, ino in list(table.names(d.ino).items()):
                child = table.inodes[ino]
                if table.pinned(child) or name in pending:
                    found.pop(name, None)
                    continue
                entry = found.pop(name, None)
                same_object = (
                    entry is not None
                    and stat.S_IFMT(entry.st.st_mode) == stat.S_IFMT(child.mode)
                    and (
                        entry.st.st_ino == child.origin[0]
                        if child.origin is not None
                        else (d.ino, name) in child.blinks  # put there by us (older caches)
                    )
                )
                if same_object and (child.opens > 0 or self.kernel_owns_sizes) and child.is_reg:
                    assert entry is not None
                    # Changed in place while open: the open version stays whole with its
                    # openers (see _split_open_version); the name gets a new inode below.
                    # So does any changed file while the kernel keeps its own sizes.
                    same_object = same_content(child.origin, fingerprint_tuple(Fingerprint.of(entry.st)))
                if same_object:
                    assert entry is not None
                    self._take_backing_state(child, entry)
                    continue
                self._forget_name(d.ino, name, child)
                if entry is not None:
                    table.link(d.ino, name, self._inode_from_backing(d.ino, entry))
            for name, entry in found.items():
                if table.child(d.ino, name) is None:
                    table.link(d.ino, name, self._inode_from_backing(d.ino, entry))
            self._forget_absent(d.ino)
            d.stale = False
            table.mark(d)
            await table.commit()
        await self.purge_dropped()

    async def purge_dropped(self) -> None:
        """Delete the content files of inodes whose cached bytes were dropped."""
        dropped, self.dropped_content = self.dropped_content, set()
        for ino in dropped:
            inode = self.table.inodes.get(ino)
            if inode is None or not inode.present:
                await self.in_cache(self.cache.delete, ino)

    def _take_backing_state(self, inode: Inode, entry: Entry) -> None:
        """A clean inode still at its place: adopt its attributes, drop content that changed."""
        fingerprint = fingerprint_tuple(Fingerprint.of(entry.st))
        if inode.is_reg and not same_content(inode.origin, fingerprint) and inode.present:
            self._cached_bytes_estimate -= ranges.total(inode.present)
            inode.present = ranges.EMPTY
            self.dropped_content.add(inode.ino)
            self.invalidator.later_inode(inode.ino)
        elif (inode.mode, inode.uid, inode.gid, inode.mtime_ns) != (
            entry.st.st_mode, entry.st.st_uid, entry.st.st_gid, entry.st.st_mtime_ns
        ):
            self.invalidator.later_inode(inode.ino)
        self._copy_stat(inode, entry.st)
        inode.origin = fingerprint
        inode.target = entry.link_target
        inode.xattrs = None
        if inode.is_dir:
            inode.stale = True
        self.table.mark(inode)

    def _forget_name(self, parent: int, name: bytes, child: Inode) -> None:
        """A name that went away on the backing tree goes away here too (no op is logged).

        A directory takes its whole cached subtree with it: nothing may keep a name under a
        directory that is no longer known.
        """
        if child.is_dir:
            self._drop_absent(child.ino)  # the kernel drops them with the directory's entry
            for sub_name, sub_ino in list(self.table.names(child.ino).items()):
                sub = self.table.inodes.get(sub_ino)
                if sub is not None:
                    self._forget_name(child.ino, sub_name, sub)
        self.table.unlink(parent, name)
        if (parent, name) in child.blinks:
            child.blinks.remove((parent, name))
        self.invalidator.later_entry(parent, name)
        if self.table.collectable(child):
            self.table.drop(child)
            self.dropped_content.add(child.ino)

    def _inode_from_backing(self, parent: int, entry: Entry) -> Inode:
        st = entry.st
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            known = self._by_backing_ino.get(st.st_ino)
            if known is not None and known in self.table.inodes:
                inode = self.table.inodes[known]
                inode.blinks.append((parent, entry.name))
                return inode
        inode = self.table.new_inode(st.st_mode, st.st_uid, st.st_gid, st.st_ctime_ns)
        self._copy_stat(inode, st)
        inode.target = entry.link_target
        inode.xattrs = None  # read from the backing tree on first use
        inode.origin = fingerprint_tuple(Fingerprint.of(st))
        inode.blinks = [(parent, entry.name)]
        if stat.S_ISDIR(st.st_mode):
            inode.parent = parent
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            self._by_backing_ino[st.st_ino] = inode.ino
        return inode

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

    async def collect(self, inode: Inode) -> None:
        if self.table.collectable(inode):
            self.table.drop(inode)
            self._cached_bytes_estimate -= ranges.total(inode.present)
            await self.in_cache(self.cache.delete, inode.ino)
            await self.table.commit()

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
        self._name_made(d.ino, name)
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
        return self._open_handle(inode, flags), inode

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        inode = self.table.get(ino)
        if inode.is_dir:
            raise FsError(errno.EPERM)
        d = await self._prepare_new_entry(new_parent, new_name)
        if not inode.links:
            raise FsError(errno.ENOENT)  # linking an unlinked file is not allowed
        self.table.link(new_parent, new_name, inode)
        self._name_made(new_parent, new_name)
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
        self._log(records.Unlink(parent, name, inode.ino))
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
        self._drop_absent(inode.ino)
        self._changed(inode)
        self._dir_changed(d)
        self._log(records.Rmdir(parent, name, inode.ino))
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
        self._name_made(p_new, n_new)
        self._changed(src)
        self._dir_changed(d_old)
        self._dir_changed(d_new)
        self._log(records.Rename(p_old, n_old, p_new, n_new, flags, src.ino, dst.ino if dst else 0))
        await table.commit()
        self.on_change()

    # -- attributes ----------------------------------------------------------------------
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
        self._writable()
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
        self._changed(inode, attrs=True)
        await self.table.commit()
        self.on_change()
        return inode

    async def _truncate(self, inode: Inode, size: int) -> None:
        """Change a file's size; called under the inode lock."""
        old = inode.size
        if size == old:
            inode.mtime_ns = self.now_ns()
            return
        if size > old:
            self._reserve(size - old, sparse=True)
            # The cache file may hold stale bytes past the old end (fetched before a shrink
            # elsewhere); cut them so the new region reads as zeros.
            await self.in_cache(self._extend_cache_file, inode.ino, old, size)
            # Present (as zeros) but not dirty: the backing file grows by a truncate too.
            inode.present = ranges.add(inode.present, old, size)
        else:
            inode.present = ranges.clip(inode.present, size)
            inode.dirty = ranges.clip(inode.dirty, size)
            inode.low_size = size if inode.low_size is None else min(inode.low_size, size)
            inode.size = size
            self._changed(inode, data=True, attrs=True)
            # The journal first: killed in between, a longer cache file is harmless (bytes
            # past the size are never read), a shorter one under the old size is not.
            await self.table.commit()
            await self.in_cache(self.cache.truncate, inode.ino, size)
            return
        inode.size = size
        self._changed(inode, data=True, attrs=True)

    def _extend_cache_file(self, ino: int, old: int, size: int) -> None:
        self.cache.truncate(ino, old)
        self.cache.truncate(ino, size)

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

    # -- files ---------------------------------------------------------------------------
    def _open_handle(self, inode: Inode, flags: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
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
            self._writable()
        unchanged = None  # the fingerprint check, made for a clean file with cached bytes
        if inode.is_reg and inode.present and not inode.needs_flush and not inode.new:
            unchanged = not await self._revalidate(inode)
        keep = kernel_cache.keep_pages(follower=self.follower, unchanged=unchanged)
        if self.follower and inode.is_reg and not inode.complete and inode.size <= self.config.publish_threshold:
            await self._snapshot(inode)
        if flags & os.O_TRUNC and inode.is_reg:
            # libfuse negotiates atomic O_TRUNC: the kernel leaves the truncation to us.
            async with self.inode_locks(ino):
                await self._truncate(inode, 0)
            await self.table.commit()
            self.on_change()
        return self._open_handle(inode, flags), keep

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
            await self._revalidate(inode)  # take the file as it is now
            await self.fill(inode)
            if not await self._revalidate(inode):
                return  # unchanged while we fetched: one version
        log.warning("fs: %r kept changing while fetched; serving the last fetch",
                    self.table.backing_path(inode.ino))  # fmt: skip

    def _split_open_version(self, inode: Inode) -> None:
        """The backing file changed while `inode` is open (or, with the kernel writeback cache,
        while the kernel keeps its own size of it): the open version stays with those who
        have it open, as after a rename over it on a local disk, and its names go to the new
        file, which a lookup (of the refreshed directory) gives a new inode.

        Dropping the cached bytes instead would let an open reader continue in the new
        version: a torn file. A follower fetched the whole file at open (`_snapshot`); bytes
        this version never fetched now fail with EIO rather than come from the new one.
        """
        log.info("fs: %r changed on the backing tree while open or cached by the kernel; its names "
                 "move to the new file", self.table.backing_path(inode.ino))  # fmt: skip
        for parent, name in list(inode.links):
            parent_inode = self.table.inodes.get(parent)
            if parent_inode is not None:
                parent_inode.stale = True
            self._forget_name(parent, name, inode)
        inode.blinks.clear()  # it is nowhere on the backing tree any more

    async def _revalidate(self, inode: Inode) -> bool:
        """Drop clean cached bytes of a file changed on the backing tree. True if dropped."""
        path = self.table.backing_path(inode.ino)
        if path is None or inode.origin is None:
            return False
        try:
            st = await self.on_backing(inode, self.backing.lstat)
        except FileNotFoundError:
            # Removed (or renamed) on the backing tree behind us: so is our clean copy.
            for parent, name in list(inode.blinks):
                parent_inode = self.table.inodes.get(parent)
                if parent_inode is not None:
                    parent_inode.stale = True
                self.invalidator.later_entry(parent, name)
            raise FsError(errno.ENOENT, "removed from the project") from None
        except (OSError, FsError) as exc:
            log.info("fs: cannot revalidate %r, serving the cache: %s", path, exc)
            return False
        if same_content(inode.origin, fingerprint_tuple(Fingerprint.of(st))) or not stat.S_ISREG(st.st_mode):
            return False
        async with self.inode_locks(inode.ino):
            if inode.needs_flush:
                return False
            if inode.opens > 0 or self.kernel_owns_sizes:
                self._split_open_version(inode)
                raise FsError(errno.ESTALE, "replaced on the project")  # the kernel looks again
            log.info("fs: %r changed on the backing tree; dropping its cached bytes", path)
            self._cached_bytes_estimate -= ranges.total(inode.present)
            await self.in_cache(self.cache.delete, inode.ino)
            inode.present = ranges.EMPTY
            self._copy_stat(inode, st)
            inode.origin = fingerprint_tuple(Fingerprint.of(st))
            self.table.mark(inode)
            await self.table.commit()
        await self.invalidator.invalidate_inode(inode.ino)
        return True

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
            await self.fetch(inode, offset, end)
        else:
            self.stats.cache_hits += 1
        return await self.in_cache(self.cache.pread, inode.ino, offset, end - offset)

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
                    self._cached_bytes_estimate += e - s
                self.table.mark(inode)
        await self.table.commit()
        await self.maybe_evict()

    async def fill(self, inode: Inode) -> None:
        """Make every byte of the file present in the cache (before publishing or losing its name)."""
        if inode.is_reg and not inode.complete:
            await self.fetch(inode, 0, inode.size)

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
            await self.fill(inode)

    def _reserve(self, nbytes: int, *, sparse: bool = False) -> None:
        """Refuse a write with ENOSPC before it could fill the cache disk."""
        if sparse:
            return
        if self.cache.free_bytes() < nbytes:
            raise CacheFull("no space left in the cache for more dirty data")
        self.cache.charge(nbytes)

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        self._writable()
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        inode = self.table.get(handle.ino)
        await self._whole_before_diverging(inode)
        if self.cache.free_space_stale():  # at most twice a second
            await self.in_cache(self.cache.refresh_free_space)
        if self.cache.free_bytes() < len(data):
            await self.maybe_evict(force=True)
            await self.in_cache(self.cache.refresh_free_space)  # count what eviction freed
        self._reserve(len(data))
        async with self.inode_locks(inode.ino):
            if handle.flags & os.O_APPEND and not self.kernel_owns_sizes:
                # With the writeback cache the kernel resolved O_APPEND itself, and its WRITEs
                # carry pages of any writer (an mmap too) through whichever handle it picks.
                offset = inode.size
            end = offset + len(data)
            ahead = None
            if not inode.unclean and inode.gaps(records.DIRTY, offset, min(end, inode.size)):
                # The first overwrite of bytes the project already has: record "may be dirty"
                # before they change, so a kill between the cache write and its commit cannot
                # leave the cache and the project different with nothing marked to write back
                # (replay takes the file's present bytes for dirty). Later writes need no such
                # commit ahead, until a write-back leaves the file clean again.
                inode.unclean = True
                self.table.mark(inode)
                ahead = self.table.render_ahead()
            saved = (inode.size, inode.mtime_ns, inode.ctime_ns)
            changes = []
            if offset > inode.size:  # the gap reads as zeros; the backing file's grows alike
                changes.append(inode.add_present(inode.size, offset))
            grown = end - offset if inode.gaps(records.PRESENT, offset, end) else 0
            changes.append(inode.add_present(offset, end))
            changes.append(inode.add_dirty(offset, end))
            inode.size = max(inode.size, end)
            self._changed(inode, data=True)
            # The journal learns of the bytes in the same step that writes them; until it
            # returns, reads of this inode wait for the lock (see `read`).
            inode.writing += 1
            try:
                await self.table.commit_with(functools.partial(self.cache.pwrite, inode.ino, offset, data), ahead=ahead)
            except BaseException:
                inode.undo(changes)
                inode.size, inode.mtime_ns, inode.ctime_ns = saved
                self.table.mark(inode)
                raise
            finally:
                inode.writing -= 1
            self._cached_bytes_estimate += grown
        self.on_change()
        return len(data)

    async def fsync(self, fh: int) -> None:
        inode = self.handle_inode(fh)
        await self.table.sync(functools.partial(self.cache.fsync, inode.ino))

    async def fsyncdir(self) -> None:
        await self.table.sync()

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        inode = self.table.inodes.get(handle.ino)
        if inode is not None:
            inode.opens -= 1
            await self.collect(inode)

    def open_files(self) -> int:
        """How many files the kernel holds open through this mount (a lazy unmount waits for them)."""
        return len(self._handles)

    # -- directories ---------------------------------------------------------------------
    async def opendir(self, ino: int) -> int:
        d = self._dir(ino)
        await self.ensure_listed(d)
        entries = [(b".", d.ino), (b"..", d.parent or ROOT_INO)]
        entries += [(n, i) for n, i in self.table.names(ino).items() if not self._hidden(ino, n)]
        fh = self._next_fh
        self._next_fh += 1
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

    # -- eviction ------------------------------------------------------------------------
    async def maybe_evict(self, *, force: bool = False) -> None:
        """Drop clean cached files, least recently used first, while the cache is too big."""
        limit = self.config.cache_size
        if not force and self._cached_bytes_estimate <= limit:
            return
        table = self.table
        total = sum(ranges.total(i.present) for i in table.inodes.values())
        self._cached_bytes_estimate = total
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
                freed = ranges.total(inode.present)
                await self.in_cache(self.cache.delete, inode.ino)
                inode.present = ranges.EMPTY
                table.mark(inode)
            total -= freed
            self.stats.evictions += 1
        self._cached_bytes_estimate = total
        await table.commit()

    def cached_bytes(self) -> int:
        return sum(ranges.total(i.present) for i in self.table.inodes.values())

