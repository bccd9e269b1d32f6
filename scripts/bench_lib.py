"""scripts/bench: the same workloads on the local disk, safefs, rclone and a slow "NFS", in one run.

    scripts/bench [--quick] [--runs N] [--systems local,safefs,rclone,nfs] [--workloads ...]
                  [--nfs-latency-ms 0.5] [--dir DIR] [--json FILE] [--keep]

Systems (one directory tree each, all on the same local disk, under --dir):
- local:      the local disk itself, the limit every ratio is taken against.
- safefs:     a safefs writer mount (`python -m safefs mount SRC MNT --cache-dir ...`).
- ceiling:    scripts/passthrough.py, a minimal durable pyfuse3 pass-through (kernel writeback
              cache, 60 s entry/attr timeouts, fsync forwarded): what Python on pyfuse3 can
              do here at best, so each row also reads as a fraction of that.
- rclone:     `rclone mount --vfs-cache-mode full` of a local directory (the write-back-cache
              peer users pick). Needs the Debian package rclone; installed with apt-get when
              missing and we are root, else the column is skipped with a note.
- nfs:        the tree reached through tests/faultfs.py with a latency per request
              (default 0.5 ms for metadata and data requests alike), standing in for
              working directly on NFS.
- safefs-nfs: (not in the default set) safefs whose SRC is that slow "NFS".

Workloads (`--workloads`, default all): seq (write + fsync, cold read), fetch (cold read of a
file safefs/rclone have not cached yet), rand (fio 4 KiB random write and cold random read;
a Python loop when fio is missing), tar (extract, find, stat cold/warm, rm -r), sqlite
(single-row transactions, synchronous=FULL, rollback journal and WAL), busy (applications
while safefs writes a big file back, below), git (clone over file://, status twice),
writeback (safefs only: bytes written to SRC for 1 MiB dirty in the middle of a big file),
tree (find and read a big tree that was on SRC before mounting, and the daemon's memory, below).

busy (local, safefs and safefs-nfs only): does write-back stall the applications using the
mount? In one worker: SQLite single-row transactions (rollback journal, synchronous=FULL) for
a few seconds (2 s quick, 5 s full), then creating 4 KiB files (create, write, close) for as
long: the "idle" rows. Then, twice (once for SQLite, once for creates): `safefs sync` so
nothing else is pending, write a big file (1 GiB, --quick too: here safefs wrote 256 MiB back
in 0.2-1 s, often before `safefs status` could show it under way) into the mount, start
`safefs sync` in the background, poll `safefs status --json` until bytes_written moves (or
flushing is set), and from then on run the same loop until that `safefs sync` returns (at most
max(60 s, 4 x the idle window)): the "during a write-back" rows, counted over exactly the
time the write-back was under way. One write-back may last under the idle window, so this
repeats (a new big file each time, at most 10) until the windows add up to the idle window;
the rate is all operations over all windows. An extra line gives, per system, the total
window, how many write-backs, and the least of the file still to write when measuring
started; a write-back that ended before measuring could start is not counted (and said so),
and if every one did the step fails rather than report an idle number as a busy one. Local
has no write-back: its "during" cells are the same loop run again for the idle window, the
baseline the ratios compare with (the big file is not written there).

tree (every system but nfs sim, which reads about 13 ms a file; one run whatever --runs,
since a second would find everything cached): 100,000 files of 0-8 KiB (quick 10,000) in 100
directories, made once with Python and copied (`cp -a`, not through any mount) into each
system's backing tree before mounting, so safefs has to list and fetch all of it, as for a
project already on NFS. Then: `find` cold (drop caches; on safefs also the first listing of
that tree since mounting), `find` again (warm), drop caches and read every file once (Python
open/read, total bytes checked), then VmRSS and VmHWM of the daemon from /proc/PID/status,
printed as "<system> daemon RSS after reading 100,000 files". The issue's targets: RSS under
200 MiB, warm find within 2x of local.

How it measures: every cell is the median of --runs runs; systems take turns inside each
run, so the ratio to local compares numbers taken minutes apart, not hours. Each workload
step runs in a fresh child process (this script with --worker), timed inside the child, with
a timeout, so a wedged mount shows as "fail" instead of hanging the benchmark. "Cold" means
`sync; echo 3 > /proc/sys/vm/drop_caches` first (root only; otherwise cold numbers are warm
and the output says so). After each workload step on safefs, `safefs sync` (untimed) writes
everything back, so one step's write-back does not slow the next.

Cleanup: everything mounted is unmounted in a finally block (daemon's own unmount first,
then `fusermount3 -u -z`), SIGTERM included, and the scratch directory is removed unless
--keep or something is still mounted.

Single-threaded; blocking subprocess calls throughout (busy's background `safefs sync` is a
Popen that the worker waits for, or kills on the way out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MIB = 1024 * 1024
DEFAULT_SYSTEMS = ("local", "safefs", "ceiling", "rclone", "nfs")
ALL_SYSTEMS = (*DEFAULT_SYSTEMS, "safefs-nfs")
WORKLOADS = ("seq", "fetch", "rand", "tar", "sqlite", "busy", "git", "writeback", "tree")
BUSY_SYSTEMS = ("local", "safefs", "safefs-nfs")  # busy needs a write-back; local is its baseline
TREE_SKIPS = ("nfs",)  # nfs sim reads about 13 ms a file: 100,000 files would add over 20 minutes
TREE_DIRS = 100


@dataclasses.dataclass(frozen=True)
class Sizes:
    seq_bytes: int
    rand_bytes: int
    rand_seconds: float
    files: int
    transactions: int
    big_bytes: int  # the writeback file; above safefs's 64 MiB atomic-publish threshold
    worker_timeout: float
    busy_bytes: int  # the file whose write-back busy measures applications during (lasts seconds)
    busy_seconds: float  # the idle (and local) measuring window of the busy workload
    tree_files: int  # the tree workload's tree, TREE_DIRS directories

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        if quick:
            return cls(64 * MIB, 32 * MIB, 2.0, 300, 200, 128 * MIB, 300.0, 1024 * MIB, 2.0, 10_000)
        return cls(512 * MIB, 256 * MIB, 10.0, 3000, 2000, 1024 * MIB, 1800.0, 1024 * MIB, 5.0, 100_000)


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    higher_is_better: bool


def rows_for(sizes: Sizes) -> dict[str, list[Row]]:
    seq, rnd, busy = human(sizes.seq_bytes), human(sizes.rand_bytes), human(sizes.busy_bytes)
    n, tx, tree = f"{sizes.files:,}", f"{sizes.transactions:,}", f"{sizes.tree_files:,}"
    return {
        "seq": [Row("seq_write", f"seq write {seq} + fsync", "MiB/s", True),
                Row("seq_read_cold", f"seq read {seq}, cold", "MiB/s", True)],
        "fetch": [Row("seq_read_fetch", f"seq read {seq}, not yet cached", "MiB/s", True)],
        "rand": [Row("rand_write", f"4 KiB random write, {rnd} file", "IOPS", True),
                 Row("rand_read", f"4 KiB random read, {rnd} file, cold", "IOPS", True)],
        "tar": [Row("tar_extract", f"tar extract {n} small files", "s", False),
                Row("find", "find over them", "s", False),
                Row("stat_cold", "stat every file, cold", "s", False),
                Row("stat_warm", "stat every file, warm", "s", False),
                Row("rm", "rm -r them", "s", False)],
        "sqlite": [Row("sqlite_delete", f"SQLite {tx} tx, rollback journal", "tx/s", True),
                   Row("sqlite_wal", f"SQLite {tx} tx, WAL", "tx/s", True)],
        "busy": [Row("busy_sqlite_idle", "SQLite tx for a while, rollback journal, idle", "tx/s", True),
                 Row("busy_sqlite", f"the same during a {busy} write-back", "tx/s", True),
                 Row("busy_create_idle", "create 4 KiB files for a while, idle", "files/s", True),
                 Row("busy_create", f"the same during a {busy} write-back", "files/s", True)],
        "git": [Row("git_clone", f"git clone, {n} files", "s", False),
                Row("git_status1", "git status, 1st", "s", False),
                Row("git_status2", "git status, 2nd", "s", False)],
        "tree": [Row("tree_find_cold", f"find over {tree} files, cold", "s", False),
                 Row("tree_find_warm", f"find over {tree} files, warm", "s", False),
                 Row("tree_read", f"read all {tree} files, cold", "s", False)],
    }


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.0f} {unit}" if n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def run(
    cmd: Sequence[str | os.PathLike[str]], *, timeout: float = 600, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([os.fspath(c) for c in cmd], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and done.returncode != 0:
        output = (done.stderr or done.stdout).strip()[-2000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {done.returncode}: {output}")
    return done


def is_mounted(path: Path) -> bool:
    want = os.path.abspath(path)
    with open("/proc/self/mounts", encoding="latin-1") as table:
        return any(len(f) > 1 and f[1].encode("latin-1").decode("unicode_escape") == want
                   for f in (line.split() for line in table))


def lazy_unmount(path: Path) -> str | None:
    if not is_mounted(path):
        return None
    done = run(["fusermount3", "-u", "-z", path], check=False, timeout=60)
    return None if not is_mounted(path) else f"fusermount3 -u -z {path}: {done.stderr.strip()}"


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def vm_hwm(pid: int | None, field: str = "VmHWM") -> int | None:
    """Peak resident memory of a process in bytes (VmHWM; or another /proc/PID/status field
    in kB, such as VmRSS), or None if it is gone."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --- systems ---------------------------------------------------------------------------------


