"""The real safefs stack without a kernel: journal, inode table, cache, backing, fs, flusher.

Tests call `Filesystem` methods directly, the way the kernel would: every path is resolved by
`lookup` one component at a time (each lookup counts one kernel reference), files are opened
before reading or writing, and `create` returns (fh, inode). No FUSE, no daemon, no lease:
the write gate is a `FakeGate` the test can turn read-only, and time is a `FakeClock`.

`Stack.crash_and_replay()` simulates kill -9: every in-memory object is dropped without a
flush, the journal is closed (what LMDB committed is in the OS page cache, as after a real
kill), and a new stack is built on the same cache dir and SRC. `Stack.crash_during(...)` kills
the stack at the n-th call into the backing tree, while that call is in flight.

Everything here runs inside one trio run (pytest-trio's trio_mode, or the model test's own
`trio.run`): the stack holds trio objects (limiters, locks, events) tied to that run.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from safefs.backing import Backing
from safefs.cache import ContentCache
from safefs.config import MountConfig
from safefs.errors import FsError, ReadOnly, SafefsError
from safefs.flusher import Flusher
from safefs.fs import Filesystem, Limiters
from safefs.inodes import ROOT_INO, Inode, InodeTable
from safefs.journal import Journal
from safefs.layout import DIR as CONTROL_DIR_NAME
from tests.doubles import FakeClock

BOOT_ID = "boot-1"
HOST = "testhost"
UID, GID = os.getuid(), os.getgid()


class FakeGate:
    """The lease seam: writable until the test says otherwise."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch
        self.readonly = False
        self.asked = 0

    def require_writable(self) -> int:
        self.asked += 1
        if self.readonly:
            raise ReadOnly("test: this mount is read-only")
        return self.epoch

    def writable(self) -> bool:
        return not self.readonly

    def require_publishable(self) -> int:
        return self.require_writable()  # the lock delay is the keeper's (tests/unit)

    def publishable(self) -> bool:
        return not self.readonly


class RecordingInvalidator:
    """Records what the kernel would be told to forget (now, or queued for later)."""

    def __init__(self) -> None:
        self.inodes: list[int] = []
        self.entries: list[tuple[int, bytes]] = []

    async def invalidate_inode(self, ino: int) -> None:
        self.inodes.append(ino)

    async def invalidate_entry(self, parent: int, name: bytes) -> None:
        self.entries.append((parent, name))

    def later_inode(self, ino: int) -> None:
        self.inodes.append(ino)

    def later_entry(self, parent: int, name: bytes) -> None:
        self.entries.append((parent, name))


class SimulatedCrash(BaseException):
    """Raised into a dying stack's code paths after `crash_during` killed it.

    A BaseException so that no `except Exception` in safefs can swallow it and carry on.
    """


class _DeadJournal:
    """Stands in for the journal of a killed stack: nothing more reaches the disk."""

    def commit(self, batch: Any) -> None:
        raise SimulatedCrash("journal of a killed stack")

    def sync(self) -> None:
        raise SimulatedCrash("journal of a killed stack")


# Every public Backing method: `crash_during` counts calls to these.
BACKING_METHODS = (
    "lstat", "listdir", "read", "readlink", "getxattrs", "statvfs", "exists", "mkdir", "symlink",
    "mknod", "link", "unlink", "rmdir", "rename", "set_attrs", "publish_atomic", "write_ranges",
    "fsync_dir", "set_times",
)  # fmt: skip


class CrashPlan:
    """Kills a stack at its `at`-th backing call (1-based): just before the call starts, or
    (`after`) just after it returned, before its caller sees the result. The call holds its
    thread until the test has killed the stack (`go`), then fails with SimulatedCrash, and so
    does every later call: a dead process does nothing more.
    """

    def __init__(self, at: int, *, after: bool, only: str | None = None) -> None:
        self.at = at
        self.after = after
        self.only = only  # count only calls of this method
        self.count = 0
        self.calls: list[str] = []
        self.hit = threading.Event()
        self.go = threading.Event()
        self.dead = False
        self._lock = threading.Lock()

    def install(self, backing: Backing) -> None:
        for name in BACKING_METHODS:
            real = getattr(backing, name, None)
            if real is not None:
                setattr(backing, name, self._wrap(name, real))

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.after:
                self._tick(name, args)
            result = real(*args, **kwargs)  # an OSError here is not a crash: it propagates
            if self.after:
                self._tick(name, args)
            return result

        return call

    def _tick(self, name: str, args: tuple[Any, ...]) -> None:
        with self._lock:
            if self.dead:
                raise SimulatedCrash(f"backing call {name} after the crash")
            self.calls.append(name)
            if self.only is not None and name != self.only:
                return
            self.count += 1
            mine = self.count == self.at
        if mine:
            self.hit.set()
            self.go.wait()
            self.dead = True
            when = "after" if self.after else "before"
            raise SimulatedCrash(f"killed {when} backing call #{self.at} ({name} {args[:2]!r})")


