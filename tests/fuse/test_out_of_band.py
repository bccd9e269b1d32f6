"""Out-of-band edits: SRC changes behind safefs's back while the cache holds a version of it
(issue 4 item 5; DESIGN.md G2 and section 5, "Conflicts").

What these tests check, always on bytes:
- A file changed in SRC while safefs has a dirty version of it: after `safefs sync`, SRC's
  file keeps the out-of-band version and `NAME.safefs-conflict-<host>-<time>` beside it holds
  safefs's version byte for byte; `status --json` lists the conflict; the mount shows both.
- A file deleted in SRC while dirty: safefs's version survives in SRC.
- A directory renamed in SRC while it holds a dirty (or new) file: the dirty data and the
  renamed directory's contents both survive in SRC; `sync --timeout 20` must not loop.
- A file unlinked through the mount after it changed in SRC: their version stays, as a
  conflict copy.

Every mount uses a long write-back delay, so nothing is written back before the test says so.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Mount, MountFactory, describe

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

LONG_DELAY = ("--writeback-delay", "600")
HOST = "oobhost"
# NAME.safefs-conflict-<host>-<time>[-n]; <time> is whatever stamp safefs chose.
CONFLICT_RE = r"\.safefs-conflict-" + re.escape(HOST) + r"-\S+"
CONFLICTS = 10  # sync's exit code when it made conflict copies


# --------------------------------------------------------------------------- helpers


def change_behind_back(path: Path, data: bytes) -> None:
    """Rewrite `path` in SRC directly, making sure its mtime moves (coarse clocks exist)."""
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.write(data)
        f.truncate(len(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 2 * 10**9))
    assert os.stat(path).st_mtime_ns != before.st_mtime_ns


def write_through(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def files_holding(root: Path, data: bytes) -> list[str]:
    """Relative paths of the regular files below `root` (.safefs too) whose bytes are `data`."""
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or not os.path.isfile(full):
                continue
            if os.path.getsize(full) == len(data) and Path(full).read_bytes() == data:
                found.append(os.path.relpath(full, root))
    return sorted(found)


def user_tree(root: Path) -> list[str]:
    """Every path below `root` except the .safefs control directory."""
    out = []
    for dirpath, dirs, names in os.walk(root):
        if dirpath == os.fspath(root):
            dirs[:] = [d for d in dirs if d != ".safefs"]
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in dirs + names]
    return sorted(out)


def conflict_copies(directory: Path, name: str) -> list[Path]:
    pattern = re.compile(re.escape(name) + CONFLICT_RE + r"$")
    return sorted(p for p in directory.iterdir() if pattern.match(p.name))


def sync(m: Mount, timeout: float = 20) -> tuple[int, str]:
    """`safefs sync MNT --timeout T`: (exit code, the whole output for messages)."""
    done = m.sync("--timeout", str(timeout), timeout=timeout + 40)
    return done.returncode, describe(done)


# --------------------------------------------------------------------------- changed in SRC


def test_file_changed_in_src_while_dirty_keeps_both(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    original = b"original " * 3000
    (src / "report.txt").write_bytes(original)
    (src / "report.txt").chmod(0o640)
    m = mount_factory(src, None, None, *LONG_DELAY, host_id=HOST)

    assert (m.mnt / "report.txt").read_bytes() == original  # now cached
    ours = b"safefs's version, written through the mount\n" * 700
    write_through(m.mnt / "report.txt", ours)
    assert m.status()["dirty_files"] >= 1
    assert (src / "report.txt").read_bytes() == original, "written back before the sync"
    theirs = b"their version, written directly on NFS\n" * 300
    change_behind_back(src / "report.txt", theirs)

    code, out = sync(m)
    assert code == CONFLICTS, out
    assert (src / "report.txt").read_bytes() == theirs, "safefs overwrote the out-of-band version"
    copies = conflict_copies(src, "report.txt")
    assert (
        len(copies) == 1
    ), f"want one report.txt.safefs-conflict-{HOST}-<time>; SRC has {user_tree(src)}"
    assert copies[0].read_bytes() == ours, "the conflict copy does not hold safefs's version"
    assert user_tree(src) == sorted(["report.txt", copies[0].name])

    st = m.status()
    listed = [c for c in st["conflicts"] if copies[0].name in str(c)]
    assert listed, f"status --json does not list {copies[0].name}: conflicts={st['conflicts']}"
    assert st["dirty_bytes"] == 0 and st["dirty_files"] == 0, st

    # The mount shows both, like SRC, with the kernel's caches invalidated.
    assert sorted(os.listdir(m.mnt)) == sorted(["report.txt", copies[0].name])
    assert (m.mnt / "report.txt").read_bytes() == theirs
    assert (m.mnt / copies[0].name).read_bytes() == ours

    m.umount()
    assert (src / "report.txt").read_bytes() == theirs
    assert copies[0].read_bytes() == ours
    assert user_tree(src) == sorted(["report.txt", copies[0].name])


def test_a_file_patched_without_being_read_keeps_its_own_bytes_in_the_conflict_copy(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    """A few bytes written into the middle of a file nobody read through the mount: when the
    file changes on NFS meanwhile, the conflict copy must be the original with our patch, not
    our patch over their bytes (the original exists nowhere else by then)."""
    src = tmp_path / "src"
    src.mkdir()
    original = bytes(range(256)) * 4096  # 1 MiB, more than one fetch block
    (src / "image.raw").write_bytes(original)
    m = mount_factory(src, None, None, *LONG_DELAY, host_id=HOST)

    fd = os.open(m.mnt / "image.raw", os.O_WRONLY)  # no read, no O_TRUNC
    try:
        os.pwrite(fd, b"PATCH", 600_000)
    finally:
        os.close(fd)
    theirs = b"rewritten on NFS by someone else\n" * 40_000
    change_behind_back(src / "image.raw", theirs)

    code, out = sync(m)
    assert code == CONFLICTS, out
    assert (src / "image.raw").read_bytes() == theirs, "safefs overwrote the out-of-band version"
    copies = conflict_copies(src, "image.raw")
    assert len(copies) == 1, user_tree(src)
    ours = original[:600_000] + b"PATCH" + original[600_005:]
    assert copies[0].read_bytes() == ours, "the conflict copy mixes their bytes into ours"


def test_two_conflicts_on_one_file_get_distinct_copies(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    """A second conflict within the same second must not overwrite the first copy."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"0" * 100)
    m = mount_factory(src, None, None, *LONG_DELAY, host_id=HOST)
    versions = []
    for round_ in range(2):
        assert len((m.mnt / "f").read_bytes()) > 0
        ours = f"ours {round_} ".encode() * 50
        write_through(m.mnt / "f", ours)
        theirs = f"theirs {round_} ".encode() * 70
        change_behind_back(src / "f", theirs)
        code, out = sync(m)
        assert code == CONFLICTS, out
        versions.append(ours)
        assert (src / "f").read_bytes() == theirs
    held = sorted(p.read_bytes() for p in conflict_copies(src, "f"))
    assert held == sorted(
        versions
    ), f"conflict copies hold {len(held)} versions; SRC has {user_tree(src)}"
    assert len(m.status()["conflicts"]) >= 2


