"""Multi-host fixtures: several safefs daemons share one SRC, each playing a separate host.

A host is one daemon process with its own --host-id, cache dir, mountpoint and log. Two ways
to play one, chosen by the `host_mode` fixture (tests run in both unless they pin it):
- "plain": a separate process on this machine. To the lease it runs on the same machine as
  the others (same machine-id, boot and pid space), so a killed holder's dead pid lets another
  mount take over at once (DESIGN.md section 3, "same host, same boot, dead pid").
- "ns" (root only): the daemon runs in its own mount and UTS namespaces
  (`unshare --mount --uts --propagation private`), with its own hostname and its own
  /etc/machine-id bind-mounted over the real one, so to the lease it is another machine: a
  dead holder is taken over only after T_break. Its FUSE mount exists only in that
  namespace, so every access to it (file operations, `safefs umount`) goes through
  `nsenter --target PID --mount --uts`; the namespace and the mount die with the daemon.

Test modules import `Cluster`, `Host`, `TIMINGS` and `snapshot` from here (pytest's importlib
mode registers this file as `tests.multihost.conftest`, so that is the same module object).

Rules these fixtures keep:
- File operations on a mount run in a short-lived child process (`Host.call`), never in the
  test process, with a timeout: a stopped or wedged daemon fails the test instead of hanging
  it, and the same code serves both modes.
- Nothing here touches a stopped host's mount or control socket (`Host.stopped`).
- Hosts are registered with `mount_factory`, so teardown always unmounts and reaps them and a
  failed test gets every host's daemon log attached.
- Lease timings are short and fixed (`Timings`); tests derive every bound from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    LIVE_MOUNTS,
    READY_TIMEOUT,
    Mount,
    MountFactory,
    describe,
    safefs_env,
    wait_until,
)

OP_TIMEOUT = 30.0  # seconds a batch of file operations on a mount may take
MACHINE_ID = Path("/etc/machine-id")


@dataclasses.dataclass(frozen=True)
class Timings:
    """Short lease timings the keeper accepts: budget 3*(1-0.05)-0.5 = 2.35 > renew, poll <= 0.65."""

    renew: float = 0.3
    t_break: float = 3.0
    epsilon: float = 0.5
    poll: float = 0.2
    lock_delay: float = 0.5
    follower_poll: float = 0.3

    def args(self) -> list[str]:
        return [
            "--lease-renew", str(self.renew), "--lease-break", str(self.t_break),
            "--lease-epsilon", str(self.epsilon), "--lease-poll", str(self.poll),
            "--lock-delay", str(self.lock_delay), "--follower-poll", str(self.follower_poll),
        ]  # fmt: skip

    @property
    def takeover_bound(self) -> float:
        """How long a takeover may take at most: T_break of silence seen by the observer, its
        polls, the lock delay, and a margin for the test's own polling of `safefs status`."""
        return self.t_break + 2 * self.poll + self.lock_delay + 5.0


TIMINGS = Timings()

# Runs inside the host's namespace (or just as a child): stdlib only, started with -I.
# argv[1] is a JSON list of [op, [args...]]; prints a JSON list of {"ok": value} or
# {"errno": n, "error": text}. Data travels as latin-1 strings (bytes 1:1).
OPS_SCRIPT = r"""
import json, os, shutil, sys

def data(text):
    return text.encode("latin-1")

def write(path, text, how="w"):
    flags = {"w": os.O_CREAT | os.O_TRUNC, "a": os.O_CREAT | os.O_APPEND,
             "x": os.O_CREAT | os.O_EXCL, "r+": 0}[how]
    fd = os.open(path, os.O_WRONLY | flags, 0o644)
    try:
        view = memoryview(data(text))
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)  # close reports a failed flush too
    return len(text)

def append_lines(path, lines):
    # One O_APPEND open per line, as a logger that reopens its file would do.
    for line in lines:
        write(path, line, "a")
    return len(lines)

def read(path):
    with open(path, "rb") as f:
        return f.read().decode("latin-1")

def stat(path):
    st = os.lstat(path)
    return {"mode": st.st_mode, "size": st.st_size, "ino": st.st_ino}

OPS = {
    "write": write, "append_lines": append_lines, "read": read, "stat": stat,
    "listdir": lambda path: sorted(os.listdir(path)),
    "unlink": os.unlink, "mkdir": os.mkdir, "rmdir": os.rmdir, "rename": os.rename,
    "chmod": os.chmod, "chown": os.chown, "truncate": os.truncate,
    "utime": lambda path: os.utime(path, (1, 1)),
    "setxattr": lambda path, name, value: os.setxattr(path, name, data(value)),
    "symlink": os.symlink, "link": os.link,
    "copy": lambda src, dst: shutil.copyfile(src, dst) and None,  # data too big for argv
}

results = []
for name, args in json.loads(sys.argv[1]):
    try:
        results.append({"ok": OPS[name](*args)})
    except OSError as e:
        results.append({"errno": e.errno, "error": str(e)})
print(json.dumps(results))
"""


