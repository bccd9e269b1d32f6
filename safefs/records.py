"""The journal's record types and their encoding: the one place that knows its on-disk format.

What the journal stores, as types:
- `InodeRecord`: an inode's attributes, backing links and fingerprint (no byte ranges);
- extents: one key per byte range of a file, present or dirty (`extent_key`), so recording
  a write touches a few keys however many ranges the file has;
- op log entries (`Create`, `Mkdir`, `Unlink`, `Rmdir`, `Link`, `Rename`): the namespace
  changes not yet replayed on the backing tree, each with a `kind` that names the flusher's
  handler and the fields it takes, in order (`fields()`).

Invariants:
- `FORMAT` is the version of everything encoded here; the journal stores it in its meta
  table. A cache dir of format 1 (before there was a version: one marshalled dict per inode
  holding its ranges, ops as plain tuples) is migrated on open by `upgrade_inode`, in one
  transaction, keeping every dirty range; a later format than FORMAT is refused.
- Encoding is `marshal` of plain tuples in field order: no pickle, nothing executable.
- Records are frozen: a changed op or inode is a new record (`dataclasses.replace`).

Threading: pure functions and immutable values; safe from any thread. No I/O.
"""

from __future__ import annotations

import dataclasses
import marshal
import operator
import struct
from typing import Any, ClassVar

FORMAT = 2
FORMAT_KEY = "format"  # meta key holding the format of the journal

_U64 = struct.Struct(">Q")
PRESENT, DIRTY = b"p", b"d"  # the two kinds of extent of a file


# -- op log ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Op:
    kind: ClassVar[str]

    def fields(self) -> tuple[Any, ...]:
        """The fields in declaration order (the flusher's handler takes them so)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @property
    def inodes(self) -> tuple[int, ...]:
        """Every inode the op names (directories and objects)."""
        raise NotImplementedError

    @property
    def dirs(self) -> tuple[int, ...]:
        """The directories whose entries the op changes."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _EntryOp(_Op):
    """An op on one name in one directory: `name` in `parent` is (or was) inode `ino`."""

    parent: int
    name: bytes
    ino: int

    @property
    def inodes(self) -> tuple[int, ...]:
        return (self.parent, self.ino)

    @property
    def dirs(self) -> tuple[int, ...]:
        return (self.parent,)


@dataclasses.dataclass(frozen=True)
class Create(_EntryOp):
    """A new file, symlink or device node (its content and attributes are the inode's)."""

    kind: ClassVar[str] = "create"


@dataclasses.dataclass(frozen=True)
class Mkdir(_EntryOp):
    kind: ClassVar[str] = "mkdir"


@dataclasses.dataclass(frozen=True)
class Unlink(_EntryOp):
    kind: ClassVar[str] = "unlink"


@dataclasses.dataclass(frozen=True)
class Rmdir(_EntryOp):
    kind: ClassVar[str] = "rmdir"


@dataclasses.dataclass(frozen=True)
class Link(_Op):
    """A new name `name` in `parent` for the existing inode `ino`."""

    kind: ClassVar[str] = "link"
    ino: int
    parent: int
    name: bytes

    @property
    def inodes(self) -> tuple[int, ...]:
        return (self.ino, self.parent)

    @property
    def dirs(self) -> tuple[int, ...]:
        return (self.parent,)


@dataclasses.dataclass(frozen=True)
class Rename(_Op):
    """rename(2) with its flags; `dst` is the inode replaced or exchanged, 0 if none."""

    kind: ClassVar[str] = "rename"
    p_old: int
    n_old: bytes
    p_new: int
    n_new: bytes
    flags: int
    src: int
    dst: int

    @property
    def inodes(self) -> tuple[int, ...]:
        return tuple(i for i in (self.p_old, self.p_new, self.src, self.dst) if i)

    @property
    def dirs(self) -> tuple[int, ...]:
        return (self.p_old, self.p_new)


