"""Reporting: the project's history, Prometheus metrics and the systemd status.

Lease events (from the keeper's on_event), conflicts and recoveries are queued and appended
to `<project>/.safefs/history/` by a background task, each append in a worker thread with a
timeout (safefs/history.py): a hung project delays the history, never the mount. Under
systemd the daemon sends READY=1 once it serves, STATUS= while it runs, STOPPING=1 before the
final write-back (safefs/sdnotify.py). With --metrics-port, `status` is served as metrics from
prometheus-client's thread (safefs/metrics.py).

Threading: the trio thread, except the metrics callback, which hops onto it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from safefs import sdnotify
from safefs.control import protocol
from safefs.errors import Refused
from safefs.history import Event as HistoryEvent

if TYPE_CHECKING:
    from safefs.clock import Clock
    from safefs.config import MountConfig
    from safefs.flusher import Flusher
    from safefs.history import HistoryLog
    from safefs.lease.keeper import LeaseKeeper
    from safefs.lease.model import Identity

log = logging.getLogger(__name__)

SYSTEMD_STATUS_INTERVAL = 2.0  # how often STATUS= is refreshed under systemd (when it changed)
HISTORY_CHECK_INTERVAL = 1.0  # how often new conflicts are looked for, to record them
HISTORY_IO_TIMEOUT = 10.0  # one append to the project's history; abandoned after this


class Reporting:
    """The reporting part of `Daemon` (see the module docstring)."""

    config: MountConfig
    clock: Clock
    keeper: LeaseKeeper
    flusher: Flusher
    identity: Identity
    history: HistoryLog
    serving: bool

    def _init_reporting(self) -> None:
        """This part's own state (Daemon.__init__ calls this; serve() opens the history)."""
        self.systemd = sdnotify.Notifier()  # a no-op unless started by systemd with Type=notify
        self.metrics_listener: Any = None  # a safefs.metrics.Listener with --metrics-port
    _history_send: trio.MemorySendChannel[HistoryEvent]
    _conflicts_recorded: int

    if TYPE_CHECKING:

        async def status(self) -> protocol.Status: ...

        def _unwritten(self) -> tuple[int, int]: ...

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
        """Append queued events in a worker thread each, HISTORY_IO_TIMEOUT at most (a hung
        project delays the history, never the mount); a failure is logged, the record dropped."""
        limiter = trio.CapacityLimiter(1)
        try:
            async for event in events:
                with trio.move_on_after(HISTORY_IO_TIMEOUT) as scope:
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
            return [protocol.to_wire(trio.from_thread.run(self.status, trio_token=token))]

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
