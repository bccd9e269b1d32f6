"""Write-back through a real mount (DESIGN.md G2, G3, sections 4 and 5).

What these tests check: writes land in the cache first (SRC unchanged right after a write,
`status` counts them dirty), reach SRC by themselves after the write-back delay and at
unmount, byte for byte and with their attributes; namespace changes replay in order even in
awkward interleavings; reads fetch only the ranges they need; clean data is evicted under a
cache limit and dirty data never is.

A seeded random sequence of operations is checked against an in-memory model of the tree, on
the mount while it runs, on SRC after each `safefs sync`, and on SRC after unmount.

Rules: mounts come only from the `mount_factory`/`mounted` fixtures; waits poll with a
deadline. The fixture starts every mount with `--writeback-delay 0.5`; a test that needs
another value passes it again (the last value on the command line wins).
"""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
LONG_DELAY = ("--writeback-delay", "600")  # nothing is written back on its own during the test


# --------------------------------------------------------------------------- helpers


def until(fn: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll `fn` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def snapshot(root: Path) -> dict[str, object]:
    """The tree below `root`: {relpath: "dir" | bytes | ("symlink", target)}, without .safefs."""
    tree: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == ".":
            rel_dir = ""
            dirnames[:] = [d for d in dirnames if d != ".safefs"]
        for name in dirnames + filenames:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            full = os.path.join(dirpath, name)
            mode = os.lstat(full).st_mode
            if stat.S_ISLNK(mode):
                tree[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(mode):
                tree[rel] = "dir"
            elif stat.S_ISREG(mode):
                with open(full, "rb") as f:
                    tree[rel] = f.read()
            else:
                tree[rel] = ("special", stat.S_IFMT(mode))
    return tree


def describe(value: object) -> str:
    if isinstance(value, bytes):
        return f"file of {len(value)} bytes"
    return repr(value)


def tree_diff(expected: dict[str, object], actual: dict[str, object]) -> str:
    """A short human-readable difference of two snapshots ("" if equal)."""
    lines = []
    for path in sorted(set(expected) | set(actual)):
        want, got = expected.get(path, "<absent>"), actual.get(path, "<absent>")
        if want == got:
            continue
        line = f"  {path}: expected {describe(want)}, got {describe(got)}"
        if isinstance(want, bytes) and isinstance(got, bytes):
            first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            line += f" (first difference at byte {first})"
        lines.append(line)
    return "\n".join(lines)


def assert_tree(root: Path, expected: dict[str, object], where: str) -> None:
    diff = tree_diff(expected, snapshot(root))
    assert not diff, f"{where} differs from what was written:\n{diff}"


def assert_no_staging_leftovers(src: Path) -> None:
    """After a clean unmount no staging file may be left, inside or outside .safefs."""
    staging = src / ".safefs" / "staging"
    leftovers = [str(p) for p in staging.rglob("*") if p.is_file()] if staging.exists() else []
    assert not leftovers, f"staging files left after a clean unmount: {leftovers[:10]}"


def drop_page_cache(path: Path) -> None:
    """Make the kernel forget its cached pages of `path`, so the next read asks the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def cache_content_bytes(cache_dir: Path) -> int:
    """Disk space used by cached contents: every file in the cache dir but the journal and logs."""
    total = 0
    for p in cache_dir.rglob("*"):
        if p.is_file() and not p.is_symlink() and not p.name.endswith((".mdb", "-lock", ".log", ".sock")):
            total += p.stat().st_blocks * 512
    return total


# --------------------------------------------------------------------------- dirty, then written back


def test_src_unchanged_until_writeback_then_equal(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    old = b"old bytes in SRC\n" * 1000
    (src / "existing").write_bytes(old)
    delay = 3.0
    m = mount_factory(src, None, None, "--writeback-delay", str(delay))
    new = os.urandom(300 * KIB)
    fresh = os.urandom(123_457)
    write_file(m.mnt / "existing", new)
    write_file(m.mnt / "fresh", fresh)
    closed_at = time.monotonic()
    # Right after close: SRC must not have changed (no write-through).
    assert (src / "existing").read_bytes() == old, "SRC changed right after the write (write-through?)"
    assert not (src / "fresh").exists(), "new file appeared in SRC right after the write"
    st = m.status()
    assert time.monotonic() - closed_at < delay, "test too slow to observe the dirty state"
    assert st["dirty_bytes"] > 0, st
    assert st["dirty_bytes"] >= len(new) + len(fresh), st
    assert st["dirty_files"] >= 2, st
    # Through the mount the new bytes are visible at once.
    assert (m.mnt / "existing").read_bytes() == new
    assert (m.mnt / "fresh").read_bytes() == fresh
    # Without any sync, write-back happens on its own after the delay.
    until(lambda: read_or_none(src / "existing") == new, 60, "existing file written back")
    until(lambda: read_or_none(src / "fresh") == fresh, 60, "new file written back")
    until(lambda: m.status()["dirty_bytes"] == 0, 30, "dirty_bytes back to 0")
    m.umount()
    assert_tree(src, {"existing": new, "fresh": fresh}, "SRC after umount")
    assert_no_staging_leftovers(src)


def test_what_is_removed_before_write_back_never_reaches_src(mount_factory, tmp_path):
    """An extract removed again, a build's temporary files, SQLite's rollback journal: made
    and removed before the write-back delay ran out, they leave nothing to write back, and
    their cached contents leave the cache dir with them."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_bytes(b"kept")
    m = mount_factory(src, None, None, *LONG_DELAY)
    tree = m.mnt / "tree"
    for i in range(24):
        d = tree / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        write_file(d / f"f{i}", os.urandom(64 * KIB))
    os.symlink("f0", tree / "d0" / "link")
    con = sqlite3.connect(m.mnt / "keep.db", isolation_level=None)
    con.execute("pragma journal_mode=delete")
    con.execute("pragma synchronous=full")
    con.execute("create table t (v text)")
    for i in range(20):
        con.execute("begin")
        con.execute("insert into t values (?)", (f"row {i}",))
        con.execute("commit")
    con.close()
    assert cache_content_bytes(m.cache_dir) >= 24 * 64 * KIB
    subprocess.run(["rm", "-r", str(tree)], check=True, timeout=60)
    st = m.status()
    assert st["pending_ops"] == 1, st  # the database's create; nothing of the tree or the journal
    assert st["dirty_files"] == 2, st  # the database, and the times of the top directory
    until(lambda: cache_content_bytes(m.cache_dir) < 24 * 64 * KIB, 30, "the removed files' contents to go")
    assert (src / "keep").read_bytes() == b"kept"
    assert sorted(p.name for p in src.iterdir() if p.name != ".safefs") == ["keep"]
    m.sync()
    assert sorted(p.name for p in src.iterdir() if p.name != ".safefs") == ["keep", "keep.db"]
    con = sqlite3.connect(src / "keep.db")
    assert con.execute("select count(*) from t").fetchone()[0] == 20
    con.close()
    m.umount()
    assert_no_staging_leftovers(src)


def test_umount_writes_back_everything(mount_factory, tmp_path):
    m = mount_factory(None, None, None, *LONG_DELAY)
    expected: dict[str, object] = {"d": "dir", "d/e": "dir"}
    os.makedirs(m.mnt / "d" / "e")
    for i, size in enumerate([0, 1, 4095, 4096, 4097, 1 * MIB + 3, 5 * MIB]):
        data = os.urandom(size)
        name = f"d/e/f{i}" if i % 2 else f"f{i}"
        write_file(m.mnt / name, data)
        expected[name] = data
    assert m.status()["dirty_files"] >= 7
    early = [n for n, d in expected.items() if isinstance(d, bytes) and d and read_or_none(m.src / n) == d]
    assert not early, f"data reached SRC before its write-back delay: {early}"
    m.umount()
    assert_tree(m.src, expected, "SRC after umount")
    assert_no_staging_leftovers(m.src)


# --------------------------------------------------------------------------- model-based random sequence


class TreeModel:
    """What the tree should look like.

    Files are {path: bytearray}; hard links share one bytearray object, so a write through one
    name shows under every name. Symlinks are {path: target}; directories a set.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}
        self.links: dict[str, str] = {}
        self.dirs: set[str] = set()

    def expected(self) -> dict[str, object]:
        tree: dict[str, object] = {d: "dir" for d in self.dirs}
        tree.update({p: bytes(b) for p, b in self.files.items()})
        tree.update({p: ("symlink", t) for p, t in self.links.items()})
        return tree

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.dirs or path in self.links

    def is_empty_dir(self, path: str) -> bool:
        prefix = path + "/"
        return path in self.dirs and not any(
            p.startswith(prefix) for p in [*self.files, *self.dirs, *self.links]
        )

    def hard_link_groups(self) -> list[list[str]]:
        """Paths that name one file, for every file with more than one name."""
        groups: dict[int, list[str]] = {}
        for path, buf in self.files.items():
            groups.setdefault(id(buf), []).append(path)
        return [sorted(g) for g in groups.values() if len(g) > 1]

    def move(self, old: str, new: str) -> None:
        """rename(old, new) where new is absent, an empty dir, or a non-directory."""
        if old in self.files or old in self.links:
            if old in self.files and self.files.get(new) is self.files[old]:
                return  # two names of one file: rename(2) does nothing
            self.files.pop(new, None)
            self.links.pop(new, None)
            if old in self.files:
                self.files[new] = self.files.pop(old)
            else:
                self.links[new] = self.links.pop(old)
            return
        self.dirs.discard(new)
        prefix = old + "/"

        def moved(p: str) -> str:
            return new + p[len(old) :] if p == old or p.startswith(prefix) else p

        self.dirs = {moved(d) for d in self.dirs}
        self.files = {moved(p): b for p, b in self.files.items()}
        self.links = {moved(p): t for p, t in self.links.items()}


FILE_NAMES = ["a", "b", "c", "d", "e"]
DIR_NAMES = ["x", "y", "z"]
WRITE_SIZES = [1, 17, 4095, 4096, 4097, 65536, 300_000]


def depth(path: str) -> int:
    return path.count("/") + 1 if path else 0


class RandomSession:
    """Applies seeded random operations to the mount and to the model, checking as it goes."""

    def __init__(self, mount, seed: int, delay: float, remount: Callable | None = None) -> None:
        self.m = mount
        self.remount = remount  # given: the sequence also kills the daemon and mounts again
        self.rng = random.Random(seed)
        self.seed = seed
        self.delay = delay
        self.model = TreeModel()
        self.log: list[str] = []
        self.fds: list[tuple[int, bytearray]] = []  # open descriptors and the file they reach

    def where(self) -> str:
        return f"seed {self.seed}, after ops:\n    " + "\n    ".join(self.log[-15:])

    def p(self, rel: str) -> Path:
        return self.m.mnt / rel

    def random_dir(self) -> str:
        return self.rng.choice(["", *sorted(self.model.dirs)])

    def new_path(self, names: list[str], max_depth: int = 3) -> str | None:
        parent = self.random_dir()
        if depth(parent) >= max_depth:
            return None
        name = self.rng.choice(names)
        return f"{parent}/{name}" if parent else name

    # Each op returns a description, or None when it does not apply to the current tree.

    def op_write(self):
        files = sorted(self.model.files)
        if files and self.rng.random() < 0.7:
            path = self.rng.choice(files)
        else:
            path = self.new_path(FILE_NAMES)
            if path is None or path in self.model.dirs or path in self.model.links:
                return None
        buf = self.model.files.get(path, bytearray())
        offset = self.rng.randint(0, len(buf) + 5000)
        data = self.rng.randbytes(self.rng.choice(WRITE_SIZES))
        fd = os.open(self.p(path), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(data)] = data
        self.model.files[path] = buf
        return f"write {path} @{offset} +{len(data)}"

    def op_truncate(self):
        if not self.model.files:
            return None
        path = self.rng.choice(sorted(self.model.files))
        buf = self.model.files[path]
        size = self.rng.choice([0, self.rng.randint(0, len(buf)), len(buf) + self.rng.randint(1, 100_000)])
        os.truncate(self.p(path), size)
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
        return f"truncate {path} {size}"

    def op_rename_file(self):
        names = sorted([*self.model.files, *self.model.links])
        if not names:
            return None
        old = self.rng.choice(names)
        new = self.new_path(FILE_NAMES)
        if new is None or new == old or new in self.model.dirs:
            return None
        os.rename(self.p(old), self.p(new))
        self.model.move(old, new)
        return f"rename {old} -> {new}"

    def op_rename_dir(self):
        if not self.model.dirs:
            return None
        old = self.rng.choice(sorted(self.model.dirs))
        new = self.new_path(DIR_NAMES, max_depth=2)
        if new is None or new == old or new.startswith(old + "/") or new in self.model.files:
            return None
        if new in self.model.links or (new in self.model.dirs and not self.model.is_empty_dir(new)):
            return None
        subtree_depth = max(depth(d) for d in self.model.dirs if d == old or d.startswith(old + "/"))
        if depth(new) + subtree_depth - depth(old) > 4:
            return None
        os.rename(self.p(old), self.p(new))
        self.model.move(old, new)
        return f"rename dir {old} -> {new}"

    def op_unlink(self):
        names = sorted([*self.model.files, *self.model.links])
        if not names:
            return None
        path = self.rng.choice(names)
        os.unlink(self.p(path))
        self.model.files.pop(path, None)
        self.model.links.pop(path, None)
        return f"unlink {path}"

    def op_link(self):
        if not self.model.files:
            return None
        old = self.rng.choice(sorted(self.model.files))
        new = self.new_path(FILE_NAMES)
        if new is None or self.model.exists(new):
            return None
        os.link(self.p(old), self.p(new))
        self.model.files[new] = self.model.files[old]
        return f"link {old} -> {new}"

    def op_symlink(self):
        path = self.new_path(FILE_NAMES)
        if path is None or self.model.exists(path):
            return None
        target = self.rng.choice(["a", "../x/b", "/nowhere", "x" * 300])
        os.symlink(target, self.p(path))
        self.model.links[path] = target
        return f"symlink {path} -> {target[:20]}"

    def op_open(self):
        """Keep a descriptor open across later renames, unlinks and truncates."""
        if not self.model.files or len(self.fds) >= 4:
            return None
        path = self.rng.choice(sorted(self.model.files))
        self.fds.append((os.open(self.p(path), os.O_RDWR), self.model.files[path]))
        return f"open {path} as fd#{len(self.fds) - 1}"

    def op_fd_write(self):
        if not self.fds:
            return None
        index = self.rng.randrange(len(self.fds))
        fd, buf = self.fds[index]
        offset = self.rng.randint(0, len(buf) + 5000)
        data = self.rng.randbytes(self.rng.choice(WRITE_SIZES))
        assert os.pwrite(fd, data, offset) == len(data)
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset : offset + len(data)] = data
        return f"write fd#{index} @{offset} +{len(data)}"

    def op_fd_read(self):
        if not self.fds:
            return None
        index = self.rng.randrange(len(self.fds))
        fd, buf = self.fds[index]
        got = os.pread(fd, len(buf) + 10, 0)
        assert got == bytes(buf), (
            f"read fd#{index}: {describe(got)} != {describe(bytes(buf))}; {self.where()}"
        )
        return f"read fd#{index}"

    def op_fd_close(self):
        if not self.fds:
            return None
        index = self.rng.randrange(len(self.fds))
        os.close(self.fds.pop(index)[0])
        return f"close fd#{index}"

    def close_all(self) -> None:
        while self.fds:
            os.close(self.fds.pop()[0])

    def op_mkdir(self):
        path = self.new_path(DIR_NAMES)
        if path is None or self.model.exists(path):
            return None
        os.mkdir(self.p(path))
        self.model.dirs.add(path)
        return f"mkdir {path}"

    def op_rmdir(self):
        empty = sorted(d for d in self.model.dirs if self.model.is_empty_dir(d))
        if not empty:
            return None
        path = self.rng.choice(empty)
        os.rmdir(self.p(path))
        self.model.dirs.discard(path)
        return f"rmdir {path}"

    def op_read(self):
        if not self.model.files:
            return None
        path = self.rng.choice(sorted(self.model.files))
        got = self.p(path).read_bytes()
        want = bytes(self.model.files[path])
        assert got == want, f"read {path}: {describe(got)} != {describe(want)}; {self.where()}"
        return f"read {path}"

    def op_bad(self):
        """An operation that must fail with a given errno and change nothing."""
        choice = self.rng.randrange(4)
        if choice == 0:
            path = self.new_path(FILE_NAMES)
            if path is None or self.model.exists(path):
                return None
            expected, fn = errno.ENOENT, lambda: os.unlink(self.p(path))
        elif choice == 1:
            full = sorted(d for d in self.model.dirs if not self.model.is_empty_dir(d))
            if not full:
                return None
            path = self.rng.choice(full)
            expected, fn = errno.ENOTEMPTY, lambda: os.rmdir(self.p(path))
        elif choice == 2:
            if not self.model.dirs:
                return None
            path = self.rng.choice(sorted(self.model.dirs))
            expected, fn = errno.EEXIST, lambda: os.mkdir(self.p(path))
        else:
            if not self.model.files:
                return None
            path = self.rng.choice(sorted(self.model.files))
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            expected, fn = errno.EEXIST, lambda: os.open(self.p(path), flags)
        with pytest.raises(OSError) as info:
            fn()
        assert info.value.errno == expected, (
            f"expected {errno.errorcode[expected]} on {path}, got {info.value!r}; {self.where()}"
        )
        return f"bad op on {path} -> {errno.errorcode[expected]}"

    def op_sync(self):
        result = self.m.sync()
        assert result.returncode == 0, f"safefs sync failed: {result.stderr}; {self.where()}"
        diff = tree_diff(self.model.expected(), snapshot(self.m.src))
        assert not diff, f"SRC right after `safefs sync` differs:\n{diff}\n{self.where()}"
        return "sync"

    def op_quiesce(self):
        """Wait for background write-back to go idle; SRC must then match the model."""
        if self.delay > 5:
            return None
        named = {id(b) for b in self.model.files.values()}
        if any(id(buf) not in named for _, buf in self.fds):
            return None  # an unlinked file is open: its data may stay dirty until closed

        def idle():
            st = self.m.status()
            return st["dirty_bytes"] == 0 and st["dirty_files"] == 0 and not st["pending_ops"]

        until(idle, 60, f"background write-back to go idle; {self.where()}", interval=0.1)
        diff = tree_diff(self.model.expected(), snapshot(self.m.src))
        assert not diff, f"SRC after write-back went idle differs:\n{diff}\n{self.where()}"
        return "quiesce"

    def op_crash(self):
        """kill -9 the daemon, mount again on the same cache: everything acknowledged is there."""
        if self.remount is None:
            return None
        self.m.kill()
        for fd, _ in self.fds:  # these died with the connection; their data must not have
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        self.m = self.remount(self.m)
        diff = tree_diff(self.model.expected(), snapshot(self.m.mnt))
        assert not diff, f"mount after kill -9 and replay differs:\n{diff}\n{self.where()}"
        return "crash"

    OPS = {
        "crash": 2,
        "write": 30,
        "truncate": 8,
        "rename_file": 10,
        "rename_dir": 4,
        "unlink": 6,
        "link": 3,
        "symlink": 2,
        "mkdir": 6,
        "rmdir": 3,
        "read": 6,
        "open": 3,
        "fd_write": 8,
        "fd_read": 3,
        "fd_close": 3,
        "bad": 3,
        "sync": 2,
        "quiesce": 1,
    }

    def run(self, steps: int) -> None:
        """`steps` operations, comparing the mount with the model every 20; closes its fds."""
        try:
            self._run(steps)
        finally:
            self.close_all()

    def _run(self, steps: int) -> None:
        names, weights = list(self.OPS), list(self.OPS.values())
        done = 0
        while done < steps:
            name = self.rng.choices(names, weights)[0]
            try:
                what = getattr(self, f"op_{name}")()
            except (OSError, subprocess.SubprocessError) as e:  # an errno, or a CLI timeout
                pytest.fail(f"op {name} failed unexpectedly: {e!r}; {self.where()}")
            if what is None:
                continue
            self.log.append(f"{done}: {what}")
            done += 1
            if done % 20 == 0:
                diff = tree_diff(self.model.expected(), snapshot(self.m.mnt))
                assert not diff, f"mount differs from the model:\n{diff}\n{self.where()}"

    def check_hard_links(self, root: Path, where: str) -> None:
        """Names of one file in the model are one inode under `root`, with that link count."""
        for group in self.model.hard_link_groups():
            stats = [os.lstat(root / p) for p in group]
            inos = {st.st_ino for st in stats}
            assert len(inos) == 1, f"{where}: {group} should be one file, are inodes {inos}; {self.where()}"
            assert stats[0].st_nlink == len(group), (
                f"{where}: {group} has st_nlink {stats[0].st_nlink}; {self.where()}"
            )


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "seed, delay",
    [(1, 0.5), (2, 0.5), (3, 0.05), (4, 600.0)],
    ids=["seed1-delay0.5", "seed2-delay0.5", "seed3-delay0.05", "seed4-no-background-writeback"],
)
def test_random_operations_match_model(mount_factory, seed, delay):
    m = mount_factory(None, None, None, "--writeback-delay", str(delay))
    session = RandomSession(m, seed, delay)
    session.run(250)
    expected = session.model.expected()
    diff = tree_diff(expected, snapshot(m.mnt))
    assert not diff, f"mount differs from the model at the end:\n{diff}\n{session.where()}"
    session.check_hard_links(m.mnt, "mount")
    m.umount()
    diff = tree_diff(expected, snapshot(m.src))
    assert not diff, f"SRC after umount differs from the model:\n{diff}\n{session.where()}"
    session.check_hard_links(m.src, "SRC after umount")
    assert_no_staging_leftovers(m.src)


# --------------------------------------------------------------------------- awkward cases


@pytest.mark.parametrize("delay", ["0.5", "600"])
@pytest.mark.parametrize("in_src", [False, True], ids=["new", "existing-in-src"])
def test_rename_then_create_under_old_name(mount_factory, tmp_path, delay, in_src):
    src = tmp_path / "src"
    src.mkdir()
    if in_src:
        (src / "a").write_bytes(b"OLD" * 1000)
    m = mount_factory(src, None, None, "--writeback-delay", delay)
    first, second = os.urandom(50_000), os.urandom(70_000)
    write_file(m.mnt / "a", first)
    os.rename(m.mnt / "a", m.mnt / "b")
    write_file(m.mnt / "a", second)
    assert (m.mnt / "a").read_bytes() == second
    assert (m.mnt / "b").read_bytes() == first
    assert (m.mnt / "a").stat().st_ino != (m.mnt / "b").stat().st_ino
    m.umount()
    assert_tree(src, {"a": second, "b": first}, "SRC after umount")
    assert_no_staging_leftovers(src)


@pytest.mark.parametrize("in_src", [False, True], ids=["new", "existing-in-src"])
def test_write_to_file_unlinked_while_open(mount_factory, tmp_path, in_src):
    src = tmp_path / "src"
    src.mkdir()
    if in_src:
        (src / "u").write_bytes(b"OLD" * 1000)
    m = mount_factory(src)
    first, second = os.urandom(10_000), os.urandom(20_000)
    fd = os.open(m.mnt / "u", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, first, 0)
        os.unlink(m.mnt / "u")
        os.pwrite(fd, second, len(first))
        os.fsync(fd)
        assert os.pread(fd, 100_000, 0) == first + second
        # A file created after the unlink reaches SRC: write-back has run past the unlink,
        # and the open-but-unlinked file must not have come back.
        write_file(m.mnt / "canary", b"canary")
        until(lambda: read_or_none(src / "canary") == b"canary", 60, "canary written back")
        assert not (src / "u").exists(), "unlinked (still open) file present in SRC"
        assert os.pread(fd, 100_000, 0) == first + second
        os.pwrite(fd, b"late", 0)
        assert os.pread(fd, 4, 0) == b"late"
    finally:
        os.close(fd)
    assert os.listdir(m.mnt) == ["canary"]
    m.umount()
    assert_tree(src, {"canary": b"canary"}, "SRC after umount")
    assert_no_staging_leftovers(src)


@pytest.mark.parametrize("delay", ["0.5", "600"])
def test_rename_directory_holding_dirty_files(mount_factory, tmp_path, delay):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "clean").write_bytes(b"clean in SRC")
    (src / "d" / "touched").write_bytes(b"will change")
    m = mount_factory(src, None, None, "--writeback-delay", delay)
    new, deep, touched = os.urandom(100_000), os.urandom(5000), b"changed through the mount"
    write_file(m.mnt / "d" / "new", new)
    os.mkdir(m.mnt / "d" / "sub")
    write_file(m.mnt / "d" / "sub" / "deep", deep)
    write_file(m.mnt / "d" / "touched", touched)
    os.rename(m.mnt / "d", m.mnt / "e")
    os.mkdir(m.mnt / "d")  # the old name comes back as a different directory
    write_file(m.mnt / "d" / "again", b"again")
    expected = {
        "d": "dir",
        "d/again": b"again",
        "e": "dir",
        "e/clean": b"clean in SRC",
        "e/touched": touched,
        "e/new": new,
        "e/sub": "dir",
        "e/sub/deep": deep,
    }
    assert_tree(m.mnt, expected, "mount")
    m.umount()
    assert_tree(src, expected, "SRC after umount")
    assert_no_staging_leftovers(src)


@pytest.mark.parametrize("origin", ["dirty", "synced", "in-src"])
def test_replace_dir_by_file_and_file_by_dir(mount_factory, tmp_path, origin):
    src = tmp_path / "src"
    src.mkdir()
    if origin == "in-src":
        (src / "d").mkdir()
        (src / "d" / "inner").write_bytes(b"inner")
        (src / "f").write_bytes(b"file")
    m = mount_factory(src)
    if origin != "in-src":
        os.mkdir(m.mnt / "d")
        write_file(m.mnt / "d" / "inner", b"inner")
        write_file(m.mnt / "f", b"file")
    if origin == "synced":
        assert m.sync().returncode == 0
        assert_tree(src, {"d": "dir", "d/inner": b"inner", "f": b"file"}, "SRC after sync")
    os.unlink(m.mnt / "d" / "inner")
    os.rmdir(m.mnt / "d")
    write_file(m.mnt / "d", b"d is a file now")
    os.unlink(m.mnt / "f")
    os.mkdir(m.mnt / "f")
    write_file(m.mnt / "f" / "inner2", b"f is a dir now")
    expected = {"d": b"d is a file now", "f": "dir", "f/inner2": b"f is a dir now"}
    assert_tree(m.mnt, expected, "mount")
    m.umount()
    assert_tree(src, expected, "SRC after umount")
    assert_no_staging_leftovers(src)


def _user_xattrs(path: Path) -> dict[str, bytes]:
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
        if n.startswith("user.")
    }


def test_attributes_preserved_in_src(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "clean").write_bytes(b"clean")
    m = mount_factory(src)
    mnt = m.mnt
    t_new, t_clean, t_dir, t_link = (
        1_700_000_000_111_111_111,
        1_500_000_000_222_222_222,
        1_600_000_000_333_333_333,
        1_400_000_000_444_444_444,
    )
    # A new file: data, then ownership, mode, xattrs and times (times last: writes move mtime).
    write_file(mnt / "new", os.urandom(10_000))
    os.chown(mnt / "new", 1234, 5678)
    os.chmod(mnt / "new", 0o640)
    os.setxattr(mnt / "new", "user.origin", b"mount")
    os.setxattr(mnt / "new", "user.binary", bytes(range(256)))
    os.utime(mnt / "new", ns=(t_new, t_new))
    # A clean file from SRC: metadata-only changes.
    os.chown(mnt / "clean", 1111, 2222)
    os.chmod(mnt / "clean", 0o600)
    os.setxattr(mnt / "clean", "user.added", b"later")
    os.utime(mnt / "clean", ns=(t_clean, t_clean))
    # A directory whose times are set after its children are created (what tar does).
    os.mkdir(mnt / "dd")
    write_file(mnt / "dd" / "c1", b"1")
    os.mkdir(mnt / "dd" / "c2")
    os.chown(mnt / "dd", 3333, 4444)
    os.chmod(mnt / "dd", 0o2750)
    os.setxattr(mnt / "dd", "user.kind", b"dir")
    os.utime(mnt / "dd", ns=(t_dir, t_dir))
    # A symlink's own owner and times.
    os.symlink("new", mnt / "ln")
    os.lchown(mnt / "ln", 55, 66)
    os.utime(mnt / "ln", ns=(t_link, t_link), follow_symlinks=False)

    def check(root: Path, where: str) -> None:
        st = os.stat(root / "new")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678), where
        assert st.st_mtime_ns == t_new, f"{where}: new mtime {st.st_mtime_ns} != {t_new}"
        assert _user_xattrs(root / "new") == {"user.origin": b"mount", "user.binary": bytes(range(256))}
        st = os.stat(root / "clean")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 1111, 2222), where
        assert st.st_mtime_ns == t_clean, f"{where}: clean mtime {st.st_mtime_ns} != {t_clean}"
        assert _user_xattrs(root / "clean") == {"user.added": b"later"}, where
        assert (root / "clean").read_bytes() == b"clean"
        st = os.stat(root / "dd")
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o2750, 3333, 4444), where
        assert st.st_mtime_ns == t_dir, f"{where}: dir mtime {st.st_mtime_ns} != {t_dir}"
        assert _user_xattrs(root / "dd") == {"user.kind": b"dir"}, where
        st = os.lstat(root / "ln")
        assert (st.st_uid, st.st_gid) == (55, 66), where
        assert st.st_mtime_ns == t_link, f"{where}: symlink mtime {st.st_mtime_ns} != {t_link}"

    check(mnt, "mount")
    m.umount()
    check(src, "SRC after umount")
    assert_no_staging_leftovers(src)


@pytest.mark.timeout(240)
def test_fusermount_unmount_writes_everything_back(mount_factory, tmp_path):
    m = mount_factory(None, None, None, *LONG_DELAY)
    expected: dict[str, object] = {"sub": "dir"}
    os.mkdir(m.mnt / "sub")
    for i in range(20):
        data = os.urandom(1000 * i + 1)
        write_file(m.mnt / "sub" / f"f{i}", data)
        expected[f"sub/f{i}"] = data
    big = os.urandom(20 * MIB)
    write_file(m.mnt / "big", big)
    expected["big"] = big
    assert m.status()["dirty_bytes"] >= 20 * MIB
    result = subprocess.run(["fusermount3", "-u", str(m.mnt)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"fusermount3 -u failed: {result.stderr}"
    until(lambda: m.proc.poll() is not None, 180, "the daemon to exit after fusermount3 -u")
    assert_tree(m.src, expected, "SRC after fusermount3 -u")
    assert_no_staging_leftovers(m.src)
    assert m.proc.returncode == 0, f"daemon exited with {m.proc.returncode} after fusermount3 -u"


# --------------------------------------------------------------------------- reads and the cache


@pytest.mark.timeout(240)
def test_range_reads_fetch_only_what_is_read(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    known = os.urandom(4096)
    with open(src / "huge", "wb") as f:
        f.truncate(1 * GIB)
        f.seek(512 * MIB)
        f.write(known)
    m = mount_factory(src)
    before = m.status()["bytes_fetched"]
    fd = os.open(m.mnt / "huge", os.O_RDONLY)
    try:
        assert os.fstat(fd).st_size == 1 * GIB
        assert os.pread(fd, 4096, 512 * MIB) == known
    finally:
        os.close(fd)
    after_first = m.status()["bytes_fetched"]
    fetched = after_first - before
    assert 4096 <= fetched < 1 * MIB, f"reading 4 KiB fetched {fetched} bytes from SRC"
    # Again, with the kernel's page cache dropped: served from safefs's own cache.
    drop_page_cache(m.mnt / "huge")
    fd = os.open(m.mnt / "huge", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 512 * MIB) == known
    finally:
        os.close(fd)
    assert m.status()["bytes_fetched"] == after_first, "cached range was fetched from SRC again"
    m.umount()
    assert (src / "huge").stat().st_size == 1 * GIB


@pytest.mark.parametrize("change", ["same-size", "grown"])
def test_change_behind_safefs_is_seen_on_reopen(mount_factory, tmp_path, change):
    src = tmp_path / "src"
    src.mkdir()
    old = os.urandom(200 * KIB)
    (src / "f").write_bytes(old)
    m = mount_factory(src)
    assert (m.mnt / "f").read_bytes() == old  # now cached
    new = os.urandom(200 * KIB if change == "same-size" else 300 * KIB)
    before = os.stat(src / "f")
    with open(src / "f", "r+b") as f:  # rewrite in place, behind safefs's back
        f.write(new)
    os.utime(src / "f", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert os.stat(src / "f").st_mtime_ns != before.st_mtime_ns
    got = (m.mnt / "f").read_bytes()
    assert len(got) == len(new), f"size after reopen {len(got)}, SRC has {len(new)}"
    assert got == new, "stale cached bytes served after the file changed in SRC"
    m.umount()
    assert (src / "f").read_bytes() == new, "safefs wrote its stale copy back over SRC"
    assert sorted(os.listdir(src)) in (["f"], [".safefs", "f"]), os.listdir(src)


@pytest.mark.timeout(240)
def test_clean_data_is_evicted_under_the_cache_limit(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    contents = {f"r{i}": os.urandom(6 * MIB) for i in range(3)}
    for name, data in contents.items():
        (src / name).write_bytes(data)
    m = mount_factory(src, None, None, "--cache-size", "8M")
    limit = m.status()["cache_limit"]
    assert limit in (8 * MIB, 8_000_000), f"cache_limit {limit} for --cache-size 8M"
    for name, data in contents.items():
        assert (m.mnt / name).read_bytes() == data, f"{name} read wrong through the mount"
    assert m.status()["bytes_fetched"] >= 18 * MIB
    until(
        lambda: m.status()["cache_bytes"] <= limit + 6 * MIB,
        30,
        "cache_bytes to fall under the limit plus one file",
    )
    on_disk = cache_content_bytes(m.cache_dir)
    assert on_disk <= limit + 7 * MIB, f"cache dir holds {on_disk} bytes of content with an 8M limit"
    for name, data in contents.items():  # evicted ranges are fetched again, correctly
        drop_page_cache(m.mnt / name)
        assert (m.mnt / name).read_bytes() == data


@pytest.mark.timeout(240)
def test_dirty_data_is_never_evicted(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    clean = os.urandom(6 * MIB)
    (src / "clean").write_bytes(clean)
    m = mount_factory(src, None, None, "--cache-size", "8M", *LONG_DELAY)
    dirty = {"w1": os.urandom(6 * MIB), "w2": os.urandom(6 * MIB)}
    for name, data in dirty.items():
        write_file(m.mnt / name, data)  # 12 MiB of dirty data over an 8 MiB limit
    assert (m.mnt / "clean").read_bytes() == clean  # pressure: clean data comes in
    for name, data in dirty.items():
        drop_page_cache(m.mnt / name)
        assert (m.mnt / name).read_bytes() == data, f"dirty {name} lost or damaged in the cache"
    m.umount()
    assert_tree(src, {"clean": clean, **dirty}, "SRC after umount")


def test_conflict_keeps_both_versions(mount_factory, tmp_path):
    """G2/section 5: SRC changed behind safefs while the cache holds a dirty version of it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"A" * 10_000)
    m = mount_factory(src, None, None, *LONG_DELAY)
    assert (m.mnt / "f").read_bytes() == b"A" * 10_000
    ours = b"ours, written through the mount " * 100
    write_file(m.mnt / "f", ours)
    theirs = b"theirs, written behind safefs " * 200
    before = os.stat(src / "f")
    (src / "f").write_bytes(theirs)
    os.utime(src / "f", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    result = m.sync()
    copies = sorted(src.glob("f.safefs-conflict-*"))
    assert (src / "f").read_bytes() == theirs, "safefs overwrote a file changed behind its back"
    assert len(copies) == 1, f"expected one conflict copy beside f, SRC has {sorted(os.listdir(src))}"
    assert copies[0].read_bytes() == ours, "the conflict copy does not hold the mount's version"
    st = m.status()
    assert st["conflicts"], f"status reports no conflict: {st}"
    assert st["dirty_bytes"] == 0, f"sync left dirty data after the conflict ({result.stderr})"
    # The mount now shows both versions, like SRC (kernel caches included).
    assert (m.mnt / "f").read_bytes() == theirs, "mount still shows its own version under the name"
    assert (m.mnt / copies[0].name).read_bytes() == ours
    m.umount()
    assert (src / "f").read_bytes() == theirs
    assert copies[0].read_bytes() == ours
