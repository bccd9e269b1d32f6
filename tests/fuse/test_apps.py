"""Ordinary applications run unmodified on a mount (DESIGN.md G8).

What these tests check: each application's own integrity check passes on the mount, after a
remount where it matters, and on SRC directly after unmount; and the data it wrote is the data
it reads back. SQLite is driven through Python's sqlite3 module (rollback journal and WAL),
LMDB through the lmdb module, git, tar, diff, rsync and Berkeley DB (db5.3-util) as programs.

A test skips when its program is not installed, unless SAFEFS_REQUIRE_FUSE=1 (CI), where a
missing program is a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import stat
import string
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]


def require_tool(*names: str) -> str:
    """The path of the first installed program of `names`; skip (or fail in CI) if none is."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("SAFEFS_REQUIRE_FUSE") == "1":
        pytest.fail(f"{names[0]} is not installed but SAFEFS_REQUIRE_FUSE=1")
    pytest.skip(f"{names[0]} is not installed")


def run(*args: str | Path, cwd: Path | None = None, env: dict | None = None, timeout: float = 240):
    """Run a program; fail the test with its output if it exits non-zero."""
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}\n"
        f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
    )
    return result


# --------------------------------------------------------------------------- SQLite


def _sqlite_check(db: Path, rows: dict[int, tuple[str, bytes]], mode: str, where: str) -> None:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], where
        got = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id, name, data FROM t")}
        assert got == rows, f"{where}: rows differ ({len(got)} rows, expected {len(rows)})"
        if mode == "wal":
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal", where
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_sqlite(mount_factory, mode):
    m = mount_factory()
    db = m.mnt / "app.db"
    rng = random.Random(42)
    conn = sqlite3.connect(db, isolation_level=None)  # we issue BEGIN/COMMIT ourselves
    reader = None
    try:
        assert conn.execute(f"PRAGMA journal_mode={mode}").fetchone()[0] == mode
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL, data BLOB)")
        rows: dict[int, tuple[str, bytes]] = {}
        for batch in range(10):  # 500 rows in 10 transactions
            conn.execute("BEGIN")
            for i in range(50):
                key = batch * 50 + i
                rows[key] = (f"row-{key}", rng.randbytes(rng.randint(0, 3000)))
                conn.execute("INSERT INTO t VALUES (?, ?, ?)", (key, *rows[key]))
            conn.execute("COMMIT")
        conn.execute("BEGIN")
        for key in range(0, 500, 10):
            rows[key] = (f"updated-{key}", rng.randbytes(5000))
            conn.execute("UPDATE t SET name = ?, data = ? WHERE id = ?", (*rows[key], key))
        for key in range(5, 500, 20):
            del rows[key]
            conn.execute("DELETE FROM t WHERE id = ?", (key,))
        conn.execute("COMMIT")
        conn.execute("BEGIN")  # a rolled-back transaction leaves no trace
        conn.execute("DELETE FROM t")
        conn.execute("ROLLBACK")
        # A second connection: sees the last commit while a write transaction is open.
        reader = sqlite3.connect(db, isolation_level=None, timeout=10)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?, ?, ?)", (1000, "pending", b""))
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == len(rows)
        conn.execute("COMMIT")
        rows[1000] = ("pending", b"")
        assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == len(rows)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        if reader is not None:
            reader.close()
        conn.close()
    _sqlite_check(db, rows, mode, "on the mount")
    m.umount()
    m2 = mount_factory(m.src, m.mnt, m.cache_dir)
    _sqlite_check(m2.mnt / "app.db", rows, mode, "after umount and remount")
    m2.umount()
    _sqlite_check(m.src / "app.db", rows, mode, "on SRC after umount")


# --------------------------------------------------------------------------- HDF5


def _hdf5_check(path, frames, where):
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        images = f["images"]
        assert images.shape == frames.shape, where
        assert np.array_equal(images[...], frames), f"frames differ {where}"
        assert f.attrs["instrument"] == "safefs test rig", where
        assert f["meta/exposure_ms"][()] == 12.5, where


def test_hdf5_image_stack(mount_factory):
    """An acquisition appends compressed frames to an HDF5 stack, flushing as it goes, then
    a later pass rewrites some frames in place; h5py reads back every frame bit for bit on
    the mount, after a remount and on SRC."""
    import h5py
    import numpy as np

    m = mount_factory()
    path = m.mnt / "stack.h5"
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 4096, size=(40, 128, 128), dtype=np.uint16)
    with h5py.File(path, "w") as f:
        f.attrs["instrument"] = "safefs test rig"
        f.create_dataset("meta/exposure_ms", data=12.5)
        images = f.create_dataset(
            "images", shape=(0, 128, 128), maxshape=(None, 128, 128), chunks=(1, 128, 128),
            dtype="u2", compression="gzip",
        )  # fmt: skip
        for i, frame in enumerate(frames):
            images.resize(i + 1, axis=0)
            images[i] = frame
            if i % 10 == 9:
                f.flush()
    with h5py.File(path, "r+") as f:  # reprocessing: some frames rewritten in place
        for i in (3, 17, 39):
            frames[i] = rng.integers(0, 4096, size=(128, 128), dtype=np.uint16)
            f["images"][i] = frames[i]
    _hdf5_check(path, frames, "on the mount")
    m.umount()
    _hdf5_check(m.src / "stack.h5", frames, "on SRC after umount")
    m2 = mount_factory(m.src, m.mnt, m.cache_dir)
    _hdf5_check(m2.mnt / "stack.h5", frames, "after remount")
    m2.umount()


