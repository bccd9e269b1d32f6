"""The composition root: builds every service, mounts, serves, and shuts down in order.

Start-up, in the order a reader of DESIGN.md expects:
1. refuse unsafe set-ups (checks.py), create the cache dir (0700), lock and open the journal;
2. load the inode table, create the root, forget what a reboot may have torn;
3. start the flusher (which replays what a crash left behind), the control socket, the
   signal watcher and the periodic journal sync;
4. mount with pyfuse3 and tell the parent we are ready (one JSON line on `ready_fd`).

Shut-down (kernel unmount, `safefs umount`, SIGTERM/SIGINT): stop serving requests,
unmount, then write back everything (shielded, retried until the backing tree accepts it or
the final-flush time runs out, in which case the dirty data stays in the cache for the next
mount), close the journal, exit.

Orphans (safefs/orphans.py): while this mount holds changes the project lacks and is not the
writer (it lost its lease, or started as a follower with changes an earlier mount left), or
when it exits with changes unwritten, it publishes a marker in `<project>/.safefs/orphans/`,
so `safefs status` on every host names this host and its cache; the marker goes when the
journal holds nothing unwritten any more. Publishing is best effort: a background task
retries with backoff, every call runs in a worker thread with a timeout, and nothing else
(the mount, the control socket, the lease) ever waits for it.

History and systemd: lease events (from the keeper's on_event), conflicts and recoveries are
queued and appended to `<project>/.safefs/history/` by a background task, each append in a
worker thread with a timeout (safefs/history.py); under systemd the daemon sends READY=1 once
it serves, STATUS= while it runs, STOPPING=1 before the final write-back (safefs/sdnotify.py).

Invariants:
- This is the only module that opens the long-lived nursery or drives the kernel session
  (fuse_ops.Session: mount, serve, close).
- The process never forks after the journal is open; `safefs mount` starts it fresh.
"""

from __future__ import annotations

import errno
import faulthandler
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import trio

from safefs import __version__, checks, generation, logs, orphans, ranges, sdnotify
from safefs.backing import Backing, FaultPlan
from safefs.cache import ContentCache
from safefs.clock import SystemClock
from safefs.config import MountConfig, socket_path
from safefs.control.server import serve as serve_control
from safefs.errors import (DaemonFailed, ExitCode, LeaseHeldElsewhere, LeaseLost, Refused, SafefsError, SyncTimeout,
                           describe_exception)
from safefs.flusher import Flusher
from safefs.fs import Filesystem, Limiters
from safefs.fuse_ops import CachePolicy, KernelNotifier, SafeOperations, Session
from safefs.history import Event as HistoryEvent
from safefs.history import HistoryLog
from safefs.inodes import ROOT_INO, InodeTable
from safefs.journal import Journal
from safefs.lease.keeper import LeaseKeeper
from safefs.lease.store import DirLeaseStore, local_identity
from safefs.orphans import OrphanRecord, OrphanStore

log = logging.getLogger(__name__)

