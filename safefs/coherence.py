"""Coherence with the project: the mount's view of directories and clean files follows the
backing tree wherever the cache holds no change of its own.

A directory is listed from the backing tree on first use (`ensure_listed`) and compared again
when it is distrusted (`mark_stale`: another host published, or the cache was not mounted);
a clean file is compared by fingerprint when opened (`revalidate`). What changed there is
taken over: new names appear, gone names go (with their cached subtrees), changed clean
files drop their cached bytes, or, while open or sized by the kernel, leave their names to
a new inode.

Invariants:
- Names with changes of our own still to write back, or named by a pending op, are never
  taken over from the backing tree: the cache is authoritative for them.
- A name that may have appeared behind the kernel's back has its cached absence
  invalidated (negative.py) before anyone can act on it; kernel invalidations are queued
  (`later_*`), not awaited, because this runs inside requests on the directory.
- An open file never continues in a newer version on the project (`_split_open_version`).

Threading: trio thread; backing reads through `Content.read_backing`/`on_backing` (worker
threads, with the read timeout).
"""

from __future__ import annotations

import errno
import logging
import stat

from safefs import layout
from safefs.backing import Backing, Entry, Fingerprint
from safefs.content import Content, fingerprint_tuple, same_content
from safefs.errors import FsError
from safefs.inodes import ROOT_INO, Inode, InodeTable, op_names
from safefs.locks import KeyedLocks
from safefs.negative import NegativeNames
from safefs.ports import Invalidator

log = logging.getLogger(__name__)


def hidden(parent: int, name: bytes) -> bool:
    """Is this the project's `.safefs` control directory (invisible in the mount)?"""
    return parent == ROOT_INO and name == layout.DIR


