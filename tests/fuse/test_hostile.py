"""Hostile and odd input through a real mount (issue 4 item 7; DESIGN.md G2, G8, section 5).

What these tests check, on bytes and errnos:
- Names: not UTF-8, exactly 255 bytes (256 -> ENAMETOOLONG), names that look like safefs's
  own staging or conflict names, names made of dots: ordinary files that reach SRC intact.
- `..` is resolved by the kernel, never by safefs: nothing outside SRC is created or read
  through safefs.
- Symlinks in SRC that point out of the project are symlinks in the mount; safefs itself never
  follows a link out of SRC when it resolves a path, fetches or publishes, even when a
  directory it knows is swapped for such a link behind its back.
- Offsets near the maximum file size answer with an errno (or work), never crash the mount,
  and never leave SRC unable to take what the mount accepted.
- O_DIRECT, O_PATH, O_NOFOLLOW, O_TMPFILE: work or fail with the kernel's errno.
- A directory with 100,000 entries, listed completely and present in SRC.
- A cached dirty file replaced by a directory in SRC before the flush: nothing lost.

Mounts come from `mount_factory`; a test that must not write back early uses a long delay.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Mount, MountFactory, describe

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

LONG_DELAY = ("--writeback-delay", "600")


# --------------------------------------------------------------------------- helpers


def errno_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int | None:
    """The errno `fn(*args)` fails with, or None if it succeeds (closing an fd it returns)."""
    try:
        result = fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno
    if fn is os.open and isinstance(result, int):
        os.close(result)
    return None


def assert_errno(expected: int | tuple[int, ...], fn: Callable[..., Any], *args: Any) -> None:
    want = expected if isinstance(expected, tuple) else (expected,)
    got = errno_of(fn, *args)
    names = [errno.errorcode[e] for e in want]
    got_name = "success" if got is None else errno.errorcode.get(got, str(got))
    assert got in want, f"{fn.__name__}{args}: expected {names}, got {got_name}"


def create(path: os.PathLike[Any] | bytes | str, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read(path: os.PathLike[Any] | bytes | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def tree(root: Path | bytes) -> dict[bytes, object]:
    """{relative bytes path: bytes | "dir" | ("symlink", target)} below `root`, without .safefs."""
    base = os.fsencode(root)
    out: dict[bytes, object] = {}
    for dirpath, dirs, names in os.walk(base):
        if dirpath == base:
            dirs[:] = [d for d in dirs if d != b".safefs"]
        for name in dirs + names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            else:
                out[rel] = read(full)
    return out


def files_holding(root: Path, data: bytes) -> list[str]:
    found = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            if (
                not os.path.islink(full)
                and os.path.isfile(full)
                and os.path.getsize(full) == len(data)
            ):
                if read(full) == data:
                    found.append(os.path.relpath(full, root))
    return sorted(found)


SYNCED_WITH_CONFLICTS = 10  # sync's exit code when it kept versions side by side


def sync_ok(m: Mount, timeout: float = 30, *, conflicts: bool = False) -> None:
    done = m.sync("--timeout", str(timeout), timeout=timeout + 40)
    assert done.returncode == (SYNCED_WITH_CONFLICTS if conflicts else 0), describe(done)


def still_serving(m: Mount) -> None:
    """The daemon is alive and the mount answers reads, writes and status."""
    assert m.alive, f"daemon died\n{m.log_tail()}"
    probe = m.mnt / "still-serving"
    create(probe, b"yes")
    assert read(probe) == b"yes"
    os.unlink(probe)
    assert m.status()["role"] == "writer"


# --------------------------------------------------------------------------- names


NON_UTF8 = [
    b"caf\xe9",
    b"\xff\xfe\xfd",
    b"a\x80b",
    b"\xc3\x28",
    b"\xed\xa0\x80surrogate",
    b"nl\nin\tname",
]


def test_non_utf8_names_reach_src(mount_factory: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    pre = os.fsencode(src) + b"/pre-\xfe\xff"
    create(pre, b"made in SRC before the mount")
    m = mount_factory(src)
    mnt = os.fsencode(m.mnt)
    assert read(mnt + b"/pre-\xfe\xff") == b"made in SRC before the mount"
    expected: dict[bytes, object] = {b"pre-\xfe\xff": b"made in SRC before the mount"}
    for i, name in enumerate(NON_UTF8):
        create(mnt + b"/" + name, b"content %d" % i)
        expected[name] = b"content %d" % i
    os.mkdir(mnt + b"/dir\xe9")
    create(mnt + b"/dir\xe9/inner\xff", b"inner")
    os.rename(mnt + b"/dir\xe9", mnt + b"/moved\xe8")
    os.symlink(b"target\xff", mnt + b"/link\xfa")
    expected[b"moved\xe8"] = "dir"
    expected[b"moved\xe8/inner\xff"] = b"inner"
    expected[b"link\xfa"] = ("symlink", b"target\xff")
    assert set(os.listdir(mnt)) == set(expected) - {b"moved\xe8/inner\xff"}
    assert tree(mnt) == expected
    sync_ok(m)
    assert tree(src) == expected
    m.umount()
    assert tree(src) == expected


def test_255_byte_names_and_256_is_enametoolong(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    in_src = b"s" * 255
    create(os.fsencode(src) + b"/" + in_src, b"from SRC")
    m = mount_factory(src)
    mnt = os.fsencode(m.mnt)
    assert read(mnt + b"/" + in_src) == b"from SRC"
    names = {
        b"a" * 255: b"ascii",
        b"\xff" * 255: b"not utf-8",
        ("\u00e9" * 127 + "z").encode(): b"multibyte",
    }
    for name, data in names.items():
        assert len(name) == 255
        create(mnt + b"/" + name, data)
    os.mkdir(mnt + b"/" + b"d" * 255)
    create(mnt + b"/" + b"d" * 255 + b"/" + b"f" * 255, b"nested")
    os.symlink(b"t" * 255, mnt + b"/" + b"l" * 255)

    too_long = mnt + b"/" + b"x" * 256
    assert_errno(errno.ENAMETOOLONG, os.open, too_long, os.O_CREAT | os.O_WRONLY, 0o644)
    assert_errno(errno.ENAMETOOLONG, os.mkdir, too_long)
    assert_errno(errno.ENAMETOOLONG, os.symlink, b"t", too_long)
    assert_errno(errno.ENAMETOOLONG, os.link, mnt + b"/" + b"a" * 255, too_long)
    assert_errno(errno.ENAMETOOLONG, os.rename, mnt + b"/" + b"a" * 255, too_long)
    assert_errno(errno.ENAMETOOLONG, os.stat, too_long)
    assert_errno(errno.ENAMETOOLONG, os.mkdir, mnt + b"/" + b"\xff" * 256)

    sync_ok(m)
    for name, data in names.items():
        assert read(os.fsencode(src) + b"/" + name) == data
    assert read(os.fsencode(src) + b"/" + b"d" * 255 + b"/" + b"f" * 255) == b"nested"
    assert os.readlink(os.fsencode(src) + b"/" + b"l" * 255) == b"t" * 255
    assert not any(len(n) > 255 for n in os.listdir(os.fsencode(src)))
    m.umount()
    assert len(os.listdir(src)) == 1 + len(names) + 2 + 1  # in_src, names, d, l, .safefs


def test_conflict_copy_of_a_255_byte_name(mount_factory: MountFactory, tmp_path: Path) -> None:
    """A conflict on a file whose name is already 255 bytes still keeps both versions."""
    src = tmp_path / "src"
    src.mkdir()
    name = b"n" * 255
    path = os.fsencode(src) + b"/" + name
    create(path, b"original")
    m = mount_factory(src, None, None, *LONG_DELAY)
    assert read(os.fsencode(m.mnt) + b"/" + name) == b"original"
    create(os.fsencode(m.mnt) + b"/" + name, b"ours")
    before = os.stat(path)
    create(path, b"theirs, behind safefs")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 2 * 10**9))
    sync_ok(m, conflicts=True)
    assert read(path) == b"theirs, behind safefs"
    assert files_holding(src, b"ours"), f"our version is lost; SRC has {sorted(os.listdir(src))}"


LOOKALIKES = [
    "x.safefs-conflict-h-1",
    "f.safefs-conflict-oobhost-20260101T000000",
    "f.safefs-conflict-oobhost-20260101T000000-1",
    "publish-1-2-abc.tmp",
    "publish-2a-1-0123456789ab.tmp",
    ".safefs-conflict",
    ".safefsx",
    "safefs",
    "staging",
    "generation",
    "...",
    "..a",
    "a..",
    ".. ",
]


def test_names_that_look_like_safefs_own_are_ordinary(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "y.safefs-conflict-h-2").write_bytes(b"pre-existing lookalike")
    m = mount_factory(src)
    mnt = m.mnt
    assert (mnt / "y.safefs-conflict-h-2").read_bytes() == b"pre-existing lookalike"
    expected: dict[bytes, object] = {
        b"y.safefs-conflict-h-2": b"pre-existing lookalike",
        b"sub": "dir",
    }
    for name in LOOKALIKES:
        create(mnt / name, name.encode() * 3)
        expected[name.encode()] = name.encode() * 3
    # A user directory called .safefs below the root is theirs, down to a staging-like path.
    deep = mnt / "sub" / ".safefs" / "staging" / "1"
    deep.mkdir(parents=True)
    create(deep / "publish-1-2-abc.tmp", b"user data in a staging-like path")
    create(mnt / "sub" / ".safefs" / "generation", b"not a generation record")
    for rel in ["sub/.safefs", "sub/.safefs/staging", "sub/.safefs/staging/1"]:
        expected[rel.encode()] = "dir"
    expected[b"sub/.safefs/staging/1/publish-1-2-abc.tmp"] = b"user data in a staging-like path"
    expected[b"sub/.safefs/generation"] = b"not a generation record"
    # Overwrite and rename lookalikes: no special treatment either way.
    create(mnt / "x.safefs-conflict-h-1", b"rewritten")
    expected[b"x.safefs-conflict-h-1"] = b"rewritten"
    os.rename(mnt / "publish-1-2-abc.tmp", mnt / "sub" / "publish-9-9-fff.tmp")
    expected[b"sub/publish-9-9-fff.tmp"] = expected.pop(b"publish-1-2-abc.tmp")

    assert tree(mnt) == expected
    sync_ok(m)
    assert tree(src) == expected
    m.umount()
    assert tree(src) == expected
    # And a second mount (which cleans its staging directory at start) leaves them alone.
    m2 = mount_factory.remount(m)
    assert tree(m2.mnt) == expected
    (m2.mnt / "touch").write_bytes(b"t")
    m2.umount()
    expected[b"touch"] = b"t"
    assert tree(src) == expected


def test_root_safefs_name_is_reserved(mounted: Mount) -> None:
    """The hidden control directory cannot be reached, made or replaced through the mount."""
    mnt = mounted.mnt
    control = mounted.src / ".safefs"
    before = sorted(os.listdir(control))
    assert ".safefs" not in os.listdir(mnt)
    assert_errno(errno.ENOENT, os.stat, mnt / ".safefs")
    assert_errno(errno.ENOENT, os.stat, mnt / ".safefs" / "lease")
    assert errno_of(os.mkdir, mnt / ".safefs") is not None
    assert errno_of(os.open, mnt / ".safefs", os.O_CREAT | os.O_WRONLY, 0o644) is not None
    create(mnt / "f", b"x")
    assert errno_of(os.rename, mnt / "f", mnt / ".safefs") is not None
    assert errno_of(os.symlink, "/tmp", mnt / ".safefs") is not None
    assert errno_of(os.link, mnt / "f", mnt / ".safefs") is not None
    assert (mnt / "f").read_bytes() == b"x"
    sync_ok(mounted)
    assert stat.S_ISDIR(os.lstat(control).st_mode)
    assert set(before) <= set(os.listdir(control))


# --------------------------------------------------------------------------- `..`


def test_dotdot_is_resolved_by_the_kernel_not_by_safefs(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    """SRC and MNT sit at different depths, so SRC-relative and MNT-relative `..` differ."""
    src = tmp_path / "deep" / "er" / "src"
    src.mkdir(parents=True)
    (src / "f").write_bytes(b"inside")
    m = mount_factory(src)
    mnt = m.mnt  # tmp_path/mnt
    fetched = m.status()["bytes_fetched"]
    os.mkdir(mnt / "a")
    assert read(f"{mnt}/a/../f") == b"inside"
    assert read(f"{mnt}/a/../a/../f") == b"inside"
    # Walking up past the mount root leaves the mount (kernel semantics): the real /etc/passwd.
    ups = "/..".join([""] * (len(mnt.parts) + 3))
    passwd = Path("/etc/passwd").read_bytes()
    assert read(f"{mnt}/a/..{ups}/etc/passwd") == passwd
    # A create that climbs out lands where the kernel says (beside MNT), never SRC-relative.
    create(f"{mnt}/a/../../escaped", b"kernel put me here")
    assert (tmp_path / "escaped").read_bytes() == b"kernel put me here"
    os.unlink(tmp_path / "escaped")
    before_outside = sorted(p for p in (tmp_path / "deep").rglob("*") if not p.is_relative_to(src))
    # A symlink whose target climbs out is stored verbatim, not resolved.
    os.symlink("../../../../etc/passwd", mnt / "a" / "up")
    assert os.readlink(mnt / "a" / "up") == "../../../../etc/passwd"
    sync_ok(m)
    assert os.readlink(src / "a" / "up") == "../../../../etc/passwd"
    assert os.path.islink(src / "a" / "up")
    assert tree(src) == {
        b"f": b"inside",
        b"a": "dir",
        b"a/up": ("symlink", b"../../../../etc/passwd"),
    }
    after_outside = sorted(p for p in (tmp_path / "deep").rglob("*") if not p.is_relative_to(src))
    assert after_outside == before_outside, "safefs created something above SRC"
    assert m.status()["bytes_fetched"] - fetched <= len(b"inside"), "safefs fetched more than SRC/f"
    still_serving(m)


# --------------------------------------------------------------------------- symlinks out of SRC


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside SRC with a file a careless safefs could read or overwrite."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret").write_bytes(b"SECRET outside the project " * 10)
    (out / "existing").write_bytes(b"outside file, never to be written by safefs")
    return out


def outside_state(out: Path) -> dict[bytes, object]:
    return tree(out)


def test_symlinks_out_of_src_are_symlinks_in_the_mount(
    mount_factory: MountFactory, tmp_path: Path, outside: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(outside / "secret", src / "lf")
    os.symlink(outside, src / "ld")
    os.symlink("../outside/secret", src / "rel")
    before = outside_state(outside)
    m = mount_factory(src)
    fetched = m.status()["bytes_fetched"]
    for name, target in [
        ("lf", str(outside / "secret")),
        ("ld", str(outside)),
        ("rel", "../outside/secret"),
    ]:
        assert stat.S_ISLNK(os.lstat(m.mnt / name).st_mode), f"{name} is not a symlink in the mount"
        assert os.readlink(m.mnt / name) == target
    # The kernel follows them (absolute targets, and relative ones from MNT's directory).
    assert (m.mnt / "lf").read_bytes() == (outside / "secret").read_bytes()
    assert (m.mnt / "rel").read_bytes() == (outside / "secret").read_bytes()
    assert sorted(os.listdir(m.mnt / "ld")) == ["existing", "secret"]
    assert m.status()["bytes_fetched"] == fetched, "safefs itself read through a link out of SRC"
    # Moving and removing the links moves and removes the links, never their targets.
    os.rename(m.mnt / "ld", m.mnt / "ld2")
    os.unlink(m.mnt / "lf")
    sync_ok(m)
    m.umount()
    assert tree(src) == {
        b"ld2": ("symlink", os.fsencode(outside)),
        b"rel": ("symlink", b"../outside/secret"),
    }
    assert outside_state(outside) == before


SWAPPED_DATA = (b"new file written through the mount", b"dirty version of d/existing", b"deeper")


def swap_dir_for_outside_link(
    mount_factory: MountFactory, tmp_path: Path, outside: Path
) -> tuple[Mount, dict[bytes, object], Any]:
    """The mount knows SRC/d as a real directory; behind its back d becomes a symlink to a
    directory outside SRC; then new and dirty files go into d through the mount and a sync
    with --timeout 20 runs. Returns (mount, the outside dir before, the sync's result)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "existing").write_bytes(b"the project's own d/existing")
    m = mount_factory(src, None, None, *LONG_DELAY)
    assert sorted(os.listdir(m.mnt / "d")) == ["existing"]
    assert (m.mnt / "d" / "existing").read_bytes() == b"the project's own d/existing"  # cached
    os.rename(src / "d", src / "d.moved-away")
    os.symlink(outside, src / "d")
    before = outside_state(outside)

    create(m.mnt / "d" / "x", SWAPPED_DATA[0])
    create(m.mnt / "d" / "existing", SWAPPED_DATA[1])
    os.mkdir(m.mnt / "d" / "newdir")
    create(m.mnt / "d" / "newdir" / "y", SWAPPED_DATA[2])
    done = m.sync("--timeout", "20", timeout=60)
    where = {data: files_holding(src, data) for data in SWAPPED_DATA}
    print(f"swapped dir: sync exit {done.returncode}; our data in SRC at {where}; "
          f"SRC {sorted(tree(src))}; status errors {m.status()['errors']}")  # fmt: skip
    return m, before, done


def test_dir_swapped_for_outside_symlink_is_never_written_through(
    mount_factory: MountFactory, tmp_path: Path, outside: Path
) -> None:
    """Safety: nothing appears in (or changes in) the outside directory."""
    m, before, _done = swap_dir_for_outside_link(mount_factory, tmp_path, outside)
    after = outside_state(outside)
    assert (
        after == before
    ), f"safefs wrote through a symlink out of SRC: outside dir now {sorted(after)}"
    src = m.src
    assert (src / "d.moved-away" / "existing").read_bytes() == b"the project's own d/existing"
    if os.path.islink(src / "d"):
        assert os.readlink(src / "d") == str(outside)
    still_serving(m)
    # The file could not go to d/ any more: it is kept as a conflict copy at the top of the
    # project, and the mount shows it there too.
    kept = [p for p in os.listdir(m.mnt) if p.startswith("x.safefs-conflict-")]
    assert [(m.mnt / p).read_bytes() for p in kept] == [SWAPPED_DATA[0]], kept
    assert outside_state(outside) == before


def test_dir_swapped_for_outside_symlink_loses_nothing(
    mount_factory: MountFactory, tmp_path: Path, outside: Path
) -> None:
    """G2: the data written into d reaches SRC (beside the link, or as conflict copies), and
    the sync finishes instead of retrying until its timeout."""
    m, before, done = swap_dir_for_outside_link(mount_factory, tmp_path, outside)
    assert outside_state(outside) == before
    where = {data: files_holding(m.src, data) for data in SWAPPED_DATA}
    assert all(where.values()), f"the mount's data did not reach SRC: {where}\n{describe(done)}"
    assert done.returncode == SYNCED_WITH_CONFLICTS, describe(done)


def test_fetch_never_follows_a_swapped_symlink(
    mount_factory: MountFactory, tmp_path: Path, outside: Path
) -> None:
    """Reading d/secret after SRC/d became a link to an outside dir must not show outside bytes."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "own").write_bytes(b"own")
    m = mount_factory(src)
    assert stat.S_ISDIR(os.stat(m.mnt / "d").st_mode)  # d is known; its entries are not
    os.rename(src / "d", src / "d.old")
    os.symlink(outside, src / "d")
    secret = (outside / "secret").read_bytes()
    try:
        got: bytes | int = (m.mnt / "d" / "secret").read_bytes()
    except OSError as exc:
        got = exc.errno
    assert got != secret, "safefs fetched a file through a symlink out of SRC"
    try:
        listed: list[str] | int = os.listdir(m.mnt / "d")
    except OSError as exc:
        listed = exc.errno
    assert not (
        isinstance(listed, list) and "secret" in listed
    ), f"listing followed the link: {listed}"
    print(
        f"fetch through swapped link: read -> {got if isinstance(got, int) else len(got)}, "
        f"list -> {listed}"
    )
    still_serving(m)


# --------------------------------------------------------------------------- offsets


def test_offsets_near_the_maximum_file_size(mount_factory: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    m = mount_factory(src)
    fd = os.open(m.mnt / "big", os.O_CREAT | os.O_RDWR, 0o644)
    outcomes: dict[str, object] = {}
    try:
        os.write(fd, b"head")
        for label, fn in [
            ("pwrite@2**62", lambda: os.pwrite(fd, b"x", 2**62)),
            ("pwrite@2**63-2", lambda: os.pwrite(fd, b"yz", 2**63 - 2)),
            ("pwrite@2**63-1", lambda: os.pwrite(fd, b"z", 2**63 - 1)),
            ("pread@2**62", lambda: os.pread(fd, 10, 2**62)),
            ("pread@2**63-1", lambda: os.pread(fd, 10, 2**63 - 1)),
        ]:
            try:
                outcomes[label] = fn()
            except OSError as exc:
                outcomes[label] = errno.errorcode[exc.errno]
        size_after_writes = os.fstat(fd).st_size
    finally:
        # With the kernel writeback cache the kernel takes the write at 2**62 into its page
        # cache; the cache disk (16 TiB files on ext4) refuses it when the page is sent, and
        # close() reports that, as on any writeback filesystem (NFS too).
        try:
            os.close(fd)
            outcomes["close"] = 0
        except OSError as exc:
            outcomes["close"] = errno.errorcode[exc.errno]
    for label, fn in [
        ("truncate 2**62", lambda: os.truncate(m.mnt / "trunc", 2**62)),
        ("truncate 2**63-1", lambda: os.truncate(m.mnt / "trunc", 2**63 - 1)),
    ]:
        create(m.mnt / "trunc", b"t") if not (m.mnt / "trunc").exists() else None
        try:
            outcomes[label] = fn()
        except OSError as exc:
            outcomes[label] = errno.errorcode[exc.errno]
    print(f"offsets: {outcomes}")
    # Writes that end past 2**63-1 cannot succeed anywhere.
    assert outcomes["pwrite@2**63-2"] in ("EFBIG", "EINVAL"), outcomes
    assert outcomes["pwrite@2**63-1"] in ("EFBIG", "EINVAL"), outcomes
    assert outcomes["pwrite@2**62"] in (1, "EFBIG", "EINVAL"), outcomes
    refused_late = outcomes["close"] != 0
    assert not refused_late or (outcomes["pwrite@2**62"] == 1 and outcomes["close"] in ("EIO", "EFBIG")), outcomes
    assert outcomes["pread@2**62"] in (b"x", b"", "EINVAL"), outcomes
    assert outcomes["pread@2**63-1"] in (b"", "EINVAL"), outcomes
    still_serving(m)
    with open(m.mnt / "big", "rb") as f:
        assert f.read(4) == b"head"
    # What the mount accepted, SRC must take too: the sync finishes and the sizes agree.
    mnt_sizes = {n: os.stat(m.mnt / n).st_size for n in ("big", "trunc")}
    assert mnt_sizes["big"] == size_after_writes
    done = m.sync("--timeout", "20", timeout=60)
    assert (
        done.returncode == 0
    ), f"sync after huge offsets: {describe(done)}\nmount sizes {mnt_sizes}"
    if refused_late:  # the kernel keeps the size it took until it drops the inode; it sent
        # the first page whole, as the file was longer than that page then
        assert (src / "big").read_bytes() in (b"head", b"head" + bytes(4092))
        mnt_sizes["big"] = os.stat(src / "big").st_size
    assert {n: os.stat(src / n).st_size for n in ("big", "trunc")} == mnt_sizes
    m.umount()


# --------------------------------------------------------------------------- open flags


def test_o_direct(mounted: Mount) -> None:
    path = mounted.mnt / "direct"
    data = bytes(range(256)) * 32  # 8 KiB, aligned sizes
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    except OSError as exc:
        assert exc.errno == errno.EINVAL, f"O_DIRECT open: {errno.errorcode[exc.errno]}"
        still_serving(mounted)
        return
    print("O_DIRECT open works")
    buf = mmap.mmap(-1, len(data))  # page-aligned, as O_DIRECT may require
    buf.write(data)
    try:
        try:
            written = os.pwritev(fd, [buf], 0)
        except OSError as exc:
            assert exc.errno == errno.EINVAL, errno.errorcode[exc.errno]
            written = None
        if written is not None:
            assert written == len(data)
            back = mmap.mmap(-1, len(data))
            assert os.preadv(fd, [back], 0) == len(data)
            assert bytes(back) == data
    finally:
        os.close(fd)
    still_serving(mounted)
    if written is not None:
        assert path.read_bytes() == data
        sync_ok(mounted)
        assert (mounted.src / "direct").read_bytes() == data


def test_o_path_o_nofollow_o_tmpfile(mounted: Mount) -> None:
    mnt = mounted.mnt
    create(mnt / "file", b"contents")
    os.symlink("file", mnt / "link")
    os.mkdir(mnt / "dir")

    fd = os.open(mnt / "file", os.O_PATH)
    try:
        assert os.fstat(fd).st_size == len(b"contents")
        assert_errno(errno.EBADF, os.read, fd, 10)
        assert_errno(errno.EBADF, os.write, fd, b"x")
    finally:
        os.close(fd)
    assert_errno(errno.ELOOP, os.open, mnt / "link", os.O_RDONLY | os.O_NOFOLLOW)
    assert_errno(errno.ELOOP, os.open, mnt / "link", os.O_WRONLY | os.O_NOFOLLOW | os.O_TRUNC)
    fd = os.open(mnt / "link", os.O_PATH | os.O_NOFOLLOW)
    try:
        assert stat.S_ISLNK(os.fstat(fd).st_mode)
        assert os.readlink("", dir_fd=fd) == "file"
    finally:
        os.close(fd)
    fd = os.open(mnt / "file", os.O_RDONLY | os.O_NOFOLLOW)
    try:
        assert os.read(fd, 100) == b"contents"
    finally:
        os.close(fd)
    assert_errno(errno.ENOTDIR, os.open, mnt / "file", os.O_RDONLY | os.O_DIRECTORY)
    assert_errno(errno.EISDIR, os.open, mnt / "dir", os.O_WRONLY)
    # O_TMPFILE: pyfuse3 has no tmpfile op; the kernel answers EOPNOTSUPP (or it works).
    tmpfile = getattr(os, "O_TMPFILE", None)
    if tmpfile is not None:
        try:
            fd = os.open(mnt / "dir", tmpfile | os.O_RDWR, 0o600)
        except OSError as exc:
            assert exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL), errno.errorcode[
                exc.errno
            ]
        else:
            os.write(fd, b"anon")
            os.close(fd)
        assert os.listdir(mnt / "dir") == []
    assert (mnt / "file").read_bytes() == b"contents"
    still_serving(mounted)
    sync_ok(mounted)
    assert tree(mounted.src) == {b"file": b"contents", b"link": ("symlink", b"file"), b"dir": "dir"}


# --------------------------------------------------------------------------- big directory


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_directory_with_100000_entries(mount_factory: MountFactory, tmp_path: Path) -> None:
    count = 100_000
    m = mount_factory()
    big = m.mnt / "big"
    os.mkdir(big)
    started = time.monotonic()
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    dfd = os.open(big, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            os.close(os.open(f"e{i:06d}", flags, 0o644, dir_fd=dfd))
    finally:
        os.close(dfd)
    created = time.monotonic() - started
    names = os.listdir(big)
    assert len(names) == count, f"listed {len(names)} of {count}"
    assert set(names) == {f"e{i:06d}" for i in range(count)}
    assert os.stat(big / "e099999").st_size == 0
    with os.scandir(big) as it:  # a second, independent listing
        assert sum(1 for _ in it) == count
    listed = time.monotonic() - started - created
    m.umount(timeout=600)
    written = time.monotonic() - started - created - listed
    in_src = os.listdir(m.src / "big")
    print(f"100k entries: create {created:.1f}s, list {listed:.1f}s, umount {written:.1f}s")
    assert len(in_src) == count and set(in_src) == set(names)


# --------------------------------------------------------------------------- file -> dir


def test_file_replaced_by_directory_in_src_before_flush(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"original f" * 100)
    m = mount_factory(src, None, None, *LONG_DELAY)
    assert (m.mnt / "f").read_bytes() == b"original f" * 100  # fetched
    ours = b"dirty version of f, only in the cache " * 50
    create(m.mnt / "f", ours)
    os.unlink(src / "f")  # behind safefs's back: f becomes a directory with content
    os.mkdir(src / "f")
    (src / "f" / "inner").write_bytes(b"their inner file")

    done = m.sync("--timeout", "20", timeout=60)
    where = files_holding(src, ours)
    print(f"file->dir: sync exit {done.returncode}; ours at {where}; SRC {sorted(tree(src))}")
    assert (
        src / "f" / "inner"
    ).read_bytes() == b"their inner file", f"their directory was damaged: {tree(src)}"
    assert where, f"the mount's dirty f is nowhere in SRC: {sorted(tree(src))}\n{describe(done)}"
    assert done.returncode == SYNCED_WITH_CONFLICTS, describe(done)
    m.umount()
    assert (src / "f" / "inner").read_bytes() == b"their inner file"
    assert files_holding(src, ours) == where
