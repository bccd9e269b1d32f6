"""The lease as a trio service: acquires, renews or watches, and fences itself on time.

Invariants:
- Every decision is lease.model.LeaseMachine's; this module feeds it observations and results
  and carries out its actions (claim, renew, quarantine, release).
- Two questions: `require_writable()` (may the cache take a change? yes at once after a
  takeover) and `require_publishable()` (may the project be changed? only after the lock
  delay). The flusher asks the second, also from its worker thread right before each call
  into the project (`publishable()` only reads, so any thread may call it).
- Self-fencing does not depend on any store call returning. `writable()` compares the
  machine's deadline with `clock.monotonic()` on every call, and `_timer` wakes at the deadline
  to mark the lease LOST and wake `wait_lost()`, even while a renewal hangs in NFS forever.
- Store calls block; they run in worker threads behind the "lease" CapacityLimiter and are
  abandoned on cancellation. That is safe: a renewal that lands late only makes observers wait
  longer, a claim that lands unseen looks like a crashed holder, a late read is discarded.
- The role ("writer" or "follower", `LeaseMachine.role`) lives here and nowhere else. Whoever
  acts on it (the filesystem, the kernel-cache policy, the daemon) subscribes with
  `on_role(listener)`: the listener is called once at once with the current role, then
  synchronously, on the trio thread, at the moment the role changes, before any other task
  runs (`_tell_role`: right after a claim lands, before the first heartbeat, and in `_notify`,
  which every other change of the machine's state goes through). Listeners must not block or
  await; one that needs I/O sets an event for its own task. Nobody polls the role or keeps a
  copy that could disagree with it; `role` and `statistics()` read it.
- Time is read only from the injected Clock, and waiting uses trio.sleep/move_on_after with
  durations computed from it: with trio's MockClock and a clock on trio's time (tests/doubles.py)
  tests run in virtual time.

Threading: every method runs on the trio thread, except `publishable()`. Store steps (poll, claim, renew, release) are
serialised by one trio.Lock, so `acquire()`/`release()` never interleave with the main loop.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from safefs.clock import Clock
from safefs.config import LeaseTimings
from safefs.errors import BackingFailed
from safefs.lease.model import Claim, CorruptLease, Identity, LeaseMachine, State
from safefs.lease.store import LeaseStore

log = logging.getLogger(__name__)

T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]  # await runner(sync_fn, *args) -> sync_fn(*args)
EventHook = Callable[[str, int, str], None]  # on_event(kind, epoch, detail); see LeaseKeeper
RoleListener = Callable[[str], None]  # listener(role), role "writer" or "follower"; see on_role


@dataclasses.dataclass(frozen=True)
class HolderStatistics:
    """Who holds the write lease, as its record says."""

    host: str
    pid: int
    user: str
    since: float  # wall time it claimed its epoch; for humans only
    heartbeat_age: float | None  # seconds since its heartbeat last moved, as measured here


@dataclasses.dataclass(frozen=True)
class KeeperStatistics:
    """What `LeaseKeeper.statistics()` tells (trio style: a snapshot, no live state). The
    control handler converts it into the protocol's LeaseStatistics for `status`."""

    role: str
    state: str  # a lease.model.State value
    epoch: int
    writable: bool
    publishable: bool
    publishing_from: float | None  # wall time the lock delay ends, while it runs
    holder: HolderStatistics | None  # None: free or unknown
    deadline: float | None  # seconds left before we must stop writing, while holding
    lock_delay: float | None  # seconds of lock delay left, while holding
    lost_reason: str | None  # while the lease is LOST
    last_error: str | None


