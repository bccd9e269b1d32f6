"""One inode in memory: its attributes, where it is in the two namespaces, and the byte ranges
of its content that are present in the cache and that are dirty.

The inode table (inodes.py) owns the record: outside these two modules no code assigns its
cache, write-back or backing-view fields (tests/unit/test_privates.py checks it); they change
through InodeTable methods, or on the write path through the record's own range methods
(`add_present`, `add_dirty`, `undo`). Each range is one journal key (records.extent_key): the
ranges changed since the last rendered batch are noted (`take_extents`), so a commit writes
only those.

Threading: trio thread only, like the table that owns it.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence

from safefs import ranges, records

ROOT_INO = 1
BLink = tuple[int, bytes]  # (parent inode, name) of a backing link


class Inode:
    __slots__ = (
        # persisted
        "ino", "mode", "uid", "gid", "size", "rdev", "atime_ns", "mtime_ns", "ctime_ns",
        "target", "xattrs", "origin", "_present", "_dirty", "attr_dirty", "new", "listed",
        "parent", "blinks", "publishing", "low_size", "unclean",
        # memory only
        "links", "nlink_dirs", "lookups", "opens", "changed_at", "version", "stale", "writing",
        "accessed_at", "_extent_marks", "data_commit",
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
        self._present: ranges.RangeSet | list[ranges.Range] = ranges.EMPTY  # bytes held in the cache file
        self._dirty: ranges.RangeSet | list[ranges.Range] = ranges.EMPTY  # bytes not yet on the backing tree
        # Extents (kind, start) changed since the last rendered batch; None while there are none.
        self._extent_marks: set[tuple[bytes, int]] | None = None
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
        # The cache file may hold bytes not recorded as dirty (see records.InodeRecord.unclean).
        self.unclean = False
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
        # The last commit (InodeTable.commits) that changed more of the inode than its times:
        # once the journal is flushed past it, its size and byte ranges are on the disk.
        self.data_commit = 0

    # -- byte ranges (each range is one journal key: records.extent_key) ---------------------
    # Each set is a tuple (immutable: what `present`/`dirty` return, safe to keep), or, while
    # writes add to it, a list changed in place (`add_present`/`add_dirty`), so a write into
    # a file with many ranges costs a memmove, not a copy of every range. Reading the
    # property turns the list back into a tuple; `gaps` reads either without converting.
    @property
    def present(self) -> ranges.RangeSet:
        if self._present.__class__ is list:
            self._present = tuple(self._present)
        return self._present  # type: ignore[return-value]

    @present.setter
    def present(self, value: ranges.RangeSet) -> None:
        self._note_changes(records.PRESENT, self._present, value)
        self._present = value

    @property
    def dirty(self) -> ranges.RangeSet:
        if self._dirty.__class__ is list:
            self._dirty = tuple(self._dirty)
        return self._dirty  # type: ignore[return-value]

    @dirty.setter
    def dirty(self, value: ranges.RangeSet) -> None:
        self._note_changes(records.DIRTY, self._dirty, value)
        self._dirty = value

    def gaps(self, which: bytes, start: int, end: int) -> list[ranges.Range]:
        """The parts of [start, end) not in the present (or dirty) set."""
        rs = self._present if which == records.PRESENT else self._dirty
        return ranges.missing(rs, start, end)

    def add_present(self, start: int, end: int) -> tuple[bytes, ranges.Change] | None:
        """`present |= [start, end)`, noting only the extents that change; the return value
        takes the change back (`undo`)."""
        if self._present.__class__ is not list:
            self._present = list(self._present)
        return self._added(records.PRESENT, ranges.add_in_place(self._present, start, end))

    def add_dirty(self, start: int, end: int) -> tuple[bytes, ranges.Change] | None:
        if self._dirty.__class__ is not list:
            self._dirty = list(self._dirty)
        return self._added(records.DIRTY, ranges.add_in_place(self._dirty, start, end))

    def _added(self, which: bytes, change: ranges.Change | None) -> tuple[bytes, ranges.Change] | None:
        if change is None:
            return None
        _, gone, made = change
        self.note_extent(which, made[0])
        for s, _ in gone:
            self.note_extent(which, s)
        return which, change

    def undo(self, changes: list[tuple[bytes, ranges.Change] | None]) -> None:
        """Take back `add_present`/`add_dirty` changes, the last first, none made since."""
        for item in reversed(changes):
            if item is None:
                continue
            which, change = item
            if which == records.PRESENT:
                if self._present.__class__ is not list:
                    self._present = list(self._present)
                ranges.undo_in_place(self._present, change)
            else:
                if self._dirty.__class__ is not list:
                    self._dirty = list(self._dirty)
                ranges.undo_in_place(self._dirty, change)
            self._added(which, change)  # the same extents change back

    def _note_changes(self, which: bytes, old: Sequence[ranges.Range], new: ranges.RangeSet) -> None:
        if old is new:
            return
        changed = set(old).symmetric_difference(new)
        if changed:
            marks = self._extent_marks if self._extent_marks is not None else set()
            marks.update((which, s) for s, _ in changed)
            self._extent_marks = marks

    def note_extent(self, which: bytes, start: int) -> None:
        """The extent at `start` must be written again (its last batch did not commit)."""
        if self._extent_marks is None:
            self._extent_marks = set()
        self._extent_marks.add((which, start))

    @property
    def has_extent_changes(self) -> bool:
        """Are extents changed since the last rendered batch (see `take_extents`)?"""
        return bool(self._extent_marks)

    def take_extents(self) -> dict[tuple[bytes, int], int | None]:
        """The changed extents as they are now (start -> end, None: gone), and forget them."""
        marks, self._extent_marks = self._extent_marks, None
        out: dict[tuple[bytes, int], int | None] = {}
        for which, start in marks or ():
            out[which, start] = ranges.end_at(self._present if which == records.PRESENT else self._dirty, start)
        return out

    def add_link(self, parent: int, name: bytes) -> None:
        link = (parent, name)
        if link not in self.links:
            # The same tuple as the backing link when there is one: one object, not two. A
            # loop, not next() over a generator: listing a directory calls this per entry.
            for blink in self.blinks:
                if blink == link:
                    link = blink
                    break
            self.links.append(link)

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
        return not self.gaps(records.PRESENT, 0, self.size)

    def record(self) -> records.InodeRecord:
        """What the journal keeps of the inode, its byte ranges aside (see take_extents)."""
        return records.InodeRecord(
            mode=self.mode, uid=self.uid, gid=self.gid, size=self.size, rdev=self.rdev,
            atime_ns=self.atime_ns, mtime_ns=self.mtime_ns, ctime_ns=self.ctime_ns,
            target=self.target, xattrs=self.xattrs, origin=self.origin,
            attr_dirty=self.attr_dirty, new=self.new, listed=self.listed, parent=self.parent,
            blinks=tuple(self.blinks), publishing=self.publishing, low_size=self.low_size,
            unclean=self.unclean,
        )  # fmt: skip

    @classmethod
    def from_record(cls, ino: int, rec: records.InodeRecord, extents: dict[bytes, list[ranges.Range]]) -> Inode:
        inode = cls(ino, rec.mode, rec.uid, rec.gid, rec.ctime_ns)
        inode.size, inode.rdev = rec.size, rec.rdev
        inode.atime_ns, inode.mtime_ns = rec.atime_ns, rec.mtime_ns
        inode.target = rec.target
        inode.xattrs = dict(rec.xattrs) if rec.xattrs is not None else None
        inode.origin = rec.origin
        inode._present = ranges.from_sorted(extents.get(records.PRESENT, ()))
        inode._dirty = ranges.from_sorted(extents.get(records.DIRTY, ()))
        inode.attr_dirty, inode.new, inode.listed = rec.attr_dirty, rec.new, rec.listed
        inode.parent = rec.parent
        inode.blinks = list(rec.blinks)
        inode.publishing = rec.publishing
        inode.low_size = rec.low_size
        inode.unclean = rec.unclean
        if rec.unclean:  # a write may have reached the cache file but not the journal
            inode.dirty = ranges.from_sorted(sorted((*inode._dirty, *ranges.clip(inode._present, rec.size))))
        return inode
