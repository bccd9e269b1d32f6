"""A remount on the same host after kill -9 takes over its own dead daemon's lease at once
(issue 9 item 6), with no lock delay (item 7; DESIGN.md section 3, lease.model's docstring).

After kill -9 the daemon stays a zombie until its parent reaps it (pytest here, init or a
service manager in real life, on a busy host for over a second). `kill(pid, 0)` succeeds on a
zombie; safefs must nevertheless see the holder as dead and come up as the writer.

Rules: mounts come only from `mount_factory` (it unmounts and reaps, even after a failure).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.helpers import lazy_unmount, wait_until, write_file

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

LONG_DELAY = ("--writeback-delay", "600")


def _state(pid: int) -> bytes:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0]


def kill_leaving_a_zombie(m) -> None:
    """SIGKILL the daemon, drop its dead mount, and do not reap it: it stays a zombie."""
    os.kill(m.pid, signal.SIGKILL)
    wait_until(lambda: _state(m.pid) == b"Z", timeout=30, message="the killed daemon to become a zombie")
    error = lazy_unmount(m.mnt)
    assert error is None, error
    # Popen.poll() would reap it; the factory asks it whether the old mount's slot is free.
    m.proc.poll = lambda: -signal.SIGKILL  # type: ignore[method-assign]


def reap(m) -> None:
    del m.proc.poll  # the real one again
    m.proc.wait(timeout=30)


def test_remount_right_after_kill_9_is_the_writer_although_the_old_daemon_is_a_zombie(mount_factory):
    m = mount_factory(None, None, None, *LONG_DELAY)
    write_file(m.mnt / "before", b"written before the kill\n", fsync=True)
    kill_leaving_a_zombie(m)
    try:
        m2 = mount_factory(m.src, m.mnt, m.cache_dir, *LONG_DELAY)
        assert _state(m.pid) == b"Z", "the old daemon was reaped: this test no longer tests a zombie"
        assert m2.ready is not None and m2.ready["role"] == "writer", (m2.ready, m2.log_tail())
        lease = m2.status()["lease"]
        assert lease["holder"]["pid"] == m2.pid, lease
    finally:
        reap(m)
    assert (m2.mnt / "before").read_bytes() == b"written before the kill\n"
    # Its own dead process: no lock delay (the default is 60 s), writable and publishable at once.
    write_file(m2.mnt / "after", b"written right after the remount\n", fsync=True)
    lease = m2.status()["lease"]
    assert lease["writable"] and lease["publishable"] and lease["publishing_from"] is None, lease
    started = time.monotonic()
    done = m2.sync()
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30, "sync waited for a lock delay after taking over its own dead process"
    assert "lock delay" not in done.stderr, done.stderr
    assert (m.src / "after").read_bytes() == b"written right after the remount\n"
    m2.umount()
    assert (m.src / "before").read_bytes() == b"written before the kill\n"
