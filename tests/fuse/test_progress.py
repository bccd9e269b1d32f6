"""Progress of `safefs sync` and `safefs umount` (issue 11 item 5), through a pseudo-terminal.

What these tests check, with a write-back slowed by the test-only fault plan (each publish on
the project takes a second): on a terminal, sync and umount draw progress (files left, bytes,
what they wait for) on stderr while they wait, then print their receipt; off a terminal
(pipes) stderr stays empty and stdout has only the receipt; either way the bytes reach SRC.

Rules: mounts come only from the fixtures; no fixed sleeps (the pty is read until the command
exits, against a deadline).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from tests.helpers import describe, run_safefs, safefs_env

pytestmark = [pytest.mark.timeout(180), pytest.mark.fuse]

FILES = 5
SLOW = json.dumps([{"kind": "delay", "op": "publish_atomic", "seconds": 1.0, "times": None}])
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_pty(*args: object, timeout: float = 120) -> tuple[int, str]:
    """`python -m safefs ARGS` with stdin, stdout and stderr on a 160-column pty: (exit code, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "safefs", *map(str, args)],
        stdin=slave, stdout=slave, stderr=slave, env=safefs_env(), close_fds=True,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every holder of the slave closed it
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, b"".join(chunks).decode(errors="replace")


def dirty_mount(mount_factory):
    m = mount_factory(None, None, None, "--writeback-delay", "600", env={"SAFEFS_FAULTS": SLOW})
    for i in range(FILES):
        (m.mnt / f"f{i}").write_bytes(os.urandom(50_000))
    return m


def test_sync_on_a_terminal_shows_progress_then_the_receipt(mount_factory):
    m = dirty_mount(mount_factory)
    code, output = run_on_pty("sync", m.mnt)
    text = ANSI.sub("", output)
    assert code == 0, output
    assert "files left" in text and "waiting for the write-back" in text, output
    assert "KiB" in text, output
    assert "safefs: synced" in text, output
    assert all((m.src / f"f{i}").exists() for i in range(FILES))


def test_umount_on_a_terminal_shows_progress(mount_factory):
    m = dirty_mount(mount_factory)
    code, output = run_on_pty("umount", m.mnt)
    text = ANSI.sub("", output)
    assert code == 0, output
    assert "writing back" in text and "files left" in text, output
    assert "safefs: unmounted" in text, output
    assert all((m.src / f"f{i}").exists() for i in range(FILES))


def test_sync_off_a_terminal_prints_only_the_receipt(mount_factory):
    m = dirty_mount(mount_factory)
    done = run_safefs("sync", m.mnt, timeout=120)
    assert done.returncode == 0, describe(done)
    # No progress drawing off a terminal; only the one-line "waiting for" notes a wait over a
    # second leaves on stderr (no silent waits), each naming what it waited for.
    assert "\x1b" not in done.stderr and "\r" not in done.stderr, describe(done)
    assert all(line.startswith("safefs: waiting for ") for line in done.stderr.splitlines()), describe(done)
    assert done.stdout.startswith("safefs: synced") and len(done.stdout.splitlines()) == 1, describe(done)