# --------------------------------------------------------------------------- deleted in SRC


def test_file_deleted_in_src_while_dirty_survives(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "notes").write_bytes(b"old notes " * 500)
    m = mount_factory(src, None, None, *LONG_DELAY, host_id=HOST)
    assert (m.mnt / "sub" / "notes").read_bytes() == b"old notes " * 500
    ours = b"new notes, dirty in the cache " * 400
    write_through(m.mnt / "sub" / "notes", ours)
    os.unlink(src / "sub" / "notes")  # deleted behind safefs's back

    code, out = sync(m)
    assert code in (0, CONFLICTS), out
    where = files_holding(src, ours)
    assert where, f"safefs's version of sub/notes is nowhere in SRC; SRC has {user_tree(src)}"
    visible = [w for w in where if not w.startswith(".safefs/")]
    assert visible, f"safefs's version survives only inside .safefs: {where}"
    # Report where it went: either back under its own name or beside it as a conflict copy.
    print(f"deleted-in-SRC: safefs's version kept at {visible}")
    for w in visible:
        assert w == "sub/notes" or re.fullmatch(r"sub/notes" + CONFLICT_RE, w), w
        if w != "sub/notes":
            assert any(os.path.basename(w) in str(c) for c in m.status()["conflicts"]), m.status()
    # The mount agrees with SRC.
    for w in visible:
        assert (m.mnt / w).read_bytes() == ours
    m.umount()
    assert files_holding(src, ours) == where


