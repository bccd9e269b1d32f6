"""Unsafe or impossible set-ups are refused (DESIGN.md G7), through the real command line.

What these tests check: `python -m safefs mount ...`, both daemonizing (the default) and with
`--foreground`, refuses each bad set-up with exit code 3 (REFUSED), or 5 (BUSY) for a second
daemon on a cache dir; prints exactly one `safefs: error:` line naming the problem plus at
most one hint line, and nothing else; and leaves nothing mounted and no daemon running.

Rules: these tests start `safefs mount` themselves (that is what they test), so a fixture of
this module cleans up after an attempt that wrongly succeeds: it lazily unmounts the
mountpoint and kills, by pid, the daemon it started. Running mounts used as context come from
`mount_factory`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

REFUSED = 3
BUSY = 5


def is_mountpoint(path: Path) -> bool:
    target = os.fsencode(os.path.realpath(path))
    with open("/proc/self/mountinfo", "rb") as f:
        # Field 5 is the mount point; spaces in it are escaped as \040.
        return any(line.split()[4].replace(b"\\040", b" ") == target for line in f)


def pids_mentioning(path: Path) -> list[int]:
    """Processes whose command line names `path`: a daemon our attempt started."""
    needle = os.fsencode(str(path))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if needle in args:
            found.append(int(entry))
    return found


@pytest.fixture
def attempt(tmp_path):
    """`attempt(src, mnt, cache, foreground=...)` runs `safefs mount` and returns (rc, stderr).

    Whatever the attempt leaves behind (a mount, a daemon) is removed afterwards.
    """
    mountpoints: list[Path] = []

    def run(src: Path, mnt: Path, cache: Path, *, foreground: bool) -> tuple[int, str]:
        mountpoints.append(mnt)
        args = [sys.executable, "-m", "safefs", "mount", str(src), str(mnt), "--cache-dir", str(cache)]
        if foreground:
            args.append("--foreground")
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"`safefs mount` did not refuse: still running after 60 s ({args})")
        return proc.returncode, err

    yield run

    for mnt in mountpoints:
        if is_mountpoint(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        for pid in pids_mentioning(mnt):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def assert_refused(rc: int, stderr: str, mnt: Path, *, code: int, keywords: list[str]) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("safefs: error:")]
    assert len(errors) == 1, f"expected exactly one 'safefs: error:' line, stderr was:\n{stderr}"
    others = [line for line in lines if line != errors[0]]
    assert len(others) <= 1 and all(line.strip().startswith("hint:") for line in others), (
        f"stderr has more than the error line and one hint:\n{stderr}"
    )
    assert rc == code, f"exit code {rc}, expected {code}; stderr:\n{stderr}"
    message = errors[0].lower()
    assert any(k.lower() in message for k in keywords), (
        f"error line does not name the problem (expected one of {keywords}): {errors[0]}"
    )
    assert not is_mountpoint(mnt), f"{mnt} was left mounted"
    deadline = time.monotonic() + 10
    while pids_mentioning(mnt):
        assert time.monotonic() < deadline, f"a daemon for {mnt} is still running: {pids_mentioning(mnt)}"
        time.sleep(0.05)


def setup_case(tmp_path: Path, case: str) -> tuple[Path, Path, Path, list[str]]:
    """(src, mnt, cache_dir, keywords the error must contain one of) for a bad set-up."""
    src, mnt, cache = tmp_path / "project", tmp_path / "mountpoint", tmp_path / "cache"
    src.mkdir()
    mnt.mkdir()
    if case == "src-missing":
        src = tmp_path / "no-such-project"
        return src, mnt, cache, ["no-such-project", "does not exist", "no such", "not found", "missing"]
    if case == "src-is-a-file":
        src = tmp_path / "project-file"
        src.write_bytes(b"not a directory")
        return src, mnt, cache, ["not a directory", "project-file"]
    if case == "mnt-not-empty":
        (mnt / "precious").write_bytes(b"keep me")
        return src, mnt, cache, ["not empty", "empty"]
    if case == "mnt-inside-src":
        mnt = src / "inner-mountpoint"
        mnt.mkdir()
        return src, mnt, cache, ["inside", "within", "under", "below", "in the project"]
    if case == "mnt-inside-cache":
        cache.mkdir()
        mnt = cache / "inner-mountpoint"
        mnt.mkdir()
        return src, mnt, cache, ["cache"]
    raise AssertionError(case)


@pytest.mark.parametrize("foreground", [False, True], ids=["daemonize", "foreground"])
@pytest.mark.parametrize(
    "case", ["src-missing", "src-is-a-file", "mnt-not-empty", "mnt-inside-src", "mnt-inside-cache"]
)
def test_bad_setup_is_refused(tmp_path, attempt, case, foreground):
    src, mnt, cache, keywords = setup_case(tmp_path, case)
    before = sorted(os.listdir(mnt))
    rc, stderr = attempt(src, mnt, cache, foreground=foreground)
    assert_refused(rc, stderr, mnt, code=REFUSED, keywords=keywords)
    assert sorted(os.listdir(mnt)) == before
    if case == "mnt-not-empty":
        assert (mnt / "precious").read_bytes() == b"keep me"
    if case == "src-missing":
        assert not src.exists(), "a refused mount created the missing project"


@pytest.mark.fuse
@pytest.mark.parametrize("foreground", [False, True], ids=["daemonize", "foreground"])
def test_cache_dir_on_a_fuse_filesystem_is_refused(tmp_path, mount_factory, attempt, foreground):
    host = mount_factory()  # a running safefs mount is a FUSE filesystem
    cache = host.mnt / "cache-on-fuse"
    cache.mkdir()
    src, mnt = tmp_path / "other-project", tmp_path / "other-mountpoint"
    src.mkdir()
    mnt.mkdir()
    rc, stderr = attempt(src, mnt, cache, foreground=foreground)
    keywords = ["fuse", "network", "local", "file system", "filesystem"]
    assert_refused(rc, stderr, mnt, code=REFUSED, keywords=keywords)
    # Only the daemonizing CLI's log file may appear there; no journal, no cached content.
    assert set(os.listdir(cache)) <= {"daemon.log"}, f"the refused daemon used the cache: {os.listdir(cache)}"
    assert host.status()["role"] == "writer"


@pytest.mark.fuse
@pytest.mark.parametrize("foreground", [False, True], ids=["daemonize", "foreground"])
def test_second_daemon_on_the_same_cache_dir_is_busy(tmp_path, mount_factory, attempt, foreground):
    first = mount_factory()
    (first.mnt / "before").write_bytes(b"written before the second attempt")
    mnt2 = tmp_path / "second-mountpoint"
    mnt2.mkdir()
    rc, stderr = attempt(first.src, mnt2, first.cache_dir, foreground=foreground)
    assert_refused(rc, stderr, mnt2, code=BUSY, keywords=["cache", "busy", "in use", "another", "already"])
    # The first daemon is untouched and still works.
    st = first.status()
    assert st["pid"] == first.proc.pid and st["role"] == "writer"
    assert (first.mnt / "before").read_bytes() == b"written before the second attempt"
    (first.mnt / "after").write_bytes(b"still writable")
    first.umount()
    assert (first.src / "before").read_bytes() == b"written before the second attempt"
    assert (first.src / "after").read_bytes() == b"still writable"
