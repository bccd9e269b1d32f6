"""Sizes, counts, durations and times as a person writes them, in one place for the CLI, the
config file and the lease's messages (issue 11 items 9 and 12).

- Sizes are binary: "512M", "10G", "1.5TiB", "64k" are read; "1.5 GiB" is written.
- Durations are seconds to one decimal under a minute, then minutes and seconds, then hours.
- Wall-clock times are local, to the second.

No library: humanize writes "100 Bytes" and other spellings the tests and README pin, and rich's
filesize is decimal only; these are a few lines that say exactly what we print.

Invariants: stdlib only (the CLI and the core import it); pure functions, safe from any thread.
"""

from __future__ import annotations

import re
import time
from typing import Any

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpP]?)(?:i?[bB])?\s*")


def parse_size(text: str) -> int | None:
    """Bytes in `text`: a plain number or one with a binary suffix (512M, 10G, 1.5TiB, 64k); None if not a size."""
    match = _SIZE.fullmatch(text)
    if not match:
        return None
    number, unit = match.groups()
    return int(float(number) * 1024 ** " KMGTP".index(unit.upper() or " "))


def plural(count: Any, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def human_bytes(count: float) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def wall_time(wall: float) -> str:
    """Seconds since the epoch as local date and time ("2026-12-07 11:44:21")."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))
