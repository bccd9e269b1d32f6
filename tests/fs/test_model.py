"""A model check: random operation sequences against the real stack and a dict of contents.

Hypothesis generates a list of operations (write, truncate, rename, RENAME_EXCHANGE, hard
link, unlink, write to a file unlinked while open, fsync, background flush, sync, kill -9 and
replay, kill -9 in the middle of a sync). One example is one
`trio.run` that interprets the list on a fresh stack: the stack holds trio objects tied to
its run, so the run cannot span hypothesis steps. After every step, reads through the mount
must match the model; at the end, after a sync, SRC must match it byte for byte.

Two tests share the interpreter: `test_model` crashes between operations and just before a
call into the backing tree; `test_model_crash_after_backing_calls` also crashes just after a
backing call took effect and before the flusher recorded it (the hardest replay case).
`test_namespace_model` does the same for a tree of directories and files (mkdir, rmdir,
rename and exchange of whole subtrees), and checks every error the mount answers too.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, event, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from safefs.fs import RENAME_EXCHANGE
from tests.fs.conftest import Stack, conflict_copies, fails_with, leftovers, src_tree

NAMES = ["a", "b", "c", "d/x", "d/y"]  # "d" is a directory of SRC
BIG = 300 * 1024  # larger than two fetch blocks, so partial fetches happen
INITIAL = {
    "a": bytes(range(256)) * 20,
    "d/x": b"x" * 1000,
    "big": bytes((i * 7) % 251 for i in range(BIG)),
}
ALL_NAMES = NAMES + ["big"]
MAX_OFFSET = BIG + 5000
SYNC_TIMEOUT = 10  # a sync of these few files takes milliseconds; longer means it is stuck
MAX_STEPS = int(os.environ.get("SAFEFS_MODEL_STEPS", "25"))

name = st.sampled_from(ALL_NAMES)
data = st.binary(min_size=1, max_size=2000)
operation = st.one_of(
    st.tuples(st.just("write"), name, st.integers(0, MAX_OFFSET), data),
    st.tuples(st.just("write"), name, st.integers(0, 3000), data),
    st.tuples(st.just("truncate"), name, st.integers(0, MAX_OFFSET)),
    st.tuples(st.just("rename"), name, name),
    st.tuples(st.just("exchange"), name, name),
    st.tuples(st.just("link"), name, name),
    st.tuples(st.just("unlink"), name),
    st.tuples(st.just("unlink_open_write"), name, st.integers(0, 3000), data),
    st.tuples(st.just("fsync"), name),
    st.tuples(st.just("flush"), st.sampled_from([0.0, 1.0, 6.0, 100.0])),
    st.tuples(st.just("sync")),
    st.tuples(st.just("crash")),
    st.tuples(st.just("crash_in_sync"), st.integers(1, 40)),
)
operation_after = st.one_of(operation, st.tuples(st.just("crash_after_call"), st.integers(1, 40)))


def report(message: str) -> None:
    """A line in hypothesis' report of a failing example (or on stdout outside a test)."""
    try:
        note(message)
    except InvalidArgument:
        print(message)


def write_model(content: bytes, offset: int, chunk: bytes) -> bytes:
    if offset > len(content):
        content += bytes(offset - len(content))
    return content[:offset] + chunk + content[offset + len(chunk) :]


def truncate_model(content: bytes, size: int) -> bytes:
    return content[:size] + bytes(max(0, size - len(content)))


class Model:
    """Names -> file identities -> contents (hard links share an identity)."""

    def __init__(self, initial: dict[str, bytes]) -> None:
        self.names = {n: i for i, n in enumerate(initial)}
        self.contents = {i: c for i, c in enumerate(initial.values())}
        self._next = len(initial)

    def __contains__(self, n: str) -> bool:
        return n in self.names

    def __getitem__(self, n: str) -> bytes:
        return self.contents[self.names[n]]

    def __setitem__(self, n: str, content: bytes) -> None:
        if n not in self.names:
            self.names[n] = self._next
            self._next += 1
        self.contents[self.names[n]] = content

    def items(self) -> list[tuple[str, bytes]]:
        return [(n, self[n]) for n in self.names]

    def tree(self) -> dict[bytes, Any]:
        tree: dict[bytes, Any] = {b"d": ("dir",)}
        tree.update({os.fsencode(n): ("file", c) for n, c in self.items()})
        return tree


