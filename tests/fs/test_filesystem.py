"""POSIX semantics of `Filesystem`, called directly (no kernel): errnos, lookup counts and
forget, where writes land, how much a read fetches, revalidation, and the read-only gate.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from safefs.content import FETCH_BLOCK
from safefs.errors import ReadOnly, SafefsError
from safefs.fs import RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE, XATTR_REPLACE
from safefs.inodes import ROOT_INO
from safefs.testing import FaultPlan
from tests.fs.conftest import GID, UID, Stack, fails_with, files, src_tree

# ---------------------------------------------------------------------------- errno mapping


async def test_enoent(stack: Stack) -> None:
    (stack.src / "d").mkdir()
    assert await fails_with(stack.fs.lookup(ROOT_INO, b"missing")) == errno.ENOENT
    assert await fails_with(stack.resolve("d/missing")) == errno.ENOENT
    assert await fails_with(stack.unlink("missing")) == errno.ENOENT
    assert await fails_with(stack.rmdir("missing")) == errno.ENOENT
    assert await fails_with(stack.rename("missing", "x")) == errno.ENOENT
    d = await stack.resolve("d")
    assert await fails_with(stack.fs.rename(ROOT_INO, b"missing", d.ino, b"x", 0)) == errno.ENOENT
    # An unknown inode number (the kernel would never send one, but a bug might).
    assert await fails_with(lambda: stack.fs.getattr(10**9)) == errno.ENOENT


async def test_eexist(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"x")
    (stack.src / "d").mkdir()
    root = ROOT_INO
    assert await fails_with(stack.fs.create(root, b"f", 0o100644, os.O_WRONLY, UID, GID)) == errno.EEXIST
    assert await fails_with(stack.fs.mkdir(root, b"d", 0o40755, UID, GID)) == errno.EEXIST
    assert await fails_with(stack.fs.mkdir(root, b"f", 0o40755, UID, GID)) == errno.EEXIST
    assert await fails_with(stack.fs.symlink(root, b"f", b"t", UID, GID)) == errno.EEXIST
    assert await fails_with(stack.link("f", "d")) == errno.EEXIST
    assert await fails_with(stack.rename("f", "d", RENAME_NOREPLACE)) == errno.EEXIST
    # Nothing was changed by the failures.
    assert await stack.view() == files(f=b"x", d=None)
    assert not stack.table.ops


async def test_enotempty(stack: Stack) -> None:
    (stack.src / "d").mkdir()
    (stack.src / "d" / "f").write_bytes(b"x")
    (stack.src / "e").mkdir()
    assert await fails_with(stack.rmdir("d")) == errno.ENOTEMPTY
    assert await fails_with(stack.rename("e", "d")) == errno.ENOTEMPTY
    # A directory emptied in the cache is empty, even if SRC still has the file.
    await stack.unlink("d/f")
    await stack.rmdir("d")
    # A directory that only has entries created in the cache is not empty either.
    await stack.mkdir("g")
    await stack.create("g/new")
    assert await fails_with(stack.rmdir("g")) == errno.ENOTEMPTY


async def test_enotdir(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"x")
    (stack.src / "d").mkdir()
    f = await stack.resolve("f")
    assert await fails_with(stack.fs.lookup(f.ino, b"x")) == errno.ENOTDIR
    assert await fails_with(stack.fs.create(f.ino, b"x", 0o100644, os.O_WRONLY, UID, GID)) == errno.ENOTDIR
    assert await fails_with(stack.fs.mkdir(f.ino, b"x", 0o40755, UID, GID)) == errno.ENOTDIR
    assert await fails_with(stack.fs.opendir(f.ino)) == errno.ENOTDIR
    assert await fails_with(stack.rmdir("f")) == errno.ENOTDIR
    assert await fails_with(stack.rename("d", "f")) == errno.ENOTDIR


async def test_eisdir(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"x")
    (stack.src / "d").mkdir()
    d = await stack.resolve("d")
    assert await fails_with(stack.unlink("d")) == errno.EISDIR
    assert await fails_with(stack.rename("f", "d")) == errno.EISDIR
    assert await fails_with(stack.fs.open(d.ino, os.O_RDONLY)) == errno.EISDIR
    assert await fails_with(stack.fs.setattr(d.ino, size=0)) == errno.EISDIR
    assert await fails_with(stack.link("d", "d2")) == errno.EPERM  # no hard links to directories


async def test_einval_for_a_directory_moved_below_itself(stack: Stack) -> None:
    (stack.src / "a" / "b" / "c").mkdir(parents=True)
    assert await fails_with(stack.rename("a", "a/x")) == errno.EINVAL
    assert await fails_with(stack.rename("a", "a/b/c/x")) == errno.EINVAL
    assert await fails_with(stack.rename("a/b", "a/b/c/x")) == errno.EINVAL
    # Exchange of a directory with one of its descendants, either way round.
    assert await fails_with(stack.rename("a", "a/b/c", RENAME_EXCHANGE)) == errno.EINVAL
    assert await fails_with(stack.rename("a/b/c", "a", RENAME_EXCHANGE)) == errno.EINVAL
    # Bad flags, and names no directory can hold.
    await stack.create("f")
    assert await fails_with(stack.rename("f", "g", RENAME_NOREPLACE | RENAME_EXCHANGE)) == errno.EINVAL
    assert await fails_with(stack.rename("f", "g", 1 << 7)) == errno.EINVAL
    assert await fails_with(stack.fs.create(ROOT_INO, b"a/b", 0o100644, os.O_WRONLY, UID, GID)) == errno.EINVAL
    assert await fails_with(stack.fs.mkdir(ROOT_INO, b"..", 0o40755, UID, GID)) in (errno.EINVAL, errno.EEXIST)
    assert await stack.view() == {**files(a=None, **{"a/b": None, "a/b/c": None}), b"f": ("file", b"")}


async def test_enametoolong(stack: Stack) -> None:
    long = b"n" * 256
    ok = b"n" * 255
    assert await fails_with(stack.fs.lookup(ROOT_INO, long)) == errno.ENAMETOOLONG
    assert await fails_with(stack.fs.create(ROOT_INO, long, 0o100644, os.O_WRONLY, UID, GID)) == errno.ENAMETOOLONG
    assert await fails_with(stack.fs.mkdir(ROOT_INO, long, 0o40755, UID, GID)) == errno.ENAMETOOLONG
    await stack.create(ok, b"x")
    assert await fails_with(stack.fs.rename(ROOT_INO, ok, ROOT_INO, long, 0)) == errno.ENAMETOOLONG
    assert await fails_with(stack.link(ok, long)) == errno.ENAMETOOLONG


async def test_the_control_dir_is_reserved_in_the_root(stack: Stack) -> None:
    (stack.src / ".safefs" / "lease").mkdir(parents=True)
    (stack.src / ".safefs" / "generation").write_bytes(b"{}")
    (stack.src / "d").mkdir()
    (stack.src / "f").write_bytes(b"x")
    root = ROOT_INO
    assert await fails_with(stack.fs.lookup(root, b".safefs")) == errno.ENOENT
    assert b".safefs" not in await stack.listdir()
    assert await stack.listdir() == [b"d", b"f"]
    assert await fails_with(stack.fs.create(root, b".safefs", 0o100644, os.O_WRONLY, UID, GID)) == errno.EPERM
    assert await fails_with(stack.fs.mkdir(root, b".safefs", 0o40755, UID, GID)) == errno.EPERM
    assert await fails_with(stack.fs.symlink(root, b".safefs", b"x", UID, GID)) == errno.EPERM
    assert await fails_with(stack.fs.mknod(root, b".safefs", stat.S_IFIFO | 0o644, 0, UID, GID)) == errno.EPERM
    assert await fails_with(stack.rename("f", ".safefs")) == errno.EPERM
    assert await fails_with(stack.link("f", ".safefs")) == errno.EPERM
    assert await fails_with(stack.unlink(".safefs")) == errno.ENOENT
    assert await fails_with(stack.rmdir(".safefs")) == errno.ENOENT
    assert await fails_with(stack.rename(".safefs", "x")) == errno.ENOENT
    # Only the root's: a `.safefs` below it is an ordinary name.
    await stack.mkdir("d/.safefs")
    assert await stack.listdir("d") == [b".safefs"]
    # And nothing of the control dir was touched.
    assert sorted(os.listdir(stack.src / ".safefs")) == ["generation", "lease"]
    await stack.flusher.sync()
    assert (stack.src / "d" / ".safefs").is_dir()
    assert sorted(os.listdir(stack.src / ".safefs")) == ["generation", "lease"] or (
        # the flusher may have created its staging dir, never anything else
        sorted(os.listdir(stack.src / ".safefs")) == ["generation", "lease", "staging"]
    )


# ---------------------------------------------------------------------------- xattrs, attrs


async def test_xattr_flags(stack: Stack) -> None:
    f = await stack.create("f")
    await stack.fs.setxattr(f.ino, b"user.a", b"1")
    assert await fails_with(stack.fs.setxattr(f.ino, b"user.a", b"2", XATTR_CREATE)) == errno.EEXIST
    assert await fails_with(stack.fs.setxattr(f.ino, b"user.b", b"2", XATTR_REPLACE)) == errno.ENODATA
    assert await fails_with(stack.fs.getxattr(f.ino, b"user.b")) == errno.ENODATA
    assert await fails_with(stack.fs.removexattr(f.ino, b"user.b")) == errno.ENODATA
    await stack.fs.setxattr(f.ino, b"user.a", b"3", XATTR_REPLACE)
    assert await stack.fs.getxattr(f.ino, b"user.a") == b"3"
    await stack.flusher.sync()
    assert os.getxattr(stack.src / "f", b"user.a") == b"3"


async def test_setattr_reaches_src(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"0123456789")
    f = await stack.resolve("f")
    await stack.fs.setattr(f.ino, mode=0o600, mtime_ns=1_234_567_890_123_456_789, atime_ns=5_000_000_007)
    await stack.fs.setattr(f.ino, size=4)
    mtime_after_truncate = stack.fs.getattr(f.ino).mtime_ns
    assert (stack.src / "f").read_bytes() == b"0123456789"
    await stack.flusher.sync()
    st = os.lstat(stack.src / "f")
    assert (stack.src / "f").read_bytes() == b"0123"
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime_ns == mtime_after_truncate
    assert st.st_atime_ns == 5_000_000_007


# ---------------------------------------------------------------------------- lookups, forget


async def test_unlinked_open_file_stays_readable_until_release_and_forget(stack: Stack) -> None:
    f = await stack.create("f", b"cached content")  # create counts one lookup
    fh = await stack.open("f")  # and this one more
    await stack.unlink("f")
    assert await fails_with(stack.resolve("f")) == errno.ENOENT
    assert await stack.read_fh(fh) == b"cached content"
    cache_file = stack.cache.path(f.ino)
    assert cache_file.exists()
    await stack.fs.release(fh)
    assert f.ino in stack.table.inodes  # the kernel still knows it
    await stack.fs.forget([(f.ino, 1)])
    assert f.ino in stack.table.inodes
    await stack.fs.forget([(f.ino, 1)])
    # Nothing refers to it now: the project never got it, so its unlink cancelled its
    # create, and no pending op pins it. It goes with its cache file.
    assert f.ino not in stack.table.inodes
    assert not cache_file.exists()
    await stack.flusher.sync(timeout=30)
    assert src_tree(stack.src) == {}
    # And it does not come back from the journal.
    await stack.crash_and_replay()
    assert f.ino not in stack.table.inodes
    assert not stack.cache.path(f.ino).exists()


async def test_unlinked_file_that_never_reached_src_is_dropped_without_a_flush(stack: Stack) -> None:
    """With no pending op naming it (its create and unlink both replayed, or none), an
    unlinked file goes at the last forget, not at the next flush."""
    await stack.flusher.sync(timeout=30)
    f = await stack.create("f", b"x")
    await stack.flusher.sync(timeout=30)  # "f" is on SRC now
    fh = await stack.open("f")
    await stack.unlink("f")
    await stack.flusher.sync(timeout=30)  # and gone from it again: no op names the inode
    assert not (stack.src / "f").exists()
    assert await stack.read_fh(fh) == b"x"
    await stack.fs.release(fh)
    assert f.ino in stack.table.inodes
    await stack.fs.forget([(f.ino, f.lookups)])
    assert f.ino not in stack.table.inodes
    assert not stack.cache.path(f.ino).exists()


async def test_unlinked_src_file_is_dropped_once_the_unlink_is_replayed(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"A" * 100_000)
    fh = await stack.open("f")
    f = stack.fs.handle_inode(fh)
    assert await stack.fs.read(fh, 0, 10) == b"A" * 10
    await stack.unlink("f")
    await stack.flusher.sync()  # the unlink reaches SRC while the file is still open
    assert not (stack.src / "f").exists()
    assert await stack.read_fh(fh) == b"A" * 100_000  # all of it, not only what was cached
    await stack.fs.release(fh)
    await stack.fs.forget([(f.ino, f.lookups)])
    assert f.ino not in stack.table.inodes
    assert not stack.cache.path(f.ino).exists()


async def test_crash_forgets_kernel_references(stack: Stack) -> None:
    """After a restart the kernel holds no references: unlinked files left open are dropped."""
    f = await stack.create("f", b"x")
    fh = await stack.open("f")
    await stack.unlink("f")
    assert f.ino in stack.table.inodes
    del fh
    await stack.crash_and_replay()
    await stack.flusher.sync(timeout=30)
    assert f.ino not in stack.table.inodes
    assert not stack.cache.path(f.ino).exists()
    assert src_tree(stack.src) == {}


async def test_an_unlinked_file_collected_just_before_a_crash_stays_gone(stack: Stack) -> None:
    """Neither the times the kernel sends for a removed file nor its collection wait for a
    commit of their own; killed before the next one, the restart collects it again."""
    await stack.create("keep", b"k")
    f = await stack.create("f", b"x")
    fh = await stack.open("f")
    await stack.unlink("f")
    await stack.fs.setattr(f.ino, mtime_ns=12345)
    assert await stack.read_fh(fh) == b"x"
    await stack.fs.release(fh)
    await stack.fs.forget([(f.ino, f.lookups)])
    assert f.ino not in stack.table.inodes
    assert stack.table.uncommitted, "the test proves nothing: the drop was committed"
    await stack.crash_and_replay()
    assert f.ino not in stack.table.inodes
    assert not stack.cache.path(f.ino).exists()
    assert await stack.view() == files(keep=b"k")
    await stack.flusher.sync(timeout=30)
    assert src_tree(stack.src) == files(keep=b"k")


async def test_an_unlinked_file_in_use_works_and_leaves_nothing_after_a_crash(stack: Stack) -> None:
    """A temporary file unlinked at once and then used (Python's TemporaryFile, sort(1)): its
    writes and fsyncs need nothing durable, as it is gone after a crash in any case. One new
    file, and one the project has, whose unlink must still reach it."""
    (stack.src / "old").write_bytes(b"o" * 1000)
    await stack.create("new", b"")
    fhs = {name: await stack.open(name, os.O_RDWR) for name in ("new", "old")}
    for name in fhs:
        await stack.unlink(name)
    flushes: list[str] = []
    real_fsync, real_sync = stack.cache.fsync, stack.journal.sync

    def cache_fsync(ino: int) -> None:
        flushes.append("cache file")
        real_fsync(ino)

    def journal_sync() -> None:
        flushes.append("journal")
        real_sync()

    stack.cache.fsync = cache_fsync  # type: ignore[method-assign]
    stack.journal.sync = journal_sync  # type: ignore[method-assign]
    commits = stack.table.commits
    for name, fh in fhs.items():
        block = name.encode() + b"."  # 4 bytes
        for i in range(50):
            assert await stack.fs.write(fh, i * 4096, block * 1024) == 4096
        await stack.fs.fsync(fh)
    assert (stack.table.commits - commits, flushes) == (0, []), "durable work for files with no name"
    for name, fh in fhs.items():
        block = name.encode() + b"."
        assert await stack.fs.read(fh, 49 * 4096, 8192) == block * 1024
        assert await stack.fs.read(fh, 0, 4) == block
    inos = [stack.fs.handle_inode(fh).ino for fh in fhs.values()]
    await stack.crash_and_replay()
    await stack.flusher.sync(timeout=30)
    assert all(ino not in stack.table.inodes for ino in inos)
    assert all(not stack.cache.path(ino).exists() for ino in inos)
    assert src_tree(stack.src) == {}


async def test_lookup_counts(stack: Stack) -> None:
    (stack.src / "d").mkdir()
    (stack.src / "d" / "f").write_bytes(b"x")
    d = await stack.resolve("d")
    f = await stack.resolve("d/f")
    await stack.resolve("d/f")
    assert (d.lookups, f.lookups) == (3, 2)  # d was looked up once more for each path
    dot = await stack.fs.lookup(d.ino, b".")
    dotdot = await stack.fs.lookup(d.ino, b"..")
    assert (dot.ino, dotdot.ino) == (d.ino, ROOT_INO)
    await stack.fs.forget([(f.ino, 2)])
    assert f.ino in stack.table.inodes  # still named: forget only drops the kernel's reference
    assert f.lookups == 0


# ---------------------------------------------------------------------------- writes, reads


async def test_writes_land_in_the_cache_and_src_waits_for_a_flush(stack: Stack) -> None:
    (stack.src / "a").write_bytes(b"original a")
    (stack.src / "d").mkdir()
    before = src_tree(stack.src)
    before_stat = os.lstat(stack.src / "a")

    await stack.write("a", b"ORIGINAL", 0)
    await stack.create("b", b"new file")
    await stack.mkdir("e")
    await stack.create("e/f", b"deep")
    await stack.rename("d", "e/d")
    await stack.symlink("a", "ln")
    await stack.truncate("b", 3)

    a = await stack.resolve("a")
    assert stack.cache.path(a.ino).read_bytes()[:8] == b"ORIGINAL"
    assert await stack.read("a") == b"ORIGINAL a"
    assert await stack.read("b") == b"new"
    # SRC has not been touched at all, not even its timestamps.
    assert src_tree(stack.src) == before
    assert os.lstat(stack.src / "a").st_mtime_ns == before_stat.st_mtime_ns
    assert stack.backing.bytes_written == 0
    assert not (stack.src / ".safefs").exists()

    # A background pass before the write-back delay writes nothing either.
    await stack.flusher.flush(everything=False)
    assert src_tree(stack.src) == before

    stack.clock.advance(stack.config.writeback_delay + 1)
    await stack.flusher.flush(everything=False)
    assert src_tree(stack.src) == {
        **files(a=b"ORIGINAL a", b=b"new", e=None, **{"e/f": b"deep", "e/d": None}),
        b"ln": ("link", b"a"),
    }


async def test_reads_of_a_big_sparse_file_fetch_only_what_they_need(stack: Stack) -> None:
    size = 10 * (1 << 30)
    with open(stack.src / "big", "wb") as f:
        f.truncate(size)
        f.seek(5 << 30)
        f.write(b"middle")
        f.seek(size - 3)
        f.write(b"end")
    fh = await stack.open("big")
    try:
        assert await stack.fs.read(fh, 5 << 30, 4096) == b"middle" + bytes(4090)
        assert stack.backing.bytes_read <= 2 * FETCH_BLOCK
        assert await stack.fs.read(fh, size - 3, 4096) == b"end"
        assert await stack.fs.read(fh, 12345, 10) == bytes(10)
        assert stack.backing.bytes_read <= 6 * FETCH_BLOCK
        # Read again: served from the cache.
        fetched = stack.backing.bytes_read
        assert await stack.fs.read(fh, (5 << 30) + 1, 5) == b"iddle"
        assert stack.backing.bytes_read == fetched
        # A write in the middle of the big file does not fetch the rest either.
        assert await stack.fs.write(fh, 7 << 30, b"written") == 7
        assert stack.backing.bytes_read == fetched
    finally:
        await stack.fs.release(fh)
    assert stack.fs.cached_bytes() <= 8 * FETCH_BLOCK


async def test_file_changed_in_src_behind_our_back_is_dropped_at_next_open(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"version one")
    assert await stack.read("f") == b"version one"
    f = await stack.resolve("f")
    assert stack.table.get(f.ino).present
    fetched = stack.backing.bytes_read

    # Unchanged: the next open keeps the cache (and tells the kernel to keep its pages).
    fh, keep = await stack.fs.open(f.ino, os.O_RDONLY)
    await stack.fs.release(fh)
    assert keep
    assert stack.backing.bytes_read == fetched

    (stack.src / "f").write_bytes(b"version two, longer")
    fh, keep = await stack.fs.open(f.ino, os.O_RDONLY)
    try:
        assert not keep
        assert stack.fs.getattr(f.ino).size == len(b"version two, longer")
        assert await stack.read_fh(fh) == b"version two, longer"
    finally:
        await stack.fs.release(fh)
    assert f.ino in stack.invalidator.inodes


async def test_an_absence_the_kernel_caches_is_taken_back_when_the_name_may_appear(stack: Stack) -> None:
    (stack.src / "d").mkdir()
    d = await stack.resolve("d")
    # The kernel was told "d/new" and "d/made" do not exist, and may cache that.
    for name in (b"new", b"made"):
        assert await fails_with(stack.fs.lookup(d.ino, name)) == errno.ENOENT
        assert stack.fs.note_absent(d.ino, name)
    # A name made through the mount replaces the kernel's negative entry by itself.
    await stack.create("d/made", b"x")
    await stack.flusher.sync()
    # Another host adds "d/new"; once the cache is distrusted (role change, new generation),
    # the kernel must forget that "d/new" was absent, or it would go on answering ENOENT.
    (stack.src / "d" / "new").write_bytes(b"from elsewhere")
    stack.invalidator.entries.clear()
    stack.fs.mark_stale()
    assert stack.invalidator.entries == [(d.ino, b"new")]
    assert await stack.read("d/new") == b"from elsewhere"
    # A refresh of the directory takes back absences noted after the distrust, too.
    assert stack.fs.note_absent(d.ino, b"later")
    stack.fs.mark_stale()
    stack.invalidator.entries.clear()
    (stack.src / "d" / "later").write_bytes(b"y")
    assert await stack.read("d/later") == b"y"
    assert (d.ino, b"later") not in stack.invalidator.entries  # already taken back by mark_stale


async def test_a_directory_with_pending_ops_follows_the_project_except_the_names_they_change(
    stack: Stack,
) -> None:
    """A fenced ex-writer keeps its pending ops for recover, yet sees the new writer's work in
    the same directory (issue 9 item 8): only the names its ops change stay as it left them."""
    (stack.src / "d").mkdir()
    for name in ("gone-here", "moved-here", "kept"):
        (stack.src / "d" / name).write_bytes(name.encode())
    assert sorted(await stack.listdir("d")) == [b"gone-here", b"kept", b"moved-here"]
    await stack.unlink("d/gone-here")
    await stack.rename("d/moved-here", "d/moved-to")
    await stack.create("d/mine", b"mine")
    assert stack.fs.table.ops, "the ops were written back: the test proves nothing"
    # Meanwhile another host writes in d: a new file, and one removed.
    (stack.src / "d" / "from-elsewhere").write_bytes(b"new")
    os.unlink(stack.src / "d" / "kept")
    stack.fs.mark_stale()
    assert sorted(await stack.listdir("d")) == [b"from-elsewhere", b"mine", b"moved-to"]
    assert await stack.read("d/from-elsewhere") == b"new"
    assert await stack.read("d/moved-to") == b"moved-here"
    await stack.flusher.sync()
    assert sorted(os.listdir(stack.src / "d")) == ["from-elsewhere", "mine", "moved-to"]


async def _lookup_while_the_log_is_replayed(stack: Stack, name: str) -> int | None:
    """Look `d/<name>` up while the flusher replays the log: the refresh of the stale `d`
    lists the project before the replay and goes on after it (a kill -9 leaves every
    directory stale, and the remount's walk races its flusher). The lookup's errno, or None."""
    real_listdir = stack.backing.listdir
    listed, go = threading.Event(), threading.Event()

    def listdir_then_wait(path: tuple[bytes, ...]) -> Any:
        entries = real_listdir(path)
        if path == (b"d",):
            listed.set()
            go.wait(30)
        return entries

    stack.backing.listdir = listdir_then_wait  # type: ignore[method-assign]
    failed: list[int | None] = []

    async def lookup() -> None:
        try:
            await stack.resolve(f"d/{name}")
        except SafefsError as exc:
            failed.append(exc.errno)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookup)
            assert await trio.to_thread.run_sync(listed.wait, 30), "the refresh never listed d"
            await stack.flusher.sync(timeout=30)
            assert not stack.table.ops
            go.set()
    finally:
        go.set()
        stack.backing.listdir = real_listdir  # type: ignore[method-assign]
    return failed[0] if failed else None


async def test_a_refresh_racing_the_replay_of_a_create_keeps_the_file(stack: Stack) -> None:
    """G2: a closed file survives kill -9 (the lost d0/s22 of test_kill_in_the_middle_of_writeback).
    The replay publishes it and clears its op while the refresh's listing predates it."""
    await stack.mkdir("d")
    await stack.flusher.sync()
    await stack.create("d/f", b"acknowledged")
    await stack.crash_and_replay()
    assert await _lookup_while_the_log_is_replayed(stack, "f") is None
    assert await stack.view() == files(d=None, **{"d/f": b"acknowledged"}) == src_tree(stack.src)


async def test_a_refresh_racing_the_replay_of_an_unlink_does_not_bring_the_file_back(stack: Stack) -> None:
    (stack.src / "d").mkdir()
    (stack.src / "d" / "f").write_bytes(b"removed")
    await stack.unlink("d/f")
    await stack.crash_and_replay()
    assert await _lookup_while_the_log_is_replayed(stack, "f") == errno.ENOENT
    assert await stack.view() == files(d=None) == src_tree(stack.src)


async def test_a_follower_keeps_reading_the_version_it_opened_while_the_writer_republishes(stack: Stack) -> None:
    """G5: the writer publishes by renaming a whole new file over the old one. A reader on a
    follower that opened the old one goes on reading the old one, never a mix of the two."""
    stack.fs.follower = True
    old = bytes(range(256)) * 2048  # 512 KiB: several fetch blocks
    new = b"N" * len(old)
    (stack.src / "data.bin").write_bytes(old)
    fh = await stack.open("data.bin")
    try:
        assert await stack.fs.read(fh, 0, 4096) == old[:4096]
        # The writer's publish: a new file renamed over the name, then a new generation.
        (stack.src / "tmp").write_bytes(new)
        os.rename(stack.src / "tmp", stack.src / "data.bin")
        stack.fs.mark_stale()
        assert await stack.listdir() == [b"data.bin"]  # the refresh sees the new file
        rest = await stack.fs.read(fh, 4096, len(old))
        assert rest == old[4096:], "the open file mixed in the new version"
    finally:
        await stack.fs.release(fh)
    assert await stack.read("data.bin") == new  # a new open sees the new version


async def test_an_open_through_a_stale_kernel_entry_leaves_the_open_version_alone(stack: Stack) -> None:
    """The kernel may still map the name to the old inode (its entry timeout has not run
    out) when the next process opens it after a publish: that open must not take the old
    version away from a reader who has it open. It fails with ESTALE (the kernel then looks
    the name up again) and the name leads to the new version."""
    stack.fs.follower = True
    old = bytes(range(256)) * 2048
    new = b"N" * len(old)
    (stack.src / "data.bin").write_bytes(old)
    inode = await stack.resolve("data.bin")
    reader = await stack.open("data.bin")
    try:
        (stack.src / "tmp").write_bytes(new)
        os.rename(stack.src / "tmp", stack.src / "data.bin")
        assert await fails_with(stack.fs.open(inode.ino, os.O_RDONLY)) == errno.ESTALE
        assert await stack.read("data.bin") == new
        assert (await stack.resolve("data.bin")).ino != inode.ino
        assert await stack.read_fh(reader) == old, "the open version changed under its reader"
    finally:
        await stack.fs.release(reader)


async def test_dirty_file_is_not_dropped_at_open(stack: Stack) -> None:
    """Revalidation never throws away dirty bytes (the flusher resolves the conflict)."""
    (stack.src / "f").write_bytes(b"version one")
    assert await stack.read("f") == b"version one"
    await stack.write("f", b"MINE")
    (stack.src / "f").write_bytes(b"version two")
    assert await stack.read("f") == b"MINEion one"
    assert not stack.invalidator.inodes


async def test_o_trunc_and_o_append(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"0123456789")
    await stack.write("f", b"ab", flags=os.O_WRONLY | os.O_TRUNC)
    assert await stack.read("f") == b"ab"
    fh = await stack.open("f", os.O_WRONLY | os.O_APPEND)
    try:
        await stack.fs.write(fh, 0, b"cd")  # O_APPEND: the offset is ignored
    finally:
        await stack.fs.release(fh)
    assert await stack.read("f") == b"abcd"
    # Writing past the end leaves a hole that reads as zeros.
    await stack.write("f", b"Z", 8)
    assert await stack.read("f") == b"abcd\0\0\0\0Z"
    await stack.flusher.sync()
    assert (stack.src / "f").read_bytes() == b"abcd\0\0\0\0Z"


async def test_clean_data_is_evicted_dirty_data_never(make_stack: Callable[..., Awaitable[Stack]]) -> None:
    stack = await make_stack(cache_size=600 * 1024)
    for i in range(6):
        (stack.src / f"f{i}").write_bytes(bytes([i]) * 200 * 1024)
    await stack.write("f0", b"dirty", 100)
    for i in range(1, 6):
        assert await stack.read(f"f{i}") == bytes([i]) * 200 * 1024
    assert stack.fs.cached_bytes() <= 600 * 1024 + 200 * 1024
    assert stack.fs.stats.evictions > 0
    f0 = await stack.resolve("f0")
    assert ranges_cover(f0.present, 100, 105)
    # Evicted files are fetched again on demand, and the dirty one still reads right.
    for i in range(1, 6):
        assert await stack.read(f"f{i}") == bytes([i]) * 200 * 1024
    expected0 = bytes([0]) * 100 + b"dirty" + bytes([0]) * (200 * 1024 - 105)
    assert await stack.read("f0") == expected0
    await stack.flusher.sync(timeout=30)
    assert (stack.src / "f0").read_bytes() == expected0


def ranges_cover(present: Any, start: int, end: int) -> bool:
    return any(s <= start and end <= e for s, e in present)


async def test_a_full_cache_disk_refuses_writes_with_enospc(make_stack: Callable[..., Awaitable[Stack]]) -> None:
    stack = await make_stack()
    # A full disk: no room left above the floor (the floor itself is capped at a tenth of
    # the disk, so a huge floor no longer simulates one).
    stack.cache.free_bytes = lambda: 0  # type: ignore[method-assign]
    (stack.src / "f").write_bytes(b"0123")
    fh = await stack.open("f", os.O_WRONLY)
    try:
        assert await fails_with(stack.fs.write(fh, 0, b"x" * 4096)) == errno.ENOSPC
    finally:
        await stack.fs.release(fh)
    assert await stack.read("f") == b"0123"
    assert not any(i.dirty for i in stack.table.inodes.values())


async def test_a_reboot_drops_clean_cached_bytes_and_keeps_dirty_ones(stack: Stack) -> None:
    (stack.src / "clean").write_bytes(b"c" * 1000)
    (stack.src / "dirty").write_bytes(b"d" * 1000)
    assert await stack.read("clean") == b"c" * 1000
    await stack.write("dirty", b"D", 0)
    await stack.fsync("dirty")
    stack.boot_id = "boot-2"
    await stack.crash_and_replay()
    clean = await stack.resolve("clean")
    dirty = await stack.resolve("dirty")
    assert not clean.present
    assert dirty.dirty
    fetched = stack.backing.bytes_read
    assert await stack.read("clean") == b"c" * 1000
    assert stack.backing.bytes_read > fetched  # fetched again, not trusted
    assert await stack.read("dirty") == b"D" + b"d" * 999
    await stack.flusher.sync(timeout=30)
    assert src_tree(stack.src) == files(clean=b"c" * 1000, dirty=b"D" + b"d" * 999)


async def test_fsync_makes_the_journal_durable(stack: Stack) -> None:
    synced = []
    real = stack.journal.sync  # type: ignore[union-attr]

    def sync() -> None:
        synced.append(True)
        real()

    stack.table._journal.sync = sync  # type: ignore[method-assign]
    await stack.create("f", b"x")
    assert not synced
    await stack.fsync("f")
    assert synced


async def test_write_then_crash_loses_nothing(stack: Stack) -> None:
    """G2: every write() that returned survives kill -9, without fsync."""
    (stack.src / "f").write_bytes(b"0" * 300_000)
    await stack.write("f", b"A" * 10, 5)
    await stack.write("f", b"B" * 10, 250_000)
    await stack.create("g", b"new")
    await stack.mkdir("d")
    await stack.symlink("g", "d/ln")
    await stack.fs.setxattr((await stack.resolve("g")).ino, b"user.k", b"v")
    await stack.crash_and_replay()
    content = bytearray(b"0" * 300_000)
    content[5:15] = b"A" * 10
    content[250_000:250_010] = b"B" * 10
    assert await stack.read("f") == bytes(content)
    assert await stack.read("g") == b"new"
    assert await stack.fs.getxattr((await stack.resolve("g")).ino, b"user.k") == b"v"
    assert stack.fs.readlink((await stack.resolve("d/ln")).ino) == b"g"
    await stack.flusher.sync(timeout=30)
    assert (stack.src / "f").read_bytes() == bytes(content)
    assert os.getxattr(stack.src / "g", b"user.k") == b"v"


async def test_large_directory_read_in_chunks(stack: Stack) -> None:
    (stack.src / "big").mkdir()
    for i in range(3000):
        (stack.src / "big" / f"n{i:05d}").write_bytes(b"")
    d = await stack.resolve("big")
    fh = await stack.fs.opendir(d.ino)
    seen: list[bytes] = []
    start = 0
    try:
        while True:  # the kernel asks again from the last offset it got
            chunk = []
            for name, _inode, nxt in stack.fs.readdir(fh, start):
                chunk.append(name)
                start = nxt
                if len(chunk) == 100:
                    break
            if not chunk:
                break
            seen += chunk
            if len(seen) == 1000:  # a change in the middle of the listing
                await stack.create("big/zz-new")
                await stack.unlink("big/n00001")
    finally:
        stack.fs.releasedir(fh)
    names = [n for n in seen if n not in (b".", b"..")]
    assert len(names) == len(set(names))
    assert {f"n{i:05d}".encode() for i in range(3000) if i != 1} <= set(names)
    assert len(await stack.listdir("big")) == 3000


async def test_non_utf8_names(stack: Stack) -> None:
    (stack.src / os.fsdecode(b"caf\xe9")).write_bytes(b"latin-1")
    assert await stack.listdir() == [b"caf\xe9"]
    assert await stack.read(b"caf\xe9") == b"latin-1"
    await stack.create(b"\xff\xfe\x01name", b"binary")
    await stack.rename(b"caf\xe9", b"\x80")
    await stack.flusher.sync(timeout=30)
    assert src_tree(stack.src) == {b"\x80": ("file", b"latin-1"), b"\xff\xfe\x01name": ("file", b"binary")}


async def test_files_over_4_gib(stack: Stack) -> None:
    offset = (5 << 30) + 123
    await stack.create("big")
    await stack.write("big", b"past 4 GiB", offset)
    big = await stack.resolve("big")
    assert big.size == offset + 10
    fh = await stack.open("big")
    try:
        assert await stack.fs.read(fh, offset - 2, 20) == b"\0\0past 4 GiB"
    finally:
        await stack.fs.release(fh)
    await stack.flusher.sync(timeout=60)
    assert os.path.getsize(stack.src / "big") == offset + 10
    with open(stack.src / "big", "rb") as f:
        f.seek(offset - 2)
        assert f.read() == b"\0\0past 4 GiB"
    # Sparse all the way: the hole was neither copied nor allocated.
    assert os.stat(stack.src / "big").st_blocks * 512 < 64 << 20
    assert stack.backing.bytes_written < 64 << 20


async def test_extending_an_existing_file_keeps_it_sparse_on_src(stack: Stack) -> None:
    """`truncate -s 256M` of an existing file on the mount must not write 256 MiB of zeros to
    the project (a large existing file is written in place, range by range)."""
    (stack.src / "old").write_bytes(b"head")
    size = 256 << 20  # above the 64 MiB publish threshold: written in place
    await stack.truncate("old", size)
    await stack.write("old", b"x", size - 1)
    await stack.flusher.sync(timeout=60)
    assert os.path.getsize(stack.src / "old") == size
    with open(stack.src / "old", "rb") as f:
        assert f.read(6) == b"head\0\0"
        f.seek(size - 2)
        assert f.read() == b"\0x"
    assert stack.backing.bytes_written < 1 << 20, "the hole was written out as zeros"
    assert os.stat(stack.src / "old").st_blocks * 512 < 16 << 20


async def test_a_write_during_a_fetch_is_not_overwritten(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"o" * 200_000)
    stack.backing.faults = faults = FaultPlan()
    hang = faults.hang("read")
    got: list[bytes] = []

    async def reader() -> None:
        got.append(await stack.read("f"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        with trio.fail_after(10):
            await trio.to_thread.run_sync(hang.entered.wait)
        await stack.write("f", b"NEW", 10)
        hang.release()
    expected = b"o" * 10 + b"NEW" + b"o" * (200_000 - 13)
    assert got[0] in (expected, b"o" * 200_000)  # either order is a valid history
    assert await stack.read("f") == expected
    await stack.flusher.sync(timeout=30)
    assert (stack.src / "f").read_bytes() == expected


async def test_truncate_down_then_up_reads_zeros(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"abcdefgh" * 1000)
    await stack.truncate("f", 2)
    await stack.truncate("f", 8)
    assert await stack.read("f") == b"ab" + bytes(6)
    await stack.flusher.sync(timeout=30)
    assert (stack.src / "f").read_bytes() == b"ab" + bytes(6)


# ---------------------------------------------------------------------------- read-only gate


async def test_read_only_gate_refuses_every_mutation_and_changes_nothing(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"file")
    (stack.src / "d").mkdir()
    (stack.src / "d" / "g").write_bytes(b"g")
    (stack.src / "e").mkdir()
    f = await stack.resolve("f")
    d = await stack.resolve("d")
    await stack.resolve("d/g")
    await stack.resolve("e")
    fh_w, _ = await stack.fs.open(f.ino, os.O_WRONLY)  # opened while still writable
    view_before = await stack.view()
    src_before = src_tree(stack.src)
    ops_before = dict(stack.table.ops)
    next_ino = stack.table.next_ino

    stack.gate.readonly = True
    root = ROOT_INO
    mutations = {
        "create": stack.fs.create(root, b"new", 0o100644, os.O_WRONLY, UID, GID),
        "mkdir": stack.fs.mkdir(root, b"new", 0o40755, UID, GID),
        "mknod": stack.fs.mknod(root, b"new", stat.S_IFIFO | 0o644, 0, UID, GID),
        "symlink": stack.fs.symlink(root, b"new", b"f", UID, GID),
        "link": stack.fs.link(f.ino, root, b"new"),
        "unlink": stack.fs.unlink(root, b"f"),
        "rmdir": stack.fs.rmdir(root, b"e"),
        "rename": stack.fs.rename(root, b"f", root, b"new", 0),
        "rename-over": stack.fs.rename(root, b"f", d.ino, b"g", 0),
        "exchange": stack.fs.rename(root, b"d", root, b"e", RENAME_EXCHANGE),
        "truncate": stack.fs.setattr(f.ino, size=0),
        "chmod": stack.fs.setattr(f.ino, mode=0o600),
        "chown": stack.fs.setattr(f.ino, uid=UID, gid=GID),
        "utimes": stack.fs.setattr(f.ino, mtime_ns=1),
        "setxattr": stack.fs.setxattr(f.ino, b"user.x", b"1"),
        "removexattr": stack.fs.removexattr(f.ino, b"user.x"),
        "open-write": stack.fs.open(f.ino, os.O_WRONLY),
        "open-rdwr": stack.fs.open(f.ino, os.O_RDWR),
        "open-trunc": stack.fs.open(f.ino, os.O_RDONLY | os.O_TRUNC),
        "write": stack.fs.write(fh_w, 0, b"X"),
    }
    answers = {name: await fails_with(call) for name, call in mutations.items()}
    assert answers == {name: errno.EROFS for name in mutations}

    # Reads still work and nothing changed: not the view, not the journal, not SRC.
    assert await stack.read("f") == b"file"
    stack.gate.readonly = False
    assert await stack.view() == view_before
    assert stack.table.ops == ops_before
    assert stack.table.next_ino == next_ino
    assert not any(i.needs_flush or i.new for i in stack.table.inodes.values())
    assert src_tree(stack.src) == src_before
    await stack.fs.release(fh_w)


async def test_read_only_error_is_the_lease_error(stack: Stack) -> None:
    stack.gate.readonly = True
    with pytest.raises(ReadOnly) as info:
        await stack.fs.mkdir(ROOT_INO, b"x", 0o40755, UID, GID)
    assert info.value.errno == errno.EROFS


# ---------------------------------------------------------------------------- wiring


async def test_kernel_notifier_is_usable_as_the_fs_invalidator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon hands fuse_ops.KernelNotifier (with its `run` service started) to Filesystem
    as its invalidator; what fs.py asks of it must reach pyfuse3, not a coroutine nobody awaits.
    """
    import gc
    import warnings

    import pyfuse3  # a dependency of safefs: missing is a failure, not a skip

    from safefs.fuse_ops import KernelNotifier

    calls: list[tuple[str, tuple[object, ...]]] = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode", lambda *a: calls.append(("inode", a)))
    monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda *a: calls.append(("entry", a)))
    s = Stack(tmp_path)
    notifier = KernelNotifier()
    s.invalidator = notifier  # type: ignore[assignment]
    await s.start()
    try:
        async with trio.open_nursery() as nursery:
            if hasattr(notifier, "run"):
                await nursery.start(notifier.run)
            notifier.enabled = True
            (s.src / "f").write_bytes(b"one")
            assert await s.read("f") == b"one"
            (s.src / "f").write_bytes(b"two!")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert await s.read("f") == b"two!"  # revalidation at open invalidates the inode
                gc.collect()
                await trio.sleep(0.2)
            never_awaited = [w for w in caught if "never awaited" in str(w.message)]
            assert not never_awaited, f"invalidation was never run: {never_awaited[0].message}"
            f = await s.resolve("f")
            assert ("inode", (f.ino, False)) in calls
            nursery.cancel_scope.cancel()
    finally:
        await s.close()


async def test_security_capability_is_answered_from_memory(stack: Stack) -> None:
    """The kernel asks for security.capability before every write (issue 10, item 5): the
    answer is ENODATA at once, without reading the file's xattrs from the backing tree."""
    import pyfuse3  # a dependency of safefs: missing is a failure, not a skip

    from safefs.fuse_ops import CachePolicy, SafeOperations

    (stack.src / "f").write_bytes(b"x")
    f = await stack.resolve("f")
    assert f.xattrs is None  # not read from the backing tree yet
    ops = SafeOperations(stack.fs, CachePolicy())
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getxattr(f.ino, b"security.capability", None)
    assert info.value.errno == errno.ENODATA
    assert f.xattrs is None  # answered from memory: no trip to the backing tree
    await stack.fs.setxattr(f.ino, b"security.capability", b"cap")
    assert await ops.getxattr(f.ino, b"security.capability", None) == b"cap"
    with pytest.raises(pyfuse3.FUSEError) as info:
        await ops.getxattr(f.ino, b"user.absent", None)  # other names take the usual way
    assert info.value.errno == errno.ENODATA


async def test_a_cold_read_of_a_small_file_fetches_it_whole_in_one_trip(stack: Stack) -> None:
    """Issue 10, item 6: one backing read brings the whole small file; later reads of any
    part of it are served from the cache."""
    from safefs.content import WHOLE_FILE_FETCH

    data = os.urandom(WHOLE_FILE_FETCH - 5)
    (stack.src / "small").write_bytes(data)
    reads: list[tuple[int, int]] = []
    real = stack.backing.read

    def counting(path: Any, offset: int, size: int) -> bytes:
        reads.append((offset, size))
        return real(path, offset, size)

    stack.backing.read = counting  # type: ignore[method-assign]
    fh = await stack.open("small")
    try:
        assert await stack.fs.read(fh, 300_000, 4096) == data[300_000:304_096]
        assert reads == [(0, len(data))], "a cold read of a small file took more than one trip"
        assert await stack.fs.read(fh, 0, 4096) == data[:4096]
        assert await stack.fs.read(fh, len(data) - 10, 4096) == data[-10:]
        assert len(reads) == 1
    finally:
        await stack.fs.release(fh)
