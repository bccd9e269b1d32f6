"""The Python ceiling for scripts/bench: a minimal durable pyfuse3 pass-through.

    python scripts/passthrough.py SOURCE MOUNTPOINT

Mirrors SOURCE at MOUNTPOINT with the kernel writeback cache on, 60 s entry and attribute
timeouts, keep_cache, and fsync forwarded to the backing file (so it is as durable as the
disk under it, as safefs is). No cache, no journal, no lease: what Python on pyfuse3 and trio
can do on this machine at best, the "ceiling" column of `scripts/bench`. Runs in the
foreground until unmounted (`fusermount3 -u MOUNTPOINT`) or SIGTERM. Single trio thread;
every syscall on SOURCE runs inline (it is a local disk).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
from typing import Any

import pyfuse3
import trio

TIMEOUT = 60.0


class Passthrough(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, source: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.lookups: dict[int, int] = {}

    def _path(self, ino: int) -> str:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _entry(self, path: str, *, remember: bool = True) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        ino = pyfuse3.ROOT_INODE if path == self.paths[pyfuse3.ROOT_INODE] else st.st_ino
        if remember and ino != pyfuse3.ROOT_INODE:
            self.paths[ino] = path
            self.lookups[ino] = self.lookups.get(ino, 0) + 1
        e = pyfuse3.EntryAttributes()
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_atime_ns",
                      "st_mtime_ns", "st_ctime_ns", "st_blksize", "st_blocks"):  # fmt: skip
            setattr(e, field, getattr(st, field))
        e.st_ino = ino
        e.entry_timeout = e.attr_timeout = TIMEOUT
        return e

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry(self._child(parent_inode, name))

    async def forget(self, inode_list: Any) -> None:
        for ino, n in inode_list:
            left = self.lookups.get(ino, 0) - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                if ino != pyfuse3.ROOT_INODE:
                    self.paths.pop(ino, None)

    async def getattr(self, inode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        return self._entry(self._path(inode), remember=False)

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                os.chown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1,
                         follow_symlinks=False)  # fmt: skip
            if fields.update_atime or fields.update_mtime:
                st = os.lstat(path)
                os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                   attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                         follow_symlinks=False)  # fmt: skip
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        return self._entry(path, remember=False)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(os.readlink(self._path(inode)))

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        path = self._path(fh)
        names = sorted(os.listdir(path))
        for index, name in enumerate(names[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(os.path.join(path, name)), index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = os.open(self._path(fh), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        self._call(os.mkdir, path, mode)
        return self._entry(path)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        self._call(os.mknod, path, mode, rdev)
        return self._entry(path)

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        self._call(os.symlink, target, path)
        return self._entry(path)

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        self._call(os.link, self._path(inode), path)
        return self._entry(path)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._call(os.unlink, self._child(parent_inode, name))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._call(os.rmdir, self._child(parent_inode, name))

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int, name_new: bytes, flags: int,
                     ctx: Any) -> None:  # fmt: skip
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._child(parent_old, name_old), self._child(parent_new, name_new)
        self._call(os.rename, old, new)
        st = os.lstat(new)
        if st.st_ino in self.paths:
            self.paths[st.st_ino] = new
            if stat.S_ISDIR(st.st_mode):  # children keep stale paths: rewrite their prefix
                for ino, path in list(self.paths.items()):
                    if path.startswith(old + "/"):
                        self.paths[ino] = new + path[len(old):]

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        # The kernel does O_APPEND itself with the writeback cache, and may read a write-only file.
        flags = (flags & ~(os.O_APPEND | os.O_ACCMODE)) | os.O_RDWR
        return pyfuse3.FileInfo(fh=self._call(os.open, self._path(inode), flags), keep_cache=True)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:  # fmt: skip
        path = self._child(parent_inode, name)
        flags = (flags & ~(os.O_APPEND | os.O_ACCMODE)) | os.O_RDWR | os.O_CREAT
        fd = self._call(os.open, path, flags, mode)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._entry(path)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self._call(os.pread, fh, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self._call(os.pwrite, fh, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._call(os.fdatasync if datasync else os.fsync, fh)

    async def release(self, fh: int) -> None:
        os.close(fh)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.paths[pyfuse3.ROOT_INODE])
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, field, getattr(st, field))
        out.f_namemax = 255
        return out

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA)

    @staticmethod
    def _call(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    source, mountpoint = os.path.abspath(argv[0]), argv[1]
    options = set(pyfuse3.default_options) | {"fsname=passthrough", "subtype=passthrough"}
    pyfuse3.init(Passthrough(source), mountpoint, options)
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


async def serve() -> None:
    async def stop_on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
