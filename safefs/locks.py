"""Per-inode locks: one trio.Lock per key, made on demand and dropped when nobody needs it.

The filesystem and the flusher share one table of inode locks (`Content.inode_locks`): a
change to an inode's cached bytes and the publish or conflict handling of that inode never
interleave. Held across awaits; never held while awaiting a kernel invalidation.

Threading: trio thread only.
"""

from __future__ import annotations

import trio


class KeyedLocks:
    """One trio.Lock per key, created on demand and dropped when nobody holds or waits."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[trio.Lock, int]] = {}

    def __call__(self, key: int) -> _KeyedLock:
        return _KeyedLock(self, key)


class _KeyedLock:
    def __init__(self, owner: KeyedLocks, key: int) -> None:
        self._owner, self._key = owner, key

    async def __aenter__(self) -> None:
        lock, users = self._owner._locks.get(self._key, (None, 0))
        if lock is None:
            lock = trio.Lock()
        self._owner._locks[self._key] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_user(lock)
            raise

    async def __aexit__(self, *exc: object) -> None:
        lock, _ = self._owner._locks[self._key]
        lock.release()
        self._release_user(lock)

    def _release_user(self, lock: trio.Lock) -> None:
        _, users = self._owner._locks[self._key]
        if users <= 1:
            del self._owner._locks[self._key]
        else:
            self._owner._locks[self._key] = (lock, users - 1)
