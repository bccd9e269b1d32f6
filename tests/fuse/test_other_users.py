"""Non-root users and other users' mounts (issue 11 item 8), run as the real user `nobody`.

What these tests check: `safefs mount` by a user who cannot open /dev/fuse is refused (exit 3)
before anything is mounted, naming /dev/fuse and how to fix it; --allow-other without
`user_allow_other` in /etc/fuse.conf is refused the same way, naming the line to add; and
`safefs status MNT` on root's mount, asked by nobody, says whose mount it is instead of
suggesting `fusermount3 -u -z`.

How: each command runs in a private mount namespace (`unshare -m`), where /dev/fuse and
/etc/fuse.conf are covered by files of the test's choosing and the directory holding this
Python (e.g. /root/.pyenv, under a 0700 /root) is made reachable, then drops to nobody with
setpriv. Nothing of the host's /dev or /etc changes; the namespace ends with the command.

Rules: mounts come only from the fixtures; no fixed sleeps.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import describe

pytestmark = [pytest.mark.timeout(120), pytest.mark.fuse]

REFUSED, NOT_MOUNTED = 3, 4


def _unreachable_ancestor(path: Path) -> tuple[Path, str] | None:
    """(dir, child) for the first ancestor of `path` that others cannot search, if any."""
    for parent in reversed(path.parents):
        if parent == Path("/"):
            continue
        if not os.stat(parent).st_mode & 0o001:
            return parent, path.relative_to(parent).parts[0]
    return None


def run_as_nobody(
    tmp_path: Path, args: list[str], *, fuse_mode: int, fuse_conf: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m safefs ARGS` as nobody, with /dev/fuse a file of `fuse_mode` (root-owned)."""
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is needed to run as another user (util-linux)")
    work = tmp_path / "ns"
    work.mkdir()
    fake_fuse = work / "fuse"
    fake_fuse.touch()
    fake_fuse.chmod(fuse_mode)
    lines = ["set -e", f"mount --bind {shlex.quote(str(fake_fuse))} /dev/fuse"]
    if fuse_conf is not None and os.path.exists("/etc/fuse.conf"):
        conf = work / "fuse.conf"
        conf.write_text(fuse_conf)
        lines.append(f"mount --bind {shlex.quote(str(conf))} /etc/fuse.conf")
    # What nobody must reach: the interpreter, the venv and this checkout. Where one lies below
    # a directory others cannot search (/root, say), that directory is covered by a tmpfs in
    # this mount namespace with just the needed children bound back in.
    needed = (Path(os.path.realpath(sys.executable)), Path(sys.executable).parent, Path(__file__).resolve())
    hidden: dict[Path, set[str]] = {}
    for path in needed:
        found = _unreachable_ancestor(path)
        if found is not None:
            hidden.setdefault(found[0], set()).add(found[1])
    for n, (top, children) in enumerate(sorted(hidden.items())):
        stages = []
        for m, child in enumerate(sorted(children)):
            stage = work / f"stage-{n}-{m}"
            stage.mkdir()
            stages.append((shlex.quote(str(top / child)), shlex.quote(str(stage))))
            lines.append(f"mount --bind {stages[-1][0]} {stages[-1][1]}")
        lines.append(f"mount -t tmpfs -o mode=755 tmpfs {shlex.quote(str(top))}")
        for inner, stage_path in stages:
            lines += [f"mkdir {inner}", f"mount --bind {stage_path} {inner}"]
    command = [sys.executable, "-m", "safefs", *args]
    lines.append("exec setpriv --reuid nobody --regid nogroup --clear-groups " + shlex.join(command))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "LANG": "C.UTF-8",
    }
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", "\n".join(lines)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        timeout=90,
    )


@pytest.fixture
def nobody_dirs():
    """src, mnt and cache dirs nobody owns, under a directory nobody can reach (tmp_path cannot)."""
    top = Path(tempfile.mkdtemp(prefix="safefs-nobody-"))
    top.chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    dirs = [top / "src", top / "mnt", top / "cache"]
    for path in dirs:
        path.mkdir()
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    yield dirs
    shutil.rmtree(top, ignore_errors=True)


def mount_args(dirs: list[Path], *extra: str) -> list[str]:
    src, mnt, cache = map(str, dirs)
    return ["mount", src, mnt, "--cache-dir", cache, *extra]


def test_mount_without_access_to_dev_fuse_says_how_to_fix_it(tmp_path, nobody_dirs):
    done = run_as_nobody(tmp_path, mount_args(nobody_dirs), fuse_mode=0o600)
    assert done.returncode == REFUSED, describe(done)
    assert "cannot open /dev/fuse" in done.stderr, describe(done)
    assert "chmod 0666 /dev/fuse" in done.stderr, describe(done)  # root:root 0600: no group to join
    assert "Traceback" not in done.stderr and "ExceptionGroup" not in done.stderr, describe(done)
    assert not (nobody_dirs[0] / ".safefs").exists(), "the lease was taken before the refusal"


def test_allow_other_without_user_allow_other_says_so(tmp_path, nobody_dirs):
    done = run_as_nobody(
        tmp_path, mount_args(nobody_dirs, "--allow-other"), fuse_mode=0o666, fuse_conf="# mount_max = 1000\n"
    )
    assert done.returncode == REFUSED, describe(done)
    assert "user_allow_other" in done.stderr and "/etc/fuse.conf" in done.stderr, describe(done)
    assert "--allow-other" in done.stderr, describe(done)
    assert not (nobody_dirs[0] / ".safefs").exists(), "the lease was taken before the refusal"


def test_status_on_another_users_mount_says_whose_it_is(mounted, tmp_path):
    done = run_as_nobody(tmp_path, ["status", str(mounted.mnt)], fuse_mode=0o666)
    assert done.returncode == NOT_MOUNTED, describe(done)
    assert "root's mount" in done.stderr, describe(done)
    assert "fusermount3" not in done.stderr, describe(done)
    assert mounted.alive and mounted.is_mounted()
