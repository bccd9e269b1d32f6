"""Fault injection into the backing tree, for tests (and for daemons that tests start).

`Backing.faults` takes any object with `check(op, path)` (backing.FaultHook); a `FaultPlan`
is that object. Tests build one directly; a daemon started by a test builds one from JSON in
$SAFEFS_FAULTS (`FaultPlan.from_spec`). Nothing else of safefs imports this module: the
daemon imports it only when that variable is set, and the import-linter contract
"testing-daemon-only" in pyproject.toml (checked by tests/unit/test_layering.py) keeps it so.
Other test doubles (the in-memory lease store, fake clocks) live in tests/doubles.py.

Threading: `check` is called from the worker threads that run Backing calls; the plan's list of
faults is under its own lock, and a delay or hang waits outside it.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass, field

from safefs.backing import Path


@dataclass
class Hang:
    """A hang armed by `FaultPlan.hang`: `entered` is set when an operation starts waiting."""

    entered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass
class _Fault:
    op: str  # a public method name, or "*" for every operation
    prefix: Path | None  # only paths under this prefix (None: any path)
    err: int | None = None  # errno to fail with
    hang: Hang | None = None
    delay: float = 0.0
    times: int | None = None  # how many more calls it hits; None: until cleared


class FaultPlan:
    """Makes chosen Backing operations fail, hang or slow down. For tests only.

    Each public Backing method calls `check(op_name, path)` before doing anything; `op` is
    the method name or "*", `prefix` limits a fault to paths under it, `times` to that many
    hits (None: until cleared; a hang defaults to one). Matching faults apply in the order
    they were added, so a delay or hang can precede a failure.
    """

    def __init__(self, *, record_calls: bool = True) -> None:
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        # every checked operation, for assertions (off in a daemon: it would grow for ever)
        self.calls: list[tuple[str, Path]] | None = [] if record_calls else None

    @classmethod
    def from_spec(cls, spec: list[dict[str, object]]) -> FaultPlan:
        """Build a plan from JSON (the daemon reads it from $SAFEFS_FAULTS, for tests).

        Each item: {"kind": "fail"|"hang"|"delay", "op": name or "*", "errno": "EIO",
        "seconds": 0.5, "times": n or null, "prefix": "dir/sub"}.
        """
        plan = cls(record_calls=False)
        for item in spec:
            op = str(item.get("op", "*"))
            raw_prefix = item.get("prefix")
            prefix = tuple(os.fsencode(str(raw_prefix)).split(b"/")) if raw_prefix else None
            times = item.get("times")
            times = int(times) if isinstance(times, (int, str)) else None
            kind = item.get("kind")
            if kind == "fail":
                plan.fail(op, getattr(errno, str(item.get("errno", "EIO"))), times=times, prefix=prefix)
            elif kind == "hang":
                plan.hang(op, times=times, prefix=prefix)
            elif kind == "delay":
                plan.delay(op, float(str(item.get("seconds", 0))), times=times, prefix=prefix)
            else:
                raise ValueError(f"unknown fault kind {kind!r}")
        return plan

    def fail(self, op: str, err: int, *, times: int | None = None, prefix: Path | None = None) -> None:
        self._add(_Fault(op, prefix, err=err, times=times))

    def hang(self, op: str, *, times: int | None = 1, prefix: Path | None = None) -> Hang:
        h = Hang()
        self._add(_Fault(op, prefix, hang=h, times=times))
        return h

    def delay(self, op: str, seconds: float, *, times: int | None = None, prefix: Path | None = None) -> None:
        self._add(_Fault(op, prefix, delay=seconds, times=times))

    def clear(self, op: str | None = None) -> None:
        with self._lock:
            self._faults = [f for f in self._faults if op is not None and f.op != op]

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def check(self, op: str, path: Path = ()) -> None:
        with self._lock:
            if self.calls is not None:
                self.calls.append((op, path))
            hits = []
            for f in self._faults:
                if f.op not in (op, "*") or (f.prefix is not None and path[: len(f.prefix)] != f.prefix):
                    continue
                if f.times is not None:
                    f.times -= 1
                hits.append(f)
            self._faults = [f for f in self._faults if f.times is None or f.times > 0]
        # Sleep and wait outside the lock so other threads keep going.
        for f in hits:
            if f.delay:
                time.sleep(f.delay)
            if f.hang is not None:
                f.hang.entered.set()
                f.hang.released.wait()
            if f.err is not None:
                raise OSError(f.err, f"{os.strerror(f.err)} (injected)", "/".join(map(os.fsdecode, path)) or ".")
