"""Write-back: after `flusher.sync()` SRC equals the expected tree byte for byte.

The awkward cases: names reused after a rename, files written after their last name went,
directories renamed with dirty files inside, a directory replaced by a file and back, hard
links, RENAME_EXCHANGE, kill -9 before, during and between flush steps, files changed in SRC
behind safefs's back, a failing backing tree, and a lease lost before the flush.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from safefs.errors import BackingFailed, ReadOnly, SyncTimeout
from safefs.fs import RENAME_EXCHANGE
from safefs.layout import DIR as CONTROL_DIR_NAME
from safefs.testing import FaultPlan
from tests.fs.conftest import HOST, Stack, conflict_copies, files, leftovers, src_tree


async def synced(stack: Stack) -> dict[bytes, Any]:
    """Sync, check nothing is left pending or stray in SRC, and return SRC's tree."""
    await stack.flusher.sync(timeout=30)
    assert not stack.table.ops, stack.table.ops
    assert not [i.ino for i in stack.table.iter_dirty() if i.links], "dirty inodes left after sync"
    assert leftovers(stack.src) == []
    tree = src_tree(stack.src)
    assert tree == await stack.view(), "the mount shows something else than SRC after sync"
    return tree


# ---------------------------------------------------------------------------- names


async def test_rename_then_create_under_the_old_name(stack: Stack) -> None:
    (stack.src / "a").write_bytes(b"old a")
    await stack.rename("a", "b")
    await stack.create("a", b"new a")
    assert await synced(stack) == files(a=b"new a", b=b"old a")


async def test_atomic_save_pattern(stack: Stack) -> None:
    """Write a temp file, rename it over the original: SRC ends with the new content only."""
    (stack.src / "doc").write_bytes(b"v1")
    await stack.create("doc.tmp", b"v2")
    await stack.rename("doc.tmp", "doc")
    await stack.create("doc.tmp", b"v3")
    await stack.rename("doc.tmp", "doc")
    assert await synced(stack) == files(doc=b"v3")


async def test_chain_of_renames_through_reused_names(stack: Stack) -> None:
    (stack.src / "a").write_bytes(b"A")
    (stack.src / "b").write_bytes(b"B")
    await stack.rename("a", "tmp")
    await stack.rename("b", "a")
    await stack.rename("tmp", "b")
    await stack.create("tmp", b"T")
    await stack.rename("tmp", "c")
    await stack.create("tmp", b"T2")
    assert await synced(stack) == files(a=b"B", b=b"A", c=b"T", tmp=b"T2")


async def test_new_file_renamed_then_removed_never_reaches_src(stack: Stack) -> None:
    await stack.create("x", b"x")
    await stack.rename("x", "y")
    await stack.write("y", b"more", 1)
    await stack.unlink("y")
    stack.backing.faults = faults = FaultPlan()
    assert await synced(stack) == {}
    published = [path for op, path in faults.calls if op in ("publish_atomic", "write_ranges", "mknod")]
    assert all(path[:1] == (b".safefs",) for path in published), published


async def test_write_to_a_file_unlinked_while_open(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"in src")
    await stack.create("g", b"new")
    fh_f = await stack.open("f", os.O_RDWR)
    fh_g = await stack.open("g", os.O_RDWR)
    await stack.unlink("f")
    await stack.unlink("g")
    assert await stack.fs.write(fh_f, 2, b"XX") == 2
    assert await stack.fs.write(fh_g, 0, b"NEW!") == 4
    await stack.create("f", b"replacement")
    assert await synced(stack) == files(f=b"replacement")
    # The open files still read what was written to them.
    assert await stack.read_fh(fh_f) == b"inXXrc"
    assert await stack.read_fh(fh_g) == b"NEW!"
    await stack.fs.release(fh_f)
    await stack.fs.release(fh_g)
    assert await synced(stack) == files(f=b"replacement")


async def test_rename_a_directory_that_holds_dirty_files(stack: Stack) -> None:
    (stack.src / "d" / "sub").mkdir(parents=True)
    (stack.src / "d" / "x").write_bytes(b"x0")
    (stack.src / "d" / "sub" / "z").write_bytes(b"z0")
    (stack.src / "d" / "untouched").write_bytes(b"u")
    await stack.write("d/x", b"x1")
    await stack.write("d/sub/z", b"Z", 1)
    await stack.create("d/y", b"y-new")
    await stack.create("d/sub/w", b"w-new")
    await stack.rename("d", "e")
    await stack.write("e/y", b"Y")
    await stack.mkdir("d")  # and the old name comes back as an empty directory
    assert await synced(stack) == files(
        d=None, e=None, **{"e/x": b"x1", "e/y": b"Y-new", "e/untouched": b"u", "e/sub": None,
                           "e/sub/z": b"zZ", "e/sub/w": b"w-new"}
    )  # fmt: skip


async def test_rename_dirty_directories_into_each_other(stack: Stack) -> None:
    (stack.src / "a").mkdir()
    (stack.src / "b").mkdir()
    (stack.src / "a" / "f").write_bytes(b"af")
    await stack.write("a/f", b"AF")
    await stack.rename("b", "a/b")
    await stack.create("a/b/g", b"g")
    await stack.rename("a", "c")
    await stack.rename("c/b", "b")
    assert await synced(stack) == files(b=None, c=None, **{"b/g": b"g", "c/f": b"AF"})


async def test_replace_a_directory_by_a_file_and_a_file_by_a_directory(stack: Stack) -> None:
    (stack.src / "d").mkdir()
    (stack.src / "d" / "inner").write_bytes(b"i")
    (stack.src / "f").write_bytes(b"f")
    await stack.unlink("d/inner")
    await stack.rmdir("d")
    await stack.create("d", b"now a file")
    await stack.unlink("f")
    await stack.mkdir("f")
    await stack.create("f/inner", b"now in a dir")
    assert await synced(stack) == files(d=b"now a file", f=None, **{"f/inner": b"now in a dir"})


async def test_replace_by_rename_over(stack: Stack) -> None:
    (stack.src / "d1").mkdir()
    (stack.src / "d1" / "x").write_bytes(b"x")
    (stack.src / "d2").mkdir()
    (stack.src / "f1").write_bytes(b"f1")
    (stack.src / "f2").write_bytes(b"f2")
    await stack.rename("d1", "d2")  # over an empty directory
    await stack.rename("f1", "f2")  # over a file
    assert await synced(stack) == files(d2=None, f2=b"f1", **{"d2/x": b"x"})


async def test_symlinks_and_special_files(stack: Stack) -> None:
    await stack.symlink("target/../x", "ln")
    await stack.mkdir("d")
    await stack.symlink("../ln", "d/ln2")
    await stack.rename("ln", "ln3")
    p = await stack.resolve("")
    await stack.fs.mknod(p.ino, b"fifo", stat.S_IFIFO | 0o640, 0, os.getuid(), os.getgid())
    assert await synced(stack) == {
        b"d": ("dir",), b"d/ln2": ("link", b"../ln"), b"ln3": ("link", b"target/../x"),
        b"fifo": ("special", stat.S_IFIFO),
    }  # fmt: skip
    assert stat.S_ISFIFO(os.lstat(stack.src / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(stack.src / "fifo").st_mode) == 0o640


async def test_unlinked_open_file_in_a_removed_directory(stack: Stack) -> None:
    (stack.src / "d").mkdir()
    (stack.src / "d" / "f").write_bytes(b"in d")
    fh = await stack.open("d/f", os.O_RDWR)
    await stack.unlink("d/f")
    await stack.rmdir("d")
    await stack.fs.write(fh, 0, b"IN")
    await stack.create("d", b"a file where the dir was")
    assert await synced(stack) == files(d=b"a file where the dir was")
    assert await stack.read_fh(fh) == b"IN d"
    await stack.fs.release(fh)


async def shuffle_workload(stack: Stack) -> dict[bytes, Any]:
    """Directories with dirty files inside swapped, moved across and exchanged."""
    for d in ("a", "b"):
        (stack.src / d / "sub").mkdir(parents=True)
        (stack.src / d / "f").write_bytes(d.encode() * 3)
        (stack.src / d / "sub" / "g").write_bytes(d.encode() * 5)
    await stack.write("a/f", b"A")
    await stack.write("b/sub/g", b"B")
    await stack.rename("a", "tmp")  # swap a and b through a third name
    await stack.rename("b", "a")
    await stack.rename("tmp", "b")
    await stack.rename("a/sub", "b/sub2")  # move a subtree across
    await stack.rename("b", "a", RENAME_EXCHANGE)  # and swap them back
    await stack.mkdir("n")
    await stack.rename("a/sub2", "n/moved")
    await stack.create("n/moved/new", b"new")
    await stack.rename("n", "a/sub/n")  # a new directory into an old one
    return files(
        a=None, b=None,
        **{"a/f": b"Aaa", "a/sub": None, "a/sub/g": b"aaaaa", "b/f": b"bbb", "a/sub/n": None,
           "a/sub/n/moved": None, "a/sub/n/moved/g": b"Bbbbb", "a/sub/n/moved/new": b"new"},
    )  # fmt: skip


async def test_directory_shuffle(stack: Stack) -> None:
    expected = await shuffle_workload(stack)
    assert await stack.view() == expected
    assert await synced(stack) == expected


async def test_large_existing_files_are_written_in_place(make_stack: Callable[..., Awaitable[Stack]]) -> None:
    stack = await make_stack(publish_threshold=64 * 1024)
    (stack.src / "big").write_bytes(b"b" * 1_000_000)
    (stack.src / "small").write_bytes(b"s" * 1000)
    os.setxattr(stack.src / "big", b"user.keep", b"1")
    os.setxattr(stack.src / "small", b"user.keep", b"2")
    big_ino = os.lstat(stack.src / "big").st_ino
    await stack.write("big", b"XYZ", 500_000)
    await stack.write("small", b"S")
    written = stack.backing.bytes_written
    assert await synced(stack) == files(big=b"b" * 500_000 + b"XYZ" + b"b" * 499_997, small=b"S" + b"s" * 999)
    assert os.lstat(stack.src / "big").st_ino == big_ino  # in place
    published = stack.backing.bytes_written - written
    assert published < 200_000  # only about the dirty range, not the megabyte
    # Both kept their extended attributes (the small one was replaced by a new file).
    assert os.getxattr(stack.src / "big", b"user.keep") == b"1"
    assert os.getxattr(stack.src / "small", b"user.keep") == b"2"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to other ids needs root")
async def test_ownership_and_times_reach_src(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"f")
    f = await stack.resolve("f")
    await stack.fs.setattr(f.ino, uid=1234, gid=5678)
    await stack.fs.setattr(f.ino, mode=0o4750)  # setuid must survive the chown (order matters)
    await stack.fs.setattr(f.ino, mtime_ns=1_000_000_001, atime_ns=2_000_000_002)
    g = await stack.create("g", b"g", mode=0o640)
    await stack.fs.setattr(g.ino, uid=4321, gid=8765, mtime_ns=3_000_000_003)
    await stack.flusher.sync(timeout=30)  # (synced() would read "f" from SRC and move its atime)
    st = os.lstat(stack.src / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4750)
    assert (st.st_mtime_ns, st.st_atime_ns) == (1_000_000_001, 2_000_000_002)
    st = os.lstat(stack.src / "g")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (4321, 8765, 0o640, 3_000_000_003)


async def test_xattrs_set_and_removed_reach_src(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"f")
    os.setxattr(stack.src / "f", b"user.old", b"1")
    os.setxattr(stack.src / "f", b"user.keep", b"k")
    os.symlink("f", stack.src / "ln")
    f = await stack.resolve("f")
    assert sorted(await stack.fs.listxattr(f.ino)) == [b"user.keep", b"user.old"]
    await stack.fs.removexattr(f.ino, b"user.old")
    await stack.fs.setxattr(f.ino, b"user.new", b"\x00binary\xff")
    d = await stack.mkdir("d")
    await stack.fs.setxattr(d.ino, b"user.dir", b"yes")
    await stack.rename("ln", "d/ln")
    await stack.flusher.sync(timeout=30)
    assert sorted(os.listxattr(stack.src / "f")) == ["user.keep", "user.new"]
    assert os.getxattr(stack.src / "f", b"user.new") == b"\x00binary\xff"
    assert os.getxattr(stack.src / "d", b"user.dir") == b"yes"
    assert os.readlink(stack.src / "d" / "ln") == "f"
    assert (stack.src / "f").read_bytes() == b"f"


# ---------------------------------------------------------------------------- made and removed again


def record_backing_changes(stack: Stack) -> list[tuple[str, Any]]:
    """Every change to the project outside its control dir from now on: (method, path)."""
    calls: list[tuple[str, Any]] = []
    for name in ("mkdir", "symlink", "mknod", "link", "unlink", "rmdir", "rename", "publish_atomic", "write_ranges"):
        real = getattr(stack.backing, name)

        def call(*args: Any, _real: Callable[..., Any] = real, _name: str = name, **kwargs: Any) -> Any:
            path = next((a for a in args if isinstance(a, tuple) and a and isinstance(a[0], bytes)), None)
            if path is None or path[0] != CONTROL_DIR_NAME:
                calls.append((_name, path))
            return _real(*args, **kwargs)

        setattr(stack.backing, name, call)
    return calls


async def test_a_tree_made_and_removed_before_write_back_never_reaches_the_project(stack: Stack) -> None:
    """An extracted tree removed again, a build's temporary files, SQLite's rollback journal:
    what the project never got, the op log forgets on removal, so the write-back makes and
    removes nothing on the project for it (on NFS, each of those is a round trip or more)."""
    (stack.src / "keep").mkdir()
    await stack.mkdir("keep/t")
    await stack.create("keep/t/f", b"data")
    await stack.symlink("f", "keep/t/l")
    await stack.unlink("keep/t/f")
    await stack.unlink("keep/t/l")
    await stack.rmdir("keep/t")
    assert not stack.table.ops, "the removals left the creates (or their own ops) to replay"
    calls = record_backing_changes(stack)
    assert await synced(stack) == files(keep=None)
    assert calls == []
    # The directory's times moved with the create and the removal: the project gets them.
    keep = await stack.resolve("keep")
    assert os.stat(stack.src / "keep").st_mtime_ns == keep.mtime_ns


async def test_a_removal_survives_kill_9_with_the_create_it_cancelled(stack: Stack) -> None:
    await stack.create("f", b"gone")
    await stack.create("g", b"kept")
    await stack.unlink("f")
    await stack.crash_and_replay()
    assert [op.kind for op in stack.table.ops.values()] == ["create"]
    assert await synced(stack) == files(g=b"kept")


async def test_a_new_object_renamed_or_linked_before_its_removal_is_still_replayed(stack: Stack) -> None:
    """The later op names the object, so its create must reach the project first: the
    rename and the link replay against it."""
    await stack.create("a", b"A")
    await stack.rename("a", "b")
    await stack.unlink("b")
    await stack.create("c", b"C")
    await stack.link("c", "d")
    await stack.unlink("c")
    await stack.mkdir("e")
    await stack.create("e/f", b"F")
    await stack.rename("e/f", "f")
    await stack.rmdir("e")
    assert [op.kind for op in stack.table.ops.values()] == [
        "create", "rename", "unlink", "create", "link", "unlink", "mkdir", "create", "rename", "rmdir",
    ]  # fmt: skip
    assert await synced(stack) == files(d=b"C", f=b"F")


async def test_a_removal_during_the_replay_of_its_create_is_replayed_too(stack: Stack) -> None:
    """The create being replayed may already have made the file on the project: its removal
    is then logged as usual, never folded into it."""
    await stack.create("f", b"data")
    replaying, go = trio.Event(), threading.Event()
    token = trio.lowlevel.current_trio_token()
    real_exists = stack.backing.exists

    def exists(path: Any) -> bool:
        if path[-1:] == (b"f",):
            token.run_sync_soon(replaying.set)
            assert go.wait(30), "the test never let the replay go on"
        return real_exists(path)

    stack.backing.exists = exists  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(stack.flusher.sync, timeout=30))
            try:
                with trio.fail_after(30):
                    await replaying.wait()
                await stack.unlink("f")
                logged = [op.kind for op in stack.table.ops.values()]
            finally:
                go.set()
    finally:
        stack.backing.exists = real_exists  # type: ignore[method-assign]
    assert logged == ["create", "unlink"]
    assert await synced(stack) == {}


# ---------------------------------------------------------------------------- hard links


async def test_hard_links_made_in_the_cache(stack: Stack) -> None:
    await stack.create("a", b"one")
    await stack.link("a", "b")
    await stack.write("b", b"ONE")
    await stack.mkdir("d")
    await stack.link("a", "d/c")
    await stack.unlink("a")
    assert await synced(stack) == files(b=b"ONE", d=None, **{"d/c": b"ONE"})
    assert os.lstat(stack.src / "b").st_ino == os.lstat(stack.src / "d" / "c").st_ino
    # A later write through one name shows through the other on SRC too.
    await stack.write("d/c", b"two", 0)
    assert await synced(stack) == files(b=b"two", d=None, **{"d/c": b"two"})
    assert os.lstat(stack.src / "b").st_ino == os.lstat(stack.src / "d" / "c").st_ino


async def test_hard_links_in_src_stay_links(stack: Stack) -> None:
    (stack.src / "h1").write_bytes(b"shared")
    os.link(stack.src / "h1", stack.src / "h2")
    h1 = await stack.resolve("h1")
    h2 = await stack.resolve("h2")
    assert h1.ino == h2.ino and h1.nlink == 2
    await stack.write("h1", b"SH")
    assert await stack.read("h2") == b"SHared"
    assert await synced(stack) == files(h1=b"SHared", h2=b"SHared")
    assert os.lstat(stack.src / "h1").st_ino == os.lstat(stack.src / "h2").st_ino


async def test_hard_link_whose_other_name_was_never_looked_at(stack: Stack) -> None:
    """A file with a second name in a directory the mount never listed is still one file:
    publishing it must not break the link (a staging file renamed over one name would).
    """
    (stack.src / "a").mkdir()
    (stack.src / "b").mkdir()
    (stack.src / "a" / "h").write_bytes(b"shared")
    os.link(stack.src / "a" / "h", stack.src / "b" / "h")
    await stack.write("a/h", b"SH")
    await stack.flusher.sync(timeout=30)
    assert (stack.src / "a" / "h").read_bytes() == b"SHared"
    assert os.lstat(stack.src / "a" / "h").st_ino == os.lstat(stack.src / "b" / "h").st_ino
    assert (stack.src / "b" / "h").read_bytes() == b"SHared"


# ---------------------------------------------------------------------------- exchange