def errno_of(exc: BaseException) -> int | None:
    """The errno a FUSE request would answer (as fuse_ops.fuse_errors maps it)."""
    if isinstance(exc, SafefsError):
        return exc.errno
    if isinstance(exc, OSError):
        return exc.errno
    return None


async def fails_with(call: Awaitable[Any] | Callable[[], Any]) -> int:
    """Await `call` (or call it); return the errno it failed with; fail if it succeeded."""
    try:
        result = call() if callable(call) else call
        if hasattr(result, "__await__"):
            await result
    except (SafefsError, OSError) as exc:
        code = errno_of(exc)
        assert code is not None
        return code
    raise AssertionError("the call succeeded; expected an error")


def split(path: str | bytes) -> list[bytes]:
    p = os.fsencode(path)
    return [c for c in p.split(b"/") if c]



async def surviving_crash(fn: Callable[[], Awaitable[Any]]) -> None:
    """Await `fn`, taking a SimulatedCrash (alone or in an exception group) as its end."""
    try:
        await fn()
    except SimulatedCrash:
        pass
    except BaseExceptionGroup as group:  # noqa: F821 - a builtin since 3.11
        _, rest = group.split(SimulatedCrash)
        if rest is not None:
            raise rest from None

class Stack:
    """One mount's services on `root/src` with cache `root/cache`. See the module docstring."""

    def __init__(self, root: Path, **config: Any) -> None:
        self.root = root
        self.src = root / "src"
        self.cache_dir = root / "cache"
        self.src.mkdir(exist_ok=True)
        self.cache_dir.mkdir(exist_ok=True)
        (root / "mnt").mkdir(exist_ok=True)
        config.setdefault("writeback_delay", 5.0)
        config.setdefault("free_space_floor", 0)
        config.setdefault("backing_timeout", 30.0)
        self.config = MountConfig(src=self.src, mnt=root / "mnt", cache_dir=self.cache_dir, **config)
        self.clock = FakeClock()
        self.gate = FakeGate()
        self.invalidator = RecordingInvalidator()
        self.generation = 0  # how many times the stack was (re)built
        self.boot_id = BOOT_ID  # change it before a restart to simulate a host reboot
        self.journal: Journal | None = None

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> Stack:
        assert self.journal is None
        self.journal = Journal.open(self.cache_dir)
        self.limiters = Limiters.create()
        self.table = InodeTable(self.journal, self.limiters.flush)
        self.table.load(await trio.to_thread.run_sync(self.journal.load))
        self.cache = ContentCache(self.cache_dir, self.config.free_space_floor)
        self.backing = Backing(self.src)
        self.fs = Filesystem(
            self.table, self.cache, self.backing, self.config, self.clock, self.limiters,
            self.gate, self.invalidator,
        )  # fmt: skip
        self.flusher = Flusher(
            table=self.table, cache=self.cache, content=self.fs.content, backing=self.backing, gate=self.fs.gate,
            clock=self.clock, config=self.config, invalidator=self.fs.invalidator, negative=self.fs.negative,
            host_name=HOST,
        )  # fmt: skip
        self.fs.on_change = self.flusher.poke
        await self.fs.start(self.boot_id)
        # As the daemon does for a writer: finish the op a crash interrupted, if any.
        settle = getattr(self.flusher, "settle", None)
        if settle is not None:
            await settle()
        self.generation += 1
        return self

    def _drop(self) -> None:
        """Kill -9: what LMDB committed stays (the OS has it); nothing else survives."""
        assert self.journal is not None
        self.table._journal = _DeadJournal()  # type: ignore[assignment]
        self.journal.close()
        self.journal = None

    def _close_files(self) -> None:
        self.cache.close()
        self.backing.close()

    async def crash_and_replay(self) -> None:
        self._drop()
        self._close_files()
        await self.start()

    async def crash_during(
        self, fn: Callable[[], Awaitable[Any]], at: int, *, after: bool = False, only: str | None = None
    ) -> bool:
        """Run `fn` and kill the stack at its `at`-th backing call (see CrashPlan); with
        `only`, at its `at`-th call of that Backing method.

        Returns True if the crash happened (the stack was then rebuilt from the cache dir),
        False if `fn` finished before making that many calls.
        """
        plan = CrashPlan(at, after=after, only=only)
        plan.install(self.backing)
        self.last_crash = plan
        finished = trio.Event()

        async def runner() -> None:
            try:
                await surviving_crash(fn)
            finally:
                finished.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner)
            while not finished.is_set() and not plan.hit.is_set():
                await trio.sleep(0.002)
            crashed = plan.hit.is_set()
            if crashed:
                self._drop()
                plan.go.set()
            await finished.wait()
        if crashed:
            self._close_files()
            await self.start()
        else:
            for name in BACKING_METHODS:
                self.backing.__dict__.pop(name, None)
        return crashed

    async def close(self) -> None:
        if self.journal is None:
            return
        self._close_files()
        self.journal.close()
        self.journal = None

    # -- the kernel's side -----------------------------------------------------------------
    async def resolve(self, path: str | bytes) -> Inode:
        """Look up every component, as the kernel does for a path (one reference each)."""
        inode = self.fs.getattr(ROOT_INO)
        for name in split(path):
            inode = await self.fs.lookup(inode.ino, name)
        return inode

    async def parent_of(self, path: str | bytes) -> tuple[Inode, bytes]:
        """The directory holding `path`, and the last name. Like the kernel's path walk, a
        parent that is not a directory fails with ENOTDIR before the filesystem is asked."""
        parts = split(path)
        parent = await self.resolve(b"/".join(parts[:-1]))
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR, "a path component is not a directory")
        return parent, parts[-1]

    async def create(self, path: str | bytes, data: bytes = b"", mode: int = 0o644) -> Inode:
        parent, name = await self.parent_of(path)
        fh, inode = await self.fs.create(parent.ino, name, stat.S_IFREG | mode, os.O_WRONLY | os.O_CREAT, UID, GID)
        try:
            if data:
                assert await self.fs.write(fh, 0, data) == len(data)
        finally:
            await self.fs.release(fh)
        return inode

    async def open(self, path: str | bytes, flags: int = os.O_RDONLY) -> int:
        inode = await self.resolve(path)
        fh, _keep = await self.fs.open(inode.ino, flags)
        return fh

    async def write(self, path: str | bytes, data: bytes, offset: int = 0, *, flags: int = os.O_WRONLY) -> None:
        fh = await self.open(path, flags)
        try:
            assert await self.fs.write(fh, offset, data) == len(data)
        finally:
            await self.fs.release(fh)

    async def put(self, path: str | bytes, data: bytes) -> None:
        """Write a whole file: create it or open it with O_TRUNC."""
        parent, name = await self.parent_of(path)
        try:
            await self.fs.lookup(parent.ino, name)
        except SafefsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            await self.create(path, data)
            return
        await self.write(path, data, flags=os.O_WRONLY | os.O_TRUNC)

    async def read_fh(self, fh: int) -> bytes:
        chunks = []
        offset = 0
        while True:
            chunk = await self.fs.read(fh, offset, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            offset += len(chunk)

    async def read(self, path: str | bytes) -> bytes:
        fh = await self.open(path)
        try:
            return await self.read_fh(fh)
        finally:
            await self.fs.release(fh)

    async def truncate(self, path: str | bytes, size: int) -> None:
        inode = await self.resolve(path)
        await self.fs.setattr(inode.ino, size=size)

    async def mkdir(self, path: str | bytes, mode: int = 0o755) -> Inode:
        parent, name = await self.parent_of(path)
        return await self.fs.mkdir(parent.ino, name, stat.S_IFDIR | mode, UID, GID)

    async def symlink(self, target: str | bytes, path: str | bytes) -> Inode:
        parent, name = await self.parent_of(path)
        return await self.fs.symlink(parent.ino, name, os.fsencode(target), UID, GID)

    async def unlink(self, path: str | bytes) -> None:
        parent, name = await self.parent_of(path)
        await self.fs.unlink(parent.ino, name)

    async def rmdir(self, path: str | bytes) -> None:
        parent, name = await self.parent_of(path)
        await self.fs.rmdir(parent.ino, name)

    async def rename(self, old: str | bytes, new: str | bytes, flags: int = 0) -> None:
        p_old, n_old = await self.parent_of(old)
        p_new, n_new = await self.parent_of(new)
        await self.fs.rename(p_old.ino, n_old, p_new.ino, n_new, flags)

    async def link(self, existing: str | bytes, new: str | bytes) -> Inode:
        inode = await self.resolve(existing)
        parent, name = await self.parent_of(new)
        return await self.fs.link(inode.ino, parent.ino, name)

    async def fsync(self, path: str | bytes) -> None:
        fh = await self.open(path)
        try:
            await self.fs.fsync(fh)
        finally:
            await self.fs.release(fh)

    async def listdir(self, path: str | bytes = b"") -> list[bytes]:
        d = await self.resolve(path)
        fh = await self.fs.opendir(d.ino)
        try:
            return sorted(name for name, _inode, _next in self.fs.readdir(fh, 0) if name not in (b".", b".."))
        finally:
            self.fs.releasedir(fh)

    async def view(self, path: bytes = b"") -> dict[bytes, Any]:
        """The whole tree as the mount shows it, in the format of `src_tree`."""
        out: dict[bytes, Any] = {}
        for name in await self.listdir(path):
            rel = path + b"/" + name if path else name
            inode = await self.resolve(rel)
            if inode.is_dir:
                out[rel] = ("dir",)
                out.update(await self.view(rel))
            elif inode.is_link:
                out[rel] = ("link", self.fs.readlink(inode.ino))
            elif not inode.is_reg:
                out[rel] = ("special", stat.S_IFMT(inode.mode))
            else:
                out[rel] = ("file", await self.read(rel))
        return out


def src_tree(root: Path, *, hide_control: bool = True) -> dict[bytes, Any]:
    """A directory tree as {relative path: ("file", bytes) | ("dir",) | ("link", target) |
    ("special", S_IFMT bits)}; the root's control dir is left out unless `hide_control` is false.
    """
    out: dict[bytes, Any] = {}

    def walk(d: bytes, rel: bytes) -> None:
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            name = os.fsencode(entry.name)
            if hide_control and not rel and name == CONTROL_DIR_NAME:
                continue
            r = rel + b"/" + name if rel else name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                out[r] = ("dir",)
                walk(os.fsencode(entry.path), r)
            elif stat.S_ISLNK(st.st_mode):
                out[r] = ("link", os.readlink(entry.path))
            elif stat.S_ISREG(st.st_mode):
                with open(entry.path, "rb") as f:
                    out[r] = ("file", f.read())
            else:
                out[r] = ("special", stat.S_IFMT(st.st_mode))

    walk(os.fsencode(root), b"")
    return out


def files(**tree: Any) -> dict[bytes, Any]:
    """Shorthand for expected trees: files(a=b"x", d=None, **{"d/f": b"y"}); None is a dir."""
    return {os.fsencode(k): ("dir",) if v is None else ("file", v) for k, v in tree.items()}


def leftovers(root: Path) -> list[str]:
    """Staging or temp files of a publish anywhere outside the control dir."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and CONTROL_DIR_NAME.decode() in dirnames:
            dirnames.remove(CONTROL_DIR_NAME.decode())
        found += [os.path.join(dirpath, f) for f in filenames if f.startswith("publish-") or f.endswith(".tmp")]
    return found


def conflict_copies(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and CONTROL_DIR_NAME.decode() in dirnames:
            dirnames.remove(CONTROL_DIR_NAME.decode())
        found += [os.path.join(dirpath, f) for f in filenames + dirnames if ".safefs-conflict-" in f]
    return found


@pytest.fixture
async def stack(tmp_path: Path) -> Any:
    """A started stack on an empty SRC (tmp_path/src). Fill SRC before the first lookup."""
    s = Stack(tmp_path)
    await s.start()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Awaitable[Stack]]]:
    """Build a stack with config overrides: `await make_stack(writeback_delay=1)`."""
    made: list[Stack] = []

    async def make(**config: Any) -> Stack:
        s = Stack(tmp_path, **config)
        made.append(s)
        return await s.start()

    yield make
    for s in made:
        if s.journal is not None:
            s._close_files()
            s.journal.close()
            s.journal = None


__all__ = [
    "BACKING_METHODS", "BOOT_ID", "HOST", "CrashPlan", "FakeGate", "RecordingInvalidator", "SimulatedCrash", "Stack",
    "conflict_copies", "errno_of", "fails_with", "files", "leftovers", "split", "src_tree",
]  # fmt: skip
