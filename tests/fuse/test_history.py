"""`safefs history` through real mounts: the lease's life and a conflict, readable from SRC or MNT.

Invariants protected (issue 11 item 11): a mount appends acquire, conflict and release records
(host, user, epoch, time) to SRC/.safefs/history/, hidden from the mount; `safefs history MNT`
and `safefs history SRC` print them oldest first, `--json` one record per line.
"""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path

import pytest

from tests.helpers import MountFactory, describe, run_safefs, wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]


def test_history_records_acquire_conflict_release_with_host_user_epoch(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_bytes(b"original\n")
    m = mount_factory(src, None, None, "--writeback-delay", "600", host_id="labpc")
    assert (m.mnt / "notes.txt").read_bytes() == b"original\n"
    (m.mnt / "notes.txt").write_bytes(b"ours\n")
    before = os.stat(src / "notes.txt")
    (src / "notes.txt").write_bytes(b"theirs, on NFS\n")  # changed behind the mount's back
    os.utime(src / "notes.txt", ns=(before.st_atime_ns, before.st_mtime_ns + 2 * 10**9))
    assert m.sync().returncode == 10  # ExitCode.SYNC_CONFLICTS: synced, with conflicts

    def events() -> list[dict[str, object]]:
        done = run_safefs("history", m.mnt, "--json", env=m.env)
        assert done.returncode == 0, describe(done)
        return [json.loads(line) for line in done.stdout.splitlines()]

    recorded = wait_until(lambda: [e for e in events() if e["event"] == "conflict"] and events(), timeout=60,
                          message="the conflict in the history")  # fmt: skip
    assert [e["event"] for e in recorded] == ["acquire", "conflict"], recorded
    assert all(e["host"] == "labpc" and e["user"] == getpass.getuser() and e["epoch"] == 1 for e in recorded)
    assert "notes.txt" in str(recorded[1]["detail"]) and "safefs-conflict" in str(recorded[1]["detail"])
    assert ".safefs" not in os.listdir(m.mnt)

    m.umount()
    done = run_safefs("history", src)
    assert done.returncode == 0, describe(done)
    lines = done.stdout.splitlines()
    assert [line.split()[2] for line in lines] == ["acquire", "conflict", "release"], done.stdout
    assert all("epoch 1" in line and f"{getpass.getuser()}@labpc" in line for line in lines)
    times = [e["time"] for e in map(json.loads, run_safefs("history", src, "--json").stdout.splitlines())]
    assert times == sorted(times)