async def test_rename_exchange(stack: Stack) -> None:
    (stack.src / "a").write_bytes(b"A")
    (stack.src / "b").write_bytes(b"B")
    (stack.src / "d").mkdir()
    (stack.src / "d" / "in").write_bytes(b"in d")
    await stack.rename("a", "b", RENAME_EXCHANGE)
    await stack.write("a", b"b", 0)  # "a" is the old b now
    await stack.rename("d", "b", RENAME_EXCHANGE)  # a directory with a file
    assert await stack.read("d") == b"A"
    assert await synced(stack) == files(a=b"b", b=None, d=b"A", **{"b/in": b"in d"})


async def test_rename_exchange_with_a_new_file(stack: Stack) -> None:
    (stack.src / "old").write_bytes(b"old")
    await stack.create("new", b"new")
    await stack.rename("new", "old", RENAME_EXCHANGE)
    assert await synced(stack) == files(old=b"new", new=b"old")
    # And both new: neither has reached SRC.
    await stack.create("p", b"p")
    await stack.create("q", b"q")
    await stack.rename("p", "q", RENAME_EXCHANGE)
    assert await synced(stack) == files(old=b"new", new=b"old", p=b"q", q=b"p")


# ---------------------------------------------------------------------------- crashes


async def awkward_workload(stack: Stack) -> dict[bytes, Any]:
    """A mix of the awkward cases on a small SRC; returns the tree SRC must end up as."""
    (stack.src / "d" / "sub").mkdir(parents=True)
    (stack.src / "d" / "x").write_bytes(b"x0" * 1000)
    (stack.src / "d" / "sub" / "z").write_bytes(b"z0")
    (stack.src / "a").write_bytes(b"A" * 5000)
    (stack.src / "b").write_bytes(b"B")
    (stack.src / "gone").mkdir()
    (stack.src / "gone" / "g").write_bytes(b"g")
    (stack.src / "h1").write_bytes(b"hard")
    os.link(stack.src / "h1", stack.src / "h2")

    await stack.write("d/x", b"X1", 10)
    await stack.create("d/y", b"y-new")
    await stack.rename("d", "e")
    await stack.rename("a", "a2")
    await stack.create("a", b"second a")
    await stack.rename("a2", "b", RENAME_EXCHANGE)
    await stack.unlink("gone/g")
    await stack.rmdir("gone")
    await stack.create("gone", b"a file now")
    await stack.write("h2", b"H")
    await stack.link("h1", "e/h3")
    await stack.truncate("e/sub/z", 1)
    await stack.mkdir("n")
    await stack.create("n/deep", b"deep")
    await stack.symlink("n/deep", "ln")
    return {
        **files(
            a=b"second a", a2=b"B", b=b"A" * 5000, e=None, gone=b"a file now", h1=b"Hard", h2=b"Hard", n=None,
            **{"e/sub": None, "e/sub/z": b"z", "e/x": b"x0" * 5 + b"X1" + b"x0" * 994, "e/y": b"y-new",
               "e/h3": b"Hard", "n/deep": b"deep"},
        ),
        b"ln": ("link", b"n/deep"),
    }  # fmt: skip


async def test_crash_before_any_flush(stack: Stack) -> None:
    expected = await awkward_workload(stack)
    await stack.crash_and_replay()
    assert await stack.view() == expected
    assert await synced(stack) == expected
    assert conflict_copies(stack.src) == []
    assert os.lstat(stack.src / "h1").st_ino == os.lstat(stack.src / "e" / "h3").st_ino


async def test_crash_after_some_ops_were_replayed(stack: Stack) -> None:
    expected = await awkward_workload(stack)
    stack.backing.faults = faults = FaultPlan()
    faults.fail("unlink", errno.EIO)  # the replay stops at the first unlink
    with pytest.raises(BackingFailed):
        await stack.flusher.flush(everything=True)
    assert stack.table.ops and len(stack.table.ops) < 15
    assert (stack.src / "e").is_dir()  # the first ops did reach SRC
    await stack.crash_and_replay()
    assert await stack.view() == expected
    assert await synced(stack) == expected
    assert conflict_copies(stack.src) == []


async def test_crash_twice_and_flush_in_between(stack: Stack) -> None:
    expected = await awkward_workload(stack)
    stack.clock.advance(stack.config.writeback_delay + 1)
    await stack.crash_and_replay()
    await stack.flusher.flush(everything=False)
    await stack.crash_and_replay()
    assert await synced(stack) == expected
    await stack.crash_and_replay()
    assert await synced(stack) == expected
    assert conflict_copies(stack.src) == []


WORKLOADS = {"awkward": awkward_workload, "shuffle": shuffle_workload}


@pytest.mark.parametrize("after", [False, True], ids=["before-call", "after-call"])
@pytest.mark.parametrize("at", range(1, 40))
@pytest.mark.parametrize("workload", list(WORKLOADS))
async def test_crash_in_the_middle_of_a_flush(stack: Stack, workload: str, at: int, after: bool) -> None:
    """kill -9 at the `at`-th call into the backing tree (before it starts, or after it took
    effect but before safefs recorded that), then replay and sync.
    """
    expected = await WORKLOADS[workload](stack)
    crashed = await stack.crash_during(lambda: stack.flusher.sync(timeout=30), at, after=after)
    if not crashed:
        pytest.skip(f"the sync made fewer than {at} backing calls")
    where = stack.last_crash.calls[-1]
    # (Reads between the restart and the replay: see test_reads_between_a_crash_and_the_replay.)
    assert await synced(stack) == expected, f"crash at {where}"
    assert conflict_copies(stack.src) == [], f"crash at {where}: a replay mistook its own work for a conflict"
    if workload == "awkward":
        assert os.lstat(stack.src / "h1").st_ino == os.lstat(stack.src / "e" / "h3").st_ino


# Each backing call that changes the namespace, killed right after it took effect and before
# the flusher recorded that: the replay must find the effect already there and carry on.


async def test_crash_after_a_replayed_rename(stack: Stack) -> None:
    (stack.src / "a").write_bytes(b"A" * 1000)
    (stack.src / "d").mkdir()
    (stack.src / "d" / "f").write_bytes(b"F" * 1000)
    await stack.rename("a", "b")
    await stack.rename("d", "e")
    assert await stack.crash_during(lambda: stack.flusher.sync(timeout=30), 1, after=True, only="rename")
    await stack.flusher.sync(timeout=30)
    assert src_tree(stack.src) == files(b=b"A" * 1000, e=None, **{"e/f": b"F" * 1000})
    # The mount knows where the objects are now: reads fetch, writes reach them.
    assert await stack.read("b") == b"A" * 1000
    await stack.write("e/f", b"f", 0)
    assert await synced(stack) == files(b=b"A" * 1000, e=None, **{"e/f": b"f" + b"F" * 999})
    assert conflict_copies(stack.src) == []


