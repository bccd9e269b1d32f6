"""safefs.procs: a zombie is dead, and a reused pid is not the process a record names (issue 9
item 6). After kill -9 the daemon stays a zombie until its parent reaps it; `kill(pid, 0)`
says "alive" then, and a remount on the same host came up as a follower."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from safefs import procs
from safefs.config import LeaseTimings
from safefs.lease.model import EpochRecord
from safefs.lease.store import DirLeaseStore, local_identity
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(60)


def test_this_process_is_alive_with_its_own_start_time() -> None:
    start = procs.start_time(os.getpid())
    assert start > 0
    assert procs.process_alive(os.getpid())
    assert procs.process_alive(os.getpid(), start)


def test_a_reused_pid_is_not_the_process_that_was_recorded() -> None:
    start = procs.start_time(os.getpid())
    assert not procs.process_alive(os.getpid(), start + 1)


def test_an_exited_and_reaped_process_is_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not procs.process_alive(child.pid)
    assert procs.start_time(child.pid) == 0


def test_a_zombie_is_dead_although_kill_0_succeeds(tmp_path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = procs.start_time(child.pid)
        assert procs.process_alive(child.pid, start)
        os.kill(child.pid, signal.SIGKILL)

        def zombie() -> bool:
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"

        wait_until(zombie, timeout=30, message="the killed child to become a zombie")
        os.kill(child.pid, 0)  # not reaped: kill(pid, 0) still calls it alive
        assert not procs.process_alive(child.pid, start)
        assert not procs.process_alive(child.pid)
        assert not DirLeaseStore(tmp_path).pid_alive(child.pid, start)
    finally:
        child.kill()
        child.wait()


def test_the_lease_record_carries_the_start_time_and_old_records_read_as_unknown() -> None:
    me = local_identity("h")
    assert me.start_time == procs.start_time(os.getpid()) > 0
    assert EpochRecord.from_bytes(EpochRecord(1, "acquire", me, LeaseTimings()).to_bytes()).holder == me
    data = me.to_dict()
    del data["start_time"]
    assert type(me).from_dict(data).start_time == 0

