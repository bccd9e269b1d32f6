"""How the flusher calls the backing tree; shared by its parts (conflicts, publish, replay).

The flusher (flusher.py) builds one WriteBack from the inode table, the cache, the contents,
the lease gate and the clock, and hands it to each part that calls the backing tree. It owns
`in_call` (the backing call under way, which status lists once it hangs) and `unannounced`
(the directories the parts changed on the project since the last published generation).

Invariants:
- Every call into the backing tree goes through `call`: in a worker thread behind the
  backing limiter, with the lease asked once more in that thread right before the call
  (`_if_publishable`); a call that hangs shows in status.
- A content file's cache descriptor is pinned while a backing call copies from it (`pinned`).
- Every directory whose entries (or their contents or attributes) a part changes on the project is noted
  (`changed`) before the pass ends, and stays in `unannounced` until a generation naming it
  is published: followers refresh exactly what a generation names (generation.py).

Threading: trio thread; backing calls in worker threads (Content.in_backing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from typing import Any

from safefs import layout
from safefs.backing import Attrs, Fingerprint
from safefs.cache import ContentCache
from safefs.clock import Clock
from safefs.content import Content, fingerprint_tuple
from safefs.errors import ReadOnly
from safefs.inodes import Inode, InodeTable
from safefs.ports import WriteGate

log = logging.getLogger(__name__)


def utc_text(wall: float) -> str:
    """A wall time for status and receipts, readable by humans."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


def fingerprint_of(st: os.stat_result) -> tuple[int, int, int, int]:
    """The fingerprint (Inode.origin) of a backing object's stat."""
    return fingerprint_tuple(Fingerprint.of(st))


BPath = tuple[bytes, ...]
HUNG_CALL = 5.0  # a backing call running longer than this is listed in status as an error


@dataclasses.dataclass(frozen=True)
class FlushError:
    op: str
    path: str
    error: str
    retry_at: float  # wall time


@dataclasses.dataclass
class Receipt:
    files: int = 0
    bytes: int = 0
    ops: int = 0
    generation: int = 0


class WriteBack:
    """The flusher's calls into the backing tree, and what they need: the attributes to
    publish, the staging directory, pinned cache descriptors. Owns `in_call`."""

    def __init__(
        self, *, table: InodeTable, cache: ContentCache, content: Content, gate: WriteGate, clock: Clock
    ) -> None:
        self.table = table
        self.cache = cache
        self.content = content
        self.gate = gate
        self.clock = clock
        self.in_call: tuple[str, BPath, float] | None = None  # the backing call under way
        self.unannounced: set[BPath] = set()  # changed on the project, in no generation yet

    def changed(self, dir_path: BPath) -> None:
        """A part changed an entry of the project's directory `dir_path` (`()` is the top): its
        name, content or attributes. The next generation names the directory."""
        self.unannounced.add(dir_path)

    def dir_path(self, ino: int) -> BPath | None:
        return self.table.dir_backing_path(ino)

    async def attrs_of(self, inode: Inode) -> Attrs:
        xattrs = await self.content.xattrs_of(inode)
        return Attrs(
            mode=stat.S_IMODE(inode.mode),
            uid=inode.uid,
            gid=inode.gid,
            atime_ns=inode.atime_ns,
            mtime_ns=inode.mtime_ns,
            xattrs=dict(xattrs),
        )

    async def call(self, fn: Any, *args: Any) -> Any:
        """A call into the backing tree; one that hangs shows in status (see statistics)."""
        path = args[0] if args and isinstance(args[0], tuple) else ()
        self.in_call = (getattr(fn, "__name__", "call"), path, self.clock.monotonic())
        try:
            return await self.content.in_backing(self._if_publishable, fn, *args)
        finally:
            self.in_call = None

    def _if_publishable(self, fn: Any, *args: Any) -> Any:
        """In the worker thread: ask the lease once more right before the call (it may have
        been lost while the call waited for a thread)."""
        if not self.gate.publishable():
            raise ReadOnly("the write lease no longer allows changes to the project")
        return fn(*args)

    def staging(self) -> BPath:
        epoch = getattr(self.gate, "epoch", 0)
        return layout.backing_path(layout.STAGING, str(epoch))

    @contextlib.asynccontextmanager
    async def pinned(self, ino: int) -> AsyncIterator[int]:
        """The inode's cache descriptor, pinned: the cache's table of open files cannot close
        it (and hand its number to another file) while a backing call copies from it."""
        fd = await self.content.in_cache(self.cache.pin, ino)
        try:
            yield fd
        finally:
            self.cache.unpin(fd)
