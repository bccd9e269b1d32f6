"""The pieces of a truthful unmount without a kernel: the mount-table check, fusermount's
busy refusal, the CLI's wait reports and its words for an unmount that left changes behind."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import pytest

from safefs import cli, unmount
from safefs.control import protocol
from safefs.control.protocol import ProgressReport
from safefs.errors import Busy, ExitCode, SafefsError

MOUNTINFO = (
    "22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "41 22 0:52 / /tmp/a\\040b/mnt rw,nosuid,nodev shared:30 - fuse.safefs safefs rw,user_id=0\n"
)


def test_mount_present_looks_for_the_connection_device(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(MOUNTINFO)
    assert unmount.mount_present("0:52", str(table))
    assert not unmount.mount_present("0:53", str(table))
    assert unmount.mount_present("0:53", str(tmp_path / "missing")), "unreadable: never a guess that it is gone"


def test_a_busy_unmount_is_busy_and_other_failures_are_verbatim(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    answers = iter([(1, "fusermount3: failed to unmount: Device or resource busy"), (1, "entry not found"), (0, "")])
    calls: list[list[str]] = []

    def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        code, err = next(answers)
        return subprocess.CompletedProcess(command, code, "", err)

    monkeypatch.setattr(unmount.subprocess, "run", run)
    with pytest.raises(Busy) as info:
        unmount.fusermount(tmp_path, lazy=False)
    assert info.value.exit_code == ExitCode.BUSY
    with pytest.raises(SafefsError, match="entry not found"):
        unmount.fusermount(tmp_path, lazy=True)
    unmount.fusermount(tmp_path, lazy=False)
    assert calls == [["fusermount3", "-u", str(tmp_path)], ["fusermount3", "-u", "-z", str(tmp_path)],
                     ["fusermount3", "-u", str(tmp_path)]]  # fmt: skip


def test_wait_report_says_each_new_reason_once_after_a_second() -> None:
    out = io.StringIO()
    report = cli.WaitReport(out, delay=0.0)
    for detail in ("3 left", "2 left"):
        report.update(ProgressReport(waiting_for="the write-back to the project", detail=detail))
    report.update(ProgressReport(phase="flushing"))
    report.update(ProgressReport(waiting_for="the lock delay", detail="2 s left"))
    assert out.getvalue().splitlines() == [
        "safefs: waiting for the write-back to the project (3 left)",
        "safefs: waiting for the lock delay (2 s left)",
    ]
    quiet = io.StringIO()
    cli.WaitReport(quiet, delay=60.0).update(ProgressReport(waiting_for="x"))
    assert quiet.getvalue() == "", "a wait shorter than the delay is not announced"


def test_status_shows_an_unmounted_mount_writing_back() -> None:
    text = cli.format_status(protocol.from_wire(protocol.Status, {
        "mnt": "/m", "role": "writer", "state": "unmounted", "dirty_files": 3, "pending_ops": 1, "dirty_bytes": 2048,
        "lease": {}}))  # fmt: skip
    assert "state:" in text and "unmounted, writing back 4 files / 2.0 KiB" in text


def test_an_unmount_that_left_changes_names_them_and_the_recover_command() -> None:
    error = cli.unwritten_error(Path("/m"), protocol.from_wire(protocol.UnmountReceipt, {
        "unwritten": 2, "unwritten_files": 1, "unwritten_ops": 1, "unwritten_bytes": 1000,
        "cache_dir": "/c/a", "src": "/nfs/p", "unwritten_reason": "lease lost",
    }))  # fmt: skip
    assert error.exit_code == ExitCode.UNWRITTEN == 11
    assert error.message == ("unmounted /m, but 1 file (1000 B) and 1 pending operation were not written "
                             "back: they stay in the cache /c/a (lease lost)")  # fmt: skip
    assert "safefs recover --cache-dir /c/a /nfs/p" in (error.hint or "")