async def test_reads_between_a_crash_and_the_replay(stack: Stack) -> None:
    """Right after a restart (before the flusher's first pass, which waits the write-back
    delay) a file whose rename reached SRC just before the crash must still be readable
    (the stack, like the daemon, settles the interrupted op at start-up).
    """
    (stack.src / "a").write_bytes(b"A" * 1000)
    await stack.rename("a", "b")
    assert await stack.crash_during(lambda: stack.flusher.sync(timeout=30), 1, after=True, only="rename")
    assert await stack.read("b") == b"A" * 1000


async def test_crash_after_a_replayed_exchange(stack: Stack) -> None:
    (stack.src / "a").write_bytes(b"A")
    (stack.src / "b").write_bytes(b"B")
    await stack.rename("a", "b", RENAME_EXCHANGE)
    assert await stack.crash_during(lambda: stack.flusher.sync(timeout=30), 1, after=True, only="rename")
    # Exchanging twice undoes it: the replay must not exchange again.
    assert await synced(stack) == files(a=b"B", b=b"A")


async def test_crash_between_two_exchanges_of_the_same_pair(stack: Stack) -> None:
    """Found by test_model. Exchanging a and b twice is the identity; a crash after the first
    exchange was replayed and recorded, just before the second starts, must not make the
    replay take the second for already done.
    """
    (stack.src / "a").write_bytes(b"A")
    (stack.src / "b").write_bytes(b"B")
    await stack.rename("a", "b", RENAME_EXCHANGE)
    await stack.rename("a", "b", RENAME_EXCHANGE)
    assert await stack.view() == files(a=b"A", b=b"B")
    # Each exchange looks at both names (2 lstats) before it renames: the 3rd lstat is the
    # second exchange's first step.
    assert await stack.crash_during(lambda: stack.flusher.sync(timeout=30), 3, only="lstat")
    assert stack.last_crash.calls.count("rename") == 1
    assert await synced(stack) == files(a=b"A", b=b"B")


@pytest.mark.parametrize("method", ["symlink", "mknod", "mkdir", "link", "unlink", "rmdir", "publish_atomic",
                                    "write_ranges", "set_attrs"])  # fmt: skip
async def test_crash_after_a_replayed_step(make_stack: Callable[..., Awaitable[Stack]], method: str) -> None:
    stack = await make_stack(publish_threshold=100)  # "big" is written in place
    (stack.src / "old").mkdir()
    (stack.src / "f").write_bytes(b"f")
    (stack.src / "big").write_bytes(b"b" * 1000)
    await stack.rmdir("old")
    await stack.symlink("f", "ln")
    p = await stack.resolve("")
    await stack.fs.mknod(p.ino, b"fifo", stat.S_IFIFO | 0o600, 0, os.getuid(), os.getgid())
    await stack.mkdir("d")
    await stack.create("d/new", b"new")
    await stack.link("f", "d/f2")
    await stack.write("f", b"F")
    await stack.unlink("d/f2")
    await stack.fs.setattr(p.ino, mode=0o751)
    await stack.write("big", b"B", 500)
    expected = {
        **files(f=b"F", d=None, big=b"b" * 500 + b"B" + b"b" * 499, **{"d/new": b"new"}),
        b"ln": ("link", b"f"),
        b"fifo": ("special", stat.S_IFIFO),
    }
    assert await stack.crash_during(lambda: stack.flusher.sync(timeout=30), 1, after=True, only=method)
    assert await synced(stack) == expected
    assert conflict_copies(stack.src) == [], f"a replayed {method} was taken for a conflict"
    assert stat.S_IMODE(os.lstat(stack.src).st_mode) == 0o751


# ---------------------------------------------------------------------------- conflicts


async def test_file_changed_in_src_while_dirty_keeps_both_versions(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"original")
    (stack.src / "other").write_bytes(b"o")
    assert await stack.read("f") == b"original"
    await stack.write("f", b"MINE", 0)
    await stack.write("other", b"O")
    (stack.src / "f").write_bytes(b"theirs, written behind safefs's back")
    await stack.flusher.sync(timeout=30)

    copies = conflict_copies(stack.src)
    assert len(copies) == 1
    name = os.path.basename(copies[0])
    assert name.startswith(f"f.safefs-conflict-{HOST}-")
    assert (stack.src / "f").read_bytes() == b"theirs, written behind safefs's back"
    assert Path(copies[0]).read_bytes() == b"MINEinal"
    assert (stack.src / "other").read_bytes() == b"O"  # the rest was flushed normally
    conflicts = stack.flusher.statistics().conflicts
    assert [c["path"] for c in conflicts] == ["f"]
    assert conflicts[0]["kept_as"] == name
    # The mount shows both versions too, under the same names as SRC.
    assert await stack.read("f") == b"theirs, written behind safefs's back"
    assert await stack.read(name) == b"MINEinal"
    assert src_tree(stack.src) == await stack.view()


async def test_two_conflicts_on_one_file_in_the_same_second_keep_both_copies(stack: Stack) -> None:
    """Conflict copies are named by host and time to the second; a second conflict on the
    same file within that second must not replace the first copy (our first version).
    """
    (stack.src / "f").write_bytes(b"original")
    assert await stack.read("f") == b"original"
    await stack.write("f", b"MINE1", 0)
    (stack.src / "f").write_bytes(b"theirs, first")
    await stack.flusher.sync(timeout=30)
    assert [Path(p).read_bytes() for p in conflict_copies(stack.src)] == [b"MINE1nal"]

    stack.clock.advance(0.2)
    assert await stack.read("f") == b"theirs, first"
    await stack.write("f", b"MINE2", 0)
    (stack.src / "f").write_bytes(b"theirs, second one")
    await stack.flusher.sync(timeout=30)
    kept = sorted(Path(p).read_bytes() for p in conflict_copies(stack.src))
    assert kept == [b"MINE1nal", b"MINE2s, first"]
    assert len(stack.flusher.statistics().conflicts) == 2
    assert (stack.src / "f").read_bytes() == b"theirs, second one"


