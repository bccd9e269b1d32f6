"""Following: the mount's role as the lease keeper holds it, and the writer's generations.

The role lives in the lease keeper (safefs/lease/keeper.py). The filesystem and the kernel
cache policy follow it by themselves (LeaseKeeper.on_role); this part does what a role change
needs beyond that: the writer continues the generation counter from the project's, and after a
change nothing cached about the tree is trusted blindly. `follow` wakes on the keeper's
listener, not on a poll. As a follower it looks for the writer's generations (the project's
`.safefs/generation`, or the etcd key, a long-poll watch, with the file as a fallback) and
invalidates what they name, here and in the kernel.

Threading: the trio thread; reads of the project run in worker threads (fs.read_backing,
with its timeout), etcd calls behind their own limiter with ETCD_CALL_TIMEOUT.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from safefs import generation
from safefs.errors import SafefsError
from safefs.inodes import ROOT_INO

if TYPE_CHECKING:
    from safefs.backing import Backing
    from safefs.clock import Clock
    from safefs.config import MountConfig
    from safefs.flusher import Flusher
    from safefs.fs import Filesystem
    from safefs.fuse_ops import KernelNotifier
    from safefs.lease.backends import ProjectLeaseStore
    from safefs.lease.keeper import LeaseKeeper

log = logging.getLogger(__name__)

ETCD_CALL_TIMEOUT = 5.0  # one etcd request (publish, read) from the daemon; abandoned after this
ETCD_WATCH_WAIT = 10.0  # a follower's long-poll watch of the generation key lasts this long
ETCD_FALLBACK_POLL = 30.0  # while etcd tells followers of generations, they read the NFS file this often


class Following:
    """The role and the writer's generations (see the module docstring)."""

    def __init__(
        self, config: MountConfig, clock: Clock, keeper: LeaseKeeper, lease_store: ProjectLeaseStore,
        fs: Filesystem, backing: Backing, flusher: Flusher, notifier: KernelNotifier,
    ) -> None:  # fmt: skip
        self.config = config
        self.clock = clock
        self.keeper = keeper
        self.lease_store = lease_store
        self.fs = fs
        self.backing = backing
        self.flusher = flusher
        self.notifier = notifier
        self.held_epoch: int | None = None  # the last epoch this process held the lease in (take_role)
        self._applied_role = "unknown"  # the role take_role last set the mount up for
        self._role_changed = trio.Event()  # set by the keeper's role listener; follow waits on it
        self._role_lock = trio.Lock()  # one take_role at a time: the second waits for the first
        self.seen_generation: dict[str, Any] | None = None
        self.generation_seen_at: float | None = None  # wall time this follower learnt of seen_generation
        self.generation_reads = 0  # reads of .safefs/generation on the project (status: project_polls)
        self._etcd_ok_at: float | None = None  # trio time of the last answer of a follower's etcd watch
        self._etcd_pending: dict[str, Any] | None = None  # the newest generation not yet in etcd
        self._etcd_wake = trio.Event()
        self._etcd_limiter = trio.CapacityLimiter(4)

    def on_role(self, role: str) -> None:
        """The keeper's role listener: wake `follow`."""
        self._role_changed.set()

    @property
    def role(self) -> str:
        """The lease keeper's role: the one place it is kept (see safefs/lease/keeper.py)."""
        return self.keeper.role

    # -- roles ---------------------------------------------------------------------------
    async def take_role(self) -> None:
        """Set the mount up for the role the lease keeper holds now (at start, and after each
        change: follow wakes on the keeper's role listener; fs and the cache policy follow
        the role by themselves). Returns once done, also when another task is doing it."""
        async with self._role_lock:
            role = self.keeper.role
            if role == self._applied_role:
                return
            first = self._applied_role == "unknown"
            self._applied_role = role
            fs = self.fs
            if role == "writer":
                self.held_epoch = self.keeper.epoch
                record = await self.read_generation()
                self.flusher.adopt_generation(record)
                self.seen_generation = record
                log.info("lease: this mount is the writer (epoch %d)", self.keeper.epoch)
            else:
                holder = self.keeper.statistics().holder
                writer = f"{holder.host} (pid {holder.pid})" if holder is not None else "nobody"
                log.info("lease: this mount is a follower; the writer is %s", writer)
            if not first:
                # Another host may have written: nothing cached about the tree is trusted blindly.
                fs.mark_stale()
                self.invalidate_kernel()

    def invalidate_kernel(self) -> None:
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

    async def read_generation(self) -> dict[str, Any] | None:
        self.generation_reads += 1
        try:
            return await self.fs.read_backing(generation.read, self.backing)
        except (OSError, SafefsError) as exc:
            log.info("follow: cannot read the generation: %s", exc)
            return None

    async def follow(self) -> None:
        """Take up each role change the keeper tells of (takeover, loss) and, as a follower,
        look for the writer's generations every `follower_poll`."""
        poll = self.config.follower_poll
        next_poll = trio.current_time() + min(0.5, poll)
        while True:
            with trio.move_on_at(next_poll if self.role != "writer" else float("inf")):
                await self._role_changed.wait()
            self._role_changed = trio.Event()
            await self.take_role()
            if self.role == "writer" or trio.current_time() < next_poll:
                continue
            # While etcd tells us of generations, the NFS file is only the fallback.
            etcd_ok = self._etcd_ok_at is not None and \
                trio.current_time() - self._etcd_ok_at < ETCD_WATCH_WAIT + ETCD_CALL_TIMEOUT + 2  # fmt: skip
            next_poll = trio.current_time() + (max(poll, ETCD_FALLBACK_POLL) if etcd_ok else poll)
            record = await self.read_generation()
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
        follows = prev is not None and prev.get("epoch") == record.get("epoch") and \
            record.get("generation") == (prev.get("generation") or 0) + 1  # fmt: skip
        if follows and generation.names_everything_changed(record):
            self._invalidate_dirs(record["changed"])  # nothing at all for a sync that changed nothing
        else:
            self.fs.mark_stale()
            self.invalidate_kernel()

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
    def announce_generation(self, record: dict[str, Any]) -> None:
        """The flusher published `record` on the project: hand it to etcd in the background."""
        self._etcd_pending = record
        self._etcd_wake.set()

    async def _etcd_call(self, fn: Any, *args: Any, timeout: float = ETCD_CALL_TIMEOUT) -> Any:
        """`fn(*args)` in a worker thread behind the "etcd" limiter; TimeoutError after `timeout`."""
        with trio.move_on_after(timeout):
            return await trio.to_thread.run_sync(fn, *args, limiter=self._etcd_limiter, abandon_on_cancel=True,
                                                 thread_name=f"safefs etcd {fn.__name__}")  # fmt: skip
        raise TimeoutError(errno.ETIMEDOUT, f"etcd did not answer within {timeout:g} s")

    async def publish_generations(self) -> None:
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

    async def watch_etcd(self) -> None:
        """Follower: learn of generations from etcd (a long-poll watch), not by polling NFS."""
        etcd = self.lease_store.etcd
        assert etcd is not None  # started only for a project on etcd
        revision = 0
        failing = False
        while True:
            if self.role == "writer":
                self._etcd_ok_at, revision = None, 0
                await self.keeper.wait_role_other_than("writer")
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
