"""faultfs: a pass-through FUSE filesystem that stands in for NFS in tests and benchmarks.

    python -m tests.faultfs REAL MNT --control SOCK [--latency-ms MS]
        [--metadata-latency-ms MS] [--data-latency-ms MS] [--cache-timeout S] [--debug]

It exposes the directory REAL at MNT, passing every operation through to REAL, and on command
(a line protocol on the Unix socket SOCK, see `Faults.command`) it fails chosen operations with
an errno, hangs them until released, or delays them. `FaultFS.start(...)` runs it as a child
process for a test or a benchmark and `FaultFS.stop()` always unmounts and reaps it.

Behaves like a non-caching remote:
- Entry and attribute timeouts are 0 (unless --cache-timeout) and opens drop the page cache
  (no keep_cache), so the kernel asks for every lookup and every stat, like an NFS client
  with actimeo=0 and close-to-open consistency. No kernel writeback cache: each write()
  reaches REAL.
- Inode numbers are REAL's st_ino (REAL's root is swapped with FUSE's ROOT_INODE). REAL must be
  one filesystem: a second filesystem mounted inside it could repeat inode numbers.
- An inode is known by the (parent inode, name) pairs the kernel looked it up under. Before an
  operation acts on a path it checks with lstat that the path still names that inode; when no
  known name does any more (someone renamed or deleted it in REAL directly) the answer is
  ESTALE, as NFS gives for a stale file handle.

Invariants:
- Fault rules are checked before an operation touches REAL: a failed or hung operation has had
  no effect. A hung operation waits on the trio thread, not in a worker thread, so any number
  can hang without starving the others; `release` (or `clear`, or shutdown) wakes them all.
- Latency is slept in the worker thread right before the system call (time.sleep is precise
  to tens of microseconds; trio's timers round up to whole milliseconds).
- No exception escapes into pyfuse3: OSError becomes its errno, anything else is logged and
  answered with EIO.

Threading: the FUSE handlers, the inode table and the fault rules live on the trio thread.
Every blocking call on REAL runs in a worker thread (trio.to_thread, behind one limiter) and
gets only plain values (paths, fds) from the trio side, never the shared tables.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import functools
import json
import logging
import os
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

log = logging.getLogger("faultfs")

REPO = Path(__file__).resolve().parent.parent
ROOT_INODE = 1  # pyfuse3.ROOT_INODE; the value is fixed by the FUSE protocol
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Which latency class each operation pays: "data" moves file contents, "meta" the rest.
# Closing a file, forgetting an inode and releasing a directory cost no round trip on NFS.
DATA_OPS = frozenset({"read", "write", "fsync", "fsyncdir"})
FREE_OPS = frozenset({"flush", "release", "releasedir", "forget"})
READDIR_BATCH = 128  # entries lstat-ed per worker-thread call
ALL_OPS = frozenset({
    "lookup", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink", "rmdir", "symlink",
    "rename", "link", "open", "create", "read", "write", "flush", "release", "fsync", "opendir",
    "readdir", "releasedir", "fsyncdir", "statfs", "setxattr", "getxattr", "listxattr",
    "removexattr",
})


# --- fault rules (pure, trio thread) ---------------------------------------------------------


@dataclasses.dataclass
class Rule:
    action: str  # "fail" or "hang"
    ops: frozenset[str] | None  # None: every operation
    prefix: bytes | None  # "/dir" matches /dir and everything below it; None: any path
    error: int = 0  # the errno of a "fail"
    times: int | None = None  # how many more operations it applies to; None: until cleared

    def matches(self, op: str, paths: Sequence[bytes]) -> bool:
        if self.ops is not None and op not in self.ops:
            return False
        if self.prefix is None or self.prefix == b"/":
            return True
        under = self.prefix.rstrip(b"/") + b"/"
        return any(p == self.prefix or p.startswith(under) for p in paths)


def errno_by_name(name: str) -> int:
    value = getattr(errno, name.upper(), None)
    if not isinstance(value, int) or not name.upper().startswith("E"):
        raise ValueError(f"unknown errno name {name!r}")
    return value


def parse_ops(text: str) -> frozenset[str] | None:
    if text in ("*", "all"):
        return None
    ops = frozenset(text.split(","))
    unknown = ops - ALL_OPS
    if unknown:
        raise ValueError(f"unknown operation(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(ALL_OPS))}")
    return ops


class Faults:
    """Fault rules, latency and counters; `command(line)` is the control protocol.

    Commands (one per line, words split like a shell does, so a prefix may be quoted):
      ping                                  -> ok pong
      fail OPS ERRNO [PREFIX] [times=N]     -> ok   (OPS: "read", "read,write" or "*")
      hang OPS [PREFIX] [times=N]           -> ok
      release                               -> ok released=K  (wakes hung ops, drops hang rules)
      clear                                 -> ok released=K  (drops every rule, wakes hung ops)
      latency MS [meta|data|all]            -> ok
      counters                              -> ok {JSON}
      reset                                 -> ok  (zeroes the counters)
    PREFIX is a path inside the mount starting with "/". Any other reply starts with "error ".
    """

    def __init__(self, meta_latency: float, data_latency: float) -> None:
        self.rules: list[Rule] = []
        self.meta_latency = meta_latency  # seconds
        self.data_latency = data_latency
        self._released = trio.Event()
        self.hung_now = 0
        self.calls: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.hung_total = 0
        self.bytes_read = 0
        self.bytes_written = 0

    def latency_for(self, op: str) -> float:
        if op in FREE_OPS:
            return 0.0
        return self.data_latency if op in DATA_OPS else self.meta_latency

    async def gate(self, op: str, paths: Sequence[bytes]) -> None:
        """Count `op`; raise its injected error or wait while a hang rule holds it."""
        self.calls[op] = self.calls.get(op, 0) + 1
        while True:
            rule = self._take(op, paths)
            if rule is None:
                return
            if rule.action == "fail":
                self.failed[op] = self.failed.get(op, 0) + 1
                raise OSError(rule.error, os.strerror(rule.error))
            self.hung_now += 1
            self.hung_total += 1
            released = self._released
            try:
                await released.wait()
            finally:
                self.hung_now -= 1
            # Released: look again, a fail rule may still apply.

    def _take(self, op: str, paths: Sequence[bytes]) -> Rule | None:
        for rule in self.rules:
            if rule.matches(op, paths):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self.rules.remove(rule)
                return rule
        return None

    def release(self, *, hangs_only: bool = True) -> int:
        woken = self.hung_now
        self.rules = [r for r in self.rules if hangs_only and r.action != "hang"]
        self._released.set()
        self._released = trio.Event()
        return woken

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "failed": dict(self.failed),
            "hung_now": self.hung_now,
            "hung_total": self.hung_total,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "latency_ms": {"meta": self.meta_latency * 1e3, "data": self.data_latency * 1e3},
            "rules": [
                {"action": r.action, "ops": sorted(r.ops) if r.ops else "*", "error": errno.errorcode.get(r.error),
                 "prefix": os.fsdecode(r.prefix) if r.prefix else None, "times": r.times}
                for r in self.rules
            ],
        }

    def command(self, line: str) -> str:
        try:
            return "ok" + self._command(shlex.split(line))
        except (ValueError, IndexError) as exc:
            return f"error {exc}"

    def _command(self, words: list[str]) -> str:
        if not words:
            raise ValueError("empty command")
        verb, args = words[0], words[1:]
        if verb == "ping":
            return " pong"
        if verb in ("fail", "hang"):
            times = None
            rest = []
            for word in args:
                if word.startswith("times="):
                    times = int(word[6:])
                    if times < 1:
                        raise ValueError("times must be at least 1")
                else:
                    rest.append(word)
            ops = parse_ops(rest.pop(0))
            error = errno_by_name(rest.pop(0)) if verb == "fail" else 0
            prefix = os.fsencode(rest.pop(0)) if rest else None
            if rest:
                raise ValueError(f"unexpected words {rest}")
            if prefix is not None and not prefix.startswith(b"/"):
                raise ValueError("a prefix is a path inside the mount starting with /")
            self.rules.append(Rule(verb, ops, prefix, error, times))
            return ""
        if verb == "release":
            return f" released={self.release(hangs_only=True)}"
        if verb == "clear":
            return f" released={self.release(hangs_only=False)}"
        if verb == "latency":
            seconds = float(args[0]) / 1e3
            which = args[1] if len(args) > 1 else "all"
            if seconds < 0 or which not in ("meta", "data", "all"):
                raise ValueError("usage: latency MS [meta|data|all]")
            if which in ("meta", "all"):
                self.meta_latency = seconds
            if which in ("data", "all"):
                self.data_latency = seconds
            return ""
        if verb == "counters":
            return " " + json.dumps(self.snapshot(), sort_keys=True)
        if verb == "reset":
            self.calls.clear()
            self.failed.clear()
            self.hung_total = self.bytes_read = self.bytes_written = 0
            return ""
        raise ValueError(f"unknown command {verb!r}")


# --- blocking helpers (worker threads) -------------------------------------------------------


def _verify(candidates: Sequence[bytes], real_ino: int) -> tuple[int, os.stat_result]:
    """The index of the first candidate path that still names `real_ino`, and its lstat."""
    for i, path in enumerate(candidates):
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if st.st_ino == real_ino:
            return i, st
    raise OSError(errno.ESTALE, "stale file handle (no known name names this inode any more)")


def _list_names(dir_fd: int) -> list[bytes]:
    with os.scandir(dir_fd) as entries:  # scandir reads a dup of the fd and rewinds it
        return sorted(os.fsencode(e.name) for e in entries)


def _lstat_batch(dir_fd: int, names: Sequence[bytes]) -> list[os.stat_result | None]:
    out: list[os.stat_result | None] = []
    for name in names:
        try:
            out.append(os.stat(name, dir_fd=dir_fd, follow_symlinks=False))
        except FileNotFoundError:
            out.append(None)
    return out


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


def _rename(old: bytes, new: bytes, flags: int) -> None:
    if flags == 0:
        os.rename(old, new)
        return
    # RENAME_NOREPLACE / RENAME_EXCHANGE: the stdlib has no renameat2.
    if _libc.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, ctypes.c_uint(flags)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _ino_or_none(path: bytes) -> int | None:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return None


def _give_to(path: bytes, uid: int, gid: int) -> None:
    """Make a new object belong to the caller, as an NFS server does (we may run as root)."""
    if os.geteuid() != 0 or uid == 0:
        return
    parent = os.lstat(os.path.dirname(path))
    if parent.st_mode & stat.S_ISGID:
        gid = -1  # a setgid directory already gave it its group
    os.lchown(path, uid, gid)


# --- the filesystem (trio thread) ------------------------------------------------------------


@dataclasses.dataclass
class Node:
    # (parent fuse inode, name) -> None, oldest first: a dict is an ordered set, and the name
    # most recently confirmed by a lookup is tried first.
    names: dict[tuple[int, bytes], None] = dataclasses.field(default_factory=dict)
    lookups: int = 0


def handler(fn: F) -> F:
    """Answer an OSError with its errno and any other exception (a bug) with EIO, logged."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: PassThrough, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s%r", op, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class PassThrough(pyfuse3.Operations):
    """REAL passed through, with `faults` deciding what fails, hangs or waits."""

    enable_writeback_cache = False

    def __init__(self, root: bytes, faults: Faults, cache_timeout: float = 0.0) -> None:
        super().__init__()
        self.root = root
        self.faults = faults
        self.cache_timeout = cache_timeout  # kernel entry/attr timeout; 0 = ask every time
        self.root_real_ino = os.lstat(root).st_ino
        self.nodes: dict[int, Node] = {}
        self.files: dict[int, tuple[int, bytes]] = {}  # fh (a real fd) -> (inode, path at open)
        self.open_fds: dict[int, set[int]] = {}  # inode -> its open fds
        self.listings: dict[int, list[bytes]] = {}  # directory fh -> names, sorted
        self.limiter = trio.CapacityLimiter(64)

    # -- inode numbers and names

    def fuse_ino(self, real: int) -> int:
        # Swap REAL's root with ROOT_INODE so both numbers stay unique.
        if real == self.root_real_ino:
            return ROOT_INODE
        return self.root_real_ino if real == ROOT_INODE else real

    real_ino = fuse_ino  # the swap is its own inverse

    def _dir_path(self, ino: int) -> bytes:
        parts: list[bytes] = []
        while ino != ROOT_INODE:
            node = self.nodes.get(ino)
            if node is None or not node.names:
                raise OSError(errno.ESTALE, "stale directory")
            ino, name = next(reversed(node.names))
            parts.append(name)
            if len(parts) > 4096:
                raise OSError(errno.ELOOP, "directory loop")
        return b"/".join([self.root, *reversed(parts)])

    def _names(self, ino: int) -> tuple[list[tuple[int, bytes]], list[bytes]]:
        """Known (parent, name) pairs of `ino`, most recent first, and their full paths."""
        if ino == ROOT_INODE:
            return [], [self.root]
        node = self.nodes.get(ino)
        if node is None or not node.names:
            raise OSError(errno.ESTALE, "unknown inode")
        pairs = list(reversed(node.names))
        paths = []
        for parent, name in pairs:
            try:
                paths.append(self._dir_path(parent) + b"/" + name)
            except OSError:
                paths.append(b"")  # fails verification, keeps indexes aligned
        return pairs, paths

    def _child(self, parent: int, name: bytes) -> bytes:
        return self._dir_path(parent) + b"/" + name

    def rel(self, path: bytes) -> bytes:
        return b"/" + path[len(self.root) + 1:] if path != self.root else b"/"

    def _remember(self, parent: int, name: bytes, st: os.stat_result) -> Any:
        """Record a name the kernel now knows (one more lookup) and build its entry."""
        ino = self.fuse_ino(st.st_ino)
        if ino != ROOT_INODE:
            node = self.nodes.setdefault(ino, Node())
            node.names.pop((parent, name), None)
            node.names[(parent, name)] = None
            node.lookups += 1
        return self._entry(st)

    def _unname(self, parent: int, name: bytes, real: int | None) -> None:
        if real is None:
            return
        node = self.nodes.get(self.fuse_ino(real))
        if node is not None:
            node.names.pop((parent, name), None)

    def _entry(self, st: os.stat_result) -> Any:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self.fuse_ino(st.st_ino)
        entry.generation = 0
        entry.entry_timeout = self.cache_timeout
        entry.attr_timeout = self.cache_timeout
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    # -- running an operation

    async def _run(self, op: str, fn: Callable[..., Any], *args: Any) -> Any:
        delay = self.faults.latency_for(op)

        def call() -> Any:
            if delay:
                time.sleep(delay)
            return fn(*args)

        return await trio.to_thread.run_sync(call, limiter=self.limiter)

    async def _on_inode(self, op: str, ino: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Gate `op` on the inode's path, then run fn(path, st, *args) on its verified path."""
        pairs, paths = self._names(ino)
        await self.faults.gate(op, [self.rel(p) for p in paths[:1] if p])
        real = self.real_ino(ino)

        def verified() -> tuple[int, Any]:
            i, st = _verify(paths, real)
            return i, fn(paths[i], st, *args)

        index, result = await self._run(op, verified)
        self._prune(ino, pairs[:index])
        return result

    def _prune(self, ino: int, stale: Iterable[tuple[int, bytes]]) -> None:
        node = self.nodes.get(ino)
        if node is not None:
            for pair in stale:
                node.names.pop(pair, None)

    # -- lookups and attributes

    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        await self.faults.gate("lookup", [self.rel(path)])
        st = await self._run("lookup", os.lstat, path)
        return self._remember(parent_inode, name, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            node = self.nodes.get(ino)
            if node is None:
                continue
            node.lookups -= count
            if node.lookups <= 0:
                del self.nodes[ino]

    @handler
    async def getattr(self, inode: int, ctx: Any) -> Any:
        fds = sorted(self.open_fds.get(inode, ()))
        try:
            return self._entry(await self._on_inode("getattr", inode, lambda path, st: st))
        except OSError as exc:
            # An open file someone unlinked keeps its attributes, as on a local disk.
            if exc.errno != errno.ESTALE or not fds:
                raise
            return self._entry(await self._run("getattr", os.fstat, fds[0]))

    @handler
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any) -> Any:
        def change(path: bytes, st: os.stat_result) -> os.stat_result:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1,
                         attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_atime or fields.update_mtime:
                now = os.lstat(path)  # os.utime cannot leave one of the two alone
                times = (attr.st_atime_ns if fields.update_atime else now.st_atime_ns,
                         attr.st_mtime_ns if fields.update_mtime else now.st_mtime_ns)
                os.utime(path, ns=times, follow_symlinks=False)
            return os.lstat(path)

        return self._entry(await self._on_inode("setattr", inode, change))

    @handler
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self._on_inode("readlink", inode, lambda path, st: os.readlink(path))

    @handler
    async def statfs(self, ctx: Any) -> Any:
        await self.faults.gate("statfs", [])
        st = await self._run("statfs", os.statvfs, self.root)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                      "f_namemax"):
            setattr(out, field, getattr(st, field))
        return out

    # -- namespace

    async def _make(self, op: str, parent: int, name: bytes, ctx: Any, make: Callable[[bytes], None]) -> Any:
        path = self._child(parent, name)
        await self.faults.gate(op, [self.rel(path)])

        def run() -> os.stat_result:
            make(path)
            _give_to(path, ctx.uid, ctx.gid)
            return os.lstat(path)

        return self._remember(parent, name, await self._run(op, run))

    @handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        return await self._make("mknod", parent_inode, name, ctx, lambda p: os.mknod(p, mode, rdev))

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        return await self._make("mkdir", parent_inode, name, ctx, lambda p: os.mkdir(p, mode))

    @handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        return await self._make("symlink", parent_inode, name, ctx, lambda p: os.symlink(target, p))

    @handler
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        new = self._child(new_parent_inode, new_name)
        _, paths = self._names(inode)
        await self.faults.gate("link", [self.rel(p) for p in paths[:1] if p] + [self.rel(new)])
        real = self.real_ino(inode)

        def run() -> os.stat_result:
            i, _ = _verify(paths, real)
            os.link(paths[i], new, follow_symlinks=False)
            return os.lstat(new)

        return self._remember(new_parent_inode, new_name, await self._run("link", run))

    async def _remove(self, op: str, parent: int, name: bytes, remove: Callable[[bytes], None]) -> None:
        path = self._child(parent, name)
        await self.faults.gate(op, [self.rel(path)])

        def run() -> int | None:
            real = _ino_or_none(path)
            remove(path)
            return real

        self._unname(parent, name, await self._run(op, run))

    @handler
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._remove("unlink", parent_inode, name, os.unlink)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self._remove("rmdir", parent_inode, name, os.rmdir)

    @handler
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int, ctx: Any
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        await self.faults.gate("rename", [self.rel(old), self.rel(new)])

        def run() -> tuple[int | None, int | None]:
            moved, replaced = _ino_or_none(old), _ino_or_none(new)
            _rename(old, new, flags)
            return moved, replaced

        moved, replaced = await self._run("rename", run)
        old_pair, new_pair = (parent_inode_old, name_old), (parent_inode_new, name_new)
        if replaced is not None and replaced != moved:
            node = self.nodes.get(self.fuse_ino(replaced))
            if node is not None:
                node.names.pop(new_pair, None)
                if flags & 2:  # RENAME_EXCHANGE: the other one now lives at the old name
                    node.names[old_pair] = None
        if moved is not None:
            node = self.nodes.get(self.fuse_ino(moved))
            if node is not None:
                node.names.pop(old_pair, None)
                node.names[new_pair] = None

    # -- files

    def _opened(self, fd: int, ino: int, path: bytes) -> None:
        self.files[fd] = (ino, path)
        self.open_fds.setdefault(ino, set()).add(fd)

    @staticmethod
    def _real_flags(flags: int) -> int:
        # The kernel computes O_APPEND offsets itself (pwrite on an O_APPEND fd would ignore
        # them), and O_DIRECT would need aligned buffers we do not have.
        return (flags & ~(os.O_APPEND | os.O_DIRECT | os.O_NOFOLLOW | os.O_CREAT | os.O_EXCL)) | os.O_CLOEXEC

    @handler
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        def run(path: bytes, st: os.stat_result) -> tuple[int, bytes]:
            fd = os.open(path, self._real_flags(flags))
            if os.fstat(fd).st_ino != st.st_ino:  # replaced between lstat and open
                os.close(fd)
                raise OSError(errno.ESTALE, "stale file handle")
            return fd, path

        fd, path = await self._on_inode("open", inode, run)
        self._opened(fd, inode, path)
        return pyfuse3.FileInfo(fh=fd, keep_cache=False)

    @handler
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any) -> Any:
        path = self._child(parent_inode, name)
        await self.faults.gate("create", [self.rel(path)])

        def run() -> tuple[int, os.stat_result]:
            fd = os.open(path, self._real_flags(flags) | os.O_CREAT | (flags & os.O_EXCL), mode)
            try:
                _give_to(path, ctx.uid, ctx.gid)
                return fd, os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise

        fd, st = await self._run("create", run)
        entry = self._remember(parent_inode, name, st)
        self._opened(fd, entry.st_ino, path)
        return pyfuse3.FileInfo(fh=fd, keep_cache=False), entry

    def _file_paths(self, fh: int) -> list[bytes]:
        ino, path = self.files.get(fh, (0, b""))
        try:
            _, paths = self._names(ino)
            path = paths[0] or path
        except OSError:
            pass
        return [self.rel(path)] if path else []

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        await self.faults.gate("read", self._file_paths(fh))
        data = await self._run("read", os.pread, fh, size, off)
        self.faults.bytes_read += len(data)
        return data

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        await self.faults.gate("write", self._file_paths(fh))
        done = await self._run("write", os.pwrite, fh, buf, off)
        self.faults.bytes_written += done
        return done

    @handler
    async def flush(self, fh: int) -> None:
        await self.faults.gate("flush", self._file_paths(fh))

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.faults.gate("fsync", self._file_paths(fh))
        await self._run("fsync", os.fdatasync if datasync else os.fsync, fh)

    @handler
    async def release(self, fh: int) -> None:
        ino, _ = self.files.pop(fh, (0, b""))
        fds = self.open_fds.get(ino)
        if fds is not None:
            fds.discard(fh)
            if not fds:
                del self.open_fds[ino]
        # release is not gated: the kernel ignores its errors and the fd must not leak.
        self.faults.calls["release"] = self.faults.calls.get("release", 0) + 1
        await self._run("release", os.close, fh)

    # -- directories

    @handler
    async def opendir(self, inode: int, ctx: Any) -> int:
        def run(path: bytes, st: os.stat_result) -> int:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

        fd = await self._on_inode("opendir", inode, run)
        self.files[fd] = (inode, b"")
        return fd

    @handler
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        ino, _ = self.files[fh]
        await self.faults.gate("readdir", self._file_paths(fh))
        if start_id == 0 or fh not in self.listings:
            # Listed afresh at every (re)start, like a remote without a cache; offsets index
            # the sorted names of that listing.
            self.listings[fh] = await self._run("readdir", _list_names, fh)
        names = self.listings[fh]
        while start_id < len(names):
            batch = names[start_id:start_id + READDIR_BATCH]
            stats = await self._run("readdir", _lstat_batch, fh, batch)
            for offset, (name, st) in enumerate(zip(batch, stats), start=start_id + 1):
                if st is None:  # vanished since the listing
                    continue
                if not pyfuse3.readdir_reply(token, name, self._entry(st), offset):
                    return
                self._remember(ino, name, st)
            start_id += len(batch)

    @handler
    async def releasedir(self, fh: int) -> None:
        self.files.pop(fh, None)
        self.listings.pop(fh, None)
        await self._run("releasedir", os.close, fh)

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.faults.gate("fsyncdir", self._file_paths(fh))
        await self._run("fsyncdir", os.fsync, fh)

    # -- extended attributes

    @handler
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        await self._on_inode("setxattr", inode, lambda p, st: os.setxattr(p, name, value, follow_symlinks=False))

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return await self._on_inode("getxattr", inode, lambda p, st: os.getxattr(p, name, follow_symlinks=False))

    @handler
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        names = await self._on_inode("listxattr", inode, lambda p, st: os.listxattr(p, follow_symlinks=False))
        return [os.fsencode(n) for n in names]

    @handler
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        await self._on_inode("removexattr", inode, lambda p, st: os.removexattr(p, name, follow_symlinks=False))