class LeaseKeeper:
    """Holds or watches one project's lease for one mount (DESIGN.md section 3).

    `want_write`: take the lease whenever it is free or its holder is dead. `release()` and a
    lost lease clear it; `acquire()` sets it. `runner` replaces the worker threads (tests).
    `on_event(kind, epoch, detail)` is told, on the trio thread, of "acquire", "takeover",
    "release" and "self-fence" (this mount lost the lease it held); it must not block, and an
    exception it raises is logged and ignored.
    """

    def __init__(
        self,
        store: LeaseStore,
        clock: Clock,
        timings: LeaseTimings,
        identity: Identity,
        limiter: trio.CapacityLimiter,
        *,
        want_write: bool = True,
        runner: Runner | None = None,
        on_event: EventHook | None = None,
        follow_if_unreachable: bool = False,
    ) -> None:
        self._store = store
        # Start as a follower (and keep trying) when the store cannot be read at start-up,
        # instead of failing the mount: for a lease service other than the project itself.
        self._follow_if_unreachable = follow_if_unreachable
        self._clock = clock
        self._timings = timings
        self._limiter = limiter
        self._runner = runner
        self._m = LeaseMachine(identity, timings, want_write=want_write)
        self._step_lock = trio.Lock()
        self._changed = trio.Event()  # set (and replaced) whenever the machine may have moved
        self._kick = trio.Event()  # wakes the main loop early (acquire, release)
        self._on_event = on_event
        self._told_lost: int | None = None  # the epoch whose loss on_event was told of
        self._role_listeners: list[RoleListener] = []
        self._told_role = self._m.role  # the role the listeners were last told of

    # -- the WriteGate the filesystem and flusher ask -----------------------------------------

    @property
    def epoch(self) -> int:
        return self._m.epoch

    @property
    def role(self) -> str:
        return self._m.role

    def on_role(self, listener: RoleListener) -> None:
        """Call `listener(role)` now with the current role, then at every change of it (on the
        trio thread, synchronously, in subscription order). It must not block; an exception
        it raises is logged and ignored."""
        self._role_listeners.append(listener)
        self._tell(listener, self._told_role)

    def writable(self) -> bool:
        return self._m.writable(self._clock.monotonic())

    def publishable(self) -> bool:
        """May the project be changed now? Reads only: safe from a worker thread (with a
        thread-safe clock, as SystemClock is)."""
        return self._m.publishable(self._clock.monotonic())

    def require_writable(self) -> int:
        """The epoch to stamp a change to the cache with; raises ReadOnly, LeaseLost or
        LeaseHeldElsewhere. After a takeover the cache takes changes at once."""
        return self._checked(self._m.check_writable)

    def require_publishable(self) -> int:
        """The epoch to change the project under; raises ReadOnly (also during the lock delay
        after a takeover), LeaseLost or LeaseHeldElsewhere."""
        return self._checked(self._m.check_publishable)

    def _checked(self, check: Callable[[float], int]) -> int:
        state = self._m.state
        try:
            return check(self._clock.monotonic())
        finally:
            if self._m.state is not state:
                self._notify()

    async def wait_publishable(self) -> int:
        """Wait out the lock delay after a takeover; return the epoch once the project may be
        changed. Raises the refusal if this mount is not (or no longer) the writer."""
        while not self.publishable():
            if self._m.state is not State.WRITER or not self.writable():
                raise self._m.refusal(self._clock.monotonic())
            await self._changed.wait()
        return self._m.epoch

    def publishing_from(self) -> float | None:
        """Wall time at which the lock delay after a takeover ends, while it runs; else None."""
        now = self._clock.monotonic()
        m = self._m
        if not m.holding or m.writable_from <= now:
            return None
        return self._clock.wall() + (m.writable_from - now)

    async def wait_role_other_than(self, role: str) -> None:
        """Return once the role is not `role` (at once if it is not already)."""
        while self._m.role == role:
            await self._changed.wait()

    async def wait_lost(self) -> None:
        """Return once this mount has lost the lease it held (a clean release does not count)."""
        while self._m.state is not State.LOST:
            await self._changed.wait()

    def statistics(self) -> KeeperStatistics:
        now = self._clock.monotonic()
        m = self._m
        holder = m.current_holder()  # our own record while we hold the lease
        return KeeperStatistics(
            role=m.role,
            state=m.state.value,
            epoch=m.epoch,
            writable=m.writable(now),
            publishable=m.publishable(now),
            publishing_from=self.publishing_from(),
            holder=None
            if holder is None
            else HolderStatistics(
                host=holder.host,
                pid=holder.pid,
                user=holder.user,
                since=holder.since,
                heartbeat_age=m.heartbeat_age(now),
            ),
            deadline=m.deadline - now if m.holding else None,
            lock_delay=max(0.0, m.writable_from - now) if m.holding else None,
            lost_reason=m.lost_reason if m.state is State.LOST else None,
            last_error=m.last_error,
        )

    # -- the service --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Take the lease if it is free (or its holder is dead on this host), else follow;
        report the role with `task_status.started(role)`, then renew or watch until cancelled."""
        # Outside the nursery, so that a failure reaches the caller of nursery.start() as itself,
        # not wrapped in an ExceptionGroup. writable() needs no timer to be right meanwhile.
        async with self._step_lock:
            try:
                await self._look(first=True)
            except BackingFailed as e:
                if not self._follow_if_unreachable:
                    raise
                log.warning("lease: %s; following read-only until it answers", e.message)
        log.info("lease: %s of %s, epoch %d", self._m.role, self._store, self._m.epoch)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._timer)
            task_status.started(self._m.role)
            await self._main_loop()

    async def acquire(self, *, wait: bool) -> int:
        """Become the writer; return the epoch once writable. After a takeover the cache takes
        writes at once; changes reach the project after the lock delay (`wait_publishable`).

        Without `wait`, a lease held by a live holder raises LeaseHeldElsewhere at once. With it,
        this waits until the holder releases, or dies and T_break passes.
        """
        if not self._m.holding:
            if wait:
                self._m.want_write = True
                self._kick.set()
            else:
                async with self._step_lock:
                    if not self._m.holding:
                        before = self._m.want_write
                        self._m.want_write = True
                        try:
                            await self._look(first=True)
                        finally:
                            if not self._m.holding:
                                self._m.want_write = before
                if not self._m.holding:
                    raise self._m.refusal(self._clock.monotonic())  # names the holder
        while not self.writable():
            # Lost or released meanwhile, or a release that failed half-way: it may have landed,
            # so this epoch must not write again; the caller retries release() first.
            if self._m.state is State.RELEASING or not (self._m.holding or self._m.want_write):
                raise self._m.refusal(self._clock.monotonic())
            await self._changed.wait()
        return self._m.epoch

    async def release(self) -> None:
        """Stop writing, then link released.N so another mount may take over at once; stay up as
        a follower. The caller has flushed and published everything first."""
        self._m.want_write = False
        async with self._step_lock:
            if not self._m.holding:
                return
            self._m.begin_release()  # not writable from here on, even if the link fails
            self._notify()
            epoch = self._m.epoch
            note = self._m.release_note(wall=self._clock.wall())
            try:
                await self._call(self._store.release, epoch, note)
            except OSError as e:
                self._m.last_error = f"release failed: {e}"
                raise BackingFailed(
                    f"could not release the lease (epoch {epoch}): {e}",
                    hint="the mount stays read-only and keeps renewing; retry `safefs sync --release`",
                ) from e
            if self._m.state is State.RELEASING:
                self._m.release_done()
                log.info("lease: released epoch %d", epoch)
                self._event("release", epoch, "")
            self._notify()
        self._kick.set()

    # -- internals ----------------------------------------------------------------------------

    async def _main_loop(self) -> None:
        while True:
            started = self._clock.monotonic()
            async with self._step_lock:
                if self._m.holding:
                    await self._hold()
                else:
                    await self._look(first=False)
            period = self._timings.renew if self._m.holding else self._timings.poll
            with trio.move_on_after(max(0.0, started + period - self._clock.monotonic())):
                await self._kick.wait()
            self._kick = trio.Event()

    async def _look(self, *, first: bool) -> None:
        """One poll of the lease directory, and the claim it may lead to.

        `first`: the caller needs an answer (start-up, acquire without waiting), so a failure
        raises BackingFailed and the call is not bounded; otherwise a failure or a poll longer
        than P only restarts the observer's wait.
        """
        m = self._m
        started = self._clock.monotonic()
        try:
            with trio.move_on_after(math.inf if first else self._timings.poll) as scope:
                obs = await self._call(self._store.observe)
            if scope.cancelled_caught:
                m.poll_failed(self._clock.monotonic(), f"reading the lease took over {self._timings.poll:g} s")
                return
            pid = m.pid_to_check(obs)
            start = obs.record.holder.start_time if obs.record is not None else 0
            alive = None if pid is None else await self._call(self._store.pid_alive, pid, start)
        except (OSError, CorruptLease) as e:
            m.poll_failed(self._clock.monotonic(), f"reading the lease failed: {e}")
            if first:
                raise BackingFailed(f"cannot read the lease of {self._store}: {e}") from e
            return
        claim = m.observed(obs, started=started, now=self._clock.monotonic(), holder_alive=alive)
        if claim is not None:
            await self._claim(claim, first=first)
        self._notify()

    async def _claim(self, claim: Claim, *, first: bool) -> None:
        m = self._m
        previous = m.current_holder()  # the holder taken over from, for on_event
        record = m.record_for(claim, wall=self._clock.wall())
        sent_at = self._clock.monotonic()
        try:
            winner = await self._call(self._store.claim, record)
        except (OSError, CorruptLease) as e:
            m.claim_failed(claim, sent_at=sent_at, error=f"claiming epoch {claim.epoch} failed: {e}")
            if first:
                raise BackingFailed(f"cannot claim the lease of {self._store}: {e}") from e
            return
        if m.claimed(winner, sent_at=sent_at, now=self._clock.monotonic(), claim=claim):
            kind = "takeover" if winner.kind == "takeover" else "acquire"
            log.info("lease: %s epoch %d", "took over" if kind == "takeover" else "acquired", m.epoch)
            detail = f"from {previous.describe()}" if kind == "takeover" and previous is not None else ""
            self._tell_role()
            self._event(kind, m.epoch, detail)
            await self._hold()  # the first heartbeat at once, so observers see a live holder
        else:
            log.info("lease: epoch %d went to %s", winner.epoch, winner.holder.describe())

    async def _hold(self) -> None:
        """One step of the holder: renew, and finish moving a taken-over epoch's staging aside."""
        await self._renew()
        if self._m.holding and self._m.quarantine_pending:
            await self._quarantine()

    async def _renew(self) -> None:
        m = self._m
        epoch, beat = m.epoch, m.next_beat()
        started = self._clock.monotonic()
        try:
            # Past the deadline the answer no longer matters: stop waiting for a hung call.
            with trio.move_on_at(self._trio_time_at(m.deadline)):
                superseded = await self._call(self._store.renew, epoch, beat)
                m.renewed(started=started, superseded=superseded, now=self._clock.monotonic())
        except OSError as e:
            log.warning("lease: renewing epoch %d failed: %s", epoch, e)
            m.renew_failed(self._clock.monotonic(), f"renewal failed: {e}")
        self._notify()

    async def _quarantine(self) -> None:
        try:
            moved = await self._call(self._store.quarantine, self._m.epoch - 1)
        except OSError as e:
            self._m.last_error = f"moving old staging files to quarantine failed: {e}"
            return
        if moved:
            log.warning("lease: moved %d staging files of earlier epochs to quarantine", moved)
        self._m.quarantined()
        self._notify()

    async def _timer(self) -> None:
        """Fences at the deadline and ends the lock delay, whatever the store calls are doing."""
        while True:
            now = self._clock.monotonic()
            if self._m.expire(now):
                log.warning("lease: lost epoch %d: %s; this mount is read-only now", self._m.epoch, self._m.lost_reason)
                self._notify()
            changed = self._changed
            wake = self._m.next_wakeup(now)
            if wake is None:
                await changed.wait()
                continue
            # Capped so that a host resumed from suspend (whose trio timers lagged the boot-time
            # clock) notices soon; writable() itself is right at once either way.
            with trio.move_on_after(min(max(0.0, wake - now), self._timings.renew)):
                await changed.wait()
            if not changed.is_set():
                self._notify()  # the lock delay may have ended: wake acquire() waiters

    def _trio_time_at(self, t: float) -> float:
        """The trio deadline for instant `t` of our clock (-inf and inf pass through)."""
        if math.isinf(t):
            return t
        return trio.current_time() + (t - self._clock.monotonic())

    def _event(self, kind: str, epoch: int, detail: str) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, epoch, detail)
        except Exception:  # noqa: BLE001 (a history record must never break the lease)
            log.exception("lease: the %s event hook failed", kind)

    def _tell(self, listener: RoleListener, role: str) -> None:
        try:
            listener(role)
        except Exception:  # noqa: BLE001 (a subscriber's bug must never break the lease)
            log.exception("lease: a role listener failed")

    def _tell_role(self) -> None:
        if self._m.role != self._told_role:
            self._told_role = self._m.role
            for listener in list(self._role_listeners):
                self._tell(listener, self._told_role)

    def _notify(self) -> None:
        if self._m.state is State.LOST and self._told_lost != self._m.lost_epoch:
            self._told_lost = self._m.lost_epoch  # self._m.epoch moves on to the newest epoch seen
            self._event("self-fence", self._m.lost_epoch, self._m.lost_reason or "")
        self._tell_role()
        self._changed.set()
        self._changed = trio.Event()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._runner is not None:
            result: T = await self._runner(fn, *args)
            return result
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self._limiter, abandon_on_cancel=True, thread_name=f"safefs lease {fn.__name__}"
        )