def read_mounts(pid: int) -> list[str]:
    """Mountpoints in the mount namespace of process `pid` (empty if it is gone)."""
    try:
        with open(f"/proc/{pid}/mounts", encoding="latin-1") as table:
            return [line.split()[1] for line in table if len(line.split()) >= 3]
    except OSError:
        return []


@dataclasses.dataclass(eq=False)
class Host(Mount):
    """A `Mount` playing one host. File operations go through `call`; in "ns" mode every
    command that must see the mount runs inside the daemon's namespaces via nsenter."""

    name: str = ""
    namespaced: bool = False
    stopped: bool = False

    # -- running things where the mount is visible

    def _enter(self) -> list[str]:
        if self.namespaced and self.alive:
            return ["nsenter", "--target", str(self.pid), "--mount", "--uts", "--"]
        return []

    def run(self, argv: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
        assert not self.stopped, f"{self.name} is stopped: nothing may touch its mount"
        return subprocess.run(
            self._enter() + argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )

    def cli(self, *args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`python -m safefs ARGS...`, in this host's namespace (umount needs it)."""
        return self.run([sys.executable, "-m", "safefs", *map(os.fspath, args)], timeout=timeout)  # type: ignore[arg-type]

    def batch(self, calls: Iterable[tuple[str, tuple[Any, ...]]]) -> list[dict[str, Any]]:
        """Run file operations in one child process; one {"ok"} or {"errno", "error"} each."""
        calls = [[op, [os.fspath(a) if isinstance(a, Path) else a for a in args]] for op, args in calls]
        try:
            done = self.run([sys.executable, "-I", "-c", OPS_SCRIPT, json.dumps(calls)], timeout=OP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name}: {calls} did not finish within {OP_TIMEOUT}s") from None
        if done.returncode != 0:
            raise AssertionError(f"{self.name}: file operations failed to run\n{describe(done)}")
        return json.loads(done.stdout)

    def call(self, op: str, *args: Any) -> Any:
        """One file operation; its value, or the OSError it raised on this host."""
        (result,) = self.batch([(op, args)])
        if "errno" in result:
            raise OSError(result["errno"], f"{self.name}: {op}{tuple(args)}: {result['error']}")
        return result["ok"]

    def errno_of(self, op: str, *args: Any) -> int:
        """0 if the operation succeeded, else its errno."""
        (result,) = self.batch([(op, args)])
        return result.get("errno", 0)

    def write(self, name: str, data: bytes | str, how: str = "w") -> None:
        text = data.decode("latin-1") if isinstance(data, bytes) else data
        self.call("write", self.path(name), text, how)

    def read(self, name: str) -> bytes:
        return self.call("read", self.path(name)).encode("latin-1")

    def listdir(self, name: str = "") -> list[str]:
        return self.call("listdir", self.path(name) if name else self.mnt)

    # -- lease

    def lease(self) -> dict[str, Any]:
        return self.status()["lease"]

    def is_writable(self) -> dict[str, Any] | None:
        """The status if this host is the writer and its lock delay is over, else None."""
        status = self.status()
        return status if status["role"] == "writer" and status["lease"].get("writable") else None

    def wait_writable(self, timeout: float = 10.0) -> dict[str, Any]:
        return wait_until(self.is_writable, timeout, interval=0.1, message=f"{self.name} to be a writable writer")

    def sync_ok(self, *args: object) -> subprocess.CompletedProcess[str]:
        done = self.sync(*args)
        assert done.returncode == 0, f"{self.name}: sync failed\n{describe(done)}\n{self.log_tail(30)}"
        return done

    # -- process state

    def is_mounted(self) -> bool:
        if self.namespaced:
            return self.alive and os.fspath(self.mnt) in read_mounts(self.pid)
        return super().is_mounted()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Host:
        deadline = time.monotonic() + timeout
        while True:
            self._read_ready()
            if self.ready is not None and not self.ready.get("ok"):
                self._fail(f"{self.name}: daemon refused to start: {json.dumps(self.ready.get('error'))}")
            if not self.alive:
                self._fail(f"{self.name}: daemon exited with code {self.proc.returncode} before it was ready")
            if self.ready is not None and self.is_mounted():
                return self
            if time.monotonic() >= deadline:
                self._fail(f"{self.name}: {self.mnt} not mounted and ready within {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        super().stop()
        self.stopped = True

    def cont(self) -> None:
        super().cont()
        self.stopped = False

    def kill(self) -> None:
        self.stopped = False
        super().kill()  # in "ns" mode the namespace, and the mount in it, die with the daemon

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        if self.namespaced and self.alive:
            try:
                self.cont()
                self.run(["fusermount3", "-u", "-z", os.fspath(self.mnt)], timeout=30)
            except Exception as exc:  # cleanup goes on whatever happened
                problems.append(f"{self.name}: lazy unmount in its namespace: {exc!r}")
        return problems + super().cleanup()


class Cluster:
    """Starts hosts on one shared SRC (tmp_path/src unless given); see `start`."""

    def __init__(self, tmp_path: Path, factory: MountFactory, mode: str) -> None:
        self.root = tmp_path
        self.factory = factory
        self.mode = mode
        self.timings = TIMINGS
        self.src = tmp_path / "src"
        self.src.mkdir(exist_ok=True)
        self.hosts: list[Host] = []

    @property
    def namespaced(self) -> bool:
        return self.mode == "ns"

    def start(
        self,
        name: str,
        *extra_args: object,
        writeback_delay: float | str = 0.5,
        src: Path | None = None,
        umask: int = -1,
        wait: bool = True,
    ) -> Host:
        """Start host `name` (mnt-NAME, cache-NAME, NAME.log under tmp_path) with the test
        timings; `extra_args` come last and may override them."""
        src = src or self.src
        mnt, cache = self.root / f"mnt-{name}", self.root / f"cache-{name}"
        mnt.mkdir(exist_ok=True)
        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        args = [
            sys.executable, "-m", "safefs", "mount", os.fspath(src), os.fspath(mnt), "--foreground",
            "--cache-dir", os.fspath(cache), "--writeback-delay", str(writeback_delay),
            "--ready-fd", str(ready_w), "--host-id", name, *self.timings.args(),
        ]  # fmt: skip
        if os.environ.get("SAFEFS_TEST_DEBUG") == "1":
            args.append("--debug")
        args += [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in extra_args]
        if self.namespaced:
            args = self._namespace_wrapper(name) + args
        env = safefs_env()
        log_path = self.root / f"{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, pass_fds=(ready_w,), start_new_session=True, umask=umask,
                )  # fmt: skip
            finally:
                os.close(ready_w)
        host = Host(
            src=src.absolute(), mnt=mnt.absolute(), cache_dir=cache.absolute(), proc=proc,
            log_path=log_path, env=env, args=args, _ready_fd=ready_r,
            name=name, namespaced=self.namespaced,
        )  # fmt: skip
        self.factory.mounts.append(host)  # teardown and failure logs come with mount_factory
        LIVE_MOUNTS.append(host)
        self.hosts.append(host)
        if wait:
            host.wait_ready()
        return host

    def _namespace_wrapper(self, name: str) -> list[str]:
        """unshare + a shell that gives the namespace its own hostname and machine-id, then
        execs the daemon (same pid all along, so signals and /proc/PID reach the daemon)."""
        machine_id = self.root / f"machine-id-{name}"
        machine_id.write_text(hashlib.sha256(f"safefs-test-{name}".encode()).hexdigest()[:32] + "\n")
        script = 'mount --bind "$1" /etc/machine-id && hostname "$2" && shift 2 && exec "$@"'
        return ["unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", script, "sh", os.fspath(machine_id), name]  # fmt: skip

    # -- views over several hosts

    def running(self) -> list[Host]:
        """Hosts whose daemon runs and is not stopped (safe to ask for status)."""
        return [h for h in self.hosts if h.alive and not h.stopped]

    def writers(self, hosts: Iterable[Host] | None = None) -> list[tuple[Host, dict[str, Any]]]:
        """The hosts (default: every running one) whose status says role writer."""
        found = []
        for host in self.running() if hosts is None else hosts:
            status = host.status()
            if status["role"] == "writer":
                found.append((host, status))
        return found

    def wait_new_writer(self, candidates: list[Host], timeout: float) -> tuple[Host, dict[str, Any], float]:
        """Wait until one of `candidates` is a writable writer; return it, its status and how
        long that took. Meanwhile never more than one running host may call itself writer."""
        started = time.monotonic()

        def one_writable() -> tuple[Host, dict[str, Any]] | None:
            writers = self.writers()
            assert len(writers) <= 1, f"two writers at once: {[(h.name, s['lease']) for h, s in writers]}"
            for host, status in writers:
                if host in candidates and status["lease"].get("writable"):
                    return host, status
            return None

        host, status = wait_until(one_writable, timeout, interval=0.1,
                                  message=f"one of {[h.name for h in candidates]} to take over")  # fmt: skip
        return host, status, time.monotonic() - started


def snapshot(root: Path, *, skip: Iterable[str] = ()) -> dict[str, tuple[Any, ...]]:
    """Every entry under `root` (relative path -> kind, mode, content or target), except the
    relative paths in `skip` and what lies below them."""
    skipped = tuple(skip)
    found: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = os.fspath(path.relative_to(root))
            if any(rel == s or rel.startswith(s + "/") for s in skipped):
                continue
            st = path.lstat()
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir", st.st_mode)
            else:
                found[rel] = ("file", st.st_mode, path.read_bytes())
    return found


@pytest.fixture(params=["plain", "ns"])
def host_mode(request: pytest.FixtureRequest) -> str:
    """How a host is played: separate processes, or separate namespaces with their own
    machine-id (root only; skipped without it)."""
    if request.param == "ns":
        missing = [tool for tool in ("unshare", "nsenter") if shutil.which(tool) is None]
        if os.geteuid() != 0:
            pytest.skip("namespaced hosts need root (unshare --mount --uts)")
        if missing or not MACHINE_ID.is_file():
            pytest.skip(f"namespaced hosts need unshare, nsenter and {MACHINE_ID} (missing: {missing})")
    return request.param


@pytest.fixture
def cluster(mount_factory: MountFactory, tmp_path: Path, host_mode: str) -> Iterator[Cluster]:
    """`cluster.start(name, *extra_args, writeback_delay=0.5, src=None, umask=-1)` starts a
    host; `cluster.src` is the shared project; `cluster.timings` the lease timings."""
    yield Cluster(tmp_path, mount_factory, host_mode)


def fenced(host) -> dict | None:
    """The status once `host` says it is not (or no longer) a writable writer, else None."""
    status = host.status()
    lease = status["lease"]
    if lease.get("writable") or not (status["role"] == "follower" or lease.get("state") == "lost"):
        return None
    return status
