"""The orphan marker: this cache's record in the project's `.safefs/orphans/` (safefs/orphans.py).

While this mount holds changes the project lacks and is not the writer (it lost its lease, or
started as a follower with changes an earlier mount left), or when it exits with changes
unwritten, it publishes a marker in `<project>/.safefs/orphans/`, so `safefs status` on every
host names this host and its cache; the marker goes when the journal holds nothing unwritten
any more.

Invariants: publishing is best effort. A background task retries with backoff, every call runs
in a worker thread with a timeout, and nothing else (the mount, the control socket, the
lease) ever waits for it. One marker change at a time (`_marker_lock`, `_marker_limiter`).

Threading: the trio thread; marker I/O in worker threads, abandoned after its timeout.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from safefs import orphans
from safefs.orphans import OrphanRecord, OrphanStore

if TYPE_CHECKING:
    from collections.abc import Callable

    from safefs.clock import Clock
    from safefs.config import MountConfig
    from safefs.lease.keeper import LeaseKeeper
    from safefs.lease.model import Identity

log = logging.getLogger(__name__)

ORPHAN_CHECK_INTERVAL = 0.5  # how often the marker is compared with the journal (in memory)
ORPHAN_IO_TIMEOUT = 10.0  # one marker publish or removal on the project; abandoned after this
ORPHAN_RETRY_MAX = 30.0  # the longest wait between two failed marker updates
ORPHAN_EXIT_TIMEOUT = 5.0  # the last marker update at exit, and the one after `recover`
MARKER_UNKNOWN = ("unknown",)  # OrphanMarker._marker before we looked: a marker of ours may exist


class OrphanMarker:
    """This cache's orphan marker (see the module docstring). `unwritten_counts` is the control
    handler's count; `held_epoch` tells the last epoch this process held the lease in."""

    def __init__(
        self, config: MountConfig, clock: Clock, keeper: LeaseKeeper, identity: Identity,
        unwritten_counts: Callable[[], tuple[int, int, int]], held_epoch: Callable[[], int | None],
    ) -> None:  # fmt: skip
        self.config = config
        self.clock = clock
        self.keeper = keeper
        self.identity = identity
        self._unwritten_counts = unwritten_counts
        self.held_epoch = held_epoch
        self.orphans = OrphanStore(self.config.src)
        self.orphan_name = orphans.record_name(identity.host, identity.machine_id, str(config.cache_dir))
        # One marker change at a time, even after a thread stuck in NFS was abandoned (it keeps
        # its token until it returns).
        self._marker_limiter = trio.CapacityLimiter(1)
        self._marker_lock = trio.Lock()
        # What our orphan marker on the project says: None (there is none), MARKER_UNKNOWN, or
        # the (counts, reason, epoch) key of the version we published. Changed under _marker_lock.
        self._marker: tuple[Any, ...] | None = MARKER_UNKNOWN
        self._orphan_since: float | None = None  # wall time this cache's orphan was first seen
        self._orphan_reason: str | None = None

    @property
    def orphan_reason(self) -> str | None:
        """Why our marker was published (None while there is none)."""
        return self._orphan_reason

    # -- orphan markers ------------------------------------------------------------------
    async def keep_orphan_marker(self) -> None:
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
            if reason is None and self._marker is None and self._orphan_reason is None and self.keeper.role == "writer":
                # Nothing to publish and nothing to remove: do not count. Counting walks every
                # dirty inode, and a writer holding 100,000 of them would spend a good part of
                # a core every ORPHAN_CHECK_INTERVAL on an answer it would not use.
                return
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
                self._orphan_reason = self.why_orphaned()
            key = (ops, files, nbytes, self._orphan_reason, self.held_epoch())
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
                epoch=self.held_epoch(), pending_ops=ops, dirty_files=files, dirty_bytes=nbytes,
                since=self._orphan_since, updated=self.clock.wall(), reason=self._orphan_reason,
            )  # fmt: skip
            await self._marker_call(self.orphans.publish, record, timeout=timeout)
            if self._marker is None or self._marker is MARKER_UNKNOWN:
                log.warning("orphans: %d changes (%d bytes) in %s cannot be written back from this "
                            "mount (%s); published %s so every host sees them",
                            ops + files, nbytes, self.config.cache_dir, self._orphan_reason,
                            self.orphans.path / f"{self.orphan_name}{orphans.SUFFIX}")  # fmt: skip
            self._marker = key

    def why_orphaned(self) -> str:
        lease = self.keeper.statistics()
        if lease.state == "lost":
            return f"lease lost: {lease.lost_reason}"
        if self.held_epoch() is not None:
            return f"lease of epoch {self.held_epoch()} given up with changes unwritten"
        return "left in this cache by an earlier mount that did not write it back; mounted as a follower"

    async def _marker_call(self, fn: Any, *args: Any, timeout: float) -> Any:
        """`fn(*args)` in a worker thread; TimeoutError after `timeout` (the thread is abandoned:
        a marker is a status record, and a late write of it is corrected by the next one)."""
        with trio.move_on_after(timeout):
            return await trio.to_thread.run_sync(fn, *args, limiter=self._marker_limiter, abandon_on_cancel=True)
        raise TimeoutError(errno.ETIMEDOUT, f"no answer within {timeout:g} s", str(self.orphans.path))

    async def update_orphan_marker_now(self, reason: str | None = None) -> None:
        """One best-effort marker update that waits at most ORPHAN_EXIT_TIMEOUT."""
        with trio.move_on_after(ORPHAN_EXIT_TIMEOUT) as scope:
            try:
                await self._sync_orphan_marker(timeout=ORPHAN_EXIT_TIMEOUT, reason=reason)
            except (OSError, ValueError) as exc:
                log.warning("orphans: cannot update our marker in %s: %s", self.orphans.path, exc)
        if scope.cancelled_caught:
            log.warning("orphans: %s did not answer; our marker may be out of date", self.orphans.path)

    async def mark_orphan_at_exit(self, exit_detail: str | None) -> None:
        """Leave a marker if this mount exits with changes unwritten (`exit_detail`: why the
        final write-back left them behind); remove ours if it has none."""
        ops, files, _ = self._unwritten_counts()
        reason = None
        if ops or files:
            detail = exit_detail or self._orphan_reason
            reason = "unmounted with changes unwritten" + (f" ({detail})" if detail else "")
        await self.update_orphan_marker_now(reason)