async def check_reads(stack: Stack, model: Model, step: int) -> None:
    """Reads through the mount match the model: names, sizes, and the bytes."""
    names = list(model.names)
    assert await stack.listdir() == sorted({b"d"} | {os.fsencode(n) for n in names if "/" not in n})
    assert await stack.listdir("d") == sorted(os.fsencode(n[2:]) for n in names if n.startswith("d/"))
    for n, content in model.items():
        fh = await stack.open(n)
        try:
            assert stack.fs.handle_inode(fh).size == len(content), n
            if len(content) <= 64 * 1024:
                assert await stack.read_fh(fh) == content, n
            else:  # big files: a few windows, so later reads still fetch partially
                for start in (0, len(content) - 4096, (step * 77_777) % len(content)):
                    start = max(0, start)
                    got = await stack.fs.read(fh, start, 4096)
                    assert got == content[start : start + 4096], (n, start)
        finally:
            await stack.fs.release(fh)


async def interpret(root: Path, ops: list[tuple[Any, ...]]) -> None:
    (root / "src" / "d").mkdir(parents=True)
    for n, content in INITIAL.items():
        (root / "src" / n).write_bytes(content)
    model = Model(INITIAL)
    stack = Stack(root, writeback_delay=5.0)
    await stack.start()
    try:
        for step, op in enumerate(ops):
            kind = op[0]
            if kind == "write":
                _, n, offset, chunk = op
                if n not in model:
                    await stack.create(n)
                    model[n] = b""
                await stack.write(n, chunk, offset)
                model[n] = write_model(model[n], offset, chunk)
            elif kind == "truncate":
                _, n, size = op
                if n in model:
                    await stack.truncate(n, size)
                    model[n] = truncate_model(model[n], size)
            elif kind == "rename":
                _, src, dst = op
                if src in model:
                    await stack.rename(src, dst)
                    if model.names[src] != model.names.get(dst):  # links of one file: nothing
                        model.names[dst] = model.names.pop(src)
            elif kind == "exchange":
                _, src, dst = op
                if src in model and dst in model and src != dst:
                    await stack.rename(src, dst, RENAME_EXCHANGE)
                    model.names[src], model.names[dst] = model.names[dst], model.names[src]
            elif kind == "link":
                _, src, dst = op
                if src in model and dst not in model:
                    await stack.link(src, dst)
                    model.names[dst] = model.names[src]
            elif kind == "unlink":
                if op[1] in model:
                    await stack.unlink(op[1])
                    del model.names[op[1]]
            elif kind == "unlink_open_write":
                _, n, offset, chunk = op
                if n in model:
                    fh = await stack.open(n, os.O_RDWR)
                    try:
                        ident = model.names.pop(n)
                        await stack.unlink(n)
                        await stack.fs.write(fh, offset, chunk)
                        model.contents[ident] = write_model(model.contents[ident], offset, chunk)
                        assert await stack.read_fh(fh) == model.contents[ident]
                    finally:
                        await stack.fs.release(fh)
            elif kind == "fsync":
                if op[1] in model:
                    await stack.fsync(op[1])
            elif kind == "flush":
                stack.clock.advance(op[1])
                await stack.flusher.flush(everything=False)
            elif kind == "sync":
                await stack.flusher.sync(timeout=SYNC_TIMEOUT)
            elif kind == "crash":
                await stack.crash_and_replay()
            elif kind in ("crash_in_sync", "crash_after_call"):
                crashed = await stack.crash_during(
                    lambda: stack.flusher.sync(timeout=SYNC_TIMEOUT), op[1], after=kind == "crash_after_call"
                )
                if crashed:
                    report(f"step {step}: crashed at {stack.last_crash.calls[-1]}")
            else:  # pragma: no cover
                raise AssertionError(op)
            await check_reads(stack, model, step)
        await stack.flusher.sync(timeout=SYNC_TIMEOUT)
        assert src_tree(stack.src) == model.tree()
        assert leftovers(stack.src) == []
        assert conflict_copies(stack.src) == []
        assert not stack.table.ops
        await check_reads(stack, model, len(ops))
        # Hard links in the model are hard links on SRC, and nothing else is.
        st_ino = {n: os.lstat(stack.src / n).st_ino for n in model.names}
        for n1, i1 in model.names.items():
            for n2, i2 in model.names.items():
                assert (st_ino[n1] == st_ino[n2]) == (i1 == i2), (n1, n2)
    finally:
        await stack.close()


