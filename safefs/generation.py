"""The published generation: `<project>/.safefs/generation`, how followers learn of a flush.

The writer replaces the file (staging file, fsync, rename: readers see the old or the new
record, never a torn one) after every write-back pass that changed the project, and on every
`safefs sync`. Followers poll it and refresh what it names.

Record (JSON): {"v": 2, "epoch": E, "generation": G, "host": ..., "pid": ..., "time": wall,
"changed": ["dir/name", ...], "all": bool}. "changed" lists every project directory whose
entries, or whose files' contents or attributes, the writer changed since generation G-1 (a
directory's own attributes are not announced: README, limitations), as project-relative paths
("." for the top) decoded with os.fsdecode (JSON escapes the odd bytes); "all" means "too
many to list, or not known: refresh everything". From v2 on the list is complete, so an
empty one means nothing changed (a `safefs sync` with nothing to write back); in a v1
record an empty list said nothing about what changed.

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
VERSION = 2  # the first version whose "changed" lists every change (see above)
MAX_LISTED = 5000  # more changed paths than this are published as "all"
MAX_BYTES = 4 << 20


def names_everything_changed(record: dict[str, Any]) -> bool:
    """Does `record` list every directory that changed since the generation before it?"""
    paths = record.get("changed")
    if record.get("all") or not isinstance(paths, list):
        return False
    try:
        version = int(record.get("v") or 1)
    except (TypeError, ValueError):
        return False
    return bool(paths) or version >= VERSION


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
    changed: Iterable[tuple[bytes, ...]], everything: bool = False,
) -> dict[str, Any]:  # fmt: skip
    paths = sorted({os.fsdecode(b"/".join(p)) if p else "." for p in changed})
    everything = everything or len(paths) > MAX_LISTED
    record: dict[str, Any] = {
        "v": VERSION, "epoch": epoch, "generation": generation, "host": host, "pid": os.getpid(),
        "time": time.time(), "all": everything, "changed": [] if everything else paths,
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