# --------------------------------------------------------------------------- dir renamed in SRC


@pytest.mark.parametrize("kind", ["modified", "new"])
def test_dir_renamed_in_src_while_holding_dirty_file(
    mount_factory: MountFactory, tmp_path: Path, kind: str
) -> None:
    """SRC/d is renamed to SRC/e behind safefs's back while the mount has a dirty d/f.

    `kind`: f existed in SRC and was rewritten through the mount, or f is new in the mount.
    Nothing may be lost: e's contents stay, and safefs's f lands somewhere in SRC. `sync
    --timeout 20` must finish (exit 0), not loop until its timeout.
    """
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "keep").write_bytes(b"untouched sibling")
    if kind == "modified":
        (src / "d" / "f").write_bytes(b"their f " * 100)
    m = mount_factory(src, None, None, *LONG_DELAY, host_id=HOST)
    if kind == "modified":
        assert (m.mnt / "d" / "f").read_bytes() == b"their f " * 100
    else:
        assert sorted(os.listdir(m.mnt / "d")) == ["keep"]
    ours = f"safefs's {kind} d/f ".encode() * 300
    write_through(m.mnt / "d" / "f", ours)
    os.rename(src / "d", src / "e")  # behind safefs's back

    started = time.monotonic()
    code, out = sync(m)
    took = time.monotonic() - started
    where = files_holding(src, ours)
    print(
        f"dir renamed ({kind}): sync exit {code} after {took:.1f}s; ours at {where}; "
        f"SRC {user_tree(src)}"
    )
    print(f"status errors: {m.status()['errors']}")
    assert (src / "e" / "keep").read_bytes() == b"untouched sibling", user_tree(src)
    if kind == "modified":
        assert files_holding(src, b"their f " * 100), f"their d/f is lost; SRC has {user_tree(src)}"
    assert where, (
        f"safefs's dirty d/f is nowhere in SRC after sync (exit {code}, {took:.1f}s); "
        f"SRC has {user_tree(src)}\n{out}"
    )
    assert code in (0, CONFLICTS), f"sync did not finish cleanly after {took:.1f}s\n{out}"
    m.umount()
    assert files_holding(src, ours), f"safefs's d/f lost at umount; SRC has {user_tree(src)}"
    assert (src / "e" / "keep").read_bytes() == b"untouched sibling"


# --------------------------------------------------------------------------- unlink after change


@pytest.mark.parametrize("dirty", [False, True], ids=["clean", "dirty"])
def test_unlink_through_mount_after_src_changed_keeps_theirs(
    mount_factory: MountFactory, tmp_path: Path, dirty: bool
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"first " * 100)
    m = mount_factory(src, None, None, *LONG_DELAY, host_id=HOST)
    assert (m.mnt / "f").read_bytes() == b"first " * 100  # cached; the kernel knows the name
    if dirty:
        write_through(m.mnt / "f", b"ours, soon unlinked " * 10)
    theirs = b"their edit, made directly in SRC " * 40
    change_behind_back(src / "f", theirs)
    os.unlink(m.mnt / "f")
    assert not (m.mnt / "f").exists()

    code, out = sync(m)
    assert code == CONFLICTS, out
    copies = conflict_copies(src, "f")
    assert [p.read_bytes() for p in copies] == [
        theirs
    ], f"their version must stay as one f.safefs-conflict-{HOST}-<time>; SRC has {user_tree(src)}"
    assert not (src / "f").exists(), "the unlinked name came back in SRC"
    assert any(copies[0].name in str(c) for c in m.status()["conflicts"]), m.status()["conflicts"]
    assert (
        m.mnt / copies[0].name
    ).read_bytes() == theirs, "the conflict copy is not visible in the mount"
    m.umount()
    assert [p.read_bytes() for p in conflict_copies(src, "f")] == [theirs]
    assert user_tree(src) == [copies[0].name]


