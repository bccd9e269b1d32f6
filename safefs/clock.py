"""Time, from one object, so lease and flush logic can be tested with a fake clock.

Invariants:
- `monotonic()` never goes backwards and keeps counting while the machine is suspended
  (CLOCK_BOOTTIME): a lease deadline measured on it is never stretched by a suspend.
- `wall()` is for humans only (status, log lines, conflict names). No decision of safefs
  compares a wall time, least of all one written by another host.
- `wall_ns()` stamps files (create, write): it reads the clock the kernel stamps with
  (CLOCK_REALTIME_COARSE, as for UTIME_NOW and its own mtime updates), so a `touch` right
  after safefs stamped a file never moves its mtime backwards.
- Both clocks are safe to read from any thread; `FakeClock.advance` is for tests.
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


class FakeClock:
    """A clock that only moves when told to. `wall` starts at an arbitrary fixed point."""

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def wall_ns(self) -> int:
        return int(self.wall() * 1e9)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock never goes back")
        self._now += seconds
