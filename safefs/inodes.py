"""The in-memory inode table and namespace, persisted through the journal by group commit.

Every inode the mount knows lives here: its attributes, the byte ranges of its content that
are present in the cache and those that are dirty, and where it sits in two namespaces:

- the **cache view** (`children`, `Inode.links`): what the user sees through the mount;
- the **backing view** (`Inode.blinks`): where the object is on the backing tree right now.
  The two differ while namespace changes wait in the op log; the flusher moves the backing
  view forward one op at a time as it replays them.

Invariants:
- Inode numbers are never reused for the life of a cache dir (`next_ino` only grows), so the
  kernel can never confuse two files; the FUSE generation number is therefore always 0.
- A mutation is made in memory first, then `mark()`ed; `commit()` returns only once a
  transaction holding that mutation (or a later one) has committed. Records are rendered at
  commit time on the trio thread, so a record on disk is always a state memory had.
- An inode is dropped only when nothing refers to it: no cache link, no backing link, no
  kernel lookup, no open handle (`collectable`).

Threading: all state is touched only on the trio thread. `commit()` hands a rendered batch
to the journal's thread lane (one thread, FIFO; see lanes.py), so batches commit in order.
"""

from __future__ import annotations

import logging
import stat
from typing import Any, Iterator

import trio

from safefs import ranges
from safefs.errors import FsError
from safefs.journal import Batch, Journal, Snapshot
from safefs.lanes import ThreadLane

log = logging.getLogger(__name__)

ROOT_INO = 1
BLink = tuple[int, bytes]  # (parent inode, name) of a backing link


def op_inodes(op: tuple[Any, ...]) -> tuple[int, ...]:
    """Every inode an op names (directories and objects)."""
    kind = op[0]
    if kind == "rename":
        return tuple(i for i in (op[1], op[3], op[6], op[7]) if i)
    if kind == "link":
        return (op[1], op[2])
    return (op[1], op[3])  # mkdir, create, unlink, rmdir: parent, name, inode


def op_names(op: tuple[Any, ...]) -> tuple[tuple[int, bytes], ...]:
    """Every (directory, name) an op changes."""
    kind = op[0]
    if kind == "rename":
        return ((op[1], op[2]), (op[3], op[4]))
    if kind == "link":
        return ((op[2], op[3]),)
    return ((op[1], op[2]),)  # mkdir, create, unlink, rmdir


class Inode:
    __slots__ = (
        # persisted
        "ino", "mode", "uid", "gid", "size", "rdev", "atime_ns", "mtime_ns", "ctime_ns",
        "target", "xattrs", "origin", "present", "dirty", "attr_dirty", "new", "listed",
        "parent", "blinks", "publishing", "low_size",
        # memory only
        "links", "nlink_dirs", "lookups", "opens", "changed_at", "version", "stale", "writing",
        "accessed_at",
    )  # fmt: skip

    def __init__(self, ino: int, mode: int, uid: int, gid: int, now_ns: int) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = 0
        self.rdev = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = now_ns
        self.target: bytes | None = None  # symlink target
        self.xattrs: dict[bytes, bytes] | None = {}  # None: not read from the backing tree yet
        self.origin: tuple[int, int, int, int] | None = None  # backing fingerprint when fetched/published
        self.present: ranges.RangeSet = ranges.EMPTY  # bytes held in the cache file
        self.dirty: ranges.RangeSet = ranges.EMPTY  # bytes not yet on the backing tree
        self.attr_dirty = False  # attributes (or size) not yet on the backing tree
        self.new = False  # not yet created on the backing tree
        self.listed = False  # directories: children loaded from the backing tree
        self.parent = 0  # directories: parent inode (the root is its own parent)
        self.blinks: list[BLink] = []  # where the object is on the backing tree
        # A publish under way: the staging path it renames from, or () for an in-place write.
        # After a crash it tells our own half-recorded publish from someone else's change.
        self.publishing: tuple[bytes, ...] | None = None
        # The smallest size since the last publish, if the file was cut: an in-place publish
        # cuts the backing file there first, so a later extension reads as zeros unwritten.
        self.low_size: int | None = None
        # Names in the cache view. A list, not a set: nearly every inode has one name, and a
        # set of one costs 216 bytes against 64 (a tree of 100,000 files: 15 MiB).
        self.links: list[BLink] = []
        self.nlink_dirs = 0  # directories: number of subdirectories
        self.lookups = 0  # kernel lookup count
        self.opens = 0  # open file handles
        self.changed_at = 0.0  # monotonic time of the last data/attr change (for write-back)
        self.version = 0  # bumped on every change of content or attributes
        self.stale = False  # directories: the backing tree may have changed since listed
        self.writing = 0  # writes whose bytes may not be in the cache file yet (see fs.write)
        self.accessed_at = 0.0  # monotonic time of the last read or write (for eviction)

    def add_link(self, parent: int, name: bytes) -> None:
        if (parent, name) not in self.links:
            # The same tuple as the backing link when there is one: one object, not two.
            self.links.append(next((b for b in self.blinks if b == (parent, name)), (parent, name)))

    def drop_link(self, parent: int, name: bytes) -> None:
        if (parent, name) in self.links:
            self.links.remove((parent, name))

    # -- kind ----------------------------------------------------------------------------
    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def nlink(self) -> int:
        if self.is_dir:
            return (2 + self.nlink_dirs) if self.links or self.ino == ROOT_INO else 0
        return len(self.links)

    @property
    def needs_flush(self) -> bool:
        return bool(self.dirty or self.attr_dirty)

    @property
    def complete(self) -> bool:
        """All bytes of the file are in the cache."""
        return ranges.covers(self.present, 0, self.size)

    def record(self) -> dict[str, Any]:
        return {
            "m": self.mode, "u": self.uid, "g": self.gid, "s": self.size, "r": self.rdev,
            "a": self.atime_ns, "t": self.mtime_ns, "c": self.ctime_ns, "l": self.target,
            "x": self.xattrs, "o": self.origin, "p": list(self.present), "d": list(self.dirty),
            "ad": self.attr_dirty, "n": self.new, "ls": self.listed, "pa": self.parent,
            "b": [list(b) for b in self.blinks], "pb": self.publishing, "lo": self.low_size,
        }  # fmt: skip

    @classmethod
    def from_record(cls, ino: int, rec: dict[str, Any]) -> "Inode":
        inode = cls(ino, rec["m"], rec["u"], rec["g"], rec["c"])
        inode.size, inode.rdev = rec["s"], rec["r"]
        inode.atime_ns, inode.mtime_ns = rec["a"], rec["t"]
        inode.target = rec["l"]
        inode.xattrs = dict(rec["x"]) if rec["x"] is not None else None
        inode.origin = tuple(rec["o"]) if rec["o"] else None  # type: ignore[assignment]
        inode.present = ranges.from_list(rec["p"])
        inode.dirty = ranges.from_list(rec["d"])
        inode.attr_dirty, inode.new, inode.listed = rec["ad"], rec["n"], rec["ls"]
        inode.parent = rec["pa"]
        inode.blinks = [(int(p), bytes(n)) for p, n in rec["b"]]
        inode.publishing = tuple(rec["pb"]) if rec.get("pb") is not None else None
        inode.low_size = rec.get("lo")
        return inode


