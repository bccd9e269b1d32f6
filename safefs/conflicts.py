"""Conflicts: what write-back does when the project changed behind safefs's back.

A part of the flusher (flusher.py), built with what it uses: the WriteBack it calls the
backing tree through, the inode table, the cache and contents, the backing tree, the clock,
the invalidator and the negative entries it corrects, and the host name copies are named
after. It owns the list of conflicts found (`found`, which status shows) and how many of
them a sync receipt listed already; publish and replay add theirs through `add`.

Invariants:
- Nothing on the backing tree is overwritten unless safefs put it there: an object in the way
  of a replayed op keeps its name and ours goes beside it (`divert`); an object the mount
  removed that changed on the project is renamed aside (`move_aside`); a file changed on
  both sides is published as a copy (`publish_conflict`). Copies are named
  `NAME.safefs-conflict-<host>-<time>`.
- A copy's name is recorded in the pending ops and the mount's view in one commit before
  anything is written to the project, so a replay after a crash uses the same name.
- Every conflict is listed in status and, once, in a sync receipt (`report_conflicts`).

Threading: trio thread only; backing calls through WriteBack.call.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import time
from typing import Any

from safefs import records
from safefs.backing import Backing, Fingerprint
from safefs.cache import ContentCache
from safefs.clock import Clock
from safefs.content import Content, fingerprint_tuple
from safefs.inodes import ROOT_INO, Inode, InodeTable
from safefs.negative import NegativeNames
from safefs.ports import Invalidator
from safefs.writeback import BPath, WriteBack, utc_text

log = logging.getLogger(__name__)


def _with_copy_name(op: records.Op, parent: int, name: bytes, ino: int, copy: bytes) -> records.Op:
    """`op` with inode `ino`'s name (parent, name) replaced by (parent, copy)."""
    if isinstance(op, (records.Create, records.Mkdir, records.Unlink, records.Rmdir)):
        if (op.parent, op.name, op.ino) == (parent, name, ino):
            return dataclasses.replace(op, name=copy)
    elif isinstance(op, records.Link):
        if (op.ino, op.parent, op.name) == (ino, parent, name):
            return dataclasses.replace(op, name=copy)
    elif isinstance(op, records.Rename):
        if (op.p_old, op.n_old) == (parent, name) and ino in (op.src, op.dst):  # it moves (or swaps) away
            op = dataclasses.replace(op, n_old=copy)
        if (op.p_new, op.n_new, op.src) == (parent, name, ino):  # it arrives here
            op = dataclasses.replace(op, n_new=copy)
    return op


