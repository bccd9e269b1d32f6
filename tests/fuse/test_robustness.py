"""The mount survives its own bugs and a stuck project (issue: core, points 9 and 10).

- An unexpected exception in a request handler answers that request with EIO, is logged
  with its traceback, and the mount keeps serving (fuse_ops.fuse_errors).
- While a call into the project hangs (a hung NFS server), the control socket still
  answers, reads of cached data still work, and reads of uncached data fail with EIO after
  --backing-timeout instead of hanging for ever.

The daemon reads test-only faults from $SAFEFS_FAULTS and the name of a lookup that raises a
bug from $SAFEFS_INJECT_BUG (see safefs/daemon.py).
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import pytest

from tests.helpers import run_safefs, wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]


def test_an_unexpected_exception_answers_eio_and_the_mount_keeps_serving(mount_factory, tmp_path):
    env = dict(os.environ, SAFEFS_INJECT_BUG="boom")
    m = mount_factory(env=env)
    (m.mnt / "ok").write_bytes(b"fine")
    with pytest.raises(OSError) as info:
        os.stat(m.mnt / "boom")
    assert info.value.errno == errno.EIO
    # Still serving, and the bug was counted and logged with its traceback.
    assert (m.mnt / "ok").read_bytes() == b"fine"
    (m.mnt / "after").write_bytes(b"still writable")
    assert m.status()["internal_errors"] == 1
    log = m.log_path.read_text()
    assert "Traceback" in log and "injected bug" in log
    m.umount()
    assert (m.src / "after").read_bytes() == b"still writable"


def test_status_answers_and_cached_reads_work_while_the_project_hangs(mount_factory, tmp_path):
    src = tmp_path / "src"
    (src / "stuck").mkdir(parents=True)
    (src / "stuck" / "uncached").write_bytes(b"u" * 100_000)
    (src / "cached").write_bytes(b"c" * 1000)
    faults = [{"kind": "hang", "op": "read", "prefix": "stuck/uncached", "times": None}]
    env = dict(os.environ, SAFEFS_FAULTS=json.dumps(faults))
    m = mount_factory(src, None, None, "--backing-timeout", "3", env=env)
    assert (m.mnt / "cached").read_bytes() == b"c" * 1000
    os.listdir(m.mnt / "stuck")

    outcome: dict[str, object] = {}

    def read_stuck() -> None:
        started = time.monotonic()
        try:
            (m.mnt / "stuck" / "uncached").read_bytes()
            outcome["result"] = "read returned"
        except OSError as exc:
            outcome["result"] = exc.errno
        outcome["seconds"] = time.monotonic() - started

    reader = threading.Thread(target=read_stuck)
    reader.start()
    time.sleep(0.5)  # the read is now stuck in the project
    started = time.monotonic()
    status = run_safefs("status", str(m.mnt), "--json", timeout=10)
    assert status.returncode == 0, status.stderr
    assert time.monotonic() - started < 5
    assert json.loads(status.stdout)["role"] == "writer"
    assert (m.mnt / "cached").read_bytes() == b"c" * 1000  # the cache still answers
    (m.mnt / "new").write_bytes(b"writes land in the cache")
    reader.join(30)
    assert not reader.is_alive(), "a read of a hung project never returned"
    assert outcome["result"] == errno.EIO
    assert 2 <= outcome["seconds"] < 20  # it waited for the timeout, not for ever


def test_removed_directories_are_forgotten_once_the_kernel_lets_go(mounted):
    """Listing a directory hands the kernel "." and "..", which it takes no reference to; if
    safefs counted them, removed directories would stay in memory for the life of the mount."""
    top = mounted.mnt / "top"
    top.mkdir()
    for i in range(40):
        (top / f"d{i}").mkdir()
        (top / f"d{i}" / "f").write_bytes(b"x")
    for d in os.listdir(top):
        os.listdir(top / d)  # "." of d, ".." = top
    assert mounted.sync().returncode == 0
    for i in range(40):
        os.unlink(top / f"d{i}" / "f")
        os.rmdir(top / f"d{i}")
    os.rmdir(top)
    assert mounted.sync().returncode == 0

    def forgotten() -> bool:
        with open("/proc/sys/vm/drop_caches", "w") as f:  # the kernel sends FORGET for what it drops
            f.write("2")
        return mounted.status()["inodes"] <= 2  # the root and .safefs's place-holder at most

    wait_until(forgotten, 10.0, interval=0.2, message="removed directories to be forgotten")
