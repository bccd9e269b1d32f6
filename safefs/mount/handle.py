"""The control socket's handler: status, sync, acquire, recover and unmount of this mount.

`safefs/control/server.py` calls these methods (the ControlHandler protocol) on the trio
thread (the root gives the server this object). The shut-down's `state` says where the mount
is: "mounted", "unmounted" (the final write-back runs), "exiting". The control socket answers
until the end, so `status` lists an unmounted mount that still writes back, and `umount`/`sync`
on it wait for the outcome. `safefs umount` makes the daemon run the unmount itself before it
releases anything (prepare_unmount): a refused (busy) unmount leaves the mount the writer it was.
Calls that wait tell the client every PROGRESS_INTERVAL how far the write-back is and what it
waits for.

Invariants: a mount holding changes it cannot write back never reports them safe (G4,
`_refuse_if_orphaned`); a write-back a caller gave up on goes on in the background.

Threading: the trio thread; listings of the project and fusermount3 run in worker threads.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from safefs import logs, unmount
from safefs.control import protocol
from safefs.errors import LeaseHeldElsewhere, SafefsError, SyncTimeout, Unwritten
from safefs.fuse_ops import flush_kernel_pages

if TYPE_CHECKING:
    from safefs.backing import Backing
    from safefs.config import MountConfig
    from safefs.flusher import Flusher, FlusherStatistics
    from safefs.fs import Filesystem
    from safefs.fuse_ops import SafeOperations
    from safefs.lease.backends import ProjectLeaseStore
    from safefs.lease.keeper import KeeperStatistics, LeaseKeeper
    from safefs.mount.following import Following
    from safefs.mount.orphan_marker import OrphanMarker
    from safefs.mount.reporting import HistoryRecorder, Reporting
    from safefs.mount.shutdown import Shutdown
    from safefs.mount.unwritten import UnwrittenChanges

log = logging.getLogger(__name__)

ORPHAN_READ_TIMEOUT = 3.0  # `status` waits this long for the list of markers (the CLI waits 10 s)
KERNEL_FLUSH_TIMEOUT = 300.0  # syncfs of our own mount before a write-back without a timeout
PROGRESS_INTERVAL = 0.5  # how often a waiting `sync` or `umount` hears how far the write-back is
SYNC_GRACE = 0.5  # a timed-out write-back gets this long to say so itself


def lease_to_wire(statistics: KeeperStatistics) -> dict[str, Any]:
    """The lease keeper's statistics as the control protocol's JSON has them (`status`'s
    `lease`, the ready message's `holder`): the one place they are converted."""
    return dataclasses.asdict(statistics)


class MountHandle:
    """The control socket's handler of one mount (see the module docstring). The root builds
    it with its collaborators once the session exists; `services` is the nursery a write-back
    a caller gave up on goes on in."""

    def __init__(
        self, config: MountConfig, host_name: str, keeper: LeaseKeeper, lease_store: ProjectLeaseStore,
        fs: Filesystem, backing: Backing, flusher: Flusher, following: Following, orphan_marker: OrphanMarker,
        reporting: Reporting, recorder: HistoryRecorder, unwritten: UnwrittenChanges, shutdown: Shutdown,
        ops: SafeOperations, services: trio.Nursery,
    ) -> None:  # fmt: skip
        self.config = config
        self.host_name = host_name
        self.keeper = keeper
        self.lease_store = lease_store
        self.fs = fs
        self.backing = backing
        self.flusher = flusher
        self.following = following
        self.orphan_marker = orphan_marker
        self.reporting = reporting
        self.recorder = recorder
        self.unwritten = unwritten
        self.shutdown = shutdown
        self.ops = ops
        self._services = services
        self._listing_limiter = trio.CapacityLimiter(2)  # listings of orphan markers for `status`

    # -- the control socket's handler ----------------------------------------------------
    async def status(self) -> protocol.Status:
        config = self.config
        # The keeper and the flusher report frozen dataclasses, the lease store a dict; the
        # protocol types them.
        lease = dataclasses.replace(
            protocol.from_wire(protocol.LeaseStatistics,
                               {**lease_to_wire(self.keeper.statistics()), **self.lease_store.describe()}),
            generation=self.flusher.generation if self.keeper.role == "writer" else
            (self.following.seen_generation or {}).get("generation"),
            project_polls=self.lease_store.project_requests + self.following.generation_reads,
            generation_seen_at=self.following.generation_seen_at if self.keeper.role != "writer" else None,
        )  # fmt: skip
        return protocol.Status(
            src=str(config.src),
            mnt=str(config.mnt),
            cache_dir=str(config.cache_dir),
            pid=os.getpid(),
            host=self.host_name,
            role=self.keeper.role,
            state=self.shutdown.state,
            flush=flush_statistics(self.flusher.statistics()),
            bytes_fetched=self.backing.bytes_read,
            bytes_written=self.backing.bytes_written,
            cache_bytes=self.fs.cached_bytes(),
            cache_limit=config.cache_size,
            cache_hits=self.fs.stats.cache_hits,
            fetches=self.fs.stats.fetches,
            evictions=self.fs.stats.evictions,
            inodes=len(self.fs.table.inodes),
            internal_errors=self.ops.bugs,
            kernel_writeback_cache=self.ops.enable_writeback_cache,
            writeback_delay=config.writeback_delay,
            lease=lease,
            warnings=[protocol.from_wire(protocol.LogWarning, item) for item in logs.recent()],
            orphan_listing=await self._orphan_listing(),
        )

    async def _orphan_listing(self) -> protocol.OrphanListing:
        """Every host's orphan markers (ours too) for `status`: `orphans` (a list of records,
        or None if the project did not answer in time), `orphans_error`, `orphans_skipped`."""
        try:
            with trio.fail_after(ORPHAN_READ_TIMEOUT):
                listing = await trio.to_thread.run_sync(
                    self.orphan_marker.orphans.list, limiter=self._listing_limiter, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            error = f"{self.orphan_marker.orphans.path} did not answer within {ORPHAN_READ_TIMEOUT:g} s"
            return protocol.OrphanListing(orphans=None, orphans_error=error, orphans_skipped=[])
        except OSError as exc:
            error = f"cannot read {self.orphan_marker.orphans.path}: {exc.strerror or exc}"
            return protocol.OrphanListing(orphans=None, orphans_error=error, orphans_skipped=[])
        records = [protocol.Orphan(name=name, **dataclasses.asdict(record)) for name, record in listing.records]
        skipped = [protocol.SkippedOrphan(name=s.name, error=s.error) for s in listing.skipped]
        return protocol.OrphanListing(orphans=records, orphans_error=None, orphans_skipped=skipped)

    async def sync(self, *, release: bool, timeout: float | None, progress: Any) -> protocol.SyncReceipt:
        if self.shutdown.state != "mounted":  # unmounted: sync means "wait for the final write-back"
            outcome = await self._wait_final(timeout, progress)
            self._refuse_if_orphaned(unmounted=True)
            final = self.shutdown.final_receipt
            return protocol.SyncReceipt(role=outcome.role, final=outcome.final, files=getattr(final, "files", 0),
                                        bytes=getattr(final, "bytes", 0), ops=getattr(final, "ops", 0),
                                        generation=getattr(final, "generation", None), epoch=self.following.held_epoch,
                                        released=True)  # fmt: skip
        if self.keeper.role != "writer":
            self._refuse_if_orphaned()
            # A follower has nothing to write back; sync means "show me the latest".
            self.fs.mark_stale()
            self.following.invalidate_kernel()
            record = await self.following.read_generation()
            self.following.seen_generation = record or self.following.seen_generation
            return protocol.SyncReceipt(role="follower", epoch=self.keeper.epoch,
                                        generation=(record or {}).get("generation"))  # fmt: skip
        receipt = await self._write_back_reported(timeout, progress)
        epoch = self.keeper.epoch
        if release:
            await self.keeper.release()
            await self.following.take_role()
        return protocol.SyncReceipt(
            role=self.keeper.role,
            epoch=epoch,
            generation=receipt.generation,
            files=receipt.files,
            bytes=receipt.bytes,
            ops=receipt.ops,
            released=release,
            # since the last sync, background ones too
            conflicts=[protocol.from_wire(protocol.Conflict, c) for c in self.flusher.report_conflicts()],
        )

    async def _write_back_reported(self, timeout: float | None, progress: Any) -> Any:
        """_write_back in the background, answering within about `timeout` whatever a backing
        call in flight does, and telling the client each second what it waits for. On a
        timeout the write-back goes on by itself; the SyncTimeout names the real cause."""
        await self._flush_kernel(timeout)
        outcome: list[Any] = []
        done = trio.Event()

        async def write_back() -> None:
            try:
                outcome.append(await self.shutdown.write_back(timeout))
            except Exception as exc:  # answered to the caller below, never a crash of the services
                outcome.append(exc)
            finally:
                done.set()

        self._services.start_soon(write_back)
        with trio.move_on_after(float("inf") if timeout is None else timeout + SYNC_GRACE):
            await self._wait_reporting(done, progress, self._write_back_wait)
        if not outcome or isinstance(outcome[0], SyncTimeout):
            raise self._sync_timeout(timeout)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    async def _flush_kernel(self, timeout: float | None) -> None:
        """With the writeback cache, the kernel holds pages written to files still open: make
        it send them before a write-back that `sync`, `sync --release` or `umount` asked for."""
        if self.shutdown.state == "mounted" and self.ops.enable_writeback_cache:
            await flush_kernel_pages(str(self.config.mnt), KERNEL_FLUSH_TIMEOUT if timeout is None else timeout)

    async def _wait_reporting(self, event: trio.Event, progress: Any, what: Any) -> None:
        """Wait for `event`; meanwhile tell `progress` every PROGRESS_INTERVAL how far the
        write-back is (files and bytes left and done) and what it waits for: `what()` =
        (waiting_for, detail)."""
        ops, files, nbytes = self.unwritten.counts()
        files_total, bytes_total = ops + files, nbytes
        while True:
            with trio.move_on_after(PROGRESS_INTERVAL):
                await event.wait()
                return
            if progress is None:
                continue
            ops, files, nbytes = self.unwritten.counts()
            files_total, bytes_total = max(files_total, ops + files), max(bytes_total, nbytes)
            waiting_for, detail = what()
            await progress(protocol.ProgressReport(
                waiting_for=waiting_for, detail=detail,
                files_done=files_total - ops - files, files_total=files_total,
                bytes_done=bytes_total - nbytes, bytes_total=bytes_total,
            ))  # fmt: skip

    def _write_back_wait(self) -> tuple[str, str]:
        ops, files, nbytes = self.unwritten.counts()
        left = f"{ops + files} changes, {nbytes} bytes left"
        lock_delay = self.keeper.statistics().lock_delay
        if lock_delay:
            return "the lock delay after taking over the lease, before writing to the project", \
                f"{lock_delay:.0f} s left; {left}"  # fmt: skip
        error = self.flusher.last_error
        if error is not None:
            return "the project, which fails (retrying)", f"{error.op} {error.path}: {error.error}; {left}"
        return "the write-back to the project", left

    def _sync_timeout(self, timeout: float | None) -> SyncTimeout:
        """The timeout of a sync, naming why: the project fails, or the write-back is not done."""
        within = "in time" if timeout is None else f"within {timeout:g} s"
        waiting_for, detail = self._write_back_wait()
        if self.flusher.last_error is not None:
            return SyncTimeout(
                f"sync did not finish {within}: the project fails ({detail}); the dirty data stays "
                "safe in the cache",
                hint="check the project's NFS server; the write-back goes on by itself, run `safefs sync` again",
            )
        return SyncTimeout(
            f"sync did not finish {within}: waiting for {waiting_for} ({detail}); the project answers, the "
            "write-back was simply not finished; the dirty data stays safe in the cache",
            hint="it goes on in the background; run `safefs sync` again to wait for it",
        )

    async def _wait_final(self, timeout: float | None, progress: Any) -> protocol.UnmountReceipt:
        """Wait for the final write-back of an unmounted mount; what it left, for the caller."""
        with self.shutdown.awaited():
            with trio.move_on_after(float("inf") if timeout is None else timeout):
                await self._wait_reporting(self.shutdown.final_done, progress, self._final_wait)
            if not self.shutdown.final_done.is_set():
                ops, files, nbytes = self.unwritten.counts()
                raise SyncTimeout(
                    f"{self.config.mnt} is unmounted, but its daemon (pid {os.getpid()}) is still writing "
                    f"back after {timeout:g} s ({ops + files} changes, {nbytes} bytes left)",
                    hint="it goes on by itself; `safefs status` shows how far it is",
                )
            return self._outcome()

    def _final_wait(self) -> tuple[str, str]:
        if self.shutdown.state == "mounted":
            return f"the files still open in the detached mount {self.config.mnt} to be closed", \
                f"{self.fs.open_files()} open"  # fmt: skip
        waiting_for, detail = self._write_back_wait()
        return f"{waiting_for} (final, after the unmount)", detail

    def _outcome(self) -> protocol.UnmountReceipt:
        """What an unmount left: everything written back, or how much stays in which cache."""
        ops, files, nbytes = self.unwritten.counts()
        return protocol.UnmountReceipt(role=self.keeper.role, final=protocol.FinalWriteBack(
            src=str(self.config.src), cache_dir=str(self.config.cache_dir), pid=os.getpid(),
            state=self.shutdown.state, unmounted=True,
            unwritten=ops + files, unwritten_files=files, unwritten_ops=ops, unwritten_bytes=nbytes,
            unwritten_reason=self.shutdown.exit_detail or self.orphan_marker.orphan_reason
            or self.orphan_marker.why_orphaned() if ops + files else None,
        ))  # fmt: skip

    def _refuse_if_orphaned(self, *, unmounted: bool = False) -> None:
        """A mount holding changes it cannot write back must not report them safe (G4)."""
        ops, files, nbytes = self.unwritten.counts()
        if ops or files:
            recover = f"safefs recover --cache-dir {self.config.cache_dir} {self.config.src}"
            if not unmounted:
                recover = f"safefs recover {self.config.mnt}` (or, once unmounted, `{recover}"
            raise Unwritten(
                f"{files} files ({nbytes} bytes) and {ops} pending operations stay in the cache "
                f"{self.config.cache_dir} and are not in the project {self.config.src} "
                f"({self.orphan_marker.orphan_reason or self.orphan_marker.why_orphaned()})",
                hint=f"run `{recover}` on this host to write them back (a file changed meanwhile "
                "is kept beside as a conflict copy)",
            )

    async def acquire(self, *, wait: bool, timeout: float | None, progress: Any = None) -> protocol.AcquireReceipt:
        """Become the writer. Without `wait` a live holder is refused (once its heartbeat was
        seen to move: up to one renewal); a holder whose heartbeat stands still is taken over,
        and that is waited for (T_break, then the lock delay). Meanwhile the client is told
        each second what this waits for."""
        timings = self.config.lease
        if not wait:
            bound = timings.renew + timings.t_break + timings.lock_delay + 4 * timings.poll + 2 * timings.renew
            timeout = bound if timeout is None else min(timeout, bound)
        result: list[Any] = []
        done = trio.Event()

        async def take() -> None:
            try:
                try:
                    epoch = await self.keeper.acquire(wait=wait)  # without wait: a free lease, or
                except LeaseHeldElsewhere:  # this host's dead process; else is the holder alive?
                    if wait or not await self._holder_looks_dead():
                        raise
                    epoch = await self.keeper.acquire(wait=True)
                result.append(epoch)
                await self.following.take_role()
            except SafefsError as exc:  # raised below, not as an exception group
                result.append(exc)
            finally:
                done.set()

        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take)
                await self._wait_reporting(done, progress, self._lease_wait)
            if isinstance(result[0], SafefsError):
                raise result[0]
            return protocol.AcquireReceipt(role=self.keeper.role, epoch=result[0])
        raise LeaseHeldElsewhere(
            "gave up waiting for the lease", hint="see `safefs status` for who holds it"
        )

    async def _holder_looks_dead(self) -> bool:
        """Watch the holder's heartbeat until it moves (alive: False) or stands still for a
        renewal and two polls (True: it is being taken over, or the lease was freed)."""
        timings = self.config.lease
        silence = timings.renew + 2 * timings.poll
        started = trio.current_time()
        first_seen: float | None = None  # when the heartbeat last moved, as first seen here
        while True:
            holder = self.keeper.statistics().holder
            if holder is None or self.keeper.role == "writer":
                return True
            age = holder.heartbeat_age
            if isinstance(age, (int, float)):
                moved_at = trio.current_time() - age
                if first_seen is None:
                    first_seen = moved_at
                elif moved_at > first_seen + min(0.1, timings.poll):
                    return False  # it moved while we watched: alive
                if age > silence:
                    return True
            elif trio.current_time() - started > silence + timings.t_break:
                return False  # nothing to go by; refuse as before
            await trio.sleep(min(0.1, timings.poll))

    def _lease_wait(self) -> tuple[str, str]:
        lease, timings = self.keeper.statistics(), self.config.lease
        if lease.role == "writer":
            return "the lock delay after taking over the lease", f"{lease.lock_delay or 0:.0f} s left"
        holder = lease.holder
        if holder is not None:
            age = holder.heartbeat_age or 0.0
            return f"the lease held by {holder.host} (pid {holder.pid})", \
                f"its heartbeat, renewed every {timings.renew:g} s while it lives, stood still for " \
                f"{age:.0f} s; a dead holder is taken over after {timings.t_break:g} s and a lock delay " \
                f"of {timings.lock_delay:g} s"  # fmt: skip
        return "the lease", "looking for a free epoch"

    async def recover(self, *, timeout: float | None) -> protocol.RecoverReceipt:
        """Write back what this cache holds and the project does not (an orphan of a lost
        lease, or of a crash while another host wrote): take the lease for it if needed,
        publish under the usual rules (a file changed meanwhile elsewhere is kept side by side
        as a conflict copy, never overwritten), then give the lease back if it was taken."""
        files, nbytes = self.unwritten.total()
        if not files:
            return protocol.RecoverReceipt(files=0, bytes=0, conflicts=[], epoch=self.keeper.epoch)
        took = self.keeper.role != "writer"
        if took:
            await self.keeper.acquire(wait=False)  # LeaseHeldElsewhere names a live holder
            await self.following.take_role()
        conflicts_before = len(self.flusher.conflicts)
        receipt = await self.shutdown.write_back(timeout)
        self.reporting.record_conflicts()  # in the history before the release, where they happened
        if took:
            await self.keeper.release()
            await self.following.take_role()
        await self.orphan_marker.update_orphan_marker_now()  # so that `recover` returning means the marker is gone
        self.recorder.record_event("recover", self.keeper.epoch, f"{files} changes ({nbytes} bytes) written back")
        return protocol.RecoverReceipt(
            files=files, bytes=nbytes, epoch=self.keeper.epoch, generation=receipt.generation,
            conflicts=[protocol.from_wire(protocol.Conflict, c) for c in self.flusher.conflicts[conflicts_before:]],
            released=took,
        )  # fmt: skip

    async def prepare_unmount(
        self, *, timeout: float | None, lazy: bool = False, progress: Any = None
    ) -> protocol.UnmountReceipt:
        """Write back, unmount (here, in our own mount namespace), wait for the final write-back
        and say what it left. A refused (busy) unmount raises Busy before anything was
        released: the mount stays the writer and its open files keep working."""
        deadline = trio.current_time() + (float("inf") if timeout is None else timeout)
        with self.shutdown.awaited():  # from here: the session may end before fusermount3 returns
            if self.shutdown.state == "mounted":
                if self.keeper.role == "writer":
                    await self._write_back_reported(timeout, progress)
                await trio.to_thread.run_sync(functools.partial(unmount.fusermount, self.config.mnt, lazy=lazy))
                log.info("daemon: %s unmounted (safefs umount); writing back the rest", self.config.mnt)
            remaining = deadline - trio.current_time()
            return await self._wait_final(None if remaining == float("inf") else max(0.0, remaining), progress)


def flush_statistics(stats: FlusherStatistics) -> protocol.FlushStatistics:
    """The flusher's statistics as `status` sends them: the one place they meet the protocol."""
    return protocol.FlushStatistics(
        dirty_bytes=stats.dirty_bytes,
        dirty_files=stats.dirty_files,
        oldest_dirty_age=stats.oldest_dirty_age,
        pending_ops=stats.pending_ops,
        flushes=stats.flushes,
        flushing=stats.flushing,
        errors=[
            protocol.WriteBackError(op=e.op, path=e.path, error=e.error, retry_at=e.retry_at) for e in stats.errors
        ],
        conflicts=[protocol.from_wire(protocol.Conflict, c) for c in stats.conflicts],
    )