class Conflicts:
    """Keeping both versions when the project and the mount disagree. Owns the list of
    conflicts found (`found`) and how many of them a sync receipt listed already."""

    def __init__(
        self,
        *,
        writeback: WriteBack,
        table: InodeTable,
        cache: ContentCache,
        content: Content,
        backing: Backing,
        clock: Clock,
        invalidator: Invalidator,
        negative: NegativeNames,
        host_name: str,
    ) -> None:
        self.writeback = writeback
        self.table = table
        self.cache = cache
        self.content = content
        self.backing = backing
        self.clock = clock
        self.invalidator = invalidator
        self.negative = negative
        self.host_name = host_name
        self.found: list[dict[str, Any]] = []  # every conflict, in order (status lists them)
        self._reported = 0  # how many of them a sync receipt listed already

    def _conflict_name(self, name: bytes) -> bytes:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self.clock.wall()))  # UTC
        host = self.host_name.encode(errors="replace").replace(b"/", b"_")
        return name[:150] + b".safefs-conflict-" + host[:40] + b"-" + stamp.encode()

    async def _free_conflict_path(self, path: BPath, parent: int | None = None) -> BPath:
        """A conflict name beside `path` that nothing uses yet (nor, with `parent`, the mount)."""
        base = self._conflict_name(path[-1])
        for n in range(10_000):
            candidate = path[:-1] + (base if n == 0 else base + b"-%d" % n,)
            if parent is not None and self.table.child(parent, candidate[-1]) is not None:
                continue
            if not await self.writeback.call(self.backing.exists, candidate):
                return candidate
        raise FileExistsError(errno.EEXIST, "no free conflict name", os.fsdecode(b"/".join(path)))

    def _record_conflict(self, path: BPath, copy: BPath, why: str) -> None:
        log.warning("flush: conflict: %r: %s; the mount's version is %r", path, why, copy)
        self.found.append({"path": os.fsdecode(b"/".join(path)), "kept_as": os.fsdecode(b"/".join(copy)),
                               "copy_holds": "the mount's version", "why": why,
                               "time": utc_text(self.clock.wall())})  # fmt: skip

    async def divert(self, op_seq: int, parent: int, name: bytes, inode: Inode, why: str) -> bytes:
        """The project has its own object at (parent, name), where the op being replayed
        (`op_seq`) would put the mount's `inode`: theirs keeps the name, ours goes beside it as a conflict copy.

        The copy's name goes into this op and the later ones naming it, and into the mount's
        view, in one commit before anything is written to the project: a replay after a crash
        uses the same name. Returns that name.
        """
        dpath = self.writeback.dir_path(parent)
        assert dpath is not None
        copy = (await self._free_conflict_path(dpath + (name,), parent))[-1]
        for seq in sorted(s for s in self.table.ops if s >= op_seq):
            op = self.table.ops[seq]
            amended = _with_copy_name(op, parent, name, inode.ino, copy)
            if amended != op:
                self.table.amend_op(seq, amended)
        moved = self.table.child(parent, name) == inode.ino
        if moved:  # the name shows the project's object (after a refresh); ours the copy
            self.table.unlink(parent, name)
            self.table.link(parent, copy, inode)
            self.negative.made(parent, copy)
        self.table.set_stale(parent)
        self._record_conflict(dpath + (name,), dpath + (copy,), why)
        await self.table.commit()
        if moved:
            await self.invalidator.invalidate_entry(parent, name)
            await self.invalidator.invalidate_entry(parent, copy)
        return copy

    async def move_aside(self, path: BPath, parent: int | None, why: str) -> BPath:
        """Rename an object the mount removed, which changed on the project, out of the way,
        keeping it. (An object in the way of one of ours keeps its name: see `divert`.)

        With `parent` (the directory's inode), the directory is marked stale so the kept
        object shows up in the mount too.
        """
        if parent is not None:
            self.table.set_stale(parent)
        while True:
            candidate = await self._free_conflict_path(path)
            try:
                await self.writeback.call(self.backing.rename, path, candidate, 1)  # RENAME_NOREPLACE
                self.writeback.changed(path[:-1])
                break
            except FileExistsError:
                continue  # taken meanwhile: pick another
        log.warning("flush: conflict: kept %s as %s", os.fsdecode(b"/".join(path)), os.fsdecode(b"/".join(candidate)))
        self.found.append(
            {"path": os.fsdecode(b"/".join(path)), "kept_as": os.fsdecode(b"/".join(candidate)),
             "copy_holds": "the project's version", "why": why, "time": utc_text(self.clock.wall())}
        )  # fmt: skip
        return candidate

    async def publish_conflict(self, inode: Inode, path: BPath) -> None:
        """The backing file changed behind safefs's back: keep both versions side by side."""
        parent = inode.blinks[0][0] if inode.blinks else ROOT_INO
        if path[:-1] and not await self.writeback.call(self.backing.is_dir, path[:-1]):
            # Its directory is gone too (removed or renamed behind our back): keep our version
            # at the top of the project rather than nowhere.
            path, parent = (path[-1],), ROOT_INO
        aside = await self._free_conflict_path(path)
        name = aside[-1]
        attrs = await self.writeback.attrs_of(inode)
        async with self.writeback.pinned(inode.ino) as fd:
            try:
                await self.content.fill(inode)
            except (OSError, Exception):  # the original may be gone; publish what we have
                pass
            staging = self.writeback.staging()
            st = await self.writeback.call(self.backing.publish_atomic, aside, staging, fd, inode.size, attrs)
        self.writeback.changed(aside[:-1])
        self._record_conflict(path, aside, "changed in the mount, and changed, replaced or removed in the project")
        # Our version now lives under the conflict name; the original name shows the backing
        # tree's version again (or goes, if the backing tree no longer has it).
        copy = self.table.new_inode(stat.S_IFREG | stat.S_IMODE(inode.mode), inode.uid, inode.gid, st.st_ctime_ns)
        self.table.update_attrs(copy, st)
        self.table.mark_on_backing(copy, fingerprint_tuple(Fingerprint.of(st)), (parent, name), attrs=False)
        copy.xattrs = dict(attrs.xattrs)
        if parent in self.table.inodes and self.table.child(parent, name) is None:
            self.table.link(parent, name, copy)
        current_path = self.table.backing_path(inode.ino) if inode.blinks else None
        try:
            cur = await self.writeback.call(self.backing.lstat, current_path) if current_path else None
        except (FileNotFoundError, NotADirectoryError):
            cur = None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            cur = None
        async with self.content.inode_locks(inode.ino):
            await self.content.in_cache(self.cache.delete, inode.ino)
            self.table.discard_changes(inode)
            if self.content.kernel_owns_sizes:
                cur = None  # the kernel keeps this inode's size: the name gets a new inode
            if cur is not None and stat.S_ISREG(cur.st_mode):
                self.table.update_attrs(inode, cur)
                self.table.set_origin(inode, fingerprint_tuple(Fingerprint.of(cur)))
            else:
                inode.size = 0
                self.table.set_origin(inode, None)
        if cur is None or not stat.S_ISREG(cur.st_mode):
            for link_parent, link_name in list(inode.links):
                self.table.unlink(link_parent, link_name)
                if self.content.kernel_owns_sizes:
                    self.table.set_stale(link_parent)  # a refresh finds theirs
                await self.invalidator.invalidate_entry(link_parent, link_name)
            self.table.clear_blinks(inode)
            await self.content.collect(inode)
        await self.invalidator.invalidate_inode(inode.ino)
        if parent in self.table.inodes:
            await self.invalidator.invalidate_entry(parent, name)

    def add(self, conflict: dict[str, Any]) -> None:
        """A conflict another part of write-back ran into (an op or attributes that cannot apply)."""
        self.found.append(conflict)

    def report_conflicts(self) -> list[dict[str, Any]]:
        """The conflicts since the last call: a sync receipt lists each one once."""
        new = self.found[self._reported :]
        self._reported = len(self.found)
        return new
