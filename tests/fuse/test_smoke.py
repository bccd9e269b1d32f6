"""The smallest end-to-end check: a file written through the mount reaches the project."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.helpers import Mount, MountFactory, is_mounted, sweep_stale_mounts, wait_until


def test_write_read_umount_reaches_src(mounted: Mount) -> None:
    assert mounted.status()["role"] == "writer"  # the only mount of a fresh project
    data = b"hello from safefs\n" * 1000
    target = mounted.path("hello.txt")

    target.write_bytes(data)
    assert target.read_bytes() == data

    mounted.umount()  # writes back everything, releases, daemon exits 0, mount gone

    assert (mounted.src / "hello.txt").read_bytes() == data


# The fixtures themselves: a crash, a stopped daemon and a dead session's mount leave nothing.


def test_kill_drops_the_mount_and_remount_reuses_the_cache(mount_factory: MountFactory) -> None:
    first = mount_factory()
    first.kill()
    assert not first.alive and first.proc.returncode == -signal.SIGKILL
    assert not is_mounted(first.mnt)

    second = mount_factory.remount(first)
    assert (second.mnt, second.cache_dir) == (first.mnt, first.cache_dir)
    assert second.is_mounted()


def test_cleanup_reaps_a_stopped_daemon(mount_factory: MountFactory) -> None:
    mount = mount_factory()
    mount.stop()
    started = time.monotonic()
    mount.cleanup()
    assert time.monotonic() - started < 15
    assert not mount.alive
    assert not is_mounted(mount.mnt)


def test_sweep_unmounts_only_dead_sessions_mounts(mount_factory: MountFactory, tmp_path: Path) -> None:
    root = tmp_path / "pytest-of-someone"
    dead, live = root / "pytest-1", root / "pytest-2"
    for numbered, pid in ((dead, _dead_pid()), (live, os.getppid())):
        (numbered / "mnt").mkdir(parents=True)
        (numbered / ".lock").write_text(str(pid))
    dead_mount = mount_factory(None, dead / "mnt", dead / "cache")
    live_mount = mount_factory(None, live / "mnt", live / "cache")
    dead_mount.proc.kill()  # a crashed session: the daemon died, the mount stayed
    dead_mount.proc.wait()

    report = sweep_stale_mounts([], [root])

    assert report == [f"unmounted stale safefs mount {dead_mount.mnt}"]
    assert not is_mounted(dead_mount.mnt)
    assert live_mount.is_mounted()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_the_mount_reads_ahead_a_mebibyte(mounted: Mount) -> None:
    """Cold sequential reads come in 1 MiB requests, not the kernel's 128 KiB (fuse_ops)."""
    from safefs.fuse_ops import READAHEAD_KIB, mount_device

    device = mount_device(str(mounted.mnt))
    assert device is not None, "the mount is not in /proc/self/mountinfo"
    setting = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    if os.geteuid() != 0:
        return  # only root may raise it; the daemon leaves it alone then
    # Raised just after the kernel's INIT, which may come a moment after the mount is ready.
    wait_until(lambda: int(setting.read_text()) >= READAHEAD_KIB, 5.0, message=f"{setting} to be raised")
