"""The journal's format (issue 10, items 3, 4 and 7), through the filesystem without a kernel.

- A cache dir left by the previous format (format 1: ranges inside each inode's record, no
  version) is migrated on mount, and every change it held still reaches the project.
- A cache dir of a format this version does not know is refused with a one-line message.
- Recording a write touches a few extent keys, not every range of the file.
- An fsync flushes the journal and the file once each, and not at all with nothing new; an
  overwrite of bytes already recorded dirty commits nothing, and its fdatasync flushes the
  file alone.
"""

from __future__ import annotations

import errno
import marshal
import os
import struct
import threading
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio

from safefs import cache as cache_module
from safefs import ranges, records
from safefs.errors import CacheFull, Refused
from safefs.journal import Journal
from tests.fs.conftest import Stack, fails_with, files, src_tree
from tests.helpers import wait_until_async

_U64 = struct.Struct(">Q")


def _format_1_inode(rec: records.InodeRecord, present: list[list[int]], dirty: list[list[int]]) -> dict[str, Any]:
    """An inode record as format 1 encoded it (inodes.Inode.record before the version)."""
    return {
        "m": rec.mode, "u": rec.uid, "g": rec.gid, "s": rec.size, "r": rec.rdev,
        "a": rec.atime_ns, "t": rec.mtime_ns, "c": rec.ctime_ns, "l": rec.target,
        "x": rec.xattrs, "o": rec.origin, "p": present, "d": dirty,
        "ad": rec.attr_dirty, "n": rec.new, "ls": rec.listed, "pa": rec.parent,
        "b": [list(b) for b in rec.blinks], "pb": rec.publishing, "lo": rec.low_size,
    }  # fmt: skip


def rewrite_as_format_1(cache_dir: Path) -> int:
    """Re-encode a (closed) cache dir's journal as format 1 wrote it; return its dirty bytes."""
    env = lmdb.open(str(cache_dir / "journal"), max_dbs=8, subdir=True)
    dirty_bytes = 0
    try:
        inodes, extents, ops, meta = (env.open_db(n) for n in (b"inodes", b"extents", b"ops", b"meta"))
        with env.begin(write=True) as txn:
            ranges: dict[int, dict[bytes, list[list[int]]]] = {}
            for k, v in txn.cursor(db=extents):
                ino, which, start = records.decode_extent_key(k)
                ranges.setdefault(ino, {}).setdefault(which, []).append([start, records.decode_end(v)])
            for k, v in list(txn.cursor(db=inodes)):
                ino = _U64.unpack(k)[0]
                own = ranges.get(ino, {})
                dirty_bytes += sum(e - s for s, e in own.get(records.DIRTY, []))
                old = _format_1_inode(records.decode_inode(v), own.get(records.PRESENT, []), own.get(records.DIRTY, []))
                txn.put(k, marshal.dumps(old), db=inodes)
            txn.drop(extents, delete=True)
            for k, v in list(txn.cursor(db=ops)):
                op = records.decode_op(v)
                txn.put(k, marshal.dumps((op.kind, *op.fields())), db=ops)  # a plain tuple, kind first
            txn.delete(records.FORMAT_KEY.encode(), db=meta)
    finally:
        env.close()
    return dirty_bytes


async def test_a_format_1_cache_dir_is_migrated_and_loses_nothing(stack: Stack) -> None:
    big = bytes(range(256)) * 1200  # 300 KiB already on the project, partly fetched
    (stack.src / "old.bin").write_bytes(big)
    (stack.src / "gone").write_bytes(b"to be removed")
    await stack.write("old.bin", b"X" * 4096, 100_000)
    await stack.write("old.bin", b"Y" * 10, 250_000)
    await stack.put("new.txt", b"made in the cache")
    await stack.mkdir("d")
    await stack.rename("new.txt", "d/new.txt")
    await stack.unlink("gone")
    await stack.link("d/new.txt", "hard")
    assert stack.table.ops and any(i.dirty for i in stack.table.inodes.values())

    # Killed with all that pending; the cache dir is then found as the old version left it.
    stack._drop()
    stack._close_files()
    assert rewrite_as_format_1(stack.cache_dir) >= 4096 + 10 + len(b"made in the cache")
    await stack.start()
    assert stack.table.meta[records.FORMAT_KEY] == records.FORMAT

    expected = bytearray(big)
    expected[100_000:104_096] = b"X" * 4096
    expected[250_000:250_010] = b"Y" * 10
    assert await stack.read("old.bin") == bytes(expected)
    await stack.flusher.sync(timeout=30)
    assert src_tree(stack.src) == files(
        **{"old.bin": bytes(expected), "d": None, "d/new.txt": b"made in the cache", "hard": b"made in the cache"}
    )
    assert not stack.table.ops and not any(i.dirty for i in stack.table.inodes.values())

    # Migrated once: the next start finds the current format and the same, clean, state.
    await stack.crash_and_replay()
    assert await stack.read("hard") == b"made in the cache"


