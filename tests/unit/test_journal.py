"""The journal on real LMDB: round trips, deletes, the cache-dir lock, and kill -9 mid-commit.

The crash test runs a writer in a subprocess that commits batches in a tight loop and kills
it with SIGKILL at random moments. Every batch writes one counter value into several keys of
every table, so a torn transaction would show as keys that disagree; and the writer reports
each value after `commit` returned, so a lost acknowledged commit would show as a counter
that went backwards.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from safefs.errors import CacheBusy
from safefs.journal import Batch, Journal
from safefs.records import DIRTY, FORMAT, PRESENT, Create, InodeRecord, Link, Unlink

REPO = Path(__file__).resolve().parents[2]


def rec(size: int = 0, **changes: object) -> InodeRecord:
    base = InodeRecord(
        mode=0o100644, uid=0, gid=0, size=size, rdev=0, atime_ns=1, mtime_ns=2, ctime_ns=3,
        target=None, xattrs={}, origin=None, attr_dirty=False, new=True, listed=False, parent=0,
        blinks=(), publishing=None, low_size=None,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_commit_load_round_trip(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    try:
        root = rec(mode=0o40755, listed=True, parent=1)
        f = rec(12, xattrs={b"user.a": b"\x00\xff"}, blinks=((1, b"f"),), origin=(1, 2, 3, 4), publishing=(b"x",))
        j.commit(
            Batch(
                inodes={1: root, 7: f},
                extents={(7, PRESENT, 0): 12, (7, DIRTY, 0): 4, (7, DIRTY, 8): 12},
                dentries={(1, b"f"): 7, (1, b"\xff\xfename"): 7},
                ops={1: Create(1, b"f", 7), 2: Link(7, 1, b"\xff\xfename")},
                meta={"next_ino": 8, "next_seq": 3, "boot_id": "abc"},
            )
        )
        snap = j.load()
    finally:
        j.close()
    assert snap.inodes == {1: root, 7: f}
    assert snap.extents == {7: {PRESENT: [(0, 12)], DIRTY: [(0, 4), (8, 12)]}}
    assert sorted(snap.dentries) == [(1, b"f", 7), (1, b"\xff\xfename", 7)]
    assert snap.ops == [(1, Create(1, b"f", 7)), (2, Link(7, 1, b"\xff\xfename"))]
    assert snap.meta == {"format": FORMAT, "next_ino": 8, "next_seq": 3, "boot_id": "abc"}

    # And it is on disk, not only in this environment.
    j = Journal.open(tmp_path)
    try:
        again = j.load()
    finally:
        j.close()
    assert again == snap


def test_ops_load_in_sequence_order(tmp_path: Path) -> None:
    """Keys are big-endian, so op 256 comes after op 2 (not before, as with little-endian)."""
    j = Journal.open(tmp_path)
    try:
        j.commit(Batch(ops={256: Unlink(1, b"b", 2), 2: Unlink(1, b"a", 2), 1 << 40: Unlink(1, b"c", 2)}))
        assert [seq for seq, _ in j.load().ops] == [2, 256, 1 << 40]
    finally:
        j.close()


def test_none_deletes_and_overwrites(tmp_path: Path) -> None:
    j = Journal.open(tmp_path)
    try:
        j.commit(Batch(inodes={2: rec(1), 3: rec(1)}, dentries={(1, b"a"): 2, (1, b"b"): 3},
                       extents={(2, DIRTY, 0): 1, (3, DIRTY, 0): 1, (3, PRESENT, 5): 9},
                       ops={1: Unlink(1, b"x", 2), 2: Unlink(1, b"y", 3)}, meta={"k": 1}))  # fmt: skip
        # Deleting an inode deletes its extents; an extent goes alone with None.
        j.commit(Batch(inodes={2: None, 3: rec(2)}, dentries={(1, b"a"): None, (1, b"b"): 2},
                       extents={(3, DIRTY, 0): None}, ops={1: None}, meta={"k": 2}))  # fmt: skip
        # Deleting what is not there is not an error (a replayed drop).
        j.commit(Batch(inodes={99: None}, extents={(3, DIRTY, 7): None}, dentries={(5, b"zz"): None}, ops={77: None}))
        snap = j.load()
    finally:
        j.close()
    assert snap.inodes == {3: rec(2)}
    assert snap.extents == {3: {PRESENT: [(5, 9)]}}
    assert snap.dentries == [(1, b"b", 2)]
    assert snap.ops == [(2, Unlink(1, b"y", 3))]
    assert snap.meta == {"format": FORMAT, "k": 2}


def test_empty_batch_is_falsy_and_harmless(tmp_path: Path) -> None:
    assert not Batch()
    assert Batch(meta={"a": 1})
    j = Journal.open(tmp_path)
    try:
        j.commit(Batch())
        j.sync()
        snap = j.load()
    finally:
        j.close()
    assert (snap.meta, snap.inodes, snap.extents, snap.dentries, snap.ops) == ({"format": FORMAT}, {}, {}, [], [])


def test_second_open_of_a_cache_dir_is_refused(tmp_path: Path) -> None:
    first = Journal.open(tmp_path)
    try:
        with pytest.raises(CacheBusy) as info:
            Journal.open(tmp_path)
        assert info.value.errno == errno.EBUSY
        assert str(tmp_path) in info.value.message
    finally:
        first.close()
    # Closing releases the lock.
    Journal.open(tmp_path).close()


def test_open_held_by_another_process_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE,
        env=_env(),
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(CacheBusy):
            Journal.open(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    # A killed holder leaves no lock behind (flock dies with the process).
    Journal.open(tmp_path).close()


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from safefs.journal import Journal
    j = Journal.open(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(60)
    """
)

