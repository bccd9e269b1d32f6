"""Low-level helpers over Linux system calls for safefs.backing (moved verbatim; see next commit)."""

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


def _proc(fd: int) -> str:
    # Opening or stat'ing this follows the magic link to the pinned inode itself.
    return f"/proc/self/fd/{fd}"


def _type_error(st: os.stat_result) -> int:
    """The errno for "this operation needs a regular file, but got that"."""
    if stat.S_ISDIR(st.st_mode):
        return errno.EISDIR
    if stat.S_ISLNK(st.st_mode):
        return errno.ELOOP
    return errno.EINVAL


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _load_renameat2():
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


_renameat2 = _load_renameat2()


def _xattr_changes(target: int | str, wanted: Mapping[bytes, bytes]) -> tuple[list[bytes], dict[bytes, bytes]]:
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


def _write_xattrs(target: int | str, remove: list[bytes], put: Mapping[bytes, bytes]) -> None:
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
class _Pinned:
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
