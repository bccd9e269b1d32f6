"""`safefs recover` (issue 4, point 6): a writer that lost its lease keeps its unwritten
changes in its cache; after another host took over and released, `recover` on the first
host writes them back under a fresh lease, and a file the other host changed meanwhile is
kept side by side as a conflict copy, never overwritten.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers import describe, wait_until
from tests.multihost.test_takeover import fenced, pause_until_taken_over

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]


def test_recover_writes_back_what_a_lost_lease_left_and_keeps_both_versions(cluster):
    a, b, epoch = pause_until_taken_over(cluster, 600)
    b.write("shared", "B changed shared meanwhile\n")
    b.sync_ok("--release")
    a.cont()
    wait_until(lambda: fenced(a), 5.0, interval=0.1, message="A to say it is no longer the writer")

    listing = a.cli("recover")
    assert listing.returncode == 0, describe(listing)
    assert f"safefs recover {a.mnt}" in listing.stdout, describe(listing)

    done = a.cli("recover", a.mnt, timeout=120)
    assert done.returncode == 0, describe(done)
    assert "conflict" in done.stdout, describe(done)

    src = cluster.src
    assert (src / "stale-new").read_bytes() == b"STALE: A's unflushed new file\n"
    assert (src / "stale-dir").is_dir()
    # B's version stays where it was; A's is beside it, whole.
    assert (src / "shared").read_bytes() == b"B changed shared meanwhile\n"
    copies = [p for p in src.iterdir() if p.name.startswith("shared.safefs-conflict-")]
    assert [c.read_bytes() for c in copies] == [b"STALE: A's unflushed overwrite\n"], copies
    assert (src / "from-b").read_bytes() == b"written by B, the new writer\n"
    status = a.status()
    assert status["dirty_bytes"] == 0 and status["pending_ops"] == 0, status
    assert status["role"] == "follower", "recover gives back the lease it took"
    generation = json.loads((src / ".safefs" / "generation").read_bytes())
    assert generation["epoch"] > epoch + 1, "recover published under a fresh epoch"


def test_recover_refuses_while_another_host_holds_the_lease(cluster):
    a, b, _ = pause_until_taken_over(cluster, 600)
    a.cont()
    wait_until(lambda: fenced(a), 5.0, interval=0.1, message="A to say it is no longer the writer")
    done = a.cli("recover", a.mnt, timeout=60)
    assert done.returncode == 7, describe(done)  # LEASE_HELD: B is alive and holds it
    assert "lease" in done.stderr, describe(done)
    assert not (cluster.src / "stale-new").exists()
