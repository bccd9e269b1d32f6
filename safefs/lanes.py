"""A worker thread of its own for short blocking calls on the local disk, in order.

`trio.to_thread.run_sync` behind a one-slot limiter does the same job, but each trip pays for
a limiter, a thread-cache handoff and a cancel-scope dance; on a small VM that was about
100 us per trip, against about 70 us for this lane, and the journal takes one trip per
acknowledged write. Use a lane only for calls that cannot hang for long (local disk: the
journal, cache files). Anything that may touch NFS goes through `trio.to_thread` behind a
limiter with a timeout, so that a hung server can be abandoned.

Invariants:
- Calls run one at a time, in the order they were submitted, on the lane's one thread (LMDB
  write transactions therefore always begin and end on the same thread).
- A submitted call always runs to its end: a cancelled caller keeps waiting for it, as with
  `trio.to_thread.run_sync`'s default, so memory and disk never disagree about whether it ran.
- Its exception is raised in the caller; nothing escapes into the thread's loop.

Threading: `run` is called from trio tasks of one trio run; the thread is started on first
use and is a daemon thread (it holds no state that needs an orderly end: every call is over
before the caller's `run` returns).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_STOP = object()


class ThreadLane:
    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"ThreadLane({self.name!r})"

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the lane's thread and return its result (or raise its error)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"safefs-{self.name}", daemon=True)
            self._thread.start()
        task = trio.lowlevel.current_task()
        self._jobs.put((fn, args, task, trio.lowlevel.current_trio_token()))
        return await trio.lowlevel.wait_task_rescheduled(_cannot_abort)

    def close(self) -> None:
        """Let the thread end once the calls already submitted are done."""
        if self._thread is not None:
            self._jobs.put(_STOP)
            self._thread = None

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, task, token = job
            result = outcome.capture(fn, *args)
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the caller's run is gone; so is the caller
                pass


def _cannot_abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED
