"""The project's control directory `.safefs/`: every name safefs keeps there, in one place.

    <project>/.safefs/               DIR; hidden from the mounted view (fs.py)
    ├── config.toml                  CONFIG: the lease backend of every mount (projectconf.py,
    │                                written by `safefs init`)
    ├── generation                   GENERATION: the writer's last flush, how followers learn
    │                                of it (generation.py)
    ├── lease/                       LEASE: the lease files (lease/store.py); N is zero-padded
    │   │                            to 12 digits, so that `ls` sorts epochs
    │   ├── epoch.N                  epoch_name(N): the immutable record of epoch N
    │   ├── hb.N                     hb_name(N): its heartbeat, rewritten in place by its holder
    │   ├── released.N               released_name(N): the clean-release marker
    │   └── tmp/                     LEASE_TMP: the temp files epoch.N and released.N are
    │                                link()ed from
    ├── staging/N/                   STAGING: the flusher's staging files of epoch N, renamed
    │                                over their targets when published (flusher.py, backing.py)
    ├── quarantine/N/                QUARANTINE: the staging files of an epoch that was taken
    │                                over, moved aside for recovery (lease/store.py)
    ├── orphans/NAME.json            ORPHANS: one marker per host cache holding changes it may
    │                                not write back (orphans.py)
    └── history/HOST-HASH.jsonl      HISTORY: lease events, conflicts and recoveries, one file
                                     per host (history.py)

Invariants:
- Every name here is one path component. Nothing safefs keeps on the project lives outside
  this tree, and no other module spells these names.
- Callers open them one component at a time, never through a symlink (lease.store's
  `control_dir_fd`, backing.py's fd walker); `path()` is for messages and `status` only.

Threading: constants and pure functions; any thread.
"""

from __future__ import annotations

import os
from pathlib import Path

DIR = b".safefs"
CONFIG = "config.toml"
GENERATION = "generation"
LEASE = "lease"
LEASE_TMP = "tmp"
STAGING = "staging"
QUARANTINE = "quarantine"
ORPHANS = "orphans"
HISTORY = "history"


def epoch_name(n: int) -> str:
    return f"epoch.{n:012d}"


def hb_name(n: int) -> str:
    return f"hb.{n:012d}"


def released_name(n: int) -> str:
    return f"released.{n:012d}"


def path(project: Path, *parts: str) -> Path:
    """`<project>/.safefs/<parts...>` as a path name (for messages and status)."""
    return project.joinpath(os.fsdecode(DIR), *parts)


def backing_path(*parts: str) -> tuple[bytes, ...]:
    """`.safefs/<parts...>` as a path of the backing tree (backing.py's component tuples)."""
    return (DIR, *(os.fsencode(part) for part in parts))
