"""LeaseKeeper (safefs.lease.keeper): simulated hosts sharing one in-memory project.

Each `Host` is one mount: its own connection to a MemoryProject (so its own faults, i.e. its
own partition), its own identity and clock. Store calls run inline and time is trio's
MockClock (autojump), so every test is deterministic and takes no real time. A `crash` is a
cancel: the keeper stops without releasing, as under kill -9.

The `one_writer` monitor checks DESIGN.md G1 at every tenth of a second of every test: at no
instant are two keepers writable, counting a crashed one, whose writable() still answers from
its deadline (that is what a SIGSTOPped process would see when resumed).
"""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from safefs.clock import SystemClock
from safefs.config import LeaseTimings
from safefs.errors import BackingFailed, LeaseHeldElsewhere, LeaseLost, ReadOnly
from safefs.lease.keeper import LeaseKeeper
from safefs.lease.model import EpochRecord, Identity
from safefs.lease.store import DirLeaseStore
from tests.doubles import InlineRunner, MemoryLeaseStore, TrioClock, simulated_identity

pytestmark = [pytest.mark.trio, pytest.mark.timeout(60)]

T = LeaseTimings(renew=1.0, t_break=12.0, rho=0.05, epsilon=2.0, lock_delay=3.0, poll=1.0)
BUDGET = T.holder_budget()  # 9.4 s
EPS = 1e-6  # float noise of sums of sleeps
WALL0 = 1_700_000_000.0  # TrioClock's default wall time at trio time 0


