"""Security of a real mount (issue 4 item 8; DESIGN.md G7, section 7).

What these tests check:
- The cache dir and everything in it are 0700 (dirs) / 0600 (files), owned by the mounting
  user, whatever the daemon's umask, with cached and dirty data in it.
- The control socket refuses another user (peer uid), even if its file permissions let the
  other user connect: no status data leaks.
- Another local user cannot read cached contents of a file they could not read in SRC.
- Without --allow-other no other user reaches the mount (EACCES); with --allow-other the
  kernel checks modes (default_permissions).
- Files in SRC/.safefs/ swapped for symlinks to an outside directory cannot make safefs
  write outside SRC.

"Another user" is uid/gid 65534 (nobody) with no supplementary groups, in a forked child of
the test process. These tests need root (to setuid); they skip otherwise. Everything they
create lives below a world-traversable directory, so an EACCES comes from safefs or the
kernel's FUSE checks, not from a private pytest temp dir on the way.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from safefs.config import socket_path
from tests.helpers import Mount, MountFactory, describe, is_mounted, lazy_unmount, run_safefs

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user"),
]

NOBODY = 65534
LONG_DELAY = ("--writeback-delay", "600")


# --------------------------------------------------------------------------- helpers


def as_nobody(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run `fn` in a forked child as uid/gid 65534 without supplementary groups.

    Returns {"ok": value} (value JSON-able), {"errno": n, "name": "EACCES", "msg": ...} for
    an OSError, or {"exc": repr} for anything else.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                result: dict[str, Any] = {"ok": fn()}
            except OSError as exc:
                result = {
                    "errno": exc.errno,
                    "name": errno.errorcode.get(exc.errno or 0, "?"),
                    "msg": str(exc),
                }
            except BaseException as exc:  # report, do not unwind into pytest's machinery
                result = {"exc": repr(exc)}
            os.write(w, json.dumps(result).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child running as nobody failed"
    return json.loads(b"".join(chunks))


def read_bytes_hex(path: str | os.PathLike[str]) -> Callable[[], str]:
    return lambda: Path(path).read_bytes().hex()


def errno_name(result: dict[str, Any]) -> str:
    return result.get("name") or ("success" if "ok" in result else result.get("exc", "?"))


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A fresh directory under /tmp that every user may traverse (0755).

    Tests list it before `mount_factory`, so it is removed after the daemons are reaped.
    """
    root = Path(tempfile.mkdtemp(prefix="safefs-security-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        for mnt in sorted(root.rglob("mnt*"), key=lambda p: len(p.parts), reverse=True):
            if is_mounted(mnt):
                lazy_unmount(mnt)
        shutil.rmtree(root, ignore_errors=True)


def make_layout(root: Path) -> tuple[Path, Path, Path]:
    """src (0755), mnt (0755) and the cache path (not created) below `root`."""
    src, mnt = root / "src", root / "mnt"
    for d in (src, mnt):
        d.mkdir()
        d.chmod(0o755)
    return src, mnt, root / "cache"


def walk_all(top: Path) -> list[Path]:
    out = [top]
    for dirpath, dirs, names in os.walk(top):
        out += [Path(dirpath, n) for n in dirs + names]
    return out


def assert_private(cache_dir: Path) -> None:
    uid = os.getuid()
    bad = []
    for p in walk_all(cache_dir):
        st = os.lstat(p)
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid != uid:
            bad.append(f"{p}: owner uid {st.st_uid}, not {uid}")
        if stat.S_ISDIR(st.st_mode):
            if mode != 0o700:
                bad.append(f"{p}: dir mode {mode:o}")
        elif stat.S_ISREG(st.st_mode):
            if mode != 0o600:
                bad.append(f"{p}: file mode {mode:o}")
        elif stat.S_ISSOCK(st.st_mode):
            if mode & 0o077:
                bad.append(f"{p}: socket mode {mode:o}")
        else:
            bad.append(f"{p}: unexpected file type {stat.S_IFMT(st.st_mode):o} (mode {mode:o})")
    assert not bad, "cache dir is not private:\n" + "\n".join(bad)


def fill_cache(m: Mount) -> None:
    """Clean cached data, dirty data, a new directory, xattrs: every kind of cache content."""
    for name in sorted(os.listdir(m.src)):
        if not name.startswith(".") and (m.src / name).is_file():
            (m.mnt / name).read_bytes()
    (m.mnt / "dirty").write_bytes(b"dirty data " * 1000)
    os.mkdir(m.mnt / "newdir")
    (m.mnt / "newdir" / "f").write_bytes(b"nested")
    os.setxattr(m.mnt / "dirty", "user.k", b"v")
    fd = os.open(m.mnt / "dirty", os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- cache dir modes


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_cache_dir_is_private(open_root: Path, mount_factory: MountFactory, umask: int) -> None:
    src, mnt, cache = make_layout(open_root)
    (src / "public").write_bytes(b"world-readable in SRC " * 100)
    (src / "public").chmod(0o644)
    (src / "secret").write_bytes(b"0600 in SRC " * 100)
    (src / "secret").chmod(0o600)
    old = os.umask(umask)  # the daemon inherits it
    try:
        m = mount_factory(src, mnt, cache)
    finally:
        os.umask(old)
    fill_cache(m)
    assert_private(cache)
    done = m.sync()
    assert done.returncode == 0, describe(done)
    assert_private(cache)
    m.umount()
    assert_private(cache)


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_daemonized_log_and_cache_are_private(open_root: Path, umask: int) -> None:
    """Without --foreground the daemon logs to <cache>/daemon.log: private too."""
    src, mnt, cache = make_layout(open_root)
    (src / "f").write_bytes(b"x")
    old = os.umask(umask)
    try:
        done = run_safefs(
            "mount", src, mnt, "--cache-dir", cache, "--writeback-delay", "0.5", timeout=60
        )
    finally:
        os.umask(old)
    try:
        assert done.returncode == 0, describe(done)
        (mnt / "g").write_bytes(b"y")
        assert (cache / "daemon.log").exists(), sorted(os.listdir(cache))
        assert_private(cache)
        down = run_safefs("umount", mnt, timeout=60)
        assert down.returncode == 0, describe(down)
        assert_private(cache)
    finally:
        if is_mounted(mnt):
            run_safefs("umount", mnt, timeout=60)
        if is_mounted(mnt):
            pid = None
            status = run_safefs("status", mnt, "--json", timeout=20)
            if status.returncode == 0:
                pid = json.loads(status.stdout).get("pid")
            lazy_unmount(mnt)
            if pid:
                try:
                    os.kill(pid, 15)
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline:  # not our child: poll until it is gone
                        os.kill(pid, 0)
                        time.sleep(0.1)
                except ProcessLookupError:
                    pass


# --------------------------------------------------------------------------- control socket


def status_request() -> bytes:
    return json.dumps({"v": 1, "op": "status", "args": {}}).encode() + b"\n"


def ask(path: str) -> Callable[[], str]:
    """Connect to the control socket at `path`, ask for status, return everything it sent."""

    def run() -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            try:
                s.sendall(status_request())
            except (BrokenPipeError, ConnectionResetError):
                pass
            chunks = []
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")

    return run


def assert_no_status_data(result: dict[str, Any], m: Mount) -> None:
    if "ok" not in result:
        return  # refused outright (an errno, e.g. EACCES at connect)
    text = result["ok"]
    assert str(m.src) not in text and str(m.cache_dir) not in text, f"status data leaked: {text!r}"
    for line in filter(None, text.splitlines()):
        reply = json.loads(line)
        assert (
            "result" not in reply and reply.get("ok") is not True
        ), f"another user got an answer: {reply}"


def test_control_socket_refuses_another_user(open_root: Path, mount_factory: MountFactory) -> None:
    src, mnt, cache = make_layout(open_root)
    m = mount_factory(src, mnt, cache)
    sock = socket_path(m.mnt.resolve(), m.env, os.getuid())
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    dst = os.stat(sock.parent)
    assert dst.st_uid == os.getuid() and stat.S_IMODE(dst.st_mode) == 0o700, oct(dst.st_mode)
    # Root itself gets an answer (sanity check of the request we send).
    mine = json.loads(ask(str(sock))().splitlines()[-1])
    assert mine.get("ok") is True and mine["result"]["src"] == str(m.src), mine

    plain = as_nobody(ask(str(sock)))
    assert "ok" not in plain, f"nobody reached the control socket: {plain}"
    assert plain.get("name") in ("EACCES", "EPERM"), plain

    # With the file permissions out of the way, the peer-uid check alone must refuse.
    exposed_dir = open_root / "exposed"
    exposed_dir.mkdir(mode=0o755)
    exposed_dir.chmod(0o755)
    exposed = exposed_dir / "ctl.sock"
    os.link(sock, exposed)
    os.chmod(exposed, 0o666)
    try:
        through = as_nobody(ask(str(exposed)))
    finally:
        os.chmod(exposed, 0o600)  # same inode as the real socket: restore its mode
        os.unlink(exposed)
    print(f"control socket as nobody: plain -> {errno_name(plain)}; with 0666 -> {through}")
    assert_no_status_data(through, m)
    assert m.status()["role"] == "writer", "the daemon stopped answering its owner"


# --------------------------------------------------------------------------- cached contents


def test_other_user_cannot_read_cached_contents(
    open_root: Path, mount_factory: MountFactory
) -> None:
    src, mnt, cache = make_layout(open_root)
    secret = b"TOP-SECRET-" + os.urandom(8).hex().encode() + b"\n"
    (src / "secret").write_bytes(secret * 200)
    (src / "secret").chmod(0o600)
    assert "errno" in as_nobody(
        read_bytes_hex(src / "secret")
    ), "nobody can read SRC/secret: bad setup"
    m = mount_factory(src, mnt, cache, *LONG_DELAY)
    assert (m.mnt / "secret").read_bytes() == secret * 200  # cached now
    written = b"DIRTY-SECRET-" + os.urandom(8).hex().encode()
    fd = os.open(m.mnt / "mine", os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, written)
    os.close(fd)
    holders = [
        p
        for p in walk_all(cache)
        if p.is_file() and (secret in p.read_bytes() or written in p.read_bytes())
    ]
    assert holders, "the secret is not in the cache dir: the test proves nothing"

    assert as_nobody(lambda: os.listdir(cache)).get("name") == "EACCES"
    for p in walk_all(cache):
        if p == cache or not p.is_file():
            continue
        got = as_nobody(read_bytes_hex(p))
        assert "ok" not in got, f"nobody read {p}"
        assert got.get("name") == "EACCES", f"{p}: {got}"
    # Nor through the mount (allow_other is off), nor in SRC.
    assert as_nobody(read_bytes_hex(m.mnt / "secret")).get("name") == "EACCES"
    done = m.sync()
    assert done.returncode == 0, describe(done)
    assert stat.S_IMODE(os.stat(src / "mine").st_mode) == 0o600
    assert as_nobody(read_bytes_hex(src / "mine")).get("name") == "EACCES"


# --------------------------------------------------------------------------- allow_other


def test_without_allow_other_no_other_user_reaches_the_mount(
    open_root: Path, mount_factory: MountFactory
) -> None:
    src, mnt, cache = make_layout(open_root)
    (src / "pub").write_bytes(b"public")
    (src / "pub").chmod(0o644)
    (src / "dir").mkdir(mode=0o777)
    (src / "dir").chmod(0o777)
    m = mount_factory(src, mnt, cache)
    assert as_nobody(read_bytes_hex(src / "pub")) == {"ok": b"public".hex()}  # SRC itself is open
    attempts: dict[str, Callable[[], Any]] = {
        "stat mnt": lambda: os.stat(m.mnt).st_mode,
        "listdir mnt": lambda: os.listdir(m.mnt),
        "stat pub": lambda: os.stat(m.mnt / "pub").st_mode,
        "read pub": read_bytes_hex(m.mnt / "pub"),
        "create in dir": lambda: os.close(
            os.open(m.mnt / "dir" / "x", os.O_CREAT | os.O_WRONLY, 0o644)
        ),
        "mkdir in dir": lambda: os.mkdir(m.mnt / "dir" / "y"),
    }
    results = {what: as_nobody(fn) for what, fn in attempts.items()}
    print(f"without allow_other: { {k: errno_name(v) for k, v in results.items()} }")
    for what, result in results.items():
        assert result.get("name") == "EACCES", f"{what} as nobody: {result}"
    assert sorted(os.listdir(m.mnt)) == ["dir", "pub"]
    m.umount()
    assert sorted(os.listdir(src / "dir")) == []


def test_allow_other_lets_the_kernel_check_modes(
    open_root: Path, mount_factory: MountFactory
) -> None:
    src, mnt, cache = make_layout(open_root)
    files = {"pub": (b"public", 0o644), "priv": (b"private", 0o600), "shared": (b"shared", 0o666)}
    for name, (data, mode) in files.items():
        (src / name).write_bytes(data)
        (src / name).chmod(mode)
    (src / "closed").mkdir()
    (src / "closed").chmod(0o700)
    (src / "closed" / "inner").write_bytes(b"inner")
    (src / "closed" / "inner").chmod(0o644)
    (src / "drop").mkdir()
    (src / "drop").chmod(0o777)
    m = mount_factory(src, mnt, cache, "--allow-other")

    def mnt(*parts: str) -> Path:
        return m.mnt.joinpath(*parts)

    assert as_nobody(read_bytes_hex(mnt("pub"))) == {"ok": b"public".hex()}
    assert as_nobody(read_bytes_hex(mnt("priv"))).get("name") == "EACCES"
    assert sorted(as_nobody(lambda: os.listdir(mnt()))["ok"]) == [
        "closed",
        "drop",
        "priv",
        "pub",
        "shared",
    ]
    assert as_nobody(lambda: os.open(mnt("pub"), os.O_WRONLY)).get("name") == "EACCES"
    assert as_nobody(lambda: os.truncate(mnt("pub"), 0)).get("name") == "EACCES"
    assert as_nobody(lambda: os.chmod(mnt("pub"), 0o666)).get("name") == "EPERM"
    assert as_nobody(lambda: os.unlink(mnt("pub"))).get("name") == "EACCES"
    assert as_nobody(lambda: os.mkdir(mnt("nope"))).get("name") == "EACCES"
    assert as_nobody(lambda: os.listdir(mnt("closed"))).get("name") == "EACCES"
    assert as_nobody(read_bytes_hex(mnt("closed", "inner"))).get("name") == "EACCES"

    def write_shared() -> int:
        with open(mnt("shared"), "r+b") as f:
            return f.write(b"SHARED")

    def create_own() -> list[int]:
        with open(mnt("drop", "mine"), "wb") as f:
            f.write(b"made by nobody")
        st = os.stat(mnt("drop", "mine"))
        return [st.st_uid, st.st_gid]

    assert as_nobody(write_shared) == {"ok": 6}
    assert as_nobody(create_own) == {"ok": [NOBODY, NOBODY]}
    assert (mnt("shared")).read_bytes() == b"SHARED"
    done = m.sync()
    assert done.returncode == 0, describe(done)
    assert (src / "shared").read_bytes() == b"SHARED"
    st = os.stat(src / "drop" / "mine")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), "owner of a file nobody created, in SRC"
    assert (src / "drop" / "mine").read_bytes() == b"made by nobody"
    for name, (_data, mode) in files.items():
        assert stat.S_IMODE(os.stat(src / name).st_mode) == mode
    assert (src / "priv").read_bytes() == b"private"
    m.umount()


# --------------------------------------------------------------------------- .safefs redirects


SWAPS = ["staging", "staging/EPOCH", "generation", "lease/hb.EPOCH", "lease/tmp", "lease"]


def outside_snapshot(out: Path) -> dict[str, bytes | str]:
    """Contents below `out`; a directory's mtime too, so a file made and removed again shows."""
    snap: dict[str, bytes | str] = {}
    for p in walk_all(out):
        rel = os.path.relpath(p, out)
        if p.is_symlink():
            snap[rel] = "symlink"
        elif p.is_dir():
            snap[rel] = f"dir, mtime {os.stat(p).st_mtime_ns}"
        else:
            snap[rel] = p.read_bytes()
    return snap


@pytest.mark.parametrize("swap", SWAPS)
def test_safefs_dir_symlinks_cannot_redirect_writes(
    open_root: Path, mount_factory: MountFactory, swap: str
) -> None:
    """Replace one object in SRC/.safefs with a symlink to an outside directory (or file)
    while mounted; then write, sync, wait for lease renewals, unmount: nothing outside changes.
    """
    src, mnt, cache = make_layout(open_root)
    (src / "old").write_bytes(b"old contents")
    outside = open_root / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"outside file that safefs must never touch")
    m = mount_factory(src, mnt, cache, "--lease-renew", "0.3")
    (m.mnt / "first").write_bytes(b"first")
    done = m.sync()
    assert done.returncode == 0, describe(done)  # staging/<epoch> and generation exist now
    epoch = m.status()["lease"]["epoch"]
    rel = swap.replace("EPOCH", str(epoch) if swap.startswith("staging") else f"{epoch:012d}")
    victim = src / ".safefs" / rel
    assert (
        victim.exists()
    ), f"{victim} does not exist; .safefs has {sorted(p.name for p in walk_all(src / '.safefs'))}"

    if victim.is_dir():
        # Keep what the lease needs visible through the link: copy it, so the link target
        # is a believable directory and any write safefs makes there is seen.
        shutil.copytree(victim, outside / "copy", symlinks=True)
        shutil.rmtree(victim)
        target = outside / "copy"
    else:
        victim.unlink()
        target = outside / "victim"
    os.symlink(target, victim)
    before = outside_snapshot(outside)

    assert (m.mnt / "old").read_bytes() == b"old contents"
    (m.mnt / "old").write_bytes(b"new contents of old")
    (m.mnt / "new").write_bytes(b"a new file")
    synced = m.sync("--timeout", "20", timeout=60)
    time.sleep(1.5)  # several lease renewals (--lease-renew 0.3)
    after_sync = outside_snapshot(outside)
    status = m.status() if m.alive else {}
    down = m.umount("--timeout", "20", check=False, timeout=60)
    try:
        m.proc.wait(timeout=10)
    except Exception:
        pass
    after_umount = outside_snapshot(outside)
    print(
        f".safefs/{rel} -> {target}: sync exit {synced.returncode}, umount exit {down.returncode}; "
        f"role {status.get('role')}, errors {status.get('errors')}; "
        f"SRC old={(src / 'old').read_bytes()!r} "
        f"new={(src / 'new').read_bytes() if (src / 'new').exists() else None!r}"
    )
    assert (
        after_sync == before
    ), f"safefs wrote outside SRC through .safefs/{rel}: {changes(before, after_sync)}"
    assert (
        after_umount == before
    ), f"safefs wrote outside SRC through .safefs/{rel} at umount: {changes(before, after_umount)}"


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(before) | set(after)):
        if before.get(k) != after.get(k):
            out.append(
                f"{k}: {before.get(k, '<absent>')!r:.60} -> {after.get(k, '<absent>')!r:.60}"
            )
    return out