# --------------------------------------------------------------------------- LMDB


def test_lmdb(mount_factory):
    lmdb = pytest.importorskip("lmdb")
    m = mount_factory()
    rng = random.Random(3)
    expected = {f"key-{i:05d}".encode(): rng.randbytes(rng.randint(1, 2000)) for i in range(2000)}
    env = lmdb.open(str(m.mnt / "lmdb-env"), map_size=64 << 20)
    try:
        items = sorted(expected.items())
        for start in range(0, len(items), 500):
            with env.begin(write=True) as txn:
                for key, value in items[start : start + 500]:
                    txn.put(key, value)
        with env.begin(write=True) as txn:
            for key in list(expected)[::7]:
                txn.delete(key)
                del expected[key]
        with env.begin() as txn:
            assert dict(txn.cursor()) == expected
    finally:
        env.close()
    m.umount()
    env = lmdb.open(str(m.src / "lmdb-env"), readonly=True, lock=False)
    try:
        assert env.stat()["entries"] == len(expected)
        with env.begin() as txn:
            assert dict(txn.cursor()) == expected
    finally:
        env.close()


# --------------------------------------------------------------------------- git


def _git_env(tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        **os.environ,
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "safefs test",
        "GIT_AUTHOR_EMAIL": "test@safefs.invalid",
        "GIT_COMMITTER_NAME": "safefs test",
        "GIT_COMMITTER_EMAIL": "test@safefs.invalid",
    }


def _make_repo(git: str, repo: Path, env: dict[str, str]) -> int:
    """A repository of a few hundred files and five commits; returns the commit count."""
    rng = random.Random(11)
    run(git, "init", "-q", "-b", "main", repo, env=env)
    for d in range(10):
        (repo / f"pkg{d}").mkdir()
        for i in range(30):
            text = "\n".join(rng.choice(string.ascii_letters) * rng.randint(1, 80) for _ in range(40))
            (repo / f"pkg{d}" / f"mod{i}.txt").write_text(text)
    (repo / "bin.dat").write_bytes(rng.randbytes(200_000))
    run(git, "add", "-A", cwd=repo, env=env)
    run(git, "commit", "-q", "-m", "initial", cwd=repo, env=env)
    for n in range(4):
        for d in range(10):
            path = repo / f"pkg{d}" / f"mod{rng.randrange(30)}.txt"
            if path.exists():
                path.write_text(path.read_text() + f"\nchange {n}\n")
        (repo / f"new{n}.txt").write_text(f"added in commit {n}\n" * 100)
        run(git, "rm", "-q", f"pkg{n}/mod{n}.txt", cwd=repo, env=env)
        run(git, "mv", f"pkg{n + 5}/mod{n}.txt", f"pkg{n + 5}/renamed{n}.txt", cwd=repo, env=env)
        run(git, "add", "-A", cwd=repo, env=env)
        run(git, "commit", "-q", "-m", f"change {n}", cwd=repo, env=env)
    return 5


def test_git_clone_fsck_status(mount_factory, tmp_path):
    git = require_tool("git")
    env = _git_env(tmp_path)
    origin = tmp_path / "origin"
    commits = _make_repo(git, origin, env)
    m = mount_factory()
    clone = m.mnt / "clone"
    run(git, "clone", "-q", f"file://{origin}", clone, env=env)
    run(git, "fsck", "--full", "--strict", cwd=clone, env=env)
    assert run(git, "status", "--porcelain", cwd=clone, env=env).stdout == ""
    assert int(run(git, "rev-list", "--count", "HEAD", cwd=clone, env=env).stdout) == commits
    # Work inside the mount: commit, then repack (many renames and unlinks of pack files).
    (clone / "pkg9" / "mod29.txt").write_text("edited on the mount\n")
    (clone / "on-mount.txt").write_text("new on the mount\n")
    run(git, "add", "-A", cwd=clone, env=env)
    run(git, "commit", "-q", "-m", "on the mount", cwd=clone, env=env)
    run(git, "gc", "-q", "--prune=now", cwd=clone, env=env)
    run(git, "fsck", "--full", "--strict", cwd=clone, env=env)
    assert run(git, "status", "--porcelain", cwd=clone, env=env).stdout == ""
    head = run(git, "rev-parse", "HEAD", cwd=clone, env=env).stdout.strip()
    m.umount()
    backing = m.src / "clone"
    run(git, "fsck", "--full", "--strict", cwd=backing, env=env)
    assert run(git, "status", "--porcelain", cwd=backing, env=env).stdout == ""
    assert run(git, "rev-parse", "HEAD", cwd=backing, env=env).stdout.strip() == head
    assert (backing / "on-mount.txt").read_text() == "new on the mount\n"