# --- the server ------------------------------------------------------------------------------


async def _serve_control(path: str, faults: Faults) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)

    async def one_client(stream: trio.SocketStream) -> None:
        buffer = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    reply = faults.command(line.decode("utf-8", "surrogateescape"))
                    log.debug("control: %s -> %s", line, reply[:200])
                    try:
                        await stream.send_all(reply.encode("utf-8", "surrogateescape") + b"\n")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

    await trio.serve_listeners(one_client, [trio.SocketListener(sock)])


def _mounted(mnt: str) -> bool:
    want = os.path.abspath(mnt)
    with open("/proc/self/mounts", encoding="latin-1") as table:
        for line in table:
            fields = line.split()
            if len(fields) > 1 and fields[1].encode("latin-1").decode("unicode_escape") == want:
                return True
    return False


def serve(
    real: str, mnt: str, control: str, meta_latency: float, data_latency: float, cache_timeout: float = 0.0
) -> int:
    async def main() -> None:
        faults = Faults(meta_latency, data_latency)
        ops = PassThrough(os.fsencode(os.path.abspath(real)), faults, cache_timeout)
        pyfuse3.init(ops, mnt, {"fsname=faultfs", "subtype=faultfs", *pyfuse3.default_options})
        log.info("mounted %s at %s (latency meta %.3f ms, data %.3f ms)",
                 real, mnt, meta_latency * 1e3, data_latency * 1e3)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_serve_control, control, faults)

                async def on_signal() -> None:
                    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                        async for signum in signals:
                            log.info("%s: releasing hung operations and unmounting", signal.Signals(signum).name)
                            faults.release(hangs_only=False)
                            pyfuse3.terminate()
                            return

                nursery.start_soon(on_signal)
                # Enough tasks that hung requests cannot starve the rest.
                await pyfuse3.main(min_tasks=4, max_tasks=512)
                faults.release(hangs_only=False)
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=_mounted(mnt))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)

    trio.run(main)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faultfs", description=__doc__.split("\n\n")[0])
    parser.add_argument("real", help="the directory to expose (stands in for the NFS export)")
    parser.add_argument("mnt", help="an empty directory to mount it on")
    parser.add_argument("--control", required=True, help="Unix socket for fault commands")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="delay of every operation that would be an NFS round trip")
    parser.add_argument("--metadata-latency-ms", type=float, default=None,
                        help="overrides --latency-ms for metadata operations")
    parser.add_argument("--data-latency-ms", type=float, default=None,
                        help="overrides --latency-ms for read/write/fsync")
    parser.add_argument("--cache-timeout", type=float, default=0.0,
                        help="kernel entry/attr timeout in seconds (default 0: a non-caching remote; "
                             "an NFS client with actimeo=N caches about like N)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s faultfs %(levelname)s: %(message)s", stream=sys.stderr)
    meta = args.latency_ms if args.metadata_latency_ms is None else args.metadata_latency_ms
    data = args.latency_ms if args.data_latency_ms is None else args.data_latency_ms
    return serve(args.real, args.mnt, args.control, meta / 1e3, data / 1e3, args.cache_timeout)