# Each batch carries one counter value n in: two meta keys, an inode record, a dentry, and a
# window of ops (n-9..n, each op holding n). A padding record of varying size makes commits
# span many pages, so a kill lands mid-commit often.
_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import dataclasses
    from safefs.journal import Batch, Journal
    from safefs.records import DIRTY, InodeRecord, Unlink
    def rec(**xattrs):
        return InodeRecord(0o100644, 0, 0, 0, 0, 0, 0, 0, None, xattrs, None, False, False, False, 0, (), None, None)
    j = Journal.open(Path(sys.argv[1]))
    n = j.load().meta.get("a", 0)
    out = os.fdopen(1, "w", buffering=1)
    out.write("ready %d\\n" % n)
    while True:
        n += 1
        pad = bytes([n % 251]) * ((n * 7919) % 200_000)
        j.commit(Batch(
            meta={"a": n, "b": n},
            inodes={1: rec(v=b"%d" % n), 2: rec(pad=pad, v=b"%d" % n), 1000 + n: rec(v=b"%d" % n), 995 + n: None},
            extents={(1, DIRTY, n): n + 1, **({(1, DIRTY, n - 3): None} if n > 3 else {})},
            dentries={(1, b"counter"): n, (2, b"n%d" % n): n, (2, b"n%d" % (n - 5)): None},
            ops={**{n - k: Unlink(1, b"op", n) for k in range(10) if n - k >= 1}, **({n - 10: None} if n > 10 else {})},
        ))
        out.write("%d\\n" % n)
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _check_consistent(snap, acknowledged: int) -> int:
    n = snap.meta.get("a", 0)
    assert snap.meta.get("b", 0) == n, f"meta torn: {snap.meta}"
    assert n >= acknowledged, f"an acknowledged commit was lost: journal at {n}, writer said {acknowledged}"
    if n == 0:
        assert not snap.inodes and not snap.extents and not snap.dentries and not snap.ops
        return n
    assert snap.inodes[1].xattrs == {"v": b"%d" % n}
    assert snap.inodes[2].xattrs["v"] == b"%d" % n and len(snap.inodes[2].xattrs["pad"]) == (n * 7919) % 200_000
    assert {i for i in snap.inodes if i > 2} == {1000 + m for m in range(max(1, n - 4), n + 1)}
    assert snap.extents == {1: {DIRTY: [(m, m + 1) for m in range(max(1, n - 2), n + 1)]}}
    dentries = {(p, name): c for p, name, c in snap.dentries}
    assert dentries.pop((1, b"counter")) == n
    assert dentries == {(2, b"n%d" % m): m for m in range(max(1, n - 4), n + 1)}
    # Every op of the window is present and carries n: ops of older batches were overwritten.
    assert dict(snap.ops) == {m: Unlink(1, b"op", n) for m in range(max(1, n - 9), n + 1)}
    return n


def test_kill_during_commits_leaves_a_consistent_journal(tmp_path: Path) -> None:
    rng = random.Random(0x5AFEF5)
    env = _env()
    acknowledged = 0
    rounds = 12
    for _ in range(rounds):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline().split()
            assert first[0] == b"ready", first
            assert int(first[1]) >= acknowledged
            time.sleep(rng.uniform(0.01, 0.3))
            proc.send_signal(signal.SIGKILL)
            rest = proc.stdout.read().split()
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        if rest:
            acknowledged = int(rest[-1])
        j = Journal.open(tmp_path)
        try:
            n = _check_consistent(j.load(), acknowledged)
        finally:
            j.close()
        acknowledged = n
    assert acknowledged > rounds, "the writer never got going; the test proved nothing"
