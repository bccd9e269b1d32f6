"""The names the kernel may cache as absent (negative entries), remembered so that each can be
taken back when the name may have appeared behind the kernel's back.

Invariants:
- The kernel caches an absent name only while it is remembered here (`note`); at most
  NEGATIVE_NAMES_MAX at once (beyond that `note` says no, and the kernel must not cache it).
- A name made through the mount (by fs, or by the flusher's conflict handling) is forgotten
  (`made`): the kernel's entry for it is positive again.
- A directory that may have changed behind our back has its remembered absences invalidated
  (`forget`, queued on the invalidator); a directory that is gone only forgets them (`drop`).

Threading: trio thread only.
"""

from __future__ import annotations

from safefs.ports import Invalidator

NEGATIVE_NAMES_MAX = 100_000  # absences the kernel may cache at once (see note)


class NegativeNames:
    def __init__(self, invalidator: Invalidator) -> None:
        self.invalidator = invalidator
        self._names: dict[int, set[bytes]] = {}  # names the kernel may cache as absent
        self._count = 0

    def note(self, parent: int, name: bytes) -> bool:
        """May the kernel cache that `name` is not in `parent`? Yes while we can take it back.

        A negative entry spares a round trip per failed lookup (SQLite looks for its -journal
        and -wal on every transaction; `open(O_CREAT)` looks before it creates). Names made
        through the mount replace the kernel's negative entry themselves; names that appear
        from the backing tree (a refresh, another host's generation) come through coherence.py
        (`_refresh`, `mark_stale`), which invalidate what is remembered here.
        """
        names = self._names.setdefault(parent, set())
        if name not in names:
            if self._count >= NEGATIVE_NAMES_MAX:
                return False  # cannot remember it, so the kernel must not keep it either
            names.add(name)
            self._count += 1
        return True

    def forget(self, parent: int) -> None:
        """Queue invalidations of every absence the kernel may cache in `parent`."""
        for name in self._names.pop(parent, ()):
            self.invalidator.later_entry(parent, name)
            self._count -= 1

    def drop(self, parent: int) -> None:
        """`parent` is gone: its absences need no invalidation, only forgetting."""
        self._count -= len(self._names.pop(parent, ()))

    def made(self, parent: int, name: bytes) -> None:
        """`name` now exists in `parent`: the kernel's entry for it is positive again."""
        names = self._names.get(parent)
        if names is not None and name in names:
            names.discard(name)
            self._count -= 1

    def forget_all(self) -> None:
        """`forget` every directory (the whole backing tree may have changed)."""
        for parent in list(self._names):
            self.forget(parent)