# --- the client: run faultfs as a child process ----------------------------------------------


class FaultFSError(RuntimeError):
    pass


class FaultFS:
    """A running faultfs child process and its control socket.

    `FaultFS.start(real, mnt, latency_ms=...)` returns once MNT is mounted and the control
    socket answers. `stop()` always leaves MNT unmounted (fusermount3 -u -z) and the process
    reaped, and never raises; use it in a `finally` (or use the object as a context manager).
    """

    def __init__(
        self, real: Path, mnt: Path, control: Path, proc: subprocess.Popen[bytes], log_path: Path, own_dir: Path | None
    ) -> None:
        self.real, self.mnt, self.control, self.proc, self.log_path = real, mnt, control, proc, log_path
        self._own_dir = own_dir

    @classmethod
    def start(
        cls,
        real: os.PathLike[str] | str,
        mnt: os.PathLike[str] | str,
        *,
        latency_ms: float = 0.0,
        metadata_latency_ms: float | None = None,
        data_latency_ms: float | None = None,
        cache_timeout: float = 0.0,
        control: os.PathLike[str] | str | None = None,
        log_path: os.PathLike[str] | str | None = None,
        debug: bool = False,
        timeout: float = 20.0,
    ) -> FaultFS:
        real_p, mnt_p = Path(real).resolve(), Path(os.path.abspath(mnt))
        own_dir = None
        if control is None:  # a short path: Unix socket paths are limited to 107 bytes
            own_dir = Path(tempfile.mkdtemp(prefix="faultfs-"))
            control = own_dir / "control.sock"
        control_p = Path(control)
        log_p = Path(log_path) if log_path else control_p.with_name(control_p.name + ".log")
        cmd = [sys.executable, "-m", "tests.faultfs", str(real_p), str(mnt_p), "--control", str(control_p),
               "--latency-ms", str(latency_ms)]
        if metadata_latency_ms is not None:
            cmd += ["--metadata-latency-ms", str(metadata_latency_ms)]
        if data_latency_ms is not None:
            cmd += ["--data-latency-ms", str(data_latency_ms)]
        if cache_timeout:
            cmd += ["--cache-timeout", str(cache_timeout)]
        if debug:
            cmd.append("--debug")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        with open(log_p, "ab") as log_file:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self = cls(real_p, mnt_p, control_p, proc, log_p, own_dir)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise FaultFSError(f"faultfs exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if _mounted(str(self.mnt)):
                try:
                    if self.command("ping") == "ok pong":
                        return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise FaultFSError(f"faultfs not ready within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- commands

    def command(self, *words: object, timeout: float = 10.0) -> str:
        """Send one command (words are quoted for you); returns the reply line."""
        line = shlex.join(os.fsdecode(w) if isinstance(w, (bytes, os.PathLike)) else str(w) for w in words)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.control))
            sock.sendall(line.encode("utf-8", "surrogateescape") + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.decode("utf-8", "surrogateescape").rstrip("\n")

    def _ok(self, *words: object) -> str:
        reply = self.command(*words)
        if not reply.startswith("ok"):
            raise FaultFSError(f"faultfs {' '.join(map(str, words))}: {reply}")
        return reply[3:]

    @staticmethod
    def _extra(prefix: str | None, times: int | None) -> list[str]:
        words = []
        if prefix is not None:
            words.append(prefix if prefix.startswith("/") else "/" + prefix)
        if times is not None:
            words.append(f"times={times}")
        return words

    def fail(self, op: str, errno_name: str, prefix: str | None = None, *, times: int | None = None) -> None:
        """Fail `op` ("read", "read,write", "*") with `errno_name` ("EIO"...) under `prefix`."""
        self._ok("fail", op, errno_name, *self._extra(prefix, times))

    def hang(self, op: str, prefix: str | None = None, *, times: int | None = None) -> None:
        """Hold `op` under `prefix` until `release()` (or `clear()`, or `stop()`)."""
        self._ok("hang", op, *self._extra(prefix, times))

    def release(self) -> int:
        """Wake every hung operation and drop the hang rules; returns how many were woken."""
        return int(self._ok("release").split("=")[1])

    def clear(self) -> None:
        """Drop every fail and hang rule and wake hung operations (latency stays as set)."""
        self._ok("clear")

    def latency(self, ms: float, which: str = "all") -> None:
        """Delay operations by `ms` (which: "meta", "data" or "all"); 0 turns it off."""
        self._ok("latency", ms, which)

    def counters(self) -> dict[str, Any]:
        return json.loads(self._ok("counters"))

    def reset_counters(self) -> None:
        self._ok("reset")

    def wait_hung(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until at least `count` operations are being held by a hang rule."""
        deadline = time.monotonic() + timeout
        while self.counters()["hung_now"] < count:
            if time.monotonic() > deadline:
                raise FaultFSError(f"fewer than {count} operations hung after {timeout}s")
            time.sleep(0.01)

    # -- teardown

    def stop(self) -> list[str]:
        """Unmount (lazily), stop and reap the process. Never raises; returns the problems."""
        problems: list[str] = []
        if self.proc.poll() is None:
            try:  # hung operations would keep the unmount waiting
                self.command("clear", timeout=2)
            except OSError:
                pass
        if _mounted(str(self.mnt)):
            try:
                done = subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)],
                                      capture_output=True, text=True, timeout=30)
                if done.returncode != 0 and _mounted(str(self.mnt)):
                    problems.append(f"fusermount3 -u -z {self.mnt}: {done.stderr.strip()}")
            except (OSError, subprocess.TimeoutExpired) as exc:
                problems.append(f"fusermount3 -u -z {self.mnt}: {exc}")
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                problems.append(f"faultfs {self.pid} ignored SIGTERM for 10 s; killed")
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._own_dir is not None:
            for leftover in (self.control, self.log_path):
                if leftover.parent == self._own_dir and not problems:
                    with contextlib.suppress(FileNotFoundError):
                        leftover.unlink()
            try:
                self._own_dir.rmdir()
            except OSError:
                pass
        return problems

    def __enter__(self) -> FaultFS:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