class System:
    """One way of reaching a directory tree. `backing` is filled before `mount`; workloads run
    under `root`, where backing's files appear."""

    name = "?"
    label = "?"

    def __init__(self, base: Path) -> None:
        self.base = base / self.name
        self.backing = self.base / "backing"
        self.root = self.backing
        self.backing.mkdir(parents=True)

    def mount(self) -> None:
        pass

    def quiesce(self, timeout: float) -> None:
        """Untimed, after a workload step: let pending write-back finish."""

    def daemon_pid(self) -> int | None:
        return None

    def mountpoints(self) -> list[Path]:
        return [self.root] if self.root != self.backing else []

    def unmount(self) -> list[str]:
        return []


class Local(System):
    name = "local"
    label = "local disk"


class Safefs(System):
    name = "safefs"
    label = "safefs"

    def __init__(self, base: Path, src: Path | None = None) -> None:
        super().__init__(base)
        self.src = src or self.backing
        self.root = self.base / "mnt"
        self.cache = self.base / "cache"
        self.root.mkdir()
        self.pid: int | None = None
        self.mounted = False

    def cli(self, *args: Any, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([PY, "-m", "safefs", *args], timeout=timeout, check=check, cwd=REPO)

    def mount(self) -> None:
        self.cli("mount", self.src, self.root, "--cache-dir", self.cache, timeout=120)
        self.mounted = True
        self.pid = self.status()["pid"]

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", self.root, "--json", timeout=60).stdout)

    def quiesce(self, timeout: float) -> None:
        self.cli("sync", self.root, "--timeout", str(timeout), timeout=timeout + 30)

    def daemon_pid(self) -> int | None:
        return self.pid

    def unmount(self) -> list[str]:
        if not self.mounted:
            return []
        problems = []
        done = self.cli("umount", self.root, "--timeout", "600", timeout=660, check=False)
        if done.returncode != 0:
            problems.append(f"safefs umount {self.root}: {(done.stderr or done.stdout).strip()}")
        problem = lazy_unmount(self.root)
        if problem:
            problems.append(problem)
        if self.pid is not None:
            deadline = time.monotonic() + 30
            while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if Path(f"/proc/{self.pid}").exists():
                problems.append(f"safefs daemon {self.pid} still running after unmount; killed")
                os.kill(self.pid, signal.SIGKILL)
        self.mounted = False
        return problems


class _MountProcess(System):
    """A FUSE filesystem run as one foreground process that unmounts itself on SIGTERM."""

    log_name = "?"  # the process's output, kept in the system's base dir

    def __init__(self, base: Path) -> None:
        super().__init__(base)
        self.root = self.base / "mnt"
        self.root.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def mount(self) -> None:
        log_path = self.base / self.log_name
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while not is_mounted(self.root):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} mount failed: {log_path.read_text()[-1000:]}")
            time.sleep(0.05)

    def daemon_pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def unmount(self) -> list[str]:
        problems = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append(f"{self.label} ignored SIGTERM for 30 s; killed")
                self.proc.kill()
                self.proc.wait(timeout=10)
        problem = lazy_unmount(self.root)
        return problems + ([problem] if problem else [])


