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
mount), close the journal, exit. `state` says where this is: "mounted", "unmounted" (the
final write-back runs), "exiting". The control socket answers until the end, so `status`
lists an unmounted mount that still writes back, and `umount`/`sync` on it wait for the
outcome. `safefs umount` makes the daemon run the unmount itself before it releases anything
(prepare_unmount): a refused (busy) unmount leaves the mount the writer it was. The session
also ends when the mount vanishes from this namespace's mount table while the kernel keeps
the connection open (a copy in another mount namespace; see safefs/unmount.py).

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

import dataclasses
import errno
import faulthandler
import functools
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import trio

from safefs import __version__, checks, generation, logs, orphans, projectconf, ranges, sdnotify, unmount
from safefs.backing import Backing
from safefs.cache import ContentCache
from safefs.clock import SystemClock
from safefs.config import MountConfig, socket_path
from safefs.control.server import serve as serve_control
from safefs.errors import (
    DaemonFailed,
    ExitCode,
    LeaseHeldElsewhere,
    Refused,
    SafefsError,
    SyncTimeout,
    Unwritten,
    describe_exception,
)
from safefs.flusher import Flusher
from safefs.fs import Filesystem, Limiters
from safefs.fuse_ops import (
    WRITEBACK_CACHE,
    CachePolicy,
    KernelNotifier,
    SafeOperations,
    Session,
    flush_kernel_pages,
    mount_device,
)
from safefs.history import Event as HistoryEvent
from safefs.history import HistoryLog
from safefs.inodes import ROOT_INO, InodeTable
from safefs.journal import Journal
from safefs.lease import backends
from safefs.lease.keeper import LeaseKeeper
from safefs.lease.store import local_identity
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
ETCD_CALL_TIMEOUT = 5.0  # one etcd request (publish, read) from the daemon; abandoned after this
KERNEL_FLUSH_TIMEOUT = 300.0  # syncfs of our own mount before a write-back without a timeout
ETCD_WATCH_WAIT = 10.0  # a follower's long-poll watch of the generation key lasts this long
ETCD_FALLBACK_POLL = 30.0  # while etcd tells followers of generations, they read the NFS file this often
MOUNT_WATCH_INTERVAL = 0.5  # how often the mount table is read for our mount (Daemon._watch_mount)
SYNC_GRACE = 0.5  # a timed-out write-back gets this long to say so itself
REPLY_GRACE = 10.0  # at exit, calls waiting for the final write-back get this long to answer


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
        ready.failed(DaemonFailed(f"the daemon failed: {describe_exception(exc)}",
                                  hint=f"its log has the details: {where}"))
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
        self.policy = CachePolicy(follower_poll=config.follower_poll)
        self.notifier = KernelNotifier()
        self._applied_role = "unknown"  # the role _take_role last set the mount up for
        self._role_changed = trio.Event()  # set by the keeper's role listener; _follow waits on it
        self._role_lock = trio.Lock()  # one _take_role at a time: the second waits for the first
        self.seen_generation: dict[str, Any] | None = None
        self.generation_seen_at: float | None = None  # wall time this follower learnt of seen_generation
        self.generation_reads = 0  # reads of .safefs/generation on the project (status: project_polls)
        self._etcd_ok_at: float | None = None  # trio time of the last answer of a follower's etcd watch
        self._etcd_pending: dict[str, Any] | None = None  # the newest generation not yet in etcd
        self._etcd_wake = trio.Event()
        self._etcd_limiter = trio.CapacityLimiter(4)
        self.orphans = OrphanStore(config.src)
        # What our orphan marker on the project says: None (there is none), MARKER_UNKNOWN, or
        # the (counts, reason, epoch) key of the version we published. Changed under _marker_lock.
        self._marker: tuple[Any, ...] | None = MARKER_UNKNOWN
        self._orphan_since: float | None = None  # wall time this cache's orphan was first seen
        self._orphan_reason: str | None = None
        self._held_epoch: int | None = None  # the last epoch this process held the lease in
        self._exit_detail: str | None = None  # why the final write-back left changes behind
        self.systemd = sdnotify.Notifier()  # a no-op unless started by systemd with Type=notify
        self.state = "mounted"  # -> "unmounted" (final write-back) -> "exiting"
        self._final_done = trio.Event()  # the final write-back is over (see _wait_final)
        self._final_waiters = 0  # control calls waiting for it, still to answer
        self._mount_gone = False  # _watch_mount ended the session: nothing left to unmount
        self._final_receipt: Any = None  # what the final write-back wrote, for `sync` after it
        self.metrics_listener: Any = None  # a safefs.metrics.Listener with --metrics-port
        self.serving = False  # True while the mount serves: the metrics listener answers empty before

    @property
    def role(self) -> str:
        """The lease keeper's role: the one place it is kept (see safefs/lease/keeper.py)."""
        return self.keeper.role

    async def serve(self) -> int:
        config = self.config
        if config.metrics_port is not None:
            self._serve_metrics(config.metrics_port)  # first: a port in use is refused before any mount
        limiters = Limiters.create()
        table = InodeTable(self.journal, limiters.flush)
        table.load(await limiters.journal.run(self.journal.load))
        # A cache replayed onto another project would write its changes there: refuse before
        # anything (the lease included) is touched. Caches from before this check carry no name.
        project = table.meta.get("project")
        if project is not None and project != str(config.src):
            raise Refused(f"the cache dir {config.cache_dir} belongs to the project {project}, not {config.src}",
                          hint="give that project, or another --cache-dir")  # fmt: skip
        table.set_meta("project", str(config.src))  # committed by fs.start
        try:
            backing = Backing(config.src)
        except OSError as exc:
            raise DaemonFailed(f"cannot open the project {config.src}: {exc.strerror}") from exc
        self.identity = identity = local_identity(config.host_id)
        self.history = HistoryLog(config.src, identity.host, identity.machine_id)
        self._history_send, history_receive = trio.open_memory_channel[HistoryEvent](HISTORY_QUEUE)
        self._conflicts_recorded = 0
        try:
            conf = await trio.to_thread.run_sync(projectconf.read, config.src)
        except OSError as exc:
            raise DaemonFailed(f"cannot read the project's configuration: {exc}") from exc
        self.lease_store = store = backends.open_store(config.src, conf, config.lease.t_break)
        timings = config.lease
        if store.etcd is not None:  # keepalive at a quarter of the etcd lease's TTL at most
            timings = dataclasses.replace(timings, renew=min(timings.renew, timings.t_break / 4))
        self.keeper = keeper = LeaseKeeper(
            store, self.clock, timings, identity, trio.CapacityLimiter(2),
            want_write=not config.follower, on_event=self._record_event,
            follow_if_unreachable=store.etcd is not None,
        )  # fmt: skip
        self.orphan_name = orphans.record_name(identity.host, identity.machine_id, str(config.cache_dir))
        # One marker change at a time, even after a thread stuck in NFS was abandoned (it keeps
        # its token until it returns); listings for `status` have their own, small, limiter.
        self._marker_limiter = trio.CapacityLimiter(1)
        self._listing_limiter = trio.CapacityLimiter(2)
        self._marker_lock = trio.Lock()
        cache = ContentCache(config.cache_dir, config.free_space_floor)
        fs = Filesystem(table, cache, backing, config, self.clock, limiters, keeper, self.notifier)
        keeper.on_role(fs.on_role)  # the keeper holds the role; these follow it as it changes
        keeper.on_role(self.policy.on_role)
        keeper.on_role(lambda role: self._role_changed.set())
        faults = os.environ.get("SAFEFS_FAULTS")  # tests: a stuck or failing project
        if faults:
            from safefs.testing import FaultPlan  # tests only; no other module imports it

            backing.faults = FaultPlan.from_spec(json.loads(faults))
            log.warning("daemon: fault injection on: %s", faults)
        bug = os.environ.get("SAFEFS_INJECT_BUG")
        if bug:
            fs.inject_bug_name = os.fsencode(bug)
        self.fs, self.backing, self.cache = fs, backing, cache
        self.flusher = Flusher(fs, self.host_name)
        if store.etcd is not None:
            self.flusher.announce = self._announce_generation
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
                self._services = services
                code = await self._serve_mount(services)
                with trio.move_on_after(REPLY_GRACE):
                    while self._final_waiters:  # let `umount`/`sync` callers have the outcome
                        await trio.sleep(0.05)
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
        writeback_cache = WRITEBACK_CACHE and self.role == "writer"  # see fuse_ops.CachePolicy
        ops = self.ops = SafeOperations(self.fs, self.policy, writeback_cache=writeback_cache)
        self.fs.kernel_owns_sizes = writeback_cache
        session = self.session = Session(ops, str(config.mnt), allow_other=config.allow_other)
        clean_exit = False
        try:
            # In the services nursery: the socket answers during the final write-back too.
            await services.start(serve_control, socket_path(config.mnt, os.environ, os.getuid()), self)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.flusher.run)
                await nursery.start(self.notifier.run)
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(self._watch_mount)
                nursery.start_soon(self._sync_journal_periodically)
                nursery.start_soon(self._follow)
                nursery.start_soon(self._keep_orphan_marker)
                nursery.start_soon(self._watch_conflicts)
                if self.lease_store.etcd is not None:
                    nursery.start_soon(self._publish_generations)
                    nursery.start_soon(self._watch_etcd)
                self.notifier.enabled = True
                log.info("daemon: serving %s at %s as %s (cache %s)",
                         config.src, config.mnt, self.role, config.cache_dir)
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
            session.close(unmount=(self.terminated or not clean_exit) and not self._mount_gone)
            self.state = "unmounted"
            if self.systemd.enabled:
                files, nbytes = self._unwritten()
                self.systemd.send(STOPPING=1,
                                  STATUS=f"unmounted; writing back {files} changes, {nbytes / (1 << 20):.1f} MiB")
            with trio.CancelScope(shield=True):
                try:
                    code = await self._final_flush_until_signalled()
                finally:
                    self.state = "exiting"
                    self._final_done.set()
        return code

    async def _watch_mount(self) -> None:
        """End the session once our mount is gone from this namespace's mount table, even if
        the kernel keeps the connection open for a copy of it in another mount namespace
        (which would keep us serving, silent, until that namespace dies). A lazily detached
        mount is served until its last open file is closed."""
        device = mount_device(os.fspath(self.config.mnt))
        if device is None:
            log.warning("fuse: %s is not in the mount table; not watching it", self.config.mnt)
            return
        while True:
            await trio.sleep(MOUNT_WATCH_INTERVAL)
            if self.fs.open_files() or unmount.mount_present(device):
                continue
            log.info("fuse: %s is no longer mounted here; ending the session (a copy of it in "
                     "another mount namespace may still hold the kernel connection)", self.config.mnt)  # fmt: skip
            self._mount_gone = True
            self.session.terminate()
            return

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
        self._final_receipt = receipt
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

    async def _write_back(self, timeout: float | None, progress: Any = None) -> Any:
        """flusher.sync, after waiting out a lock delay (a fresh takeover) within `timeout`."""
        deadline = trio.current_time() + (timeout if timeout is not None else float("inf"))
        with trio.move_on_at(deadline):
            until = self.keeper.publishing_from()
            if until is not None:
                what = (f"waiting for the lock delay after the takeover: changes reach the project "
                        f"from {time.strftime('%H:%M:%S', time.localtime(until))}")  # fmt: skip
                log.info("daemon: %s", what)
                if progress is not None:
                    await progress({"phase": what, "waiting_for": "lock delay", "until": until})
            await self.keeper.wait_publishable()
        remaining = deadline - trio.current_time()
        return await self.flusher.sync(timeout=None if remaining == float("inf") else max(0.0, remaining))

    # -- roles ---------------------------------------------------------------------------
    async def _take_role(self) -> None:
        """Set the mount up for the role the lease keeper holds now (at start, and after each
        change: _follow wakes on the keeper's role listener; fs and the cache policy follow
        the role by themselves). Returns once done, also when another task is doing it."""
        async with self._role_lock:
            role = self.keeper.role
            if role == self._applied_role:
                return
            first = self._applied_role == "unknown"
            self._applied_role = role
            fs = self.fs
            if role == "writer":
                self._held_epoch = self.keeper.epoch
                record = await self._read_generation()
                self.flusher.adopt_generation(record)
                self.seen_generation = record
                log.info("lease: this mount is the writer (epoch %d)", self.keeper.epoch)
            else:
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
        self.generation_reads += 1
        try:
            return await self.fs.read_backing(generation.read, self.backing)
        except (OSError, SafefsError) as exc:
            log.info("follow: cannot read the generation: %s", exc)
            return None

    async def _follow(self) -> None:
        """Take up each role change the keeper tells of (takeover, loss) and, as a follower,
        look for the writer's generations every `follower_poll`."""
        poll = self.config.follower_poll
        next_poll = trio.current_time() + min(0.5, poll)
        while True:
            with trio.move_on_at(next_poll if self.role != "writer" else float("inf")):
                await self._role_changed.wait()
            self._role_changed = trio.Event()
            await self._take_role()
            if self.role == "writer" or trio.current_time() < next_poll:
                continue
            # While etcd tells us of generations, the NFS file is only the fallback.
            etcd_ok = self._etcd_ok_at is not None and \
                trio.current_time() - self._etcd_ok_at < ETCD_WATCH_WAIT + ETCD_CALL_TIMEOUT + 2  # fmt: skip
            next_poll = trio.current_time() + (max(poll, ETCD_FALLBACK_POLL) if etcd_ok else poll)
            record = await self._read_generation()
            if record is not None:
                self._see_generation(record, "project")

    def _see_generation(self, record: dict[str, Any], source: str) -> None:
        """A follower learnt of `record` (from the project's file or from etcd): refresh what it
        names when it directly follows the one we saw last, else everything."""
        prev = self.seen_generation
        if prev is not None and prev.get("epoch") == record.get("epoch") and \
                self._generation_number(record) <= self._generation_number(prev):  # fmt: skip
            return  # seen already (the other source told us first), or older
        log.info("follow: generation %s of epoch %s (from %s)", record.get("generation"), record.get("epoch"), source)
        self.seen_generation, self.generation_seen_at = record, self.clock.wall()
        paths = record.get("changed")
        follows = prev is not None and prev.get("epoch") == record.get("epoch") and \
            record.get("generation") == (prev.get("generation") or 0) + 1  # fmt: skip
        # An empty list says nothing about what changed (a sync after attribute-only changes).
        if follows and not record.get("all") and isinstance(paths, list) and paths:
            self._invalidate_dirs(paths)
        else:
            self.fs.mark_stale()
            self._invalidate_kernel()

    @staticmethod
    def _generation_number(record: dict[str, Any]) -> int:
        # Epochs are only compared for equality: after `safefs init` switched backends, the new
        # backend's epochs (etcd revisions) may be smaller than the old one's.
        try:
            return int(record.get("generation") or 0)
        except (TypeError, ValueError):
            return 0

    def _invalidate_dirs(self, paths: list[Any]) -> None:
        """Distrust the listed directories only, here and in the kernel (queued). A directory
        this mount never looked up needs nothing: it is read fresh when first used."""
        table = self.fs.table
        for path in paths:
            ino: int | None = ROOT_INO
            if isinstance(path, str) and path not in (".", ""):
                for part in os.fsencode(path).split(b"/"):
                    ino = table.child(ino, part) if ino is not None else None
            if ino is None or ino not in table.inodes:
                continue
            self.fs.mark_dir_stale(ino)
            self.notifier.later_inode(ino)
            for name, child_ino in list(table.names(ino).items()):
                child = table.inodes.get(child_ino)
                if child is not None and child.lookups > 0:
                    self.notifier.later_entry(ino, name)
                    self.notifier.later_inode(child_ino)

    # -- generations through etcd ----------------------------------------------------------
    def _announce_generation(self, record: dict[str, Any]) -> None:
        """The flusher published `record` on the project: hand it to etcd in the background."""
        self._etcd_pending = record
        self._etcd_wake.set()

    async def _etcd_call(self, fn: Any, *args: Any, timeout: float = ETCD_CALL_TIMEOUT) -> Any:
        """`fn(*args)` in a worker thread behind the "etcd" limiter; TimeoutError after `timeout`."""
        with trio.move_on_after(timeout):
            return await trio.to_thread.run_sync(fn, *args, limiter=self._etcd_limiter, abandon_on_cancel=True,
                                                 thread_name=f"safefs etcd {fn.__name__}")  # fmt: skip
        raise TimeoutError(errno.ETIMEDOUT, f"etcd did not answer within {timeout:g} s")

    async def _publish_generations(self) -> None:
        """Writer: put each generation into etcd as well (best effort; only the newest matters).
        etcd refuses it unless our epoch still holds the lease, and we do not send it unless
        the lease keeper says we may still write."""
        etcd = self.lease_store.etcd
        assert etcd is not None  # started only for a project on etcd
        backoff = 0.0
        while True:
            await self._etcd_wake.wait()
            self._etcd_wake = trio.Event()
            record = self._etcd_pending
            if record is None:
                continue
            epoch = int(record.get("epoch") or 0)
            if epoch != self.keeper.epoch or not self.keeper.writable():
                self._etcd_pending = None
                continue
            try:
                accepted = await self._etcd_call(etcd.publish_generation, epoch, record)
            except OSError as exc:
                backoff = min(5.0, max(0.5, backoff * 2))
                log.warning("follow: cannot publish generation %s to etcd: %s; retrying", record.get("generation"), exc)
                await trio.sleep(backoff)
                self._etcd_wake.set()
                continue
            backoff = 0.0
            if self._etcd_pending is record:
                self._etcd_pending = None
            if not accepted:
                log.warning("follow: etcd refused generation %s: epoch %d no longer holds the lease",
                            record.get("generation"), epoch)  # fmt: skip

    async def _watch_etcd(self) -> None:
        """Follower: learn of generations from etcd (a long-poll watch), not by polling NFS."""
        etcd = self.lease_store.etcd
        assert etcd is not None  # started only for a project on etcd
        revision = 0
        failing = False
        while True:
            if self.role == "writer":
                self._etcd_ok_at, revision = None, 0
                await trio.sleep(0.5)
                continue
            try:
                if revision == 0:
                    record, revision = await self._etcd_call(etcd.read_generation)
                else:
                    got = await self._etcd_call(etcd.watch_generation, revision, ETCD_WATCH_WAIT,
                                                timeout=ETCD_WATCH_WAIT + ETCD_CALL_TIMEOUT)  # fmt: skip
                    record, revision = got if got is not None else (None, revision)
            except (OSError, SafefsError) as exc:
                if not failing:
                    log.warning("follow: etcd does not answer (%s); reading the project's generation file", exc)
                failing, self._etcd_ok_at, revision = True, None, 0
                await trio.sleep(1.0)
                continue
            if failing:
                log.info("follow: etcd answers again")
            failing, self._etcd_ok_at = False, trio.current_time()
            if record is not None and self.role != "writer":
                self._see_generation(record, "etcd")

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
                        await trio.to_thread.run_sync(self.history.append, event, limiter=limiter,
                                                      abandon_on_cancel=True)
                    except OSError as exc:
                        log.warning("history: cannot append the %s record to %s: %s",
                                    event.event, self.history.path, exc)
                if scope.cancelled_caught:
                    log.warning("history: %s did not answer; the %s record may be missing",
                                self.history.path, event.event)
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
        lease.update(self.lease_store.describe())
        lease["project_polls"] = self.lease_store.project_requests + self.generation_reads
        lease["generation_seen_at"] = self.generation_seen_at if self.role != "writer" else None
        return {
            "src": str(config.src),
            "mnt": str(config.mnt),
            "cache_dir": str(config.cache_dir),
            "pid": os.getpid(),
            "host": self.host_name,
            "role": self.keeper.role,
            "state": self.state,
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
            "kernel_writeback_cache": self.ops.enable_writeback_cache,
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
        if self.state != "mounted":  # unmounted: sync means "wait for the final write-back"
            outcome = await self._wait_final(timeout, progress)
            self._refuse_if_orphaned(unmounted=True)
            final = self._final_receipt
            return {**outcome, "files": getattr(final, "files", 0), "bytes": getattr(final, "bytes", 0),
                    "ops": getattr(final, "ops", 0), "generation": getattr(final, "generation", None),
                    "epoch": self._held_epoch, "released": True}  # fmt: skip
        if self.keeper.role != "writer":
            self._refuse_if_orphaned()
            # A follower has nothing to write back; sync means "show me the latest".
            self.fs.mark_stale()
            self._invalidate_kernel()
            record = await self._read_generation()
            self.seen_generation = record or self.seen_generation
            return {"role": "follower", "epoch": self.keeper.epoch, "generation": (record or {}).get("generation"),
                    "files": 0, "bytes": 0, "ops": 0, "released": False}  # fmt: skip
        receipt = await self._write_back_reported(timeout, progress)
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
            "conflicts": self.flusher.report_conflicts(),  # since the last sync, background ones too
        }

    async def _write_back_reported(self, timeout: float | None, progress: Any) -> Any:
        """_write_back in the background, answering within about `timeout` whatever a backing
        call in flight does, and telling the client each second what it waits for. On a
        timeout the write-back goes on by itself; the SyncTimeout names the real cause."""
        await self._flush_kernel(timeout)
        outcome: list[Any] = []
        done = trio.Event()

        async def write_back() -> None:
            try:
                outcome.append(await self._write_back(timeout))
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
        if self.state == "mounted" and getattr(self, "ops", None) is not None and self.ops.enable_writeback_cache:
            await flush_kernel_pages(str(self.config.mnt), KERNEL_FLUSH_TIMEOUT if timeout is None else timeout)

    async def _wait_reporting(self, event: trio.Event, progress: Any, what: Any) -> None:
        """Wait for `event`; meanwhile tell `progress` every PROGRESS_INTERVAL how far the
        write-back is (files and bytes left and done) and what it waits for: `what()` =
        (waiting_for, detail)."""
        ops, files, nbytes = self._unwritten_counts()
        files_total, bytes_total = ops + files, nbytes
        while True:
            with trio.move_on_after(PROGRESS_INTERVAL):
                await event.wait()
                return
            if progress is None:
                continue
            ops, files, nbytes = self._unwritten_counts()
            files_total, bytes_total = max(files_total, ops + files), max(bytes_total, nbytes)
            waiting_for, detail = what()
            await progress({
                "waiting_for": waiting_for, "detail": detail,
                "files_done": files_total - ops - files, "files_total": files_total,
                "bytes_done": bytes_total - nbytes, "bytes_total": bytes_total,
            })  # fmt: skip

    def _write_back_wait(self) -> tuple[str, str]:
        ops, files, nbytes = self._unwritten_counts()
        left = f"{ops + files} changes, {nbytes} bytes left"
        lock_delay = self.keeper.statistics().get("lock_delay")
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

    async def _wait_final(self, timeout: float | None, progress: Any) -> dict[str, Any]:
        """Wait for the final write-back of an unmounted mount; what it left, for the caller."""
        self._final_waiters += 1
        try:
            with trio.move_on_after(float("inf") if timeout is None else timeout):
                await self._wait_reporting(self._final_done, progress, self._final_wait)
            if not self._final_done.is_set():
                ops, files, nbytes = self._unwritten_counts()
                raise SyncTimeout(
                    f"{self.config.mnt} is unmounted, but its daemon (pid {os.getpid()}) is still writing "
                    f"back after {timeout:g} s ({ops + files} changes, {nbytes} bytes left)",
                    hint="it goes on by itself; `safefs status` shows how far it is",
                )
            return self._outcome()
        finally:
            self._final_waiters -= 1

    def _final_wait(self) -> tuple[str, str]:
        if self.state == "mounted":
            return f"the files still open in the detached mount {self.config.mnt} to be closed", \
                f"{self.fs.open_files()} open"  # fmt: skip
        waiting_for, detail = self._write_back_wait()
        return f"{waiting_for} (final, after the unmount)", detail

    def _outcome(self) -> dict[str, Any]:
        """What an unmount left: everything written back, or how much stays in which cache."""
        ops, files, nbytes = self._unwritten_counts()
        return {
            "src": str(self.config.src), "cache_dir": str(self.config.cache_dir), "pid": os.getpid(),
            "role": self.keeper.role, "state": self.state, "unmounted": True,
            "unwritten": ops + files, "unwritten_files": files, "unwritten_ops": ops, "unwritten_bytes": nbytes,
            "unwritten_reason": self._exit_detail or self._orphan_reason or self._why_orphaned()
            if ops + files else None,
        }  # fmt: skip

    def _unwritten(self) -> tuple[int, int]:
        """(files, bytes) this cache holds that the project does not have."""
        ops, files, nbytes = self._unwritten_counts()
        return files + ops, nbytes

    def _unwritten_counts(self) -> tuple[int, int, int]:
        """(pending ops, dirty files, dirty bytes) this cache holds that the project does not have."""
        # The same count as the flusher's status: the root has no name, its attributes count.
        dirty = [i for i in self.fs.table.iter_dirty() if i.links or i.ino == ROOT_INO]
        return len(self.fs.table.ops), len(dirty), sum(ranges.total(i.dirty) for i in dirty)

    def _refuse_if_orphaned(self, *, unmounted: bool = False) -> None:
        """A mount holding changes it cannot write back must not report them safe (G4)."""
        ops, files, nbytes = self._unwritten_counts()
        if ops or files:
            recover = f"safefs recover --cache-dir {self.config.cache_dir} {self.config.src}"
            if not unmounted:
                recover = f"safefs recover {self.config.mnt}` (or, once unmounted, `{recover}"
            raise Unwritten(
                f"{files} files ({nbytes} bytes) and {ops} pending operations stay in the cache "
                f"{self.config.cache_dir} and are not in the project {self.config.src} "
                f"({self._orphan_reason or self._why_orphaned()})",
                hint=f"run `{recover}` on this host to write them back (a file changed meanwhile "
                "is kept beside as a conflict copy)",
            )

    async def acquire(self, *, wait: bool, timeout: float | None, progress: Any = None) -> dict[str, Any]:
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
                await self._take_role()
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
            return {"role": self.keeper.role, "epoch": result[0]}
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
            holder = self.keeper.statistics()["holder"]
            if not isinstance(holder, dict) or self.keeper.role == "writer":
                return True
            age = holder.get("heartbeat_age")
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
        if lease["role"] == "writer":
            return "the lock delay after taking over the lease", f"{lease.get('lock_delay') or 0:.0f} s left"
        holder = lease["holder"]
        if isinstance(holder, dict):
            age = holder.get("heartbeat_age") or 0.0
            return f"the lease held by {holder.get('host')} (pid {holder.get('pid')})", \
                f"its heartbeat, renewed every {timings.renew:g} s while it lives, stood still for " \
                f"{age:.0f} s; a dead holder is taken over after {timings.t_break:g} s and a lock delay " \
                f"of {timings.lock_delay:g} s"  # fmt: skip
        return "the lease", "looking for a free epoch"

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

    async def prepare_unmount(
        self, *, timeout: float | None, lazy: bool = False, progress: Any = None
    ) -> dict[str, Any]:
        """Write back, unmount (here, in our own mount namespace), wait for the final write-back
        and say what it left. A refused (busy) unmount raises Busy before anything was
        released: the mount stays the writer and its open files keep working."""
        deadline = trio.current_time() + (float("inf") if timeout is None else timeout)
        self._final_waiters += 1  # from here: the session may end before fusermount3 returns
        try:
            if self.state == "mounted":
                if self.keeper.role == "writer":
                    await self._write_back_reported(timeout, progress)
                await trio.to_thread.run_sync(functools.partial(unmount.fusermount, self.config.mnt, lazy=lazy))
                log.info("daemon: %s unmounted (safefs umount); writing back the rest", self.config.mnt)
            remaining = deadline - trio.current_time()
            return await self._wait_final(None if remaining == float("inf") else max(0.0, remaining), progress)
        finally:
            self._final_waiters -= 1