async def test_file_removed_in_src_while_dirty_is_kept(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"original")
    assert await stack.read("f") == b"original"
    await stack.write("f", b"MINE", 0)
    os.unlink(stack.src / "f")
    await stack.flusher.sync(timeout=30)
    kept = [Path(p).read_bytes() for p in conflict_copies(stack.src)] + (
        [(stack.src / "f").read_bytes()] if (stack.src / "f").exists() else []
    )
    assert b"MINEinal" in kept


def kept_versions(src: Path, name: str) -> list[bytes]:
    """The contents SRC holds under `name` and its conflict copies."""
    paths = [Path(p) for p in conflict_copies(src) if os.path.basename(p).startswith(name + ".")]
    if (src / name).exists():
        paths.append(src / name)
    return sorted(p.read_bytes() for p in paths)


async def test_unlink_of_a_file_changed_behind_our_back_keeps_their_version(stack: Stack) -> None:
    """Removing a name removes what the user saw; someone else's newer version is kept."""
    (stack.src / "f").write_bytes(b"original")
    assert await stack.read("f") == b"original"
    (stack.src / "f").write_bytes(b"theirs, written behind safefs's back")
    await stack.unlink("f")
    await stack.flusher.sync(timeout=30)
    assert kept_versions(stack.src, "f") == [b"theirs, written behind safefs's back"]


async def test_rename_over_a_file_changed_behind_our_back_keeps_their_version(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"original")
    (stack.src / "g").write_bytes(b"ours")
    assert await stack.read("f") == b"original"
    await stack.resolve("g")
    tmp = stack.src / "f.tmp"  # replaced by rename, the way editors save
    tmp.write_bytes(b"theirs")
    os.rename(tmp, stack.src / "f")
    await stack.rename("g", "f")
    await stack.flusher.sync(timeout=30)
    assert kept_versions(stack.src, "f") == [b"ours", b"theirs"]


async def test_rmdir_of_a_directory_filled_behind_our_back_keeps_its_files(stack: Stack) -> None:
    (stack.src / "d").mkdir()
    assert await stack.listdir("d") == []
    (stack.src / "d" / "theirs").write_bytes(b"t")
    await stack.rmdir("d")
    await stack.flusher.sync(timeout=30)
    kept = [p for p in conflict_copies(stack.src) if os.path.basename(p).startswith("d.")]
    assert [os.listdir(p) for p in kept] == [["theirs"]]


async def test_rename_onto_a_name_taken_behind_our_back_keeps_both(stack: Stack) -> None:
    (stack.src / "a").write_bytes(b"ours")
    assert await stack.listdir() == [b"a"]
    (stack.src / "b").write_bytes(b"theirs")  # after the mount listed the directory
    await stack.rename("a", "b")
    await stack.flusher.sync(timeout=30)
    assert kept_versions(stack.src, "b") == [b"ours", b"theirs"]
    assert not (stack.src / "a").exists()


async def test_object_in_the_way_of_a_new_name_is_kept(stack: Stack) -> None:
    await stack.resolve("")
    await stack.listdir()
    await stack.create("x", b"ours")
    (stack.src / "x").write_bytes(b"someone else's")  # appeared after the mount listed the dir
    await stack.flusher.sync(timeout=30)
    copies = conflict_copies(stack.src)
    kept = sorted([(stack.src / "x").read_bytes()] + [Path(p).read_bytes() for p in copies])
    assert kept == [b"ours", b"someone else's"]


# ---------------------------------------------------------------------------- faults, lease


async def test_backing_fault_is_recorded_and_a_later_sync_succeeds(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"f")
    await stack.write("f", b"F")
    await stack.create("g", b"g")
    before = src_tree(stack.src)
    stack.backing.faults = faults = FaultPlan()
    faults.fail("publish_atomic", errno.EIO)

    with pytest.raises(BackingFailed):
        await stack.flusher.flush(everything=True)
    stats = stack.flusher.statistics()
    assert stats.errors and "Input/output error" in stats.errors[0].error
    assert stats.pending_ops == 1 and stats.dirty_files >= 2
    assert src_tree(stack.src) == before
    with pytest.raises(SyncTimeout):
        await stack.flusher.sync(timeout=1.5)
    assert src_tree(stack.src) == before

    faults.clear()
    stack.clock.advance(120)  # past any backoff
    assert await synced(stack) == files(f=b"F", g=b"g")
    assert stack.flusher.statistics().errors == ()


async def test_transient_fault_is_retried_by_sync(stack: Stack) -> None:
    await stack.create("g", b"g")
    await stack.mkdir("d")
    stack.backing.faults = faults = FaultPlan()
    faults.fail("mkdir", errno.ESTALE, times=2)
    assert await synced(stack) == files(g=b"g", d=None)


async def test_fault_after_a_crash_leaves_nothing_behind(stack: Stack) -> None:
    expected = await awkward_workload(stack)
    stack.backing.faults = faults = FaultPlan()
    faults.fail("rename", errno.EIO, times=3)
    with pytest.raises(BackingFailed):
        await stack.flusher.flush(everything=True)
    await stack.crash_and_replay()
    assert await synced(stack) == expected


async def test_lease_gate_stops_the_flusher(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"f")
    (stack.src / "d").mkdir()
    await stack.write("f", b"F")
    await stack.create("d/g", b"g")
    await stack.create("n", b"new")
    before = src_tree(stack.src, hide_control=False)
    stack.gate.readonly = True
    with pytest.raises(ReadOnly):
        await stack.flusher.flush(everything=True)
    stack.clock.advance(60)
    with pytest.raises(ReadOnly):
        await stack.flusher.flush(everything=False)
    assert src_tree(stack.src, hide_control=False) == before
    assert stack.backing.bytes_written == 0
    # The data is still there, and goes out once the lease is back.
    stack.gate.readonly = False
    assert await synced(stack) == files(f=b"F", d=None, n=b"new", **{"d/g": b"g"})


async def test_lease_lost_in_the_middle_of_a_flush(stack: Stack) -> None:
    """The gate is asked before each step: losing it mid-way stops the next step."""
    (stack.src / "d").mkdir()
    for i in range(5):
        await stack.create(f"d/f{i}", b"%d" % i)
    calls = 0
    real = stack.gate.require_writable

    def gate() -> int:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise ReadOnly("lost")
        return real()

    stack.gate.require_writable = gate  # type: ignore[method-assign]
    with pytest.raises(ReadOnly):
        await stack.flusher.flush(everything=True)
    assert len(os.listdir(stack.src / "d")) <= 2
    del stack.gate.require_writable
    assert await synced(stack) == files(d=None, **{f"d/f{i}": b"%d" % i for i in range(5)})


