"""The lease directory: invisible through the mount, readable by every user (DESIGN.md section 3).

What these tests check:
- `.safefs` at the root of the mount does not exist for anyone: lookup (and any path below it)
  is ENOENT on the writer and on a follower, listings leave it out, and the writer cannot
  create it (file, directory, symlink, hard link) or rename anything onto it; the lease files
  in SRC stay as they were;
- the lease files in SRC/.safefs/lease are readable by another user even when the daemon runs
  with umask 077: mode bits o+r (o+rx on directories), and a child running as uid/gid 65534
  reads each one.

Rules: plain hosts only (nothing here depends on namespaces); the project for the other-user
check lives in a world-traversable temp dir, since pytest's own temp dirs are 0700.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.multihost.conftest import snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]

NOBODY = 65534
HIDDEN = ".safefs"


@pytest.fixture
def public_src():
    """A project directory every user can reach (parents 0755). Requested before `cluster`,
    so it is removed after the daemons are gone."""
    parent = Path(tempfile.mkdtemp(prefix="safefs-public-"))
    try:
        os.chmod(parent, 0o755)
        src = parent / "src"
        src.mkdir()
        os.chmod(src, 0o755)
        yield src
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def as_nobody(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        argv, user=NOBODY, group=NOBODY, extra_groups=[], stdin=subprocess.DEVNULL,
        capture_output=True, timeout=30, cwd="/",
    )  # fmt: skip


@pytest.mark.parametrize("host_mode", ["plain"])
def test_safefs_dir_is_invisible_and_cannot_be_created_through_the_mount(cluster):
    a = cluster.start("hostA")
    a.wait_writable()
    b = cluster.start("hostB")
    a.write("x", "an ordinary file\n")
    a.call("mkdir", a.path("d"))
    a.sync_ok()
    assert (cluster.src / HIDDEN / "lease").is_dir()
    lease_before = snapshot(cluster.src / HIDDEN / "lease", skip=["tmp"])
    lease_before = {k: v for k, v in lease_before.items() if not k.startswith("hb.")}

    for host in (a, b):
        looked_up = {
            path: host.errno_of("stat", host.path(path))
            for path in (HIDDEN, f"{HIDDEN}/lease", f"{HIDDEN}/generation", f"{HIDDEN}/")
        }
        assert looked_up == dict.fromkeys(looked_up, errno.ENOENT), f"{host.name}: {looked_up}"
        assert host.errno_of("read", host.path(HIDDEN, "generation")) == errno.ENOENT
        assert HIDDEN not in host.listdir(), f"{host.name} lists {HIDDEN}"

    p = a.path
    attempts = {
        "create file": ("write", p(HIDDEN), "taken\n", "x"),
        "create-or-truncate": ("write", p(HIDDEN), "taken\n", "w"),
        "mkdir": ("mkdir", p(HIDDEN)),
        "symlink": ("symlink", "x", p(HIDDEN)),
        "hard link": ("link", p("x"), p(HIDDEN)),
        "rename file onto it": ("rename", p("x"), p(HIDDEN)),
        "rename dir onto it": ("rename", p("d"), p(HIDDEN)),
    }
    results = a.batch([(op, args) for op, *args in attempts.values()])
    succeeded = {what: r for what, r in zip(attempts, results) if "errno" not in r}
    assert not succeeded, f"the writer created {HIDDEN} at the root: {succeeded}"

    a.sync_ok()
    assert sorted(a.listdir()) == ["d", "x"]
    assert a.read("x") == b"an ordinary file\n"
    assert a.errno_of("stat", a.path(HIDDEN)) == errno.ENOENT
    assert sorted(os.listdir(cluster.src)) == [HIDDEN, "d", "x"]
    assert (cluster.src / "x").read_bytes() == b"an ordinary file\n"
    lease_after = snapshot(cluster.src / HIDDEN / "lease", skip=["tmp"])
    lease_after = {k: v for k, v in lease_after.items() if not k.startswith("hb.")}
    assert lease_after == lease_before, "the lease files changed"
    assert a.status()["role"] == "writer"


@pytest.mark.parametrize("host_mode", ["plain"])
def test_lease_files_are_readable_by_another_user(public_src, cluster):
    a = cluster.start("hostA", src=public_src, umask=0o077)
    a.wait_writable()
    a.write("f", "data\n")
    a.sync_ok("--release")  # adds released.N next to epoch.N and hb.N
    b = cluster.start("hostB", src=public_src, umask=0o077)  # takes epoch 2: a live holder's files
    b.wait_writable()

    control, lease = public_src / HIDDEN, public_src / HIDDEN / "lease"
    files = sorted(p for p in lease.iterdir() if p.is_file())
    names = {p.name for p in files}
    expected = {"epoch.000000000001", "hb.000000000001", "released.000000000001",
                "epoch.000000000002", "hb.000000000002"}  # fmt: skip
    assert expected <= names, f"lease files: {sorted(names)}"

    closed = {
        os.fspath(p.relative_to(public_src)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in (control, lease, *files)
        if (p.stat().st_mode & (0o005 if p.is_dir() else 0o004)) != (0o005 if p.is_dir() else 0o004)
    }
    assert not closed, f"not readable by others (mode bits): {closed}"

    listed = as_nobody("ls", os.fspath(lease))
    assert listed.returncode == 0, listed.stderr.decode()
    assert expected <= set(listed.stdout.decode().split())
    unreadable = {}
    for path in files:
        done = as_nobody("cat", os.fspath(path))
        if done.returncode != 0:
            unreadable[path.name] = done.stderr.decode().strip()
        elif path.name.startswith("epoch.") and done.stdout != path.read_bytes():
            unreadable[path.name] = "read different bytes"
    assert not unreadable, f"uid {NOBODY} cannot read: {unreadable}"

    # A follower run by another user also needs the published generation.
    generation = control / "generation"
    done = as_nobody("cat", os.fspath(generation))
    assert done.returncode == 0, f"uid {NOBODY} cannot read {generation}: {done.stderr.decode().strip()}"
