"""G2 with the kernel writeback cache: the WRITE that close() sends after an fsync survives
kill -9, whatever the flusher was doing with the fsynced version at that moment.

The sequence is the one test_crash_rounds lost once (seed 4242, round 9): open with O_TRUNC,
three small writes, fsync, a 5,000-byte write, close, kill -9. Between the fsync and the
close the flusher publishes the fsynced version; the close's WRITE arrives before that
publish starts, while its staging file is copied, after its rename but before the journal
records it, or after it. In each case the stack is killed right after the WRITE was answered
and rebuilt from the cache dir (as the daemon is remounted): the file must read back with the
closed bytes, be due for write-back, and reach SRC byte for byte. For a file the open made,
its content reaches SRC with the replay of its Create, which the kill may interrupt too.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.fs.conftest import SimulatedCrash, Stack, surviving_crash

pytestmark = pytest.mark.timeout(60)

SIZE_BEFORE = 20_000  # a/f4 on the project before the session (then cut by O_TRUNC)
SMALL_WRITES = ((5822, 100), (9023, 100), (14460, 100))
LAST_WRITE = (9558, 5000)


def _written(buf: bytearray, offset: int, data: bytes) -> None:
    if len(buf) < offset:
        buf.extend(bytes(offset - len(buf)))
    buf[offset : offset + len(data)] = data


async def _kernel_write(stack: Stack, fh: int, model: bytearray, offset: int, data: bytes) -> None:
    """What the kernel sends for a write() once it writes its pages back: whole pages, the
    last one cut at the file's size."""
    _written(model, offset, data)
    start = offset - offset % 4096
    end = min(len(model), offset + len(data) + (-(offset + len(data)) % 4096))
    assert await stack.fs.write(fh, start, bytes(model[start:end])) == end - start


class _HeldPublish:
    """Holds the flusher's publish_atomic in its thread: before the real call, or after it
    returned (the staging file renamed into place), until the test lets it go or kills."""

    def __init__(self, stack: Stack, *, after: bool) -> None:
        self.real = stack.backing.publish_atomic
        self.after = after
        self.hit = threading.Event()
        self.go = threading.Event()
        self.dead = False
        stack.backing.publish_atomic = self.call

    def call(self, *args: Any, **kwargs: Any) -> Any:
        result = self.real(*args, **kwargs) if self.after else None
        self.hit.set()
        self.go.wait(30)
        if self.dead:
            raise SimulatedCrash("killed while publishing")
        return result if self.after else self.real(*args, **kwargs)


@pytest.mark.parametrize("when", ["before-publish", "publish-held-before", "publish-held-after", "after-publish"])
@pytest.mark.parametrize("kernel_owns_sizes", [True, False])
@pytest.mark.parametrize("existed", [True, False], ids=["existing", "created"])
async def test_the_write_close_sent_after_an_fsync_survives_kill_9(
    tmp_path: Path, when: str, kernel_owns_sizes: bool, existed: bool
) -> None:
    stack = Stack(tmp_path, writeback_delay=0.2)
    await stack.start()
    try:
        stack.fs.kernel_owns_sizes = kernel_owns_sizes
        await stack.mkdir("a")
        if existed:
            await stack.put("a/f4", os.urandom(SIZE_BEFORE))
            await stack.flusher.flush(everything=True)
            fh = await stack.open("a/f4", os.O_WRONLY | os.O_TRUNC)
        else:  # made by this open: its content reaches SRC with the replay of its Create
            parent, name = await stack.parent_of("a/f4")
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
            fh, _ = await stack.fs.create(parent.ino, name, stat.S_IFREG | 0o644, flags, os.getuid(), os.getgid())
        model = bytearray()
        for offset, n in SMALL_WRITES:
            await _kernel_write(stack, fh, model, offset, os.urandom(n))
        await stack.fs.fsync(fh)
        fsynced = bytes(model)
        last = os.urandom(LAST_WRITE[1])

        if when == "before-publish":
            await _kernel_write(stack, fh, model, LAST_WRITE[0], last)
            await stack.fs.release(fh)
            await stack.crash_and_replay()
        elif when == "after-publish":
            await stack.flusher.flush(everything=True)
            assert (stack.src / "a" / "f4").read_bytes() == fsynced
            await _kernel_write(stack, fh, model, LAST_WRITE[0], last)
            await stack.fs.release(fh)
            await stack.crash_and_replay()
        else:
            held = _HeldPublish(stack, after=when == "publish-held-after")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(surviving_crash, lambda: stack.flusher.flush(everything=True))
                while not held.hit.is_set():
                    await trio.sleep(0.002)
                await _kernel_write(stack, fh, model, LAST_WRITE[0], last)  # answered: in the journal
                await stack.fs.release(fh)
                stack._drop()  # kill -9 while the publish is in flight
                held.dead = True
                held.go.set()
            stack._close_files()
            await stack.start()
        stack.fs.kernel_owns_sizes = kernel_owns_sizes

        closed = bytes(model)
        assert len(closed) == 14560
        assert await stack.read("a/f4") == closed, "the closed write was lost to kill -9"
        await stack.flusher.flush(everything=True)
        assert (stack.src / "a" / "f4").read_bytes() == closed
        assert await stack.read("a/f4") == closed
    finally:
        await stack.close()
