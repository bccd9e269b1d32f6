"""Low-level helpers over Linux system calls, for safefs.backing: the syscalls Python's os
module lacks or leaves partial (renameat2, full pwrite, directory fsync through an O_PATH fd),
the xattr set a publish leaves behind, and the record of an object pinned by an O_PATH fd.

Invariants:
- Nothing here resolves a path or follows a symlink: every helper takes fds (or a
  /proc/self/fd path of a pinned fd, `proc_path`) that the caller resolved under the rules of
  safefs.backing; a bare name is used only relative to a parent dir fd.
- `xattr_changes` never asks to remove a name outside the user./trusted./security.
  namespaces; `write_xattrs` tolerates a name already gone and a security label it may not
  remove.
- Stdlib only (a core module): no I/O of its own beyond the calls it is asked to make.

Threading: no shared state; every function blocks in the kernel and is safe from any thread
(safefs.backing's callers run it in worker threads). `renameat2` is looked up once, at import.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from collections.abc import Mapping
from dataclasses import dataclass

# xattr namespaces whose stale names a publish removes; others (system.*) are left alone.
_OWNED_XATTR_PREFIXES = (b"user.", b"trusted.", b"security.")


def proc_path(fd: int) -> str:
    """A path that reaches the inode pinned by `fd` (for calls that take no O_PATH fd)."""
    # Opening or stat'ing this follows the magic link to the pinned inode itself.
    return f"/proc/self/fd/{fd}"


def type_errno(st: os.stat_result) -> int:
    """The errno for "this operation needs a regular file, but got that"."""
    if stat.S_ISDIR(st.st_mode):
        return errno.EISDIR
    if stat.S_ISLNK(st.st_mode):
        return errno.ELOOP
    return errno.EINVAL


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (os.pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _load_renameat2():
    """renameat2(2) from libc, or through syscall(2) where glibc is older than 2.28; returns
    0 or -1 with the errno in ctypes.get_errno()."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:  # glibc >= 2.28
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    number = {"x86_64": 316, "aarch64": 276}[platform.machine()]
    libc.syscall.restype = ctypes.c_long

    def via_syscall(olddirfd, oldpath, newdirfd, newpath, flags):
        return libc.syscall(ctypes.c_long(number), ctypes.c_int(olddirfd), ctypes.c_char_p(oldpath),
                            ctypes.c_int(newdirfd), ctypes.c_char_p(newpath), ctypes.c_uint(flags))

    return via_syscall


renameat2 = _load_renameat2()


def xattr_changes(target: int | str, wanted: Mapping[bytes, bytes]) -> tuple[list[bytes], dict[bytes, bytes]]:
    """Names to remove and values to set so that `target` carries exactly `wanted`.

    Only names in the user./trusted./security. namespaces are ever removed.
    """
    try:
        present = [os.fsencode(n) for n in os.listxattr(target)]
    except OSError as e:
        if e.errno == errno.ENOTSUP and not wanted:
            return [], {}
        raise
    remove = [n for n in present if n not in wanted and n.startswith(_OWNED_XATTR_PREFIXES)]
    put = {}
    for name, value in wanted.items():
        if name in present:
            try:
                if os.getxattr(target, name) == value:
                    continue
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
        put[name] = value
    return remove, put


def write_xattrs(target: int | str, remove: list[bytes], put: Mapping[bytes, bytes]) -> None:
    for name in remove:
        try:
            os.removexattr(target, name)
        except OSError as e:
            # Gone already; or a security label (e.g. SELinux) we may not remove.
            if e.errno == errno.ENODATA:
                continue
            if name.startswith(b"security.") and e.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP):
                continue
            raise
    for name, value in put.items():
        os.setxattr(target, name, value)


@dataclass
class Pinned:
    """An object held by an O_PATH fd, with the parent dir fd and name it was found under."""

    parent_fd: int | None  # None for the project root
    name: bytes | None
    fd: int
    st: os.stat_result

    @property
    def is_link(self) -> bool:
        return stat.S_ISLNK(self.st.st_mode)

    @property
    def link_name(self) -> bytes:
        """The name of this symlink in its parent (only the root has no name, and it is no link)."""
        assert self.name is not None
        return self.name


def fsync_dir_fd(dir_fd: int) -> None:
    """fsync the directory `dir_fd` (an O_PATH fd); a filesystem without directory fsync is
    no error."""
    # fsync needs a real fd; O_PATH fds answer EBADF.
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # filesystems without dir fsync
            raise
    finally:
        os.close(fd)
