"""kill -9 at random points of a running workload, many times (issue 4, item 3; issue 10,
item 9; DESIGN.md G2).

A worker thread runs a seeded mixed workload on the mount (create/open with O_TRUNC, pwrite,
ftruncate, fsync, truncate, rename over existing files and across directories, unlink, an
occasional `safefs sync`) while write-back runs in the background (--writeback-delay 0.2).
The main thread SIGKILLs the daemon after a random time, remounts on the same cache dir and
checks; 50 rounds. Then a clean unmount, and SRC must equal the model byte for byte.

The model holds every *acknowledged* change: each step is one system call, applied to the
model only once the call returned. The one call in flight when the daemon died may have
taken effect or not: after the remount, the paths it touches must show either the state
before it or the state after it, and the model follows what the mount shows.

The contract (G2) with the kernel writeback cache: fsynced and closed files survive exactly;
writes to the file still open at the kill (at most one is open at a time, and closing it is
open until close() returned) may be lost. The kernel holds them in its page cache and sends
them later, page by page, in any order, and a truncate reaches the daemon at once while
earlier pages may still wait. So in that file, after the remount:
- every byte holds its value at the last durable point (its open, or its last fsync) or a
  value written to it later (a byte beyond the durable length may also read as zero: a page
  after it arrived first);
- its length is one it had since that point, or any multiple of the page size up to its
  greatest length since then (a later page arrived, an earlier one did not).
Its bytes are never foreign and never zeros where fsynced data was.

Checked after every kill: the remounted tree equals the model exactly (nothing acknowledged
lost, nothing duplicated, no conflict copies), with the open file checked as above, and SRC
holds no entry outside `.safefs` with a name the workload never used (a staging or conflict
file in the user's tree). At the end: SRC equals the model, and no staging file is left.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuse.test_writeback import snapshot, tree_diff
from tests.helpers import LIVE_MOUNTS, Mount, MountFactory, describe, run_safefs

pytestmark = pytest.mark.fuse

SEED = 4242
ROUNDS = 50
KIB = 1 << 10
MAX_WRITE = 64 * KIB
PAGE = 4096
MAX_FILE = 1 << 20
DIRS = ("a", "b", "a/c")
NAMES = tuple(f"f{i}" for i in range(6))
OUR_NAME = re.compile(r"^(f\d|a|b|c)$")  # every name the workload makes
ARGS = ("--writeback-delay", "0.2", "--lock-delay", "0")
# The worker's calls fail in these ways once the daemon is gone.
DEAD_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENODEV}

State = dict[str, bytes | None]  # path -> content, None: absent


@dataclasses.dataclass
class Step:
    what: str
    after: State  # the paths the step changes, as they are once it took effect
    run: Callable[[], None]
    partial: list[State] = dataclasses.field(default_factory=list)  # other outcomes if in flight
    session: bool = False  # a step on the open file: checked by the open file's rule


class ShortWrite(Exception):
    def __init__(self, acknowledged: State, rest: Step) -> None:
        super().__init__("short write")
        self.acknowledged = acknowledged
        self.rest = rest


class Worker(threading.Thread):
    """Runs steps on the mount until told to stop or until a call fails."""

    def __init__(self, mnt: Path, files: dict[str, bytes], rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.mnt = mnt
        self.files = files  # the model, shared with the main thread (it reads it after join)
        self.rng = rng
        self.stop = threading.Event()
        self.killing = threading.Event()  # set just before the daemon is killed
        self.inflight: Step | None = None
        self.unexpected: str | None = None  # a failure while the daemon was alive
        self.done_steps: list[str] = []
        self.fd: int | None = None
        self.fd_path: str | None = None
        self.session_left = 0
        # The open file (until close() returned): its contents since its last durable point.
        self.open_rel: str | None = None
        self.versions: list[bytes] = []

    # -- the workload

    def p(self, rel: str) -> Path:
        return self.mnt / rel

    def any_path(self) -> str:
        return f"{self.rng.choice(('', *DIRS))}/{self.rng.choice(NAMES)}".lstrip("/")

    def content(self, rel: str) -> bytes:
        return self.files.get(rel) or b""

    def next_step(self) -> Step:
        rng = self.rng
        if self.fd is not None:
            return self.session_step()
        roll = rng.random()
        existing = sorted(self.files)
        if roll < 0.45 or not existing:
            return self.open_step()
        if roll < 0.62:
            old, new = rng.choice(existing), self.any_path()
            if new == old:
                return self.open_step()
            return Step(f"rename {old} -> {new}", {old: None, new: self.files[old]},
                        lambda: os.rename(self.p(old), self.p(new)))  # fmt: skip
        if roll < 0.74:
            rel = rng.choice(existing)
            return Step(f"unlink {rel}", {rel: None}, lambda: os.unlink(self.p(rel)))
        if roll < 0.94:
            rel = rng.choice(existing)
            old = len(self.files[rel])
            size = min(MAX_FILE, rng.choice([0, rng.randint(0, old), old + rng.randint(1, 50_000)]))
            return Step(f"truncate {rel} {size}", {rel: resized(self.files[rel], size)},
                        lambda: os.truncate(self.p(rel), size))  # fmt: skip
        return Step("safefs sync", {}, self.run_sync)

    def open_step(self) -> Step:
        rel = self.any_path()
        trunc = self.rng.random() < 0.3
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if trunc else 0)
        after = b"" if trunc else self.content(rel)

        def run() -> None:
            self.fd = os.open(self.p(rel), flags, 0o644)
            self.fd_path = self.open_rel = rel
            self.versions = [after]
            self.session_left = self.rng.randint(1, 5)

        return Step(f"open {rel}{' O_TRUNC' if trunc else ''}", {rel: after}, run)

    def session_step(self) -> Step:
        rng, fd, rel = self.rng, self.fd, self.fd_path
        assert fd is not None and rel is not None
        buf = self.content(rel)
        if self.session_left <= 0:
            return Step(f"close {rel}", {}, self.close_fd, session=True)
        self.session_left -= 1
        roll = rng.random()
        if roll < 0.65 and len(buf) < MAX_FILE:
            offset = rng.randint(0, len(buf) + 8 * KIB)
            data = rng.randbytes(rng.choice([1, 100, 4096, 5000, 32 * KIB, MAX_WRITE]))
            new = written(buf, offset, data)

            # The kernel may split one write into requests at page boundaries, and the daemon
            # may die between them: in flight, any such prefix may have landed.
            cuts = [k for k in range(1, len(data)) if (offset + k) % 4096 == 0]
            what = f"pwrite {rel} @{offset} +{len(data)}"

            def write() -> None:
                n = os.pwrite(fd, data, offset)
                if n < len(data):  # a later request of this write met the dead daemon
                    longer = [{rel: written(buf, offset, data[:k])} for k in cuts if k > n]
                    rest = Step(f"{what} (short: {n} acknowledged)", {rel: new}, write, longer, session=True)
                    raise ShortWrite({rel: written(buf, offset, data[:n])}, rest)

            partial = [{rel: written(buf, offset, data[:k])} for k in cuts]
            return Step(what, {rel: new}, write, partial, session=True)
        if roll < 0.8:
            size = rng.choice([0, rng.randint(0, len(buf)), min(MAX_FILE, len(buf) + rng.randint(1, 20_000))])
            after = {rel: resized(buf, size)}
            return Step(f"ftruncate {rel} {size}", after, lambda: os.ftruncate(fd, size), session=True)
        return Step(f"fsync {rel}", {}, lambda: os.fsync(fd), session=True)

    def close_fd(self) -> None:
        fd, self.fd, self.fd_path = self.fd, None, None
        if fd is not None:
            os.close(fd)
        self.open_rel, self.versions = None, []  # closed: durable from here

    def run_sync(self) -> None:
        done = run_safefs("sync", self.mnt, timeout=120)
        if done.returncode != 0:
            raise OSError(errno.EIO, f"safefs sync failed: {describe(done)}")

    # -- the loop

    def run(self) -> None:
        while not self.stop.is_set():
            step = self.next_step()
            self.inflight = step
            try:
                step.run()
            except ShortWrite as short:
                # write() returned a short count: that much is acknowledged, the rest of the
                # write stays in flight.
                apply(self.files, short.acknowledged)
                if self.open_rel is not None:
                    self.versions.append(self.files[self.open_rel])
                self.inflight = short.rest
                if not self.killing.is_set():
                    self.unexpected = f"{step.what}: short write while the daemon was alive"
                    self.stop.set()
                return
            except OSError as exc:
                if not self.killing.is_set():
                    self.unexpected = f"{step.what}: {exc!r}"
                    self.stop.set()
                return  # the daemon is gone: this step stays in flight
            except BaseException as exc:  # an assertion in a step is a failure too
                if not self.killing.is_set():
                    self.unexpected = f"{step.what}: {exc!r}"
                    self.stop.set()
                return
            for rel, data in step.after.items():
                if data is None:
                    self.files.pop(rel, None)
                else:
                    self.files[rel] = data
            if step.session and self.open_rel is not None:
                current = self.files[self.open_rel]
                if step.what.startswith("fsync"):
                    self.versions = [current]
                else:
                    self.versions.append(current)
            self.done_steps.append(step.what)
            self.inflight = None

    def forget_fd(self) -> None:
        """After the kill: the descriptor belongs to the dead mount."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = self.fd_path = None


