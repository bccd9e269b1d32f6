"""Sets of byte ranges, kept as sorted, disjoint, non-adjacent half-open intervals.

Used for the byte ranges of a file that are present in the cache and those that are dirty.

Invariants:
- A `RangeSet` is a tuple of `(start, end)` pairs with `start < end`, sorted, and no two pairs
  touching or overlapping (so equal sets have equal representations).
- Every function is pure and returns a new tuple, except `add_in_place` and `undo_in_place`,
  which change the list they are given (the write path: O(log n) and a memmove, where a new
  tuple would copy every range). Functions that only read take any sequence of ranges.
- Nothing here does I/O. Safe from any thread (a list being changed in place excepted).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence

Range = tuple[int, int]
RangeSet = tuple[Range, ...]

EMPTY: RangeSet = ()


def _start(r: Range) -> int:
    return r[0]


def _end(r: Range) -> int:
    return r[1]


def _merge(ranges: Sequence[Range], start: int, end: int) -> tuple[int, int, int, int]:
    """Where [start, end) goes into `ranges` (start < end): the ranges[lo:hi] it touches, which
    it replaces, and the range that replaces them. Everything ending before `start` and starting
    after `end` stays; the rest merges."""
    lo = bisect_left(ranges, start, key=_end)
    hi = bisect_right(ranges, end, key=_start)
    if lo < hi:
        start = min(start, ranges[lo][0])
        end = max(end, ranges[hi - 1][1])
    return lo, hi, start, end


def add(ranges: RangeSet, start: int, end: int) -> RangeSet:
    """The union of `ranges` and [start, end)."""
    if start >= end:
        return ranges
    lo, hi, start, end = _merge(ranges, start, end)
    return ranges[:lo] + ((start, end),) + ranges[hi:]


Change = tuple[int, list[Range], Range]  # where, the ranges replaced, the range put there


def add_in_place(ranges: list[Range], start: int, end: int) -> Change | None:
    """`add` on a list of ranges, changing it in place (a memmove, not a copy of the set):
    return where it changed, what it replaced and with what, or None if nothing changed."""
    if start >= end:
        return None
    lo, hi, start, end = _merge(ranges, start, end)
    if hi - lo == 1 and ranges[lo] == (start, end):
        return None  # already covered
    gone = ranges[lo:hi]
    ranges[lo:hi] = [(start, end)]
    return lo, gone, (start, end)


def undo_in_place(ranges: list[Range], change: Change) -> None:
    """Take back the last `add_in_place` (no other change to the list may have come between)."""
    lo, gone, made = change
    assert ranges[lo] == made, "undo of a change that is not the last one"
    ranges[lo : lo + 1] = gone


def end_at(ranges: Sequence[Range], start: int) -> int | None:
    """The end of the range that starts exactly at `start`, or None if none does."""
    i = bisect_left(ranges, start, key=_start)
    return ranges[i][1] if i < len(ranges) and ranges[i][0] == start else None


def subtract(ranges: RangeSet, start: int, end: int) -> RangeSet:
    """`ranges` without [start, end)."""
    if start >= end or not ranges:
        return ranges
    out: list[Range] = []
    for s, e in ranges:
        if e <= start or s >= end:
            out.append((s, e))
            continue
        if s < start:
            out.append((s, start))
        if e > end:
            out.append((end, e))
    return tuple(out)


def clip(ranges: RangeSet, end: int) -> RangeSet:
    """`ranges` cut at `end` (what survives a truncate to `end`)."""
    return subtract(ranges, end, max(end, ranges[-1][1])) if ranges else ranges


def missing(ranges: Sequence[Range], start: int, end: int) -> list[Range]:
    """The parts of [start, end) not covered by `ranges`, in order."""
    out: list[Range] = []
    pos = start
    for i in range(bisect_right(ranges, start, key=_end), len(ranges)):  # the first ending after start on
        s, e = ranges[i]
        if s >= end:
            break
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
        if pos >= end:
            break
    if pos < end:
        out.append((pos, end))
    return out


def total(ranges: Iterable[Range]) -> int:
    return sum(e - s for s, e in ranges)


def from_sorted(items: Iterable[Range]) -> RangeSet:
    """Rebuild a RangeSet from pairs sorted by start (the journal's extents), in one pass."""
    out: list[list[int]] = []
    for s, e in items:
        if s >= e:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)
