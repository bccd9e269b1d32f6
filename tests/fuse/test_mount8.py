"""safefs as mount(8) knows it: `mount -t fuse.safefs`, an fstab line, plain `umount`.

mount(8) runs mount.fuse3, which runs `safefs SRC MNT -o OPTS` found on PATH: the tests put a
`safefs` of this checkout first on PATH, so they never depend on what /usr/local/bin holds.

Invariants protected (issue 11 item 2):
- `mount -t fuse.safefs SRC MNT -o cache_dir=...,writeback_delay=...,allow_other` mounts, with
  mount(8)'s own options (`_netdev`, `nofail`, `x-systemd.*`, `defaults`) accepted;
- an fstab line of type fuse.safefs plus `mount MNT` (`mount -T FILE MNT`) mounts; `ro` there
  makes a follower;
- plain `umount MNT` is as safe as `safefs umount`: the daemon writes every change back to the
  project before it exits;
- an unknown option fails the mount with safefs's one-line error and leaves nothing mounted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, describe, is_mounted, lazy_unmount, run_safefs, safefs_env, wait_until

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]


class Mount8:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.src, self.mnt, self.cache = tmp_path / "src", tmp_path / "mnt", tmp_path / "cache"
        self.src.mkdir()
        self.mnt.mkdir()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        wrapper = bin_dir / "safefs"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m safefs "$@"\n')
        wrapper.chmod(0o755)
        self.env = safefs_env({"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                               "PYTHONPATH": str(REPO)})  # fmt: skip

    def run(self, *argv: object, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [os.fspath(a) for a in argv],  # type: ignore[misc]
            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=self.env, timeout=timeout,
        )  # fmt: skip

    def daemon_pid(self) -> int:
        done = run_safefs("status", "--json", self.mnt, env=self.env, timeout=30)
        assert done.returncode == 0, describe(done)
        import json

        return int(json.loads(done.stdout)["pid"])

    def log(self) -> str:
        try:
            return (self.cache / "daemon.log").read_text(errors="replace")[-4000:]
        except OSError:
            return "(no daemon log)"

    def cleanup(self) -> None:
        pid = None
        if is_mounted(self.mnt):
            try:
                pid = self.daemon_pid()
            except (AssertionError, ValueError, KeyError, subprocess.TimeoutExpired):
                pid = None
            lazy_unmount(self.mnt)
        if pid is not None:
            try:
                wait_until(lambda: not _alive(pid), timeout=60, message=f"daemon {pid} to exit")
            except AssertionError:
                os.kill(pid, 9)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except OSError:
        return False


@pytest.fixture
def m8(tmp_path: Path) -> Iterator[Mount8]:
    if shutil.which("mount.fuse3") is None and not Path("/sbin/mount.fuse3").exists():
        pytest.fail("mount.fuse3 is missing (fuse3 package): mount -t fuse.safefs cannot work")
    env = Mount8(tmp_path)
    try:
        yield env
    finally:
        env.cleanup()


def test_mount_t_fuse_safefs_with_o_options(m8: Mount8) -> None:
    (m8.src / "old").write_bytes(b"from the project\n")
    done = m8.run(
        "mount", "-t", "fuse.safefs", m8.src, m8.mnt,
        "-o", f"cache_dir={m8.cache},writeback_delay=0.2,allow_other,_netdev,nofail,x-systemd.automount,defaults",
    )  # fmt: skip
    assert done.returncode == 0, describe(done) + m8.log()
    assert "as writer" in done.stdout
    assert (m8.mnt / "old").read_bytes() == b"from the project\n"
    (m8.mnt / "new").write_bytes(b"written through mount(8)\n")
    wait_until(lambda: (m8.src / "new").exists() and (m8.src / "new").read_bytes() == b"written through mount(8)\n",
               timeout=60, message="write-back after writeback_delay=0.2")  # fmt: skip
    status = run_safefs("status", "--json", m8.mnt, env=m8.env)
    assert '"writeback_delay": 0.2' in status.stdout and str(m8.cache) in status.stdout
    options = next(line for line in Path("/proc/self/mounts").read_text().splitlines() if f" {m8.mnt} " in line)
    assert "allow_other" in options.split()[3], options


def test_fstab_line_then_mount_mnt_and_plain_umount_writes_back(m8: Mount8) -> None:
    fstab = m8.tmp / "fstab"
    fstab.write_text(
        f"# a test fstab\n{m8.src} {m8.mnt} fuse.safefs "
        f"cache_dir={m8.cache},writeback_delay=600,_netdev,nofail,x-systemd.requires=network-online.target 0 0\n"
    )
    done = m8.run("mount", "-T", fstab, m8.mnt)
    assert done.returncode == 0, describe(done) + m8.log()
    data = os.urandom(300_000)
    (m8.mnt / "dirty.bin").write_bytes(data)
    pid = m8.daemon_pid()
    assert not (m8.src / "dirty.bin").exists()  # writeback_delay=600: only the final write-back writes it

    done = m8.run("umount", m8.mnt)
    assert done.returncode == 0, describe(done)
    assert not is_mounted(m8.mnt)
    wait_until(lambda: not _alive(pid), timeout=120, message="the daemon to finish writing back and exit")
    assert (m8.src / "dirty.bin").read_bytes() == data, m8.log()
    assert "wrote back 1 files" in m8.log()


def test_ro_in_fstab_makes_a_follower(m8: Mount8) -> None:
    fstab = m8.tmp / "fstab"
    fstab.write_text(f"{m8.src} {m8.mnt} fuse.safefs ro,cache_dir={m8.cache},noauto,user 0 0\n")
    done = m8.run("mount", "-T", fstab, m8.mnt)
    assert done.returncode == 0, describe(done) + m8.log()
    assert "as read-only follower" in done.stdout, done.stdout
    with pytest.raises(OSError) as caught:
        (m8.mnt / "x").write_bytes(b"no")
    assert caught.value.errno == 30  # EROFS: a follower does not take a free lease by itself
    done = run_safefs("acquire", m8.mnt, env=m8.env)
    assert done.returncode == 0, describe(done)
    (m8.mnt / "x").write_bytes(b"yes")
    done = run_safefs("umount", m8.mnt, env=m8.env)
    assert done.returncode == 0, describe(done)
    assert (m8.src / "x").read_bytes() == b"yes"


def test_an_unknown_option_fails_with_one_line(m8: Mount8) -> None:
    done = m8.run("mount", "-t", "fuse.safefs", m8.src, m8.mnt, "-o", f"cache_dir={m8.cache},colour=blue")
    assert done.returncode != 0
    assert "safefs: error: unknown mount option 'colour=blue'" in done.stderr, describe(done)
    assert not is_mounted(m8.mnt)