def test_a_journal_of_an_unknown_format_is_refused(tmp_path: Path) -> None:
    Journal.open(tmp_path).close()
    env = lmdb.open(str(tmp_path / "journal"), max_dbs=8, subdir=True)
    try:
        with env.begin(write=True) as txn:
            txn.put(records.FORMAT_KEY.encode(), marshal.dumps(records.FORMAT + 1), db=env.open_db(b"meta", txn=txn))
    finally:
        env.close()
    with pytest.raises(Refused) as info:
        Journal.open(tmp_path)
    assert f"format {records.FORMAT + 1}" in info.value.message and "\n" not in info.value.message
    assert "safefs sync" in (info.value.hint or "")


async def test_recording_a_write_touches_a_few_keys_however_many_ranges_the_file_has(stack: Stack) -> None:
    await stack.create("f")
    fh = await stack.open("f", os.O_WRONLY)
    for i in range(2000):  # 2,000 separate dirty ranges
        await stack.fs.write(fh, i * 100, b"w" * 10)
    inode = await stack.resolve("f")
    assert len(inode.dirty) == 2000

    batches: list[Any] = []
    real_commit = stack.journal.commit

    def spy(batch: Any) -> None:
        batches.append(batch)
        real_commit(batch)

    stack.journal.commit = spy  # type: ignore[method-assign]
    await stack.fs.write(fh, 50_005, b"m" * 100)  # joins two ranges into one
    await stack.fs.write(fh, 1_000_000, b"e")  # a range of its own
    stack.journal.commit = real_commit  # type: ignore[method-assign]
    # Each write: the range made and the (at most two) ranges it absorbed, present and dirty.
    assert batches and all(len(b.extents) <= 6 for b in batches), [b.extents for b in batches]
    assert all(len(records.encode_inode(r)) < 200 for b in batches for r in b.inodes.values() if r)

    # What the keys say is what memory says, also after a truncate (a cut recorded by
    # comparing whole sets).
    await stack.fs.release(fh)
    assert_journal_has(stack, inode)
    await stack.truncate("f", 100_050)
    assert len(inode.dirty) == 1000
    assert_journal_has(stack, inode)


def subtract_set(rs: ranges.RangeSet, other: ranges.RangeSet) -> ranges.RangeSet:
    for s, e in other:
        rs = ranges.subtract(rs, s, e)
    return rs


def assert_journal_has(stack: Stack, inode: Any) -> None:
    stored = stack.journal.load().extents.get(inode.ino, {})
    assert stored.get(records.PRESENT, []) == list(inode.present)
    assert stored.get(records.DIRTY, []) == list(inode.dirty)


