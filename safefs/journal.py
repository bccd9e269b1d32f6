"""The crash-safe record of one mount's metadata: an LMDB environment in the cache dir.

This is the only module that imports lmdb.

What it stores (one environment per cache dir):
- `inodes`:   inode number -> the inode's record (attributes, backing links, fingerprint,
              present and dirty byte ranges)
- `dentries`: parent inode + name -> child inode (the namespace as the user sees it)
- `ops`:      sequence number -> a namespace change not yet replayed on the backing tree
- `meta`:     counters and facts about the cache (next inode, next op, boot id, ...)

Invariants:
- A change is acknowledged to an application only after the transaction holding it has
  committed (`commit` returned). A commit reaches the OS before `commit` returns, so a
  killed daemon loses nothing; it reaches the disk at `sync()` (called on fsync, on
  `safefs sync` and periodically). The environment is opened without per-commit fsync
  because a fsync per write() would cost more than the write itself; see DESIGN.md G2
  for the promise this keeps (write() survives a daemon crash, fsync() a host crash).
- Exactly one process uses a cache dir: `open` takes an exclusive `flock` on `lock` in the
  cache dir and raises `CacheBusy` when another daemon holds it.

Threading: every method blocks (disk I/O) and must run in a worker thread behind the
journal limiter, which has one slot: LMDB ties a write transaction to the thread that began
it, and no transaction here ever outlives the call that opened it.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import marshal
import os
import struct
from pathlib import Path
from typing import Any, Iterator

import lmdb

from safefs.errors import CacheBusy, CacheFull

_U64 = struct.Struct(">Q")
MAP_SIZE = 1 << 38  # address space only; the file grows as records are added


def _key(n: int) -> bytes:
    return _U64.pack(n)


def _dentry_key(parent: int, name: bytes) -> bytes:
    return _U64.pack(parent) + name


@dataclasses.dataclass
class Batch:
    """Concrete changes for one transaction. `None` as a value deletes the key."""

    inodes: dict[int, dict[str, Any] | None] = dataclasses.field(default_factory=dict)
    dentries: dict[tuple[int, bytes], int | None] = dataclasses.field(default_factory=dict)
    ops: dict[int, tuple[Any, ...] | None] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.inodes or self.dentries or self.ops or self.meta)


@dataclasses.dataclass
class Snapshot:
    """Everything the journal holds, as loaded at startup."""

    meta: dict[str, Any]
    inodes: dict[int, dict[str, Any]]
    dentries: list[tuple[int, bytes, int]]
    ops: list[tuple[int, tuple[Any, ...]]]


class Journal:
    def __init__(self, env: lmdb.Environment, lock_fd: int) -> None:
        self._env = env
        self._lock_fd = lock_fd
        self._inodes = env.open_db(b"inodes")
        self._dentries = env.open_db(b"dentries")
        self._ops = env.open_db(b"ops")
        self._meta = env.open_db(b"meta")

    @classmethod
    def open(cls, cache_dir: Path) -> "Journal":
        """Lock the cache dir for this process and open its environment."""
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
        return cls(env, lock_fd)

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()
        os.close(self._lock_fd)  # releases the flock

    def load(self) -> Snapshot:
        with self._env.begin() as txn:
            meta = {k.decode(): marshal.loads(v) for k, v in txn.cursor(db=self._meta)}
            inodes = {_U64.unpack(k)[0]: marshal.loads(v) for k, v in txn.cursor(db=self._inodes)}
            dentries = [
                (_U64.unpack(k[:8])[0], bytes(k[8:]), _U64.unpack(v)[0])
                for k, v in txn.cursor(db=self._dentries)
            ]
            ops = [(_U64.unpack(k)[0], marshal.loads(v)) for k, v in txn.cursor(db=self._ops)]
        return Snapshot(meta, inodes, dentries, ops)

    def commit(self, batch: Batch) -> None:
        """Write `batch` in one transaction. Raises CacheFull when the disk is full."""
        try:
            with self._env.begin(write=True) as txn:
                for k, v in batch.meta.items():
                    txn.put(k.encode(), marshal.dumps(v), db=self._meta)
                for ino, rec in batch.inodes.items():
                    if rec is None:
                        txn.delete(_key(ino), db=self._inodes)
                    else:
                        txn.put(_key(ino), marshal.dumps(rec), db=self._inodes)
                for (parent, name), child in batch.dentries.items():
                    if child is None:
                        txn.delete(_dentry_key(parent, name), db=self._dentries)
                    else:
                        txn.put(_dentry_key(parent, name), _key(child), db=self._dentries)
                for seq, op in batch.ops.items():
                    if op is None:
                        txn.delete(_key(seq), db=self._ops)
                    else:
                        txn.put(_key(seq), marshal.dumps(op), db=self._ops)
        except lmdb.MapFullError as exc:  # pragma: no cover - 256 GiB of metadata
            raise CacheFull("journal: map full") from exc
        except lmdb.DiskError as exc:
            raise CacheFull(f"journal: disk error: {exc}") from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise CacheFull("journal: cache disk full") from exc
            raise

    def sync(self) -> None:
        """Make every committed transaction durable on the local disk."""
        self._env.sync(True)

    def iter_ops(self) -> Iterator[tuple[int, tuple[Any, ...]]]:
        with self._env.begin() as txn:
            for k, v in txn.cursor(db=self._ops):
                yield _U64.unpack(k)[0], marshal.loads(v)
