"""Settings of one mount, validated once, then frozen.

Invariants:
- A `MountConfig` is immutable and fully resolved: absolute real paths, defaults applied.
- Pure module: reads the environment only through `default_cache_dir(env)` and
  `runtime_dir(env)`, which take the environment as an argument.

Not platformdirs: it reads os.environ and the home directory itself (these take `env`), and
without XDG_RUNTIME_DIR it answers /run/user/UID, not /tmp/safefs-UID (nor /run/safefs for
root); the XDG rules we follow are three lines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class LeaseTimings:
    """Lease protocol timings (DESIGN.md section 3), in seconds."""

    renew: float = 10.0  # R: the holder rewrites its heartbeat this often
    t_break: float = 180.0  # an observer takes over after seeing no heartbeat change this long
    rho: float = 0.05  # bound on the rate difference of two hosts' clocks
    epsilon: float = 20.0  # margin for a slow NFS call
    lock_delay: float = 60.0  # D: a new writer waits this long after a takeover
    poll: float = 5.0  # P: how often an observer reads the heartbeat

    def holder_budget(self) -> float:
        """How long after the start of its last successful renewal a holder may still write."""
        return self.t_break * (1 - self.rho) - self.epsilon


@dataclasses.dataclass(frozen=True)
class MountConfig:
    src: Path  # the project (backing tree), a real absolute path
    mnt: Path  # the mountpoint, a real absolute path
    cache_dir: Path  # host-local: content files and the LMDB journal
    writeback_delay: float = 5.0  # a file quiet this long is written back
    cache_size: int = 10 * GIB  # clean data above this is evicted, least recently used first
    free_space_floor: int = 256 * MIB  # writes get ENOSPC rather than fill the cache disk below this
    publish_threshold: int = 64 * MIB  # smaller (and new) files are published atomically
    allow_other: bool = False
    host_id: str | None = None  # human-readable part of this host's identity
    follower_poll: float = 3.0  # how often a follower looks at the published generation
    lease: LeaseTimings = dataclasses.field(default_factory=LeaseTimings)
    backing_timeout: float = 60.0  # reads of uncached data fail with EIO after this long
    wait_for_lease: bool = False
    follower: bool = False  # never take the write lease by itself (`-o ro`); `safefs acquire` still can
    log_level: str = "info"  # debug, info, warning or error
    log_file: Path | None = None  # rotated; None: stderr (the journal under systemd)
    metrics_port: int | None = None  # serve Prometheus metrics on 127.0.0.1:PORT; None: no listener


def project_key(src: Path) -> str:
    """A short stable name for a project path (one cache dir per project)."""
    return hashlib.sha256(os.fsencode(str(src))).hexdigest()[:16]


def default_cache_dir(src: Path, env: Mapping[str, str]) -> Path:
    """`$XDG_CACHE_HOME/safefs/<name>-<key>`, one per project, on the user's local disk."""
    base = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or "/root", ".cache")
    return Path(base) / "safefs" / f"{src.name or 'root'}-{project_key(src)}"


def runtime_dir(env: Mapping[str, str], uid: int) -> Path:
    """Where control sockets live: private to the user, never on NFS."""
    if uid == 0:
        return Path("/run/safefs")
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "safefs"
    return Path(f"/tmp/safefs-{uid}")


def socket_path(mnt: Path, env: Mapping[str, str], uid: int) -> Path:
    """The control socket of the daemon serving `mnt` (a real absolute path)."""
    key = hashlib.sha256(os.fsencode(str(mnt))).hexdigest()[:16]
    return runtime_dir(env, uid) / f"{key}.sock"