class Rclone(_MountProcess):
    name = "rclone"
    label = "rclone vfs full"
    log_name = "rclone.log"

    def command(self) -> list[str]:
        return ["rclone", "mount", str(self.backing), str(self.root), "--vfs-cache-mode", "full",
                "--cache-dir", str(self.base / "cache"), "--config", "/dev/null"]  # fmt: skip


class Ceiling(_MountProcess):
    """scripts/passthrough.py over its own backing directory."""

    name = "ceiling"
    label = "py ceiling"
    log_name = "passthrough.log"

    def command(self) -> list[str]:
        return [PY, str(REPO / "scripts" / "passthrough.py"), str(self.backing), str(self.root)]


class SlowNfs(System):
    name = "nfs"

    def __init__(self, base: Path, latency_ms: float, cache_timeout: float = 0.0) -> None:
        super().__init__(base)
        self.latency_ms = latency_ms
        self.cache_timeout = cache_timeout
        self.label = f"nfs sim {latency_ms:g} ms"
        self.root = self.base / "mnt"
        self.root.mkdir()
        self.fs: Any = None

    def mount(self) -> None:
        sys.path.insert(0, str(REPO))
        from tests.faultfs import FaultFS

        self.fs = FaultFS.start(self.backing, self.root, latency_ms=self.latency_ms,
                                cache_timeout=self.cache_timeout, log_path=self.base / "faultfs.log")

    def daemon_pid(self) -> int | None:
        return self.fs.pid if self.fs else None

    def unmount(self) -> list[str]:
        return self.fs.stop() if self.fs else []


class SafefsOverNfs(System):
    """safefs whose project is the slow "NFS": what a writer sees in real life."""

    name = "safefs-nfs"

    def __init__(self, base: Path, latency_ms: float, cache_timeout: float = 0.0) -> None:
        super().__init__(base)
        self.nfs = SlowNfs(self.base, latency_ms, cache_timeout)
        self.backing = self.nfs.backing
        self.safefs = Safefs(self.base, src=self.nfs.root)
        self.root = self.safefs.root
        self.label = "safefs on nfs sim"

    def mount(self) -> None:
        self.nfs.mount()
        self.safefs.mount()

    def quiesce(self, timeout: float) -> None:
        self.safefs.quiesce(timeout)

    def daemon_pid(self) -> int | None:
        return self.safefs.daemon_pid()

    def mountpoints(self) -> list[Path]:
        return [self.safefs.root, self.nfs.root]

    def unmount(self) -> list[str]:
        return self.safefs.unmount() + self.nfs.unmount()


# --- shared input data -----------------------------------------------------------------------


