"""After a takeover the new writer takes writes at once and holds back only what goes to the
project until the lock delay ends (issue 9 item 7; DESIGN.md section 3).

What these tests check, with real daemons on one SRC: B takes over from a paused A (T_break of
silence, so the lock delay applies in both host modes); right away B accepts a new file and an
overwrite (no EROFS), `status` says "writer (publishing from HH:MM:SS)", SRC does not change
before the lock delay ends, `sync` says that it waits for the lock delay and exits 0 once SRC
has the data.

Rules: hosts come only from the `cluster` fixture; a stopped host is never touched.
"""

from __future__ import annotations

import errno
import re
import time

import pytest

from tests.helpers import describe
from tests.multihost.conftest import snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

LOCK_DELAY = 8.0  # long enough to look at B during it on a loaded machine


def test_the_new_writer_takes_writes_at_once_and_publishes_after_the_lock_delay(cluster):
    t = cluster.timings
    a = cluster.start("hostA")
    a.wait_writable()
    b = cluster.start("hostB", "--lock-delay", LOCK_DELAY)
    a.write("shared", "published by A\n")
    a.sync_ok()
    a.stop()
    b_host, st, _ = cluster.wait_new_writer([b], t.takeover_bound)
    claimed = st["lease"]["holder"]["since"]
    ends = claimed + LOCK_DELAY
    before = snapshot(cluster.src, skip=[".safefs"])

    assert b.errno_of("write", b.path("new"), "B's new file\n", "x") == 0, "EROFS during the lock delay"
    assert b.errno_of("write", b.path("shared"), "B's overwrite\n", "w") == 0
    assert b.read("new") == b"B's new file\n"
    human = b.cli("status", b.mnt)
    lease = b.lease()
    in_delay = time.time() < ends - 1.0
    if in_delay:  # else the machine was too slow to look inside the delay; the rest still holds
        assert re.search(r"role:\s+writer \(publishing from \d\d:\d\d:\d\d\)", human.stdout), describe(human)
        assert lease["writable"] and not lease["publishable"], lease
        assert abs(lease["publishing_from"] - ends) < 2.0, (lease, ends)

    done = b.sync()
    assert done.returncode == 0, describe(done)
    assert time.time() >= ends - 0.5, "sync returned before the lock delay ended"
    if in_delay:
        assert "lock delay" in done.stderr, f"sync waited without saying for what: {describe(done)}"
        assert snapshot(cluster.src, skip=[".safefs"]) != before
    assert (cluster.src / "new").read_bytes() == b"B's new file\n"
    assert (cluster.src / "shared").read_bytes() == b"B's overwrite\n"
    assert b.errno_of("write", b.path("later"), "x", "x") == 0
    assert "publishing" not in b.cli("status", b.mnt).stdout
    a.cont()
    assert errno.EROFS == a.errno_of("write", a.path("from-a"), "A after the pause\n", "x")
