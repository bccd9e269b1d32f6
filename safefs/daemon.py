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
import sys
from pathlib import Path
from typing import Any

import trio

from safefs import checks
from safefs.backing import Backing
from safefs.cache import ContentCache
from safefs.clock import SystemClock
from safefs.config import MountConfig, socket_path
from safefs.control.server import serve as serve_control
from safefs.errors import DaemonFailed, ExitCode, SafefsError
from safefs.flusher import Flusher
from safefs.fs import AlwaysWritable, Filesystem, Limiters
from safefs.fuse_ops import CachePolicy, KernelNotifier, SafeOperations, Session
from safefs.inodes import InodeTable
from safefs.journal import Journal

log = logging.getLogger(__name__)

FINAL_FLUSH_TIMEOUT = 120.0
JOURNAL_SYNC_INTERVAL = 1.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
    _setup_logging(debug)
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
        ready.failed(DaemonFailed(f"the daemon failed: {exc!r}"))
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
        self.gate = AlwaysWritable()

    async def serve(self) -> int:
        config = self.config
        limiters = Limiters.create()
        table = InodeTable(self.journal, limiters.journal)
        table.load(await trio.to_thread.run_sync(self.journal.load, limiter=limiters.journal))
        try:
            backing = Backing(config.src)
        except OSError as exc:
            raise DaemonFailed(f"cannot open the project {config.src}: {exc.strerror}") from exc
        cache = ContentCache(config.cache_dir, config.free_space_floor)
        fs = Filesystem(table, cache, backing, config, self.clock, limiters, self.gate, self.notifier)
        bug = os.environ.get("SAFEFS_INJECT_BUG")
        if bug:
            fs.inject_bug_name = os.fsencode(bug)
        await fs.start(_boot_id())
        self.fs, self.flusher, self.backing, self.cache = fs, Flusher(fs, self.host_name), backing, cache
        await self.flusher.settle()
        ops = SafeOperations(fs, self.policy)
        self.ops = ops
        session = self.session = Session(ops, str(config.mnt), allow_other=config.allow_other)
        clean_exit = False
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.flusher.run)
                await nursery.start(serve_control, socket_path(config.mnt, os.environ, os.getuid()), self)
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(self._sync_journal_periodically)
                self.notifier.enabled = True
                log.info("daemon: serving %s at %s (cache %s)", config.src, config.mnt, config.cache_dir)
                self.ready.send({"ok": True, "pid": os.getpid(), "role": "writer", "holder": None})
                await session.serve()
                self.notifier.enabled = False
                nursery.cancel_scope.cancel()
            clean_exit = True
        finally:
            # After a kernel unmount the session is over; after a signal or an error we
            # must take the mount down ourselves so nobody hangs on a dead mountpoint.
            session.close(unmount=self.terminated or not clean_exit)
            with trio.CancelScope(shield=True):
                code = await self._final_flush()
            cache.close()
            backing.close()
        return code

    async def _final_flush(self) -> int:
        try:
            receipt = await self.flusher.sync(timeout=FINAL_FLUSH_TIMEOUT)
        except SafefsError as exc:
            log.error(
                "daemon: could not write everything back (%s); the dirty data stays in %s and is "
                "written back at the next mount",
                exc.message,
                self.config.cache_dir,
            )
            return int(ExitCode.BACKING_FAILED)
        log.info("daemon: wrote back %d files, %d bytes; exiting", receipt.files, receipt.bytes)
        return int(ExitCode.OK)

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("daemon: %s received; writing back and unmounting", signal.Signals(signum).name)
                self.terminated = True
                self.session.terminate()

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
        return {
            "src": str(config.src),
            "mnt": str(config.mnt),
            "cache_dir": str(config.cache_dir),
            "pid": os.getpid(),
            "host": self.host_name,
            "role": "writer",
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
            "lease": {"epoch": getattr(self.gate, "epoch", 0), "holder": None, "deadline": None, "generation": None},
        }

    async def sync(self, *, release: bool, timeout: float | None, progress: Any) -> dict[str, Any]:
        receipt = await self.flusher.sync(timeout=timeout)
        return {
            "epoch": getattr(self.gate, "epoch", 0),
            "generation": None,
            "files": receipt.files,
            "bytes": receipt.bytes,
            "ops": receipt.ops,
            "released": False,
        }

    async def acquire(self, *, wait: bool, timeout: float | None) -> dict[str, Any]:
        return {"role": "writer", "epoch": getattr(self.gate, "epoch", 0)}

    async def prepare_unmount(self, *, timeout: float | None) -> dict[str, Any]:
        result = await self.sync(release=True, timeout=timeout, progress=None)
        result["pid"] = os.getpid()
        return result