FINAL_FLUSH_TIMEOUT = 120.0
FINAL_FLUSH_STALL = 15.0  # see Daemon._write_back_unless_stalled
JOURNAL_SYNC_INTERVAL = 1.0
ORPHAN_CHECK_INTERVAL = 0.5  # how often the marker is compared with the journal (in memory)
ORPHAN_IO_TIMEOUT = 10.0  # one marker publish or removal on the project; abandoned after this
ORPHAN_RETRY_MAX = 30.0  # the longest wait between two failed marker updates
ORPHAN_READ_TIMEOUT = 3.0  # `status` waits this long for the list of markers (the CLI waits 10 s)
ORPHAN_EXIT_TIMEOUT = 5.0  # the last marker update at exit, and the one after `recover`
SYSTEMD_STATUS_INTERVAL = 2.0  # how often STATUS= is refreshed under systemd (when it changed)
PROGRESS_INTERVAL = 0.5  # how often a waiting `sync` or `umount` hears how far the write-back is
HISTORY_QUEUE = 100  # lease events waiting to be appended to the project's history
HISTORY_CHECK_INTERVAL = 1.0  # how often new conflicts are looked for, to record them
MARKER_UNKNOWN = ("unknown",)  # Daemon._marker before we looked: a marker of ours may exist


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class _Ready:
    """The one-line message that tells `safefs mount` how start-up went."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def send(self, message: dict[str, Any]) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, (json.dumps(message) + "\n").encode())
        except OSError:
            pass  # the parent went away; carry on serving
        finally:
            os.close(self._fd)
            self._fd = None

    def failed(self, exc: SafefsError) -> None:
        self.send(
            {"ok": False, "error": {"type": type(exc).__name__, "message": exc.message,
                                    "hint": exc.hint, "exit_code": int(exc.exit_code)}}
        )  # fmt: skip


def run(config: MountConfig, *, ready_fd: int | None = None, debug: bool = False) -> int:
    """Serve one mount until it is unmounted; return an ExitCode."""
    where = logs.setup("debug" if debug else config.log_level, config.log_file)
    if config.log_file is not None:  # on a terminal, a refusal must stay one error line and a hint
        log.info("daemon: safefs %s pid %d logging to %s", __version__, os.getpid(), where)
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    ready = _Ready(ready_fd)
    try:
        checks.check_setup(config)
        config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(config.cache_dir, 0o700)
        journal = Journal.open(config.cache_dir)
    except SafefsError as exc:
        if ready_fd is None:
            raise  # in the foreground the command line reports it, as for any command
        log.error("%s", exc.message)
        ready.failed(exc)
        return int(exc.exit_code)
    try:
        daemon = Daemon(config, journal, ready)
        return trio.run(daemon.serve)
    except SafefsError as exc:
        log.error("%s", exc.message)
        ready.failed(exc)
        return int(exc.exit_code)
    except BaseException as exc:
        log.exception("daemon: fatal error")
        ready.failed(DaemonFailed(f"the daemon failed: {describe_exception(exc)}", hint=f"its log has the details: {where}"))
        return int(ExitCode.ERROR)
    finally:
        journal.close()


class Daemon:
    def __init__(self, config: MountConfig, journal: Journal, ready: _Ready) -> None:
        self.config = config
        self.journal = journal
        self.ready = ready
        self.clock = SystemClock()
        self.host_name = config.host_id or socket.gethostname()
        self.terminated = False
        self.policy = CachePolicy()
        self.notifier = KernelNotifier()
        self.role = "unknown"
        self.seen_generation: dict[str, Any] | None = None
        self.orphans = OrphanStore(config.src)
        # What our orphan marker on the project says: None (there is none), MARKER_UNKNOWN, or
        # the (counts, reason, epoch) key of the version we published. Changed under _marker_lock.
        self._marker: tuple[Any, ...] | None = MARKER_UNKNOWN
        self._orphan_since: float | None = None  # wall time this cache's orphan was first seen
        self._orphan_reason: str | None = None
        self._held_epoch: int | None = None  # the last epoch this process held the lease in
        self._exit_detail: str | None = None  # why the final write-back left changes behind
        self.systemd = sdnotify.Notifier()  # a no-op unless started by systemd with Type=notify
        self.metrics_listener: Any = None  # a safefs.metrics.Listener with --metrics-port
        self.serving = False  # True while the mount serves: the metrics listener answers empty before

    async def serve(self) -> int:
        config = self.config
        if config.metrics_port is not None:
            self._serve_metrics(config.metrics_port)  # first: a port in use is refused before any mount
        limiters = Limiters.create()
        table = InodeTable(self.journal, limiters.journal)
        table.load(await limiters.journal.run(self.journal.load))
        try:
            backing = Backing(config.src)
        except OSError as exc:
            raise DaemonFailed(f"cannot open the project {config.src}: {exc.strerror}") from exc
        self.identity = identity = local_identity(config.host_id)
        self.history = HistoryLog(config.src, identity.host, identity.machine_id)
        self._history_send, history_receive = trio.open_memory_channel[HistoryEvent](HISTORY_QUEUE)
        self._conflicts_recorded = 0
        self.keeper = keeper = LeaseKeeper(
            DirLeaseStore(config.src), self.clock, config.lease, identity, trio.CapacityLimiter(2),
            want_write=not config.follower, on_event=self._record_event,
        )  # fmt: skip
        self.orphan_name = orphans.record_name(identity.host, identity.machine_id, str(config.cache_dir))
        # One marker change at a time, even after a thread stuck in NFS was abandoned (it keeps
        # its token until it returns); listings for `status` have their own, small, limiter.
        self._marker_limiter = trio.CapacityLimiter(1)
        self._listing_limiter = trio.CapacityLimiter(2)
        self._marker_lock = trio.Lock()
        cache = ContentCache(config.cache_dir, config.free_space_floor)
        fs = Filesystem(table, cache, backing, config, self.clock, limiters, keeper, self.notifier)
        faults = os.environ.get("SAFEFS_FAULTS")  # tests: a stuck or failing project
        if faults:
            backing.faults = FaultPlan.from_spec(json.loads(faults))
            log.warning("daemon: fault injection on: %s", faults)
        bug = os.environ.get("SAFEFS_INJECT_BUG")
        if bug:
            fs.inject_bug_name = os.fsencode(bug)
        self.fs, self.backing, self.cache = fs, backing, cache
        self.flusher = Flusher(fs, self.host_name)
        try:
            async with trio.open_nursery() as services:
                history_done = trio.Event()
                services.start_soon(self._write_history, history_receive, history_done)
                role = await services.start(keeper.run)
                if role != "writer" and config.wait_for_lease:
                    log.info("daemon: waiting for the lease (%s)", keeper.statistics()["holder"])
                    await keeper.acquire(wait=True)
                await fs.start(_boot_id())
                await self._take_role()
                if self.role == "writer":
                    await self.flusher.settle()
                code = await self._serve_mount(services)
                self._history_send.close()  # the writer appends what is queued, then ends
                with trio.move_on_after(ORPHAN_EXIT_TIMEOUT):
                    await history_done.wait()
                services.cancel_scope.cancel()
        finally:
            cache.close()
            backing.close()
            if self.metrics_listener is not None:
                self.metrics_listener.close()
        return code

    async def _serve_mount(self, services: trio.Nursery) -> int:
        config = self.config
        ops = self.ops = SafeOperations(self.fs, self.policy)
        session = self.session = Session(ops, str(config.mnt), allow_other=config.allow_other)
        clean_exit = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.flusher.run)
                await nursery.start(self.notifier.run)
                await nursery.start(serve_control, socket_path(config.mnt, os.environ, os.getuid()), self)
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(self._sync_journal_periodically)
                nursery.start_soon(self._follow)
                nursery.start_soon(self._keep_orphan_marker)
                nursery.start_soon(self._watch_conflicts)
                self.notifier.enabled = True
                log.info("daemon: serving %s at %s as %s (cache %s)", config.src, config.mnt, self.role, config.cache_dir)
                self.serving = True  # for the metrics listener
                self.ready.send({"ok": True, "pid": os.getpid(), "role": self.role,
                                 "holder": self.keeper.statistics()["holder"]})  # fmt: skip
                self.systemd.send(READY=1, STATUS=self._systemd_status())
                if self.systemd.enabled:
                    nursery.start_soon(self._report_to_systemd)
                await session.serve()
                self.notifier.enabled = False
                nursery.cancel_scope.cancel()
            clean_exit = True
        finally:
            # After a kernel unmount the session is over; after a signal or an error we
            # must take the mount down ourselves so nobody hangs on a dead mountpoint.
            self.serving = False
            session.close(unmount=self.terminated or not clean_exit)
            if self.systemd.enabled:
                files, nbytes = self._unwritten()
                self.systemd.send(STOPPING=1, STATUS=f"unmounted; writing back {files} changes, {nbytes / (1 << 20):.1f} MiB")
            with trio.CancelScope(shield=True):
                code = await self._final_flush_until_signalled()
        return code

    async def _final_flush_until_signalled(self) -> int:
        """The final write-back, cut short by SIGTERM/SIGINT (the dirty data stays in the cache
        for the next mount: stopping now loses nothing, and `kill` must work)."""
        code = int(ExitCode.BACKING_FAILED)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        log.warning("daemon: %s during the final write-back; stopping, the dirty "
                                    "data stays in %s", signal.Signals(signum).name, self.config.cache_dir)  # fmt: skip
                        nursery.cancel_scope.cancel()

                async def flush() -> None:
                    nonlocal code
                    code = await self._final_flush()
                    self._record_conflicts()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                nursery.start_soon(flush)
        if code != int(ExitCode.OK) and self._exit_detail is None:
            self._exit_detail = "the final write-back was stopped"
        await self._mark_orphan_at_exit()
        return code

    async def _final_flush(self) -> int:
        """Unmount is `sync --release`: write everything back, then let the next host write."""
        if self.keeper.role != "writer":
            if self.fs.table.ops or any(True for _ in self.fs.table.iter_dirty()):
                log.warning("daemon: this cache holds changes it could not write back (not the "
                            "writer); they stay in %s", self.config.cache_dir)  # fmt: skip
            return int(ExitCode.OK)
        try:
            receipt = await self._write_back_unless_stalled()
        except SafefsError as exc:
            self._exit_detail = f"the write-back failed: {exc.message}"
            log.error(
                "daemon: could not write everything back (%s); the dirty data stays in %s and is "
                "written back at the next mount",
                exc.message,
                self.config.cache_dir,
            )
            return int(ExitCode.BACKING_FAILED)
        try:
            await self.keeper.release()
        except SafefsError as exc:
            log.warning("daemon: %s", exc.message)
        log.info("daemon: wrote back %d files, %d bytes; exiting", receipt.files, receipt.bytes)
        return int(ExitCode.OK)

    async def _write_back_unless_stalled(self) -> Any:
        """The final write-back: go on while it makes progress (up to FINAL_FLUSH_TIMEOUT), but
        give up after FINAL_FLUSH_STALL seconds of failures without progress. The data stays in
        the cache either way and the next mount writes it back; lingering for minutes after an
        unmount while the project is down helps nobody."""
        result: list[Any] = []
        failed: list[SafefsError] = []

        async def write_back() -> None:
            try:
                result.append(await self._write_back(FINAL_FLUSH_TIMEOUT))
            except SafefsError as exc:  # raised below, not as an exception group
                failed.append(exc)
            watchdog.cancel_scope.cancel()

        async with trio.open_nursery() as watchdog:
            watchdog.start_soon(write_back)
            last_progress, last_seen = trio.current_time(), None
            while True:
                await trio.sleep(0.5)
                seen = (self.backing.bytes_written, len(self.fs.table.ops), self.flusher.flushes)
                if seen != last_seen or self.flusher.last_error is None:
                    last_progress, last_seen = trio.current_time(), seen
                elif trio.current_time() - last_progress > FINAL_FLUSH_STALL:
                    watchdog.cancel_scope.cancel()
                    failed.append(SyncTimeout(
                        f"the project failed for {FINAL_FLUSH_STALL:.0f} s: {self.flusher.last_error.error}",
                    ))  # fmt: skip
                    break
        if failed:
            raise failed[0]
        return result[0]

    async def _write_back(self, timeout: float | None) -> Any:
        """flusher.sync, after waiting out a lock delay (a fresh takeover) within `timeout`."""
        deadline = trio.current_time() + (timeout if timeout is not None else float("inf"))
        with trio.move_on_at(deadline):
            await self.keeper.acquire(wait=False)  # returns at once unless in the lock delay
        remaining = deadline - trio.current_time()
        return await self.flusher.sync(timeout=None if remaining == float("inf") else max(0.0, remaining))

    # -- roles ---------------------------------------------------------------------------
    async def _take_role(self) -> None:
        """Set the mount up for the role the lease gives it (at start and on every change)."""
        role = self.keeper.role
        if role == self.role:
            return
        first = self.role == "unknown"
        self.role = role
        fs = self.fs
        fs.follower = role != "writer"
        if role == "writer":
            self._held_epoch = self.keeper.epoch
            self.policy.set_writer()
            record = await self._read_generation()
            self.flusher.adopt_generation(record)
            self.seen_generation = record
            log.info("lease: this mount is the writer (epoch %d)", self.keeper.epoch)
        else:
            self.policy.set_follower(self.config.follower_poll)
            holder = self.keeper.statistics()["holder"]
            writer = f"{holder.get('host')} (pid {holder.get('pid')})" if isinstance(holder, dict) else "nobody"
            log.info("lease: this mount is a follower; the writer is %s", writer)
        if not first:
            # Another host may have written: nothing cached about the tree is trusted blindly.
            fs.mark_stale()
            self._invalidate_kernel()

    def _invalidate_kernel(self) -> None:
        """Make the kernel ask again about every name and inode it knows (queued)."""
        table = self.fs.table
        for parent, names in list(table.children.items()):
            for name, ino in list(names.items()):
                child = table.inodes.get(ino)
                if child is not None and child.lookups > 0:
                    self.notifier.later_entry(parent, name)
        for inode in list(table.inodes.values()):
            if inode.lookups > 0:
                self.notifier.later_inode(inode.ino)

    async def _read_generation(self) -> dict[str, Any] | None:
        try:
            return await self.fs.read_backing(generation.read, self.backing)
        except (OSError, SafefsError) as exc:
            log.info("follow: cannot read the generation: %s", exc)
            return None

    async def _follow(self) -> None:
        """Track role changes (takeover, loss) and, as a follower, the writer's generations."""
        poll = self.config.follower_poll
        next_poll = 0.0
        while True:
            await trio.sleep(min(0.5, poll))
            await self._take_role()
            if self.role == "writer" or trio.current_time() < next_poll:
                continue
            next_poll = trio.current_time() + poll
            record = await self._read_generation()
            if record is not None and self._generation_key(record) != self._generation_key(self.seen_generation):
                log.info("follow: generation %s of epoch %s", record.get("generation"), record.get("epoch"))
                self.seen_generation = record
                self.fs.mark_stale()
                self._invalidate_kernel()

    @staticmethod
    def _generation_key(record: dict[str, Any] | None) -> tuple[Any, Any]:
        return (None, None) if record is None else (record.get("epoch"), record.get("generation"))

    # -- orphan markers ------------------------------------------------------------------
    async def _keep_orphan_marker(self) -> None:
        """Keep our marker in step with the journal and the lease, retrying with backoff while
        the project fails (nothing waits for this task; see _sync_orphan_marker)."""
        backoff = 0.0
        while True:
            try:
                await self._sync_orphan_marker(timeout=ORPHAN_IO_TIMEOUT)
            except (OSError, ValueError) as exc:
                if not backoff:
                    log.warning("orphans: cannot update our marker in %s: %s; retrying", self.orphans.path, exc)
                backoff = min(ORPHAN_RETRY_MAX, max(1.0, backoff * 2))
                await trio.sleep(backoff)
                continue
            if backoff:
                log.info("orphans: our marker in %s is up to date again", self.orphans.path)
                backoff = 0.0
            await trio.sleep(ORPHAN_CHECK_INTERVAL)

    async def _sync_orphan_marker(self, *, timeout: float, reason: str | None = None) -> None:
        """Make our marker agree with this cache: published with the current counts while the
        mount holds unwritten changes and is not the writer (or `reason` is given: at exit),
        removed once it holds none. A writer leaves an existing marker alone until its own
        write-back has emptied the journal. Raises OSError (TimeoutError too) or ValueError."""
        async with self._marker_lock:
            ops, files, nbytes = self._unwritten_counts()
            if not ops and not files:
                if self._marker is not None:
                    removed = await self._marker_call(self.orphans.remove, self.orphan_name, timeout=timeout)
                    if removed:
                        log.info("orphans: nothing unwritten any more; removed our marker %s", self.orphan_name)
                    self._marker = None
                self._orphan_since = self._orphan_reason = None
                return
            if reason is None and self.keeper.role == "writer":
                return
            if reason is not None:
                self._orphan_reason = reason
            elif self._orphan_reason is None:
                self._orphan_reason = self._why_orphaned()
            key = (ops, files, nbytes, self._orphan_reason, self._held_epoch)
            if key == self._marker:
                return
            if self._orphan_since is None:
                self._orphan_since = self.clock.wall()
                if self._marker is MARKER_UNKNOWN:  # a marker an earlier mount of this cache left
                    try:
                        earlier = await self._marker_call(self.orphans.read, self.orphan_name, timeout=timeout)
                    except ValueError:
                        earlier = None
                    if earlier is not None:
                        self._orphan_since = min(earlier.since, self._orphan_since)
            record = OrphanRecord(
                host=self.identity.host, machine_id=self.identity.machine_id,
                cache_dir=str(self.config.cache_dir), pid=os.getpid(), user=self.identity.user,
                epoch=self._held_epoch, pending_ops=ops, dirty_files=files, dirty_bytes=nbytes,
                since=self._orphan_since, updated=self.clock.wall(), reason=self._orphan_reason,
            )  # fmt: skip
            await self._marker_call(self.orphans.publish, record, timeout=timeout)
            if self._marker is None or self._marker is MARKER_UNKNOWN:
                log.warning("orphans: %d changes (%d bytes) in %s cannot be written back from this "
                            "mount (%s); published %s so every host sees them",
                            ops + files, nbytes, self.config.cache_dir, self._orphan_reason,
                            self.orphans.path / f"{self.orphan_name}{orphans.SUFFIX}")  # fmt: skip
            self._marker = key

    def _why_orphaned(self) -> str:
        lease = self.keeper.statistics()
        if lease["state"] == "lost":
            return f"lease lost: {lease['lost_reason']}"
        if self._held_epoch is not None:
            return f"lease of epoch {self._held_epoch} given up with changes unwritten"
        return "left in this cache by an earlier mount that did not write it back; mounted as a follower"

    async def _marker_call(self, fn: Any, *args: Any, timeout: float) -> Any:
        """`fn(*args)` in a worker thread; TimeoutError after `timeout` (the thread is abandoned:
        a marker is a status record, and a late write of it is corrected by the next one)."""
        with trio.move_on_after(timeout):
            return await trio.to_thread.run_sync(fn, *args, limiter=self._marker_limiter, abandon_on_cancel=True)
        raise TimeoutError(errno.ETIMEDOUT, f"no answer within {timeout:g} s", str(self.orphans.path))

    async def _update_orphan_marker_now(self, reason: str | None = None) -> None:
        """One best-effort marker update that waits at most ORPHAN_EXIT_TIMEOUT."""
        with trio.move_on_after(ORPHAN_EXIT_TIMEOUT) as scope:
            try:
                await self._sync_orphan_marker(timeout=ORPHAN_EXIT_TIMEOUT, reason=reason)
            except (OSError, ValueError) as exc:
                log.warning("orphans: cannot update our marker in %s: %s", self.orphans.path, exc)
        if scope.cancelled_caught:
            log.warning("orphans: %s did not answer; our marker may be out of date", self.orphans.path)

    async def _mark_orphan_at_exit(self) -> None:
        """Leave a marker if this mount exits with changes unwritten; remove ours if it has none."""
        ops, files, _ = self._unwritten_counts()
        reason = None
        if ops or files:
            detail = self._exit_detail or self._orphan_reason
            reason = "unmounted with changes unwritten" + (f" ({detail})" if detail else "")
        await self._update_orphan_marker_now(reason)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("daemon: %s received; writing back and unmounting", signal.Signals(signum).name)
                self.terminated = True
                self.session.terminate()

    # -- the project's history (safefs/history.py) ----------------------------------------
    def _record_event(self, kind: str, epoch: int | None, detail: str) -> None:
        """Queue one history record (the keeper calls this on the trio thread; never blocks)."""
        event = HistoryEvent(kind, self.identity.host, self.identity.user, os.getpid(), epoch,
                             str(self.config.mnt), detail, self.clock.wall())  # fmt: skip
        try:
            self._history_send.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError):
            log.warning("history: dropped the %s record of epoch %s (the project is not keeping up)", kind, epoch)

    def _record_conflicts(self) -> None:
        for conflict in self.flusher.conflicts[self._conflicts_recorded :]:
            what = conflict.get("path") or conflict.get("op") or "?"
            kept = f" kept as {conflict['kept_as']}" if conflict.get("kept_as") else ""
            self._record_event("conflict", self.keeper.epoch, f"{what}{kept}: {conflict.get('error', '')}".rstrip(": "))
        self._conflicts_recorded = len(self.flusher.conflicts)

    async def _watch_conflicts(self) -> None:
        while True:
            await trio.sleep(HISTORY_CHECK_INTERVAL)
            self._record_conflicts()

    async def _write_history(self, events: trio.MemoryReceiveChannel[HistoryEvent], done: trio.Event) -> None:
        """Append queued events in a worker thread each, ORPHAN_IO_TIMEOUT at most (a hung
        project delays the history, never the mount); a failure is logged, the record dropped."""
        limiter = trio.CapacityLimiter(1)
        try:
            async for event in events:
                with trio.move_on_after(ORPHAN_IO_TIMEOUT) as scope:
                    try:
                        await trio.to_thread.run_sync(self.history.append, event, limiter=limiter, abandon_on_cancel=True)
                    except OSError as exc:
                        log.warning("history: cannot append the %s record to %s: %s", event.event, self.history.path, exc)
                if scope.cancelled_caught:
                    log.warning("history: %s did not answer; the %s record may be missing", self.history.path, event.event)
        finally:
            done.set()

    def _systemd_status(self) -> str:
        files, nbytes = self._unwritten()
        dirty = f"unwritten: {files} changes, {nbytes / (1 << 20):.1f} MiB" if files else "nothing unwritten"
        return f"{self.keeper.role} of {self.config.src} at {self.config.mnt}, epoch {self.keeper.epoch}; {dirty}"

    def _serve_metrics(self, port: int) -> None:
        """Serve `status` as Prometheus metrics on 127.0.0.1:`port`, from prometheus-client's thread."""
        from safefs import metrics  # only here: prometheus-client is needed for --metrics-port alone

        token = trio.lowlevel.current_trio_token()

        def statuses() -> list[dict[str, Any]]:
            if not self.serving:
                return []
            return [trio.from_thread.run(self.status, trio_token=token)]

        try:
            self.metrics_listener = metrics.serve(port, statuses)
        except OSError as exc:
            raise Refused(
                f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror or exc}",
                hint="choose another --metrics-port",
            ) from None
        log.info("metrics: serving http://127.0.0.1:%d/metrics", port)

    async def _report_to_systemd(self) -> None:
        while True:
            await trio.sleep(SYSTEMD_STATUS_INTERVAL)
            self.systemd.status(self._systemd_status())

    async def _sync_journal_periodically(self) -> None:
        """Bound what a host crash can take: committed changes reach the disk within a second."""
        synced = -1
        while True:
            await trio.sleep(JOURNAL_SYNC_INTERVAL)
            if self.fs.table.commits != synced:
                synced = self.fs.table.commits
                await self.fs.table.sync()

    # -- the control socket's handler ----------------------------------------------------
    async def status(self) -> dict[str, Any]:
        config = self.config
        stats = self.flusher.statistics()
        lease = self.keeper.statistics()
        lease["generation"] = self.flusher.generation if self.role == "writer" else \
            (self.seen_generation or {}).get("generation")  # fmt: skip
        return {
            "src": str(config.src),
            "mnt": str(config.mnt),
            "cache_dir": str(config.cache_dir),
            "pid": os.getpid(),
            "host": self.host_name,
            "role": self.keeper.role,
            **stats,
            "bytes_fetched": self.backing.bytes_read,
            "bytes_written": self.backing.bytes_written,
            "cache_bytes": self.fs.cached_bytes(),
            "cache_limit": config.cache_size,
            "cache_hits": self.fs.stats.cache_hits,
            "fetches": self.fs.stats.fetches,
            "evictions": self.fs.stats.evictions,
            "inodes": len(self.fs.table.inodes),
            "internal_errors": self.ops.bugs,
            "writeback_delay": config.writeback_delay,
            "lease": lease,
            "warnings": logs.recent(),
            **await self._orphan_listing(),
        }

    async def _orphan_listing(self) -> dict[str, Any]:
        """Every host's orphan markers (ours too) for `status`: `orphans` (a list of records,
        or None if the project did not answer in time), `orphans_error`, `orphans_skipped`."""
        try:
            with trio.fail_after(ORPHAN_READ_TIMEOUT):
                listing = await trio.to_thread.run_sync(
                    self.orphans.list, limiter=self._listing_limiter, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            error = f"{self.orphans.path} did not answer within {ORPHAN_READ_TIMEOUT:g} s"
            return {"orphans": None, "orphans_error": error, "orphans_skipped": []}
        except OSError as exc:
            error = f"cannot read {self.orphans.path}: {exc.strerror or exc}"
            return {"orphans": None, "orphans_error": error, "orphans_skipped": []}
        records = []
        for name, record in listing.records:
            item = record.to_dict()
            item.pop("v", None)
            records.append({"name": name, **item})
        skipped = [{"name": s.name, "error": s.error} for s in listing.skipped]
        return {"orphans": records, "orphans_error": None, "orphans_skipped": skipped}

    async def sync(self, *, release: bool, timeout: float | None, progress: Any) -> dict[str, Any]:
        if self.keeper.role != "writer":
            self._refuse_if_orphaned()
            # A follower has nothing to write back; sync means "show me the latest".
            self.fs.mark_stale()
            self._invalidate_kernel()
            record = await self._read_generation()
            self.seen_generation = record or self.seen_generation
            return {"role": "follower", "epoch": self.keeper.epoch, "generation": (record or {}).get("generation"),
                    "files": 0, "bytes": 0, "ops": 0, "released": False}  # fmt: skip
        receipt = await self._write_back_reporting(timeout, progress)
        epoch = self.keeper.epoch
        if release:
            await self.keeper.release()
            await self._take_role()
        return {
            "role": self.keeper.role,
            "epoch": epoch,
            "generation": receipt.generation,
            "files": receipt.files,
            "bytes": receipt.bytes,
            "ops": receipt.ops,
            "released": release,
        }

    async def _write_back_reporting(self, timeout: float | None, progress: Any) -> Any:
        """`_write_back`, telling `progress` (if any) how far it is every PROGRESS_INTERVAL."""
        if progress is None:
            return await self._write_back(timeout)
        result: list[Any] = []
        failed: list[SafefsError] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_write_back, progress)
            try:
                result.append(await self._write_back(timeout))
            except SafefsError as exc:  # raised below, not as an exception group
                failed.append(exc)
            finally:
                nursery.cancel_scope.cancel()
        if failed:
            raise failed[0]
        return result[0]

    async def _report_write_back(self, progress: Any) -> None:
        """Until cancelled: files and bytes left and done, and what the write-back waits for."""
        ops, files, nbytes = self._unwritten_counts()
        files_total, bytes_total = ops + files, nbytes
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            ops, files, nbytes = self._unwritten_counts()
            files_total, bytes_total = max(files_total, ops + files), max(bytes_total, nbytes)
            lock_delay = self.keeper.statistics().get("lock_delay")
            if isinstance(lock_delay, (int, float)) and lock_delay > 0:
                waiting = f"the lock delay after a takeover ({lock_delay:.0f} s left)"
            elif self.flusher.last_error is not None:
                waiting = f"the project, which failed: {self.flusher.last_error.error}"
            else:
                waiting = "the write-back"
            await progress({
                "waiting_for": waiting,
                "files_done": files_total - ops - files, "files_total": files_total,
                "bytes_done": bytes_total - nbytes, "bytes_total": bytes_total,
            })  # fmt: skip

    def _unwritten(self) -> tuple[int, int]:
        """(files, bytes) this cache holds that the project does not have."""
        ops, files, nbytes = self._unwritten_counts()
        return files + ops, nbytes

    def _unwritten_counts(self) -> tuple[int, int, int]:
        """(pending ops, dirty files, dirty bytes) this cache holds that the project does not have."""
        # The same count as the flusher's status: the root has no name, its attributes count.
        dirty = [i for i in self.fs.table.iter_dirty() if i.links or i.ino == ROOT_INO]
        return len(self.fs.table.ops), len(dirty), sum(ranges.total(i.dirty) for i in dirty)

    def _refuse_if_orphaned(self) -> None:
        """A mount that lost its lease with changes unwritten must not report them safe (G4)."""
        files, nbytes = self._unwritten()
        if files:
            raise LeaseLost(
                f"this mount lost its write lease; {files} changes ({nbytes} bytes) are kept in its "
                f"cache {self.config.cache_dir} but are not in the project",
                hint="run `safefs recover` on this host to write them back or keep them as conflict copies",
            )

    async def acquire(self, *, wait: bool, timeout: float | None) -> dict[str, Any]:
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            epoch = await self.keeper.acquire(wait=wait)
            await self._take_role()
            return {"role": self.keeper.role, "epoch": epoch}
        raise LeaseHeldElsewhere(
            "gave up waiting for the lease", hint="see `safefs status` for who holds it"
        )

    async def recover(self, *, timeout: float | None) -> dict[str, Any]:
        """Write back what this cache holds and the project does not (an orphan of a lost
        lease, or of a crash while another host wrote): take the lease for it if needed,
        publish under the usual rules (a file changed meanwhile elsewhere is kept side by side
        as a conflict copy, never overwritten), then give the lease back if it was taken."""
        files, nbytes = self._unwritten()
        if not files:
            return {"files": 0, "bytes": 0, "conflicts": [], "epoch": self.keeper.epoch}
        took = self.keeper.role != "writer"
        if took:
            await self.keeper.acquire(wait=False)  # LeaseHeldElsewhere names a live holder
            await self._take_role()
        conflicts_before = len(self.flusher.conflicts)
        receipt = await self._write_back(timeout)
        self._record_conflicts()  # in the history before the release, where they happened
        if took:
            await self.keeper.release()
            await self._take_role()
        await self._update_orphan_marker_now()  # so that `recover` returning means the marker is gone
        self._record_event("recover", self.keeper.epoch, f"{files} changes ({nbytes} bytes) written back")
        return {
            "files": files, "bytes": nbytes, "epoch": self.keeper.epoch, "generation": receipt.generation,
            "conflicts": self.flusher.conflicts[conflicts_before:], "released": took,
        }  # fmt: skip

    async def prepare_unmount(self, *, timeout: float | None, progress: Any = None) -> dict[str, Any]:
        if self.keeper.role == "writer":
            result = await self.sync(release=True, timeout=timeout, progress=progress)
        else:
            result = {"role": "follower", "released": False}
        result["pid"] = os.getpid()
        return result
