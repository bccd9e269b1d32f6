"""Shut-down: signals, the mount watch, and the final write-back.

Shut-down (kernel unmount, `safefs umount`, SIGTERM/SIGINT): stop serving requests, unmount,
then write back everything (shielded, retried until the backing tree accepts it or the
final-flush time runs out, in which case the dirty data stays in the cache for the next
mount), close the journal, exit. The session also ends when the mount vanishes from this
namespace's mount table while the kernel keeps the connection open (a copy in another mount
namespace; see safefs/unmount.py and `watch_mount`). A signal during the final write-back
stops it: the dirty data stays in the cache, and `kill` must work. The root builds Shutdown
with its collaborators once the session exists, runs `watch_signals` and `watch_mount` in the
mount's nursery and `finish` when the session ends.

Threading: the trio thread; fusermount3 and the project's calls run in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import trio

from safefs import unmount
from safefs.control import protocol
from safefs.errors import ExitCode, SafefsError, SyncTimeout
from safefs.fuse_ops import mount_device

if TYPE_CHECKING:
    from collections.abc import Iterator

    from safefs.backing import Backing
    from safefs.config import MountConfig
    from safefs.flusher import Flusher
    from safefs.fs import Filesystem
    from safefs.fuse_ops import Session
    from safefs.lease.keeper import LeaseKeeper
    from safefs.mount.orphan_marker import OrphanMarker
    from safefs.mount.reporting import Reporting
    from safefs.mount.unwritten import UnwrittenChanges

log = logging.getLogger(__name__)

FINAL_FLUSH_TIMEOUT = 120.0
FINAL_FLUSH_STALL = 15.0  # see Shutdown._write_back_unless_stalled
REPLY_GRACE = 10.0  # at exit, calls waiting for the final write-back get this long to answer
MOUNT_WATCH_INTERVAL = 0.5  # how often the mount table is read for our mount (Shutdown.watch_mount)


class Shutdown:
    """Signals, the mount watch and the final write-back of one mount (see the module
    docstring). It owns where the mount is (`state`) and what its final write-back did
    (`final_done`, `final_receipt`, `exit_detail`), which the control handler reads.
    `unwritten` counts the changes the project lacks (safefs/mount/unwritten.py)."""

    def __init__(
        self, config: MountConfig, keeper: LeaseKeeper, fs: Filesystem, backing: Backing, flusher: Flusher,
        reporting: Reporting, orphan_marker: OrphanMarker, session: Session, unwritten: UnwrittenChanges,
    ) -> None:  # fmt: skip
        self.config = config
        self.keeper = keeper
        self.fs = fs
        self.backing = backing
        self.flusher = flusher
        self.reporting = reporting
        self.orphan_marker = orphan_marker
        self.session = session
        self.unwritten = unwritten
        self.state = "mounted"  # -> "unmounted" (final write-back) -> "exiting"
        self.terminated = False  # a signal ended the session: we unmount ourselves
        self._mount_gone = False  # watch_mount ended the session: nothing left to unmount
        self.exit_detail: str | None = None  # why the final write-back left changes behind
        self.final_receipt: Any = None  # what the final write-back wrote, for `sync` after it
        self.final_done = trio.Event()  # the final write-back is over (see MountHandle._wait_final)
        self._final_waiters = 0  # control calls waiting for it, still to answer

    @contextlib.contextmanager
    def awaited(self) -> Iterator[None]:
        """A control call waits for the final write-back's outcome: the exit waits for it to
        answer (REPLY_GRACE at most, wait_for_callers)."""
        self._final_waiters += 1
        try:
            yield
        finally:
            self._final_waiters -= 1

    async def wait_for_callers(self) -> None:
        """Let `umount`/`sync` callers have the outcome, REPLY_GRACE at most."""
        with trio.move_on_after(REPLY_GRACE):
            while self._final_waiters:
                await trio.sleep(0.05)

    async def finish(self, clean_exit: bool) -> int:
        """After the session ended: unmount if it is still ours to, then the final write-back
        (shielded); the exit code."""
        # After a kernel unmount the session is over; after a signal or an error we
        # must take the mount down ourselves so nobody hangs on a dead mountpoint.
        self.session.close(unmount=(self.terminated or not clean_exit) and not self._mount_gone)
        self.state = "unmounted"
        if self.reporting.systemd.enabled:
            files, nbytes = self.unwritten.total()
            self.reporting.systemd.send(STOPPING=1,
                                        STATUS=f"unmounted; writing back {files} changes, {nbytes / (1 << 20):.1f} MiB")
        with trio.CancelScope(shield=True):
            try:
                code = await self._final_flush_until_signalled()
            finally:
                self.state = "exiting"
                self.final_done.set()
        return code

    async def watch_mount(self) -> None:
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
                    self.reporting.record_conflicts()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stop_on_signal)
                nursery.start_soon(flush)
        if code != int(ExitCode.OK) and self.exit_detail is None:
            self.exit_detail = "the final write-back was stopped"
        await self.orphan_marker.mark_orphan_at_exit(self.exit_detail)
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
            self.exit_detail = f"the write-back failed: {exc.message}"
            log.error(
                "daemon: could not write everything back (%s); the dirty data stays in %s and is "
                "written back at the next mount",
                exc.message,
                self.config.cache_dir,
            )
            return int(ExitCode.BACKING_FAILED)
        self.final_receipt = receipt
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
                result.append(await self.write_back(FINAL_FLUSH_TIMEOUT))
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

    async def write_back(self, timeout: float | None, progress: Any = None) -> Any:
        """flusher.sync, after waiting out a lock delay (a fresh takeover) within `timeout`."""
        deadline = trio.current_time() + (timeout if timeout is not None else float("inf"))
        with trio.move_on_at(deadline):
            until = self.keeper.publishing_from()
            if until is not None:
                what = (f"waiting for the lock delay after the takeover: changes reach the project "
                        f"from {time.strftime('%H:%M:%S', time.localtime(until))}")  # fmt: skip
                log.info("daemon: %s", what)
                if progress is not None:
                    await progress(protocol.ProgressReport(phase=what, waiting_for="lock delay", until=until))
            await self.keeper.wait_publishable()
        remaining = deadline - trio.current_time()
        return await self.flusher.sync(timeout=None if remaining == float("inf") else max(0.0, remaining))

    async def watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("daemon: %s received; writing back and unmounting", signal.Signals(signum).name)
                self.terminated = True
                self.session.terminate()
