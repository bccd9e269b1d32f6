"""Exit codes that tell the truth after a crash (issue 9, points 4 and 15).

- A mount that holds changes it cannot write back (here: a follower mounted over the cache a
  crashed writer left, while another host holds the lease) never says "everything was
  written back" nor exits 0: `sync` and `umount` exit 11 (UNWRITTEN), name how many changes
  and bytes stay in which cache dir, and the command to run: `safefs recover --cache-dir DIR SRC`.
- `safefs acquire` right after the writer crashed waits as long as the takeover needs
  (T_break, then the lock delay), says what it waits for, and exits 0 once it is the writer.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers import describe, wait_until
from tests.multihost.conftest import TIMINGS

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(240)]

UNWRITTEN = 11


def test_a_follower_over_a_crashed_writers_cache_never_claims_done(cluster):
    a = cluster.start("a", writeback_delay=60)
    a.write("kept", "k" * 1000)
    a.kill()
    b = cluster.start("b")
    cluster.wait_new_writer([b], TIMINGS.takeover_bound)
    a = cluster.start("a", writeback_delay=60)  # the same cache: its change is not on SRC
    assert a.status()["role"] == "follower"

    done = a.sync()
    assert done.returncode == UNWRITTEN, describe(done)
    assert str(a.cache_dir) in done.stderr and "1000 bytes" in done.stderr, describe(done)
    assert f"safefs recover --cache-dir {a.cache_dir} {a.src}" in done.stderr, describe(done)

    done = a.umount(check=False)
    assert done.returncode == UNWRITTEN, describe(done)
    assert "everything was written back" not in done.stdout + done.stderr, describe(done)
    assert "1 file (1000 B) and 1 pending operation" in done.stderr and str(a.cache_dir) in done.stderr, describe(done)
    assert f"safefs recover --cache-dir {a.cache_dir} {a.src}" in done.stderr, describe(done)
    wait_until(lambda: not a.alive, 30, message="the daemon to exit")
    assert not (cluster.src / "kept").exists()


def test_acquire_after_a_crash_waits_for_the_takeover_and_exits_0(cluster):
    a = cluster.start("a")
    b = cluster.start("b", "--lock-delay", "3")
    a.write("f", "from a")
    a.sync_ok()
    a.kill()
    started = time.monotonic()
    done = b.cli("acquire", b.mnt, timeout=120)
    took = time.monotonic() - started
    assert done.returncode == 0, describe(done) + b.log_tail(30)
    assert "is the writer now" in done.stdout, describe(done)
    status = b.status()
    assert status["role"] == "writer" and status["lease"]["writable"], status["lease"]
    if took > 2:
        assert "safefs: waiting for" in done.stderr, describe(done)
    b.write("g", "from b")
    assert b.read("f") == b"from a"


def test_acquire_still_refuses_a_live_holder_at_once(cluster):
    a = cluster.start("a")
    a.wait_writable()
    b = cluster.start("b")
    started = time.monotonic()
    done = b.cli("acquire", b.mnt, timeout=60)
    took = time.monotonic() - started
    assert done.returncode == 7, describe(done)  # LEASE_HELD: its heartbeat moves
    assert took < TIMINGS.renew + 2 * TIMINGS.poll + 5, f"the refusal took {took:.1f} s"
    assert a.status()["role"] == "writer" and b.status()["role"] == "follower"


def test_umount_of_a_writer_that_lost_its_lease_names_what_it_leaves(cluster):
    a = cluster.start("a", writeback_delay=600)
    a.wait_writable()
    b = cluster.start("b")
    a.write("pending", "p" * 500)
    a.stop()
    cluster.wait_new_writer([b], TIMINGS.takeover_bound)
    a.cont()
    wait_until(lambda: a.status()["role"] != "writer", 10, interval=0.1, message="a to notice it was fenced")
    done = a.umount(check=False)
    assert done.returncode == UNWRITTEN, describe(done)
    assert "everything was written back" not in done.stdout + done.stderr, describe(done)
    assert "(500 B)" in done.stderr and f"safefs recover --cache-dir {a.cache_dir} {a.src}" in done.stderr
    wait_until(lambda: not a.alive, 30, message="the daemon to exit")
    assert not (cluster.src / "pending").exists()
