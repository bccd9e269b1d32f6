"""The cache disk fills up (issue 4, item 4; DESIGN.md G2 and section 4).

The cache dir lives on a 64 MiB tmpfs that the test mounts (and always unmounts), the mount
uses `--cache-size 16M` and a long write-back delay, so dirty data piles up until the cache
disk is full. What these tests check:
- writers get ENOSPC (the errno, not EIO), and only after a fair share of the disk was used;
- the daemon keeps serving: `safefs status` answers, reads of acknowledged data work;
- every acknowledged byte is intact, and `safefs sync` puts exactly those bytes in SRC;
- the journal stays consistent: a create/mkdir refused while full leaves no trace, one that
  was acknowledged survives; a remount on the same cache shows exactly what SRC has;
- writing resumes once space is freed (the big file deleted and synced).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuse.test_writeback import snapshot, tree_diff
from tests.helpers import Mount, MountFactory, describe, fuse_required, is_mounted

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

MIB = 1 << 20
KIB = 1 << 10
DISK = 64 * MIB
ARGS = ("--cache-size", "16M", "--writeback-delay", "600", "--lock-delay", "0")
# A 64 MiB cache disk must take at least this much dirty data before it says ENOSPC: a
# quarter of the disk (and the --cache-size). Refusing sooner makes a small disk unusable.
MIN_ACCEPTED = 16 * MIB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs at tmp_path/cachefs; yields the cache dir inside it."""
    where = tmp_path / "cachefs"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here: {done.stderr.strip()}"
        if fuse_required():  # CI runs as root, where this must work: never a silent skip there
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    try:
        yield where / "cache"
    finally:
        if is_mounted(where):
            done = subprocess.run(["umount", str(where)], capture_output=True, text=True)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True, text=True)


@pytest.fixture
def full_rig(small_disk: Path, mount_factory: MountFactory) -> tuple[Path, MountFactory]:
    """Requested in this order so every daemon is gone before the tmpfs is unmounted."""
    return small_disk, mount_factory


def write_all(fd: int, data: bytes) -> int:
    """Write `data`; return how many bytes write() acknowledged. Raises on the first error."""
    done = 0
    view = memoryview(data)
    while done < len(data):
        done += os.write(fd, view[done:])
    return done