def make_data(data: Path, sizes: Sizes, runs: int, workloads: set[str]) -> None:
    """Build once: fetch files, the big writeback file, a small-file tree, its tarball, a git repo."""
    data.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MIB)
    if "fetch" in workloads:
        for i in range(runs):
            write_file(data / f"fetch-{i}", sizes.seq_bytes, block)
    if workloads & {"tar", "git"}:
        rng = random.Random(42)
        tree = data / "tree"
        names = []
        for i in range(sizes.files):
            rel = Path(f"d{i % max(1, sizes.files // 100):03d}") / f"s{(i // 37) % 4}" / f"file{i:05d}.txt"
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            # Mostly small text, a few larger: mean about 4 KiB.
            size = rng.choice([rng.randrange(0, 2048)] * 3 + [rng.randrange(2048, 24576)])
            (tree / rel).write_bytes(block[rng.randrange(0, MIB - size):][:size])
            names.append(str(rel))
        (data / "names.txt").write_text("\n".join(names) + "\n")
        run(["tar", "-cf", data / "small.tar", "-C", tree, "."])
        repo = data / "repo"
        shutil.copytree(tree, repo)
        git = ["git", "-C", repo, "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
        run(["git", "init", "-q", repo])
        run([*git, "add", "-A"])
        run([*git, "commit", "-q", "-m", "bench tree"])
    if "tree" in workloads:
        make_big_tree(data / "bigtree", sizes.tree_files, block)


def tree_names(files: int) -> list[str]:
    """The tree workload's files: TREE_DIRS directories of files/TREE_DIRS files each."""
    per = -(-files // TREE_DIRS)
    return [f"d{i // per:03d}/f{i:06d}.txt" for i in range(files)]


def make_big_tree(tree: Path, files: int, block: bytes) -> None:
    """Small files, 0 to 8 KiB (mean 4 KiB), written directly (not through any mount)."""
    rng, total = random.Random(43), 0
    for name in tree_names(files):
        path = tree / name
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
        size = rng.randrange(0, 8192)
        with open(path, "wb") as f:
            f.write(block[rng.randrange(0, MIB - size):][:size])
        total += size
    (tree.parent / f"{tree.name}.bytes").write_text(str(total))


def write_file(path: Path, size: int, block: bytes) -> None:
    with open(path, "wb") as f:
        for offset in range(0, size, len(block)):
            f.write(block[: min(len(block), size - offset)])


def prefill(system: System, data: Path, sizes: Sizes, runs: int, workloads: set[str]) -> None:
    """Put the files a workload must find "not yet cached" into the backing tree, before mounting.

    The read-only fetch files are hard links (no copy; a distinct inode per run, so a cache
    cannot reuse one run's fetch). The writeback file is changed, so each system gets its own:
    a shared inode changed by one mount would be an out-of-band change (a conflict) to another.
    The tree workload's tree is copied (`cp -a`) into each system's backing tree.
    """
    pre = system.backing / "prefill"
    pre.mkdir()
    if "fetch" in workloads:
        for i in range(runs):
            os.link(data / f"fetch-{i}", pre / f"fetch-{i}")
    if "writeback" in workloads and isinstance(system, (Safefs, SafefsOverNfs)):
        write_file(pre / "big", sizes.big_bytes, os.urandom(MIB))
    if "tree" in workloads and system.name not in TREE_SKIPS:
        # A real copy per system (not hard links: a project on NFS has nlink 1), in SRC before
        # mounting, so safefs has to list and fetch all of it, as for a project already on NFS.
        run(["cp", "-a", data / "bigtree", pre / "tree"], timeout=1800)


# --- workers: one workload step in a child process -------------------------------------------


def worker_seq(d: Path, p: dict[str, Any]) -> dict[str, float]:
    path, size, block = d / "seq.bin", p["seq_bytes"], os.urandom(MIB)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, size, MIB):
            os.write(fd, block[: min(MIB, size - offset)])
        os.fsync(fd)
    finally:
        os.close(fd)
    write = size / MIB / (time.perf_counter() - start)
    drop_caches()
    read = size / MIB / timed_read(path)
    os.unlink(path)
    return {"seq_write": write, "seq_read_cold": read}


def timed_read(path: Path) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, MIB):
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - start


def worker_fetch(d: Path, p: dict[str, Any]) -> dict[str, float]:
    path = Path(p["root"]) / "prefill" / f"fetch-{p['run']}"
    drop_caches()
    return {"seq_read_fetch": os.stat(path).st_size / MIB / timed_read(path)}


def worker_rand(d: Path, p: dict[str, Any]) -> dict[str, float]:
    path, size, seconds = d / "rand.bin", p["rand_bytes"], p["rand_seconds"]
    if shutil.which("fio"):
        out = {"rand_write": fio(path, size, seconds, "randwrite")}
        drop_caches()
        out["rand_read"] = fio(path, size, seconds, "randread")
    else:
        write_file(path, size, os.urandom(MIB))
        out = {"rand_write": python_random_io(path, size, seconds, write=True)}
        drop_caches()
        out["rand_read"] = python_random_io(path, size, seconds, write=False)
    os.unlink(path)
    return out


def fio(path: Path, size: int, seconds: float, rw: str) -> float:
    done = run(["fio", "--name=bench", f"--filename={path}", f"--size={size}", "--bs=4k", f"--rw={rw}",
                "--ioengine=psync", "--iodepth=1", f"--runtime={seconds}", "--time_based", "--end_fsync=1",
                "--fallocate=none", "--randrepeat=0", "--output-format=json"], timeout=seconds * 20 + 600)
    job = json.loads(done.stdout[done.stdout.index("{"):])["jobs"][0]
    return float(job["write" if "write" in rw else "read"]["iops"])


