"""Op replay: the namespace changes of the op log carried to the backing tree, in order.

Each op names directories by inode and is resolved against the *backing view*
(`Inode.blinks`), which each replayed op moves forward; so every op meets the backing tree in
exactly the state the cache had when the op happened. A `create` publishes the file's
*current* content, so a file written then renamed into place (the usual atomic-save
pattern) appears on the backing tree whole.

A part of the flusher (flusher.py), built with what it uses: the WriteBack it calls the
backing tree through, the Conflicts part (an object in the way is diverted or moved aside),
the Publisher (a create publishes its file; changed directories are fsynced at the end of
the pass), the inode table, the contents, the backing tree, the lease gate, the clock and
the config. It owns the bookkeeping of the op being replayed (`_seq`, `_maybe_done`).

Invariants:
- Ops are replayed strictly in order; one that fails stops the replay, which is retried with
  backoff. A write-ahead `in_flight` mark tells, after a crash, that an op may already have
  taken effect, and its handler accepts both outcomes. An op the project can no longer take
  (TREE_CHANGED errnos) is recorded as a conflict and skipped.
- safefs's own renames, links and unlinks move a file's ctime: its fingerprint is re-recorded
  after each (when the stat just before was the one recorded).

Threading: trio thread only; backing calls through WriteBack.call.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from safefs import records
from safefs.backing import Backing, Fingerprint
from safefs.clock import Clock
from safefs.config import MountConfig
from safefs.conflicts import Conflicts
from safefs.content import Content, fingerprint_tuple, same_content
from safefs.errors import SafefsError
from safefs.inodes import ROOT_INO, Inode, InodeTable
from safefs.ports import WriteGate
from safefs.publish import Publisher
from safefs.writeback import BPath, Receipt, WriteBack, fingerprint_of, utc_text

log = logging.getLogger(__name__)

_CREATED_TOO = "made in the mount while the project got another object of that name"
CREATE_PATIENCE = 12  # see Replayer._ripe
# Errors that mean "the project is not what the op log expects", not "NFS is unwell".
TREE_CHANGED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR})


class Replayer:
    """Replaying the op log against the backing tree. Owns the bookkeeping of the op being
    replayed: its sequence number and whether it may have taken effect before a crash."""

    def __init__(
        self,
        *,
        writeback: WriteBack,
        resolver: Conflicts,
        publisher: Publisher,
        table: InodeTable,
        content: Content,
        backing: Backing,
        gate: WriteGate,
        clock: Clock,
        config: MountConfig,
    ) -> None:
        self.writeback = writeback
        self.resolver = resolver
        self.publisher = publisher
        self.table = table
        self.content = content
        self.backing = backing
        self.gate = gate
        self.clock = clock
        self.config = config
        self._maybe_done = False  # the op being replayed may have taken effect before a crash
        self._seq = 0  # the op being replayed

    async def replay_ops(self, receipt: Receipt, older_than: float | None) -> None:
        """Replay the log in order; with `older_than`, stop at the first op younger than it."""
        for seq in sorted(self.table.ops):
            op = self.table.ops.get(seq)
            if op is None:
                continue  # a create the object's removal cancelled meanwhile
            if older_than is not None and not self._ripe(seq, op, older_than):
                break
            await self._replay_one(seq, op)
            receipt.ops += 1
            for ino in op.inodes:  # an inode only the op kept alive may go now
                inode = self.table.inodes.get(ino)
                if inode is not None:
                    await self.content.collect(inode)
            # The backing tree just stamped the directory with its own mtime; publish ours
            # (what the user saw, possibly set explicitly by tar or rsync) afterwards.
            for dir_ino in op.dirs:
                d = self.table.inodes.get(dir_ino)
                if d is not None and d.blinks or dir_ino == ROOT_INO:
                    self.table.mark_attrs_dirty(self.table.inodes[dir_ino])
            await self.table.commit()

    async def _replay_one(self, seq: int, op: records.Op) -> None:
        """Replay one op, with a write-ahead mark so a crash mid-op is recognised afterwards.

        `in_flight` names the op being replayed; it is committed before the backing tree is
        touched and cleared (with the op) after. At start-up an op still marked in flight may
        or may not have taken effect, and its handler accepts both (`self._maybe_done`).
        """
        self.gate.require_publishable()
        self._seq = seq
        self._maybe_done = self.table.meta.get("in_flight") == seq
        if not self._maybe_done:
            self.table.set_meta("in_flight", seq)
            await self.table.commit()
        self.table.view_busy = True
        try:
            await getattr(self, "_op_" + op.kind)(*op.fields())
        except OSError as exc:
            if exc.errno not in TREE_CHANGED and exc.errno != errno.ELOOP:
                exc.safefs_op = op.kind  # type: ignore[attr-defined]
                raise
            if isinstance(op, records.Create) and not await self._rescue_new_file(op.ino, op.parent):
                exc.safefs_op = op.kind  # type: ignore[attr-defined]
                raise  # the directory is there: a passing failure (our staging?), retry
            # The project changed behind our back so that this op cannot apply (its source or
            # directory is gone, say). Skipping it loses no data: file contents are published
            # by inode, at wherever the backing view says they are, or kept as conflict copies.
            log.warning("flush: conflict: cannot replay %s (%s); the project changed behind us", op.kind, exc)
            self.resolver.add({"op": op.kind, "error": str(exc), "why": "the project changed so that the mount's "
                                   f"{op.kind} cannot apply", "time": utc_text(self.clock.wall())})  # fmt: skip
        finally:
            self.table.view_busy = False
            self.table.view_version += 1
        self.table.drop_op(seq)
        self.table.set_meta("in_flight", 0)

    async def _rescue_new_file(self, ino: int, parent: int) -> bool:
        """A new file whose directory vanished from the project behind our back: publish it
        as a conflict copy at the top of the project. False if its directory is still
        there (then the failure was something else, and the op is retried)."""
        dpath = self.writeback.dir_path(parent)
        if dpath is not None and await self.writeback.call(self.backing.is_dir, dpath):
            return False
        inode = self.table.inodes.get(ino)
        if inode is not None and inode.is_reg and inode.links:
            name = min(inode.links)[1]
            self.table.mark_existing(inode)
            await self.resolver.publish_conflict(inode, (name,))
        return True

    async def settle(self) -> None:
        """At start-up, finish the op a crash interrupted, so the backing view is exact.

        Until then reads could look for a file where the backing tree no longer has it.
        """
        seq = self.table.meta.get("in_flight")
        if seq and seq in self.table.ops:
            try:
                await self._replay_one(seq, self.table.ops[seq])
                await self.table.commit()
            except (OSError, SafefsError) as exc:
                log.warning("flush: could not finish the interrupted op %d yet: %s", seq, exc)

    def _ripe(self, seq: int, op: records.Op, older_than: float) -> bool:
        """May the background flush replay this op now?

        An op waits for the write-back delay. A `create` publishes the file's content, so it
        also waits until the file itself is quiet, lest a half-written file appear on the
        backing tree; but not for ever (a log file written for hours must not hold back the
        whole log): after CREATE_PATIENCE write-back delays it goes anyway.
        """
        happened = self.table.op_times.get(seq, 0.0)
        if happened > older_than:
            return False
        if isinstance(op, records.Create):
            inode = self.table.inodes.get(op.ino)
            patience = CREATE_PATIENCE * self.config.writeback_delay
            if inode is not None and inode.changed_at > older_than and happened > older_than - patience:
                return False
        return True

    async def _op_mkdir(self, parent: int, name: bytes, ino: int) -> None:
        inode = self.table.inodes.get(ino)
        dpath = self.writeback.dir_path(parent)
        if inode is None or dpath is None:
            return  # its parent never reached the backing tree
        # Even a directory removed since must be made: later ops may move things through it.
        path = dpath + (name,)
        attrs = await self.writeback.attrs_of(inode)
        try:
            st = await self.writeback.call(self.backing.mkdir, path, attrs)
        except FileExistsError:
            st = await self.writeback.call(self.backing.lstat, path)
            if not stat.S_ISDIR(st.st_mode) or (inode.blinks and not self._maybe_done):
                copy = await self.resolver.divert(self._seq, parent, name, inode, _CREATED_TOO)
                return await self._op_mkdir(parent, copy, ino)
        # The fingerprint, so a refresh knows it as ours.
        self.table.mark_on_backing(inode, fingerprint_tuple(Fingerprint.of(st)), (parent, name), attrs=False)
        self.publisher.changed_dir(dpath)

    async def _op_create(self, parent: int, name: bytes, ino: int) -> None:
        inode = self.table.inodes.get(ino)
        dpath = self.writeback.dir_path(parent)
        if inode is None or not inode.links:
            return  # unlinked before it reached the backing tree: nothing to create
        if dpath is None:
            # Its directory never reached the project (the project changed behind our back so
            # that it could not be made): keep the file as a conflict copy at the top.
            await self._rescue_new_file(ino, parent)
            return
        path = dpath + (name,)
        if inode.is_reg:
            if not self._maybe_done and await self.writeback.call(self.backing.exists, path):
                # Someone else's object: never publish over it.
                name = await self.resolver.divert(self._seq, parent, name, inode, _CREATED_TOO)
                path = dpath + (name,)
            await self.publisher.publish_file(inode, path, (parent, name), atomic=True, receipt=None)
        else:
            attrs = await self.writeback.attrs_of(inode)
            try:
                if inode.is_link:
                    st = await self.writeback.call(self.backing.symlink, inode.target, path, attrs)
                else:
                    st = await self.writeback.call(self.backing.mknod, path, inode.mode, inode.rdev, attrs)
            except FileExistsError:
                if not await self._made_by_us(inode, path):
                    copy = await self.resolver.divert(self._seq, parent, name, inode, _CREATED_TOO)
                    return await self._op_create(parent, copy, ino)
                st = await self.writeback.call(self.backing.lstat, path)
            self.table.mark_on_backing(inode, fingerprint_tuple(Fingerprint.of(st)), (parent, name), attrs=True)
        self.publisher.changed_dir(dpath)

    async def _made_by_us(self, inode: Inode, path: BPath) -> bool:
        """After a crash, is the object at `path` the one this op created?"""
        if not self._maybe_done:
            return False
        st = await self.writeback.call(self.backing.lstat, path)
        if stat.S_IFMT(st.st_mode) != stat.S_IFMT(inode.mode):
            return False
        if inode.is_link:
            return bool(await self.writeback.call(self.backing.readlink, path) == inode.target)
        return True

    async def _op_link(self, ino: int, parent: int, name: bytes) -> None:
        inode = self.table.inodes.get(ino)
        dpath = self.writeback.dir_path(parent)
        src = self.table.backing_path(ino) if inode is not None else None
        if inode is None or dpath is None or src is None:
            return
        path = dpath + (name,)
        try:
            self._moved_by_us(inode, *await self.writeback.call(self.backing.link, src, path))
        except FileExistsError:
            st = await self.writeback.call(self.backing.lstat, path)
            src_st = await self.writeback.call(self.backing.lstat, src)
            if st.st_ino != src_st.st_ino:
                why = "linked in the mount while the project got another object of that name"
                return await self._op_link(ino, parent, await self.resolver.divert(self._seq, parent, name, inode, why))
            else:
                self._linked_before_crash(inode, st)
        self.table.add_blink(inode, (parent, name))
        self.publisher.changed_dir(dpath)

    async def _changed_behind_us(self, inode: Inode | None, path: BPath) -> bool:
        """Is the regular file at `path` no longer the one safefs last saw there?"""
        if inode is None or not inode.is_reg or inode.origin is None or inode.new:
            return False
        if not await self.writeback.call(self.backing.exists, path):
            return False
        # The same test as before a publish, so our own publish cut short by a crash (its
        # fingerprint never recorded) is recognised here too.
        return await self.publisher.unchanged_behind_us(inode, path) is None

    async def _exchanged_already(self, src: BPath, dst: BPath) -> tuple[bool, os.stat_result]:
        """An exchange cannot tell by itself whether it ran; remember the inodes it swaps.
        Also returns the stat of what is at `dst` now."""
        a = (await self.writeback.call(self.backing.lstat, src)).st_ino
        dst_st = await self.writeback.call(self.backing.lstat, dst)
        b = dst_st.st_ino
        before = self.table.meta.get("exchange")
        if self._maybe_done and before is not None and [self._seq, b, a] == list(before):
            return True, dst_st
        self.table.set_meta("exchange", [self._seq, a, b])
        await self.table.commit()
        return False, dst_st

    async def _keep_content(self, inode: Inode | None) -> None:
        """Before a file loses a name on the backing tree, fetch what an open fd may still read."""
        if inode is not None and inode.is_reg and inode.opens > 0 and len(inode.blinks) <= 1:
            await self.content.fill(inode)

    async def _forget_blink(self, inode: Inode | None, link: tuple[int, bytes]) -> None:
        if inode is None:
            return
        self.table.drop_blink(inode, link)
        await self.content.collect(inode)

    async def _op_unlink(self, parent: int, name: bytes, ino: int) -> None:
        inode = self.table.inodes.get(ino)
        dpath = self.writeback.dir_path(parent)
        if dpath is None:
            return
        if inode is not None and (parent, name) not in inode.blinks:
            return  # this name never reached the backing tree
        if inode is None:
            return
        await self._keep_content(inode)
        if await self._changed_behind_us(inode, dpath + (name,)):
            why = "changed in the project, removed in the mount"
            await self.resolver.move_aside(dpath + (name,), parent, why)  # their version stays, beside
        else:
            try:
                before = await self.writeback.call(self.backing.unlink, dpath + (name,))
            except FileNotFoundError:
                before = None  # replayed before a crash, or removed behind our back
            if len(inode.blinks) > 1:  # another name of it stays on the project
                self.table.drop_blink(inode, (parent, name))
                await self._other_links_moved(inode, before)
        await self._forget_blink(inode, (parent, name))
        self.publisher.changed_dir(dpath)

    async def _op_rmdir(self, parent: int, name: bytes, ino: int) -> None:
        inode = self.table.inodes.get(ino)
        dpath = self.writeback.dir_path(parent)
        if dpath is None or inode is None or (parent, name) not in inode.blinks:
            return
        path = dpath + (name,)
        try:
            await self.writeback.call(self.backing.rmdir, path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            why = "filled in the project, removed in the mount"
            await self.resolver.move_aside(path, parent, why)  # someone put files there behind our back: keep them
        await self._forget_blink(inode, (parent, name))
        self.publisher.changed_dir(dpath)

    async def _op_rename(
        self, p_old: int, n_old: bytes, p_new: int, n_new: bytes, flags: int, ino: int, replaced: int
    ) -> None:
        src_inode = self.table.inodes.get(ino)
        dst_inode = self.table.inodes.get(replaced) if replaced else None
        d_old, d_new = self.writeback.dir_path(p_old), self.writeback.dir_path(p_new)
        if src_inode is None or (p_old, n_old) not in src_inode.blinks or d_old is None or d_new is None:
            # The source never reached the backing tree; the replaced object must still go.
            if dst_inode is not None and d_new is not None and (p_new, n_new) in dst_inode.blinks:
                if not flags & 2:
                    await self._op_unlink(p_new, n_new, replaced) if not dst_inode.is_dir else \
                        await self._op_rmdir(p_new, n_new, replaced)  # fmt: skip
            return
        src, dst = d_old + (n_old,), d_new + (n_new,)
        exchange = bool(flags & 2)
        dst_known = dst_inode is not None and (p_new, n_new) in dst_inode.blinks
        done_before_crash = (
            self._maybe_done
            and not exchange
            and not await self.writeback.call(self.backing.exists, src)
            and await self.writeback.call(self.backing.exists, dst)
        )  # the rename landed, the kill came before we recorded it: nothing is a conflict
        if not exchange and not done_before_crash:
            await self._keep_content(dst_inode)
            if dst_known and await self._changed_behind_us(dst_inode, dst):
                # Their version keeps the name; ours goes beside it.
                assert dst_inode is not None
                await self._forget_blink(dst_inode, (p_new, n_new))
                why = "changed in the project, replaced by a rename in the mount"
                n_new = await self.resolver.divert(self._seq, p_new, n_new, src_inode, why)
                dst, dst_known = d_new + (n_new,), False
        if exchange and not dst_known:
            # The other side never reached the backing tree: a plain move is what remains.
            exchange = False
        rename_flags = 2 if exchange else (0 if dst_known else 1)
        # What the rename swaps or replaces: its ctime moves too (if it has other links).
        other_before = None
        if exchange:
            done, other_before = await self._exchanged_already(src, dst)
            rename_flags = -1 if done else rename_flags
        elif dst_known and len(dst_inode.blinks) > 1:  # type: ignore[union-attr]
            other_before = await self.writeback.call(self.backing.lstat, dst)
        if done_before_crash:
            rename_flags = -1
        try:
            if rename_flags >= 0:
                self._moved_by_us(src_inode, *await self.writeback.call(self.backing.rename, src, dst, rename_flags))
            else:
                self._linked_before_crash(src_inode, await self.writeback.call(self.backing.lstat, dst))
        except FileNotFoundError:
            if await self.writeback.call(self.backing.exists, src):
                raise  # the destination directory is missing: a real inconsistency
            if not await self.writeback.call(self.backing.exists, dst):
                raise  # the source vanished behind our back and never arrived
            # replayed already before a crash: just record where things are
            self._linked_before_crash(src_inode, await self.writeback.call(self.backing.lstat, dst))
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
            # The project holds another object there (or filled the directory we replace):
            # it keeps the name, ours goes beside it.
            if dst_known:
                await self._forget_blink(dst_inode, (p_new, n_new))
                dst_known = False
            why = "renamed in the mount onto a name the project gave another object"
            n_new = await self.resolver.divert(self._seq, p_new, n_new, src_inode, why)
            dst = d_new + (n_new,)
            self._moved_by_us(src_inode, *await self.writeback.call(self.backing.rename, src, dst, 1))
        self.table.drop_blink(src_inode, (p_old, n_old))
        self.table.add_blink(src_inode, (p_new, n_new), first=True)
        if dst_inode is not None and dst_known:
            self.table.drop_blink(dst_inode, (p_new, n_new))
            if exchange:
                self.table.add_blink(dst_inode, (p_old, n_old), first=True)
            else:
                await self._forget_blink(dst_inode, (p_new, n_new))
            await self._other_links_moved(dst_inode, other_before if rename_flags >= 0 else None)
        self.publisher.changed_dir(d_old)
        self.publisher.changed_dir(d_new)

    def _moved_by_us(self, inode: Inode | None, before: os.stat_result, after: os.stat_result) -> None:
        """safefs itself just renamed or linked this object on the project, which moved its
        ctime: if it was what we had recorded just before, record what it is now."""
        if inode is not None and inode.origin is not None and same_content(inode.origin, fingerprint_of(before)):
            self.table.set_origin(inode, fingerprint_of(after))

    def _linked_before_crash(self, inode: Inode | None, st: os.stat_result) -> None:
        """The op had already taken effect when the daemon died, before the fingerprint after
        it was recorded: only the ctime may differ, and that change was ours."""
        if self._maybe_done and inode is not None and inode.origin is not None:
            if tuple(inode.origin[:3]) == fingerprint_of(st)[:3]:
                self.table.set_origin(inode, fingerprint_of(st))

    async def _other_links_moved(self, inode: Inode | None, before: os.stat_result | None) -> None:
        """A name of `inode` went (replaced or unlinked by us): re-record the fingerprint from
        a name it still has, whose ctime moved with it."""
        if inode is None or not inode.is_reg or not inode.blinks:
            return
        path = self.table.backing_path(inode.ino)
        if path is None:
            return
        try:
            after = await self.writeback.call(self.backing.lstat, path)
        except OSError:
            return  # the publish or the next op sees what is there
        if before is not None:
            self._moved_by_us(inode, before, after)
        else:
            self._linked_before_crash(inode, after)
