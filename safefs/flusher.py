"""Write-back: carries the cache's changes to the backing tree, in an order that loses nothing.

A flush has two steps:
1. **Replay the op log** in order. Each op names directories by inode and is resolved
   against the *backing view* (`Inode.blinks`), which each replayed op moves forward; so
   every op meets the backing tree in exactly the state the cache had when the op happened.
   A `create` publishes the file's *current* content, so a file written then renamed into
   place (the usual atomic-save pattern) appears on the backing tree whole.
2. **Publish dirty inodes** at their backing path. Small or new files go to a staging file in
   `.safefs/staging/<epoch>/`, are fsynced and renamed into place (readers never see a torn
   file); large files get only their dirty ranges written in place.

Invariants:
- Ops are replayed strictly in order; one that fails stops the replay, which is retried with
  backoff. A write-ahead `in_flight` mark tells, after a crash, that an op may already have
  taken effect, and its handler accepts both outcomes. An op the project can no longer take
  (its source or directory removed behind our back: TREE_CHANGED errnos) is recorded as a
  conflict and skipped: contents are published by inode, or kept as conflict copies.
- Nothing on the backing tree is overwritten unless safefs put it there: an object in the way
  of a replayed op, or a file changed behind safefs's back (fingerprint mismatch), is kept
  side by side as `NAME.safefs-conflict-<host>-<time>`.
- Dirty state is cleared only if the inode did not change while it was being published;
  otherwise it stays dirty and is published again.
- Before each change to the backing tree the lease is asked (`gate.require_publishable()`:
  after a takeover the cache takes writes at once, the project only after the lock delay),
  and asked again in the worker thread right before each call into the project: a call that
  waited for a thread while the lease was lost never reaches the project.
- safefs's own renames, links and unlinks move a file's ctime: its fingerprint is re-recorded
  after each (when the stat just before was the one recorded). A staging rename moves its
  directory's times: after the publishes of a pass, each such directory gets back the times
  the mount shows.
- A content file's cache descriptor is pinned while a backing call copies from it (`_pinned`).

Threading: runs on the trio thread; backing calls run in threads behind the backing limiter.
Only one flush runs at a time (`_flush_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import math
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from safefs import generation, layout, ranges, records
from safefs.backing import Attrs, Fingerprint
from safefs.errors import BackingFailed, ReadOnly, SafefsError, SyncTimeout
from safefs.fs import Filesystem, fingerprint_tuple, same_content
from safefs.inodes import ROOT_INO, Inode

log = logging.getLogger(__name__)
_CREATED_TOO = "made in the mount while the project got another object of that name"


def _utc(wall: float) -> str:
    """A wall time for status and receipts, readable by humans."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


def _fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    return fingerprint_tuple(Fingerprint.of(st))


def _with_copy_name(op: records.Op, parent: int, name: bytes, ino: int, copy: bytes) -> records.Op:
    """`op` with inode `ino`'s name (parent, name) replaced by (parent, copy)."""
    if isinstance(op, (records.Create, records.Mkdir, records.Unlink, records.Rmdir)):
        if (op.parent, op.name, op.ino) == (parent, name, ino):
            return dataclasses.replace(op, name=copy)
    elif isinstance(op, records.Link):
        if (op.ino, op.parent, op.name) == (ino, parent, name):
            return dataclasses.replace(op, name=copy)
    elif isinstance(op, records.Rename):
        if (op.p_old, op.n_old) == (parent, name) and ino in (op.src, op.dst):  # it moves (or swaps) away
            op = dataclasses.replace(op, n_old=copy)
        if (op.p_new, op.n_new, op.src) == (parent, name, ino):  # it arrives here
            op = dataclasses.replace(op, n_new=copy)
    return op


BPath = tuple[bytes, ...]
MAX_BACKOFF = 60.0
CREATE_PATIENCE = 12  # see Flusher._ripe
HUNG_CALL = 5.0  # a backing call running longer than this is listed in status as an error
# Errors that mean "the project is not what the op log expects", not "NFS is unwell".
TREE_CHANGED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR})


@dataclasses.dataclass
class FlushError:
    op: str
    path: str
    error: str
    retry_at: float  # wall time


@dataclasses.dataclass
class Receipt:
    files: int = 0
    bytes: int = 0
    ops: int = 0
    generation: int = 0


