"""Time, from one object, so lease and flush logic can be tested with a fake clock.

Invariants:
- `monotonic()` never goes backwards and keeps counting while the machine is suspended
  (CLOCK_BOOTTIME): a lease deadline measured on it is never stretched by a suspend.
- `wall()` is for humans only (status, log lines, conflict names). No decision of safefs
  compares a wall time, least of all one written by another host.
- Both clocks are safe to read from any thread; `FakeClock.advance` is for tests.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back and counts through suspend."""

    def wall(self) -> float:
        """Seconds since the epoch, for display only."""


class SystemClock:
    def monotonic(self) -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    def wall(self) -> float:
        return time.time()


class FakeClock:
    """A clock that only moves when told to. `wall` starts at an arbitrary fixed point."""

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock never goes back")
        self._now += seconds
