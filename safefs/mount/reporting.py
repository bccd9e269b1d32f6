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
from safefs.history import HistoryLog

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from safefs.clock import Clock
    from safefs.config import MountConfig
    from safefs.flusher import Flusher
    from safefs.lease.keeper import LeaseKeeper
    from safefs.lease.model import Identity

log = logging.getLogger(__name__)

SYSTEMD_STATUS_INTERVAL = 2.0  # how often STATUS= is refreshed under systemd (when it changed)
HISTORY_CHECK_INTERVAL = 1.0  # how often new conflicts are looked for, to record them
HISTORY_QUEUE = 100  # lease events waiting to be appended to the project's history
HISTORY_IO_TIMEOUT = 10.0  # one append to the project's history; abandoned after this


class HistoryRecorder:
    """Appends this mount's lease events, conflicts and recoveries to the project's history.

    Built before the lease keeper, whose `on_event` is `record_event`; `run` is the task that
    appends what is queued until `close`."""

    def __init__(self, config: MountConfig, clock: Clock, identity: Identity) -> None:
        self.config = config
        self.clock = clock
        self.identity = identity
        self.history = HistoryLog(config.src, identity.host, identity.machine_id)
        self._history_send, self._history_receive = trio.open_memory_channel[HistoryEvent](HISTORY_QUEUE)

    # -- the project's history (safefs/history.py) ----------------------------------------
    def record_event(self, kind: str, epoch: int | None, detail: str) -> None:
        """Queue one history record (the keeper calls this on the trio thread; never blocks)."""
        event = HistoryEvent(kind, self.identity.host, self.identity.user, os.getpid(), epoch,
                             str(self.config.mnt), detail, self.clock.wall())  # fmt: skip
        try:
            self._history_send.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError):
            log.warning("history: dropped the %s record of epoch %s (the project is not keeping up)", kind, epoch)

    async def run(self, done: trio.Event) -> None:
        """Append queued events in a worker thread each, HISTORY_IO_TIMEOUT at most (a hung
        project delays the history, never the mount); a failure is logged, the record dropped."""
        limiter = trio.CapacityLimiter(1)
        try:
            async for event in self._history_receive:
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

    def close(self) -> None:
        """No more records: `run` appends what is queued, then ends."""
        self._history_send.close()


class MetricsEndpoint:
    """`status` (the control handler's) served as Prometheus metrics with --metrics-port.

    Built first: a port in use is refused before anything is mounted. The root sets `status`
    while the mount serves; the listener answers empty before and after."""

    def __init__(self) -> None:
        self.status: Callable[[], Awaitable[protocol.Status]] | None = None  # the handler's, while serving
        self.metrics_listener: Any = None  # a safefs.metrics.Listener with --metrics-port

    def serve(self, port: int) -> None:
        """Serve `status` as Prometheus metrics on 127.0.0.1:`port`, from prometheus-client's thread."""
        from safefs import metrics  # only here: prometheus-client is needed for --metrics-port alone

        token = trio.lowlevel.current_trio_token()

        def statuses() -> list[dict[str, Any]]:
            status = self.status
            if status is None:
                return []
            return [protocol.to_wire(trio.from_thread.run(status, trio_token=token))]

        try:
            self.metrics_listener = metrics.serve(port, statuses)
        except OSError as exc:
            raise Refused(
                f"cannot serve metrics on 127.0.0.1:{port}: {exc.strerror or exc}",
                hint="choose another --metrics-port",
            ) from None
        log.info("metrics: serving http://127.0.0.1:%d/metrics", port)

    def close(self) -> None:
        if self.metrics_listener is not None:
            self.metrics_listener.close()


class Reporting:
    """Conflicts into the history and the systemd status (see the module docstring).
    `unwritten` is the control handler's count of unwritten changes."""

    def __init__(
        self, config: MountConfig, keeper: LeaseKeeper, flusher: Flusher, recorder: HistoryRecorder,
        unwritten: Callable[[], tuple[int, int]],
    ) -> None:
        self.config = config
        self.keeper = keeper
        self.flusher = flusher
        self.recorder = recorder
        self._unwritten = unwritten
        self.systemd = sdnotify.Notifier()  # a no-op unless started by systemd with Type=notify
        self._conflicts_recorded = 0

    def record_conflicts(self) -> None:
        for conflict in self.flusher.conflicts[self._conflicts_recorded :]:
            what = conflict.get("path") or conflict.get("op") or "?"
            kept = f" kept as {conflict['kept_as']}" if conflict.get("kept_as") else ""
            detail = f"{what}{kept}: {conflict.get('error', '')}".rstrip(": ")
            self.recorder.record_event("conflict", self.keeper.epoch, detail)
        self._conflicts_recorded = len(self.flusher.conflicts)

    async def watch_conflicts(self) -> None:
        while True:
            await trio.sleep(HISTORY_CHECK_INTERVAL)
            self.record_conflicts()

    def systemd_status(self) -> str:
        files, nbytes = self._unwritten()
        dirty = f"unwritten: {files} changes, {nbytes / (1 << 20):.1f} MiB" if files else "nothing unwritten"
        return f"{self.keeper.role} of {self.config.src} at {self.config.mnt}, epoch {self.keeper.epoch}; {dirty}"

    async def report_to_systemd(self) -> None:
        while True:
            await trio.sleep(SYSTEMD_STATUS_INTERVAL)
            self.systemd.status(self.systemd_status())