class Host:
    """One simulated mount of the project."""

    def __init__(
        self,
        project: MemoryLeaseStore,
        name: str,
        *,
        clock: TrioClock | None = None,
        identity: Identity | None = None,
        want_write: bool = True,
        jitter: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.name = name
        self.store = project.connect()
        self.identity = identity or simulated_identity(name)
        self.keeper = LeaseKeeper(
            self.store,
            clock or TrioClock(),
            T,
            self.identity,
            trio.CapacityLimiter(1),
            want_write=want_write,
            runner=InlineRunner(self.store, jitter=jitter, seed=seed),
        )
        self._scope = trio.CancelScope()
        self.dead = False  # its process is gone (not merely stopped): it can never write again

    async def start(self, nursery: trio.Nursery) -> str:
        role: str = await nursery.start(self._run)
        return role

    async def _run(self, *, task_status: trio.TaskStatus[str]) -> None:
        with self._scope:
            await self.keeper.run(task_status=task_status)

    def crash(self) -> None:
        self._scope.cancel()

    def die(self) -> None:
        """A crash whose process is gone for good: its keeper's state no longer means anything."""
        self.crash()
        self.dead = True


@pytest.fixture
def project() -> MemoryLeaseStore:
    return MemoryLeaseStore()


async def one_writer(hosts: list[Host], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    task_status.started()
    while True:
        writers = [h.name for h in hosts if not h.dead and h.keeper.writable()]
        assert len(writers) <= 1, f"two writers at t={trio.current_time():.2f}: {writers}"
        await trio.sleep(0.1)


async def wait_role(host: Host, role: str, *, within: float) -> float:
    """Wait until `host` has `role`; return the time it got it."""
    with trio.fail_after(within):
        while host.keeper.role != role:
            await trio.sleep(0.05)
    return trio.current_time()


def epochs(project: MemoryLeaseStore) -> list[str]:
    return project.names("lease/epoch.")


def record(project: MemoryLeaseStore, epoch: int) -> EpochRecord:
    return EpochRecord.from_bytes(project.read(f"lease/epoch.{epoch:012d}"))


def claimed_at(project: MemoryLeaseStore, epoch: int) -> float:
    """When `epoch` was claimed, in trio time (TrioClock's wall time is WALL0 + trio time)."""
    return record(project, epoch).holder.since - WALL0


@pytest.mark.parametrize("seed", range(20))
async def test_keepers_racing_for_a_free_lease_elect_exactly_one(
    seed: int, project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    hosts = [Host(project, f"h{i}", jitter=0.05, seed=seed * 100 + i) for i in range(5)]
    roles: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(one_writer, hosts)

        async def start(host: Host) -> None:
            roles.append(await host.start(nursery))

        async with trio.open_nursery() as starters:
            for host in hosts:
                starters.start_soon(start, host)
        assert sorted(roles) == ["follower"] * 4 + ["writer"]
        (winner,) = [h for h in hosts if h.keeper.role == "writer"]
        assert winner.keeper.writable() and winner.keeper.epoch == 1
        assert epochs(project) == ["lease/epoch.000000000001"]
        assert record(project, 1).holder.nonce == winner.identity.nonce
        for host in hosts:
            if host is not winner:
                with pytest.raises(LeaseHeldElsewhere, match=f"@{winner.name} "):
                    host.keeper.require_writable()
        await trio.sleep(3 * T.t_break)  # and it stays that way
        assert winner.keeper.writable() and epochs(project) == ["lease/epoch.000000000001"]
        nursery.cancel_scope.cancel()


async def test_renewal_keeps_the_lease_and_followers_see_the_heartbeat(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = Host(project, "a"), Host(project, "b")
    async with trio.open_nursery() as nursery:
        assert await a.start(nursery) == "writer"
        assert await b.start(nursery) == "follower"
        await nursery.start(one_writer, [a, b])
        for _ in range(100):
            await trio.sleep(T.t_break / 10)
            assert a.keeper.writable() and b.keeper.role == "follower"
            assert 0 < a.keeper.statistics().deadline <= BUDGET
            holder = b.keeper.statistics().holder
            assert holder is not None and holder.host == "a" and holder.heartbeat_age is not None
            assert holder.heartbeat_age <= T.renew + T.poll
        assert epochs(project) == ["lease/epoch.000000000001"]
        nursery.cancel_scope.cancel()


async def test_clean_release_lets_another_mount_write_at_once(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = Host(project, "a"), Host(project, "b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        await nursery.start(one_writer, [a, b])
        await trio.sleep(5.0)
        released_at = trio.current_time()
        await a.keeper.release()
        assert not a.keeper.writable() and a.keeper.role == "follower"
        # b wanted the lease all along: it takes it at its next poll, with no wait and no lock delay.
        with trio.fail_after(T.poll + 0.5):
            assert await b.keeper.acquire(wait=True) == 2
        assert trio.current_time() - released_at <= T.poll
        assert record(project, 2).kind == "acquire"
        assert project.names("lease/released.") == ["lease/released.000000000001"]
        await trio.sleep(T.poll + 0.1)  # a learns who took over at its next poll
        with pytest.raises(LeaseHeldElsewhere, match="@b "):
            a.keeper.require_writable()
        with pytest.raises(LeaseHeldElsewhere, match="@b "):
            await a.keeper.acquire(wait=False)
        await trio.sleep(2 * T.t_break)
        assert b.keeper.writable() and a.keeper.role == "follower"  # a released: it does not come back
        await b.keeper.release()
        with trio.fail_after(T.poll + 0.5):
            assert await a.keeper.acquire(wait=True) == 3
        nursery.cancel_scope.cancel()


async def test_takeover_of_a_crashed_holder_after_t_break_then_lock_delay_and_quarantine(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = Host(project, "a"), Host(project, "b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        await nursery.start(one_writer, [a, b])
        project.put("staging/1/new-file", b"half-published")
        await trio.sleep(5.0)
        a.crash()
        crashed_at = trio.current_time()
        await wait_role(b, "writer", within=T.t_break + 2 * T.poll + 1)
        # It watched a heartbeat that moved at most one renewal interval before the crash.
        assert claimed_at(project, 2) - crashed_at >= T.t_break - T.renew - EPS
        # Its cache takes writes at once; the project only after the lock delay.
        assert b.keeper.writable() and b.keeper.require_writable() == 2
        assert await b.keeper.acquire(wait=False) == 2
        assert not b.keeper.publishable()
        with pytest.raises(ReadOnly, match="epoch 2"):
            b.keeper.require_publishable()
        until = b.keeper.statistics().publishing_from
        assert until == pytest.approx(claimed_at(project, 2) + WALL0 + T.lock_delay, abs=0.5)
        with trio.fail_after(T.lock_delay + 0.5):
            assert await b.keeper.wait_publishable() == 2
        assert trio.current_time() - claimed_at(project, 2) >= T.lock_delay - EPS
        assert b.keeper.require_publishable() == 2 and b.keeper.statistics().publishing_from is None
        assert record(project, 2).kind == "takeover"
        assert project.names("staging/") == [] and project.names("quarantine/") == ["quarantine/1/new-file"]
        nursery.cancel_scope.cancel()


async def test_a_failed_poll_restarts_the_observers_wait(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = Host(project, "a"), Host(project, "b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        await nursery.start(one_writer, [a, b])
        a.crash()
        await trio.sleep(T.t_break - 2)
        b.store.fail("observe")  # b is cut off from the project for a moment
        await trio.sleep(1.5)
        b.store.heal()
        healed_at = trio.current_time()
        assert b.keeper.statistics().last_error is not None or b.keeper.role == "follower"
        await wait_role(b, "writer", within=T.t_break + 2 * T.poll + 1)
        assert claimed_at(project, 2) - healed_at >= T.t_break - EPS
        nursery.cancel_scope.cancel()


async def test_a_slow_observer_never_counts_its_slow_polls(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = Host(project, "a"), Host(project, "b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        a.crash()
        b.store.slow(T.poll * 1.5, "observe")  # every poll takes longer than P: none counts
        await trio.sleep(5 * T.t_break)
        assert b.keeper.role == "follower" and epochs(project) == ["lease/epoch.000000000001"]
        b.store.heal()
        await wait_role(b, "writer", within=T.t_break + 2 * T.poll + 1)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "differs, immediate",
    [({}, True), ({"pidns": 99}, False), ({"boot_id": "rebooted"}, False)],
    ids=["same-pid-space", "other-pid-namespace", "other-boot"],
)
async def test_a_dead_process_on_this_machine_and_boot_is_taken_over_at_once(
    differs: dict[str, Any], immediate: bool, project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a = Host(project, "a", identity=simulated_identity("box", pid=111))
    b_identity = dataclasses.replace(a.identity, pid=222, nonce="b-nonce", **differs)
    b = Host(project, "b", identity=b_identity)
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        await nursery.start(one_writer, [a, b])
        await trio.sleep(3.0)
        a.die()
        crashed_at = trio.current_time()
        b.store.kill(111)  # on b's host, pid 111 is gone
        if immediate:
            await wait_role(b, "writer", within=T.poll + 0.5)
            assert await b.keeper.acquire(wait=True) == 2
            assert claimed_at(project, 2) - crashed_at <= T.poll
            # No lock delay: no request of a dead process of this host can land after ours.
            with trio.fail_after(T.renew):  # only the quarantine step, at once
                assert await b.keeper.wait_publishable() == 2
            assert trio.current_time() - claimed_at(project, 2) < T.lock_delay
        else:
            await wait_role(b, "writer", within=T.t_break + 2 * T.poll + 1)
            assert claimed_at(project, 2) - crashed_at >= T.t_break - T.renew - EPS
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("fault", ["hang", "fail"])
async def test_the_holder_fences_itself_at_its_deadline_when_the_store_hangs_or_fails(
    fault: str, project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = Host(project, "a"), Host(project, "b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        await nursery.start(one_writer, [a, b])
        await trio.sleep(4.5)
        getattr(a.store, fault)()  # every call of a's: hangs for ever, or fails with EIO
        cut_at = trio.current_time()
        with trio.fail_after(BUDGET + 1):
            await a.keeper.wait_lost()
        lost_at = trio.current_time()
        # The last renewal that worked started at most R before the cut; the deadline is exact.
        assert cut_at - T.renew + BUDGET - EPS <= lost_at <= cut_at + BUDGET + EPS
        assert not a.keeper.writable()
        with pytest.raises(LeaseLost, match="epoch 1"):
            a.keeper.require_writable()
        assert a.keeper.statistics().state == "lost"
        await wait_role(b, "writer", within=T.t_break + 2 * T.poll + 1)
        assert await b.keeper.acquire(wait=True) == 2
        # a's stuck renewal lands at last: a stays fenced, and does not come back by itself.
        a.store.heal()
        await trio.sleep(2 * T.t_break)
        assert not a.keeper.writable() and a.keeper.statistics().state == "lost"
        assert b.keeper.writable()
        nursery.cancel_scope.cancel()


async def test_a_holder_partitioned_for_good_never_returns_from_a_hung_call(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a = Host(project, "a")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        a.store.hang()
        await trio.sleep(BUDGET + 0.01)
        assert not a.keeper.writable() and a.keeper.statistics().state == "lost"
        nursery.cancel_scope.cancel()  # cancelling a keeper stuck in a hung call works


async def test_a_holder_superseded_behind_its_back_stops_at_its_next_renewal(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a = Host(project, "a")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await trio.sleep(2.5)
        # An admin's forced break, or an observer with a badly wrong clock rate: epoch 2 exists.
        project.connect().claim(EpochRecord(2, "takeover", simulated_identity("admin"), T))
        broken_at = trio.current_time()
        with trio.fail_after(T.renew + 0.01):
            await a.keeper.wait_lost()
        assert trio.current_time() - broken_at <= T.renew
        with pytest.raises(LeaseLost, match="epoch 2 was claimed"):
            a.keeper.require_writable()
        nursery.cancel_scope.cancel()


async def test_a_failed_release_leaves_the_mount_read_only_until_retried(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a = Host(project, "a")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        a.store.fail("release")
        with pytest.raises(BackingFailed, match="could not release"):
            await a.keeper.release()
        assert not a.keeper.writable() and a.keeper.role == "writer"  # holding, not writing
        with pytest.raises(ReadOnly, match="releasing"):
            await a.keeper.acquire(wait=True)
        await trio.sleep(3 * T.t_break)  # it keeps renewing meanwhile
        assert a.keeper.statistics().state == "releasing"
        a.store.heal()
        await a.keeper.release()
        assert project.names("lease/released.") == ["lease/released.000000000001"]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("offset", [-600.0, 600.0, 86400.0 * 3])
async def test_an_observer_whose_wall_clock_is_off_never_takes_over_early(
    offset: float, project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a = Host(project, "a")
    b = Host(project, "b", clock=TrioClock(wall_offset=WALL0 + offset))
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        await nursery.start(one_writer, [a, b])
        await trio.sleep(10 * T.t_break)
        assert a.keeper.writable() and b.keeper.role == "follower"
        assert epochs(project) == ["lease/epoch.000000000001"]
        assert b.keeper.statistics().holder.since == record(project, 1).holder.since  # shown, not used
        nursery.cancel_scope.cancel()


async def test_an_observer_whose_clock_runs_fast_within_rho_still_waits_for_the_fence(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a = Host(project, "a")
    b = Host(project, "b", clock=TrioClock(rate=1 + T.rho))
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        await nursery.start(one_writer, [a, b])
        await trio.sleep(2.0)
        a.store.hang()
        await wait_role(b, "writer", within=T.t_break + 2 * T.poll + 1)
        assert a.keeper.statistics().state == "lost"
        nursery.cancel_scope.cancel()


async def test_acquire_without_wait_refuses_a_held_lease_and_changes_nothing(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a, b = Host(project, "a"), Host(project, "b", want_write=False)
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        with pytest.raises(LeaseHeldElsewhere, match="@a "):
            await b.keeper.acquire(wait=False)
        a.crash()
        await trio.sleep(3 * T.t_break)
        assert b.keeper.role == "follower"  # b did not want the lease: no takeover
        with trio.fail_after(T.t_break + 2 * T.poll + T.lock_delay + 1):
            assert await b.keeper.acquire(wait=True) == 2
        nursery.cancel_scope.cancel()


async def test_a_keeper_that_cannot_read_the_lease_at_start_fails_clearly(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a = Host(project, "a")
    a.store.fail("observe", errno=errno.ESTALE)
    async with trio.open_nursery() as nursery:
        with pytest.raises(BackingFailed, match="cannot read the lease"):
            await a.start(nursery)


# -- on the real store, with threads and the real clock -------------------------------------------

# Fast renewals and polls, but a 2.35 s budget: a loaded machine must not fail this test.
REAL = LeaseTimings(renew=0.05, t_break=3.0, rho=0.05, epsilon=0.5, lock_delay=0.1, poll=0.05)


@pytest.mark.timeout(30)
async def test_keepers_on_the_directory_store_hand_over_through_worker_threads(tmp_path: Path) -> None:
    limiter = trio.CapacityLimiter(2)
    a = LeaseKeeper(DirLeaseStore(tmp_path), SystemClock(), REAL, simulated_identity("a"), limiter)
    b = LeaseKeeper(DirLeaseStore(tmp_path), SystemClock(), REAL, simulated_identity("b"), limiter)
    async with trio.open_nursery() as nursery:
        assert await nursery.start(a.run) == "writer"
        assert await nursery.start(b.run) == "follower"
        await trio.sleep(0.5)  # ten renewal intervals, on real threads
        assert a.writable() and b.role == "follower"
        await a.release()
        with trio.fail_after(5):
            assert await b.acquire(wait=True) == 2
        assert not a.writable()
        nursery.cancel_scope.cancel()
    lease = tmp_path / ".safefs" / "lease"
    names = sorted(p.name for p in lease.iterdir())
    assert names == [
        "epoch.000000000001",
        "epoch.000000000002",
        "hb.000000000001",
        "hb.000000000002",
        "released.000000000001",
        "tmp",
    ]
    assert list((lease / "tmp").iterdir()) == []
    assert b.statistics().holder.host == "b" and 0 < b.statistics().deadline <= REAL.holder_budget()
    statistics = b.statistics()  # a snapshot (trio style), typed and frozen: not the keeper's state
    with pytest.raises(dataclasses.FrozenInstanceError):
        statistics.role = "follower"  # type: ignore[misc]


async def test_role_listeners_hear_every_change_of_role_at_the_moment_it_happens(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    """The keeper is the one holder of the role: a listener hears the role at subscription,
    then each change synchronously, and what it hears always equals `keeper.role`."""
    a, b = Host(project, "a"), Host(project, "b")
    heard: dict[str, list[str]] = {"a": [], "b": []}

    def listen(host: Host) -> None:
        def listener(role: str) -> None:
            assert role == host.keeper.role  # told at the change, not after
            heard[host.name].append(role)

        host.keeper.on_role(listener)

    def failing(role: str) -> None:
        raise RuntimeError("a buggy subscriber")

    listen(a)
    b.keeper.on_role(failing)  # logged and ignored: the lease and the other listeners go on
    listen(b)
    assert heard == {"a": ["follower"], "b": ["follower"]}
    async with trio.open_nursery() as nursery:
        assert await a.start(nursery) == "writer"
        assert await b.start(nursery) == "follower"
        assert heard == {"a": ["follower", "writer"], "b": ["follower"]}
        await trio.sleep(5.0)
        await a.keeper.release()
        assert heard["a"] == ["follower", "writer", "follower"]  # before release() returned
        with trio.fail_after(T.poll + 0.5):
            await b.keeper.acquire(wait=True)
        assert heard["b"] == ["follower", "writer"]
        b.store.hang()  # b fences itself at its deadline: the listener hears it then
        with trio.fail_after(BUDGET + 1):
            await b.keeper.wait_lost()
        assert heard["b"] == ["follower", "writer", "follower"]
        assert heard["a"] == ["follower", "writer", "follower"]  # nothing heard without a change
        nursery.cancel_scope.cancel()


async def test_waiting_for_the_role_to_change_returns_at_the_change(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a = Host(project, "a")
    async with trio.open_nursery() as nursery:
        assert await a.start(nursery) == "writer"
        with trio.fail_after(0.01):
            await a.keeper.wait_role_other_than("follower")  # it is not: at once
        returned_at: list[float] = []

        async def waiter() -> None:
            await a.keeper.wait_role_other_than("writer")
            returned_at.append(trio.current_time())

        nursery.start_soon(waiter)
        await trio.sleep(3 * T.t_break)  # renewals wake the keeper's waiters; the role stays
        assert returned_at == []
        released_at = trio.current_time()
        await a.keeper.release()
        await trio.sleep(0.01)
        assert returned_at == [released_at]
        nursery.cancel_scope.cancel()


async def test_a_role_listener_hears_of_the_lease_when_the_claim_lands_not_after_the_first_heartbeat(
    project: MemoryLeaseStore, autojump_clock: trio.testing.MockClock
) -> None:
    a = Host(project, "a")
    heard: list[str] = []
    a.keeper.on_role(heard.append)
    a.store.hang("renew")  # the first heartbeat hangs until the deadline
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.start, nursery)
        await trio.sleep(0.5)
        assert a.keeper.role == "writer" and heard == ["follower", "writer"]
        nursery.cancel_scope.cancel()
