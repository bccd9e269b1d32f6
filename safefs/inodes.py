"""The in-memory inode table and namespace, persisted through the journal by group commit.

Every inode the mount knows lives here (an Inode record, inode.py): its attributes, the byte
ranges of its content that are present in the cache and those that are dirty, and where it
sits in two namespaces:

- the **cache view** (`children`, `Inode.links`): what the user sees through the mount;
- the **backing view** (`Inode.blinks`): where the object is on the backing tree right now.
  The two differ while namespace changes wait in the op log; the flusher moves the backing
  view forward one op at a time as it replays them.

Invariants:
- Inode numbers are never reused for the life of a cache dir (`next_ino` only grows), so the
  kernel can never confuse two files; the FUSE generation number is therefore always 0.
- A mutation is made in memory first, then `mark()`ed; `commit()` returns only once a
  transaction holding that mutation has committed. Records are rendered at commit time, so
  a record on disk is always a state memory had.
- An inode is dropped only when nothing refers to it: no cache link, no backing link, no
  kernel lookup, no open handle (`collectable`).
- An object made and removed again before its create was replayed never reaches the
  backing tree: the removal drops the pending create instead of logging its own op
  (`cancel_creation`), when no other pending op names the object.

Threading: all state is touched only on the trio thread, and journal transactions run there
too, inline: an LMDB commit without sync costs a few microseconds of page-cache work (it
blocks only if the local disk is starved of memory), less than a trip to a worker thread,
and one thread owning every write transaction is what LMDB wants. Only device flushes
(`sync`: the journal's fdatasync and a cache file's fsync) go to worker threads, behind
the flush limiter, because they wait for the disk.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from collections.abc import Iterator
from typing import Any

import trio

from safefs import ranges, records
from safefs.errors import FsError
from safefs.inode import ROOT_INO, BLink, Inode
from safefs.journal import Batch, Journal, Snapshot

log = logging.getLogger(__name__)


_SHARED_INTS: dict[int, int] = {}


def _shared(value: int) -> int:
    """One int object per value of a field that a tree's files mostly share (mode, owner):
    a listed file then holds no int of its own for them (28 bytes each, up to 8 MiB over
    100,000 files). Bounded: past 4,096 distinct values, values are kept as they come."""
    kept = _SHARED_INTS.get(value)
    if kept is not None:
        return kept
    if len(_SHARED_INTS) < 4096:
        _SHARED_INTS[value] = value
    return value


def op_names(op: records.Op) -> tuple[tuple[int, bytes], ...]:
    """Every (directory, name) an op changes."""
    if isinstance(op, records.Rename):
        return ((op.p_old, op.n_old), (op.p_new, op.n_new))
    return ((op.parent, op.name),)  # create, mkdir, unlink, rmdir, link


class InodeTable:
    def __init__(self, journal: Journal, flush_limiter: trio.CapacityLimiter) -> None:
        self._journal = journal
        self._flush_limiter = flush_limiter  # device flushes: the journal's and cache files'
        self.inodes: dict[int, Inode] = {}
        self.children: dict[int, dict[bytes, int]] = {}
        self.ops: dict[int, records.Op] = {}  # seq -> op not yet replayed
        self.op_times: dict[int, float] = {}  # seq -> monotonic time it happened (memory only)
        self._maybe_dirty: set[int] = set()  # every inode that needs a flush is in here
        self._op_refs: dict[int, int] = {}  # inode -> number of pending ops naming it
        self._created_by: dict[int, int] = {}  # inode -> seq of the pending op creating it
        self._by_backing_ino: dict[int, int] = {}  # backing st_ino -> inode, for hard links (memory only)
        # The flusher moves the backing view one op at a time; a reader that resolved a path
        # just before a move may miss the object, and looks again (Content.on_backing).
        self.view_version = 0
        self.view_busy = False
        self.meta: dict[str, Any] = {}
        self.next_ino = ROOT_INO + 1
        self.next_seq = 1
        # keys changed since the last rendered batch
        self._marked_inodes: set[int] = set()
        self._times_only: set[int] = set()  # marked inodes whose only change is their times
        self._marked_dentries: set[tuple[int, bytes]] = set()
        self._marked_ops: set[int] = set()
        self._marked_meta: set[str] = set()
        self.commits = 0  # transactions committed so far
        self._synced_at = -1  # `commits` when the journal was last made durable
        self._syncing: tuple[int, trio.Event] | None = None  # a journal flush under way, and what it covers

    # -- loading -------------------------------------------------------------------------
    def load(self, snap: Snapshot) -> None:
        self.meta = dict(snap.meta)
        for ino, rec in snap.inodes.items():
            loaded = self.inodes[ino] = Inode.from_record(ino, rec, snap.extents.get(ino, {}))
            if loaded.has_extent_changes:  # replay changed its ranges (see Inode.unclean)
                self._marked_inodes.add(ino)
        for parent, name, child in snap.dentries:
            inode = self.inodes.get(child)
            if inode is None or parent not in self.inodes:
                # A name whose inode or directory is gone: never let it stop a mount.
                log.warning("journal: dropping dangling entry %r in %d -> %d", name, parent, child)
                self.children.setdefault(parent, {})[name] = child
                self._marked_dentries.add((parent, name))
                del self.children[parent][name]
                continue
            self.children.setdefault(parent, {})[name] = child
            inode.add_link(parent, name)
            if inode.is_dir:
                self.inodes[parent].nlink_dirs += 1
        self._maybe_dirty.update(self.inodes)
        for seq, op in snap.ops:
            self.ops[seq] = op
            self._count_refs(seq, op, +1)
        self.next_ino = max(self.meta.get("next_ino", ROOT_INO + 1), max(self.inodes, default=0) + 1)
        self.next_seq = max(self.meta.get("next_seq", 1), max(self.ops, default=0) + 1)

    # -- lookups -------------------------------------------------------------------------
    def get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise FsError(2, f"no inode {ino}") from None  # ENOENT

    def child(self, parent: int, name: bytes) -> int | None:
        return self.children.get(parent, {}).get(name)

    def names(self, parent: int) -> dict[bytes, int]:
        return self.children.get(parent, {})

    def by_backing_ino(self, st_ino: int) -> Inode | None:
        """The inode known to be the backing file `st_ino` (a file with several links)."""
        known = self._by_backing_ino.get(st_ino)
        return self.inodes.get(known) if known is not None else None

    def backing_path(self, ino: int) -> tuple[bytes, ...] | None:
        """Where the inode is on the backing tree now, or None if it is not there."""
        parts: list[bytes] = []
        inode = self.inodes.get(ino)
        while inode is not None and inode.ino != ROOT_INO:
            if not inode.blinks:
                return None
            parent, name = inode.blinks[0]
            parts.append(name)
            inode = self.inodes.get(parent)
        if inode is None:
            return None
        return tuple(reversed(parts))

    def dir_backing_path(self, ino: int) -> tuple[bytes, ...] | None:
        return () if ino == ROOT_INO else self.backing_path(ino)

    # -- mutation ------------------------------------------------------------------------
    def new_inode(self, mode: int, uid: int, gid: int, now_ns: int, *, new: bool = False) -> Inode:
        """A fresh inode; with `new`, made through the mount (not yet on the backing tree)."""
        inode = Inode(self.next_ino, mode, uid, gid, now_ns)
        inode.new = new
        self.next_ino += 1
        self.set_meta("next_ino", self.next_ino)
        self.inodes[inode.ino] = inode
        self.mark(inode)
        return inode

    def note_backing_ino(self, st_ino: int, inode: Inode) -> None:
        """`inode` is the backing file `st_ino`, which has (or may get) several names there."""
        self._by_backing_ino[st_ino] = inode.ino

    def update_attrs(self, inode: Inode, st: os.stat_result) -> None:
        """Take the attributes of the backing object `st` (mode, owner, size, times)."""
        inode.mode, inode.uid, inode.gid = _shared(st.st_mode), _shared(st.st_uid), _shared(st.st_gid)
        inode.size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
        inode.rdev = st.st_rdev
        # Each stat field is an int object of its own; a file's times are often equal.
        mtime = st.st_mtime_ns
        inode.mtime_ns = mtime
        inode.atime_ns = mtime if st.st_atime_ns == mtime else st.st_atime_ns
        inode.ctime_ns = mtime if st.st_ctime_ns == mtime else st.st_ctime_ns
        self.mark(inode)

    def add_root(self, inode: Inode) -> None:
        self.inodes[ROOT_INO] = inode
        self.mark(inode)

    def link(self, parent: int, name: bytes, inode: Inode) -> None:
        self.children.setdefault(parent, {})[name] = inode.ino
        inode.add_link(parent, name)
        if inode.is_dir:
            inode.parent = parent
            self.inodes[parent].nlink_dirs += 1
        self._marked_dentries.add((parent, name))
        self.mark(inode)

    def unlink(self, parent: int, name: bytes) -> Inode:
        ino = self.children[parent].pop(name)
        inode = self.inodes[ino]
        inode.drop_link(parent, name)
        if inode.is_dir:
            self.inodes[parent].nlink_dirs -= 1
        self._marked_dentries.add((parent, name))
        self.mark(inode)
        return inode

    def mark(self, inode: Inode) -> None:
        self._marked_inodes.add(inode.ino)
        self._times_only.discard(inode.ino)
        self._maybe_dirty.add(inode.ino)

    def mark_times(self, inode: Inode) -> None:
        """Like `mark`, for a change of nothing but the inode's times (and memory-only state):
        an fdatasync of it need not flush the journal (see `sync`)."""
        if inode.ino not in self._marked_inodes:
            self._times_only.add(inode.ino)
        self._marked_inodes.add(inode.ino)
        self._maybe_dirty.add(inode.ino)

    # -- inode state: fs, the contents and the flusher change it through these -----------
    # Each changes memory and marks the inode, so the next commit carries it (see mark).
    def mark_changed(
        self, inode: Inode, now_ns: int, now: float, *,
        data: bool = False, attrs: bool = False, times_only: bool = False,
    ) -> None:  # fmt: skip
        """A change through the mount: its ctime (and with `data` its mtime) is `now_ns`, it
        is due for write-back `writeback_delay` after `now`, and with `attrs` its attributes
        are to be published too. `times_only`: the caller changed nothing else the journal
        keeps (see `mark_times`; setting `attr_dirty` is a change)."""
        inode.ctime_ns = now_ns
        if data:
            inode.mtime_ns = now_ns
        inode.version += 1
        inode.changed_at = now
        if attrs and not inode.attr_dirty:
            inode.attr_dirty = True
            times_only = False
        if times_only:
            self.mark_times(inode)
        else:
            self.mark(inode)

    def mark_attrs_dirty(self, inode: Inode) -> None:
        """Publish the inode's attributes again (its times moved on the project)."""
        inode.attr_dirty = True
        self.mark(inode)

    def mark_unclean(self, inode: Inode) -> None:
        """The cache file is about to hold bytes not yet recorded as dirty (see fs.write)."""
        inode.unclean = True
        self.mark(inode)

    def drop_present(self, inode: Inode) -> int:
        """The cached bytes of the inode are gone (dropped, evicted, or not to be trusted).
        Returns how many bytes were present."""
        freed = ranges.total(inode.present)
        inode.present = ranges.EMPTY
        self.mark(inode)
        return freed

    def truncate_ranges(self, inode: Inode, size: int) -> None:
        """The file was cut to `size`: nothing past it is present or dirty, and an in-place
        publish must cut the backing file there first (`low_size`)."""
        inode.present = ranges.clip(inode.present, size)
        inode.dirty = ranges.clip(inode.dirty, size)
        inode.low_size = size if inode.low_size is None else min(inode.low_size, size)
        self.mark(inode)

    def mark_zeros_present(self, inode: Inode, start: int, end: int) -> None:
        """[start, end) of the cache file reads as zeros, as the backing file's will (a file
        grown by truncate): present, not dirty."""
        inode.present = ranges.add(inode.present, start, end)
        self.mark(inode)

    def set_origin(self, inode: Inode, origin: tuple[int, int, int, int] | None) -> None:
        """The fingerprint of the backing object as safefs last saw or made it."""
        inode.origin = origin
        self.mark(inode)

    def mark_on_backing(self, inode: Inode, origin: tuple[int, int, int, int], link: BLink, *, attrs: bool) -> None:
        """The object is on the backing tree at `link` (and there only): found there, or
        created there by the flusher (with `attrs`: with the attributes the mount has)."""
        inode.origin = origin
        inode.blinks = [link]
        inode.new = False
        if attrs:
            inode.attr_dirty = False
        self.mark(inode)

    def mark_existing(self, inode: Inode) -> None:
        """A new inode that will not be created on the backing tree as such (it is kept as a
        conflict copy instead)."""
        inode.new = False
        self.mark(inode)

    def set_publishing(self, inode: Inode, what: tuple[bytes, ...] | None) -> tuple[bytes, ...] | None:
        """Record a publish under way (see Inode.publishing); returns what was recorded before."""
        before, inode.publishing = inode.publishing, what
        self.mark(inode)
        return before

    def mark_published(
        self, inode: Inode, origin: tuple[int, int, int, int], blink: BLink, version: int, st_ino: int | None
    ) -> None:
        """The inode's content and attributes as of `version` are on the backing tree, at
        `blink` if it was new there (`st_ino` if that file has several links). A change
        since `version` keeps it dirty, to be published again."""
        inode.publishing = None
        inode.origin = origin
        if inode.new:
            inode.blinks = [blink]
            inode.new = False
            if st_ino is not None:
                self.note_backing_ino(st_ino, inode)
        if inode.version == version:
            inode.dirty = ranges.EMPTY
            inode.attr_dirty = False
            inode.low_size = None
            inode.unclean = False
        self.mark(inode)

    def mark_attrs_published(self, inode: Inode, version: int) -> None:
        """The attributes as of `version` are on the backing tree."""
        if inode.version == version:
            inode.attr_dirty = False
            self.mark(inode)

    def discard_changes(self, inode: Inode) -> None:
        """The mount's version of the file was kept elsewhere (a conflict copy): nothing of
        it stays in the cache or waits for write-back."""
        inode.present = ranges.EMPTY
        inode.dirty = ranges.EMPTY
        inode.attr_dirty = False
        self.mark(inode)

    def add_blink(self, inode: Inode, link: BLink, *, first: bool = False) -> None:
        """The object now also has the name `link` on the backing tree (`first`: its main one)."""
        if first:
            inode.blinks.insert(0, link)
        elif link not in inode.blinks:
            inode.blinks.append(link)
        self.mark(inode)

    def drop_blink(self, inode: Inode, link: BLink) -> None:
        """The object no longer has the name `link` on the backing tree."""
        if link in inode.blinks:
            inode.blinks.remove(link)
            self.mark(inode)

    def clear_blinks(self, inode: Inode) -> None:
        """The object is nowhere on the backing tree any more."""
        inode.blinks.clear()
        self.mark(inode)

    def set_stale(self, ino: int) -> None:
        """Directory `ino` may have changed on the backing tree: compare it on its next use."""
        inode = self.inodes.get(ino)
        if inode is not None:
            inode.stale = True

    def set_fresh(self, d: Inode) -> None:
        """Directory `d` is as on the backing tree (compared again, or not there at all)."""
        d.stale = False

    def set_meta(self, key: str, value: Any) -> None:
        self.meta[key] = value
        self._marked_meta.add(key)

    def append_op(self, op: records.Op, now: float) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self.ops[seq] = op
        self.op_times[seq] = now
        self._count_refs(seq, op, +1)
        self._marked_ops.add(seq)
        self.set_meta("next_seq", self.next_seq)
        return seq

    def amend_op(self, seq: int, op: records.Op) -> None:
        """Rewrite a pending op with the same inodes (the flusher records a conflict copy's
        name in it before it writes anything, so a replay after a crash uses that name)."""
        assert op.inodes == self.ops[seq].inodes
        self.ops[seq] = op
        self._marked_ops.add(seq)

    def _count_refs(self, seq: int, op: records.Op, delta: int) -> None:
        for ino in op.inodes:
            count = self._op_refs.get(ino, 0) + delta
            if count:
                self._op_refs[ino] = count
            else:
                self._op_refs.pop(ino, None)
        if isinstance(op, (records.Create, records.Mkdir)):
            if delta > 0:
                self._created_by[op.ino] = seq
            elif self._created_by.get(op.ino) == seq:
                del self._created_by[op.ino]

    def drop_op(self, seq: int) -> None:
        op = self.ops.pop(seq, None)
        if op is not None:
            self._count_refs(seq, op, -1)
        self.op_times.pop(seq, None)
        self._marked_ops.add(seq)

    def cancel_creation(self, inode: Inode) -> bool:
        """`inode` just lost its last name. If it never reached the backing tree and its
        pending create (or mkdir) is the only op naming it, drop that op: neither the create
        nor a removal is ever replayed (a SQLite rollback journal, a build's temporary file,
        a tree extracted and removed again before write-back). True if dropped; the caller
        then logs no op for the removal.

        Nothing else can need the op: a later op that moved or linked the object, or put
        something in it, names it too. The op being replayed (`in_flight`) is left alone,
        as its replay may already have made the object.
        """
        seq = self._created_by.get(inode.ino)
        if (
            seq is None
            or inode.links
            or inode.blinks
            or not inode.new
            or self._op_refs.get(inode.ino) != 1
            or self.meta.get("in_flight") == seq
        ):
            return False
        self.drop_op(seq)
        return True

    @staticmethod
    def nameless(inode: Inode) -> bool:
        """Has the inode lost every name in the mount (unlinked, maybe still open)? Nothing
        but open handles reaches it any more, and nothing of it is published."""
        return not inode.links and inode.ino != ROOT_INO

    def collectable(self, inode: Inode) -> bool:
        return (
            self.nameless(inode)
            and not inode.blinks
            and inode.lookups <= 0
            and inode.opens <= 0
            and inode.ino not in self._op_refs  # a pending op still needs it to replay
        )

    def pinned(self, inode: Inode) -> bool:
        """Does the cache hold changes of this inode that the backing tree does not have yet?"""
        return inode.needs_flush or inode.new or inode.ino in self._op_refs

    def drop(self, inode: Inode) -> None:
        """Forget an inode nothing refers to any more (see `collectable`)."""
        self.inodes.pop(inode.ino, None)
        self.children.pop(inode.ino, None)
        self._marked_inodes.add(inode.ino)

    def iter_dirty(self) -> Iterator[Inode]:
        """Inodes with changes not yet on the backing tree (pruning the candidate set)."""
        for ino in list(self._maybe_dirty):
            inode = self.inodes.get(ino)
            if inode is not None and (inode.needs_flush or inode.new):
                yield inode
            else:
                self._maybe_dirty.discard(ino)

    # -- persistence ---------------------------------------------------------------------
    def _render(self) -> Batch:
        batch = Batch()
        for ino in self._marked_inodes:
            inode = self.inodes.get(ino)
            if inode is None:
                batch.inodes[ino] = None  # and its extents with it
                continue
            batch.inodes[ino] = inode.record()
            if ino not in self._times_only:
                inode.data_commit = self.commits + 1  # the number of the commit carrying it
            for (which, start), end in inode.take_extents().items():
                batch.extents[ino, which, start] = end
        for parent, name in self._marked_dentries:
            batch.dentries[(parent, name)] = self.children.get(parent, {}).get(name)
        for seq in self._marked_ops:
            batch.ops[seq] = self.ops.get(seq)
        for key in self._marked_meta:
            batch.meta[key] = self.meta[key]
        self._marked_inodes.clear()
        self._times_only.clear()
        self._marked_dentries.clear()
        self._marked_ops.clear()
        self._marked_meta.clear()
        return batch

    @property
    def uncommitted(self) -> bool:
        """Is anything marked that no transaction carries yet?"""
        return bool(self._marked_inodes or self._marked_dentries or self._marked_ops or self._marked_meta)

    async def commit(self) -> None:
        """Return once everything marked so far is in a committed transaction.

        The transaction runs inline on the trio thread: an LMDB commit without sync touches
        only the page cache (a few microseconds), less than a trip to a worker thread.
        """
        self._commit_batch()

    def render_ahead(self) -> Batch:
        """Take what is marked now as a batch for `commit_with(ahead=...)` to commit before
        its action. No await may come between this and that `commit_with`: a batch rendered
        by someone else meanwhile could carry the later state into the journal before the
        action ran.
        """
        return self._render()

    async def commit_with(self, action: Any = None, *, ahead: Batch | None = None) -> None:
        """Commit `ahead`, run `action` (a cache-file write, inline), then commit what is marked.

        The batch commits only if `action` succeeded; otherwise its keys stay marked and the
        error is raised (the caller restores what it changed in memory).
        """
        self._commit_batch(action, ahead)

    def _commit_batch(self, action: Any = None, ahead: Batch | None = None) -> None:
        batch = self._render()
        try:
            if ahead:
                self._journal.commit(ahead)
            if action is not None:
                action()
            if batch:
                self._journal.commit(batch)
        except BaseException:
            if ahead:
                self._remark(ahead)  # committed or not, carrying it again is harmless
            self._remark(batch)
            raise
        if ahead or batch:
            self.commits += 1

    def _remark(self, batch: Batch) -> None:
        """Not on disk: mark the keys again so the next commit carries them."""
        self._marked_inodes.update(batch.inodes)
        for ino, which, start in batch.extents:
            inode = self.inodes.get(ino)
            if inode is not None:
                inode.note_extent(which, start)
        self._marked_dentries.update(batch.dentries)
        self._marked_ops.update(batch.ops)
        self._marked_meta.update(batch.meta)

    async def sync(self, also: Any = None, *, data_of: Inode | None = None) -> None:
        """Commit, then make the journal durable on the local disk.

        With `data_of` (an fdatasync of that file) only the commits that changed more of the
        inode than its times must be durable: its size and byte ranges, which replay needs
        to find the bytes `also` flushes. A file whose writes only overwrote bytes already
        recorded dirty (and durably so) costs the cache file's flush alone.

        `also` (a blocking fsync of a cache file) runs in a second worker thread at the same
        time, so an fsync waits for one device flush of each kind, not for two in a row. A
        journal with no commit since the last flush is not flushed again; a flush already
        under way that started after our last commit is waited for, not repeated.
        """
        await self.commit()
        try:
            async with trio.open_nursery() as nursery:
                if also is not None:
                    nursery.start_soon(functools.partial(trio.to_thread.run_sync, also, limiter=self._flush_limiter))
                nursery.start_soon(self._sync_journal, self.commits if data_of is None else data_of.data_commit)
        except BaseExceptionGroup as group:
            # Callers map errors to errnos (ENOSPC, EIO): give them one, not a group. If both
            # flushes failed, either error says the fsync did not happen.
            raise group.exceptions[0] from None

    async def _sync_journal(self, target: int) -> None:
        while self._synced_at < target:
            if self._syncing is not None and self._syncing[0] >= target:
                await self._syncing[1].wait()  # that flush covers every commit we made
                continue
            done = trio.Event()
            self._syncing = (target, done)
            try:
                await trio.to_thread.run_sync(self._journal.sync, limiter=self._flush_limiter)
                self._synced_at = max(self._synced_at, target)
            finally:
                if self._syncing is not None and self._syncing[1] is done:  # a later one may be under way
                    self._syncing = None
                done.set()
