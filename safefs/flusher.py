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
- A content file's cache descriptor is pinned while a backing call copies from it
  (`WriteBack.pinned`).

Parts: the Flusher builds one of each, handing each only what it uses, and is the only module
that imports them: WriteBack (writeback.py: the calls into the backing tree, and the call
under way), Conflicts (conflicts.py: conflict copies, and the conflicts found), Publisher
(publish.py: publishing dirty inodes, and what a pass has still to close) and Replayer
(replay.py: the op log, and the op being replayed). Each calls only parts named before it,
directly; none knows the Flusher. The Flusher itself owns the scheduling (wake-ups,
backoff, the last error), the published generation and the counters status shows.

Threading: runs on the trio thread, as do its parts; backing calls run in threads behind the
backing limiter. Only one flush runs at a time (`_flush_lock`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import trio

from safefs import generation, ranges
from safefs.backing import Backing
from safefs.cache import ContentCache
from safefs.clock import Clock
from safefs.config import MountConfig
from safefs.conflicts import Conflicts
from safefs.content import Content
from safefs.errors import BackingFailed, ReadOnly, SafefsError, SyncTimeout
from safefs.inodes import ROOT_INO, InodeTable
from safefs.negative import NegativeNames
from safefs.ports import Invalidator, WriteGate
from safefs.publish import Publisher
from safefs.replay import Replayer
from safefs.writeback import HUNG_CALL, FlushError, Receipt, WriteBack

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0


@dataclasses.dataclass(frozen=True)
class FlusherStatistics:
    """What `Flusher.statistics()` reports (trio style: an immutable object with named
    fields). The mount's `status` turns it into the control protocol's FlushStatistics, whose
    fields have the same names."""

    dirty_bytes: int  # not yet on the project, in files that still have a name (or the root)
    dirty_files: int
    oldest_dirty_age: float | None  # seconds since the oldest of those changes; None if clean
    pending_ops: int  # namespace changes not yet replayed
    flushes: int  # passes completed
    flushing: bool  # a pass is under way
    errors: tuple[FlushError, ...]  # the last failure, and a backing call that hangs
    conflicts: tuple[dict[str, Any], ...]  # every conflict so far (Conflicts.found)


class Flusher:
    """The write-back service. Built from the pieces it works on, not from the Filesystem: it
    learns of changes through `poke` (the daemon hands that to the filesystem as its
    `on_change`), and shares with the filesystem only what sits below both (the inode table,
    the contents with their locks and thread hops, the remembered negative entries).

    This class schedules passes, syncs, publishes generations and reports status; the work
    of a pass is done by the parts it builds and calls: `replayer` (replay.py), `publisher`
    (publish.py), `resolver` (conflicts.py) and `writeback` (writeback.py: the calls into
    the backing tree)."""

    def __init__(
        self,
        *,
        table: InodeTable,
        cache: ContentCache,
        content: Content,
        backing: Backing,
        gate: WriteGate,
        clock: Clock,
        config: MountConfig,
        invalidator: Invalidator,
        negative: NegativeNames,
        host_name: str,
    ) -> None:
        self.table = table
        self.backing = backing
        self.gate = gate
        self.clock = clock
        self.config = config
        self.host_name = host_name
        self.writeback = WriteBack(table=table, cache=cache, content=content, gate=gate, clock=clock)
        self.resolver = Conflicts(
            writeback=self.writeback, table=table, cache=cache, content=content, backing=backing, clock=clock,
            invalidator=invalidator, negative=negative, host_name=host_name,
        )  # fmt: skip
        self.publisher = Publisher(
            writeback=self.writeback, resolver=self.resolver, table=table, content=content, backing=backing,
            gate=gate, clock=clock, config=config,
        )  # fmt: skip
        self.replayer = Replayer(
            writeback=self.writeback, resolver=self.resolver, publisher=self.publisher, table=table,
            content=content, backing=backing, gate=gate, clock=clock, config=config,
        )  # fmt: skip
        self._wake = trio.Event()
        self._wake_at = math.inf  # when run() looks next by itself (see poke)
        self._flush_lock = trio.Lock()
        self._backoff = 0.0
        self._next_try = 0.0
        self.last_error: FlushError | None = None
        self.flushes = 0
        self.generation = 0  # the last generation this mount published
        self._generation_pending = False  # a sync must publish a generation before it returns
        self._announce_all = True  # the first generation this writer publishes names everything
        self.announce: Callable[[dict[str, Any]], None] | None = None  # told of every published generation
        self.busy = False

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
            self.publisher.receipt = receipt  # what replayed creates publish counts here too
            self.busy = True
            try:
                if not self.publisher.staging_cleaned:
                    await self.publisher.clean_staging()
                now = self.clock.monotonic()
                await self.replayer.replay_ops(receipt, None if everything else now - self.config.writeback_delay)
                for inode in list(self.table.iter_dirty()):
                    if inode.ino not in self.table.inodes or inode.new:
                        continue
                    if everything or now - inode.changed_at >= self.config.writeback_delay:
                        await self.publisher.publish(inode, receipt)
                await self.publisher.restore_dir_times()
                await self.publisher.sync_dirs()
                if self.writeback.unannounced or (everything and self._generation_pending):
                    await self._publish_generation()
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

    async def _publish_generation(self) -> None:
        """Tell followers that the project moved: `.safefs/generation`, epoch and counter, and
        every directory changed since the last one (all of them once after becoming the writer:
        what a crash cut short before its generation went out is not known)."""
        epoch = self.gate.require_publishable()
        number = max(self.generation, int(self.table.meta.get("generation", 0))) + 1
        self._generation_pending = True  # until the record is out
        changed = set(self.writeback.unannounced)
        record = await self.writeback.call(
            functools.partial(
                generation.write, self.backing, self.writeback.staging(), epoch=epoch, generation=number,
                host=self.host_name, changed=changed, everything=self._announce_all,
            )
        )  # fmt: skip
        self.writeback.unannounced -= changed
        self._announce_all = False
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
        self._announce_all = True

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
                    await self.table.sync()
                    total.generation = self.generation
                    return total
                continue
            raise SyncTimeout(
                "sync timed out; dirty data stays safe in the cache",
                hint="check the project's NFS server, then run safefs sync again",
            )

    async def settle(self) -> None:
        """At start-up, finish the op a crash interrupted, so the backing view is exact."""
        await self.replayer.settle()

    def _done_since(self, start_versions: dict[int, int], start_seq: int) -> bool:
        if any(seq < start_seq for seq in self.table.ops):
            return False
        for ino in start_versions:
            inode = self.table.inodes.get(ino)
            if inode is not None and inode.needs_flush and inode.links:
                return False
        return True









































    # -- status --------------------------------------------------------------------------
    @property
    def conflicts(self) -> list[dict[str, Any]]:
        """Every conflict write-back ran into, in order (the Conflicts part keeps them)."""
        return self.resolver.found

    def report_conflicts(self) -> list[dict[str, Any]]:
        """The conflicts since the last call: a sync receipt lists each one once."""
        return self.resolver.report_conflicts()

    def statistics(self) -> FlusherStatistics:
        now = self.clock.monotonic()
        dirty = [i for i in self.table.iter_dirty() if i.links or i.ino == ROOT_INO]
        dirty_bytes = sum(ranges.total(i.dirty) for i in dirty)
        oldest = min((i.changed_at for i in dirty), default=None)
        errors = []
        if self.last_error is not None:
            errors.append(self.last_error)
        in_call = self.writeback.in_call
        if in_call is not None and now - in_call[2] > HUNG_CALL:
            op, path, since = in_call
            errors.append(FlushError(op=op, path=os.fsdecode(b"/".join(path)),
                                     error=f"no answer from the project for {now - since:.0f} s",
                                     retry_at=self.clock.wall()))  # fmt: skip  # goes on when it answers
        return FlusherStatistics(
            dirty_bytes=dirty_bytes,
            dirty_files=len(dirty),
            oldest_dirty_age=(now - oldest) if oldest is not None else None,
            pending_ops=len(self.table.ops),
            flushes=self.flushes,
            flushing=self.busy,
            errors=tuple(errors),
            conflicts=tuple(self.conflicts),
        )
