"""A fenced ex-writer sees the new writer's work, and keeps its own unwritten changes for
`safefs recover` (issue 9 item 8; DESIGN.md G5, G6).

What this checks, with real daemons on one SRC: A (the writer) has unwritten changes in the
project's top directory (a new file, a new directory: pending ops there) when it is paused and
B takes over; B publishes a new file in that same directory. Once A runs again and is fenced,
it shows B's file within its follower poll interval (today's bug: a directory holding one of
its pending ops was never refreshed), still shows its own unwritten file (kept in its cache for
recover, not in SRC), and `status` says that its unwritten changes stay for `safefs recover`.

Rules: hosts come only from the `cluster` fixture; a stopped host is never touched.
"""

from __future__ import annotations

import pytest

from tests.helpers import wait_until
from tests.multihost.test_takeover import fenced, pause_until_taken_over

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

SEEN_MARGIN = 5.0  # the test's own polling, and a loaded machine


def test_a_fenced_writer_sees_what_the_new_writer_publishes_beside_its_pending_ops(cluster):
    t = cluster.timings
    a, b, _ = pause_until_taken_over(cluster, 600)  # B published "from-b" in the top directory
    a.cont()
    wait_until(lambda: fenced(a), 2.0 + SEEN_MARGIN, interval=0.1, message="A to say it is no longer the writer")
    assert a.status()["pending_ops"], "A has no pending ops in the top directory: the test proves nothing"

    wait_until(
        lambda: "from-b" in a.listdir(),
        t.follower_poll + SEEN_MARGIN,
        interval=0.1,
        message="the fenced A to show B's new file in a directory with A's pending ops",
    )
    assert a.read("from-b") == b"written by B, the new writer\n"
    # Its own unwritten changes stay in its view and its cache, not in SRC, until recover.
    names = a.listdir()
    assert "stale-new" in names and "stale-dir" in names, names
    assert a.read("stale-new") == b"STALE: A's unflushed new file\n"
    assert not (cluster.src / "stale-new").exists() and not (cluster.src / "stale-dir").exists()
    human = a.cli("status", a.mnt)
    assert "stay in its cache for `safefs recover`" in human.stdout, human.stdout
