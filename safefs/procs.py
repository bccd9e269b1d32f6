"""Whether a process of this host still runs: for the lease (a dead holder on this host) and
the CLI (waiting for a daemon to exit). Stdlib only, no I/O beyond /proc.

Invariants:
- A zombie (state Z, or X while it is being reaped) is dead: it holds no lease, serves no
  mount and will never write again; only its parent has not collected its exit status yet.
  `kill(pid, 0)` succeeds on a zombie, so it cannot tell.
- A pid can be reused. A caller that knows the process's start time (`start_time`, field 22 of
  /proc/PID/stat: clock ticks after boot) passes it, and a process with that pid but another
  start time is someone else: the one asked about is dead.
- Without /proc the answer falls back to `kill(pid, 0)` (a zombie then counts as alive).

Not psutil: its create_time() is float seconds, while lease records on the project store the
start time as /proc's clock ticks, and the core stays stdlib only; this is one /proc read.

Threading: plain functions, safe from any thread.
"""

from __future__ import annotations

import os

DEAD_STATES = frozenset("ZXx")  # zombie, dead (X; x on old kernels)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (the first is the state, field 3),
    or None if there is no such process. Raises OSError if /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself hold spaces and parentheses.
    return raw[raw.rindex(b")") + 2 :].decode("ascii", "replace").split()


def start_time(pid: int) -> int:
    """The start time of process `pid` (clock ticks after boot), or 0 if it cannot be read."""
    try:
        fields = _stat_fields(pid)
    except (OSError, ValueError):
        return 0
    if fields is None or len(fields) < 20:
        return 0
    return int(fields[19])  # field 22


def process_alive(pid: int, start: int = 0) -> bool:
    """True if `pid` runs (not a zombie) and, when `start` is given (non-zero), started then."""
    if pid <= 0:
        return False
    try:
        fields = _stat_fields(pid)
    except (OSError, ValueError):
        return _kill_alive(pid)
    if fields is None or not fields:
        return False
    if fields[0] in DEAD_STATES:
        return False
    if start and len(fields) >= 20 and int(fields[19]) != start:
        return False  # the pid was reused by another process
    return True


def _kill_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True