async def test_the_lease_is_asked_again_in_the_worker_thread_before_each_call(stack: Stack) -> None:
    """A lease lost (or a lock delay not over) while a call waited for a worker thread stops
    the call there: the trio-side check said yes, the thread's check says no."""
    (stack.src / "f").write_bytes(b"f")
    await stack.write("f", b"F")
    await stack.create("n", b"new")
    before = src_tree(stack.src, hide_control=False)
    stack.gate.publishable = lambda: False  # type: ignore[method-assign]
    with pytest.raises(ReadOnly):
        await stack.flusher.flush(everything=True)
    assert src_tree(stack.src, hide_control=False) == before
    assert stack.backing.bytes_written == 0
    del stack.gate.publishable
    assert await synced(stack) == files(f=b"F", n=b"new")


async def test_each_sync_publishes_a_new_generation(stack: Stack) -> None:
    import json

    stack.gate.epoch = 7
    await stack.create("f", b"1")
    await stack.flusher.sync(timeout=30)
    first = json.loads((stack.src / ".safefs" / "generation").read_bytes())
    assert (first["epoch"], first["host"]) == (7, HOST)
    await stack.flusher.sync(timeout=30)  # nothing changed: a sync still publishes one
    second = json.loads((stack.src / ".safefs" / "generation").read_bytes())
    assert second["generation"] == first["generation"] + 1
    await stack.crash_and_replay()  # the counter survives a restart
    await stack.write("f", b"2")
    await stack.flusher.sync(timeout=30)
    third = json.loads((stack.src / ".safefs" / "generation").read_bytes())
    assert third["generation"] > second["generation"]
    assert leftovers(stack.src) == []


def published_generation(stack: Stack) -> dict[str, Any]:
    import json

    return json.loads((stack.src / ".safefs" / "generation").read_bytes())  # type: ignore[no-any-return]


async def test_a_generation_names_every_directory_changed_since_the_last_and_no_other(stack: Stack) -> None:
    # Followers refresh only what a generation names (and nothing for an empty list): a
    # directory missing from it keeps showing them stale names.
    for d in ("a", "b", "c"):
        await stack.mkdir(d)
    await stack.create("a/f", b"1")
    await stack.flusher.sync(timeout=30)
    first = published_generation(stack)
    assert first["all"] is True, "the first generation of a writer names everything"
    await stack.write("a/f", b"2")
    await stack.flusher.sync(timeout=30)
    assert (published_generation(stack)["changed"], published_generation(stack)["all"]) == (["a"], False)
    await stack.flusher.sync(timeout=30)  # nothing changed: a generation that names nothing
    record = published_generation(stack)
    assert (record["v"], record["changed"], record["all"]) == (2, [], False)
    assert record["generation"] == first["generation"] + 2
    link = await stack.symlink("f", "b/link")
    await stack.flusher.sync(timeout=30)
    await stack.fs.setattr(link.ino, uid=1234)  # an attribute-only change
    await stack.flusher.sync(timeout=30)
    assert published_generation(stack)["changed"] == ["b"]  # a follower reads it in b's listing
    await stack.write("a/f", b"3")  # changed on both sides: the copy goes beside it, in a/
    (stack.src / "a" / "f").write_bytes(b"theirs")
    await stack.rename("c", "a/c2")
    await stack.flusher.sync(timeout=30)
    assert published_generation(stack)["changed"] == [".", "a"]
    assert [name for name in os.listdir(stack.src / "a") if ".safefs-conflict-" in name]


async def test_a_failed_pass_leaves_what_it_changed_to_the_next_generation(stack: Stack) -> None:
    for d in ("x", "y"):
        await stack.mkdir(d)
    await stack.flusher.sync(timeout=30)
    await stack.create("x/f", b"f")
    await stack.create("y/g", b"g")
    stack.backing.faults = faults = FaultPlan()
    faults.fail("fsync_dir", errno.EIO, prefix=(b"y",), times=1)  # x/ is done and synced first
    with pytest.raises(BackingFailed):
        await stack.flusher.flush(everything=True)
    assert (stack.src / "x" / "f").read_bytes() == b"f" and (stack.src / "y" / "g").read_bytes() == b"g"
    await stack.flusher.sync(timeout=30)
    assert published_generation(stack)["changed"] == ["x", "y"]


# ---------------------------------------------------------------------------- write-back timing


async def test_background_flush_waits_for_quiet_files(make_stack: Callable[..., Awaitable[Stack]]) -> None:
    stack = await make_stack(writeback_delay=10)
    await stack.create("f", b"1")
    stack.clock.advance(6)
    await stack.write("f", b"2")
    stack.clock.advance(6)
    await stack.flusher.flush(everything=False)
    assert src_tree(stack.src) == {}  # the create is old enough, but the file is not quiet
    stack.clock.advance(5)
    await stack.flusher.flush(everything=False)
    assert src_tree(stack.src) == files(f=b"2")
    await stack.write("f", b"3")
    stack.clock.advance(5)
    await stack.flusher.flush(everything=False)
    assert src_tree(stack.src) == files(f=b"2")
    stack.clock.advance(6)
    await stack.flusher.flush(everything=False)
    assert src_tree(stack.src) == files(f=b"3")


async def test_a_file_written_for_ever_is_published_eventually(make_stack: Callable[..., Awaitable[Stack]]) -> None:
    stack = await make_stack(writeback_delay=2)
    await stack.create("log", b"")
    offset = 0
    for _ in range(200):  # 400 s of appends every 2 s: never quiet for a whole delay
        line = b"line %d\n" % offset
        await stack.write("log", line, offset)
        offset += len(line)
        stack.clock.advance(1.9)
        await stack.flusher.flush(everything=False)
        if (stack.src / "log").exists():
            break
    assert (stack.src / "log").exists(), "a busy new file never reached SRC"
    await stack.flusher.sync(timeout=30)
    assert (stack.src / "log").read_bytes() == await stack.read("log")


# ---------------------------------------------------------------------------- concurrency
# The daemon runs the flusher while requests keep coming. Each test holds one backing call of
# a flush (FaultPlan.hang), changes the cache meanwhile, lets the call go, and checks that the
# change is neither lost nor published under a stale name.


