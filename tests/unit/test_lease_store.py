"""The lease stores (safefs.lease.store): the directory backend on a real filesystem, and the
in-memory twin held to the same behaviour.

The directory tests run on tmp_path, a local filesystem: they check the protocol's use of
link(), inodes and modes, not NFS caching (research/lease.md section 6: no NFS client here).
"""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from safefs.config import LeaseTimings
from safefs.lease.model import CorruptLease, EpochRecord, Identity, Observation
from safefs.lease.store import DirLeaseStore, LeaseStore, local_identity
from tests.doubles import MemoryLeaseStore, simulated_identity

pytestmark = pytest.mark.timeout(60)

T = LeaseTimings()


def rec(epoch: int, identity: Identity, kind: str = "acquire") -> EpochRecord:
    return EpochRecord(epoch, kind, identity, T)  # type: ignore[arg-type]


@pytest.fixture(params=["dir", "memory"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> LeaseStore:
    return DirLeaseStore(tmp_path) if request.param == "dir" else MemoryLeaseStore()


def test_an_empty_project_has_a_free_lease(any_store: LeaseStore) -> None:
    assert any_store.observe() == Observation(0, None, False, None)
    assert any_store.observe().free


def test_claim_renew_release_as_seen_by_an_observer(any_store: LeaseStore) -> None:
    a, b = simulated_identity("a"), simulated_identity("b")
    assert any_store.claim(rec(1, a)) == rec(1, a)
    obs = any_store.observe()
    assert (obs.epoch, obs.record, obs.released, obs.heartbeat) == (1, rec(1, a), False, None)
    assert any_store.claim(rec(1, b)) == rec(1, a)  # taken: the loser learns who won

    assert any_store.renew(1, b"00000000000000000001 n\n") is False
    first = any_store.observe().heartbeat
    assert first is not None and first.content == b"00000000000000000001 n\n"
    assert any_store.renew(1, b"00000000000000000002 n\n") is False
    second = any_store.observe().heartbeat
    assert second is not None and second != first

    any_store.release(1, b'{"epoch": 1}\n')
    any_store.release(1, b'{"epoch": 1}\n')  # twice is fine (a retried release)
    assert any_store.observe().released and any_store.observe().free
    assert any_store.claim(rec(2, b)) == rec(2, b)
    assert any_store.renew(1, b"00000000000000000003 n\n") is True  # epoch 1 was superseded
    obs = any_store.observe()
    assert (obs.epoch, obs.released, obs.heartbeat) == (2, False, None)


def test_quarantine_moves_old_staging_entries_one_by_one(any_store: LeaseStore, tmp_path: Path) -> None:
    staged = {"1": ["x", "y"], "2": ["z"], "3": ["mine"]}
    if isinstance(any_store, MemoryLeaseStore):
        for epoch, names in staged.items():
            for name in names:
                any_store.put(f"staging/{epoch}/{name}", b"data")
    else:
        for epoch, names in staged.items():
            (tmp_path / ".safefs" / "staging" / epoch).mkdir(parents=True)
            for name in names:
                (tmp_path / ".safefs" / "staging" / epoch / name).write_bytes(b"data")
    assert any_store.quarantine(2) == 3
    assert any_store.quarantine(2) == 0
    if isinstance(any_store, MemoryLeaseStore):
        assert any_store.names("staging/") == ["staging/3/mine"]
        assert any_store.names("quarantine/") == ["quarantine/1/x", "quarantine/1/y", "quarantine/2/z"]
    else:
        root = tmp_path / ".safefs"
        assert sorted(p.name for p in (root / "staging").rglob("*") if p.is_file()) == ["mine"]
        quarantine = root / "quarantine"
        assert sorted(str(p.relative_to(quarantine)) for p in quarantine.rglob("*") if p.is_file()) == [
            "1/x",
            "1/y",
            "2/z",
        ]


def test_pid_alive_answers_for_this_host(any_store: LeaseStore) -> None:
    assert any_store.pid_alive(os.getpid())
    if isinstance(any_store, DirLeaseStore):
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        assert not any_store.pid_alive(child.pid)
    else:
        assert isinstance(any_store, MemoryLeaseStore)
        any_store.kill(4242)
        assert not any_store.pid_alive(4242) and any_store.connect().pid_alive(4242)


def test_epoch_and_released_files_are_never_removed_and_temp_files_are(tmp_path: Path) -> None:
    store = DirLeaseStore(tmp_path)
    a, b = simulated_identity("a"), simulated_identity("b")
    for epoch in range(1, 6):
        store.claim(rec(epoch, a if epoch % 2 else b))
        store.claim(rec(epoch, b if epoch % 2 else a))  # the loser's attempt
        store.renew(epoch, b"1\n")
        store.release(epoch, b"{}\n")
    lease = tmp_path / ".safefs" / "lease"
    names = sorted(p.name for p in lease.iterdir())
    assert names == sorted(
        [f"epoch.{n:012d}" for n in range(1, 6)]
        + [f"hb.{n:012d}" for n in range(1, 6)]
        + [f"released.{n:012d}" for n in range(1, 6)]
        + ["tmp"]
    )
    assert list((lease / "tmp").iterdir()) == []


def test_a_retransmitted_link_that_reports_eexist_but_landed_is_won(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DirLeaseStore(tmp_path)
    real_link = os.link

    def link_then_lose_the_reply(src: Any, dst: Any, **kw: Any) -> None:
        real_link(src, dst, **kw)
        raise FileExistsError(17, "File exists (the reply to the first LINK was lost)")

    monkeypatch.setattr(os, "link", link_then_lose_the_reply)
    mine = rec(1, simulated_identity("a"))
    assert store.claim(mine) == mine
    monkeypatch.setattr(os, "link", real_link)
    assert store.claim(rec(1, simulated_identity("b"))) == mine  # and anyone else loses it


def test_a_retransmitted_claim_of_an_earlier_attempt_of_ours_is_recognised_by_nonce(tmp_path: Path) -> None:
    store = DirLeaseStore(tmp_path)
    me = simulated_identity("a")
    earlier = rec(1, me)
    store.claim(earlier)  # say, a claim abandoned when its caller was cancelled
    assert store.claim(rec(1, me)).holder.nonce == me.nonce


def test_lease_files_are_readable_by_everyone_whatever_the_umask(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    os.chmod(project, 0o2775)  # a group-shared project: setgid, group-writable
    store = DirLeaseStore(project)
    (project / ".safefs" / "staging" / "1").mkdir(parents=True)
    (project / ".safefs" / "staging" / "1" / "f").write_bytes(b"")
    old = os.umask(0o077)
    try:
        store.claim(rec(1, simulated_identity("a")))
        store.renew(1, b"1\n")
        store.release(1, b"{}\n")
        store.claim(rec(2, simulated_identity("b"), "takeover"))
        store.renew(2, b"1\n")
        store.quarantine(1)
    finally:
        os.umask(old)
    root = project / ".safefs"
    leases = [root / "lease" / name for name in os.listdir(root / "lease")]
    for path in leases + [root / "quarantine", root / "quarantine" / "1"]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if path.is_dir():
            assert mode == 0o2775, (path, oct(mode))
        else:
            assert mode == 0o644, (path, oct(mode))


def test_plain_project_gives_0755_directories(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    old = os.umask(0o077)
    try:
        DirLeaseStore(tmp_path).claim(rec(1, simulated_identity("a")))
    finally:
        os.umask(old)
    for path in (tmp_path / ".safefs", tmp_path / ".safefs" / "lease", tmp_path / ".safefs" / "lease" / "tmp"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o755


def test_a_record_safefs_did_not_write_is_refused(tmp_path: Path) -> None:
    lease = tmp_path / ".safefs" / "lease"
    lease.mkdir(parents=True)
    (lease / "epoch.000000000001").write_bytes(b"not json")
    with pytest.raises(CorruptLease):
        DirLeaseStore(tmp_path).observe()


def test_epochs_beyond_the_listing_are_found_by_probing(tmp_path: Path) -> None:
    store = DirLeaseStore(tmp_path)
    for epoch in (1, 2, 3):
        store.claim(rec(epoch, simulated_identity("a")))
    # Names that are not exactly ours do not count as epochs.
    (tmp_path / ".safefs" / "lease" / "epoch.9").write_bytes(b"")
    (tmp_path / ".safefs" / "lease" / "epoch.000000000099.bak").write_bytes(b"")
    assert store.observe().epoch == 3


def test_local_identity_describes_this_process() -> None:
    me = local_identity("test-host")
    assert me.host == "test-host" and me.pid == os.getpid() and me.uid == os.getuid()
    assert me.pidns == os.stat("/proc/self/ns/pid").st_ino and me.boot_id
    assert me.shares_pid_space(local_identity()) and me.nonce != local_identity().nonce


# -- several processes racing for the same epoch ----------------------------------------------------

ROUNDS = 20
RACERS = 8


def _racer(base: str, index: int, barrier: Any, results: Any) -> None:
    """One process of the race: each round, on a fresh project, observe and claim if free."""
    me = simulated_identity(f"racer{index}")
    for round_ in range(ROUNDS):
        store = DirLeaseStore(Path(base) / f"round{round_}")
        barrier.wait(timeout=30)
        obs = store.observe()
        won = obs.free and store.claim(rec(obs.epoch + 1, me)).holder.nonce == me.nonce
        results.put((round_, me.nonce, obs.free, won))


@pytest.fixture
def spawn() -> Iterator[Any]:
    yield multiprocessing.get_context("spawn")


def test_racing_processes_elect_exactly_one_winner_per_round(tmp_path: Path, spawn: Any) -> None:
    for round_ in range(ROUNDS):
        (tmp_path / f"round{round_}").mkdir()
    barrier = spawn.Barrier(RACERS)
    results = spawn.Queue()
    procs = [spawn.Process(target=_racer, args=(str(tmp_path), i, barrier, results)) for i in range(RACERS)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=30) for _ in range(ROUNDS * RACERS)]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    contested = 0
    for round_ in range(ROUNDS):
        winners = [nonce for r, nonce, _, won in outcomes if r == round_ and won]
        assert len(winners) == 1, f"round {round_}: {len(winners)} winners"
        contested += sum(free for r, _, free, _ in outcomes if r == round_) > 1
        obs = DirLeaseStore(tmp_path / f"round{round_}").observe()
        assert obs.epoch == 1 and obs.record is not None and obs.record.holder.nonce == winners[0]
    assert contested, "no round had two processes claiming at once: the race was not exercised"