def test_after_a_staging_symlink_is_removed_sync_publishes(
    open_root: Path, mount_factory: MountFactory
) -> None:
    """While .safefs/staging is a symlink out of SRC, write-back must stop (not follow it);
    once the link is gone, the next sync publishes everything: nothing was lost meanwhile."""
    src, mnt, cache = make_layout(open_root)
    (src / "old").write_bytes(b"old contents")
    outside = open_root / "outside"
    outside.mkdir()
    m = mount_factory(src, mnt, cache, *LONG_DELAY)
    (m.mnt / "first").write_bytes(b"first")
    done = m.sync()
    assert done.returncode == 0, describe(done)
    staging = src / ".safefs" / "staging"
    shutil.rmtree(staging)
    os.symlink(outside, staging)
    assert (m.mnt / "old").read_bytes() == b"old contents"
    (m.mnt / "old").write_bytes(b"new contents of old")
    (m.mnt / "new").write_bytes(b"a new file")
    blocked = m.sync("--timeout", "10", timeout=60)
    assert list(outside.iterdir()) == []
    os.unlink(staging)
    done = m.sync("--timeout", "30", timeout=70)
    st = m.status()
    print(
        f"staging symlink: sync while linked exit {blocked.returncode}, after removal "
        f"{done.returncode}; dirty_files {st['dirty_files']}, pending_ops {st['pending_ops']}, "
        f"errors {st['errors']}, conflicts {st['conflicts']}; SRC {sorted(os.listdir(src))}"
    )
    assert done.returncode == 0, describe(done)
    assert (src / "old").read_bytes() == b"new contents of old"
    assert (src / "new").read_bytes() == b"a new file"
    assert list(outside.iterdir()) == []
    m.umount()
    assert (src / "new").read_bytes() == b"a new file"
