"""Publishing: dirty inodes carried to their backing path.

Small or new files go to a staging file in `.safefs/staging/<epoch>/`, are fsynced and
renamed into place (readers never see a torn file); large files get only their dirty ranges
written in place.

A part of the flusher (flusher.py), built with what it uses: the WriteBack it calls the
backing tree through, the Conflicts part (a file changed on both sides becomes a conflict
copy), the inode table, the contents, the backing tree, the lease gate, the clock and the
config. It owns what a pass has still to close (the directories to fsync, which replay adds
to through `changed_dir`, and those a staging rename moved the times of), whether this
run cleaned the staging directory, and the receipt of the pass under way (set by the
Flusher; a replayed create's publish counts there).

Invariants:
- Dirty state is cleared only if the inode did not change while it was being published;
  otherwise it stays dirty and is published again.
- A publish under way is recorded (`Inode.publishing`) before the backing tree is touched,
  so after a crash our own half-done publish is told from someone else's change.
- A file changed on the project since safefs last saw it (fingerprint mismatch) is not
  overwritten: it becomes a conflict (conflicts.py).
- A staging rename moves its directory's times: after the publishes of a pass, each such
  directory gets back the times the mount shows.

Threading: trio thread only; backing calls through WriteBack.call.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat

from safefs import ranges
from safefs.backing import Backing, Fingerprint
from safefs.clock import Clock
from safefs.config import MountConfig
from safefs.conflicts import Conflicts
from safefs.content import Content, fingerprint_tuple, same_content
from safefs.inodes import ROOT_INO, Inode, InodeTable
from safefs.ports import WriteGate
from safefs.writeback import BPath, Receipt, WriteBack, utc_text

log = logging.getLogger(__name__)


class Publisher:
    """Publishing dirty inodes at their backing paths. Owns what a pass has still to close:
    the directories to fsync (`dirs_to_sync`, which replay adds to through `changed_dir`) and the directories a
    staging rename moved the times of; and whether this run cleaned the staging directory."""

    def __init__(
        self,
        *,
        writeback: WriteBack,
        resolver: Conflicts,
        table: InodeTable,
        content: Content,
        backing: Backing,
        gate: WriteGate,
        clock: Clock,
        config: MountConfig,
    ) -> None:
        self.writeback = writeback
        self.resolver = resolver
        self.table = table
        self.content = content
        self.backing = backing
        self.gate = gate
        self.clock = clock
        self.config = config
        self.dirs_to_sync: set[BPath] = set()  # fsynced at the end of the pass (sync_dirs)
        self._renamed_into: set[int] = set()  # directories a staging rename moved the times of
        self.staging_cleaned = False
        self.receipt: Receipt | None = None  # the flush pass under way (the Flusher sets it)

    def changed_dir(self, path: BPath) -> None:
        """This pass changed the project's directory `path`: fsync it at the end of the pass
        (`sync_dirs`) and name it in the next generation (WriteBack.changed)."""
        self.dirs_to_sync.add(path)
        self.writeback.changed(path)

    async def publish(self, inode: Inode, receipt: Receipt) -> None:
        self.gate.require_publishable()
        path = self.table.backing_path(inode.ino) if inode.ino != ROOT_INO else ()
        if path is None or (not inode.links and inode.ino != ROOT_INO):
            return  # not on the backing tree, or about to leave it: nothing to publish
        if inode.is_reg:
            await self.publish_file(inode, path, inode.blinks[0], atomic=None, receipt=receipt)
            return
        version = inode.version
        attrs = await self.writeback.attrs_of(inode)
        try:
            await self.writeback.call(self.backing.set_attrs, path, attrs)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            # Removed, renamed or replaced behind our back: only attributes are lost (what
            # was below it is published or kept by inode); say so and move on.
            log.warning("flush: conflict: cannot set attributes of %s: %s", os.fsdecode(b"/".join(path)), exc)
            self.resolver.add({"path": os.fsdecode(b"/".join(path)), "error": str(exc),
                                   "why": "removed or replaced in the project; the mount's attributes are not applied",
                                   "time": utc_text(self.clock.wall())})  # fmt: skip
        else:
            # A follower takes a symlink's or a device's attributes from its directory's
            # listing. A directory's own attributes are not announced: naming its parent would
            # make followers re-list every sibling (see README, limitations).
            if not stat.S_ISDIR(inode.mode):
                self.changed_dir(path[:-1])
        self.table.mark_attrs_published(inode, version)

    async def publish_file(
        self, inode: Inode, path: BPath, blink: tuple[int, bytes], *, atomic: bool | None, receipt: Receipt | None
    ) -> None:
        backing_links = 1
        if not inode.new and inode.origin is not None:
            st_now = await self.unchanged_behind_us(inode, path)
            if st_now is None:
                await self.resolver.publish_conflict(inode, path)
                return
            backing_links = st_now.st_nlink
        version = inode.version
        whole = inode.new or (
            atomic is not False
            and inode.size <= self.config.publish_threshold
            and len(inode.blinks) <= 1
            and backing_links <= 1  # a rename would split a hard link we may not know of
        )
        attrs = await self.writeback.attrs_of(inode)
        async with self.writeback.pinned(inode.ino) as fd:
            if whole:
                await self.content.fill(inode)
                staging = self.writeback.staging()
                tmp = b"publish-%x-%x-%s.tmp" % (inode.ino, version, os.urandom(6).hex().encode())
                await self._record_publishing(inode, staging + (tmp,))
                st = await self.writeback.call(self.backing.publish_atomic, path, staging, fd, inode.size, attrs, tmp)
                self._renamed_into.add(blink[0])
                written = inode.size
            elif inode.dirty or inode.attr_dirty:
                dirty = list(inode.dirty)
                await self._record_publishing(inode, ())
                call = self.writeback.call
                st = await call(self.backing.write_ranges, path, fd, dirty, inode.size, attrs, inode.low_size)
                written = ranges.total(dirty)
            else:
                return
        receipt = receipt or self.receipt
        if receipt is not None:
            receipt.files += 1
            receipt.bytes += written
        hard_linked = st.st_ino if st.st_nlink > 1 else None
        self.table.mark_published(inode, fingerprint_tuple(Fingerprint.of(st)), blink, version, hard_linked)
        self.changed_dir(path[:-1])

    async def clean_staging(self) -> None:
        """Remove staging files a crash left behind, except those a record still names."""
        self.gate.require_publishable()
        staging = self.writeback.staging()
        try:
            entries = await self.writeback.call(self.backing.listdir, staging)
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        named = {i.publishing[-1] for i in self.table.inodes.values() if i.publishing}
        for entry in entries:
            if entry.name not in named:
                with contextlib.suppress(FileNotFoundError):
                    await self.writeback.call(self.backing.unlink, staging + (entry.name,))
        self.staging_cleaned = True

    async def _record_publishing(self, inode: Inode, what: tuple[bytes, ...]) -> None:
        if not inode.new:
            self.table.set_publishing(inode, what)
            await self.table.commit()

    async def _ours_after_crash(self, inode: Inode, st: os.stat_result) -> bool:
        """Is the unexpected backing file the result of our own publish, cut short by a crash?"""
        publishing = self.table.set_publishing(inode, None)
        if publishing is None or not stat.S_ISREG(st.st_mode) or inode.origin is None:
            return False
        if publishing == ():
            return st.st_ino == inode.origin[0]  # an in-place write keeps the inode
        # The staging file is gone only if it was renamed into place (publish_atomic removes
        # it on failure only while we are alive to clear `publishing` ourselves).
        if await self.writeback.call(self.backing.exists, publishing):
            with contextlib.suppress(OSError):
                await self.writeback.call(self.backing.unlink, publishing)
            return False
        return True

    async def unchanged_behind_us(self, inode: Inode, path: BPath) -> os.stat_result | None:
        """The backing file's stat if it is still what safefs last saw there, else None."""
        try:
            st = await self.writeback.call(self.backing.lstat, path)
        except (FileNotFoundError, NotADirectoryError):
            return None  # gone, or its directory was replaced behind our back
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            return None  # a symlink now stands where a directory was
        fingerprint = fingerprint_tuple(Fingerprint.of(st))
        if same_content(inode.origin, fingerprint):
            if inode.publishing:  # a publish that never reached its rename: drop its leftovers
                await self._ours_after_crash(inode, st)
            return st
        if await self._ours_after_crash(inode, st):
            self.table.set_origin(inode, fingerprint)
            return st
        return None

    async def restore_dir_times(self) -> None:
        """A staging rename into a directory moved its times on the project: give it back the
        times the mount shows, once per directory per pass, after the last rename into it."""
        dirs, self._renamed_into = self._renamed_into, set()
        for ino in sorted(dirs):
            d, path = self.table.inodes.get(ino), self.writeback.dir_path(ino)
            if d is None or path is None:
                continue
            self.gate.require_writable()
            try:
                await self.writeback.call(self.backing.set_times, path, d.atime_ns, d.mtime_ns)
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone from the project meanwhile: nothing to restore
            self.changed_dir(path)

    async def sync_dirs(self) -> None:
        """Fsync each directory the pass changed. A directory stays listed until it is synced,
        so a failure leaves the rest for the next pass instead of forgetting them."""
        for path in sorted(self.dirs_to_sync):
            try:
                await self.writeback.call(self.backing.fsync_dir, path)
            except (FileNotFoundError, NotADirectoryError):
                pass  # no directory there any more: the rename or unlink that moved it synced its parents
            self.dirs_to_sync.discard(path)