class Coherence:
    """The mount's view of the backing tree, brought up to date with it."""

    def __init__(
        self, table: InodeTable, backing: Backing, content: Content, negative: NegativeNames, invalidator: Invalidator
    ) -> None:
        self.table = table
        self.backing = backing
        self.content = content
        self.negative = negative
        self.invalidator = invalidator
        self._dir_locks = KeyedLocks()
        self.dropped_content: set[int] = set()  # content files to delete (see purge_dropped)

    def mark_stale(self) -> None:
        """Distrust every listed directory: the backing tree may have changed (another host
        wrote, or this cache was not mounted). Each is compared again on its next use."""
        for inode in self.table.inodes.values():
            if inode.is_dir and inode.listed:
                self.table.set_stale(inode.ino)
        self.negative.forget_all()

    def mark_dir_stale(self, ino: int) -> None:
        """`mark_stale` for one directory (a generation record named it as changed)."""
        inode = self.table.inodes.get(ino)
        if inode is not None and inode.is_dir and inode.listed:
            self.table.set_stale(ino)
        self.negative.forget(ino)

    async def ensure_listed(self, d: Inode) -> None:
        """Load a directory's entries from the backing tree the first time it is used, and
        bring them up to date when it is stale."""
        if d.listed:
            if d.stale:
                await self._refresh(d)
            return
        async with self._dir_locks(d.ino):
            if d.listed:
                return
            path = self.table.dir_backing_path(d.ino)
            entries: list[Entry] = []
            if path is not None:
                entries = await self.content.read_backing(self.backing.listdir, path)
            for entry in entries:
                if hidden(d.ino, entry.name) or self.table.child(d.ino, entry.name) is not None:
                    continue
                self.table.link(d.ino, entry.name, self._inode_from_backing(d.ino, entry))
            d.listed = True
            self.table.mark(d)
            await self.table.commit()

    async def _refresh(self, d: Inode) -> None:
        """Compare a stale directory with the backing tree and take over what changed there.

        Entries with changes of our own still to write back, and names a pending op changes
        (an unlink or a rename not written back yet), are left alone: the cache is
        authoritative for them (and the flusher's conflict rules apply when it publishes, or
        `recover` for a mount that lost its lease). Every other name follows the project, so
        a fenced ex-writer still sees what the new writer publishes in such a directory.
        Kernel invalidations are queued, not awaited: this runs inside a request on `d`, and
        the kernel needs `d`'s lock to drop a name.
        """
        async with self._dir_locks(d.ino):
            if not d.stale:
                return
            path = self.table.dir_backing_path(d.ino)
            if path is None:
                self.table.set_fresh(d)
                return
            table = self.table
            # The flusher goes on while the project is listed: a create it replays meanwhile
            # may be missing from the listing, an unlink still in it. So a name is left alone
            # if a pending op or a pinned child held it before the listing, or holds it after.
            held = {name for name, ino in table.names(d.ino).items() if table.pinned(table.inodes[ino])}
            held |= {name for op in table.ops.values() for parent, name in op_names(op) if parent == d.ino}
            entries = await self.content.read_backing(self.backing.listdir, path)
            pending = held | {name for op in table.ops.values() for parent, name in op_names(op) if parent == d.ino}
            found = {e.name: e for e in entries if not hidden(d.ino, e.name) and e.name not in pending}
            for name, ino in list(table.names(d.ino).items()):
                child = table.inodes[ino]
                if table.pinned(child) or name in pending:
                    found.pop(name, None)
                    continue
                entry = found.pop(name, None)
                same_object = (
                    entry is not None
                    and stat.S_IFMT(entry.st.st_mode) == stat.S_IFMT(child.mode)
                    and (
                        entry.st.st_ino == child.origin[0]
                        if child.origin is not None
                        else (d.ino, name) in child.blinks  # put there by us (older caches)
                    )
                )
                if same_object and (child.opens > 0 or self.content.kernel_owns_sizes) and child.is_reg:
                    assert entry is not None
                    # Changed in place while open: the open version stays whole with its
                    # openers (see _split_open_version); the name gets a new inode below.
                    # So does any changed file while the kernel keeps its own sizes.
                    same_object = same_content(child.origin, fingerprint_tuple(Fingerprint.of(entry.st)))
                if same_object:
                    assert entry is not None
                    self._take_backing_state(child, entry)
                    continue
                self._forget_name(d.ino, name, child)
                if entry is not None:
                    table.link(d.ino, name, self._inode_from_backing(d.ino, entry))
            for name, entry in found.items():
                if table.child(d.ino, name) is None:
                    table.link(d.ino, name, self._inode_from_backing(d.ino, entry))
            self.negative.forget(d.ino)
            table.set_fresh(d)
            table.mark(d)
            await table.commit()
        await self.purge_dropped()

    async def purge_dropped(self) -> None:
        """Delete the content files of inodes whose cached bytes were dropped."""
        dropped, self.dropped_content = self.dropped_content, set()
        for ino in dropped:
            inode = self.table.inodes.get(ino)
            if inode is None or not inode.present:
                await self.content.in_cache(self.content.cache.delete, ino)

    def _take_backing_state(self, inode: Inode, entry: Entry) -> None:
        """A clean inode still at its place: adopt its attributes, drop content that changed."""
        fingerprint = fingerprint_tuple(Fingerprint.of(entry.st))
        if inode.is_reg and not same_content(inode.origin, fingerprint) and inode.present:
            self.content.cached_bytes_estimate -= self.table.drop_present(inode)
            self.dropped_content.add(inode.ino)
            self.invalidator.later_inode(inode.ino)
        elif (inode.mode, inode.uid, inode.gid, inode.mtime_ns) != (
            entry.st.st_mode, entry.st.st_uid, entry.st.st_gid, entry.st.st_mtime_ns
        ):
            self.invalidator.later_inode(inode.ino)
        self.table.update_attrs(inode, entry.st)
        self.table.set_origin(inode, fingerprint)
        inode.target = entry.link_target
        inode.xattrs = None
        if inode.is_dir:
            self.table.set_stale(inode.ino)
        self.table.mark(inode)

    def _forget_name(self, parent: int, name: bytes, child: Inode) -> None:
        """A name that went away on the backing tree goes away here too (no op is logged).

        A directory takes its whole cached subtree with it: nothing may keep a name under a
        directory that is no longer known.
        """
        if child.is_dir:
            self.negative.drop(child.ino)  # the kernel drops them with the directory's entry
            for sub_name, sub_ino in list(self.table.names(child.ino).items()):
                sub = self.table.inodes.get(sub_ino)
                if sub is not None:
                    self._forget_name(child.ino, sub_name, sub)
        self.table.unlink(parent, name)
        self.table.drop_blink(child, (parent, name))
        self.invalidator.later_entry(parent, name)
        if self.table.collectable(child):
            self.table.drop(child)
            self.dropped_content.add(child.ino)

    def _inode_from_backing(self, parent: int, entry: Entry) -> Inode:
        st = entry.st
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            known = self.table.by_backing_ino(st.st_ino)
            if known is not None:
                self.table.add_blink(known, (parent, entry.name))
                return known
        inode = self.table.new_inode(st.st_mode, st.st_uid, st.st_gid, st.st_ctime_ns)
        self.table.update_attrs(inode, st)
        inode.target = entry.link_target
        inode.xattrs = None  # read from the backing tree on first use
        self.table.mark_on_backing(inode, fingerprint_tuple(Fingerprint.of(st)), (parent, entry.name), attrs=False)
        if stat.S_ISDIR(st.st_mode):
            inode.parent = parent
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            self.table.note_backing_ino(st.st_ino, inode)
        return inode

    def _split_open_version(self, inode: Inode) -> None:
        """The backing file changed while `inode` is open (or, with the kernel writeback cache,
        while the kernel keeps its own size of it): the open version stays with those who
        have it open, as after a rename over it on a local disk, and its names go to the new
        file, which a lookup (of the refreshed directory) gives a new inode.

        Dropping the cached bytes instead would let an open reader continue in the new
        version: a torn file. A follower fetched the whole file at open (`_snapshot`); bytes
        this version never fetched now fail with EIO rather than come from the new one.
        """
        log.info("fs: %r changed on the backing tree while open or cached by the kernel; its names "
                 "move to the new file", self.table.backing_path(inode.ino))  # fmt: skip
        for parent, name in list(inode.links):
            self.table.set_stale(parent)
            self._forget_name(parent, name, inode)
        self.table.clear_blinks(inode)  # it is nowhere on the backing tree any more

    async def revalidate(self, inode: Inode) -> bool:
        """Drop clean cached bytes of a file changed on the backing tree. True if dropped."""
        path = self.table.backing_path(inode.ino)
        if path is None or inode.origin is None:
            return False
        try:
            st = await self.content.on_backing(inode, self.backing.lstat)
        except FileNotFoundError:
            # Removed (or renamed) on the backing tree behind us: so is our clean copy.
            for parent, name in list(inode.blinks):
                self.table.set_stale(parent)
                self.invalidator.later_entry(parent, name)
            raise FsError(errno.ENOENT, "removed from the project") from None
        except (OSError, FsError) as exc:
            log.info("fs: cannot revalidate %r, serving the cache: %s", path, exc)
            return False
        if same_content(inode.origin, fingerprint_tuple(Fingerprint.of(st))) or not stat.S_ISREG(st.st_mode):
            return False
        async with self.content.inode_locks(inode.ino):
            if inode.needs_flush:
                return False
            if inode.opens > 0 or self.content.kernel_owns_sizes:
                self._split_open_version(inode)
                raise FsError(errno.ESTALE, "replaced on the project")  # the kernel looks again
            log.info("fs: %r changed on the backing tree; dropping its cached bytes", path)
            await self.content.in_cache(self.content.cache.delete, inode.ino)
            self.content.cached_bytes_estimate -= self.table.drop_present(inode)
            self.table.update_attrs(inode, st)
            self.table.set_origin(inode, fingerprint_tuple(Fingerprint.of(st)))
            await self.table.commit()
        await self.invalidator.invalidate_inode(inode.ino)
        return True
