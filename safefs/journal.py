"""The crash-safe record of one mount's metadata: an LMDB environment in the cache dir.

This is the only module that imports lmdb. What the records mean and how they are encoded
is records.py's business; this module stores them.

What it stores (one environment per cache dir):
- `inodes`:   inode number -> the inode's record (records.InodeRecord: attributes, backing
              links, fingerprint)
- `extents`:  inode + kind (present/dirty) + start -> end: one key per byte range, so a
              write changes a few keys however many ranges its file has
- `dentries`: parent inode + name -> child inode (the namespace as the user sees it)
- `ops`:      sequence number -> a namespace change not yet replayed on the backing tree
- `meta`:     counters and facts about the cache (format, next inode, next op, boot id, ...)

Invariants:
- A change is acknowledged to an application only after the transaction holding it has
  committed (`commit` returned). A commit reaches the OS before `commit` returns, so a
  killed daemon loses nothing; it reaches the disk at `sync()` (called on fsync, on
  `safefs sync` and periodically). The environment is opened without per-commit fsync
  because a fsync per write() would cost more than the write itself; see DESIGN.md G2
  for the promise this keeps (write() survives a daemon crash, fsync() a host crash).
- Exactly one process uses a cache dir: `open` takes an exclusive `flock` on `lock` in the
  cache dir and raises `CacheBusy` when another daemon holds it.
- The journal holds records of `records.FORMAT`: `open` migrates a format-1 journal in one
  transaction (every dirty range kept) and refuses a format it does not know.

Threading: `commit` and `load` are short page-cache work, run inline on the trio thread
(every write transaction begins and ends on that one thread, as LMDB wants); `sync` waits
for the disk and runs in a worker thread, alongside commits (an fdatasync covers every
transaction committed before it began). `open` and `close` run at start-up and shut-down.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import marshal
import os
import struct
from pathlib import Path
from typing import Any

import lmdb

from safefs import records
from safefs.errors import CacheBusy, CacheFull, Refused

_U64 = struct.Struct(">Q")
MAP_SIZE = 1 << 38  # address space only; the file grows as records are added


def _key(n: int) -> bytes:
    return _U64.pack(n)


def _dentry_key(parent: int, name: bytes) -> bytes:
    return _U64.pack(parent) + name


Extent = tuple[int, bytes, int]  # inode, records.PRESENT or records.DIRTY, start


@dataclasses.dataclass
class Batch:
    """Concrete changes for one transaction. `None` as a value deletes the key; deleting an
    inode deletes its extents too."""

    inodes: dict[int, records.InodeRecord | None] = dataclasses.field(default_factory=dict)
    extents: dict[Extent, int | None] = dataclasses.field(default_factory=dict)  # -> end
    dentries: dict[tuple[int, bytes], int | None] = dataclasses.field(default_factory=dict)
    ops: dict[int, records.Op | None] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.inodes or self.extents or self.dentries or self.ops or self.meta)


@dataclasses.dataclass
class Snapshot:
    """Everything the journal holds, as loaded at startup."""

    meta: dict[str, Any]
    inodes: dict[int, records.InodeRecord]
    extents: dict[int, dict[bytes, list[tuple[int, int]]]]  # inode -> kind -> ranges in order
    dentries: list[tuple[int, bytes, int]]
    ops: list[tuple[int, records.Op]]


class Journal:
    def __init__(self, env: lmdb.Environment, lock_fd: int) -> None:
        self._env = env
        self._lock_fd = lock_fd
        self._inodes = env.open_db(b"inodes")
        self._extents = env.open_db(b"extents")
        self._dentries = env.open_db(b"dentries")
        self._ops = env.open_db(b"ops")
        self._meta = env.open_db(b"meta")

    @classmethod
    def open(cls, cache_dir: Path) -> Journal:
        """Lock the cache dir for this process and open its environment (migrating it)."""
        lock_fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise CacheBusy(
                f"another safefs daemon is using the cache dir {cache_dir}",
                hint="unmount that mount first, or pass a different --cache-dir",
            ) from None
        try:
            # lmdb would make the directory with `mode` (0600, no search bit): make it first.
            (cache_dir / "journal").mkdir(mode=0o700, exist_ok=True)
            os.chmod(cache_dir / "journal", 0o700)
            env = lmdb.open(
                str(cache_dir / "journal"),
                map_size=MAP_SIZE,
                max_dbs=8,
                sync=False,
                metasync=False,
                subdir=True,
                mode=0o600,
            )
        except BaseException:
            os.close(lock_fd)
            raise
        journal = cls(env, lock_fd)
        try:
            journal._upgrade(cache_dir)
        except BaseException:
            journal.close()
            raise
        return journal

    def _upgrade(self, cache_dir: Path) -> None:
        """Bring the journal to records.FORMAT, or refuse one this version cannot read."""
        with self._env.begin(write=True) as txn:
            raw = txn.get(records.FORMAT_KEY.encode(), db=self._meta)
            used = txn.stat(self._meta)["entries"] or txn.stat(self._inodes)["entries"]
            found = marshal.loads(raw) if raw is not None else (1 if used else None)
            if found == records.FORMAT:
                return
            if found not in (None, 1):
                raise Refused(
                    f"the cache dir {cache_dir} holds a journal of format {found}; "
                    f"this safefs reads format {records.FORMAT}",
                    hint="run `safefs sync` or `safefs umount` with the safefs version that wrote it first",
                )
            if found == 1:
                self._upgrade_from_1(txn)
            txn.put(records.FORMAT_KEY.encode(), marshal.dumps(records.FORMAT), db=self._meta)
        self._env.sync(True)

    def _upgrade_from_1(self, txn: lmdb.Transaction) -> None:
        """Format 1 kept each inode's ranges inside its record: split them into extents."""
        for key, value in list(txn.cursor(db=self._inodes)):
            ino = _U64.unpack(key)[0]
            rec, present, dirty = records.upgrade_inode(marshal.loads(value))
            txn.put(key, records.encode_inode(rec), db=self._inodes)
            for which, items in ((records.PRESENT, present), (records.DIRTY, dirty)):
                for start, end in items:
                    txn.put(records.extent_key(ino, which, start), records.encode_end(end), db=self._extents)
        for key, value in list(txn.cursor(db=self._ops)):
            txn.put(key, records.encode_op(records.upgrade_op(marshal.loads(value))), db=self._ops)

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()
        os.close(self._lock_fd)  # releases the flock

    def load(self) -> Snapshot:
        with self._env.begin() as txn:
            meta = {k.decode(): marshal.loads(v) for k, v in txn.cursor(db=self._meta)}
            inodes = {_U64.unpack(k)[0]: records.decode_inode(v) for k, v in txn.cursor(db=self._inodes)}
            extents: dict[int, dict[bytes, list[tuple[int, int]]]] = {}
            for k, v in txn.cursor(db=self._extents):
                ino, which, start = records.decode_extent_key(k)
                extents.setdefault(ino, {}).setdefault(which, []).append((start, records.decode_end(v)))
            dentries = [
                (_U64.unpack(k[:8])[0], bytes(k[8:]), _U64.unpack(v)[0])
                for k, v in txn.cursor(db=self._dentries)
            ]
            ops = [(_U64.unpack(k)[0], records.decode_op(v)) for k, v in txn.cursor(db=self._ops)]
        return Snapshot(meta, inodes, extents, dentries, ops)

    def commit(self, batch: Batch) -> None:
        """Write `batch` in one transaction. Raises CacheFull when the disk is full."""
        try:
            with self._env.begin(write=True) as txn:
                for k, v in batch.meta.items():
                    txn.put(k.encode(), marshal.dumps(v), db=self._meta)
                for ino, rec in batch.inodes.items():
                    if rec is None:
                        txn.delete(_key(ino), db=self._inodes)
                        self._delete_extents(txn, ino)
                    else:
                        txn.put(_key(ino), records.encode_inode(rec), db=self._inodes)
                for (ino, which, start), end in batch.extents.items():
                    key = records.extent_key(ino, which, start)
                    if end is None:
                        txn.delete(key, db=self._extents)
                    else:
                        txn.put(key, records.encode_end(end), db=self._extents)
                for (parent, name), child in batch.dentries.items():
                    if child is None:
                        txn.delete(_dentry_key(parent, name), db=self._dentries)
                    else:
                        txn.put(_dentry_key(parent, name), _key(child), db=self._dentries)
                for seq, op in batch.ops.items():
                    if op is None:
                        txn.delete(_key(seq), db=self._ops)
                    else:
                        txn.put(_key(seq), records.encode_op(op), db=self._ops)
        except lmdb.MapFullError as exc:  # pragma: no cover - 256 GiB of metadata
            raise CacheFull("journal: map full") from exc
        except lmdb.DiskError as exc:
            raise CacheFull(f"journal: disk error: {exc}") from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise CacheFull("journal: cache disk full") from exc
            raise

    def _delete_extents(self, txn: lmdb.Transaction, ino: int) -> None:
        prefix = records.extent_prefix(ino)
        cursor = txn.cursor(db=self._extents)
        if cursor.set_range(prefix):
            while cursor.key()[:8] == prefix and cursor.delete():
                pass

    def sync(self) -> None:
        """Make every committed transaction durable on the local disk."""
        self._env.sync(True)
