"""Test doubles: stand-ins that tests give safefs in place of the real clock, lease store and
worker threads. Production code never imports this module (it is outside the package).

- `FakeClock`: a Clock that moves only when told to.
- `TrioClock`: a Clock on trio's clock, so that trio's MockClock drives the lease in virtual time.
- `MemoryProject` / `MemoryLeaseStore`: the lease store's in-memory twin, one project shared by
  simulated hosts, each with its own faults; `simulated_identity` names such a host.
- `InlineRunner`: runs MemoryLeaseStore calls on the trio thread for LeaseKeeper(runner=...).

The backing tree's fault injection is safefs.testing.FaultPlan: a daemon started by a test
builds one from $SAFEFS_FAULTS, so it lives in the package.

Threading: MemoryLeaseStore never blocks; it locks its shared state, so threads may call it too.
FakeClock and TrioClock are called from the trio thread only.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import itertools
import math
import random
import re
import secrets
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from safefs.lease.model import EpochRecord, Heartbeat, Identity, Observation
from safefs.lease.store import epoch_name, hb_name, released_name

T = TypeVar("T")
EPOCH_NAME = re.compile(r"epoch\.(\d{12})")  # as lease.store names them


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


class TrioClock:
    """A Clock on trio's clock, so that trio's MockClock drives lease tests.

    `rate` scales this host's clock against trio's (clock-rate skew between hosts);
    `wall_offset` places its wall clock anywhere (wall-clock skew, which must not matter).
    Call it from the trio thread only.
    """

    def __init__(self, *, rate: float = 1.0, wall_offset: float = 1_700_000_000.0) -> None:
        self._rate = rate
        self._wall_offset = wall_offset

    def monotonic(self) -> float:
        return trio.current_time() * self._rate

    def wall(self) -> float:
        return self._wall_offset + self.monotonic()


class InlineRunner:
    """Runs MemoryLeaseStore calls on the trio thread, acting out its `hang`/`slow` faults in
    trio time (threads would let MockClock's autojump fire mid-call). `jitter` adds a random,
    seeded wait before each call, to shuffle how several keepers interleave."""

    HANG_POLL = 0.5  # how often a hung call looks whether it was healed, in trio seconds

    def __init__(self, store: MemoryLeaseStore, *, jitter: float = 0.0, seed: int | None = None) -> None:
        self._store = store
        self._jitter = jitter
        self._rng = random.Random(seed)

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        if self._jitter:
            await trio.sleep(self._rng.random() * self._jitter)
        op = fn.__name__
        delay = self._store.delay(op)
        while delay == math.inf:
            await trio.sleep(self.HANG_POLL)
            delay = self._store.delay(op)
        if delay:
            await trio.sleep(delay)
        return fn(*args)


# -- the lease store's in-memory twin ------------------------------------------------------

NFS_OPS = ("observe", "claim", "renew", "release", "quarantine")


@dataclasses.dataclass
class _MemoryFile:
    ino: int
    content: bytes
    mtime_ns: int


@dataclasses.dataclass(frozen=True)
class _Fault:
    kind: str  # "fail", "hang" or "slow"
    seconds: float = 0.0
    errno: int = _errno.EIO


class MemoryProject:
    """The shared `.safefs/` of simulated hosts: path -> file, under one lock."""

    def __init__(self) -> None:
        self.files: dict[str, _MemoryFile] = {}
        self.lock = threading.Lock()
        self._inos = itertools.count(100)
        self._ticks = itertools.count(1)  # a logical clock for mtimes: every write moves it

    def write(self, path: str, content: bytes, *, new_inode: bool = False) -> None:
        old = self.files.get(path)
        ino = next(self._inos) if old is None or new_inode else old.ino
        self.files[path] = _MemoryFile(ino, content, next(self._ticks))


class MemoryLeaseStore:
    """A LeaseStore in memory, for tests. Each simulated host gets its own `connect()`ion to one
    MemoryProject, with its own faults (a partition is one host's faults) and its own processes.

    Knobs: `fail(*ops)` makes calls raise OSError (EIO by default); `hang(*ops)` and
    `slow(seconds, *ops)` make calls take forever (until `heal()`) or that long. The store never
    blocks by itself: whoever runs its calls asks `delay(op)` and waits that long in its own time
    before the call acts (InlineRunner waits in trio time, so MockClock drives it).
    `kill(pid)` makes `pid_alive(pid)` false on this host. With no ops named, a knob covers
    every NFS operation.
    """

    def __init__(self, project: MemoryProject | None = None) -> None:
        self.project = project or MemoryProject()
        self._faults: dict[str, _Fault] = {}
        self._dead: set[int] = set()

    def connect(self) -> MemoryLeaseStore:
        """Another host's view of the same project."""
        return MemoryLeaseStore(self.project)

    # -- knobs --------------------------------------------------------------------------------

    def fail(self, *ops: str, errno: int = _errno.EIO) -> None:
        self._set(ops, _Fault("fail", errno=errno))

    def hang(self, *ops: str) -> None:
        self._set(ops, _Fault("hang"))

    def slow(self, seconds: float, *ops: str) -> None:
        self._set(ops, _Fault("slow", seconds=seconds))

    def heal(self, *ops: str) -> None:
        for op in ops or NFS_OPS:
            self._faults.pop(op, None)

    def delay(self, op: str) -> float:
        """How long a call of `op` takes before it acts: 0, some seconds, or math.inf (hung)."""
        fault = self._faults.get(op)
        if fault is None or fault.kind == "fail":
            return 0.0
        return math.inf if fault.kind == "hang" else fault.seconds

    def kill(self, pid: int) -> None:
        self._dead.add(pid)

    def _set(self, ops: tuple[str, ...], fault: _Fault) -> None:
        for op in ops or NFS_OPS:
            if op not in NFS_OPS:
                raise ValueError(f"unknown store operation {op!r}")
            self._faults[op] = fault

    def _enter(self, op: str) -> None:
        fault = self._faults.get(op)
        if fault is not None and fault.kind == "fail":
            raise OSError(fault.errno, f"{op}: injected failure")

    # -- inspection, for tests ----------------------------------------------------------------

    def names(self, prefix: str = "") -> list[str]:
        with self.project.lock:
            return sorted(p for p in self.project.files if p.startswith(prefix))

    def read(self, path: str) -> bytes:
        with self.project.lock:
            return self.project.files[path].content

    def put(self, path: str, content: bytes = b"") -> None:
        with self.project.lock:
            self.project.write(path, content, new_inode=True)

    # -- LeaseStore ---------------------------------------------------------------------------

    def observe(self) -> Observation:
        self._enter("observe")
        with self.project.lock:
            files = self.project.files
            found = (EPOCH_NAME.fullmatch(p.removeprefix("lease/")) for p in files)
            n = max((int(m.group(1)) for m in found if m), default=0)
            if n == 0:
                return Observation(0, None, False, None)
            record = EpochRecord.from_bytes(files[f"lease/{epoch_name(n)}"].content)
            hb = files.get(f"lease/{hb_name(n)}")
            heartbeat = None if hb is None else Heartbeat(hb.ino, len(hb.content), hb.mtime_ns, hb.mtime_ns, hb.content)
            return Observation(n, record, f"lease/{released_name(n)}" in files, heartbeat)

    def claim(self, record: EpochRecord) -> EpochRecord:
        self._enter("claim")
        path = f"lease/{epoch_name(record.epoch)}"
        with self.project.lock:
            existing = self.project.files.get(path)
            if existing is not None:
                return EpochRecord.from_bytes(existing.content)
            self.project.write(path, record.to_bytes(), new_inode=True)
            return record

    def renew(self, epoch: int, beat: bytes) -> bool:
        self._enter("renew")
        with self.project.lock:
            self.project.write(f"lease/{hb_name(epoch)}", beat)
            return f"lease/{epoch_name(epoch + 1)}" in self.project.files

    def release(self, epoch: int, note: bytes) -> None:
        self._enter("release")
        path = f"lease/{released_name(epoch)}"
        with self.project.lock:
            if path not in self.project.files:
                self.project.write(path, note, new_inode=True)

    def quarantine(self, epoch: int) -> int:
        self._enter("quarantine")
        moved = 0
        with self.project.lock:
            for path in list(self.project.files):
                parts = path.split("/")
                if len(parts) == 3 and parts[0] == "staging" and parts[1].isdigit() and int(parts[1]) <= epoch:
                    self.project.files[f"quarantine/{parts[1]}/{parts[2]}"] = self.project.files.pop(path)
                    moved += 1
        return moved

    def pid_alive(self, pid: int, start_time: int = 0) -> bool:
        return pid not in self._dead


_test_pids = itertools.count(2000)


def simulated_identity(host: str, **overrides: object) -> Identity:
    """A simulated host's identity for tests: its own machine and boot unless `overrides` say so."""
    fields: dict[str, object] = {
        "host": host,
        "machine_id": f"machine-{host}",
        "boot_id": f"boot-{host}",
        "pidns": 4026531836,
        "pid": next(_test_pids),
        "uid": 1000,
        "user": "tester",
        "nonce": secrets.token_hex(8),
    }
    fields.update(overrides)
    return Identity(**fields)  # type: ignore[arg-type]
