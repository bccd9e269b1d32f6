"""The clock safefs stamps files with is the kernel's (CLOCK_REALTIME_COARSE), never ahead of it."""

from __future__ import annotations

import time

from safefs.clock import CLOCK_REALTIME_COARSE, SystemClock
from tests.doubles import FakeClock


def test_wall_ns_reads_the_kernels_coarse_clock() -> None:
    clock = SystemClock()
    for _ in range(1000):
        ours = clock.wall_ns()
        kernel = time.clock_gettime_ns(CLOCK_REALTIME_COARSE)
        assert ours <= kernel  # what a UTIME_NOW right after would stamp is never earlier
        assert time.time_ns() - ours < 1_000_000_000


def test_fake_clock_wall_ns_follows_wall() -> None:
    clock = FakeClock()
    clock.advance(1.5)
    assert clock.wall_ns() == int(clock.wall() * 1e9)
