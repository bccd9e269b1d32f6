"""The kernel's mount table, /proc/self/mountinfo, read in one place.

- `read()` lists the mounts of this process's mount namespace in mount order (a later mount on
  the same point hides the earlier ones), or None when the table cannot be read: each caller
  decides what "cannot tell" means for it (a check passes, a liveness poll keeps waiting).
- Mount points come back as bytes, unescaped (the kernel writes space, tab, newline and
  backslash as \\ooo octal escapes), so they compare with `os.fsencode(path)`.

Invariants: stdlib only (the CLI imports it); reads /proc only, never stats a mount point
(a stat of a wedged FUSE mount would hang). Blocking: async callers run it in a thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class Mount:
    device: str  # "MAJOR:MINOR" of the mounted filesystem (for FUSE: the connection)
    mount_point: bytes  # unescaped
    fstype: str  # as the table spells it, with any ".subtype" ("fuse.safefs")
    super_options: tuple[bytes, ...]  # per-superblock options ("user_id=0", ...)


def read(path: str = MOUNTINFO) -> list[Mount] | None:
    """The mounts in `path` in mount order, or None if it cannot be read. Malformed lines are skipped."""
    try:
        with open(path, "rb") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    return [mount for mount in map(parse_line, lines) if mount is not None]


def parse_line(line: bytes) -> Mount | None:
    """One mountinfo line: `ID PARENT MAJ:MIN ROOT POINT OPTS [OPTIONAL...] - TYPE SOURCE SUPER`."""
    fields = line.split(b" ")
    try:
        separator = fields.index(b"-", 6)
        options = fields[separator + 3] if len(fields) > separator + 3 else b""
        return Mount(
            device=fields[2].decode(),
            mount_point=unescape(fields[4]),
            fstype=fields[separator + 1].decode(errors="replace"),
            super_options=tuple(options.split(b",")),
        )
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field)
