"""What this cache holds that the project does not: the count `status`, `sync`, the orphan
marker, systemd's STATUS= and the final write-back's outcome all go by.

Threading: the trio thread (it reads the inode table in memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safefs import ranges
from safefs.inodes import ROOT_INO

if TYPE_CHECKING:
    from safefs.fs import Filesystem


class UnwrittenChanges:
    """Counts of the changes in `fs`'s inode table not yet in the project."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs

    def total(self) -> tuple[int, int]:
        """(files, bytes) this cache holds that the project does not have."""
        ops, files, nbytes = self.counts()
        return files + ops, nbytes

    def counts(self) -> tuple[int, int, int]:
        """(pending ops, dirty files, dirty bytes) this cache holds that the project does not have."""
        # The same count as the flusher's status: the root has no name, its attributes count.
        dirty = [i for i in self.fs.table.iter_dirty() if i.links or i.ino == ROOT_INO]
        return len(self.fs.table.ops), len(dirty), sum(ranges.total(i.dirty) for i in dirty)