def apply(files: dict[str, bytes], state: State) -> None:
    for rel, data in state.items():
        if data is None:
            files.pop(rel, None)
        else:
            files[rel] = data


def written(buf: bytes, offset: int, data: bytes) -> bytes:
    new = bytearray(buf)
    if offset > len(new):
        new.extend(bytes(offset - len(new)))
    new[offset : offset + len(data)] = data
    return bytes(new)


def resized(data: bytes, size: int) -> bytes:
    return data[:size] if size <= len(data) else data + bytes(size - len(data))


def open_file_problem(versions: list[bytes], actual: bytes | None) -> str | None:
    """What is wrong with `actual` as the content of the file open at the kill (see the module
    docstring), or None. `versions[0]` is its content at its last durable point, the others
    what it held after each later change (the one in flight included)."""
    if actual is None:
        return "the file is gone"
    durable, greatest = versions[0], max(len(v) for v in versions)
    lengths = {len(v) for v in versions}
    if len(actual) not in lengths and not (len(actual) % PAGE == 0 and len(actual) <= greatest):
        return f"length {len(actual)} is none it had ({sorted(lengths)}) nor a page boundary up to {greatest}"
    for start in range(0, len(actual), PAGE):
        chunk = actual[start : start + PAGE]
        if any(v[start : start + len(chunk)] == chunk for v in versions):
            continue
        for i in range(start, start + len(chunk)):
            allowed = {v[i] for v in versions if i < len(v)}
            if i >= len(durable):
                allowed.add(0)
            if actual[i] not in allowed:
                return (f"byte {i} is {actual[i]}, neither its durable value nor one written later "
                        f"({sorted(allowed)[:8]})")  # fmt: skip
    return None


