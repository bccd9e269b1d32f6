"""Backing against a real local directory: every method, symlink safety, deep paths, faults."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time

import pytest

from safefs.backing import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Attrs,
    Backing,
    Entry,
    Fingerprint,
)
from safefs.testing import FaultPlan

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (chown to other ids, trusted.*, devices)")
# A uid/gid pair the test can give away as root, or our own when not root.
OTHER_UID, OTHER_GID = (1234, 5678) if ROOT else (os.getuid(), os.getgid())
STAGING = (b".safefs", b"staging", b"1")


def attrs(mode=0o644, uid=OTHER_UID, gid=OTHER_GID, atime_ns=1_000_000_123, mtime_ns=2_000_000_456, xattrs=None):
    return Attrs(mode, uid, gid, atime_ns, mtime_ns, dict(xattrs or {}))


@pytest.fixture
def tree(tmp_path):
    """SRC with a file, a dir, an inside symlink, and symlinks pointing outside the project."""
    src = tmp_path / "src"
    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "secret").write_bytes(b"outside data")
    (outside / "d" / "secret").write_bytes(b"outside data")
    src.mkdir()
    (src / "f").write_bytes(b"hello world")
    (src / "d").mkdir()
    (src / "d" / "g").write_bytes(b"0123456789")
    os.symlink("f", src / "ln")
    os.symlink(outside / "d", src / "out_dir")
    os.symlink(outside / "secret", src / "out_file")
    return src, outside


@pytest.fixture
def backing(tree):
    b = Backing(tree[0])
    yield b
    b.close()


def cache_file(tmp_path, data: bytes = b"", size: int | None = None, name="cache") -> int:
    p = tmp_path / name
    with open(p, "wb") as f:
        f.write(data)
        if size is not None:
            f.truncate(size)
    return os.open(p, os.O_RDONLY)


def assert_attrs(st: os.stat_result, a: Attrs):
    assert stat.S_IMODE(st.st_mode) == a.mode
    assert (st.st_uid, st.st_gid) == (a.uid, a.gid)
    assert st.st_atime_ns == a.atime_ns and st.st_mtime_ns == a.mtime_ns


def escapes(exc: pytest.ExceptionInfo) -> None:
    assert exc.value.errno in (errno.ELOOP, errno.ENOTDIR)


# ---------------------------------------------------------------------------- basics


def test_open_and_close(tmp_path, tree):
    with pytest.raises(FileNotFoundError):
        Backing(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        Backing(tree[0] / "f")
    b = Backing(tree[0])
    b.close()
    b.close()  # idempotent
    with pytest.raises(OSError):
        b.lstat((b"f",))


def test_bad_paths_are_refused(backing):
    for bad in [(b"",), (b".",), (b"..",), (b"a/b",), (b"d", b".."), (b"x\0",)]:
        with pytest.raises(ValueError):
            backing.lstat(bad)
    with pytest.raises(TypeError):
        backing.lstat(b"f")  # type: ignore[arg-type]


def test_lstat_and_fingerprint(backing, tree):
    src, _ = tree
    assert stat.S_ISDIR(backing.lstat(()).st_mode)
    st = backing.lstat((b"f",))
    assert Fingerprint.of(st) == Fingerprint.of(os.lstat(src / "f"))
    assert Fingerprint.of(st).size == 11
    assert stat.S_ISLNK(backing.lstat((b"out_dir",)).st_mode)  # the link, not the target
    with pytest.raises(FileNotFoundError):
        backing.lstat((b"nope",))


def test_listdir(backing, tree):
    src, _ = tree
    (src / "d" / os.fsdecode(b"\xff\xfe-not-utf8")).write_bytes(b"x")
    entries = {e.name: e for e in backing.listdir(())}
    assert set(entries) == {b"f", b"d", b"ln", b"out_dir", b"out_file"}
    assert entries[b"ln"].link_target == b"f"
    assert entries[b"out_dir"].link_target == os.fsencode(tree[1] / "d")
    assert entries[b"f"].link_target is None and entries[b"f"].st.st_size == 11
    assert stat.S_ISDIR(entries[b"d"].st.st_mode)
    names = [e.name for e in backing.listdir((b"d",))]
    assert names == sorted([b"g", b"\xff\xfe-not-utf8"])
    assert all(isinstance(e, Entry) for e in backing.listdir((b"d",)))


def test_read(backing):
    assert backing.read((b"f",), 0, 100) == b"hello world"
    assert backing.read((b"f",), 6, 3) == b"wor"
    assert backing.read((b"f",), 50, 10) == b""
    assert backing.read((b"d", b"g"), 2, 5) == b"23456"
    assert backing.bytes_read == 11 + 3 + 5
    with pytest.raises(IsADirectoryError):
        backing.read((b"d",), 0, 1)
    with pytest.raises(OSError) as e:
        backing.read((b"ln",), 0, 1)  # a final symlink is never followed, even inside
    assert e.value.errno == errno.ELOOP


def test_read_does_not_block_on_a_fifo(backing, tree):
    os.mkfifo(tree[0] / "fifo")
    with pytest.raises(OSError) as e:
        backing.read((b"fifo",), 0, 1)
    assert e.value.errno == errno.EINVAL


def test_readlink(backing):
    assert backing.readlink((b"ln",)) == b"f"
    with pytest.raises(OSError) as e:
        backing.readlink((b"f",))
    assert e.value.errno == errno.EINVAL


def test_getxattrs(backing, tree):
    src, _ = tree
    os.setxattr(src / "f", b"user.one", b"1")
    os.setxattr(src / "f", b"user.two", b"\x00\xff")
    assert backing.getxattrs((b"f",)) == {b"user.one": b"1", b"user.two": b"\x00\xff"}
    assert backing.getxattrs((b"d",)) == {}


@needs_root
def test_getxattrs_of_a_symlink_is_the_links_own(backing, tree):
    src, outside = tree
    os.setxattr(outside / "secret", b"trusted.target", b"t")
    os.setxattr(src / "out_file", b"trusted.link", b"l", follow_symlinks=False)
    assert backing.getxattrs((b"out_file",)) == {b"trusted.link": b"l"}


def test_statvfs_and_fsync_dir(backing):
    assert backing.statvfs().f_bsize > 0
    backing.fsync_dir(())
    backing.fsync_dir((b"d",))
    with pytest.raises(OSError) as e:
        backing.fsync_dir((b"out_dir",))
    escapes(e)


# ---------------------------------------------------------------------------- namespace


def test_mkdir(backing, tree):
    src, _ = tree
    a = attrs(mode=0o2750, xattrs={b"user.k": b"v"})
    st = backing.mkdir((b"d", b"new"), a)
    assert stat.S_ISDIR(st.st_mode)
    assert_attrs(st, a)
    assert_attrs(os.lstat(src / "d" / "new"), a)
    assert os.getxattr(src / "d" / "new", b"user.k") == b"v"
    with pytest.raises(FileExistsError):
        backing.mkdir((b"d", b"new"), a)
    with pytest.raises(FileNotFoundError):
        backing.mkdir((b"missing", b"x"), a)


def test_symlink_attrs_apply_to_the_link(backing, tree):
    src, outside = tree
    before = os.stat(outside / "secret")
    a = attrs(mode=0o600)
    st = backing.symlink(os.fsencode(outside / "secret"), (b"newlink",), a)
    assert stat.S_ISLNK(st.st_mode)
    assert (st.st_uid, st.st_gid) == (a.uid, a.gid)
    assert st.st_mtime_ns == a.mtime_ns
    assert os.readlink(src / "newlink") == str(outside / "secret")
    after = os.stat(outside / "secret")
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_mtime_ns)


def test_mknod_fifo(backing, tree):
    a = attrs(mode=0o640)
    st = backing.mknod((b"fifo",), stat.S_IFIFO | 0o777, 0, a)
    assert stat.S_ISFIFO(st.st_mode)
    assert_attrs(st, a)


@needs_root
def test_mknod_device(backing):
    st = backing.mknod((b"null",), stat.S_IFCHR, os.makedev(1, 3), attrs(mode=0o666))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


def test_link(backing, tree):
    src, _ = tree
    before, st = backing.link((b"f",), (b"d", b"hard"))
    assert before.st_nlink == 1 and st.st_nlink == 2 and st.st_ino == os.lstat(src / "f").st_ino
    _, st = backing.link((b"out_file",), (b"hardlink_to_link",))  # links the symlink itself
    assert stat.S_ISLNK(st.st_mode)


def test_unlink_and_rmdir(backing, tree):
    src, outside = tree
    backing.unlink((b"out_dir",))  # removes the link, not what it points to
    assert not os.path.lexists(src / "out_dir") and (outside / "d" / "secret").exists()
    backing.unlink((b"d", b"g"))
    backing.rmdir((b"d",))
    assert not (src / "d").exists()
    with pytest.raises(FileNotFoundError):
        backing.unlink((b"d", b"g"))
    with pytest.raises(OSError):
        backing.rmdir((b"f",))


def test_rename_plain_noreplace_exchange(backing, tree):
    src, _ = tree
    before, after = backing.rename((b"f",), (b"d", b"f2"))
    assert (src / "d" / "f2").read_bytes() == b"hello world"
    assert before.st_ino == after.st_ino == os.lstat(src / "d" / "f2").st_ino
    with pytest.raises(FileExistsError):
        backing.rename((b"d", b"f2"), (b"d", b"g"), RENAME_NOREPLACE)
    assert (src / "d" / "g").read_bytes() == b"0123456789"
    backing.rename((b"d", b"f2"), (b"f",), RENAME_NOREPLACE)
    assert (src / "f").read_bytes() == b"hello world"
    backing.rename((b"f",), (b"d", b"g"), RENAME_EXCHANGE)
    assert (src / "f").read_bytes() == b"0123456789"
    assert (src / "d" / "g").read_bytes() == b"hello world"
    with pytest.raises(FileNotFoundError):
        backing.rename((b"nope",), (b"f",), RENAME_EXCHANGE)
    with pytest.raises(OSError):
        backing.rename((b"f",), (b"g",), 4)
    backing.rename((b"f",), (b"f3",))  # flags=0 replaces
    backing.rename((b"f3",), (b"d", b"g"))
    assert (src / "d" / "g").read_bytes() == b"0123456789"


# ---------------------------------------------------------------------------- attributes


def test_set_attrs_file_with_setuid_and_xattrs(backing, tree):
    src, _ = tree
    os.setxattr(src / "f", b"user.stale", b"old")
    a = attrs(mode=0o4755, xattrs={b"user.keep": b"new"})
    st = backing.set_attrs((b"f",), a)
    assert_attrs(st, a)  # setuid survives: the mode is set after the owner
    assert backing.getxattrs((b"f",)) == {b"user.keep": b"new"}
    assert (src / "f").read_bytes() == b"hello world"


def test_set_attrs_size(backing, tree):
    src, _ = tree
    st = backing.set_attrs((b"f",), attrs(), size=5)
    assert st.st_size == 5 and (src / "f").read_bytes() == b"hello"
    assert st.st_mtime_ns == attrs().mtime_ns  # times last, after the truncate
    st = backing.set_attrs((b"f",), attrs(), size=8)
    assert (src / "f").read_bytes() == b"hello\0\0\0"
    with pytest.raises(IsADirectoryError):
        backing.set_attrs((b"d",), attrs(), size=0)


def test_set_attrs_dir_root_and_symlink(backing, tree):
    src, outside = tree
    a = attrs(mode=0o1777)
    assert_attrs(backing.set_attrs((b"d",), a), a)
    assert_attrs(backing.set_attrs((), a), a)
    before = os.stat(outside / "secret")
    st = backing.set_attrs((b"out_file",), attrs(mode=0o600))
    assert stat.S_ISLNK(st.st_mode) and st.st_mtime_ns == attrs().mtime_ns
    after = os.stat(outside / "secret")
    assert (after.st_mode, after.st_uid, after.st_mtime_ns) == (before.st_mode, before.st_uid, before.st_mtime_ns)


def test_set_attrs_on_own_readonly_file_with_size(backing, tree):
    src, _ = tree
    os.chmod(src / "f", 0o444)
    a = attrs(mode=0o444, uid=os.getuid(), gid=os.getgid())
    st = backing.set_attrs((b"f",), a, size=3)
    assert st.st_size == 3 and stat.S_IMODE(st.st_mode) == 0o444


# ---------------------------------------------------------------------------- symlinks out


@pytest.mark.parametrize("op", ["read", "listdir", "set_attrs", "publish", "write_ranges", "mkdir", "getxattrs"])
def test_symlink_component_to_outside_is_never_followed(backing, tree, tmp_path, op):
    src, outside = tree
    through = (b"out_dir", b"secret")
    fd = cache_file(tmp_path, b"evil")
    calls = {
        "read": lambda: backing.read(through, 0, 100),
        "listdir": lambda: backing.listdir((b"out_dir",)),
        "set_attrs": lambda: backing.set_attrs(through, attrs(mode=0o777)),
        "publish": lambda: backing.publish_atomic(through, STAGING, fd, 4, attrs()),
        "write_ranges": lambda: backing.write_ranges(through, fd, [(0, 4)], 4, attrs()),
        "mkdir": lambda: backing.mkdir((b"out_dir", b"new"), attrs()),
        "getxattrs": lambda: backing.getxattrs(through),
    }
    before = os.stat(outside / "d" / "secret")
    with pytest.raises(OSError) as e:
        calls[op]()
    escapes(e)
    os.close(fd)
    after = os.stat(outside / "d" / "secret")
    assert (outside / "d" / "secret").read_bytes() == b"outside data"
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    assert os.listdir(outside / "d") == ["secret"]
    assert backing.bytes_read == 0 and backing.bytes_written == 0


def test_staging_through_symlink_is_refused(backing, tree, tmp_path):
    fd = cache_file(tmp_path, b"data")
    with pytest.raises(OSError) as e:
        backing.publish_atomic((b"new",), (b"out_dir", b"staging"), fd, 4, attrs())
    escapes(e)
    assert not (tree[1] / "d" / "staging").exists()


# ---------------------------------------------------------------------------- publish / write


def test_publish_atomic_preserves_everything(backing, tree, tmp_path):
    src, _ = tree
    fd = cache_file(tmp_path, b"new contents!")
    a = attrs(mode=0o2751, xattrs={b"user.a": b"1", b"user.b": b"\xff" * 100})
    os.setxattr(src / "f", b"user.stale", b"x")
    st = backing.publish_atomic((b"f",), STAGING, fd, 13, a)
    assert_attrs(st, a)
    assert_attrs(os.lstat(src / "f"), a)
    assert (src / "f").read_bytes() == b"new contents!"
    assert backing.getxattrs((b"f",)) == a.xattrs
    assert os.listdir(src / ".safefs" / "staging" / "1") == []
    assert stat.S_IMODE(os.stat(src / ".safefs" / "staging").st_mode) == 0o700
    assert backing.bytes_written == 13
    # a second publish reuses the staging dir and a new file (publish creates too)
    backing.publish_atomic((b"d", b"brand_new"), STAGING, fd, 3, a)
    assert (src / "d" / "brand_new").read_bytes() == b"new"
    os.close(fd)


def test_publish_atomic_keeps_holes(backing, tree, tmp_path):
    src, _ = tree
    size = 100 << 20
    fd = cache_file(tmp_path, size=size)
    os.close(fd)
    with open(tmp_path / "cache", "r+b") as f:
        f.seek(50 << 20)
        f.write(b"A" * 4096)
        f.seek(size - 4096)
        f.write(b"Z" * 4096)
    fd = os.open(tmp_path / "cache", os.O_RDONLY)
    st = backing.publish_atomic((b"sparse",), STAGING, fd, size, attrs())
    os.close(fd)
    assert st.st_size == size
    assert st.st_blocks * 512 < (1 << 20)
    assert backing.bytes_written < (1 << 20)
    assert backing.read((b"sparse",), (50 << 20) - 2, 4) == b"\0\0AA"
    assert backing.read((b"sparse",), size - 2, 10) == b"ZZ"
    assert backing.read((b"sparse",), 1 << 20, 3) == b"\0\0\0"


def test_publish_atomic_replaces_a_symlink_not_its_target(backing, tree, tmp_path):
    src, outside = tree
    fd = cache_file(tmp_path, b"mine")
    backing.publish_atomic((b"out_file",), STAGING, fd, 4, attrs())
    os.close(fd)
    assert not os.path.islink(src / "out_file")
    assert (src / "out_file").read_bytes() == b"mine"
    assert (outside / "secret").read_bytes() == b"outside data"


def test_publish_atomic_failure_leaves_no_staging_file(backing, tree, tmp_path):
    src, _ = tree
    fd = cache_file(tmp_path, b"data")
    bad = attrs(xattrs={b"nonsense.namespace": b"x"})  # setxattr refuses it after the copy
    with pytest.raises(OSError):
        backing.publish_atomic((b"f",), STAGING, fd, 4, bad)
    assert os.listdir(src / ".safefs" / "staging" / "1") == []
    assert (src / "f").read_bytes() == b"hello world"
    with pytest.raises(IsADirectoryError):  # rename over a directory fails
        backing.publish_atomic((b"d",), STAGING, fd, 4, attrs())
    assert os.listdir(src / ".safefs" / "staging" / "1") == []
    os.close(fd)


def test_publish_atomic_size_beyond_source_is_a_hole(backing, tree, tmp_path):
    fd = cache_file(tmp_path, b"abc")
    st = backing.publish_atomic((b"g",), STAGING, fd, 10, attrs())
    os.close(fd)
    assert st.st_size == 10
    assert backing.read((b"g",), 0, 10) == b"abc" + b"\0" * 7


def test_write_ranges_grow(backing, tree, tmp_path):
    src, _ = tree
    (src / "big").write_bytes(b"a" * 10000)
    fd = cache_file(tmp_path, b"b" * 20000)
    a = attrs(mode=0o640)
    st = backing.write_ranges((b"big",), fd, [(0, 10), (5000, 5100), (15000, 20000)], 20000, a)
    os.close(fd)
    data = (src / "big").read_bytes()
    assert st.st_size == 20000 == len(data)
    assert data[:10] == b"b" * 10 and data[10:5000] == b"a" * 4990
    assert data[5000:5100] == b"b" * 100 and data[5100:10000] == b"a" * 4900
    assert data[10000:15000] == b"\0" * 5000 and data[15000:] == b"b" * 5000
    assert backing.bytes_written == 10 + 100 + 5000
    assert_attrs(st, a)


def test_write_ranges_shrink_and_clip(backing, tree, tmp_path):
    src, _ = tree
    (src / "big").write_bytes(b"a" * 10000)
    fd = cache_file(tmp_path, b"b" * 10000)
    st = backing.write_ranges((b"big",), fd, [(100, 200), (900, 5000)], 1000, attrs())
    os.close(fd)
    data = (src / "big").read_bytes()
    assert st.st_size == 1000
    assert data == b"a" * 100 + b"b" * 100 + b"a" * 700 + b"b" * 100
    assert backing.bytes_written == 200


def test_write_ranges_zero_fills_past_source_end(backing, tree, tmp_path):
    src, _ = tree
    fd = cache_file(tmp_path, b"xy")
    backing.write_ranges((b"f",), fd, [(0, 6)], 11, attrs())
    os.close(fd)
    assert (src / "f").read_bytes() == b"xy\0\0\0\0world"


def test_write_ranges_refuses_non_files(backing, tmp_path):
    fd = cache_file(tmp_path, b"xy")
    with pytest.raises(IsADirectoryError):
        backing.write_ranges((b"d",), fd, [(0, 2)], 2, attrs())
    with pytest.raises(OSError) as e:
        backing.write_ranges((b"ln",), fd, [(0, 2)], 2, attrs())
    assert e.value.errno == errno.ELOOP
    os.close(fd)


# ---------------------------------------------------------------------------- names and depth


def test_long_and_non_utf8_names(backing, tree, tmp_path):
    src, _ = tree
    long = b"\xe9" * 255
    odd = b"\xff\xfe\x80 name\n"
    a = attrs(mode=0o755)
    backing.mkdir((long,), a)
    fd = cache_file(tmp_path, b"payload")
    backing.publish_atomic((long, odd), STAGING, fd, 7, a)
    os.close(fd)
    assert backing.read((long, odd), 0, 7) == b"payload"
    assert [e.name for e in backing.listdir((long,))] == [odd]
    backing.rename((long, odd), (long, long))
    assert backing.lstat((long, long)).st_size == 7
    with pytest.raises(OSError) as e:
        backing.mkdir((b"x" * 256,), a)
    assert e.value.errno == errno.ENAMETOOLONG


def test_deep_tree_beyond_path_max(backing, tree, tmp_path):
    src, _ = tree
    a = attrs(mode=0o755)
    level = b"level-component"  # 15 bytes + "/" per level
    path: tuple[bytes, ...] = ()
    for _ in range(300):
        path += (level,)
        backing.mkdir(path, a)
    assert len(b"/".join(path)) > 4096
    fd = cache_file(tmp_path, b"deep data")
    st = backing.publish_atomic(path + (b"file",), path[:150] + (b"staging",), fd, 9, a)
    os.close(fd)
    assert st.st_size == 9
    assert backing.read(path + (b"file",), 0, 100) == b"deep data"
    backing.rename(path + (b"file",), path + (b"renamed",))
    assert backing.read(path + (b"renamed",), 5, 4) == b"data"
    backing.rename(path[:200], (b"moved",))
    assert backing.read((b"moved",) + path[200:] + (b"renamed",), 0, 4) == b"deep"
    assert [e.name for e in backing.listdir((b"moved",) + path[200:])] == [b"renamed"]


# ---------------------------------------------------------------------------- faults


def test_fault_errno_times_and_prefix(backing):
    plan = backing.faults = FaultPlan()
    plan.fail("read", errno.EIO, times=2)
    for _ in range(2):
        with pytest.raises(OSError) as e:
            backing.read((b"f",), 0, 1)
        assert e.value.errno == errno.EIO
    assert backing.read((b"f",), 0, 1) == b"h"
    plan.fail("*", errno.ESTALE, prefix=(b"d",))
    with pytest.raises(OSError) as e:
        backing.lstat((b"d", b"g"))
    assert e.value.errno == errno.ESTALE
    assert backing.lstat((b"f",)).st_size == 11
    plan.clear()
    assert backing.lstat((b"d", b"g")).st_size == 10
    assert ("lstat", (b"d", b"g")) in plan.calls


def test_fault_hang_released_from_another_thread(backing):
    plan = backing.faults = FaultPlan()
    hang = plan.hang("read")
    result = []
    t = threading.Thread(target=lambda: result.append(backing.read((b"f",), 0, 5)))
    t.start()
    assert hang.entered.wait(5)
    time.sleep(0.05)
    assert t.is_alive() and not result
    assert backing.lstat((b"f",)).st_size == 11  # other operations are not blocked
    hang.release()
    t.join(5)
    assert result == [b"hello"]
    assert backing.read((b"f",), 0, 1) == b"h"  # times=1: gone after one hit


def test_fault_latency(backing):
    backing.faults = FaultPlan()
    backing.faults.delay("listdir", 0.2)
    t0 = time.monotonic()
    backing.listdir(())
    assert time.monotonic() - t0 >= 0.2
    t0 = time.monotonic()
    backing.lstat(())
    assert time.monotonic() - t0 < 0.2


def test_counters_are_thread_safe(backing):
    threads = [threading.Thread(target=lambda: [backing.read((b"f",), 0, 11) for _ in range(50)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backing.bytes_read == 4 * 50 * 11
    assert backing.bytes_written == 0


def test_errors_name_the_project_paths(backing):
    with pytest.raises(FileNotFoundError) as e:
        backing.read((b"d", b"missing"), 0, 1)
    assert e.value.filename == "d/missing"
    with pytest.raises(FileNotFoundError) as e:
        backing.rename((b"nope",), (b"d", b"x"))
    assert (e.value.filename, e.value.filename2) == ("nope", "d/x")


def test_no_descriptor_leaks(backing, tmp_path):
    fd = cache_file(tmp_path, b"data")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        backing.lstat((b"d", b"g"))
        backing.listdir((b"d",))
        backing.read((b"f",), 0, 4)
        backing.set_attrs((b"f",), attrs())
        backing.publish_atomic((b"p",), STAGING, fd, 4, attrs())
        backing.write_ranges((b"p",), fd, [(0, 2)], 4, attrs())
        for bad in (lambda: backing.read((b"out_dir", b"secret"), 0, 1), lambda: backing.read((b"ln",), 0, 1),
                    lambda: backing.publish_atomic((b"d",), STAGING, fd, 4, attrs())):
            with pytest.raises(OSError):
                bad()
    os.close(fd)
    assert len(os.listdir("/proc/self/fd")) == before - 1