class Flusher:
    def __init__(self, fs: Filesystem, host_name: str) -> None:
        self.fs = fs
        self.table = fs.table
        self.backing = fs.backing
        self.clock = fs.clock
        self.config = fs.config
        self.host_name = host_name
        self._wake = trio.Event()
        self._wake_at = math.inf  # when run() looks next by itself (see poke)
        self._flush_lock = trio.Lock()
        self._backoff = 0.0
        self._next_try = 0.0
        self.last_error: FlushError | None = None
        self.conflicts: list[dict[str, Any]] = []
        self._conflicts_reported = 0  # how many of them a sync receipt listed already
        self.flushes = 0
        self.published_files = 0
        self._dirs_to_sync: set[BPath] = set()
        self._renamed_into: set[int] = set()  # directories a staging rename moved the times of
        self._staging_cleaned = False
        self._maybe_done = False  # the op being replayed may have taken effect before a crash
        self._seq = 0  # the op being replayed
        self._in_call: tuple[str, BPath, float] | None = None  # the backing call under way
        self._receipt: Receipt | None = None  # the flush pass under way
        self.generation = 0  # the last generation this mount published
        self._generation_pending = False  # a sync must publish a generation before it returns
        self.announce: Callable[[dict[str, Any]], None] | None = None  # told of every published generation
        self.busy = False
        fs.on_change = self.poke

    def poke(self) -> None:
        """A change was made. Wake the service only if it would otherwise look too late: a
        change is due `writeback_delay` from now, never before what is already pending, so
        under a stream of writes this is a comparison, not a wake-up and a pass per write."""
        if self.clock.monotonic() + self.config.writeback_delay < self._wake_at:
            self._wake.set()

    # -- the background service ----------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            delay = self._next_wake()
            self._wake_at = self.clock.monotonic() + delay
            with trio.move_on_after(delay):
                await self._wake.wait()
            self._wake = trio.Event()
            self._wake_at = -math.inf  # the pass below and the next _next_wake see every change
            await trio.sleep(0.02)  # a burst of changes costs one pass, not one per change
            if self.clock.monotonic() < self._next_try:
                continue
            try:
                await self.flush(everything=False)
            except ReadOnly:
                await trio.sleep(1.0)
            except BackingFailed:
                pass  # recorded by flush(); retried after the backoff
            except Exception as exc:  # a bug must not stop write-back for good
                log.exception("flush: unexpected error")
                self._failed(exc)

    def _next_wake(self) -> float:
        now = self.clock.monotonic()
        if now < self._next_try:
            return self._next_try - now
        pending = [i.changed_at for i in self.table.iter_dirty()]
        pending += [self.table.op_times.get(seq, 0.0) for seq in self.table.ops]
        if not pending:
            return 3600.0
        return max(0.05, min(pending) + self.config.writeback_delay - now)

    # -- flushing ------------------------------------------------------------------------
    async def flush(self, *, everything: bool) -> Receipt:
        """One write-back pass. Failures of the backing tree are recorded and retried later."""
        receipt = Receipt()
        async with self._flush_lock:
            self._receipt = receipt  # what replayed creates publish counts here too
            self.busy = True
            try:
                if not self._staging_cleaned:
                    await self._clean_staging()
                now = self.clock.monotonic()
                await self._replay_ops(receipt, None if everything else now - self.config.writeback_delay)
                for inode in list(self.table.iter_dirty()):
                    if inode.ino not in self.table.inodes or inode.new:
                        continue
                    if everything or now - inode.changed_at >= self.config.writeback_delay:
                        await self._publish(inode, receipt)
                await self._restore_dir_times()
                changed = set(self._dirs_to_sync)
                await self._sync_dirs()
                if changed or (everything and self._generation_pending):
                    await self._publish_generation(changed)
            except ReadOnly:
                raise
            except (OSError, SafefsError) as exc:
                self._failed(exc)
                raise BackingFailed(f"flush: {exc}") from exc
            finally:
                self.busy = False
                await self.table.commit()
            self._backoff = 0.0
            self.last_error = None
            self.flushes += 1
        return receipt

    async def _publish_generation(self, changed: set[BPath]) -> None:
        """Tell followers that the project moved: `.safefs/generation`, epoch and counter."""
        epoch = self.fs.gate.require_publishable()
        number = max(self.generation, int(self.table.meta.get("generation", 0))) + 1
        self._generation_pending = True  # until the record is out
        record = await self._call(
            functools.partial(
                generation.write, self.backing, self._staging(), epoch=epoch, generation=number,
                host=self.host_name, changed=changed,
            )
        )  # fmt: skip
        if self.announce is not None:
            self.announce(record)  # must not block: the daemon hands it to etcd in the background
        self.generation = number
        self._generation_pending = False
        self.table.set_meta("generation", number)

    def adopt_generation(self, record: dict[str, Any] | None) -> None:
        """On becoming the writer: continue the counter from what the project shows."""
        if record is not None:
            self.generation = max(self.generation, int(record.get("generation", 0)))
        self._generation_pending = True

    def _failed(self, exc: BaseException) -> None:
        self._backoff = min(MAX_BACKOFF, max(0.5, self._backoff * 2))
        self._next_try = self.clock.monotonic() + self._backoff
        path = getattr(exc, "filename", None) or ""
        self.last_error = FlushError(
            op=getattr(exc, "safefs_op", "flush"),
            path=os.fsdecode(path) if isinstance(path, (bytes, str)) else str(path),
            error=str(exc),
            retry_at=self.clock.wall() + self._backoff,
        )
        log.warning("flush: %s; retrying in %.1fs", exc, self._backoff)

    async def sync(self, *, timeout: float | None = None, new_generation: bool = True) -> Receipt:
        """Write back everything acknowledged before the call; wait (and retry) until done.

        With `new_generation` a new generation is published even if nothing changed, so a
        follower (or a user moving hosts) has a receipt to go by.
        """
        if new_generation:
            self._generation_pending = True  # the next complete pass publishes one
        start_versions = {i.ino: i.version for i in self.table.iter_dirty()}
        start_seq = self.table.next_seq
        total = Receipt()
        deadline = trio.current_time() + timeout if timeout is not None else float("inf")
        while True:
            with trio.move_on_at(deadline):
                try:
                    receipt = await self.flush(everything=True)
                    total.files += receipt.files
                    total.bytes += receipt.bytes
                    total.ops += receipt.ops
                except BackingFailed:
                    await trio.sleep(self._backoff)
                    continue
                if self._done_since(start_versions, start_seq) and not self._generation_pending:
                    await self.fs.table.sync()
                    total.generation = self.generation
                    return total
                continue
            raise SyncTimeout(
                "sync timed out; dirty data stays safe in the cache",
                hint="check the project's NFS server, then run safefs sync again",
            )

    def _done_since(self, start_versions: dict[int, int], start_seq: int) -> bool:
        if any(seq < start_seq for seq in self.table.ops):
            return False
        for ino in start_versions:
            inode = self.table.inodes.get(ino)
            if inode is not None and inode.needs_flush and inode.links:
                return False
        return True

    # -- op replay -----------------------------------------------------------------------
    async def _replay_ops(self, receipt: Receipt, older_than: float | None) -> None:
        """Replay the log in order; with `older_than`, stop at the first op younger than it."""
        for seq in sorted(self.table.ops):
            op = self.table.ops[seq]
            if older_than is not None and not self._ripe(seq, op, older_than):
                break
            await self._replay_one(seq, op)
            receipt.ops += 1
            for ino in op.inodes:  # an inode only the op kept alive may go now
                inode = self.table.inodes.get(ino)
                if inode is not None:
                    await self.fs.collect(inode)
            # The backing tree just stamped the directory with its own mtime; publish ours
            # (what the user saw, possibly set explicitly by tar or rsync) afterwards.
            for dir_ino in op.dirs:
                d = self.table.inodes.get(dir_ino)
                if d is not None and d.blinks or dir_ino == ROOT_INO:
                    d = self.table.inodes[dir_ino]
                    d.attr_dirty = True
                    self.table.mark(d)
            await self.table.commit()

    async def _replay_one(self, seq: int, op: records.Op) -> None:
        """Replay one op, with a write-ahead mark so a crash mid-op is recognised afterwards.

        `in_flight` names the op being replayed; it is committed before the backing tree is
        touched and cleared (with the op) after. At start-up an op still marked in flight may
        or may not have taken effect, and its handler accepts both (`self._maybe_done`).
        """
        self.fs.gate.require_publishable()
        self._seq = seq
        self._maybe_done = self.table.meta.get("in_flight") == seq
        if not self._maybe_done:
            self.table.set_meta("in_flight", seq)
            await self.table.commit()
        self.table.view_busy = True
        try:
            await getattr(self, "_op_" + op.kind)(*op.fields())
        except OSError as exc:
            if exc.errno not in TREE_CHANGED and exc.errno != errno.ELOOP:
                exc.safefs_op = op.kind  # type: ignore[attr-defined]
                raise
            if isinstance(op, records.Create) and not await self._rescue_new_file(op.ino, op.parent):
                exc.safefs_op = op.kind  # type: ignore[attr-defined]
                raise  # the directory is there: a passing failure (our staging?), retry
            # The project changed behind our back so that this op cannot apply (its source or
            # directory is gone, say). Skipping it loses no data: file contents are published
            # by inode, at wherever the backing view says they are, or kept as conflict copies.
            log.warning("flush: conflict: cannot replay %s (%s); the project changed behind us", op.kind, exc)
            self.conflicts.append({"op": op.kind, "error": str(exc), "why": "the project changed so that the mount's "
                                   f"{op.kind} cannot apply", "time": _utc(self.clock.wall())})  # fmt: skip
        finally:
            self.table.view_busy = False
            self.table.view_version += 1
        self.table.drop_op(seq)
        self.table.set_meta("in_flight", 0)

    async def _rescue_new_file(self, ino: int, parent: int) -> bool:
        """A new file whose directory vanished from the project behind our back: publish it
        as a conflict copy at the top of the project. False if its directory is still
        there (then the failure was something else, and the op is retried)."""
        dpath = self._dir_path(parent)
        if dpath is not None and await self._call(self.backing.is_dir, dpath):
            return False
        inode = self.table.inodes.get(ino)
        if inode is not None and inode.is_reg and inode.links:
            name = min(inode.links)[1]
            inode.new = False
            await self._publish_conflict(inode, (name,))
        return True

    async def settle(self) -> None:
        """At start-up, finish the op a crash interrupted, so the backing view is exact.

        Until then reads could look for a file where the backing tree no longer has it.
        """
        seq = self.table.meta.get("in_flight")
        if seq and seq in self.table.ops:
            try:
                await self._replay_one(seq, self.table.ops[seq])
                await self.table.commit()
            except (OSError, SafefsError) as exc:
                log.warning("flush: could not finish the interrupted op %d yet: %s", seq, exc)

    def _ripe(self, seq: int, op: records.Op, older_than: float) -> bool:
        """May the background flush replay this op now?

        An op waits for the write-back delay. A `create` publishes the file's content, so it
        also waits until the file itself is quiet, lest a half-written file appear on the
        backing tree; but not for ever (a log file written for hours must not hold back the
        whole log): after CREATE_PATIENCE write-back delays it goes anyway.
        """
        happened = self.table.op_times.get(seq, 0.0)
        if happened > older_than:
            return False
        if isinstance(op, records.Create):
            inode = self.table.inodes.get(op.ino)
            patience = CREATE_PATIENCE * self.config.writeback_delay
            if inode is not None and inode.changed_at > older_than and happened > older_than - patience:
                return False
        return True

    def _dir_path(self, ino: int) -> BPath | None:
        return self.table.dir_backing_path(ino)

    async def _attrs(self, inode: Inode) -> Attrs:
        xattrs = await self.fs.xattrs_of(inode)
        return Attrs(
            mode=stat.S_IMODE(inode.mode),
            uid=inode.uid,
            gid=inode.gid,
            atime_ns=inode.atime_ns,
            mtime_ns=inode.mtime_ns,
            xattrs=dict(xattrs),
        )

    async def _call(self, fn: Any, *args: Any) -> Any:
        """A call into the backing tree; one that hangs shows in status (see statistics)."""
        path = args[0] if args and isinstance(args[0], tuple) else ()
        self._in_call = (getattr(fn, "__name__", "call"), path, self.clock.monotonic())
        try:
            return await self.fs.in_backing(self._if_publishable, fn, *args)
        finally:
            self._in_call = None

    def _if_publishable(self, fn: Any, *args: Any) -> Any:
        """In the worker thread: ask the lease once more right before the call (it may have
        been lost while the call waited for a thread)."""
        if not self.fs.gate.publishable():
            raise ReadOnly("the write lease no longer allows changes to the project")
        return fn(*args)

    def _staging(self) -> BPath:
        epoch = getattr(self.fs.gate, "epoch", 0)
        return layout.backing_path(layout.STAGING, str(epoch))

    def _conflict_name(self, name: bytes) -> bytes:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self.clock.wall()))  # UTC
        host = self.host_name.encode(errors="replace").replace(b"/", b"_")
        return name[:150] + b".safefs-conflict-" + host[:40] + b"-" + stamp.encode()

    async def _free_conflict_path(self, path: BPath, parent: int | None = None) -> BPath:
        """A conflict name beside `path` that nothing uses yet (nor, with `parent`, the mount)."""
        base = self._conflict_name(path[-1])
        for n in range(10_000):
            candidate = path[:-1] + (base if n == 0 else base + b"-%d" % n,)
            if parent is not None and self.table.child(parent, candidate[-1]) is not None:
                continue
            if not await self._call(self.backing.exists, candidate):
                return candidate
        raise FileExistsError(errno.EEXIST, "no free conflict name", os.fsdecode(b"/".join(path)))

    def _record_conflict(self, path: BPath, copy: BPath, why: str) -> None:
        log.warning("flush: conflict: %r: %s; the mount's version is %r", path, why, copy)
        self.conflicts.append({"path": os.fsdecode(b"/".join(path)), "kept_as": os.fsdecode(b"/".join(copy)),
                               "copy_holds": "the mount's version", "why": why,
                               "time": _utc(self.clock.wall())})  # fmt: skip

    async def _divert(self, parent: int, name: bytes, inode: Inode, why: str) -> bytes:
        """The project has its own object at (parent, name), where the op being replayed would
        put the mount's `inode`: theirs keeps the name, ours goes beside it as a conflict copy.

        The copy's name goes into this op and the later ones naming it, and into the mount's
        view, in one commit before anything is written to the project: a replay after a crash
        uses the same name. Returns that name.
        """
        dpath = self._dir_path(parent)
        assert dpath is not None
        copy = (await self._free_conflict_path(dpath + (name,), parent))[-1]
        for seq in sorted(s for s in self.table.ops if s >= self._seq):
            op = self.table.ops[seq]
            amended = _with_copy_name(op, parent, name, inode.ino, copy)
            if amended != op:
                self.table.amend_op(seq, amended)
        moved = self.table.child(parent, name) == inode.ino
        if moved:  # the name shows the project's object (after a refresh); ours the copy
            self.table.unlink(parent, name)
            self.table.link(parent, copy, inode)
            self.fs._name_made(parent, copy)
        if parent in self.table.inodes:
            self.table.inodes[parent].stale = True
        self._record_conflict(dpath + (name,), dpath + (copy,), why)
        await self.table.commit()
        if moved:
            await self.fs.invalidator.invalidate_entry(parent, name)
            await self.fs.invalidator.invalidate_entry(parent, copy)
        return copy

    async def _move_aside(self, path: BPath, parent: int | None, why: str) -> BPath:
        """Rename an object the mount removed, which changed on the project, out of the way,
        keeping it. (An object in the way of one of ours keeps its name: see `_divert`.)

        With `parent` (the directory's inode), the directory is marked stale so the kept
        object shows up in the mount too.
        """
        if parent is not None and parent in self.table.inodes:
            self.table.inodes[parent].stale = True
        while True:
            candidate = await self._free_conflict_path(path)
            try:
                await self._call(self.backing.rename, path, candidate, 1)  # RENAME_NOREPLACE
                break
            except FileExistsError:
                continue  # taken meanwhile: pick another
        log.warning("flush: conflict: kept %s as %s", os.fsdecode(b"/".join(path)), os.fsdecode(b"/".join(candidate)))
        self.conflicts.append(
            {"path": os.fsdecode(b"/".join(path)), "kept_as": os.fsdecode(b"/".join(candidate)),
             "copy_holds": "the project's version", "why": why, "time": _utc(self.clock.wall())}
        )  # fmt: skip
        return candidate

    async def _op_mkdir(self, parent: int, name: bytes, ino: int) -> None:
        inode = self.table.inodes.get(ino)
        dpath = self._dir_path(parent)
        if inode is None or dpath is None:
            return  # its parent never reached the backing tree
        # Even a directory removed since must be made: later ops may move things through it.
        path = dpath + (name,)
        attrs = await self._attrs(inode)
        try:
            st = await self._call(self.backing.mkdir, path, attrs)
        except FileExistsError:
            st = await self._call(self.backing.lstat, path)
            if not stat.S_ISDIR(st.st_mode) or (inode.blinks and not self._maybe_done):
                return await self._op_mkdir(parent, await self._divert(parent, name, inode, _CREATED_TOO), ino)
        inode.origin = fingerprint_tuple(Fingerprint.of(st))  # so a refresh knows it as ours
        inode.blinks = [(parent, name)]
        inode.new = False
        self.table.mark(inode)
        self._dirs_to_sync.add(dpath)

    async def _op_create(self, parent: int, name: bytes, ino: int) -> None:
        inode = self.table.inodes.get(ino)
        dpath = self._dir_path(parent)
        if inode is None or not inode.links:
            return  # unlinked before it reached the backing tree: nothing to create
        if dpath is None:
            # Its directory never reached the project (the project changed behind our back so
            # that it could not be made): keep the file as a conflict copy at the top.
            await self._rescue_new_file(ino, parent)
            return
        path = dpath + (name,)
        if inode.is_reg:
            if not self._maybe_done and await self._call(self.backing.exists, path):
                # Someone else's object: never publish over it.
                name = await self._divert(parent, name, inode, _CREATED_TOO)
                path = dpath + (name,)
            await self._publish_file(inode, path, (parent, name), atomic=True, receipt=None)
        else:
            attrs = await self._attrs(inode)
            try:
                if inode.is_link:
                    st = await self._call(self.backing.symlink, inode.target, path, attrs)
                else:
                    st = await self._call(self.backing.mknod, path, inode.mode, inode.rdev, attrs)
            except FileExistsError:
                if not await self._made_by_us(inode, path):
                    return await self._op_create(parent, await self._divert(parent, name, inode, _CREATED_TOO), ino)
                st = await self._call(self.backing.lstat, path)
            inode.origin = fingerprint_tuple(Fingerprint.of(st))
            inode.blinks = [(parent, name)]
            inode.new = False
            inode.attr_dirty = False
            self.table.mark(inode)
        self._dirs_to_sync.add(dpath)

    async def _made_by_us(self, inode: Inode, path: BPath) -> bool:
        """After a crash, is the object at `path` the one this op created?"""
        if not self._maybe_done:
            return False
        st = await self._call(self.backing.lstat, path)
        if stat.S_IFMT(st.st_mode) != stat.S_IFMT(inode.mode):
            return False
        if inode.is_link:
            return bool(await self._call(self.backing.readlink, path) == inode.target)
        return True

    async def _op_link(self, ino: int, parent: int, name: bytes) -> None:
        inode = self.table.inodes.get(ino)
        dpath = self._dir_path(parent)
        src = self.table.backing_path(ino) if inode is not None else None
        if inode is None or dpath is None or src is None:
            return
        path = dpath + (name,)
        try:
            self._moved_by_us(inode, *await self._call(self.backing.link, src, path))
        except FileExistsError:
            st = await self._call(self.backing.lstat, path)
            src_st = await self._call(self.backing.lstat, src)
            if st.st_ino != src_st.st_ino:
                why = "linked in the mount while the project got another object of that name"
                return await self._op_link(ino, parent, await self._divert(parent, name, inode, why))
            else:
                self._linked_before_crash(inode, st)
        if (parent, name) not in inode.blinks:
            inode.blinks.append((parent, name))
        self.table.mark(inode)
        self._dirs_to_sync.add(dpath)

    async def _changed_behind_us(self, inode: Inode | None, path: BPath) -> bool:
        """Is the regular file at `path` no longer the one safefs last saw there?"""
        if inode is None or not inode.is_reg or inode.origin is None or inode.new:
            return False
        if not await self._call(self.backing.exists, path):
            return False
        # The same test as before a publish, so our own publish cut short by a crash (its
        # fingerprint never recorded) is recognised here too.
        return await self._unchanged_behind_us(inode, path) is None

    async def _exchanged_already(self, src: BPath, dst: BPath) -> tuple[bool, os.stat_result]:
        """An exchange cannot tell by itself whether it ran; remember the inodes it swaps.
        Also returns the stat of what is at `dst` now."""
        a = (await self._call(self.backing.lstat, src)).st_ino
        dst_st = await self._call(self.backing.lstat, dst)
        b = dst_st.st_ino
        before = self.table.meta.get("exchange")
        if self._maybe_done and before is not None and [self._seq, b, a] == list(before):
            return True, dst_st
        self.table.set_meta("exchange", [self._seq, a, b])
        await self.table.commit()
        return False, dst_st

    async def _keep_content(self, inode: Inode | None) -> None:
        """Before a file loses a name on the backing tree, fetch what an open fd may still read."""
        if inode is not None and inode.is_reg and inode.opens > 0 and len(inode.blinks) <= 1:
            await self.fs.fill(inode)

    async def _forget_blink(self, inode: Inode | None, link: tuple[int, bytes]) -> None:
        if inode is None:
            return
        if link in inode.blinks:
            inode.blinks.remove(link)
            self.table.mark(inode)
        await self.fs.collect(inode)

    async def _op_unlink(self, parent: int, name: bytes, ino: int) -> None:
        inode = self.table.inodes.get(ino)
        dpath = self._dir_path(parent)
        if dpath is None:
            return
        if inode is not None and (parent, name) not in inode.blinks:
            return  # this name never reached the backing tree
        if inode is None:
            return
        await self._keep_content(inode)
        if await self._changed_behind_us(inode, dpath + (name,)):
            why = "changed in the project, removed in the mount"
            await self._move_aside(dpath + (name,), parent, why)  # their version stays, beside
        else:
            try:
                before = await self._call(self.backing.unlink, dpath + (name,))
            except FileNotFoundError:
                before = None  # replayed before a crash, or removed behind our back
            if len(inode.blinks) > 1:  # another name of it stays on the project
                inode.blinks.remove((parent, name))
                await self._other_links_moved(inode, before)
        await self._forget_blink(inode, (parent, name))
        self._dirs_to_sync.add(dpath)

    async def _op_rmdir(self, parent: int, name: bytes, ino: int) -> None:
        inode = self.table.inodes.get(ino)
        dpath = self._dir_path(parent)
        if dpath is None or inode is None or (parent, name) not in inode.blinks:
            return
        path = dpath + (name,)
        try:
            await self._call(self.backing.rmdir, path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            why = "filled in the project, removed in the mount"
            await self._move_aside(path, parent, why)  # someone put files there behind our back: keep them
        await self._forget_blink(inode, (parent, name))
        self._dirs_to_sync.add(dpath)

    async def _op_rename(
        self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int, ino: int, replaced: int
    ) -> None:
        src_inode = self.table.inodes.get(ino)
        dst_inode = self.table.inodes.get(replaced) if replaced else None
        d_old, d_new = self._dir_path(p_old), self._dir_path(p_new)
        if src_inode is None or (p_old, n_old) not in src_inode.blinks or d_old is None or d_new is None:
            # The source never reached the backing tree; the replaced object must still go.
            if dst_inode is not None and d_new is not None and (p_new, n_new) in dst_inode.blinks:
                if not flags & 2:
                    await self._op_unlink(p_new, n_new, replaced) if not dst_inode.is_dir else \
                        await self._op_rmdir(p_new, n_new, replaced)  # fmt: skip
            return
        src, dst = d_old + (n_old,), d_new + (n_new,)
        exchange = bool(flags & 2)
        dst_known = dst_inode is not None and (p_new, n_new) in dst_inode.blinks
        done_before_crash = (
            self._maybe_done
            and not exchange
            and not await self._call(self.backing.exists, src)
            and await self._call(self.backing.exists, dst)
        )  # the rename landed, the kill came before we recorded it: nothing is a conflict
        if not exchange and not done_before_crash:
            await self._keep_content(dst_inode)
            if dst_known and await self._changed_behind_us(dst_inode, dst):
                # Their version keeps the name; ours goes beside it.
                assert dst_inode is not None
                await self._forget_blink(dst_inode, (p_new, n_new))
                why = "changed in the project, replaced by a rename in the mount"
                n_new = await self._divert(p_new, n_new, src_inode, why)
                dst, dst_known = d_new + (n_new,), False
        if exchange and not dst_known:
            # The other side never reached the backing tree: a plain move is what remains.
            exchange = False
        rename_flags = 2 if exchange else (0 if dst_known else 1)
        # What the rename swaps or replaces: its ctime moves too (if it has other links).
        other_before = None
        if exchange:
            done, other_before = await self._exchanged_already(src, dst)
            rename_flags = -1 if done else rename_flags
        elif dst_known and len(dst_inode.blinks) > 1:  # type: ignore[union-attr]
            other_before = await self._call(self.backing.lstat, dst)
        if done_before_crash:
            rename_flags = -1
        try:
            if rename_flags >= 0:
                self._moved_by_us(src_inode, *await self._call(self.backing.rename, src, dst, rename_flags))
            else:
                self._linked_before_crash(src_inode, await self._call(self.backing.lstat, dst))
        except FileNotFoundError:
            if await self._call(self.backing.exists, src):
                raise  # the destination directory is missing: a real inconsistency
            if not await self._call(self.backing.exists, dst):
                raise  # the source vanished behind our back and never arrived
            # replayed already before a crash: just record where things are
            self._linked_before_crash(src_inode, await self._call(self.backing.lstat, dst))
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
            # The project holds another object there (or filled the directory we replace):
            # it keeps the name, ours goes beside it.
            if dst_known:
                await self._forget_blink(dst_inode, (p_new, n_new))
                dst_known = False
            why = "renamed in the mount onto a name the project gave another object"
            n_new = await self._divert(p_new, n_new, src_inode, why)
            dst = d_new + (n_new,)
            self._moved_by_us(src_inode, *await self._call(self.backing.rename, src, dst, 1))
        src_inode.blinks.remove((p_old, n_old))
        src_inode.blinks.insert(0, (p_new, n_new))
        self.table.mark(src_inode)
        if dst_inode is not None and dst_known:
            dst_inode.blinks.remove((p_new, n_new))
            if exchange:
                dst_inode.blinks.insert(0, (p_old, n_old))
                self.table.mark(dst_inode)
            else:
                await self._forget_blink(dst_inode, (p_new, n_new))
            await self._other_links_moved(dst_inode, other_before if rename_flags >= 0 else None)
        self._dirs_to_sync.update((d_old, d_new))

    def _moved_by_us(self, inode: Inode | None, before: os.stat_result, after: os.stat_result) -> None:
        """safefs itself just renamed or linked this object on the project, which moved its
        ctime: if it was what we had recorded just before, record what it is now."""
        if inode is not None and inode.origin is not None and same_content(inode.origin, _fingerprint(before)):
            inode.origin = _fingerprint(after)
            self.table.mark(inode)

    def _linked_before_crash(self, inode: Inode | None, st: os.stat_result) -> None:
        """The op had already taken effect when the daemon died, before the fingerprint after
        it was recorded: only the ctime may differ, and that change was ours."""
        if self._maybe_done and inode is not None and inode.origin is not None:
            if tuple(inode.origin[:3]) == _fingerprint(st)[:3]:
                inode.origin = _fingerprint(st)
                self.table.mark(inode)

    async def _other_links_moved(self, inode: Inode | None, before: os.stat_result | None) -> None:
        """A name of `inode` went (replaced or unlinked by us): re-record the fingerprint from
        a name it still has, whose ctime moved with it."""
        if inode is None or not inode.is_reg or not inode.blinks:
            return
        path = self.table.backing_path(inode.ino)
        if path is None:
            return
        try:
            after = await self._call(self.backing.lstat, path)
        except OSError:
            return  # the publish or the next op sees what is there
        if before is not None:
            self._moved_by_us(inode, before, after)
        else:
            self._linked_before_crash(inode, after)

    # -- publishing ----------------------------------------------------------------------
    async def _publish(self, inode: Inode, receipt: Receipt) -> None:
        self.fs.gate.require_publishable()
        path = self.table.backing_path(inode.ino) if inode.ino != ROOT_INO else ()
        if path is None or (not inode.links and inode.ino != ROOT_INO):
            return  # not on the backing tree, or about to leave it: nothing to publish
        if inode.is_reg:
            await self._publish_file(inode, path, inode.blinks[0], atomic=None, receipt=receipt)
            return
        version = inode.version
        attrs = await self._attrs(inode)
        try:
            await self._call(self.backing.set_attrs, path, attrs)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            # Removed, renamed or replaced behind our back: only attributes are lost (what
            # was below it is published or kept by inode); say so and move on.
            log.warning("flush: conflict: cannot set attributes of %s: %s", os.fsdecode(b"/".join(path)), exc)
            self.conflicts.append({"path": os.fsdecode(b"/".join(path)), "error": str(exc),
                                   "why": "removed or replaced in the project; the mount's attributes are not applied",
                                   "time": _utc(self.clock.wall())})  # fmt: skip
        if inode.version == version:
            inode.attr_dirty = False
            self.table.mark(inode)

    async def _publish_file(
        self, inode: Inode, path: BPath, blink: tuple[int, bytes], *, atomic: bool | None, receipt: Receipt | None
    ) -> None:
        fs = self.fs
        backing_links = 1
        if not inode.new and inode.origin is not None:
            st_now = await self._unchanged_behind_us(inode, path)
            if st_now is None:
                await self._publish_conflict(inode, path)
                return
            backing_links = st_now.st_nlink
        version = inode.version
        whole = inode.new or (
            atomic is not False
            and inode.size <= self.config.publish_threshold
            and len(inode.blinks) <= 1
            and backing_links <= 1  # a rename would split a hard link we may not know of
        )
        attrs = await self._attrs(inode)
        async with self._pinned(inode.ino) as fd:
            if whole:
                await fs.fill(inode)
                staging = self._staging()
                tmp = b"publish-%x-%x-%s.tmp" % (inode.ino, version, os.urandom(6).hex().encode())
                await self._record_publishing(inode, staging + (tmp,))
                st = await self._call(self.backing.publish_atomic, path, staging, fd, inode.size, attrs, tmp)
                self._renamed_into.add(blink[0])
                written = inode.size
            elif inode.dirty or inode.attr_dirty:
                dirty = list(inode.dirty)
                await self._record_publishing(inode, ())
                st = await self._call(self.backing.write_ranges, path, fd, dirty, inode.size, attrs, inode.low_size)
                written = ranges.total(dirty)
            else:
                return
        inode.publishing = None
        if not inode.new:
            self.published_files += 1
        receipt = receipt or self._receipt
        if receipt is not None:
            receipt.files += 1
            receipt.bytes += written
        inode.origin = fingerprint_tuple(Fingerprint.of(st))
        if inode.new:
            inode.blinks = [blink]
            inode.new = False
            if st.st_nlink > 1:
                fs._by_backing_ino[st.st_ino] = inode.ino
        if inode.version == version:
            inode.dirty = ranges.EMPTY
            inode.attr_dirty = False
            inode.low_size = None
            inode.unclean = False
        self.table.mark(inode)
        self._dirs_to_sync.add(path[:-1])

    @contextlib.asynccontextmanager
    async def _pinned(self, ino: int) -> AsyncIterator[int]:
        """The inode's cache descriptor, pinned: the cache's table of open files cannot close
        it (and hand its number to another file) while a backing call copies from it."""
        fd = await self.fs.in_cache(self.fs.cache.pin, ino)
        try:
            yield fd
        finally:
            self.fs.cache.unpin(fd)

    async def _clean_staging(self) -> None:
        """Remove staging files a crash left behind, except those a record still names."""
        self.fs.gate.require_publishable()
        staging = self._staging()
        try:
            entries = await self._call(self.backing.listdir, staging)
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        named = {i.publishing[-1] for i in self.table.inodes.values() if i.publishing}
        for entry in entries:
            if entry.name not in named:
                with contextlib.suppress(FileNotFoundError):
                    await self._call(self.backing.unlink, staging + (entry.name,))
        self._staging_cleaned = True

    async def _record_publishing(self, inode: Inode, what: tuple[bytes, ...]) -> None:
        if not inode.new:
            inode.publishing = what
            self.table.mark(inode)
            await self.table.commit()

    async def _ours_after_crash(self, inode: Inode, st: os.stat_result) -> bool:
        """Is the unexpected backing file the result of our own publish, cut short by a crash?"""
        publishing, inode.publishing = inode.publishing, None
        self.table.mark(inode)
        if publishing is None or not stat.S_ISREG(st.st_mode) or inode.origin is None:
            return False
        if publishing == ():
            return st.st_ino == inode.origin[0]  # an in-place write keeps the inode
        # The staging file is gone only if it was renamed into place (publish_atomic removes
        # it on failure only while we are alive to clear `publishing` ourselves).
        if await self._call(self.backing.exists, publishing):
            with contextlib.suppress(OSError):
                await self._call(self.backing.unlink, publishing)
            return False
        return True

    async def _unchanged_behind_us(self, inode: Inode, path: BPath) -> os.stat_result | None:
        """The backing file's stat if it is still what safefs last saw there, else None."""
        try:
            st = await self._call(self.backing.lstat, path)
        except (FileNotFoundError, NotADirectoryError):
            return None  # gone, or its directory was replaced behind our back
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            return None  # a symlink now stands where a directory was
        fingerprint = fingerprint_tuple(Fingerprint.of(st))
        if same_content(inode.origin, fingerprint):
            if inode.publishing:  # a publish that never reached its rename: drop its leftovers
                await self._ours_after_crash(inode, st)
            return st
        if await self._ours_after_crash(inode, st):
            inode.origin = fingerprint
            return st
        return None

    async def _publish_conflict(self, inode: Inode, path: BPath) -> None:
        """The backing file changed behind safefs's back: keep both versions side by side."""
        fs = self.fs
        parent = inode.blinks[0][0] if inode.blinks else ROOT_INO
        if path[:-1] and not await self._call(self.backing.is_dir, path[:-1]):
            # Its directory is gone too (removed or renamed behind our back): keep our version
            # at the top of the project rather than nowhere.
            path, parent = (path[-1],), ROOT_INO
        aside = await self._free_conflict_path(path)
        name = aside[-1]
        attrs = await self._attrs(inode)
        async with self._pinned(inode.ino) as fd:
            try:
                await fs.fill(inode)
            except (OSError, Exception):  # the original may be gone; publish what we have
                pass
            st = await self._call(self.backing.publish_atomic, aside, self._staging(), fd, inode.size, attrs)
        self._record_conflict(path, aside, "changed in the mount, and changed, replaced or removed in the project")
        # Our version now lives under the conflict name; the original name shows the backing
        # tree's version again (or goes, if the backing tree no longer has it).
        copy = self.table.new_inode(stat.S_IFREG | stat.S_IMODE(inode.mode), inode.uid, inode.gid, st.st_ctime_ns)
        Filesystem._copy_stat(copy, st)
        copy.origin = fingerprint_tuple(Fingerprint.of(st))
        copy.blinks = [(parent, name)]
        copy.xattrs = dict(attrs.xattrs)
        if parent in self.table.inodes and self.table.child(parent, name) is None:
            self.table.link(parent, name, copy)
        current_path = self.table.backing_path(inode.ino) if inode.blinks else None
        try:
            cur = await self._call(self.backing.lstat, current_path) if current_path else None
        except (FileNotFoundError, NotADirectoryError):
            cur = None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            cur = None
        async with fs.inode_locks(inode.ino):
            await fs.in_cache(fs.cache.delete, inode.ino)
            inode.present = ranges.EMPTY
            inode.dirty = ranges.EMPTY
            inode.attr_dirty = False
            if fs.kernel_owns_sizes:
                cur = None  # the kernel keeps this inode's size: the name gets a new inode
            if cur is not None and stat.S_ISREG(cur.st_mode):
                Filesystem._copy_stat(inode, cur)
                inode.origin = fingerprint_tuple(Fingerprint.of(cur))
            else:
                inode.size = 0
                inode.origin = None
            self.table.mark(inode)
        if cur is None or not stat.S_ISREG(cur.st_mode):
            for link_parent, link_name in list(inode.links):
                self.table.unlink(link_parent, link_name)
                if fs.kernel_owns_sizes and link_parent in self.table.inodes:
                    self.table.inodes[link_parent].stale = True  # a refresh finds theirs
                await fs.invalidator.invalidate_entry(link_parent, link_name)
            inode.blinks.clear()
            await fs.collect(inode)
        await fs.invalidator.invalidate_inode(inode.ino)
        if parent in self.table.inodes:
            await fs.invalidator.invalidate_entry(parent, name)

    async def _restore_dir_times(self) -> None:
        """A staging rename into a directory moved its times on the project: give it back the
        times the mount shows, once per directory per pass, after the last rename into it."""
        dirs, self._renamed_into = self._renamed_into, set()
        for ino in sorted(dirs):
            d, path = self.table.inodes.get(ino), self._dir_path(ino)
            if d is None or path is None:
                continue
            self.fs.gate.require_writable()
            try:
                await self._call(self.backing.set_times, path, d.atime_ns, d.mtime_ns)
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone from the project meanwhile: nothing to restore
            self._dirs_to_sync.add(path)

    async def _sync_dirs(self) -> None:
        dirs, self._dirs_to_sync = self._dirs_to_sync, set()
        for path in dirs:
            try:
                await self._call(self.backing.fsync_dir, path)
            except FileNotFoundError:
                pass

    def report_conflicts(self) -> list[dict[str, Any]]:
        """The conflicts since the last call: a sync receipt lists each one once."""
        new = self.conflicts[self._conflicts_reported :]
        self._conflicts_reported = len(self.conflicts)
        return new

    # -- status --------------------------------------------------------------------------
    def statistics(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        dirty = [i for i in self.table.iter_dirty() if i.links or i.ino == ROOT_INO]
        dirty_bytes = sum(ranges.total(i.dirty) for i in dirty)
        oldest = min((i.changed_at for i in dirty), default=None)
        errors = []
        if self.last_error is not None:
            errors.append(dataclasses.asdict(self.last_error))
        if self._in_call is not None and now - self._in_call[2] > HUNG_CALL:
            op, path, since = self._in_call
            errors.append({"op": op, "path": os.fsdecode(b"/".join(path)),
                           "error": f"no answer from the project for {now - since:.0f} s",
                           "retry_at": self.clock.wall()})  # fmt: skip  # goes on when it answers
        return {
            "dirty_bytes": dirty_bytes,
            "dirty_files": len(dirty),
            "oldest_dirty_age": (now - oldest) if oldest is not None else None,
            "pending_ops": len(self.table.ops),
            "flushes": self.flushes,
            "flushing": self.busy,
            "errors": errors,
            "conflicts": list(self.conflicts),
        }
