"""The kernel-cache policy: what the kernel may cache for a mount, and for how long.

Every decision about the kernel's caches is made here; fuse_ops.py carries them out (the
timeouts of each entry, keep_cache at open and create, the writeback mode at INIT, the
readahead), fs.py asks `keep_pages` at open, and the daemon asks `writeback_cache` once before
it mounts. How safefs takes back what the kernel cached (invalidations, `Filesystem.note_absent`,
`mark_stale`) is not decided here: it follows from what changed on the project.

On the writer every change goes through this mount, so the kernel's view cannot go stale
except when safefs itself learns of a change on the backing tree (a fingerprint mismatch at
open, a conflict), and then it invalidates the kernel's copy explicitly. Long timeouts are
therefore safe and save a round trip per stat/lookup. A follower's view changes when the
writer publishes, so its timeouts are bounded by the poll interval.

The policy, and the measurement behind each choice (2-CPU VM; numbers from `scripts/bench` and
from single-workload A/B runs noted in the commits):
- Writeback cache: ON for a mount that starts as the writer (`WRITEBACK_CACHE` turns it off
  everywhere). The kernel acknowledges write() from its page cache and sends the pages later,
  in large WRITEs: a pyfuse3 pass-through did 1,286 SQLite tx/s with it and 299 without,
  random 4 KiB writes 277,000 vs 16,800 IOPS. G2 allows it: fsync, and close() (the kernel
  writes an inode's dirty pages back before it answers close(), FLUSH handler or not), make
  the pages reach a WRITE, which is in the cache file and the journal before it is answered;
  only pages of a file still open and not fsynced are lost when the daemon dies. `sync`,
  `umount` and a release first make the kernel send what it holds (`flush_kernel_pages`); a
  kernel unmount sends them itself. The kernel then owns size, mtime and ctime of a regular
  file it caches (it never takes them from our replies: `Filesystem.kernel_owns_sizes`), so
  the mode is negotiated once, at INIT, and a mount that starts as a follower never has it (a
  follower's files change under it). A writer that later turns follower keeps it: it cannot
  write any more, so it holds no dirty pages, but a size the kernel cached before stays until
  the file is looked up afresh.
- Page cache across opens (`keep_cache`, `keep_pages`): when the open checked the file's
  fingerprint on the backing tree (a file with cached bytes and no unwritten change), kept
  if and only if it is unchanged, on a follower too; otherwise kept on the writer (only this
  host changes the file) and dropped on a follower. A file this mount creates keeps its pages.
- Entry and attribute timeouts: 60 s on the writer, min(poll, 1 s) on a follower
  (`CachePolicy`, which follows the lease keeper's role).
- Negative entries: cached with the same timeouts; `Filesystem.note_absent` remembers them so
  that a refresh or a role change takes them back (SQLite looks for its -wal and -journal on
  every transaction).
- FLUSH: not implemented, so the kernel stops sending one per close().
- Readahead 1 MiB instead of 128 KiB (`READAHEAD_KIB`, fuse_ops.raise_readahead): cold
  sequential reads 2.6x faster. Writes already arrive in requests of up to 1 MiB (libfuse's
  max_write with the kernel's max_pages).
- The kernel asks for `security.capability` before every write (pyfuse3 offers no
  FUSE_HANDLE_KILLPRIV): `getxattr` answers it first thing, from memory; still a round trip.

Invariants: decisions only, from the role and what the caller observed; no I/O, no state but
the timeouts of the current role. Threading: the trio thread.
"""

from __future__ import annotations

import dataclasses

WRITEBACK_CACHE = True  # the one switch for the kernel writeback cache
WRITER_TIMEOUT = 60.0  # entry and attribute timeout on the writer
FOLLOWER_TIMEOUT_MAX = 1.0  # a follower's timeouts: its poll interval, at most this
KEEP_CREATED = True  # keep_cache for a file this mount creates: its pages are this mount's
READAHEAD_KIB = 1024


def writeback_cache(role: str) -> bool:
    """Negotiate the kernel writeback cache at INIT for a mount starting in `role`?"""
    return WRITEBACK_CACHE and role == "writer"


def keep_pages(*, follower: bool, unchanged: bool | None) -> bool:
    """keep_cache for an open: `unchanged` is the open's fingerprint check (None: not made)."""
    return (not follower) if unchanged is None else unchanged


@dataclasses.dataclass
class CachePolicy:
    """How long the kernel may trust names and attributes without asking us (see above)."""

    entry_timeout: float = WRITER_TIMEOUT
    attr_timeout: float = WRITER_TIMEOUT
    follower_poll: float = 1.0  # how often a follower looks for the writer's generations

    def on_role(self, role: str) -> None:
        """Follow the lease keeper's role (subscribed with LeaseKeeper.on_role)."""
        if role == "writer":
            self.entry_timeout = self.attr_timeout = WRITER_TIMEOUT
        else:
            self.entry_timeout = self.attr_timeout = min(self.follower_poll, FOLLOWER_TIMEOUT_MAX)