# --------------------------------------------------------------------------- tar, diff, rsync


def _make_payload(root: Path, files: int = 3000) -> None:
    """A tree of small files with a few symlinks, empty dirs, modes and old mtimes."""
    rng = random.Random(5)
    root.mkdir()
    for i in range(files):
        d = root / f"dir{i % 30:02d}" / f"sub{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"file{i:05d}.bin"
        path.write_bytes(rng.randbytes(rng.randint(0, 4096)))
        if i % 13 == 0:
            os.chmod(path, 0o600)
        if i % 17 == 0:
            os.chmod(path, 0o755)
        os.utime(path, (1_500_000_000 + i, 1_500_000_000 + i))
    for i in range(20):
        os.symlink(f"../dir{i:02d}/sub0", root / f"dir{(i + 1) % 30:02d}" / f"link{i}")
    (root / "empty-dir").mkdir()
    os.utime(root / "dir03", (1_400_000_000, 1_400_000_000))


def _mtimes(root: Path) -> dict[str, int]:
    """Whole-second mtimes of every entry below root (what a tar archive stores)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = int(os.lstat(full).st_mtime)
    return out


def _assert_same_tree(diff: str, original: Path, copy: Path, where: str) -> None:
    run(diff, "-r", "--no-dereference", original, copy)
    want, got = _mtimes(original), _mtimes(copy)
    wrong = [p for p in want if got.get(p) != want[p]]
    assert not wrong, f"{where}: mtimes differ for {len(wrong)} entries, e.g. {wrong[:5]}"
    modes = [
        p
        for p in want
        if stat.S_IMODE(os.lstat(original / p).st_mode) != stat.S_IMODE(os.lstat(copy / p).st_mode)
    ]
    assert not modes, f"{where}: modes differ for {modes[:5]}"


@pytest.mark.timeout(600)
def test_tar_extract_and_diff(mount_factory, tmp_path):
    tar = require_tool("tar")
    diff = require_tool("diff")
    payload = tmp_path / "payload"
    _make_payload(payload)
    tarball = tmp_path / "payload.tar"
    run(tar, "-cf", tarball, "-C", tmp_path, "payload")
    m = mount_factory()
    run(tar, "-xpf", tarball, "-C", m.mnt)
    _assert_same_tree(diff, payload, m.mnt / "payload", "on the mount")
    m.umount()
    _assert_same_tree(diff, payload, m.src / "payload", "on SRC after umount")


@pytest.mark.timeout(600)
def test_rsync_into_the_mount(mount_factory, tmp_path):
    rsync = require_tool("rsync")
    diff = require_tool("diff")
    payload = tmp_path / "payload"
    _make_payload(payload, files=1000)
    m = mount_factory()
    run(rsync, "-a", f"{payload}/", f"{m.mnt / 'copy'}/")
    _assert_same_tree(diff, payload, m.mnt / "copy", "on the mount")
    # A second rsync after changes: it writes temporary files and renames them into place.
    (payload / "dir00" / "sub0" / "file00000.bin").write_bytes(b"changed")
    os.unlink(payload / "dir01" / "sub1" / "file00001.bin")
    run(rsync, "-a", "--delete", f"{payload}/", f"{m.mnt / 'copy'}/")
    _assert_same_tree(diff, payload, m.mnt / "copy", "on the mount after a second rsync")
    m.umount()
    _assert_same_tree(diff, payload, m.src / "copy", "on SRC after umount")


# --------------------------------------------------------------------------- Berkeley DB


def _parse_db_dump(text: str) -> dict[str, str]:
    """Key/value pairs of `db_dump -p` output (values here are plain alphanumerics)."""
    lines = text.splitlines()
    body = lines[lines.index("HEADER=END") + 1 : lines.index("DATA=END")]
    assert all(line.startswith(" ") for line in body), body[:5]
    items = [line[1:] for line in body]
    return dict(zip(items[0::2], items[1::2]))


def test_berkeley_db(mount_factory, tmp_path):
    db_load = require_tool("db5.3_load", "db_load")
    db_verify = require_tool("db5.3_verify", "db_verify")
    db_dump = require_tool("db5.3_dump", "db_dump")
    rng = random.Random(9)
    alphabet = string.ascii_letters + string.digits
    expected = {
        f"key-{i:05d}": "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for i in range(3000)
    }
    source = tmp_path / "input.txt"
    source.write_text("".join(f"{k}\n{v}\n" for k, v in expected.items()))
    m = mount_factory()
    db = m.mnt / "test.db"
    run(db_load, "-T", "-t", "btree", "-f", source, db, cwd=tmp_path)
    run(db_verify, db, cwd=tmp_path)
    assert _parse_db_dump(run(db_dump, "-p", db, cwd=tmp_path).stdout) == expected
    m.umount()
    backing = m.src / "test.db"
    run(db_verify, backing, cwd=tmp_path)
    assert _parse_db_dump(run(db_dump, "-p", backing, cwd=tmp_path).stdout) == expected