async def test_fsync_flushes_the_journal_and_the_file_at_once_and_only_when_needed(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    await stack.create("f")
    calls: list[str] = []
    together = threading.Barrier(2, timeout=10)  # broken if one flush waits for the other
    real_sync, real_fsync = stack.journal.sync, os.fdatasync

    def meet(name: str) -> None:
        try:
            together.wait()
            calls.append(name)
        except threading.BrokenBarrierError:
            calls.append(name + " alone")

    def journal_sync() -> None:
        meet("journal")
        real_sync()

    def file_fsync(fd: int) -> None:
        meet("file")
        real_fsync(fd)

    stack.journal.sync = journal_sync  # type: ignore[method-assign]
    monkeypatch.setattr(cache_module.os, "fdatasync", file_fsync)
    fh = await stack.open("f", os.O_WRONLY)
    try:
        await stack.fs.write(fh, 0, b"data")
        await stack.fs.fsync(fh)
        assert sorted(calls) == ["file", "journal"]
        calls.clear()
        await stack.fs.fsync(fh)  # nothing new: no flush at all
        assert calls == []
        await stack.fs.write(fh, 4, b"more")
        together.reset()
        await stack.fs.fsync(fh)
        assert sorted(calls) == ["file", "journal"]
    finally:
        stack.journal.sync = real_sync  # type: ignore[method-assign]
        await stack.fs.release(fh)


async def test_a_failed_cache_write_takes_back_its_ranges_in_memory_and_journal(stack: Stack) -> None:
    await stack.create("f", b"a" * 100)
    await stack.write("f", b"b" * 10, 200)  # ranges [0, 210) present, [0, 100) + [200, 210) dirty
    inode = await stack.resolve("f")
    before = (inode.present, inode.dirty, inode.size)

    def full(*_: Any) -> None:
        raise CacheFull("cache: local disk full")

    real_pwrite = stack.cache.pwrite
    stack.cache.pwrite = full  # type: ignore[method-assign]
    try:
        for offset in (95, 150, 300):  # joins ranges; fills the gap; grows the file
            dirty = inode.dirty
            assert await fails_with(stack.write("f", b"c" * 10, offset)) == errno.ENOSPC
            assert (inode.present, inode.size) == (before[0], before[2])
            # Clean bytes under the write were marked dirty before it (and stay so: harmless).
            extra = subtract_set(inode.dirty, dirty)
            assert subtract_set(extra, ((offset, min(offset + 10, before[2])),)) == ()
    finally:
        stack.cache.pwrite = real_pwrite  # type: ignore[method-assign]
    assert_journal_has(stack, inode)
    await stack.crash_and_replay()
    assert await stack.read("f") == b"a" * 100 + bytes(100) + b"b" * 10


async def test_a_clean_file_is_marked_may_be_dirty_once_before_its_first_change(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"o" * 8192)
    assert await stack.read("f") == b"o" * 8192  # present and clean
    await stack.table.commit()  # what was fetched, as the journal's periodic sync commits it
    inode = await stack.resolve("f")
    commits: list[Any] = []
    real_commit = stack.journal.commit

    def spy(batch: Any) -> None:
        commits.append(batch)
        real_commit(batch)

    stack.journal.commit = spy  # type: ignore[method-assign]
    fh = await stack.open("f", os.O_WRONLY)
    try:
        await stack.fs.write(fh, 0, b"a")
        assert inode.unclean and len(commits) == 2  # "may be dirty" first, then the write
        assert commits[0].inodes[inode.ino].unclean and not commits[0].extents
        commits.clear()
        await stack.fs.write(fh, 4096, b"b")  # clean bytes too, but the mark is there
        assert len(commits) == 1
        # Killed after a cache write whose commit was lost: the cache file holds a byte
        # the journal never heard of. Replay takes every present byte for dirty.
        stack.journal.commit = lambda batch: None  # type: ignore[method-assign]
        await stack.fs.write(fh, 6000, b"c")
    finally:
        stack.journal.commit = real_commit  # type: ignore[method-assign]
    await stack.crash_and_replay()
    again = await stack.resolve("f")
    assert again.unclean and again.dirty == ((0, 8192),)
    await stack.flusher.sync(timeout=30)
    content = bytearray(b"o" * 8192)
    content[0], content[4096], content[6000] = ord("a"), ord("b"), ord("c")
    assert (stack.src / "f").read_bytes() == bytes(content) == await stack.read("f")
    assert not again.unclean and not again.dirty  # clean again: the mark is gone
    await stack.crash_and_replay()
    assert not (await stack.resolve("f")).dirty


async def test_overlapping_journal_flushes_may_end_in_any_order(stack: Stack) -> None:
    """A periodic flush and an fsync's overlap; the later may end first (a bench run lost
    its daemon to that once)."""
    go = {1: threading.Event(), 2: threading.Event()}
    started: list[int] = []
    real_sync = stack.journal.sync

    def sync() -> None:
        n = len(started) + 1
        started.append(n)
        assert go[n].wait(60)
        real_sync()

    stack.journal.sync = sync  # type: ignore[method-assign]
    try:
        second_done = trio.Event()

        async def second() -> None:
            await stack.table.sync()
            second_done.set()

        async with trio.open_nursery() as nursery:
            await stack.put("a", b"1")
            nursery.start_soon(stack.table.sync)
            # A task waiting for its thread counts as blocked before the thread has run: wait
            # for the flush itself to begin, or under load the second could take number 1.
            await wait_until_async(lambda: started == [1], 60, interval=0.001)
            await stack.put("b", b"2")  # a commit the first flush does not cover
            nursery.start_soon(second)
            await wait_until_async(lambda: started == [1, 2], 60, interval=0.001)
            go[2].set()
            await second_done.wait()
            go[1].set()
        assert started == [1, 2]
        await stack.table.sync()  # nothing new: no third flush
        assert started == [1, 2]
    finally:
        go[1].set()
        go[2].set()
        stack.journal.sync = real_sync  # type: ignore[method-assign]


async def test_a_failed_flush_fails_the_fsync_with_its_errno(stack: Stack) -> None:
    await stack.create("f", b"x")

    def broken() -> None:
        raise OSError(errno.EIO, "device gone")

    real_sync = stack.journal.sync
    stack.journal.sync = broken  # type: ignore[method-assign]
    try:
        assert await fails_with(stack.fsync("f")) == errno.EIO
    finally:
        stack.journal.sync = real_sync  # type: ignore[method-assign]


async def test_an_overwrite_of_dirty_bytes_commits_nothing_and_survives_a_kill(stack: Stack) -> None:
    await stack.create("f", b"a" * 8192)  # new: every byte recorded dirty
    inode = await stack.resolve("f")
    before = stack.table.commits
    fh = await stack.open("f", os.O_WRONLY)
    try:
        await stack.fs.write(fh, 100, b"b" * 10)  # inside the dirty range, the size unchanged
        assert stack.table.commits == before  # no journal transaction: only the times changed
        await stack.fs.write(fh, 8190, b"c" * 4)  # grows the file: recorded before answered
        assert stack.table.commits == before + 1
    finally:
        await stack.fs.release(fh)
    assert inode.dirty == ((0, 8194),)
    await stack.crash_and_replay()  # kill -9: the cache file and the committed journal stay
    want = b"a" * 100 + b"b" * 10 + b"a" * 8080 + b"c" * 4
    assert await stack.read("f") == want
    await stack.flusher.sync(timeout=30)
    assert (stack.src / "f").read_bytes() == want


async def test_fdatasync_of_overwritten_dirty_bytes_flushes_the_file_alone(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    await stack.create("f", b"a" * 8192)
    calls: list[str] = []
    real_sync, real_fdatasync = stack.journal.sync, os.fdatasync

    def journal_sync() -> None:
        calls.append("journal")
        real_sync()

    def file_fdatasync(fd: int) -> None:
        calls.append("file")
        real_fdatasync(fd)

    stack.journal.sync = journal_sync  # type: ignore[method-assign]
    monkeypatch.setattr(cache_module.os, "fdatasync", file_fdatasync)
    fh = await stack.open("f", os.O_WRONLY)
    try:
        inode = await stack.resolve("f")
        await stack.fs.write(fh, 0, b"b")
        await stack.fs.setattr(inode.ino, mtime_ns=inode.mtime_ns)  # as the kernel does first
        await stack.fs.fsync(fh, datasync=True)  # the file's record is not on the disk yet
        assert sorted(calls) == ["file", "journal"]
        calls.clear()
        await stack.fs.write(fh, 1, b"c")  # an overwrite: its range is durable already
        await stack.fs.setattr(inode.ino, mtime_ns=inode.mtime_ns)
        await stack.fs.fsync(fh, datasync=True)
        assert calls == ["file"]
        calls.clear()
        await stack.fs.write(fh, 2, b"d")
        await stack.fs.fsync(fh)  # a full fsync makes the new times durable too
        assert sorted(calls) == ["file", "journal"]
        calls.clear()
        await stack.fs.write(fh, 8192, b"e")  # grows the file: the size must be durable
        await stack.fs.fsync(fh, datasync=True)
        assert sorted(calls) == ["file", "journal"]
    finally:
        stack.journal.sync = real_sync  # type: ignore[method-assign]
        await stack.fs.release(fh)
    await stack.crash_and_replay()
    assert await stack.read("f") == b"bcd" + b"a" * 8189 + b"e"


async def test_a_cold_read_opens_no_transaction_and_a_crash_before_one_costs_a_fetch(stack: Stack) -> None:
    # A transaction per fetched file was a third of the cost of reading many small files.
    from safefs.mount.process import sync_journal_periodically

    (stack.src / "f").write_bytes(b"x" * 5000)
    await stack.resolve("f")  # the listing that finds it commits, as it should
    before = stack.table.commits
    assert await stack.read("f") == b"x" * 5000
    assert stack.table.commits == before and stack.table.uncommitted
    await stack.crash_and_replay()  # the record of what is present is lost, nothing else
    assert not (await stack.resolve("f")).present
    assert await stack.read("f") == b"x" * 5000  # fetched again
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sync_journal_periodically, stack.table)
        await wait_until_async(lambda: not stack.table.uncommitted, 10.0, message="the periodic sync to commit")
        nursery.cancel_scope.cancel()
    await stack.crash_and_replay()
    assert (await stack.resolve("f")).present == ((0, 5000),)
    assert await stack.read("f") == b"x" * 5000


async def test_bytes_fetched_before_a_crash_never_show_in_a_gap_written_later(stack: Stack) -> None:
    # The record of a fetch may be lost (see above) while its bytes stay in the content file.
    # If the project's file then shrinks, a write past the new end leaves a gap that must read
    # as zeros, not as those old bytes.
    (stack.src / "f").write_bytes(b"o" * 8192)
    assert await stack.read("f") == b"o" * 8192
    await stack.crash_and_replay()  # before any commit: the fetch is not on record
    (stack.src / "f").write_bytes(b"s" * 100)  # shrunk out of band
    await stack.write("f", b"x", 200)
    assert await stack.read("f") == b"s" * 100 + bytes(100) + b"x"
    await stack.flusher.sync(timeout=30)
    assert (stack.src / "f").read_bytes() == b"s" * 100 + bytes(100) + b"x"
