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
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from safefs.fs import RENAME_EXCHANGE
from tests.fs.conftest import Stack, conflict_copies, leftovers, src_tree

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
