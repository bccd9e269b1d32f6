"""Blocking, symlink-safe operations on the backing tree (the NFS project, SRC).

Invariants:
- Every path is a tuple of name components relative to the project root and is resolved
  one component at a time from the root's O_PATH fd with O_NOFOLLOW|O_DIRECTORY. A symlink
  in the middle of a path fails with ENOTDIR (or ELOOP); a symlink as the last component is
  acted on itself, never followed. So no operation ever leaves the project, and no path is
  ever handed to the kernel as one string: depth and total length are unlimited.
- The object an operation changes is pinned by an O_PATH|O_NOFOLLOW fd first, and its type is
  checked on that fd; regular files and directories are then reopened through
  /proc/self/fd/<pin> (which lands on the pinned inode, never on a name that changed since).
- Attributes go on in the order chown, xattrs, chmod, utime: chown clears setuid/setgid (on
  Linux even for root) and security.capability, so those come after it; times come last
  because every other change moves ctime/mtime.
- An OSError raised by a public method names the project-relative path(s) it was called with
  (not a descriptor number or a single component).
- `publish_atomic` never exposes a partial file under the final name: bytes and attributes go
  to a fresh file in the staging directory, are fsynced, then renamed over the target.
- Namespace operations (mkdir, symlink, mknod, link, unlink, rmdir, rename) do not fsync the
  directories they change; the caller calls `fsync_dir`, and may batch. `publish_atomic`,
  `write_ranges` and `set_attrs` fsync what they wrote (and the parent, for a publish).
- `rename`, `link` and `unlink` return the object's stat taken just before the change (and
  just after, where a name still reaches it): they move its ctime, and the caller re-records
  the fingerprint when the stat before was the one it knew (DESIGN.md section 5).

Threading: every method is synchronous and may block for a long time on NFS; callers run them
in worker threads. The only shared mutable state is the byte counters (under `_lock`) and the
optional `faults` hook (a test's FaultPlan, which has its own lock). Descriptors are per call, except the root fd,
which lives until `close()`.

The system calls underneath (renameat2, xattr changes, /proc/self/fd paths, the pinned-fd
record `Pinned`) are in safefs.syscalls.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Protocol

from safefs.syscalls import (
    Pinned,
    fsync_dir_fd,
    proc_path,
    pwrite_all,
    renameat2,
    type_errno,
    write_xattrs,
    xattr_changes,
)

Path = tuple[bytes, ...]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_COPY_CHUNK = 1 << 20
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PIN_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Fingerprint:
    """What a backing file looked like when it was fetched; a change means someone else wrote."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Attrs:
    """What a publish makes the backing object carry. `xattrs` is the complete wanted set."""

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    xattrs: Mapping[bytes, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    name: bytes
    st: os.stat_result
    link_target: bytes | None  # set for symlinks only


class FaultHook(Protocol):
    """Told of every operation before it starts (`Backing.faults`); may delay it, hang it or
    raise the OSError it is to fail with. Tests only: safefs.testing.FaultPlan is one."""

    def check(self, op: str, path: Path) -> None: ...


# ---------------------------------------------------------------------------- helpers


def _show(path: Path) -> str:
    return "/".join(os.fsdecode(c) for c in path) or "."


def _names_paths(method):
    """Make OSErrors from `method` name its Path arguments instead of fds or components."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            paths = [a for a in args if isinstance(a, tuple)]
            if paths:
                e.filename = _show(paths[0])
                if len(paths) > 1:
                    e.filename2 = _show(paths[1])
            raise

    return wrapper


def _check_path(path: Path) -> None:
    if not isinstance(path, tuple):
        raise TypeError(f"a backing path is a tuple of bytes, not {type(path).__name__}")
    for c in path:
        if not isinstance(c, bytes) or c in (b"", b".", b"..") or b"/" in c or b"\0" in c:
            raise ValueError(f"bad path component {c!r} in {path!r}")


# ---------------------------------------------------------------------------- Backing


class Backing:
    """Blocking operations on the backing tree. See the module docstring for the rules."""

    def __init__(self, root: os.PathLike | str) -> None:
        self.root = os.fspath(root)
        self._root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.bytes_written = 0
        self.faults: FaultHook | None = None  # tests: safefs.testing.FaultPlan

    def close(self) -> None:
        fd, self._root_fd = self._root_fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Backing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ resolution

    def _begin(self, op: str, *paths: Path) -> None:
        for p in paths:
            _check_path(p)
        faults = self.faults
        if faults is not None:
            faults.check(op, paths[0] if paths else ())

    @contextmanager
    def _dir(self, components: Path, *, create: bool = False) -> Iterator[int]:
        """An O_PATH fd of the directory at `components`, walked without following links;
        with `create`, missing components are made (mode 0700) on the way."""
        fd = os.dup(self._root_fd)  # every walk owns its fds, so closing is uniform
        try:
            for name in components:
                if create:
                    with suppress(FileExistsError):  # the open refuses all but a real directory
                        os.mkdir(name, 0o700, dir_fd=fd)
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def _parent(self, path: Path) -> Iterator[tuple[int, bytes]]:
        if not path:
            raise OSError(errno.EINVAL, "the project root has no name", ".")
        with self._dir(path[:-1]) as fd:
            yield fd, path[-1]

    @contextmanager
    def _pin(self, path: Path) -> Iterator[Pinned]:
        if not path:
            with self._dir(()) as fd:
                yield Pinned(None, None, fd, os.fstat(fd))
            return
        with self._parent(path) as (parent_fd, name):
            fd = os.open(name, _PIN_FLAGS, dir_fd=parent_fd)
            try:
                yield Pinned(parent_fd, name, fd, os.fstat(fd))
            finally:
                os.close(fd)

    def _reopen(self, pin: Pinned, flags: int) -> int:
        """A real fd on a pinned regular file or directory (fifos and devices are refused)."""
        if not (stat.S_ISREG(pin.st.st_mode) or stat.S_ISDIR(pin.st.st_mode)):
            raise OSError(type_errno(pin.st), "not a regular file or directory")
        return os.open(proc_path(pin.fd), flags | os.O_CLOEXEC)

    def _count(self, *, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written

    # ------------------------------------------------------------------ reading

    @_names_paths
    def lstat(self, path: Path) -> os.stat_result:
        self._begin("lstat", path)
        if not path:
            with self._dir(()) as fd:
                return os.fstat(fd)
        with self._parent(path) as (parent_fd, name):
            return os.stat(name, dir_fd=parent_fd, follow_symlinks=False)

    @_names_paths
    def listdir(self, path: Path) -> list[Entry]:
        self._begin("listdir", path)
        entries = []
        with self._dir(path) as pin:
            fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pin)
            try:
                for name in os.listdir(fd):
                    bname = os.fsencode(name)
                    try:  # an entry removed between readdir and lstat is simply gone
                        st = os.stat(bname, dir_fd=fd, follow_symlinks=False)
                        target = os.readlink(bname, dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
                    except FileNotFoundError:
                        continue
                    entries.append(Entry(bname, st, target))
            finally:
                os.close(fd)
        entries.sort(key=lambda e: e.name)
        return entries

    @_names_paths
    def read(self, path: Path, offset: int, size: int) -> bytes:
        self._begin("read", path)
        if offset < 0 or size < 0:
            raise OSError(errno.EINVAL, "negative offset or size", _show(path))
        chunks = []
        with self._pin(path) as pin:
            if not stat.S_ISREG(pin.st.st_mode):
                raise OSError(type_errno(pin.st), "not a regular file", _show(path))
            fd = self._reopen(pin, os.O_RDONLY)
            try:
                got = 0
                while got < size:
                    data = os.pread(fd, min(size - got, _COPY_CHUNK), offset + got)
                    if not data:
                        break
                    chunks.append(data)
                    got += len(data)
            finally:
                os.close(fd)
        result = b"".join(chunks)
        self._count(read=len(result))
        return result

    @_names_paths
    def readlink(self, path: Path) -> bytes:
        self._begin("readlink", path)
        with self._parent(path) as (parent_fd, name):
            return os.readlink(name, dir_fd=parent_fd)

    @_names_paths
    def getxattrs(self, path: Path) -> dict[bytes, bytes]:
        self._begin("getxattrs", path)
        with self._pin(path) as pin:
            where = proc_path(pin.fd)
            try:
                names = os.listxattr(where)
            except OSError as e:
                if e.errno == errno.ENOTSUP:
                    return {}
                raise
            result = {}
            for name in names:
                try:
                    result[os.fsencode(name)] = os.getxattr(where, name)
                except OSError as e:
                    if e.errno != errno.ENODATA:  # removed since listing
                        raise
            return result

    def statvfs(self) -> os.statvfs_result:
        self._begin("statvfs")
        return os.statvfs(self._root_fd)

    # ------------------------------------------------------------------ namespace changes

    @_names_paths
    def mkdir(self, path: Path, attrs: Attrs) -> os.stat_result:
        self._begin("mkdir", path)
        with self._parent(path) as (parent_fd, name):
            os.mkdir(name, attrs.mode & 0o777, dir_fd=parent_fd)
            return self._finish_new(parent_fd, name, attrs)

    @_names_paths
    def symlink(self, target: bytes, path: Path, attrs: Attrs) -> os.stat_result:
        self._begin("symlink", path)
        with self._parent(path) as (parent_fd, name):
            os.symlink(target, name, dir_fd=parent_fd)
            return self._finish_new(parent_fd, name, attrs)

    @_names_paths
    def mknod(self, path: Path, mode: int, rdev: int, attrs: Attrs) -> os.stat_result:
        self._begin("mknod", path)
        with self._parent(path) as (parent_fd, name):
            os.mknod(name, (stat.S_IFMT(mode) or stat.S_IFREG) | 0o600, rdev, dir_fd=parent_fd)
            return self._finish_new(parent_fd, name, attrs)

    def _finish_new(self, parent_fd: int, name: bytes, attrs: Attrs) -> os.stat_result:
        # If this fails the object stays with creation defaults; a retry sees EEXIST and the
        # caller can call set_attrs.
        fd = os.open(name, _PIN_FLAGS, dir_fd=parent_fd)
        try:
            pin = Pinned(parent_fd, name, fd, os.fstat(fd))
            self._apply_attrs(pin, None, attrs)
            return os.fstat(fd)
        finally:
            os.close(fd)

    @_names_paths
    def link(self, src: Path, dst: Path) -> tuple[os.stat_result, os.stat_result]:
        """Link `src` as `dst`; the object's stat just before and just after (its ctime moves)."""
        self._begin("link", src, dst)
        with self._parent(src) as (src_fd, src_name), self._parent(dst) as (dst_fd, dst_name):
            before = os.stat(src_name, dir_fd=src_fd, follow_symlinks=False)
            # follow_symlinks=False: a link to a symlink links the symlink itself.
            os.link(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
            return before, os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False)

    @_names_paths
    def unlink(self, path: Path) -> os.stat_result:
        """Remove `path`; the stat of what it named just before (another hard link of it, if
        any, has a new ctime now: the caller looks there for the stat after)."""
        self._begin("unlink", path)
        with self._parent(path) as (parent_fd, name):
            before = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            os.unlink(name, dir_fd=parent_fd)
            return before

    @_names_paths
    def rmdir(self, path: Path) -> None:
        self._begin("rmdir", path)
        with self._parent(path) as (parent_fd, name):
            os.rmdir(name, dir_fd=parent_fd)

    @_names_paths
    def rename(self, src: Path, dst: Path, flags: int = 0) -> tuple[os.stat_result, os.stat_result]:
        """Rename `src` to `dst`. Flags need renameat2 support; NFS answers EINVAL to any.

        Returns the moved object's stat just before and just after (a rename moves its ctime).
        """
        self._begin("rename", src, dst)
        if flags not in (0, RENAME_NOREPLACE, RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, f"unsupported rename flags {flags:#x}")
        with self._parent(src) as (src_fd, src_name), self._parent(dst) as (dst_fd, dst_name):
            before = os.stat(src_name, dir_fd=src_fd, follow_symlinks=False)
            if flags == 0:
                os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
            elif renameat2(src_fd, src_name, dst_fd, dst_name, flags) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), _show(src), None, _show(dst))
            return before, os.stat(dst_name, dir_fd=dst_fd, follow_symlinks=False)

    # ------------------------------------------------------------------ attributes and data

    @_names_paths
    def set_attrs(self, path: Path, attrs: Attrs, *, size: int | None = None) -> os.stat_result:
        self._begin("set_attrs", path)
        with self._pin(path) as pin:
            kind = pin.st.st_mode
            if size is not None and not stat.S_ISREG(kind):
                raise OSError(type_errno(pin.st), "only regular files have a size to set", _show(path))
            # Open the fd to fsync before the mode changes, which could forbid opening it.
            fd = None
            if stat.S_ISDIR(kind):
                fd = self._reopen(pin, os.O_RDONLY | os.O_DIRECTORY)
            elif stat.S_ISREG(kind):
                fd = self._open_for_write(pin) if size is not None else self._open_readable(pin)
            try:
                if size is not None:
                    assert fd is not None
                    os.ftruncate(fd, size)
                self._apply_attrs(pin, fd, attrs)
                if fd is not None:
                    os.fsync(fd)
                elif pin.parent_fd is not None:  # symlink, fifo, device: its directory entry
                    fsync_dir_fd(pin.parent_fd)
            finally:
                if fd is not None:
                    os.close(fd)
            return os.fstat(pin.fd)

    @_names_paths
    def set_times(self, path: Path, atime_ns: int, mtime_ns: int) -> None:
        """Set only the atime and mtime of `path` (a directory whose times a rename into it
        moved). Not fsynced: the caller fsyncs the directory afterwards."""
        self._begin("set_times", path)
        with self._pin(path) as pin:
            if pin.is_link:
                os.utime(pin.link_name, ns=(atime_ns, mtime_ns), dir_fd=pin.parent_fd, follow_symlinks=False)
            else:
                os.utime(proc_path(pin.fd), ns=(atime_ns, mtime_ns))

    def _open_readable(self, pin: Pinned) -> int | None:
        try:
            return self._reopen(pin, os.O_RDONLY)
        except PermissionError:  # not root and no read permission: attributes still apply
            return None

    def _open_for_write(self, pin: Pinned) -> int:
        try:
            return self._reopen(pin, os.O_WRONLY)
        except PermissionError:
            if pin.st.st_uid != os.geteuid():
                raise
            # Our own read-only file: the attrs applied afterwards set the final mode anyway.
            os.chmod(proc_path(pin.fd), stat.S_IMODE(pin.st.st_mode) | stat.S_IWUSR)
            return self._reopen(pin, os.O_WRONLY)

    def _apply_attrs(self, pin: Pinned, fd: int | None, attrs: Attrs) -> None:
        """chown, xattrs, chmod, then times. `fd`, if given, is a real fd on the same inode."""
        target: int | str = fd if fd is not None else proc_path(pin.fd)
        current = os.fstat(pin.fd)
        # Owner first: chown clears setuid/setgid and security.capability, so mode and xattrs
        # come after it. Unchanged ids are skipped, which also lets a non-root user publish
        # their own files.
        if (current.st_uid, current.st_gid) != (attrs.uid, attrs.gid):
            if pin.is_link:
                os.chown(pin.link_name, attrs.uid, attrs.gid, dir_fd=pin.parent_fd, follow_symlinks=False)
            else:
                os.chown(target, attrs.uid, attrs.gid)
        # For a symlink the /proc path lands on the link itself (pinned O_NOFOLLOW).
        xattr_target = proc_path(pin.fd) if pin.is_link else target
        remove, put = xattr_changes(xattr_target, attrs.xattrs)
        if remove or put:
            try:
                write_xattrs(xattr_target, remove, put)
            except PermissionError:
                # user.* xattrs need write permission even for the owner; the chmod below
                # sets the final mode anyway.
                mode = stat.S_IMODE(os.fstat(pin.fd).st_mode)
                if pin.is_link or current.st_uid != os.geteuid() or mode & stat.S_IWUSR:
                    raise
                os.chmod(target, mode | stat.S_IWUSR)
                write_xattrs(xattr_target, remove, put)
        if not pin.is_link:  # a symlink's mode means nothing on Linux
            os.chmod(target, stat.S_IMODE(attrs.mode))
        times = (attrs.atime_ns, attrs.mtime_ns)
        if pin.is_link:
            os.utime(pin.link_name, ns=times, dir_fd=pin.parent_fd, follow_symlinks=False)
        else:
            os.utime(target, ns=times)

    @_names_paths
    def publish_atomic(self, path: Path, staging: Path, source_fd: int, size: int, attrs: Attrs,
                       tmp_name: bytes | None = None) -> os.stat_result:
        """Replace `path` with bytes [0, size) of `source_fd` and `attrs`, atomically.

        `tmp_name` names the staging file (unique by default); a caller that recorded the
        name before the call can tell after a crash whether the rename happened (the staging
        file is gone). Moves the file offset of `source_fd` (holes are found with lseek); use
        pread on it.
        """
        self._begin("publish_atomic", path, staging)
        # The staging directory first: it may create the parent too (.safefs/generation).
        with self._dir(staging, create=True) as staging_fd:
            with self._parent(path) as (parent_fd, name):
                tmp = tmp_name or b"publish-" + uuid.uuid4().hex.encode() + b".tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=staging_fd)
                renamed = False
                try:
                    os.ftruncate(fd, size)  # holes stay holes: only data extents are written
                    self._copy_sparse(source_fd, fd, size)
                    os.fsync(fd)  # data before mtime: on NFS a late write would move it again
                    pin = Pinned(staging_fd, tmp, fd, os.fstat(fd))
                    self._apply_attrs(pin, fd, attrs)
                    os.fsync(fd)
                    os.rename(tmp, name, src_dir_fd=staging_fd, dst_dir_fd=parent_fd)
                    renamed = True
                    fsync_dir_fd(parent_fd)
                    return os.fstat(fd)
                except BaseException:
                    if not renamed:
                        with suppress(OSError):
                            os.unlink(tmp, dir_fd=staging_fd)
                    raise
                finally:
                    os.close(fd)

    def exists(self, path: Path) -> bool:
        """Is there an object at `path` (reached without following a symlink)?"""
        try:
            self.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return False  # a symlink where a directory should be: nothing there for us
            raise
        return True

    def is_dir(self, path: Path) -> bool:
        try:
            return stat.S_ISDIR(self.lstat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return False
            raise

    @_names_paths
    def write_ranges(self, path: Path, source_fd: int, ranges: Sequence[tuple[int, int]],
                     size: int, attrs: Attrs, shrink_to: int | None = None) -> os.stat_result:
        """Write `ranges` of `source_fd` into the existing regular file at `path`, in place.

        Ranges are clipped to `size`; bytes past the source's end are written as zeros. With
        `shrink_to`, the file is first cut to that length (a truncate the cache saw), so that
        growing it again reads as zeros without writing them. The file ends up exactly `size`
        long, then is fsynced, given `attrs` and fsynced again.
        """
        self._begin("write_ranges", path)
        with self._pin(path) as pin:
            if not stat.S_ISREG(pin.st.st_mode):
                raise OSError(type_errno(pin.st), "not a regular file", _show(path))
            fd = self._open_for_write(pin)
            try:
                low = size if shrink_to is None else min(size, shrink_to)
                if pin.st.st_size > low:  # shrink first: no point writing what is cut off
                    os.ftruncate(fd, low)
                for start, end in ranges:
                    end = min(end, size)
                    if start < end:
                        self._copy_bytes(source_fd, fd, start, end, zero_fill=True)
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
                os.fsync(fd)
                self._apply_attrs(pin, fd, attrs)
                os.fsync(fd)
                return os.fstat(fd)
            finally:
                os.close(fd)

    def _copy_sparse(self, src: int, dst: int, size: int) -> None:
        """Copy the data extents of src within [0, size) to the same offsets of dst."""
        pos = 0
        while pos < size:
            try:
                start = os.lseek(src, pos, os.SEEK_DATA)
                end = min(os.lseek(src, start, os.SEEK_HOLE), size)
            except OSError as e:
                if e.errno == errno.ENXIO:  # nothing but hole up to the end of the file
                    return
                if e.errno != errno.EINVAL:
                    raise
                start, end = pos, size  # no SEEK_DATA support: copy it all
            if start >= size:
                return
            self._copy_bytes(src, dst, start, end, zero_fill=False)
            pos = end

    def _copy_bytes(self, src: int, dst: int, start: int, end: int, *, zero_fill: bool) -> None:
        pos = start
        while pos < end:
            n = min(end - pos, _COPY_CHUNK)
            data = os.pread(src, n, pos)
            if not data:
                if not zero_fill:
                    return
                data = bytes(n)  # the source ends early: what it lacks reads as zeros
            pwrite_all(dst, data, pos)
            self._count(written=len(data))
            pos += len(data)

    @_names_paths
    def fsync_dir(self, path: Path) -> None:
        self._begin("fsync_dir", path)
        with self._dir(path) as pin:
            fsync_dir_fd(pin)