class InodeTable:
    def __init__(self, journal: Journal, lane: ThreadLane) -> None:
        self._journal = journal
        self._lane = lane
        self.inodes: dict[int, Inode] = {}
        self.children: dict[int, dict[bytes, int]] = {}
        self.ops: dict[int, tuple[Any, ...]] = {}  # seq -> op not yet replayed
        self.op_times: dict[int, float] = {}  # seq -> monotonic time it happened (memory only)
        self._maybe_dirty: set[int] = set()  # every inode that needs a flush is in here
        self._op_refs: dict[int, int] = {}  # inode -> number of pending ops naming it
        # The flusher moves the backing view one op at a time; a reader that resolved a path
        # just before a move may miss the object, and looks again (Filesystem.on_backing).
        self.view_version = 0
        self.view_busy = False
        self.meta: dict[str, Any] = {}
        self.next_ino = ROOT_INO + 1
        self.next_seq = 1
        # keys changed since the last rendered batch
        self._marked_inodes: set[int] = set()
        self._marked_dentries: set[tuple[int, bytes]] = set()
        self._marked_ops: set[int] = set()
        self._marked_meta: set[str] = set()
        # group commit: batches are numbered; `_committed` is the highest number on disk
        self._batch_no = 0
        self._committed = 0
        self._committing = False
        self._commit_done = trio.Event()
        self.commits = 0
        self._synced_at = -1  # `commits` when the journal was last made durable

    # -- loading -------------------------------------------------------------------------
    def load(self, snap: Snapshot) -> None:
        self.meta = dict(snap.meta)
        for ino, rec in snap.inodes.items():
            self.inodes[ino] = Inode.from_record(ino, rec)
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
            self._count_refs(op, +1)
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

    def cache_path(self, ino: int) -> bytes:
        """A path of the inode in the cache view, for log lines and status (not for I/O)."""
        parts: list[bytes] = []
        inode = self.inodes.get(ino)
        guard = 0
        while inode is not None and inode.ino != ROOT_INO and inode.links and guard < 4096:
            parent, name = min(inode.links)
            parts.append(name)
            inode = self.inodes.get(parent)
            guard += 1
        return b"/" + b"/".join(reversed(parts))

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
    def new_inode(self, mode: int, uid: int, gid: int, now_ns: int) -> Inode:
        inode = Inode(self.next_ino, mode, uid, gid, now_ns)
        self.next_ino += 1
        self.set_meta("next_ino", self.next_ino)
        self.inodes[inode.ino] = inode
        self.mark(inode)
        return inode

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
        self._maybe_dirty.add(inode.ino)

    def set_meta(self, key: str, value: Any) -> None:
        self.meta[key] = value
        self._marked_meta.add(key)

    def append_op(self, op: tuple[Any, ...], now: float) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self.ops[seq] = op
        self.op_times[seq] = now
        self._count_refs(op, +1)
        self._marked_ops.add(seq)
        self.set_meta("next_seq", self.next_seq)
        return seq

    def _count_refs(self, op: tuple[Any, ...], delta: int) -> None:
        for ino in op_inodes(op):
            count = self._op_refs.get(ino, 0) + delta
            if count:
                self._op_refs[ino] = count
            else:
                self._op_refs.pop(ino, None)

    def drop_op(self, seq: int) -> None:
        op = self.ops.pop(seq, None)
        if op is not None:
            self._count_refs(op, -1)
        self.op_times.pop(seq, None)
        self._marked_ops.add(seq)

    def collectable(self, inode: Inode) -> bool:
        return (
            inode.ino != ROOT_INO
            and not inode.links
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
            batch.inodes[ino] = inode.record() if inode is not None else None
        for parent, name in self._marked_dentries:
            batch.dentries[(parent, name)] = self.children.get(parent, {}).get(name)
        for seq in self._marked_ops:
            batch.ops[seq] = self.ops.get(seq)
        for key in self._marked_meta:
            batch.meta[key] = self.meta[key]
        self._marked_inodes.clear()
        self._marked_dentries.clear()
        self._marked_ops.clear()
        self._marked_meta.clear()
        return batch

    @property
    def has_uncommitted(self) -> bool:
        return bool(self._marked_inodes or self._marked_dentries or self._marked_ops or self._marked_meta)

    async def commit(self) -> None:
        """Return once everything marked so far is in a committed transaction.

        While one batch commits in the worker thread, later callers' changes gather in the
        next batch; one of them commits it when the first finishes (group commit).
        """
        target = self._batch_no + 1 if self.has_uncommitted else self._batch_no
        while self._committed < target:
            if self._committing:
                await self._commit_done.wait()
                continue
            await self._commit_batch(None, None)

    def render_ahead(self) -> Batch | None:
        """Take what is marked now as a batch for `commit_with(ahead=...)` to commit before
        its action, or return None while a commit is under way (then `await commit()`).

        No await may come between this and that `commit_with`: a batch rendered by someone
        else meanwhile could carry the later state into the journal before the action ran.
        """
        return None if self._committing else self._render()

    async def commit_with(self, action: Any = None, *, then: Any = None, ahead: Batch | None = None) -> None:
        """Commit `ahead`, run `action` (a blocking cache write), commit what is marked, then
        run `then`, all in one thread trip.

        A thread hop costs more than a small write itself, so a write takes one, not two.
        The batch commits only if `action` succeeded; otherwise its keys stay marked and the
        error is raised (the caller restores what it changed in memory). While another commit
        is under way, it falls back to running `action` first, then joining the next batch.
        """
        if ahead is not None:
            assert not self._committing, "render_ahead() and commit_with() must not be apart"
        if not self._committing:
            await self._commit_batch(action, then, ahead)
            return
        if action is not None:
            await self._lane.run(action)
        await self.commit()
        if then is not None:
            await self._lane.run(then)

    async def _commit_batch(self, action: Any, then: Any, ahead: Batch | None = None) -> None:
        """Render what is marked and commit it in one worker-thread trip (see commit_with)."""
        self._committing = True
        self._batch_no += 1
        number = self._batch_no
        batch = self._render()

        def in_thread() -> None:
            if ahead:
                self._journal.commit(ahead)
            if action is not None:
                action()
            self._journal.commit(batch)
            if then is not None:
                then()  # after the commit: it may count on the batch being in the journal

        try:
            await self._lane.run(in_thread)
        except BaseException:
            if ahead:
                self._remark(ahead)  # committed or not, carrying it again is harmless
            self._remark(batch)
            raise
        finally:
            self._committing = False
            done, self._commit_done = self._commit_done, trio.Event()
            done.set()
        self._committed = number
        self.commits += 1

    def _remark(self, batch: Batch) -> None:
        """Not on disk: mark the keys again so the next commit carries them."""
        self._marked_inodes.update(batch.inodes)
        self._marked_dentries.update(batch.dentries)
        self._marked_ops.update(batch.ops)
        self._marked_meta.update(batch.meta)

    async def sync(self, also: Any = None) -> None:
        """Commit, then make the journal durable on the local disk.

        `also` (a blocking fsync of a cache file) runs in the same worker-thread trip.
        """
        if self._synced_at == self.commits and not self.has_uncommitted:
            if also is not None:  # the journal is durable already: only the file is left
                await self._lane.run(also)
            return

        def flush_to_disk() -> None:
            if also is not None:
                also()
            self._journal.sync()

        await self.commit_with(then=flush_to_disk)  # commit and flush in one thread trip
        self._synced_at = self.commits