def run_example(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory(prefix="safefs-model-") as tmp:
        trio.run(interpret, Path(tmp), ops)


MODEL_SETTINGS = settings(
    max_examples=int(os.environ.get("SAFEFS_MODEL_EXAMPLES", "60")),
    deadline=None,
    database=None,  # no .hypothesis directory in the checkout; failures print their example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.timeout(600)
@MODEL_SETTINGS
@given(st.lists(operation, min_size=1, max_size=MAX_STEPS))
def test_model(ops: list[tuple[Any, ...]]) -> None:
    run_example(ops)


@pytest.mark.timeout(600)
@MODEL_SETTINGS
@given(st.lists(operation_after, min_size=1, max_size=MAX_STEPS))
def test_model_crash_after_backing_calls(ops: list[tuple[Any, ...]]) -> None:
    run_example(ops)


# ---------------------------------------------------------------------------- namespace model
# Directories too: a tree of paths over a few names, where every operation either succeeds in
# both the model and the mount or fails in both with the same errno (POSIX rules, checked in
# the order Filesystem documents them).

COMPONENTS = ["a", "b", "c"]
tree_path = st.one_of(
    st.lists(st.sampled_from(COMPONENTS[:2]), min_size=1, max_size=3),
    st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=2),
).map("/".join)
ns_operation = st.one_of(
    st.tuples(st.just("mkdir"), tree_path),
    st.tuples(st.just("rmdir"), tree_path),
    st.tuples(st.just("write"), tree_path, st.binary(min_size=1, max_size=50)),
    st.tuples(st.just("unlink"), tree_path),
    st.tuples(st.just("rename"), tree_path, tree_path),
    st.tuples(st.just("exchange"), tree_path, tree_path),
    st.tuples(st.just("flush"), st.sampled_from([0.0, 6.0])),
    st.tuples(st.just("sync")),
    st.tuples(st.just("crash")),
    st.tuples(st.just("crash_in_sync"), st.integers(1, 8), st.booleans()),
)
# None: a directory
NS_INITIAL = {"a": None, "a/b": b"in src", "a/a": None, "a/a/b": b"deep", "b": None, "c": b"top"}


class Tree:
    """path -> None (directory) or bytes (file)."""

    def __init__(self, initial: dict[str, bytes | None]) -> None:
        self.nodes = dict(initial)

    def parent_error(self, path: str) -> int | None:
        """The errno of resolving the directories above `path` (ENOENT, ENOTDIR), or None."""
        parts = path.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix not in self.nodes:
                return errno.ENOENT
            if self.nodes[prefix] is not None:
                return errno.ENOTDIR
        return None

    def children(self, path: str) -> list[str]:
        return [p for p in self.nodes if p.startswith(path + "/")]

    def move(self, old: str, new: str) -> None:
        moved = {p: v for p, v in self.nodes.items() if p == old or p.startswith(old + "/")}
        for p in moved:
            del self.nodes[p]
        for p, v in moved.items():
            self.nodes[new + p[len(old):]] = v

    def rename_error(self, old: str, new: str, exchange: bool) -> int | None:
        err = self.parent_error(old) or self.parent_error(new)
        if err:
            return err
        if old not in self.nodes:
            return errno.ENOENT
        src_dir = self.nodes[old] is None
        if src_dir and (new == old or new.startswith(old + "/")) and new != old:
            return errno.EINVAL  # a directory cannot move below itself
        if exchange:
            if new not in self.nodes:
                return errno.ENOENT
            if self.nodes[new] is None and old.startswith(new + "/"):
                return errno.EINVAL
            return None
        if new in self.nodes and new != old:
            dst_dir = self.nodes[new] is None
            if src_dir and not dst_dir:
                return errno.ENOTDIR
            if not src_dir and dst_dir:
                return errno.EISDIR
            if dst_dir and self.children(new):
                return errno.ENOTEMPTY
        return None

    def rename(self, old: str, new: str, exchange: bool) -> None:
        if old == new:
            return
        if exchange:
            self.move(old, "\0tmp")
            self.move(new, old)
            self.move("\0tmp", new)
            return
        if new in self.nodes:
            del self.nodes[new]
        self.move(old, new)

    def expected(self) -> dict[bytes, Any]:
        return {os.fsencode(p): ("dir",) if v is None else ("file", v) for p, v in self.nodes.items()}


async def ns_step(stack: Stack, tree: Tree, op: tuple[Any, ...]) -> None:
    kind = op[0]
    expected: int | None = None
    call: Any = None
    if kind == "mkdir":
        p = op[1]
        expected = tree.parent_error(p) or (errno.EEXIST if p in tree.nodes else None)
        call = stack.mkdir(p)
        after = lambda: tree.nodes.__setitem__(p, None)  # noqa: E731
    elif kind == "rmdir":
        p = op[1]
        expected = tree.parent_error(p) or (
            errno.ENOENT if p not in tree.nodes
            else errno.ENOTDIR if tree.nodes[p] is not None
            else errno.ENOTEMPTY if tree.children(p) else None
        )  # fmt: skip
        call = stack.rmdir(p)
        after = lambda: tree.nodes.pop(p)  # noqa: E731
    elif kind == "unlink":
        p = op[1]
        expected = tree.parent_error(p) or (
            errno.ENOENT if p not in tree.nodes else errno.EISDIR if tree.nodes[p] is None else None
        )
        call = stack.unlink(p)
        after = lambda: tree.nodes.pop(p)  # noqa: E731
    elif kind == "write":
        p, content = op[1], op[2]
        expected = tree.parent_error(p) or (errno.EISDIR if p in tree.nodes and tree.nodes[p] is None else None)
        call = stack.put(p, content)
        after = lambda: tree.nodes.__setitem__(p, content)  # noqa: E731
    elif kind in ("rename", "exchange"):
        old, new = op[1], op[2]
        exchange = kind == "exchange"
        if exchange and old == new:
            return  # what Linux answers here is not interesting
        expected = tree.rename_error(old, new, exchange)
        call = stack.rename(old, new, RENAME_EXCHANGE if exchange else 0)
        after = lambda: tree.rename(old, new, exchange)  # noqa: E731
    elif kind == "flush":
        stack.clock.advance(op[1])
        await stack.flusher.flush(everything=False)
        return
    elif kind == "sync":
        await stack.flusher.sync(timeout=SYNC_TIMEOUT)
        return
    elif kind == "crash":
        await stack.crash_and_replay()
        return
    elif kind == "crash_in_sync":
        crashed = await stack.crash_during(lambda: stack.flusher.sync(timeout=SYNC_TIMEOUT), op[1], after=op[2])
        event(f"crash in sync: {'crashed' if crashed else 'sync finished first'}")
        if crashed:
            report(f"crashed {'after' if op[2] else 'before'} {stack.last_crash.calls[-1]}")
        return
    else:  # pragma: no cover
        raise AssertionError(op)
    event(f"{kind}: {'ok' if expected is None else errno.errorcode[expected]}")
    if expected is None:
        await call
        after()
    else:
        assert await fails_with(call) == expected, (op, errno.errorcode[expected])


async def ns_interpret(root: Path, ops: list[tuple[Any, ...]]) -> None:
    src = root / "src"
    src.mkdir()
    for p, v in NS_INITIAL.items():
        if v is None:
            (src / p).mkdir()
        else:
            (src / p).write_bytes(v)
    tree = Tree(NS_INITIAL)
    stack = Stack(root, writeback_delay=5.0)
    await stack.start()
    try:
        for step, op in enumerate(ops):
            await ns_step(stack, tree, op)
            assert await stack.view() == tree.expected(), f"step {step}: {op}"
        await stack.flusher.sync(timeout=SYNC_TIMEOUT)
        assert src_tree(stack.src) == tree.expected()
        assert leftovers(stack.src) == []
        assert conflict_copies(stack.src) == []
        assert not stack.table.ops
    finally:
        await stack.close()


@pytest.mark.timeout(600)
@MODEL_SETTINGS
@given(st.lists(ns_operation, min_size=1, max_size=MAX_STEPS))
# Found under load: the directory a replayed mkdir went into is no longer one when the pass
# syncs its parents (a file took its place by the exchange), which failed the whole pass.
@example([("mkdir", "a/a/a"), ("exchange", "a", "c"), ("flush", 6.0)])
def test_namespace_model(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory(prefix="safefs-ns-model-") as tmp:
        trio.run(ns_interpret, Path(tmp), ops)
