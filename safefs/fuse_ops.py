"""The thin pyfuse3 adapter: kernel requests in, `Filesystem` calls out. No policy lives here.

This is the only module that imports pyfuse3; the daemon drives the kernel session through
`Session` (mount, serve, close).

Invariants:
- Every handler goes through `fuse_errors` (getxattr's `security.capability` answer, which
  can raise nothing but FUSEError, comes before it): a `SafefsError` or `OSError` becomes its errno;
  anything else is a bug, which is logged with its traceback and answered with EIO. No
  exception ever escapes into `pyfuse3.main()` (that would take the mount down).
- `forget` never raises (pyfuse3 forbids it).
- Every kernel-cache decision (timeouts, keep_cache, writeback mode, readahead) comes from
  safefs/kernel_cache.py, which says why.
- Kernel invalidations run in a worker thread behind a one-slot limiter, never while safefs
  holds a lock: the kernel may need to call back into this filesystem to complete them.

Threading: handlers run as trio tasks on the trio thread and interleave at every await.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from safefs import mounttable
from safefs.errors import FsError, SafefsError
from safefs.fs import Filesystem
from safefs.inodes import Inode
from safefs.kernel_cache import KEEP_CREATED, READAHEAD_KIB, CachePolicy

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

CAPABILITY = b"security.capability"


def fuse_errors(handler: F) -> F:
    @functools.wraps(handler)
    async def wrapper(self: SafeOperations, *args: Any) -> Any:
        try:
            return await handler(self, *args)
        except pyfuse3.FUSEError:
            raise
        except SafefsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except trio.Cancelled:
            raise
        except Exception:
            log.exception("fuse: unexpected error in %s%r", handler.__name__, args[:2])
            self.bugs += 1
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class KernelNotifier:
    """Tells the kernel to forget cached pages, attributes and names."""

    def __init__(self) -> None:
        self._limiter = trio.CapacityLimiter(1)
        self.enabled = False  # only once pyfuse3.main() runs
        self._queue: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._queued = trio.Event()

    def later_inode(self, ino: int) -> None:
        self._later(pyfuse3.invalidate_inode, ino, False)

    def later_entry(self, parent: int, name: bytes) -> None:
        self._later(pyfuse3.invalidate_entry, parent, name)

    def _later(self, fn: Callable[..., None], *args: Any) -> None:
        if self.enabled:
            self._queue.append((fn, args))
            self._queued.set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Carry out queued invalidations, after the request that queued them has ended."""
        task_status.started()
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            await trio.sleep(0)  # let the queuing request finish first
            queue, self._queue = self._queue, []
            for fn, args in queue:
                await self._run(fn, *args)

    async def invalidate_inode(self, ino: int) -> None:
        if self.enabled:
            await self._run(pyfuse3.invalidate_inode, ino, False)

    async def invalidate_entry(self, parent: int, name: bytes) -> None:
        if self.enabled:
            await self._run(pyfuse3.invalidate_entry, parent, name)

    async def _run(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            with trio.move_on_after(10):
                await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the kernel did not know it: nothing to forget
                log.info("fuse: invalidation of %r failed: %s", args, exc)


class SafeOperations(pyfuse3.Operations):
    """Translate kernel requests into Filesystem calls."""

    # No `flush` handler: close() has nothing to report that write() and fsync() did not, and
    # the ENOSYS of pyfuse3's default tells the kernel to stop sending FLUSH at all, which
    # saves a round trip per close(). With the writeback cache the kernel still writes the
    # file's dirty pages back (and waits for them) before it answers close(): fuse_flush()
    # does that before it looks at whether FLUSH is implemented.

    def __init__(self, fs: Filesystem, policy: CachePolicy, *, writeback_cache: bool = False) -> None:
        super().__init__()
        self.enable_writeback_cache = writeback_cache  # read by pyfuse3 at INIT (kernel_cache.py)
        self.fs = fs
        self.policy = policy
        self.bugs = 0
        self.initialized = trio.Event()

    def init(self) -> None:
        """The kernel's INIT request is being answered (see Session._tune_after_init)."""
        self.initialized.set()

    def _entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        # Hot: `find` makes one per name. Fields left at EntryAttributes' zero default are not
        # set: `generation` (inode numbers are never reused, see inodes.py) and a zero rdev.
        e = pyfuse3.EntryAttributes()
        e.st_ino = inode.ino
        e.entry_timeout = self.policy.entry_timeout
        e.attr_timeout = self.policy.attr_timeout
        e.st_mode = inode.mode
        e.st_nlink = inode.nlink
        e.st_uid = inode.uid
        e.st_gid = inode.gid
        if inode.rdev:
            e.st_rdev = inode.rdev
        e.st_size = inode.size
        e.st_blksize = 128 * 1024
        e.st_blocks = (inode.size + 511) // 512
        e.st_atime_ns = inode.atime_ns
        e.st_mtime_ns = inode.mtime_ns
        e.st_ctime_ns = inode.ctime_ns
        return e

    def _absent(self) -> pyfuse3.EntryAttributes:
        """A negative entry: the kernel answers ENOENT itself until the timeout or until
        `Filesystem` takes it back (see `Filesystem.note_absent`)."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.policy.entry_timeout
        return e

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        try:
            inode = await self.fs.lookup(parent_inode, name)
        except FsError as exc:
            if exc.errno == errno.ENOENT and self.fs.note_absent(parent_inode, name):
                return self._absent()
            raise
        return self._entry(inode)

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.fs.getattr(inode))

    @fuse_errors
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None,
        ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        result = await self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        return self._entry(result)

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(parent_inode, name)

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @fuse_errors
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes, flags: int,
        ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.link(inode, new_parent_inode, new_name))

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh, keep_cache = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, inode = await self.fs.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh, keep_cache=KEEP_CREATED), self._entry(inode)

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, buf)

    @fuse_errors
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync=datasync)

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self.fs.opendir(inode)

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entry, reply, remember = self._entry, pyfuse3.readdir_reply, self.fs.remember
        for name, inode, next_id in self.fs.readdir(fh, start_id):
            if not reply(token, name, entry(inode), next_id):
                break
            if name != b"." and name != b"..":  # the kernel takes no reference to these two
                remember(inode)

    @fuse_errors
    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.fsyncdir()

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self.fs.statfs()
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(out, field, getattr(st, field))
        out.f_namemax = 255
        return out

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.setxattr(inode, name, value)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name == CAPABILITY:
            # The kernel asks this before every write (pyfuse3 offers no FUSE_HANDLE_KILLPRIV),
            # so it is answered first, from memory: an NFS project never carries security.*
            # xattrs (NFSv4.2 has user.* only), so only one set through this mount can exist.
            known = self.fs.table.inodes.get(inode)
            value = known.xattrs.get(name) if known is not None and known.xattrs else None
            if value is None:
                raise pyfuse3.FUSEError(errno.ENODATA)
            return value
        return await self._getxattr(inode, name)

    @fuse_errors
    async def _getxattr(self, inode: int, name: bytes) -> bytes:
        return await self.fs.getxattr(inode, name)

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return await self.fs.listxattr(inode)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.removexattr(inode, name)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            await self.fs.forget(list(inode_list))
        except Exception:
            log.exception("fuse: error in forget (ignored)")


class Session:
    """The kernel session: mount, serve requests until unmounted, close. The daemon drives it."""

    def __init__(self, ops: SafeOperations, mountpoint: str, *, allow_other: bool) -> None:
        pyfuse3.init(ops, mountpoint, mount_options(allow_other=allow_other))
        self.ops = ops
        self.mountpoint = mountpoint

    async def serve(self) -> None:
        """Serve requests; returns when the kernel unmounts or `terminate()` is called."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._tune_after_init)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    async def _tune_after_init(self) -> None:
        # The kernel applies the INIT reply's readahead limit when the reply arrives, so the
        # setting is raised after it: `init` runs just before pyfuse3 sends that reply.
        await self.ops.initialized.wait()
        await trio.to_thread.run_sync(raise_readahead, self.mountpoint, READAHEAD_KIB)

    @staticmethod
    def terminate() -> None:
        pyfuse3.terminate()

    @staticmethod
    def close(*, unmount: bool) -> None:
        pyfuse3.close(unmount=unmount)


def mount_options(*, allow_other: bool) -> set[str]:
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {"fsname=safefs", "subtype=safefs"}
    if allow_other:
        options.add("allow_other")
    return options


async def flush_kernel_pages(mountpoint: str, timeout: float) -> bool:
    """Make the kernel write back the dirty pages it holds for `mountpoint` (syncfs(2) on it);
    False if that failed or took longer than `timeout`.

    The daemon calls this on its own mount, so the syncfs runs in a worker thread: the WRITE
    requests it causes are served by the trio thread meanwhile (a syncfs there would wait for
    itself forever). On a timeout the thread is abandoned; it ends when the kernel is done.
    """

    def syncfs() -> None:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _libc().syncfs(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        finally:
            os.close(fd)

    with trio.move_on_after(timeout):
        try:
            await trio.to_thread.run_sync(syncfs, abandon_on_cancel=True)
            return True
        except OSError as exc:
            log.warning("fuse: the kernel could not write back its pages of %s: %s", mountpoint, exc)
            return False
    log.warning("fuse: the kernel did not write back its pages of %s within %g s", mountpoint, timeout)
    return False


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)  # os has no syncfs


def raise_readahead(mountpoint: str, kib: int) -> None:
    """Let the kernel read ahead `kib` KiB on this mount instead of its 128 KiB default.

    FUSE asks the daemon for readahead in requests of at most the mount's readahead, so the
    default makes a cold sequential read one round trip per 128 KiB. With 1 MiB it is one per
    MiB: a cold read of 256 MiB went from 266 to 689 MB/s on the test VM (4 MiB: no better).
    pyfuse3 does not let a file system set this at INIT, so it is raised afterwards through the
    mount's backing device in sysfs, which only root may write: elsewhere it stays as it is.
    Never lowered (an administrator's larger value wins). Reads /proc and sysfs only, never
    the mount itself (that would wait for requests nobody serves yet).
    """
    device = mount_device(mountpoint)
    if device is None:
        return
    setting = f"/sys/class/bdi/{device}/read_ahead_kb"
    try:
        with open(setting, "r+") as f:
            if int(f.read().strip() or 0) < kib:
                f.seek(0)
                f.write(str(kib))
    except (OSError, ValueError) as exc:
        log.debug("fuse: readahead stays at the kernel default (%s: %s)", setting, exc)


def mount_device(mountpoint: str, mountinfo: str = mounttable.MOUNTINFO) -> str | None:
    """The MAJOR:MINOR of the newest mount on `mountpoint`, from the kernel's mount table."""
    target = os.fsencode(mountpoint)
    devices = [mount.device for mount in mounttable.read(mountinfo) or [] if mount.mount_point == target]
    return devices[-1] if devices else None