async def during_held_call(stack: Stack, op: str, change: Callable[[], Awaitable[None]],
                           prefix: tuple[bytes, ...] | None = None) -> None:
    stack.backing.faults = faults = FaultPlan()
    hang = faults.hang(op, prefix=prefix)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: stack.flusher.sync(timeout=30))
        with trio.fail_after(10):
            await trio.to_thread.run_sync(hang.entered.wait)
        try:
            await change()
        finally:
            hang.release()
    stack.backing.faults = None


async def test_write_while_the_file_is_published(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"0" * 100)
    await stack.write("f", b"1", 0)
    await during_held_call(stack, "publish_atomic", lambda: stack.write("f", b"2", 1))
    assert await stack.read("f") == b"12" + b"0" * 98
    assert await synced(stack) == files(f=b"12" + b"0" * 98)


async def test_rename_while_the_file_is_published(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"0" * 100)
    await stack.write("f", b"1", 0)
    await during_held_call(stack, "publish_atomic", lambda: stack.rename("f", "g"))
    assert await synced(stack) == files(g=b"1" + b"0" * 99)


async def test_unlink_while_the_file_is_published(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"0" * 100)
    await stack.write("f", b"1", 0)
    await during_held_call(stack, "publish_atomic", lambda: stack.unlink("f"))
    assert await synced(stack) == {}


async def test_directory_renamed_while_a_file_inside_is_published(stack: Stack) -> None:
    (stack.src / "d").mkdir()
    (stack.src / "d" / "f").write_bytes(b"0" * 100)
    await stack.write("d/f", b"1", 0)

    async def change() -> None:
        await stack.rename("d", "e")
        await stack.write("e/f", b"2", 1)

    await during_held_call(stack, "publish_atomic", change)
    assert await synced(stack) == files(e=None, **{"e/f": b"12" + b"0" * 98})


async def test_create_while_an_op_is_replayed(stack: Stack) -> None:
    await stack.mkdir("d")
    await stack.create("d/f", b"f")

    async def change() -> None:
        await stack.create("d/g", b"g")
        await stack.rename("d/f", "d/h")
        await stack.rename("d", "e")

    await during_held_call(stack, "mkdir", change)
    assert await synced(stack) == files(e=None, **{"e/g": b"g", "e/h": b"f"})


async def test_writes_while_the_flusher_runs_in_the_background(make_stack: Callable[..., Awaitable[Stack]]) -> None:
    """The background service with a zero write-back delay, against a stream of changes."""
    stack = await make_stack(writeback_delay=0.0)
    (stack.src / "d").mkdir()
    expected: dict[bytes, Any] = {b"d": ("dir",)}
    async with trio.open_nursery() as nursery:
        await nursery.start(stack.flusher.run)
        for i in range(60):
            name = f"d/f{i % 7}"
            data = b"%d-" % i * (i + 1)
            await stack.put(name, data)
            expected[name.encode()] = ("file", data)
            if i % 5 == 4:
                await stack.rename(name, f"d/r{i % 3}")
                expected[f"d/r{i % 3}".encode()] = expected.pop(name.encode())
            if i % 11 == 10:
                await stack.rename("d", "x")
                await stack.rename("x", "d")
            await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert await synced(stack) == expected


# ---------------------------------------------------------------------------- one-way conflicts


def _one_copy(src: Path, name: str) -> Path:
    copies = [Path(p) for p in conflict_copies(src) if os.path.basename(p).startswith(name + ".")]
    assert len(copies) == 1, f"want one conflict copy of {name}: {conflict_copies(src)}"
    assert re.fullmatch(re.escape(name) + rf"\.safefs-conflict-{HOST}-\d{{8}}-\d{{6}}", copies[0].name)
    return copies[0]


async def _their_x_appears(stack: Stack) -> None:
    await stack.resolve("")
    await stack.listdir()  # the mount listed the directory; then the project gets an x
    (stack.src / "x").write_bytes(b"theirs")


async def _create(stack: Stack) -> None:
    await stack.create("x", b"ours")


async def _symlink(stack: Stack) -> None:
    await stack.symlink("ours", "x")


async def _mkdir(stack: Stack) -> None:
    await stack.mkdir("x")
    await stack.create("x/inside", b"ours")


async def _link(stack: Stack) -> None:
    await stack.link("a", "x")


async def _rename(stack: Stack) -> None:
    await stack.rename("a", "x")


@pytest.mark.parametrize("op", [_create, _symlink, _mkdir, _link, _rename], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("crash_at", [None, 1])
async def test_the_projects_object_keeps_its_name(stack: Stack, op: Any, crash_at: int | None) -> None:
    """A name taken in the project before the mount's op reached it: the project's object
    stays; the mount's goes beside it, under the same name even after a crash mid-replay."""
    (stack.src / "a").write_bytes(b"ours")
    await _their_x_appears(stack)
    await op(stack)
    if crash_at is not None:
        # Crash right after the conflict copy's name was committed, before the project sees it.
        assert await stack.crash_during(lambda: stack.flusher.sync(timeout=30), crash_at,
                                        only={"_create": "publish_atomic", "_symlink": "symlink", "_mkdir": "mkdir",
                                              "_link": "link", "_rename": "rename"}[op.__name__])  # fmt: skip
    await stack.flusher.sync(timeout=30)
    assert (stack.src / "x").read_bytes() == b"theirs"
    copy = _one_copy(stack.src, "x")
    if op is _mkdir:
        assert (copy / "inside").read_bytes() == b"ours"
    elif op is _symlink:
        assert os.readlink(copy) == "ours"
    else:
        assert copy.read_bytes() == b"ours"
    assert src_tree(stack.src) == await stack.view()
    if crash_at is None:
        conflict = stack.flusher.statistics().conflicts
        assert [(c["path"], c["kept_as"]) for c in conflict] == [("x", copy.name)]
        assert conflict[0]["why"] and not isinstance(conflict[0]["time"], (int, float))


async def test_rename_over_a_file_changed_in_the_project_keeps_theirs_under_the_name(stack: Stack) -> None:
    (stack.src / "f").write_bytes(b"original")
    (stack.src / "g").write_bytes(b"ours")
    assert await stack.read("f") == b"original"
    await stack.resolve("g")
    (stack.src / "f").write_bytes(b"theirs!!")
    await stack.rename("g", "f")
    await stack.flusher.sync(timeout=30)
    assert (stack.src / "f").read_bytes() == b"theirs!!"
    assert _one_copy(stack.src, "f").read_bytes() == b"ours"
    assert not (stack.src / "g").exists()
    assert src_tree(stack.src) == await stack.view()
