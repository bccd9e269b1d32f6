"""The composition root: builds every service of one mount, wires them, and runs the mount.

Start-up, in the order a reader of DESIGN.md expects:
1. refuse unsafe set-ups (checks.py), create the cache dir (0700), lock and open the journal;
2. load the inode table, create the root, forget what a reboot may have torn;
3. start the lease keeper, the flusher (which replays what a crash left behind), the control
   socket, the signal watcher and the periodic journal sync;
4. mount with pyfuse3 and tell the parent we are ready (one JSON line on `ready_fd`).

What the mount does while it runs and when it ends lives in safefs/mount/, one object a part,
which this module builds with its collaborators: following.py (the role, as the lease keeper
holds it, and the writer's generations), orphan_marker.py, reporting.py (history, metrics,
systemd), unwritten.py (what the project lacks), shutdown.py (signals, the mount watch, the
final write-back, and the mount's state) and handle.py (the control socket's operations).
process.py has the process's own start-up helpers: the ready message, the boot id, loading
the inode table, opening the lease store, and the periodic journal sync.

Invariants:
- This is the only module that opens the long-lived nursery or drives the kernel session
  (fuse_ops.Session: mount, serve, close).
- The process never forks after the journal is open; `safefs mount` starts it fresh.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import socket

import trio

from safefs import __version__, checks, kernel_cache, logs
from safefs.backing import Backing
from safefs.cache import ContentCache
from safefs.clock import SystemClock
from safefs.config import MountConfig, socket_path
from safefs.control.server import serve as serve_control
from safefs.errors import DaemonFailed, ExitCode, SafefsError, describe_exception
from safefs.flusher import Flusher
from safefs.fs import Filesystem, Limiters
from safefs.fuse_ops import KernelNotifier, SafeOperations, Session
from safefs.journal import Journal
from safefs.kernel_cache import CachePolicy
from safefs.lease.keeper import LeaseKeeper
from safefs.lease.store import local_identity
from safefs.mount.following import Following
from safefs.mount.handle import MountHandle, lease_to_wire
from safefs.mount.orphan_marker import ORPHAN_EXIT_TIMEOUT, OrphanMarker
from safefs.mount.process import (
    ReadyFd,
    boot_id,
    lease_timings,
    load_table,
    open_lease_store,
    sync_journal_periodically,
)
from safefs.mount.reporting import HistoryRecorder, MetricsEndpoint, Reporting
from safefs.mount.shutdown import Shutdown
from safefs.mount.unwritten import UnwrittenChanges

log = logging.getLogger(__name__)


def run(config: MountConfig, *, ready_fd: int | None = None, debug: bool = False) -> int:
    """Serve one mount until it is unmounted; return an ExitCode."""
    where = logs.setup("debug" if debug else config.log_level, config.log_file)
    if config.log_file is not None:  # on a terminal, a refusal must stay one error line and a hint
        log.info("daemon: safefs %s pid %d logging to %s", __version__, os.getpid(), where)
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    ready = ReadyFd(ready_fd)
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
    """One mount's services, built and wired here; each part lives in safefs/mount/."""

    def __init__(self, config: MountConfig, journal: Journal, ready: ReadyFd) -> None:
        self.config = config
        self.journal = journal
        self.ready = ready
        self.clock = SystemClock()
        self.host_name = config.host_id or socket.gethostname()
        self.policy = CachePolicy(follower_poll=config.follower_poll)
        self.notifier = KernelNotifier()
        self.metrics = MetricsEndpoint()

    @property
    def role(self) -> str:
        """The lease keeper's role: the one place it is kept (see safefs/lease/keeper.py)."""
        return self.keeper.role

    async def serve(self) -> int:
        config = self.config
        if config.metrics_port is not None:
            self.metrics.serve(config.metrics_port)  # first: a port in use is refused before any mount
        limiters = Limiters.create()
        table = await load_table(config, self.journal, limiters)
        try:
            backing = Backing(config.src)
        except OSError as exc:
            raise DaemonFailed(f"cannot open the project {config.src}: {exc.strerror}") from exc
        self.identity = identity = local_identity(config.host_id)
        self.recorder = recorder = HistoryRecorder(config, self.clock, identity)
        self.lease_store = store = await open_lease_store(config)
        timings = lease_timings(config, store)
        self.keeper = keeper = LeaseKeeper(
            store, self.clock, timings, identity, trio.CapacityLimiter(2),
            want_write=not config.follower, on_event=recorder.record_event,
            follow_if_unreachable=store.etcd is not None,
        )  # fmt: skip
        cache = ContentCache(config.cache_dir, config.free_space_floor)
        fs = Filesystem(table, cache, backing, config, self.clock, limiters, keeper, self.notifier)
        self.unwritten = unwritten = UnwrittenChanges(fs)
        self.orphan_marker = OrphanMarker(config, self.clock, keeper, identity, unwritten.counts,
                                          held_epoch=lambda: self.following.held_epoch)  # fmt: skip
        keeper.on_role(fs.on_role)  # the keeper holds the role; these follow it as it changes
        keeper.on_role(self.policy.on_role)
        faults = os.environ.get("SAFEFS_FAULTS")  # tests: a stuck or failing project
        if faults:
            from safefs.testing import FaultPlan  # tests only; no other module imports it

            backing.faults = FaultPlan.from_spec(json.loads(faults))
            log.warning("daemon: fault injection on: %s", faults)
        bug = os.environ.get("SAFEFS_INJECT_BUG")
        if bug:
            fs.inject_bug_name = os.fsencode(bug)
        self.fs, self.backing, self.cache = fs, backing, cache
        self.flusher = Flusher(
            table=table, cache=cache, content=fs.content, backing=backing, gate=fs.gate, clock=self.clock,
            config=config, invalidator=fs.invalidator, negative=fs.negative, host_name=self.host_name,
        )  # fmt: skip
        fs.on_change = self.flusher.poke  # the filesystem's change channel
        self.following = Following(config, self.clock, keeper, store, fs, backing, self.flusher, self.notifier)
        keeper.on_role(self.following.on_role)  # after fs and the cache policy: wakes `follow`
        if store.etcd is not None:
            self.flusher.announce = self.following.announce_generation
        self.reporting = Reporting(config, keeper, self.flusher, recorder, unwritten.total)
        try:
            async with trio.open_nursery() as services:
                history_done = trio.Event()
                services.start_soon(recorder.run, history_done)
                role = await services.start(keeper.run)
                if role != "writer" and config.wait_for_lease:
                    log.info("daemon: waiting for the lease (%s)", lease_to_wire(keeper.statistics())["holder"])
                    await keeper.acquire(wait=True)
                await fs.start(boot_id())
                await self.following.take_role()
                if self.role == "writer":
                    await self.flusher.settle()
                code = await self._serve_mount(services)
                recorder.close()  # the writer appends what is queued, then ends
                with trio.move_on_after(ORPHAN_EXIT_TIMEOUT):
                    await history_done.wait()
                services.cancel_scope.cancel()
        finally:
            cache.close()
            backing.close()
            self.metrics.close()
        return code

    async def _serve_mount(self, services: trio.Nursery) -> int:
        config = self.config
        writeback_cache = kernel_cache.writeback_cache(self.role)
        ops = SafeOperations(self.fs, self.policy, writeback_cache=writeback_cache)
        self.fs.kernel_owns_sizes = writeback_cache
        session = Session(ops, str(config.mnt), allow_other=config.allow_other)
        shutdown = Shutdown(config, self.keeper, self.fs, self.backing, self.flusher, self.reporting,
                            self.orphan_marker, session, self.unwritten)  # fmt: skip
        handle = MountHandle(
            config, self.host_name, self.keeper, self.lease_store, self.fs, self.backing, self.flusher,
            self.following, self.orphan_marker, self.reporting, self.recorder, self.unwritten, shutdown, ops, services,
        )  # fmt: skip
        clean_exit = False
        try:
            # In the services nursery: the socket answers during the final write-back too.
            await services.start(serve_control, socket_path(config.mnt, os.environ, os.getuid()), handle)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.flusher.run)
                await nursery.start(self.notifier.run)
                nursery.start_soon(shutdown.watch_signals)
                nursery.start_soon(shutdown.watch_mount)
                nursery.start_soon(sync_journal_periodically, self.fs.table)
                nursery.start_soon(self.following.follow)
                nursery.start_soon(self.orphan_marker.keep_orphan_marker)
                nursery.start_soon(self.reporting.watch_conflicts)
                if self.lease_store.etcd is not None:
                    nursery.start_soon(self.following.publish_generations)
                    nursery.start_soon(self.following.watch_etcd)
                self.notifier.enabled = True
                log.info("daemon: serving %s at %s as %s (cache %s)",
                         config.src, config.mnt, self.role, config.cache_dir)
                self.metrics.status = handle.status  # for the metrics listener
                self.ready.send({"ok": True, "pid": os.getpid(), "role": self.role,
                                 "holder": lease_to_wire(self.keeper.statistics())["holder"]})  # fmt: skip
                self.reporting.systemd.send(READY=1, STATUS=self.reporting.systemd_status())
                if self.reporting.systemd.enabled:
                    nursery.start_soon(self.reporting.report_to_systemd)
                await session.serve()
                self.notifier.enabled = False
                nursery.cancel_scope.cancel()
            clean_exit = True
        finally:
            self.metrics.status = None
            code = await shutdown.finish(clean_exit)
        await shutdown.wait_for_callers()
        return code