def read_state(mnt: Path, paths: list[str]) -> State:
    out: State = {}
    for rel in paths:
        try:
            out[rel] = (mnt / rel).read_bytes()
        except FileNotFoundError:
            out[rel] = None
    return out


def state_diff(want: State, got: State) -> str:
    lines = [tree_diff({k: v for k, v in want.items() if v is not None},
                       {k: v for k, v in got.items() if v is not None})]  # fmt: skip
    for rel in sorted(want):
        a, b = want.get(rel), got.get(rel)
        if a is None or b is None or a == b:
            continue
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        last = max(i for i in range(max(len(a), len(b))) if i >= len(a) or i >= len(b) or a[i] != b[i])
        zeros = not any(b[first : last + 1])
        lines.append(f"  {rel}: bytes {first}..{last} differ; there the mount shows "
                     f"{'only zeros' if zeros else repr(b[first:first + 16]) + '...'}")  # fmt: skip
    return "\n".join(lines)


def expected_tree(files: dict[str, bytes]) -> dict[str, object]:
    tree: dict[str, object] = {d: "dir" for d in DIRS}
    tree.update(files)
    return tree


def strays(src: Path) -> list[str]:
    """Entries in the user's part of SRC with a name the workload never makes."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(src):
        if os.path.samefile(dirpath, src):
            dirnames[:] = [d for d in dirnames if d != ".safefs"]
        for name in dirnames + filenames:
            if not OUR_NAME.match(name):
                bad.append(os.path.relpath(os.path.join(dirpath, name), src))
    return bad


def forget_mount(factory: MountFactory, dead: Mount) -> None:
    """A killed and reaped daemon needs no cleanup; dropping it keeps a failure report to one
    copy of the (shared) daemon log instead of one per round."""
    assert not dead.alive
    factory.mounts.remove(dead)
    if dead in LIVE_MOUNTS:
        LIVE_MOUNTS.remove(dead)


@pytest.mark.timeout(900)
def test_fifty_kills_during_a_running_workload(mount_factory: MountFactory):
    rng = random.Random(SEED)
    m = mount_factory(None, None, None, *ARGS)
    for d in DIRS:
        os.mkdir(m.mnt / d)
    files: dict[str, bytes] = {}
    history: list[str] = []
    started = time.monotonic()

    def where(round_no: int) -> str:
        return f"seed {SEED}, round {round_no}; last steps:\n    " + "\n    ".join(history[-25:])

    for round_no in range(ROUNDS):
        worker = Worker(m.mnt, files, random.Random(rng.getrandbits(64)))
        worker.start()
        # Kill after a random time: sometimes at once, mostly while write-back runs.
        worker.stop.wait(rng.choice([0.05, rng.uniform(0.1, 0.6), rng.uniform(0.3, 1.8)]))
        if worker.unexpected:
            worker.join(30)
            history += worker.done_steps
            pytest.fail(
                f"a call failed while the daemon was alive: {worker.unexpected}\n{where(round_no)}"
                f"\n--- daemon log\n{m.log_tail(30)}",
                pytrace=False,
            )
        worker.killing.set()
        worker.stop.set()
        m.proc.kill()
        # The dead mount stays attached until the worker is done: its calls must fail with
        # ENOTCONN, not land in the bare mountpoint directory after an unmount.
        worker.join(60)
        assert not worker.is_alive(), f"a call on the killed mount never returned ({worker.inflight})"
        m.kill()  # reap, and lazily unmount the dead mount
        forget_mount(mount_factory, m)
        worker.forget_fd()
        history += worker.done_steps
        inflight = worker.inflight
        history.append(f"-- kill -9 (in flight: {inflight.what if inflight else 'nothing'})")

        bad = strays(m.src)
        context = where(round_no)
        assert not bad, f"after kill {round_no}, SRC holds names the workload never made: {bad}\n{context}"

        m = mount_factory(m.src, m.mnt, m.cache_dir, *ARGS)
        if worker.open_rel is not None:  # the file left open: each byte durable or later
            rel, versions = worker.open_rel, list(worker.versions)
            if inflight is not None and inflight.session and rel in inflight.after:
                versions.append(inflight.after[rel] or b"")
            actual = read_state(m.mnt, [rel])[rel]
            problem = open_file_problem(versions, actual)
            assert problem is None, (
                f"after kill {round_no}, {rel} (open, {len(versions)} versions since its last durable "
                f"point) is wrong: {problem}\n{where(round_no)}"
            )
            assert actual is not None
            files[rel] = actual
            lost = actual != versions[-1]
            history.append(f"   (the open file {rel} has {len(actual)} bytes{', not its last' if lost else ''})")
            inflight = None if inflight is not None and inflight.session else inflight
        if inflight is not None and inflight.after:
            paths = sorted(inflight.after)
            before = {rel: files.get(rel) for rel in paths}
            actual = read_state(m.mnt, paths)
            if actual == inflight.after:
                apply(files, actual)
                history.append(f"   (it took effect: {inflight.what})")
            elif actual in inflight.partial:
                apply(files, actual)
                history.append(f"   (it took effect in part: {inflight.what})")
            else:
                assert actual == before, (
                    f"the step in flight at kill {round_no} ({inflight.what}) left neither the state "
                    f"before nor the one after it.\nversus before:\n{state_diff(before, actual)}"
                    f"\nversus after:\n{state_diff(inflight.after, actual)}\n{where(round_no)}"
                )
        diff = tree_diff(expected_tree(files), snapshot(m.mnt))
        context = where(round_no)
        assert not diff, f"after kill {round_no} the remount differs from the model:\n{diff}\n{context}"

    elapsed = time.monotonic() - started
    m.umount()
    diff = tree_diff(expected_tree(files), snapshot(m.src))
    context = where(ROUNDS)
    assert not diff, f"SRC after {ROUNDS} kills and a clean umount differs from the model:\n{diff}\n{context}"
    bad = strays(m.src)
    assert not bad, f"stray files in SRC after the clean umount: {bad}"
    staging = m.src / ".safefs" / "staging"
    leftovers = [str(p) for p in staging.rglob("*") if p.is_file()] if staging.exists() else []
    assert not leftovers, f"staging files left after the clean umount: {leftovers[:10]}"
    kills_in_flight = sum(1 for line in history if line.startswith("-- kill") and "nothing" not in line)
    open_at_kill = sum(1 for line in history if line.startswith("   (the open file"))
    lost = sum(1 for line in history if line.startswith("   (the open file") and "not its last" in line)
    steps = sum(1 for line in history if not line.startswith(("--", "   ")))
    print(f"{ROUNDS} rounds, {steps} acknowledged steps, {kills_in_flight} kills with a call in flight, "
          f"{open_at_kill} with a file open ({lost} lost un-fsynced bytes of it), {elapsed:.0f}s; "
          f"{len(files)} files at the end")  # fmt: skip


def test_the_open_file_rule() -> None:
    """The check of the file left open accepts what G2 allows and nothing else."""
    durable = b"D" * 5000
    later = b"D" * 4096 + b"L" * 8000  # a write over the end and beyond
    assert open_file_problem([durable, later], durable) is None
    assert open_file_problem([durable, later], later) is None
    assert open_file_problem([durable, later], later[:8192]) is None  # a page boundary
    mixed = b"D" * 5000 + bytes(8192 - 5000) + b"L" * (len(later) - 8192)  # the last page came first
    assert open_file_problem([durable, later], mixed) is None
    assert open_file_problem([durable, later], later[:6000]) is not None  # no such length
    assert "byte 10" in (open_file_problem([durable, later], b"D" * 10 + b"X" + b"D" * 4989) or "")
    zeros = bytes(4096) + b"D" * 904
    assert open_file_problem([durable, later], zeros) is not None  # zeros over fsynced data
    assert open_file_problem([durable], None) is not None
