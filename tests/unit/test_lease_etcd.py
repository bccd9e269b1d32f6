"""The etcd lease backend (safefs.lease.etcd_store) against a real etcd (tests/etcd_server.py).

Store level: N clients racing for the lease, release, expiry and takeover, fenced generations.
Keeper level, in real time: the holder renews by keepalive, and fences itself before its etcd
lease's TTL could have run out when etcd stops answering (paused or gone).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from safefs.clock import SystemClock
from safefs.config import LeaseTimings
from safefs.etcd import Client, EtcdError
from safefs.lease.etcd_store import EtcdLeaseStore
from safefs.lease.keeper import LeaseKeeper
from safefs.lease.model import EpochRecord
from safefs.lease.store import local_identity
from tests.etcd_server import EtcdServer, etcd_server, free_port  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(120)

TTL = 2.0  # etcd's shortest sensible TTL; tests wait on it, so keep it short


def store(server: EtcdServer, project: Path, prefix: str = "p", ttl: float = TTL) -> EtcdLeaseStore:
    return EtcdLeaseStore(project, Client([server.url], timeout=2.0), prefix, ttl)


def record(name: str) -> EpochRecord:
    return EpochRecord(1, "acquire", local_identity(name), LeaseTimings())


def test_race_of_many_clients_has_exactly_one_winner_every_round(etcd_server: EtcdServer, tmp_path: Path) -> None:
    clients = [store(etcd_server, tmp_path) for _ in range(6)]
    epochs = []
    for _round in range(20):
        mine = [record(f"h{i}") for i in range(len(clients))]
        results: list[Any] = [None] * len(clients)
        barrier = threading.Barrier(len(clients))

        def claim(i: int) -> None:
            barrier.wait()
            try:
                results[i] = clients[i].claim(mine[i])
            except EtcdError as e:  # lost the race between reading and comparing: a loss too
                results[i] = e

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(clients))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        winners = [i for i, r in enumerate(results)
                   if isinstance(r, EpochRecord) and r.holder.nonce == mine[i].holder.nonce]
        assert len(winners) == 1, results
        (w,) = winners
        epoch = results[w].epoch
        # Every loser that got an answer was told the same holder and epoch.
        for r in results:
            if isinstance(r, EpochRecord):
                assert (r.epoch, r.holder.nonce) == (epoch, mine[w].holder.nonce)
        obs = clients[0].observe()
        assert (obs.epoch, obs.record.holder.nonce, obs.free) == (epoch, mine[w].holder.nonce, False)
        epochs.append(epoch)
        clients[w].release(epoch, b"")
        assert clients[0].observe().free
    assert epochs == sorted(set(epochs)), "the fencing token (create_revision) grows at every claim"


def test_release_frees_the_lease_for_a_plain_acquire(etcd_server: EtcdServer, tmp_path: Path) -> None:
    a, b = store(etcd_server, tmp_path), store(etcd_server, tmp_path)
    won = a.claim(record("a"))
    assert won.kind == "acquire"
    refused = b.claim(record("b"))
    assert refused.holder.host == "a" and refused.epoch == won.epoch
    assert not a.renew(won.epoch, b"")  # the keepalive lands: not superseded
    a.release(won.epoch, b"")
    assert b.observe().free
    second = b.claim(record("b"))
    assert second.holder.host == "b" and second.kind == "acquire" and second.epoch > won.epoch


def test_only_etcd_expiry_frees_a_silent_holder_and_the_next_claim_is_a_takeover(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    a, b = store(etcd_server, tmp_path), store(etcd_server, tmp_path)
    won = a.claim(record("a"))
    first = b.observe()
    assert not first.free and first.record.holder.host == "a"
    assert b.observe().heartbeat != first.heartbeat, "the model's T_break watch must never fire on etcd"
    assert b.pid_alive(999999) is True  # nobody judges the holder dead
    assert b.claim(record("b")).holder.host == "a"
    deadline = time.monotonic() + 15
    while not b.observe().free:
        assert time.monotonic() < deadline, "etcd did not expire the lease"
        time.sleep(0.2)
    assert a.renew(won.epoch, b"") is True, "a keepalive after expiry reports the lease gone"
    taken = b.claim(record("b"))
    assert taken.holder.host == "b" and taken.kind == "takeover"  # lock delay, quarantine follow
    assert not a.publish_generation(won.epoch, {"generation": 9}), "etcd refuses a fenced epoch"
    assert b.publish_generation(taken.epoch, {"generation": 1})
    assert b.read_generation()[0] == {"generation": 1}


def test_unreachable_etcd_is_a_quick_oserror(tmp_path: Path) -> None:
    dead = EtcdLeaseStore(tmp_path, Client([f"http://127.0.0.1:{free_port()}"], timeout=1.0), "p", TTL)
    started = time.monotonic()
    with pytest.raises(OSError):
        dead.observe()
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("fault", ["pause", "stop"])
async def test_holder_fences_itself_before_the_ttl_when_etcd_goes_silent(
    etcd_server: EtcdServer, tmp_path: Path, fault: str
) -> None:
    timings = LeaseTimings(renew=0.5, t_break=4.0, rho=0.05, epsilon=0.5, lock_delay=0.5, poll=0.5)
    inner = store(etcd_server, tmp_path, ttl=timings.t_break)
    sends: list[tuple[float, bool]] = []  # (send time of a keepalive, whether it succeeded)
    clock = SystemClock()

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        def renew(self, epoch: int, beat: bytes) -> bool:
            sent = clock.monotonic()
            superseded = inner.renew(epoch, beat)  # raises when etcd does not answer
            sends.append((sent, True))
            return superseded

    keeper = LeaseKeeper(Recording(), clock, timings, local_identity("w"), trio.CapacityLimiter(2))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        assert await nursery.start(keeper.run) == "writer"
        with trio.fail_after(10):
            while len(sends) < 3:
                await trio.sleep(0.1)
        (etcd_server.pause if fault == "pause" else etcd_server.stop)()
        with trio.fail_after(timings.t_break + 5):
            while keeper.writable():
                await trio.sleep(0.01)
        fenced_at = clock.monotonic()
        last_ok = max(t for t, ok in sends if ok)
        assert fenced_at < last_ok + timings.t_break, "read-only only after etcd could have expired the key"
        with trio.fail_after(5):  # the keeper's timer records the loss right after the deadline
            while keeper.statistics().state != "lost":
                await trio.sleep(0.01)
        if fault == "pause":
            etcd_server.resume()
        else:
            etcd_server.start()
        await trio.sleep(2 * timings.renew)
        assert not keeper.writable(), "a lost lease stays lost when etcd answers again"
        nursery.cancel_scope.cancel()


def test_a_generation_too_big_for_etcd_is_published_as_all(etcd_server: EtcdServer, tmp_path: Path) -> None:
    a = store(etcd_server, tmp_path)
    won = a.claim(record("a"))
    changed = [f"dir-{i:05d}/" + "x" * 100 for i in range(5000)]  # about 550 KiB of JSON
    assert a.publish_generation(won.epoch, {"epoch": won.epoch, "generation": 1, "all": False, "changed": changed})
    got, _ = a.read_generation()
    assert got["all"] is True and got["changed"] == [] and got["generation"] == 1
    assert 0 < a.describe()["expires_in"] <= TTL
