"""POSIX behaviour through a real mount: every G8 item of DESIGN.md, one test each.

What these tests check: the answer an ordinary program gets from the kernel (bytes, errno,
stat fields), and, where the result must outlive the mount, the backing tree (SRC) after a
clean unmount. They never look inside the cache.

Rules they follow: every test mounts only through the `mount_factory`/`mounted` fixtures
(which always unmount), carries a timeout, and waits by polling with a deadline.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fuse.test_security import open_root  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]

MIB = 1 << 20
GIB = 1 << 30

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2) through libc; Python has no binding for the flags."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old), None, str(new))


def assert_errno(expected: int | set[int], fn, *args, **kwargs) -> None:
    """`fn(*args)` must fail with `expected` (one errno or a set of equally valid ones)."""
    allowed = {expected} if isinstance(expected, int) else set(expected)
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    got = info.value.errno
    assert got in allowed, (
        f"{getattr(fn, '__name__', fn)}{args}: expected errno "
        f"{sorted(errno.errorcode[e] for e in allowed)}, got {errno.errorcode.get(got, got)}"
    )


def create(path: Path | bytes, data: bytes = b"", mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_at(path: Path | bytes, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def user_xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name) for name in os.listxattr(path) if name.startswith("user.")}


# --------------------------------------------------------------------------- open flags


def test_o_excl_refuses_existing_names(mounted):
    path = mounted.mnt / "excl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"first")
    os.close(fd)
    assert_errno(errno.EEXIST, os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    # O_EXCL also refuses a dangling symlink and a directory (it never follows the name).
    os.symlink("nowhere", mounted.mnt / "dangling")
    assert_errno(errno.EEXIST, os.open, mounted.mnt / "dangling", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.mkdir(mounted.mnt / "adir")
    assert_errno(errno.EEXIST, os.open, mounted.mnt / "adir", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert path.read_bytes() == b"first"
    assert not (mounted.mnt / "nowhere").exists()


def test_o_trunc_empties_the_file(mounted):
    path = mounted.mnt / "trunc"
    create(path, b"0123456789")
    fd = os.open(path, os.O_RDWR | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    assert os.pread(fd, 100, 0) == b""
    os.write(fd, b"new")
    os.close(fd)
    assert path.read_bytes() == b"new"
    mounted.umount()
    assert (mounted.src / "trunc").read_bytes() == b"new"


def test_o_trunc_of_a_file_that_exists_only_in_src(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"x" * 100_000)
    m = mount_factory(src)
    fd = os.open(m.mnt / "old", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"short")
    os.close(fd)
    assert (m.mnt / "old").read_bytes() == b"short"
    m.umount()
    assert (src / "old").read_bytes() == b"short"


def test_o_append_with_two_fds(mounted):
    path = mounted.mnt / "log"
    create(path, b"head\n")
    fd1 = os.open(path, os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(path, os.O_WRONLY | os.O_APPEND)
    expected = b"head\n"
    for i in range(50):
        fd = fd1 if i % 2 == 0 else fd2
        record = f"record {i} from fd{1 + i % 2}\n".encode()
        os.write(fd, record)
        expected += record
    os.close(fd1)
    os.close(fd2)
    assert path.read_bytes() == expected
    assert path.stat().st_size == len(expected)
    mounted.umount()
    assert (mounted.src / "log").read_bytes() == expected


# --------------------------------------------------------------------------- sizes


def test_sparse_file_holes_read_zeros(mounted):
    path = mounted.mnt / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"start")
    os.lseek(fd, 10 * MIB, os.SEEK_SET)
    os.write(fd, b"end")
    assert os.fstat(fd).st_size == 10 * MIB + 3
    assert os.pread(fd, 4096, 5) == bytes(4096)
    assert os.pread(fd, 4096, 5 * MIB) == bytes(4096)
    assert os.pread(fd, 10, 10 * MIB - 2) == b"\0\0end"
    os.close(fd)
    assert path.stat().st_size == 10 * MIB + 3
    mounted.umount()
    backing = mounted.src / "sparse"
    assert backing.stat().st_size == 10 * MIB + 3
    assert read_at(backing, 0, 5) == b"start"
    assert read_at(backing, 5 * MIB, 4096) == bytes(4096)
    assert read_at(backing, 10 * MIB - 2, 10) == b"\0\0end"


def test_truncate_down_then_up_reads_zeros(mount_factory, tmp_path):
    # The old bytes exist in SRC: after truncating down, growing again must not bring them back.
    src = tmp_path / "src"
    src.mkdir()
    (src / "t").write_bytes(b"A" * 100_000)
    m = mount_factory(src)
    path = m.mnt / "t"
    os.truncate(path, 10)
    assert path.read_bytes() == b"A" * 10
    os.truncate(path, 100_000)
    data = path.read_bytes()
    assert data == b"A" * 10 + bytes(99_990), f"stale bytes after truncate up: {data[10:40]!r}"
    # ftruncate through an open fd, and growing a file that was written through the mount.
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, b"B" * 50, 20)
    os.ftruncate(fd, 30)
    os.ftruncate(fd, 60)
    assert os.pread(fd, 100, 0) == b"A" * 10 + bytes(10) + b"B" * 10 + bytes(30)
    assert os.fstat(fd).st_size == 60
    os.close(fd)
    expected = b"A" * 10 + bytes(10) + b"B" * 10 + bytes(30)
    m.umount()
    assert (src / "t").read_bytes() == expected


@pytest.mark.timeout(600)
def test_file_over_4gib(mounted):
    path = mounted.mnt / "big"
    across = b"across-the-4GiB-line"
    tail = b"tail-at-5GiB"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, across, 4 * GIB - 7)
    os.pwrite(fd, tail, 5 * GIB)
    assert os.fstat(fd).st_size == 5 * GIB + len(tail)
    assert os.pread(fd, len(across), 4 * GIB - 7) == across
    assert os.pread(fd, len(tail), 5 * GIB) == tail
    assert os.pread(fd, 4096, 4 * GIB + 4096) == bytes(4096)
    assert os.pread(fd, 100, 5 * GIB + len(tail)) == b""
    os.close(fd)
    assert path.stat().st_size == 5 * GIB + len(tail)
    mounted.umount()
    backing = mounted.src / "big"
    assert backing.stat().st_size == 5 * GIB + len(tail)
    assert read_at(backing, 4 * GIB - 7, len(across)) == across
    assert read_at(backing, 5 * GIB, len(tail)) == tail
    assert read_at(backing, 4 * GIB + 4096, 4096) == bytes(4096)


# --------------------------------------------------------------------------- rename


def test_rename_over_existing_file(mounted):
    a, b = mounted.mnt / "a", mounted.mnt / "b"
    create(a, b"content of a")
    create(b, b"content of b, longer")
    ino_a = a.stat().st_ino
    os.rename(a, b)
    assert not a.exists()
    assert b.read_bytes() == b"content of a"
    assert b.stat().st_ino == ino_a
    assert sorted(os.listdir(mounted.mnt)) == ["b"]
    mounted.umount()
    assert not (mounted.src / "a").exists()
    assert (mounted.src / "b").read_bytes() == b"content of a"


def test_rename_dir_over_empty_dir(mounted):
    mnt = mounted.mnt
    os.mkdir(mnt / "full")
    create(mnt / "full" / "f", b"inside")
    os.mkdir(mnt / "empty")
    os.rename(mnt / "full", mnt / "empty")
    assert not (mnt / "full").exists()
    assert (mnt / "empty" / "f").read_bytes() == b"inside"
    mounted.umount()
    assert not (mounted.src / "full").exists()
    assert (mounted.src / "empty" / "f").read_bytes() == b"inside"


def test_rename_dir_onto_nonempty_dir_is_enotempty(mounted):
    mnt = mounted.mnt
    os.mkdir(mnt / "d1")
    create(mnt / "d1" / "x", b"x")
    os.mkdir(mnt / "d2")
    create(mnt / "d2" / "y", b"y")
    assert_errno({errno.ENOTEMPTY, errno.EEXIST}, os.rename, mnt / "d1", mnt / "d2")
    # Linux answers ENOTEMPTY; EEXIST is the POSIX alternative. Nothing may have moved.
    assert (mnt / "d1" / "x").read_bytes() == b"x"
    assert (mnt / "d2" / "y").read_bytes() == b"y"
    assert sorted(os.listdir(mnt / "d2")) == ["y"]
    mounted.umount()
    assert (mounted.src / "d1" / "x").read_bytes() == b"x"
    assert sorted(os.listdir(mounted.src / "d2")) == ["y"]


def test_rename_between_file_and_dir_fails_like_linux(mounted):
    mnt = mounted.mnt
    os.mkdir(mnt / "dir")
    create(mnt / "file", b"f")
    assert_errno(errno.ENOTDIR, os.rename, mnt / "dir", mnt / "file")
    assert_errno(errno.EISDIR, os.rename, mnt / "file", mnt / "dir")
    assert (mnt / "dir").is_dir() and (mnt / "file").read_bytes() == b"f"
    # A directory cannot move into its own subtree.
    os.mkdir(mnt / "dir" / "sub")
    assert_errno(errno.EINVAL, os.rename, mnt / "dir", mnt / "dir" / "sub" / "inner")


def test_renameat2_noreplace(mounted):
    mnt = mounted.mnt
    create(mnt / "a", b"A")
    create(mnt / "b", b"B")
    assert_errno(errno.EEXIST, renameat2, mnt / "a", mnt / "b", RENAME_NOREPLACE)
    assert (mnt / "a").read_bytes() == b"A" and (mnt / "b").read_bytes() == b"B"
    renameat2(mnt / "a", mnt / "c", RENAME_NOREPLACE)
    assert not (mnt / "a").exists()
    assert (mnt / "c").read_bytes() == b"A"
    mounted.umount()
    assert set(os.listdir(mounted.src)) - {".safefs"} == {"b", "c"}
    assert (mounted.src / "b").read_bytes() == b"B"
    assert (mounted.src / "c").read_bytes() == b"A"


def test_renameat2_exchange(mount_factory, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"old from src")  # one side clean in SRC, one side new
    m = mount_factory(src)
    mnt = m.mnt
    create(mnt / "new", b"new through mount")
    os.mkdir(mnt / "d")
    create(mnt / "d" / "inside", b"in d")
    ino_old, ino_new = (mnt / "old").stat().st_ino, (mnt / "new").stat().st_ino
    renameat2(mnt / "old", mnt / "new", RENAME_EXCHANGE)
    assert (mnt / "old").read_bytes() == b"new through mount"
    assert (mnt / "new").read_bytes() == b"old from src"
    assert (mnt / "old").stat().st_ino == ino_new and (mnt / "new").stat().st_ino == ino_old
    # Exchange a file with a directory.
    renameat2(mnt / "old", mnt / "d", RENAME_EXCHANGE)
    assert (mnt / "old" / "inside").read_bytes() == b"in d"
    assert (mnt / "d").read_bytes() == b"new through mount"
    assert_errno(errno.ENOENT, renameat2, mnt / "new", mnt / "missing", RENAME_EXCHANGE)
    m.umount()
    assert (src / "new").read_bytes() == b"old from src"
    assert (src / "d").read_bytes() == b"new through mount"
    assert (src / "old" / "inside").read_bytes() == b"in d"


# --------------------------------------------------------------------------- links


def test_hard_links(mounted):
    mnt = mounted.mnt
    create(mnt / "a", b"shared")
    os.link(mnt / "a", mnt / "b")
    sa, sb = (mnt / "a").stat(), (mnt / "b").stat()
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == 2 and sb.st_nlink == 2
    with open(mnt / "b", "r+b") as f:
        f.seek(6)
        f.write(b" content")
    assert (mnt / "a").read_bytes() == b"shared content"
    os.mkdir(mnt / "sub")
    os.link(mnt / "a", mnt / "sub" / "c")
    assert (mnt / "a").stat().st_nlink == 3
    os.unlink(mnt / "sub" / "c")
    assert (mnt / "a").stat().st_nlink == 2
    assert_errno(errno.EEXIST, os.link, mnt / "a", mnt / "b")
    assert_errno({errno.EPERM}, os.link, mnt / "sub", mnt / "sublink")  # no links to directories
    mounted.umount()
    a, b = mounted.src / "a", mounted.src / "b"
    assert a.read_bytes() == b"shared content" and b.read_bytes() == b"shared content"
    assert a.stat().st_ino == b.stat().st_ino, "hard link became two separate files in SRC"
    assert a.stat().st_nlink == 2
    assert not (mounted.src / "sub" / "c").exists()


def test_hard_link_then_unlink_original(mounted):
    mnt = mounted.mnt
    create(mnt / "orig", b"data")
    os.link(mnt / "orig", mnt / "link")
    os.unlink(mnt / "orig")
    assert (mnt / "link").stat().st_nlink == 1
    assert (mnt / "link").read_bytes() == b"data"
    mounted.umount()
    assert not (mounted.src / "orig").exists()
    assert (mounted.src / "link").read_bytes() == b"data"


def test_symlinks(mounted):
    mnt = mounted.mnt
    create(mnt / "target", b"pointed at")
    os.symlink("target", mnt / "good")
    os.symlink("does/not/exist", mnt / "dangling")
    os.symlink("/" + "x" * 1000, mnt / "long")
    assert os.readlink(mnt / "good") == "target"
    assert os.readlink(mnt / "dangling") == "does/not/exist"
    assert os.readlink(mnt / "long") == "/" + "x" * 1000
    assert stat.S_ISLNK(os.lstat(mnt / "good").st_mode)
    assert os.lstat(mnt / "good").st_size == len("target")
    assert (mnt / "good").read_bytes() == b"pointed at"
    assert stat.S_ISLNK(os.lstat(mnt / "dangling").st_mode)
    assert_errno(errno.ENOENT, os.stat, mnt / "dangling")
    assert_errno(errno.EINVAL, os.readlink, mnt / "target")
    assert_errno(errno.EEXIST, os.symlink, "other", mnt / "good")
    mounted.umount()
    assert os.readlink(mounted.src / "good") == "target"
    assert os.readlink(mounted.src / "dangling") == "does/not/exist"
    assert os.readlink(mounted.src / "long") == "/" + "x" * 1000


# --------------------------------------------------------------------------- metadata


def test_chmod_chown_utime_nanoseconds(mounted):
    mnt = mounted.mnt
    path = mnt / "meta"
    create(path, b"meta")
    os.chown(path, 1234, 5678)  # chown before chmod: chown clears set-id bits
    os.chmod(path, 0o4751)
    mtime_ns = 1_700_000_000_123_456_789
    atime_ns = 1_600_000_000_987_654_321
    os.utime(path, ns=(atime_ns, mtime_ns))
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o4751
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == mtime_ns
    assert st.st_atime_ns == atime_ns
    # A directory, and a symlink's own times.
    os.mkdir(mnt / "d")
    os.chmod(mnt / "d", 0o1770)
    os.symlink("meta", mnt / "ln")
    os.utime(mnt / "ln", ns=(atime_ns, mtime_ns + 1), follow_symlinks=False)
    os.lchown(mnt / "ln", 42, 43)
    assert stat.S_IMODE(os.stat(mnt / "d").st_mode) == 0o1770
    assert os.lstat(mnt / "ln").st_mtime_ns == mtime_ns + 1
    assert (os.lstat(mnt / "ln").st_uid, os.lstat(mnt / "ln").st_gid) == (42, 43)
    assert os.stat(path).st_mtime_ns == mtime_ns, "symlink utime leaked to its target"
    os.chmod(path, 0o4750)
    mounted.umount()
    st = os.stat(mounted.src / "meta")
    assert stat.S_IMODE(st.st_mode) == 0o4750
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == mtime_ns
    assert stat.S_IMODE(os.stat(mounted.src / "d").st_mode) == 0o1770
    lst = os.lstat(mounted.src / "ln")
    assert lst.st_mtime_ns == mtime_ns + 1
    assert (lst.st_uid, lst.st_gid) == (42, 43)


def test_xattrs(mounted):
    path = mounted.mnt / "x"
    create(path, b"x")
    big = os.urandom(3000)
    os.setxattr(path, "user.a", b"1")
    os.setxattr(path, "user.empty", b"")
    os.setxattr(path, "user.binary", bytes(range(256)))
    os.setxattr(path, "user.big", big)
    assert os.getxattr(path, "user.a") == b"1"
    assert os.getxattr(path, "user.empty") == b""
    assert os.getxattr(path, "user.binary") == bytes(range(256))
    assert os.getxattr(path, "user.big") == big
    assert {n for n in os.listxattr(path) if n.startswith("user.")} == {
        "user.a",
        "user.empty",
        "user.binary",
        "user.big",
    }
    assert_errno(errno.EEXIST, os.setxattr, path, "user.a", b"2", os.XATTR_CREATE)
    assert_errno(errno.ENODATA, os.setxattr, path, "user.none", b"2", os.XATTR_REPLACE)
    os.setxattr(path, "user.a", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(path, "user.a") == b"replaced"
    assert_errno(errno.ENODATA, os.getxattr, path, "user.none")
    os.removexattr(path, "user.binary")
    assert_errno(errno.ENODATA, os.getxattr, path, "user.binary")
    assert_errno(errno.ENODATA, os.removexattr, path, "user.binary")
    os.mkdir(mounted.mnt / "dx")
    os.setxattr(mounted.mnt / "dx", "user.on_dir", b"dir value")
    expected = {"user.a": b"replaced", "user.empty": b"", "user.big": big}
    assert user_xattrs(path) == expected
    mounted.umount()
    assert user_xattrs(mounted.src / "x") == expected
    assert user_xattrs(mounted.src / "dx") == {"user.on_dir": b"dir value"}


# --------------------------------------------------------------------------- mmap and locks


def test_mmap_shared_write_is_seen_by_other_fds_and_src(mounted):
    path = mounted.mnt / "mapped"
    size = 64 * 1024
    create(path, bytes(size))
    first, second = b"written via mmap", os.urandom(1000)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mm[4096 : 4096 + len(first)] = first
        mm[size - 1000 :] = second
        mm.flush()  # msync(MS_SYNC)
        other = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(other, len(first), 4096) == first
            assert os.pread(other, 1000, size - 1000) == second
        finally:
            os.close(other)
        mm.close()
    data = path.read_bytes()
    assert len(data) == size
    assert data[4096 : 4096 + len(first)] == first and data[-1000:] == second
    mounted.umount()
    assert (mounted.src / "mapped").read_bytes() == data


_LOCK_PROBE = textwrap.dedent(
    """
    import errno, fcntl, json, os, sys
    path, kind, start, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    fd = os.open(path, os.O_RDWR)
    try:
        if kind == "lockf":
            os.lseek(fd, start, os.SEEK_SET)
            os.lockf(fd, os.F_TLOCK, length)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print(json.dumps(0))
    except OSError as e:
        print(json.dumps(e.errno))
    """
)


def probe_lock(path: Path, kind: str, start: int = 0, length: int = 0) -> int:
    """Try to take a lock from another process; 0 on success, else the errno it got."""
    out = subprocess.run(
        [sys.executable, "-c", _LOCK_PROBE, str(path), kind, str(start), str(length)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_lockf_between_processes(mounted):
    path = mounted.mnt / "locked"
    create(path, bytes(100))
    fd = os.open(path, os.O_RDWR)
    try:
        os.lockf(fd, os.F_TLOCK, 10)  # bytes 0..9
        assert probe_lock(path, "lockf", 0, 10) in (errno.EAGAIN, errno.EACCES)
        assert probe_lock(path, "lockf", 5, 10) in (errno.EAGAIN, errno.EACCES)
        assert probe_lock(path, "lockf", 20, 10) == 0, "a lock on other bytes was refused"
        os.lockf(fd, os.F_ULOCK, 10)
        assert probe_lock(path, "lockf", 0, 10) == 0, "lock still held after F_ULOCK"
    finally:
        os.close(fd)


def test_flock_between_processes(mounted):
    path = mounted.mnt / "flocked"
    create(path, b"x")
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert probe_lock(path, "flock") == errno.EWOULDBLOCK
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert probe_lock(path, "flock") == 0
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- names and directories


def test_non_utf8_names(mounted):
    root = os.fsencode(mounted.mnt)
    fname, dname, lname = b"\xff\xfe", b"dir-\xc3(", b"link-\x80"
    create(root + b"/" + fname, b"latin soup")
    os.mkdir(root + b"/" + dname)
    create(root + b"/" + dname + b"/" + fname, b"nested")
    os.symlink(b"\xff\xfe", root + b"/" + lname)
    assert set(os.listdir(root)) == {fname, dname, lname}
    assert os.readlink(root + b"/" + lname) == fname
    with open(root + b"/" + lname, "rb") as f:
        assert f.read() == b"latin soup"
    assert set(os.listdir(root + b"/" + dname)) == {fname}
    os.rename(root + b"/" + fname, root + b"/" + fname + b"\xfd")
    mounted.umount()
    src = os.fsencode(mounted.src)
    assert set(os.listdir(src)) - {b".safefs"} == {fname + b"\xfd", dname, lname}
    with open(src + b"/" + fname + b"\xfd", "rb") as f:
        assert f.read() == b"latin soup"
    with open(src + b"/" + dname + b"/" + fname, "rb") as f:
        assert f.read() == b"nested"
    assert os.readlink(src + b"/" + lname) == fname


def test_name_length_limits(mounted):
    mnt = mounted.mnt
    longest = "a" * 255
    multibyte = "é" * 127 + "z"  # 255 bytes in UTF-8
    assert len(multibyte.encode()) == 255
    create(mnt / longest, b"255")
    os.mkdir(mnt / multibyte)
    assert set(os.listdir(mnt)) == {longest, multibyte}
    assert (mnt / longest).read_bytes() == b"255"
    too_long = "b" * 256
    flags = os.O_WRONLY | os.O_CREAT
    assert_errno(errno.ENAMETOOLONG, os.open, mnt / too_long, flags, 0o644)
    assert_errno(errno.ENAMETOOLONG, os.mkdir, mnt / too_long)
    assert_errno(errno.ENAMETOOLONG, os.symlink, "t", mnt / too_long)
    assert_errno(errno.ENAMETOOLONG, os.rename, mnt / longest, mnt / too_long)
    assert_errno(errno.ENAMETOOLONG, os.stat, mnt / too_long)
    assert set(os.listdir(mnt)) == {longest, multibyte}
    mounted.umount()
    assert (mounted.src / longest).read_bytes() == b"255"
    assert (mounted.src / multibyte).is_dir()


@pytest.mark.timeout(600)
def test_directory_with_5000_entries(mounted):
    d = mounted.mnt / "big-dir"
    os.mkdir(d)
    names = {f"entry-{i:05d}" for i in range(5000)}
    for name in names:
        os.close(os.open(d / name, os.O_WRONLY | os.O_CREAT, 0o644))
    listed = os.listdir(d)
    assert len(listed) == 5000, f"readdir returned {len(listed)} entries"
    assert set(listed) == names
    with os.scandir(d) as it:
        scanned = [e.name for e in it]
    assert len(scanned) == 5000 and set(scanned) == names
    mounted.umount()
    assert set(os.listdir(mounted.src / "big-dir")) == names


def _walk_down(root_fd: int, names: list[str]) -> int:
    """Open the directory chain `names` below root_fd one step at a time; return its fd."""
    fd = os.dup(root_fd)
    for name in names:
        nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


@pytest.mark.timeout(300)
def test_deep_tree_longer_than_path_max(mounted):
    names = [f"{i:03d}" + "d" * 197 for i in range(25)]  # 25 levels of 200 bytes: > 4096
    assert sum(len(n) + 1 for n in names) > 4096
    root = os.open(mounted.mnt, os.O_RDONLY | os.O_DIRECTORY)
    fd = os.dup(root)
    for name in names:
        os.mkdir(name, dir_fd=fd)
        nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"at the bottom")
    os.close(leaf)
    os.close(fd)
    fd = _walk_down(root, names)
    leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
    assert os.read(leaf, 100) == b"at the bottom"
    os.close(leaf)
    os.close(fd)
    os.close(root)
    mounted.umount()
    root = os.open(mounted.src, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _walk_down(root, names)
        leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
        assert os.read(leaf, 100) == b"at the bottom"
        os.close(leaf)
        os.close(fd)
    finally:
        os.close(root)


def test_inode_numbers_stable(mounted):
    mnt = mounted.mnt
    create(mnt / "stable", b"s")
    os.mkdir(mnt / "dir")
    ino = os.stat(mnt / "stable").st_ino
    dir_ino = os.stat(mnt / "dir").st_ino
    for i in range(300):  # churn: other inodes come and go
        create(mnt / f"churn{i}", b"c")
    for i in range(300):
        os.unlink(mnt / f"churn{i}")
    assert os.stat(mnt / "stable").st_ino == ino
    with open(mnt / "stable", "ab") as f:
        f.write(b"more")
        assert os.fstat(f.fileno()).st_ino == ino
    assert os.stat(mnt / "stable").st_ino == ino
    os.rename(mnt / "stable", mnt / "dir" / "moved")
    assert os.stat(mnt / "dir" / "moved").st_ino == ino, "rename changed the inode number"
    assert os.stat(mnt / "dir").st_ino == dir_ino
    create(mnt / "other", b"o")
    assert os.stat(mnt / "other").st_ino not in (ino, dir_ino)
    with os.scandir(mnt / "dir") as it:
        assert [e.inode() for e in it] == [ino], "readdir d_ino differs from stat st_ino"


def test_permissions_enforced_for_other_users(mount_factory):
    m = mount_factory(None, None, None, "--allow-other")
    mnt = m.mnt
    os.chmod(mnt, 0o755)
    create(mnt / "secret", b"root only", 0o600)
    os.chmod(mnt / "secret", 0o600)
    create(mnt / "public", b"everyone reads", 0o644)
    os.chmod(mnt / "public", 0o644)
    os.mkdir(mnt / "closed")
    os.chmod(mnt / "closed", 0o755)
    os.mkdir(mnt / "open")
    os.chmod(mnt / "open", 0o777)

    root_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, try things, report errnos as JSON
        results: dict[str, object] = {}
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)

            def attempt(name, fn):
                try:
                    value = fn()
                    results[name] = 0 if value is None else value
                except OSError as e:
                    results[name] = e.errno

            def read_file(name):
                fd = os.open(name, os.O_RDONLY, dir_fd=root_fd)
                try:
                    return os.read(fd, 100).decode()
                finally:
                    os.close(fd)

            def create_in(path):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=root_fd))

            attempt("read_secret", lambda: read_file("secret"))
            attempt("read_public", lambda: read_file("public"))
            attempt("write_public", lambda: os.close(os.open("public", os.O_WRONLY, dir_fd=root_fd)))
            attempt("create_in_closed", lambda: create_in("closed/x"))
            attempt("create_in_open", lambda: create_in("open/y"))
            attempt("chmod_secret", lambda: os.chmod("secret", 0o666, dir_fd=root_fd))
            attempt("unlink_public", lambda: os.unlink("public", dir_fd=root_fd))
            os.write(writer, json.dumps(results).encode())
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as f:
        raw = f.read()
    os.waitpid(pid, 0)
    os.close(root_fd)
    results = json.loads(raw)
    # Positive controls first: the other user can reach the mount at all.
    assert results["read_public"] == "everyone reads", results
    assert results["create_in_open"] == 0, results
    assert results["read_secret"] == errno.EACCES, results
    assert results["write_public"] == errno.EACCES, results
    assert results["create_in_closed"] == errno.EACCES, results
    assert results["chmod_secret"] == errno.EPERM, results
    assert results["unlink_public"] == errno.EACCES, results
    assert os.stat(mnt / "open" / "y").st_uid == 65534, "new file not owned by its creator"
    assert (mnt / "secret").read_bytes() == b"root only"
    m.umount()
    assert os.stat(m.src / "open" / "y").st_uid == 65534
    assert stat.S_IMODE(os.stat(m.src / "secret").st_mode) == 0o600


def test_unlink_while_open(mounted):
    mnt = mounted.mnt
    path = mnt / "doomed"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"hello")
    os.unlink(path)
    assert not path.exists()
    assert os.listdir(mnt) == [], f"unlinked file still listed: {os.listdir(mnt)}"
    assert os.fstat(fd).st_nlink == 0
    os.pwrite(fd, b" world", 5)
    assert os.pread(fd, 100, 0) == b"hello world"
    # A new file under the same name is a different file.
    create(path, b"reborn")
    assert os.pread(fd, 100, 0) == b"hello world"
    assert path.read_bytes() == b"reborn"
    os.close(fd)
    assert os.listdir(mnt) == ["doomed"]
    mounted.umount()
    assert sorted(set(os.listdir(mounted.src)) - {".safefs"}) == ["doomed"]
    assert (mounted.src / "doomed").read_bytes() == b"reborn"


_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.opendir.restype = ctypes.c_void_p
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]


class _Dirent(ctypes.Structure):  # glibc's struct dirent on 64-bit Linux
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


_libc.readdir.restype = ctypes.POINTER(_Dirent)


def raw_readdir(path: Path) -> list[bytes]:
    """Every name readdir(3) returns, '.' and '..' included (os.listdir filters them)."""
    handle = _libc.opendir(os.fsencode(path))
    assert handle, f"opendir failed: {os.strerror(ctypes.get_errno())}"
    names = []
    try:
        while True:
            entry = _libc.readdir(handle)
            if not entry:
                break
            names.append(entry.contents.d_name)
    finally:
        _libc.closedir(handle)
    return names


def test_dot_and_dotdot(mounted):
    mnt = mounted.mnt
    os.mkdir(mnt / "d")
    os.mkdir(mnt / "d" / "sub")
    create(mnt / "d" / "f", b"f")
    assert sorted(os.listdir(mnt / "d")) == ["f", "sub"]
    raw = raw_readdir(mnt / "d")
    assert len(raw) == len(set(raw)), f"duplicate readdir entries: {raw}"
    assert set(raw) - {b".", b".."} == {b"f", b"sub"}
    d = os.fspath(mnt / "d")  # plain strings: pathlib would drop the "."
    assert os.stat(d + "/.").st_ino == os.stat(d).st_ino
    assert os.stat(d + "/sub/..").st_ino == os.stat(d).st_ino
    assert os.stat(d + "/..").st_ino == os.stat(mnt).st_ino
    with os.scandir(mnt / "d") as it:
        kinds = {e.name: e.is_dir(follow_symlinks=False) for e in it}
    assert kinds == {"f": False, "sub": True}
    assert_errno(errno.ENOTEMPTY, os.rmdir, mnt / "d")
    assert_errno({errno.EINVAL, errno.EBUSY}, os.rmdir, d + "/sub/.")


def test_statvfs(mounted):
    st = os.statvfs(mounted.mnt)
    assert st.f_bsize > 0 and st.f_frsize > 0
    assert st.f_blocks > 0
    assert 0 <= st.f_bavail <= st.f_bfree <= st.f_blocks
    assert st.f_namemax == 255


def test_mkfifo(mounted):
    path = mounted.mnt / "pipe"
    os.mkfifo(path, 0o600)
    assert stat.S_ISFIFO(os.lstat(path).st_mode)
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(path, os.O_WRONLY)
    os.write(w, b"through the fifo")
    assert os.read(r, 100) == b"through the fifo"
    os.close(w)
    os.close(r)
    mounted.umount()
    assert stat.S_ISFIFO(os.lstat(mounted.src / "pipe").st_mode)


# --------------------------------------------------------------------------- the local disk as oracle

PROBE = Path(__file__).with_name("posix_probe.py")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the probe chowns and acts as nobody")
def test_posix_probe_gives_the_same_answers_as_the_local_disk(open_root, mount_factory):
    """About 65 operations (which times each one updates, modes and umask, setgid directories,
    sticky and suid rules, fifo/device/socket nodes, errnos of bad renames and removals, xattr
    flags, permission checks as nobody) answer on the mount exactly as on the local disk; and
    after unmount the project holds the same tree (modes, owners, xattrs, bytes) as the disk."""
    from tests.fuse.test_security import make_layout

    src, mnt, cache = make_layout(open_root)
    local = open_root / "local"
    local.mkdir()
    m = mount_factory(src, mnt, cache, "--allow-other")
    (m.mnt / "t").mkdir()
    os.chmod(m.mnt / "t", 0o755)
    local.chmod(0o755)

    def probe(where: Path) -> list[str]:
        done = subprocess.run([sys.executable, str(PROBE), str(where)], capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    expected, got = probe(local), probe(m.mnt / "t")
    assert len(expected) > 60
    # With the kernel writeback cache the kernel keeps a file's times itself, and moves them
    # on truncate(2) only when the size changes: what POSIX asks, less than ext4 does.
    same_size = "truncate same size times: ok ()" if m.status()["kernel_writeback_cache"] else None
    differ = [f"disk: {a}\n  mount: {b}" for a, b in zip(expected, got) if a != b and b != same_size]
    assert not differ and len(got) == len(expected), "\n".join(differ)
    m.umount()
    assert tree_facts(src / "t") == tree_facts(local)


def tree_facts(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything but timestamps: the two trees were made at different times."""
    facts = {}
    for dirpath, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            xattrs = sorted((k, os.getxattr(path, k, follow_symlinks=False))
                            for k in os.listxattr(path, follow_symlinks=False))
            if stat.S_ISREG(st.st_mode):
                content: object = Path(path).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = None
            facts[os.path.relpath(path, root)] = (
                oct(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, st.st_size, st.st_rdev, xattrs, content
            )
    return facts
