"""The published generation: `<project>/.safefs/generation`, how followers learn of a flush.

The writer replaces the file (staging file, fsync, rename: readers see the old or the new
record, never a torn one) after every write-back pass that changed the project, and on every
`safefs sync`. Followers poll it and refresh what it names.

Record (JSON): {"v": 1, "epoch": E, "generation": G, "host": ..., "pid": ..., "time": wall,
"changed": ["dir/name", ...], "all": bool}. Paths are the project-relative names the pass
touched, decoded with os.fsdecode (JSON escapes the odd bytes); "all" means "too many to
list: refresh everything".

Threading: blocking functions; callers run them in a thread behind the backing limiter.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import Any

from safefs import layout
from safefs.backing import Attrs, Backing

PATH = layout.backing_path(layout.GENERATION)
MAX_LISTED = 5000  # more changed paths than this are published as "all"
MAX_BYTES = 4 << 20


def read(backing: Backing) -> dict[str, Any] | None:
    """The current record, or None if no generation was ever published (or it is unreadable)."""
    try:
        data = backing.read(PATH, 0, MAX_BYTES)
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def write(
    backing: Backing, staging: tuple[bytes, ...], *, epoch: int, generation: int, host: str,
    changed: Iterable[tuple[bytes, ...]],
) -> dict[str, Any]:  # fmt: skip
    paths = sorted({os.fsdecode(b"/".join(p)) if p else "." for p in changed})
    record: dict[str, Any] = {
        "v": 1, "epoch": epoch, "generation": generation, "host": host, "pid": os.getpid(),
        "time": time.time(), "all": len(paths) > MAX_LISTED,
        "changed": paths if len(paths) <= MAX_LISTED else [],
    }  # fmt: skip
    data = json.dumps(record).encode()
    fd = os.memfd_create("safefs-generation", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        now = time.time_ns()
        attrs = Attrs(mode=0o644, uid=os.getuid(), gid=os.getgid(), atime_ns=now, mtime_ns=now, xattrs={})
        backing.publish_atomic(PATH, staging, fd, len(data), attrs)
    finally:
        os.close(fd)
    return record