def free_mib(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize >> 20


def status(m: Mount) -> dict:
    started = time.monotonic()
    done = m.cli("status", m.mnt, "--json", timeout=30)
    assert done.returncode == 0, describe(done)
    assert time.monotonic() - started < 5, "status took over 5 s with the cache disk full"
    return json.loads(done.stdout)


def fill(path: Path, chunk: int, limit: int) -> tuple[bytearray, OSError | None]:
    """Append random chunks to `path`, each fsynced, until a call fails or `limit` bytes were
    written.

    Returns (the acknowledged bytes, the error). With the kernel writeback cache a write()
    returns from the page cache and a full cache disk is reported when the pages reach the
    daemon, at the fsync (G2: what fsync acknowledged is kept). A write() that returns a short
    count has written that many bytes; the rest is retried and then usually fails.
    """
    acked = bytearray()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    error = None
    try:
        while len(acked) < limit:
            data = os.urandom(chunk)
            try:
                n = os.write(fd, data)
                os.fsync(fd)
            except OSError as exc:
                error = exc
                break
            acked += data[:n]
    finally:
        try:
            os.close(fd)
        except OSError as exc:  # close reports nothing new for FUSE; keep the write's error
            error = error or exc
    return acked, error


def without_tails(tree: dict[str, object], tails: dict[str, bytes], where: str) -> dict[str, object]:
    """`tree` without the files `fill` was writing when the disk filled, after checking them:
    each holds its acknowledged bytes, and at most one chunk (the write refused at its fsync)
    more. The kernel writeback cache took that chunk and keeps the size it gave the file; the
    cache disk took what it had room for."""
    tree = dict(tree)
    for name, acked in tails.items():
        got = tree.pop(name, None)
        assert isinstance(got, bytes) and got[: len(acked)] == acked and len(got) <= len(acked) + MIB, (
            f"{where}: {name} has {len(got) if isinstance(got, bytes) else got!r} bytes, not its "
            f"{len(acked)} acknowledged ones (and at most one refused chunk after them)"
        )
    return tree


def test_writers_get_enospc_and_nothing_acknowledged_is_lost(full_rig, tmp_path):
    cache_dir, mount_factory = full_rig
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"from before the mount" * 100)
    m = mount_factory(src, None, cache_dir, *ARGS)
    expected: dict[str, object] = {"old": b"from before the mount" * 100}

    # Acknowledged small files first: these must survive whatever follows.
    os.mkdir(m.mnt / "small")
    expected["small"] = "dir"
    for i in range(8):
        data = os.urandom(64 * KIB + i)
        fd = os.open(m.mnt / "small" / f"s{i}", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            write_all(fd, data)
            if i % 2:
                os.fsync(fd)
        except OSError as exc:
            pytest.fail(
                f"writing {len(data)} bytes into an empty {DISK >> 20} MiB cache disk "
                f"({free_mib(cache_dir)} MiB free) failed: {exc!r}",
                pytrace=False,
            )
        finally:
            os.close(fd)
        expected[f"small/s{i}"] = data

    # Fill the cache disk through one big file.
    big, error = fill(m.mnt / "big", MIB, 2 * DISK)
    assert error is not None, f"wrote {len(big)} bytes into a {DISK >> 20} MiB cache disk, no error"
    assert error.errno == errno.ENOSPC, f"a write into a full cache failed with {error!r}, not ENOSPC"
    assert len(big) >= MIN_ACCEPTED, (
        f"ENOSPC after only {len(big) >> 20} MiB of dirty data on an empty {DISK >> 20} MiB "
        f"cache disk ({free_mib(cache_dir)} MiB still free on it)"
    )
    tails = {"big": bytes(big)}
    print(f"ENOSPC after {len(big) >> 20} MiB of dirty data, {free_mib(cache_dir)} MiB left on the cache disk")

    # Other writers are refused too; the daemon still serves.
    assert m.alive, f"daemon died when the cache disk filled:\n{m.log_tail(30)}"
    more, error = fill(m.mnt / "small" / "another", MIB, 8 * MIB)
    assert error is not None and error.errno == errno.ENOSPC, f"second writer while full: {error!r}"
    tails["small/another"] = bytes(more)  # whatever it got acknowledged must survive
    st = status(m)
    assert st["role"] == "writer", st
    assert st["dirty_bytes"] >= len(big), st
    assert any("cache disk" in w["message"] and "nearly full" in w["message"] for w in st["warnings"]), st["warnings"]

    # Namespace changes while full: refused with ENOSPC, or acknowledged and kept.
    for name in ("made-while-full", "dir-while-full"):
        try:
            if name.startswith("dir"):
                os.mkdir(m.mnt / name)
                expected[name] = "dir"
            else:
                os.close(os.open(m.mnt / name, os.O_WRONLY | os.O_CREAT, 0o644))
                expected[name] = b""
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, f"creating {name} on a full cache: {exc!r}"

    # Everything acknowledged reads back intact from the full cache.
    diff = tree_diff(expected, without_tails(snapshot(m.mnt), tails, "the mount"))
    assert not diff, f"the mount differs from what was acknowledged, with the cache disk full:\n{diff}"

    # sync puts exactly those bytes in SRC.
    done = m.sync(timeout=120)
    assert done.returncode == 0, describe(done)
    in_src = snapshot(src)
    diff = tree_diff(expected, without_tails(in_src, tails, "SRC"))
    assert not diff, f"SRC after sync differs from what was acknowledged:\n{diff}"
    expected["small/another"] = in_src["small/another"]  # from here on, what SRC took

    # Free the space: delete the big file, sync; writing works again.
    os.unlink(m.mnt / "big")
    done = m.sync(timeout=120)
    assert done.returncode == 0, describe(done)
    assert not (src / "big").exists()
    after, error = fill(m.mnt / "after", MIB, 8 * MIB)
    assert error is None, f"writing after space was freed failed: {error!r} (after {len(after)} bytes)"
    expected["after"] = bytes(after)
    assert status(m)["errors"] == []

    # The journal is consistent: a clean unmount, a remount on the same cache, the same tree.
    m.umount()
    diff = tree_diff(expected, snapshot(src))
    assert not diff, f"SRC after umount differs from what was acknowledged:\n{diff}"
    m2 = mount_factory(src, m.mnt, cache_dir, *ARGS)
    diff = tree_diff(expected, snapshot(m2.mnt))
    assert not diff, f"remount on the same cache differs from what was acknowledged:\n{diff}"
    (m2.mnt / "last").write_bytes(b"still writable")
    expected["last"] = b"still writable"
    m2.umount()
    diff = tree_diff(expected, snapshot(src))
    assert not diff, f"SRC after the second umount differs:\n{diff}"


def test_a_kill_with_the_cache_disk_full_loses_nothing_acknowledged(full_rig, tmp_path):
    """kill -9 while the cache disk is full: the replay (on the full disk) shows every
    acknowledged byte and writes it back."""
    cache_dir, mount_factory = full_rig
    src = tmp_path / "src"
    src.mkdir()
    m = mount_factory(src, None, cache_dir, *ARGS)
    first = os.urandom(200 * KIB)
    try:
        (m.mnt / "first").write_bytes(first)
    except OSError as exc:
        free = free_mib(cache_dir)
        pytest.fail(f"first write on an empty cache disk ({free} MiB free): {exc!r}", pytrace=False)
    big, error = fill(m.mnt / "big", MIB, 2 * DISK)
    assert error is not None and error.errno == errno.ENOSPC, f"filling the cache: {error!r}"
    assert len(big) >= MIN_ACCEPTED, f"ENOSPC after only {len(big) >> 20} MiB"
    m.kill()
    m2 = mount_factory(src, m.mnt, cache_dir, *ARGS)
    expected = {"first": first}
    replayed = snapshot(m2.mnt)
    diff = tree_diff(expected, without_tails(replayed, {"big": bytes(big)}, "the replay"))
    assert not diff, f"replay on a full cache disk differs from what was acknowledged:\n{diff}"
    expected["big"] = replayed["big"]
    m2.umount()
    diff = tree_diff(expected, snapshot(src))
    assert not diff, f"SRC after replay and umount differs:\n{diff}"