def python_random_io(path: Path, size: int, seconds: float, *, write: bool) -> float:
    rng, block, count = random.Random(), os.urandom(4096), 0
    fd = os.open(path, os.O_RDWR)
    try:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(64):
                offset = rng.randrange(size // 4096) * 4096
                os.pwrite(fd, block, offset) if write else os.pread(fd, 4096, offset)
            count += 64
        if write:
            os.fsync(fd)
        return count / (time.perf_counter() - start)
    finally:
        os.close(fd)


def worker_tar(d: Path, p: dict[str, Any]) -> dict[str, float]:
    data, out = Path(p["data"]), {}
    target = d / "x"
    target.mkdir()
    names = [target / n for n in (data / "names.txt").read_text().split()]
    out["tar_extract"] = timed(lambda: run(["tar", "-xf", data / "small.tar", "-C", target]))
    out["find"] = timed(lambda: run(["find", target]))
    drop_caches()
    out["stat_cold"] = timed(lambda: [os.lstat(n) for n in names])
    out["stat_warm"] = timed(lambda: [os.lstat(n) for n in names])
    out["rm"] = timed(lambda: run(["rm", "-r", target]))
    return out


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker_sqlite(d: Path, p: dict[str, Any]) -> dict[str, float]:
    out = {}
    for mode, key in (("delete", "sqlite_delete"), ("wal", "sqlite_wal")):
        con = sqlite_open(d / f"{mode}.db", mode)
        start = time.perf_counter()
        for i in range(p["transactions"]):
            con.execute("begin")
            con.execute("insert into t (v) values (?)", (f"row {i} " + "x" * 100,))
            con.execute("commit")
        out[key] = p["transactions"] / (time.perf_counter() - start)
        ok = con.execute("pragma integrity_check").fetchone()[0]
        rows = con.execute("select count(*) from t").fetchone()[0]
        con.close()
        if ok != "ok" or rows != p["transactions"]:
            raise RuntimeError(f"sqlite {mode}: integrity {ok}, {rows} rows")
    return out


def sqlite_open(path: Path, mode: str) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute(f"pragma journal_mode={mode}")
    con.execute("pragma synchronous=FULL")
    con.execute("create table t (id integer primary key, v text)")
    return con


def sqlite_loop(con: sqlite3.Connection, go_on: Callable[[], bool]) -> tuple[int, float]:
    """Single-row transactions while go_on(): (how many, seconds)."""
    count, start = 0, time.perf_counter()
    while go_on():
        con.execute("begin")
        con.execute("insert into t (v) values (?)", (f"row {count} " + "x" * 100,))
        con.execute("commit")
        count += 1
    return count, time.perf_counter() - start


def create_loop(d: Path, go_on: Callable[[], bool]) -> tuple[int, float]:
    """New 4 KiB files in d (create, write, close; no fsync), 1,000 a directory, while
    go_on(): (how many, seconds)."""
    block, count, start = os.urandom(4096), 0, time.perf_counter()
    while go_on():
        if count % 1000 == 0:
            (d / f"{count // 1000:04d}").mkdir(parents=True)
        fd = os.open(d / f"{count // 1000:04d}" / f"c{count:07d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, block)
        finally:
            os.close(fd)
        count += 1
    return count, time.perf_counter() - start


def for_seconds(seconds: float) -> Callable[[], bool]:
    end = time.perf_counter() + seconds
    return lambda: time.perf_counter() < end


def safefs_cli(*args: Any, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run([PY, "-m", "safefs", *args], timeout=timeout, cwd=REPO)


def safefs_status(mnt: str) -> dict[str, Any]:
    return json.loads(safefs_cli("status", mnt, "--json", timeout=60).stdout)


def writeback_started(mnt: str, sync: subprocess.Popen[bytes], before: int, size: int) -> int | None:
    """Wait until `safefs status` shows the write-back under way; the bytes of the big file
    still to write then, or None if it finished before we could look."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = safefs_status(mnt)
        written = status["bytes_written"] - before
        if sync.poll() is not None:
            return None
        if status["flushing"] or written > 0:
            return size - written if written < size else None
        time.sleep(0.02)
    raise RuntimeError("`safefs sync` ran 60 s and `safefs status` never showed a write-back under way")


def worker_busy(d: Path, p: dict[str, Any]) -> dict[str, float]:
    """Application throughput while safefs writes a big file back (see the module docstring)."""
    mnt, seconds, size = p["safefs_mnt"], p["busy_seconds"], p["busy_bytes"]
    cap = max(60.0, 4 * seconds)  # the longest one write-back is measured
    con = sqlite_open(d / "busy.db", "delete")
    out: dict[str, float] = {}
    if mnt:
        safefs_cli("sync", mnt)  # the database's creation is not part of what is measured
    count, took = sqlite_loop(con, for_seconds(seconds))
    out["busy_sqlite_idle"] = count / took
    count, took = create_loop(d / "idle", for_seconds(seconds))
    out["busy_create_idle"] = count / took
    shutil.rmtree(d / "idle")
    loops: list[tuple[str, Callable[[int, Callable[[], bool]], tuple[int, float]]]] = [
        ("busy_sqlite", lambda cycle, go_on: sqlite_loop(con, go_on)),
        ("busy_create", lambda cycle, go_on: create_loop(d / "busy" / str(cycle), go_on))]
    for key, loop in loops:
        if not mnt:  # local: no write-back, the same measurement again
            count, took = loop(0, for_seconds(seconds))
            out[key] = count / took
            continue
        # One write-back of `size` may be over in well under a second: measure during as many
        # as it takes to have `seconds` of write-back under way (at most 10).
        total, window, pending, cut, early = 0, 0.0, [], 0, 0
        for cycle in range(10):
            if window >= seconds:
                break
            safefs_cli("sync", mnt)  # nothing else pending: what the sync below writes is the big file
            big = d / f"big-{key}-{cycle}"
            write_file(big, size, os.urandom(MIB))  # closed: in safefs's cache, not on SRC yet
            before = safefs_status(mnt)["bytes_written"]
            sync = subprocess.Popen([PY, "-m", "safefs", "sync", mnt], cwd=REPO, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                left = writeback_started(mnt, sync, before, size)
                if left is None:
                    early += 1
                else:
                    start = time.perf_counter()
                    count, took = loop(cycle, lambda: sync.poll() is None and time.perf_counter() - start < cap)
                    total, window = total + count, window + took
                    pending.append(left)
                    cut += sync.poll() is None  # the cap ended this window, not the write-back
                _, err = sync.communicate(timeout=p["worker_timeout"])
            finally:
                if sync.poll() is None:
                    sync.kill()
                    sync.communicate()
            if sync.returncode != 0:
                raise RuntimeError(f"safefs sync exited {sync.returncode}: {err.decode().strip()[-500:]}")
            os.unlink(big)
        if not pending:
            raise RuntimeError(f"each of {early} write-backs of {human(size)} finished before "
                               "the measurement could start")
        out.update({key: total / window, f"{key}_window": window, f"{key}_cycles": len(pending),
                    f"{key}_pending": min(pending), f"{key}_cut": cut, f"{key}_early": early})
    ok = con.execute("pragma integrity_check").fetchone()[0]
    con.close()
    if ok != "ok":
        raise RuntimeError(f"sqlite after busy: integrity {ok}")
    return out


def worker_tree(d: Path, p: dict[str, Any]) -> dict[str, float]:
    """find cold and warm, then read every file, over a tree that was in SRC before mounting."""
    tree, files, timeout = Path(p["root"]) / "prefill" / "tree", p["tree_files"], p["worker_timeout"]
    names = [tree / n for n in tree_names(files)]
    drop_caches()
    out = {"tree_find_cold": timed(lambda: run(["find", tree], timeout=timeout))}
    found: list[str] = []
    out["tree_find_warm"] = timed(lambda: found.append(run(["find", tree], timeout=timeout).stdout))
    if found[0].count("\n") != files + TREE_DIRS + 1:
        raise RuntimeError(f"find listed {found[0].count(chr(10))} entries, not {files + TREE_DIRS + 1}")
    total = 0

    def read_all() -> None:
        nonlocal total
        for name in names:
            with open(name, "rb") as f:
                total += len(f.read())

    drop_caches()
    out["tree_read"] = timed(read_all)
    if total != int((Path(p["data"]) / "bigtree.bytes").read_text()):
        raise RuntimeError(f"read {total:,} bytes, the tree has {(Path(p['data']) / 'bigtree.bytes').read_text()}")
    fields = (("VmRSS", "tree_rss"), ("VmHWM", "tree_hwm"), ("RssAnon", "tree_anon"), ("RssFile", "tree_file"))
    for field, key in fields:
        value = vm_hwm(p["daemon_pid"], field)
        if value is not None:
            out[key] = value
    return out


def worker_git(d: Path, p: dict[str, Any]) -> dict[str, float]:
    data, clone = Path(p["data"]), d / "clone"
    env = dict(os.environ, HOME=str(d), GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0")
    out = {"git_clone": timed(lambda: run(["git", "clone", "-q", f"file://{data / 'repo'}", clone], env=env))}
    out["git_status1"] = timed(lambda: run(["git", "-C", clone, "status", "--porcelain"], env=env))
    out["git_status2"] = timed(lambda: run(["git", "-C", clone, "status", "--porcelain"], env=env))
    status = run(["git", "-C", clone, "status", "--porcelain"], env=env)
    if status.stdout.strip():
        raise RuntimeError(f"git status after clone is not clean: {status.stdout[:500]}")
    return out


WORKERS = {"seq": worker_seq, "fetch": worker_fetch, "rand": worker_rand, "tar": worker_tar,
           "sqlite": worker_sqlite, "busy": worker_busy, "git": worker_git, "tree": worker_tree}


def worker_main(name: str, directory: str, params: str) -> int:
    result = WORKERS[name](Path(directory), json.loads(params))
    print(json.dumps(result))
    return 0


# --- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    sizes: Sizes
    base: Path
    systems: list[System]
    workloads: list[str]
    samples: dict[tuple[str, str], list[float]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)
    extra: list[str] = dataclasses.field(default_factory=list)

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def run_step(self, system: System, workload: str, run_index: int) -> None:
        scratch = system.root / "w" / f"{workload}-{run_index}"
        scratch.mkdir(parents=True)
        safefs_mnt = str(system.root) if isinstance(system, (Safefs, SafefsOverNfs)) else None
        params = {**dataclasses.asdict(self.sizes), "data": str(self.base / "data"), "root": str(system.root),
                  "run": run_index, "safefs_mnt": safefs_mnt, "daemon_pid": system.daemon_pid()}
        cmd = [PY, __file__, "--worker", workload, str(scratch), json.dumps(params)]
        try:
            done = run(cmd, timeout=self.sizes.worker_timeout, check=False)
            if done.returncode != 0:
                err = done.stderr.strip()
                raise RuntimeError(err.splitlines()[-1] if err else f"exit {done.returncode}")
            for key, value in json.loads(done.stdout.strip().splitlines()[-1]).items():
                self.samples.setdefault((key, system.name), []).append(value)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            self.failures.append(f"{workload} on {system.name}, run {run_index + 1}: {exc}")
            self.say(f"  FAILED: {self.failures[-1]}")
        finally:
            try:
                run(["rm", "-rf", scratch], timeout=600)
                system.quiesce(self.sizes.worker_timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                self.failures.append(f"cleanup after {workload} on {system.name}: {exc}")

    def writeback_check(self, system: System) -> None:
        """1 MiB dirty in the middle of a big file: how many bytes reach SRC at sync."""
        safefs = system.safefs if isinstance(system, SafefsOverNfs) else system
        assert isinstance(safefs, Safefs)
        big, results = safefs.root / "prefill" / "big", []
        for i in range(self.args.runs):
            safefs.quiesce(600)
            before = safefs.status()["bytes_written"]
            offset = self.sizes.big_bytes // 2 + i * 4 * MIB
            fd = os.open(big, os.O_WRONLY)
            try:
                os.pwrite(fd, os.urandom(MIB), offset)
                os.fsync(fd)
            finally:
                os.close(fd)
            seconds = timed(lambda: safefs.quiesce(600))
            results.append((safefs.status()["bytes_written"] - before, seconds))
        written = statistics.median(r[0] for r in results)
        seconds = statistics.median(r[1] for r in results)
        self.extra.append(
            f"write-back, {human(self.sizes.big_bytes)} file with 1 MiB dirty in the middle ({system.name}): "
            f"{written:,.0f} bytes written to SRC = {written / MIB:.2f} x 1 MiB; `safefs sync` took {seconds:.2f} s "
            f"(median of {len(results)})")

    def median(self, key: str, system: str) -> float | None:
        values = self.samples.get((key, system))
        return statistics.median(values) if values else None

    def busy_report(self) -> None:
        """How much write-back each busy measurement overlapped, and what it cost."""
        size = human(self.sizes.busy_bytes)
        for system in self.systems:
            if system.name not in BUSY_SYSTEMS or system.name == "local":
                continue
            parts = []
            for key, what, unit in (("busy_sqlite", "SQLite", "tx/s"), ("busy_create", "creates", "files/s")):
                busy, idle = self.median(key, system.name), self.median(f"{key}_idle", system.name)
                window = self.median(f"{key}_window", system.name)
                cycles = self.median(f"{key}_cycles", system.name)
                pending = self.samples.get((f"{key}_pending", system.name))
                if busy is None or idle is None or window is None or cycles is None or not pending:
                    continue
                cut = sum(self.samples.get((f"{key}_cut", system.name), []))
                early = sum(self.samples.get((f"{key}_early", system.name), []))
                parts.append(
                    f"{what} {fmt(busy, unit)} {unit} = {busy / idle:.2f}x idle, over {window:.2f} s of write-back "
                    f"in {cycles:.0f} write-back(s), each measured from when at least {min(pending) / MIB:.0f} MiB "
                    f"were still to write until `safefs sync` returned"
                    + (f"; {cut:.0f} outlasted the window cap" if cut else "")
                    + (f"; {early:.0f} finished before measuring could start (not counted)" if early else ""))
            if parts:
                self.extra.append(f"busy ({system.name}), applications while {size} files are written back "
                                  f"(`safefs sync` in the background; medians of runs): " + "; ".join(parts))

    def tree_report(self) -> None:
        files = f"{self.sizes.tree_files:,}"
        for system in self.systems:
            rss, hwm = self.median("tree_rss", system.name), self.median("tree_hwm", system.name)
            if rss is not None and hwm is not None:
                anon, mapped = self.median("tree_anon", system.name), self.median("tree_file", system.name)
                # File-backed pages (libraries, safefs's journal map) are page cache the kernel
                # can take back; anonymous ones are the process's own memory.
                split = (f"; {anon / MIB:.0f} MiB anonymous, {mapped / MIB:.0f} MiB mapped files"
                         if anon is not None and mapped is not None else "")  # fmt: skip
                self.extra.append(f"{system.name} daemon RSS after reading {files} files: {rss / MIB:.0f} MiB "
                                  f"(peak {hwm / MIB:.0f} MiB so far{split}; VmRSS, VmHWM, RssAnon and "
                                  f"RssFile of /proc/PID/status)")


def machine_description(base: Path) -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    df = run(["df", "-hT", base], check=False).stdout.strip().splitlines()
    disk = " ".join(df[-1].split()[:3]) if len(df) > 1 else "?"
    return [f"machine: {os.cpu_count()} CPUs ({cpu}), {mem / 2**30:.1f} GiB RAM, Linux {platform.release()}",
            f"disk: {disk} (df -hT {base}: device, type, size)"]


def fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def table(bench: Bench) -> str:
    rows = rows_for(bench.sizes)
    systems = bench.systems
    header = ["workload", "unit"] + [s.label for s in systems]
    lines = [header]
    for workload in bench.workloads:
        for row in rows.get(workload, []):
            local = bench.samples.get((row.key, "local"))
            local_median = statistics.median(local) if local else None
            cells = [row.label, row.unit + (" ↑" if row.higher_is_better else " ↓")]
            for system in systems:
                values = bench.samples.get((row.key, system.name))
                if not values:
                    failed = any(f.startswith(f"{workload} on {system.name},") for f in bench.failures)
                    cells.append("fail" if failed else "-")
                    continue
                median = statistics.median(values)
                cell = fmt(median, row.unit)
                if system.name != "local" and local_median:
                    cell += f" ({median / local_median:.2f}x)"
                cells.append(cell)
            lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        cells = (c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        out.append("| " + " | ".join(cells) + " |")
        if n == 0:
            rule = ("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
            out.append("|" + "|".join(rule) + "|")
    return "\n".join(out)


def ensure_tools(wanted: list[str], notes: list[str]) -> list[str]:
    """Install fio and rclone with apt-get when missing (root only); drop rclone if impossible."""
    tools = (("fio", True), ("rclone", "rclone" in wanted))
    missing = [pkg for pkg, needed in tools if needed and not shutil.which(pkg)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        print(f"bench: installing {' '.join(missing)} with apt-get", file=sys.stderr)
        if run(["apt-get", "install", "-y", "-qq", *missing], check=False, env=env, timeout=900).returncode != 0:
            run(["apt-get", "update", "-qq"], check=False, env=env, timeout=900)
            run(["apt-get", "install", "-y", "-qq", *missing], check=False, env=env, timeout=900)
    if not shutil.which("fio"):
        notes.append("fio not installed: random I/O measured with a Python pwrite/pread loop")
    if "rclone" in wanted and not shutil.which("rclone"):
        notes.append("rclone could not be installed (apt-get install rclone): its column is skipped")
        wanted = [s for s in wanted if s != "rclone"]
    return wanted


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Workloads: " + ", ".join(WORKLOADS)
                                     + ". Systems: " + ", ".join(ALL_SYSTEMS) + ".")
    parser.add_argument("--quick", action="store_true", help="sizes and counts about 10x smaller: a smoke run")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell; the table shows the median (default 3)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all)")
    parser.add_argument("--nfs-latency-ms", type=float, default=0.5,
                        help="delay per request of the simulated NFS, metadata and data alike (default 0.5)")
    parser.add_argument("--nfs-cache-timeout", type=float, default=0.0,
                        help="kernel entry/attr timeout of the simulated NFS in seconds (default 0: asks for "
                             "every lookup and stat, like actimeo=0; a default NFS client caches for 3-60 s)")
    parser.add_argument("--dir", type=Path, help="scratch directory on the local disk (default: a new one in /var/tmp)")
    parser.add_argument("--json", type=Path, help="also write every sample to this file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    args.system_list = [s for s in args.systems.split(",") if s]
    args.workload_list = [w for w in args.workloads.split(",") if w]
    for bad in set(args.system_list) - set(ALL_SYSTEMS):
        parser.error(f"unknown system {bad!r}; choose from {', '.join(ALL_SYSTEMS)}")
    for bad in set(args.workload_list) - set(WORKLOADS):
        parser.error(f"unknown workload {bad!r}; choose from {', '.join(WORKLOADS)}")
    if "local" not in args.system_list:
        args.system_list.insert(0, "local")  # every ratio is to local
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def make_system(name: str, base: Path, args: argparse.Namespace) -> System:
    if name == "local":
        return Local(base)
    if name == "safefs":
        return Safefs(base)
    if name == "rclone":
        return Rclone(base)
    if name == "ceiling":
        return Ceiling(base)
    if name == "nfs":
        return SlowNfs(base, args.nfs_latency_ms, args.nfs_cache_timeout)
    return SafefsOverNfs(base, args.nfs_latency_ms, args.nfs_cache_timeout)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    sizes = Sizes.pick(args.quick)
    notes: list[str] = []
    names = ensure_tools(args.system_list, notes)
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
        base = Path(tempfile.mkdtemp(prefix="bench-", dir=args.dir))
    else:
        base = Path(tempfile.mkdtemp(prefix="safefs-bench-", dir="/var/tmp"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    bench = Bench(args, sizes, base, [], args.workload_list, notes=notes)
    workloads = set(args.workload_list)
    if os.geteuid() != 0:
        notes.append("not root: caches were not dropped, so the cold numbers are warm")
    started = time.time()
    problems: list[str] = []
    try:
        bench.say(f"bench: preparing data in {base}")
        make_data(base / "data", sizes, args.runs, workloads)
        for name in names:
            system = make_system(name, base, args)
            prefill(system, base / "data", sizes, args.runs, workloads)
            bench.systems.append(system)
        for system in bench.systems:
            bench.say(f"bench: mounting {system.name}")
            system.mount()
        for workload in args.workload_list:
            if workload == "writeback":
                checked = [s for s in bench.systems if isinstance(s, (Safefs, SafefsOverNfs))]
                for system in checked:
                    bench.writeback_check(system)
                if not checked:
                    notes.append("writeback measures safefs only; no safefs system was selected")
                continue
            systems = [s for s in bench.systems if (workload != "busy" or s.name in BUSY_SYSTEMS)
                       and (workload != "tree" or s.name not in TREE_SKIPS)]
            runs = 1 if workload == "tree" else args.runs  # a 2nd run would find the tree cached
            for run_index in range(runs):
                for system in systems:
                    bench.say(f"bench: {workload} run {run_index + 1}/{runs} on {system.name}")
                    bench.run_step(system, workload, run_index)
        if "busy" in workloads:
            bench.busy_report()
            skipped = [s.name for s in bench.systems if s.name not in BUSY_SYSTEMS]
            if skipped:
                notes.append(f"busy runs on local and safefs only (it measures safefs's write-back): "
                             f"not on {', '.join(skipped)}")
        if "tree" in workloads:
            bench.tree_report()
            skipped = [s.name for s in bench.systems if s.name in TREE_SKIPS]
            if skipped:
                notes.append(f"tree skips {', '.join(skipped)}: the simulated NFS reads about 13 ms a file, "
                             f"{sizes.tree_files:,} files would take {sizes.tree_files * 0.013 / 60:.0f} min")
            if args.runs > 1:
                notes.append("tree runs once whatever --runs: a second run would find the tree cached")
        for system in bench.systems:
            peak = vm_hwm(system.daemon_pid())
            if peak is not None:
                bench.extra.append(f"peak RSS (VmHWM) of the {system.name} daemon: {peak / MIB:.0f} MiB")
    finally:
        for system in reversed(bench.systems):
            try:
                problems += system.unmount()
            except Exception as exc:  # keep unmounting the others
                problems.append(f"unmounting {system.name}: {exc}")
        still = [m for s in bench.systems for m in s.mountpoints() if is_mounted(m)]
        if still:
            problems.append(f"still mounted, scratch kept: {', '.join(map(str, still))}")
        elif not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        for problem in problems:
            print(f"bench: cleanup: {problem}", file=sys.stderr)

    elapsed = time.time() - started
    print(f"safefs benchmark, {time.strftime('%Y-%m-%d %H:%M')}, {'--quick, ' if args.quick else ''}"
          f"median of {args.runs} run(s) per cell, took {elapsed / 60:.1f} min")
    for line in machine_description(base.parent):
        print(line)
    print(f"command: scripts/bench {' '.join(argv)}".rstrip())
    print()
    print(table(bench))
    print()
    print("Ratios are to the local disk in the same run: for ↑ rows value/local (higher is better),")
    print("for ↓ rows time/local (lower is better).")
    for line in bench.extra:
        print(f"- {line}")
    nfs_note = (f"nfs sim = tests/faultfs.py (Python pass-through FUSE, entry/attr timeout "
                f"{args.nfs_cache_timeout:g} s, "
                f"no keep_cache) adding {args.nfs_latency_ms:g} ms to every metadata request and every "
                "read/write/fsync request (a sleep in its worker thread; faultfs itself costs about 0.3 ms per "
                "request on top)")
    if any(isinstance(s, (SlowNfs, SafefsOverNfs)) for s in bench.systems):
        print(f"- {nfs_note}")
    if any(isinstance(s, Rclone) for s in bench.systems):
        version = run(["rclone", "version"], check=False).stdout.splitlines()[:1]
        print(f"- rclone: {' '.join(version)}, `rclone mount --vfs-cache-mode full`, other options default "
              "(write-back after 5 s, attr timeout 1 s); nothing waits for its uploads")
    print("- cold = `sync; echo 3 > /proc/sys/vm/drop_caches` before the step; safefs serves a cold read of a file "
          "it wrote from its cache dir, 'not yet cached' fetches from SRC")
    for note in notes:
        print(f"- note: {note}")
    for failure in bench.failures:
        print(f"- FAILED: {failure}")
    if args.json:
        args.json.write_text(json.dumps({"sizes": dataclasses.asdict(sizes), "samples": {
            f"{k[0]}/{k[1]}": v for k, v in bench.samples.items()}, "extra": bench.extra,
            "failures": bench.failures}, indent=1))
    return 1 if bench.failures or problems else 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--worker":
        sys.exit(worker_main(*sys.argv[2:5]))
    sys.exit(main(sys.argv[1:]))