Op = Create | Mkdir | Unlink | Rmdir | Link | Rename
OP_TYPES: dict[str, type[Op]] = {t.kind: t for t in (Create, Mkdir, Unlink, Rmdir, Link, Rename)}


def encode_op(op: Op) -> bytes:
    return marshal.dumps((op.kind, *op.fields()))


def decode_op(data: bytes) -> Op:
    kind, *fields = marshal.loads(data)
    return OP_TYPES[kind](*fields)


# -- inodes ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InodeRecord:
    """What the journal keeps of an inode besides its byte ranges (see inodes.Inode)."""

    mode: int
    uid: int
    gid: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    target: bytes | None
    xattrs: dict[bytes, bytes] | None
    origin: tuple[int, int, int, int] | None
    attr_dirty: bool
    new: bool
    listed: bool
    parent: int
    blinks: tuple[tuple[int, bytes], ...]
    publishing: tuple[bytes, ...] | None
    low_size: int | None
    # "May be dirty": the content file may hold bytes the journal did not record (set before
    # the first change to a clean part of the file), so a replay takes every present byte
    # for dirty. Cleared when a write-back leaves the file clean.
    unclean: bool = False


def encode_inode(rec: InodeRecord) -> bytes:
    return marshal.dumps(_inode_values(rec))


def decode_inode(data: bytes) -> InodeRecord:
    values = list(marshal.loads(data))
    values[10] = tuple(values[10]) if values[10] is not None else None  # origin
    values[15] = tuple((int(p), bytes(n)) for p, n in values[15])  # blinks
    values[16] = tuple(values[16]) if values[16] is not None else None  # publishing
    return InodeRecord(*values)


_INODE_FIELDS = dataclasses.fields(InodeRecord)
# The fields' values as a tuple, in their order, fetched in C: every commit encodes each inode
# it carries, and a listing of 100,000 entries commits 100,000 of them.
_inode_values = operator.attrgetter(*(f.name for f in _INODE_FIELDS))


# -- extents -----------------------------------------------------------------------------
def extent_key(ino: int, which: bytes, start: int) -> bytes:
    """Keys sort by inode, then kind, then start: one file's ranges are one cursor walk."""
    return _U64.pack(ino) + which + _U64.pack(start)


def extent_prefix(ino: int) -> bytes:
    return _U64.pack(ino)


def decode_extent_key(key: bytes) -> tuple[int, bytes, int]:
    return _U64.unpack(key[:8])[0], bytes(key[8:9]), _U64.unpack(key[9:17])[0]


def encode_end(end: int) -> bytes:
    return _U64.pack(end)


def decode_end(data: bytes) -> int:
    return int(_U64.unpack(data)[0])


# -- format 1 ----------------------------------------------------------------------------
def upgrade_inode(old: dict[str, Any]) -> tuple[InodeRecord, list[tuple[int, int]], list[tuple[int, int]]]:
    """A format-1 inode record (a dict with its ranges) as a record, present and dirty ranges."""
    rec = InodeRecord(
        mode=old["m"], uid=old["u"], gid=old["g"], size=old["s"], rdev=old["r"],
        atime_ns=old["a"], mtime_ns=old["t"], ctime_ns=old["c"], target=old["l"],
        xattrs=dict(old["x"]) if old["x"] is not None else None,
        origin=tuple(old["o"]) if old["o"] else None,
        attr_dirty=old["ad"], new=old["n"], listed=old["ls"], parent=old["pa"],
        blinks=tuple((int(p), bytes(n)) for p, n in old["b"]),
        publishing=tuple(old["pb"]) if old.get("pb") is not None else None,
        low_size=old.get("lo"), unclean=False,
    )  # fmt: skip
    return rec, [(s, e) for s, e in old["p"]], [(s, e) for s, e in old["d"]]


def upgrade_op(old: tuple[Any, ...]) -> Op:
    """A format-1 op (a tuple, kind first) as a typed op."""
    kind, *fields = old
    return OP_TYPES[kind](*fields)