# --------------------------------------------------------------------------- size and mtime kept


def rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """`rsync --inplace -t`: new bytes of the same length, the old mtime put back."""
    before = os.stat(path)
    assert len(data) == before.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


def replace_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """An editor's save: a new file of the same length, the old mtime, renamed over the name."""
    before = os.stat(path)
    assert len(data) == before.st_size
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.rename(tmp, path)


@pytest.mark.parametrize("edit", [rewrite_keeping_size_and_mtime, replace_keeping_size_and_mtime],
                         ids=["rewrite-in-place", "replace-by-rename"])  # fmt: skip
def test_edit_in_src_keeping_size_and_mtime_is_not_overwritten(
    mount_factory: MountFactory, tmp_path: Path, edit: Any
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    original = b"o" * 5000
    (src / "data.bin").write_bytes(original)
    m = mount_factory(src, None, None, *LONG_DELAY, host_id=HOST)
    assert (m.mnt / "data.bin").read_bytes() == original
    ours = b"m" * 5000
    write_through(m.mnt / "data.bin", ours)
    theirs = b"t" * 5000
    edit(src / "data.bin", theirs)

    code, out = sync(m)
    assert code == CONFLICTS, out
    assert (src / "data.bin").read_bytes() == theirs, "safefs overwrote the project's version"
    copies = conflict_copies(src, "data.bin")
    assert [p.read_bytes() for p in copies] == [ours], f"SRC has {user_tree(src)}"
    assert (m.mnt / "data.bin").read_bytes() == theirs
    assert (m.mnt / copies[0].name).read_bytes() == ours


def test_own_renames_links_and_chmods_are_no_conflict(mount_factory: MountFactory, tmp_path: Path) -> None:
    """safefs's own changes on the project move the file's ctime; they must not look foreign."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "f").write_bytes(b"first")
    m = mount_factory(src, None, None, *LONG_DELAY, host_id=HOST)
    assert (m.mnt / "f").read_bytes() == b"first"
    steps = [  # (where the file is, what the mount does to it while it is dirty, where it is then)
        ("f", lambda: os.rename(m.mnt / "f", m.mnt / "d" / "g"), "d/g"),
        ("d/g", lambda: os.link(m.mnt / "d" / "g", m.mnt / "h"), "d/g"),
        ("d/g", lambda: os.chmod(m.mnt / "h", 0o604), "d/g"),
        ("d/g", lambda: os.unlink(m.mnt / "h"), "d/g"),
        ("d/g", lambda: os.rename(m.mnt / "d" / "g", m.mnt / "g"), "g"),
    ]
    for n, (before, step, where) in enumerate(steps):
        data = f"version {n} ".encode() * (n + 1)
        write_through(m.mnt / before, data)
        step()
        code, out = sync(m)
        assert code == 0, f"step {n}: {out}"
        assert m.status()["conflicts"] == [], f"step {n}: SRC has {user_tree(src)}"
        assert (src / where).read_bytes() == data, f"step {n}: SRC has {user_tree(src)}"
    assert user_tree(src) == ["d", "g"]


# --------------------------------------------------------------------------- one-way conflicts


def _mount_creates(m: Mount) -> None:
    write_through(m.mnt / "x", b"ours")


def _mount_mkdirs(m: Mount) -> None:
    os.mkdir(m.mnt / "x")
    write_through(m.mnt / "x" / "inside", b"ours")


def _mount_links(m: Mount) -> None:
    os.link(m.mnt / "a", m.mnt / "x")


def _mount_renames(m: Mount) -> None:
    os.rename(m.mnt / "a", m.mnt / "x")


@pytest.mark.parametrize("op", [_mount_creates, _mount_mkdirs, _mount_links, _mount_renames],
                         ids=["create", "mkdir", "link", "rename"])  # fmt: skip
def test_a_name_taken_in_src_keeps_their_object(mount_factory: MountFactory, tmp_path: Path, op: Any) -> None:
    """The mount makes x; before write-back the project gets its own x. The project's x keeps
    the name, the mount's goes beside it as x.safefs-conflict-<host>-<YYYYmmdd-HHMMSS>."""
    src = tmp_path / "src"
    src.mkdir()
    if op in (_mount_links, _mount_renames):
        (src / "a").write_bytes(b"ours")
    m = mount_factory(src, None, None, *LONG_DELAY, host_id=HOST)
    assert "x" not in os.listdir(m.mnt)
    op(m)
    (src / "x").write_bytes(b"theirs")  # behind safefs's back, before write-back

    code, out = sync(m)
    assert code == CONFLICTS, out
    assert (src / "x").read_bytes() == b"theirs", f"the project's x lost its name; SRC has {user_tree(src)}"
    copies = conflict_copies(src, "x")
    assert len(copies) == 1, user_tree(src)
    assert re.fullmatch(r"x\.safefs-conflict-" + HOST + r"-\d{8}-\d{6}", copies[0].name), copies[0].name
    ours = copies[0] / "inside" if op is _mount_mkdirs else copies[0]
    assert ours.read_bytes() == b"ours"
    listed = [c for c in m.status()["conflicts"] if c.get("kept_as") == copies[0].name]
    assert listed and listed[0]["path"] == "x" and listed[0]["why"], m.status()["conflicts"]
    # The mount shows what the project has.
    assert sorted(os.listdir(m.mnt)) == sorted(n for n in os.listdir(src) if n != ".safefs")
    assert (m.mnt / "x").read_bytes() == b"theirs"
    assert (m.mnt / ours.relative_to(src)).read_bytes() == b"ours"
    m.umount()
    assert (src / "x").read_bytes() == b"theirs"


# --------------------------------------------------------------------------- the sync receipt


def test_sync_lists_its_conflicts_and_exits_10(mount_factory: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"original")
    m = mount_factory(src, None, None, *LONG_DELAY, host_id=HOST)
    assert (m.mnt / "f").read_bytes() == b"original"
    write_through(m.mnt / "f", b"ours")
    change_behind_back(src / "f", b"theirs")

    done = m.sync("--json", "--timeout", "20", timeout=60)
    assert done.returncode == CONFLICTS == 10, describe(done)
    receipt = json.loads(done.stdout)
    [copy] = conflict_copies(src, "f")
    assert [(c["path"], c["kept_as"]) for c in receipt["conflicts"]] == [("f", copy.name)], receipt
    assert receipt["conflicts"][0]["why"]
    assert not re.search(r"\b1[0-9]{9}\b", done.stdout), f"raw epoch seconds in the receipt: {done.stdout}"

    # Listed once: the next sync made no conflict and says so with exit 0.
    done = m.sync("--timeout", "20", timeout=60)
    assert done.returncode == 0 and "conflict (" not in done.stdout, describe(done)

    write_through(m.mnt / "f", b"ours again")
    change_behind_back(src / "f", b"theirs again")
    done = m.sync("--timeout", "20", timeout=60)
    assert done.returncode == CONFLICTS, describe(done)
    copies = conflict_copies(src, "f")
    [second] = [p for p in copies if p != copy]
    assert "f: changed in the mount, and changed, replaced or removed in the project" in done.stdout, done.stdout
    assert second.name in done.stdout, done.stdout
    print(done.stdout)
    assert not re.search(r"\b1[0-9]{9}\b", m.cli("status", m.mnt).stdout), "raw epoch seconds in status"
