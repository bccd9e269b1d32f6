"""Time, from one object, so lease and flush logic can be tested with a fake clock.

Invariants:
- `monotonic()` never goes backwards and keeps counting while the machine is suspended
  (CLOCK_BOOTTIME): a lease deadline measured on it is never stretched by a suspend.
- `wall()` is for humans only (status, log lines, conflict names). No decision of safefs
  compares a wall time, least of all one written by another host.
- `wall_ns()` stamps files (create, write): it reads the clock the kernel stamps with
  (CLOCK_REALTIME_COARSE, as for UTIME_NOW and its own mtime updates), so a `touch` right
  after safefs stamped a file never moves its mtime backwards.
- Both clocks are safe to read from any thread. Tests use the fake clocks in tests/doubles.py.
"""

from __future__ import annotations

import time
from typing import Protocol

# The kernel's clock for file timestamps (<linux/time.h>); Python's time module does not name it.
CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back and counts through suspend."""

    def wall(self) -> float:
        """Seconds since the epoch, for display only."""

    def wall_ns(self) -> int:
        """Nanoseconds since the epoch on the kernel's file-timestamp clock."""


class SystemClock:
    def monotonic(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def wall(self) -> float:
        return time.time()

    def wall_ns(self) -> int:
        return time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
