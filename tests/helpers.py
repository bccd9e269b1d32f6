"""Shared test utilities: FUSE availability, mount bookkeeping, the CLI as a subprocess, and
the `Mount` object that the `mount_factory` fixture (tests/conftest.py) hands out.

Rules these helpers keep:
- Nothing here stat()s a mountpoint to learn whether it is mounted: a stopped or wedged
  daemon would hang the test run. Mount tables are read from /proc/self/mounts instead.
- Cleanup never raises; it returns the problems it met so the caller can report them.
- No bare sleeps: `wait_until` polls a predicate against a deadline.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0  # seconds a daemon gets to mount and say it is ready
DEFAULT_WRITEBACK_DELAY = "0.5"
T = TypeVar("T")


# --- FUSE availability ---------------------------------------------------------------------


def fuse_required() -> bool:
    """CI sets SAFEFS_REQUIRE_FUSE=1: a missing FUSE is then a failure, not a skip."""
    return os.environ.get("SAFEFS_REQUIRE_FUSE") == "1"


@functools.cache
def fuse_unavailable_reason() -> str | None:
    """Why real mounts cannot run here, or None when they can."""
    if shutil.which("fusermount3") is None:
        return "fusermount3 not found on PATH (Debian package fuse3; scripts/setup installs it)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc.strerror} (errno {exc.errno})"
    os.close(fd)
    return None


def require_fuse() -> None:
    """Skip the calling test when FUSE is unusable; fail it instead under SAFEFS_REQUIRE_FUSE=1."""
    reason = fuse_unavailable_reason()
    if reason is None:
        return
    if fuse_required():
        pytest.fail(f"FUSE required (SAFEFS_REQUIRE_FUSE=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"FUSE unavailable: {reason}")


# --- mount tables --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MountEntry:
    source: str
    mountpoint: Path
    fstype: str

    @property
    def is_safefs(self) -> bool:
        # The daemon names itself in the fs type (fuse.safefs) or the source field.
        return self.fstype.startswith("fuse") and "safefs" in (self.fstype + " " + self.source)


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes (\040 ...);
    # other bytes come raw. Read as latin-1 (byte per char), unescape, then decode as a path.
    raw = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)
    return os.fsdecode(raw.encode("latin-1"))


def mount_table() -> list[MountEntry]:
    entries = []
    with open("/proc/self/mounts", encoding="latin-1") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 3:
                entries.append(MountEntry(_unescape(fields[0]), Path(_unescape(fields[1])), fields[2]))
    return entries


def is_mounted(path: os.PathLike[str] | str) -> bool:
    """True if something is mounted at `path`. Reads the mount table, never touches `path`."""
    want = Path(os.path.abspath(path))
    return any(entry.mountpoint == want for entry in mount_table())


def lazy_unmount(path: os.PathLike[str] | str) -> str | None:
    """`fusermount3 -u -z PATH`; returns an error description, or None on success."""
    try:
        done = subprocess.run(
            ["fusermount3", "-u", "-z", os.fspath(path)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"fusermount3 -u -z {path}: {exc}"
    if done.returncode != 0 and is_mounted(path):
        return f"fusermount3 -u -z {path} exited {done.returncode}: {done.stderr.strip()}"
    return None


def _owned_by_live_session(path: Path, root: Path) -> bool:
    """True if `path` lies in a numbered pytest dir (root/pytest-N) whose session still runs.

    pytest writes the owning pid into root/pytest-N/.lock and removes it at exit. Engineers
    run test sessions side by side on one machine; a sweep must not unmount their mounts.
    """
    try:
        numbered = root / path.relative_to(root).parts[0]
        pid = int((numbered / ".lock").read_text().strip())
    except (ValueError, IndexError, OSError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_mounts(owned_roots: Iterable[Path], shared_roots: Iterable[Path]) -> list[str]:
    """Lazily unmount safefs mounts left under the pytest temp dirs by crashed runs.

    `owned_roots` belong to this session (an explicit --basetemp): everything there goes.
    `shared_roots` (pytest-of-USER) hold numbered dirs of other sessions too: only mounts of
    sessions that are gone are swept. Returns one line per mount swept or failed.
    """
    owned = [Path(os.path.abspath(r)) for r in owned_roots]
    shared = [Path(os.path.abspath(r)) for r in shared_roots]
    report = []
    # Deepest first, so nested mounts come off before their parents.
    entries = sorted(mount_table(), key=lambda e: len(e.mountpoint.parts), reverse=True)
    for entry in entries:
        if not entry.is_safefs:
            continue
        mnt = entry.mountpoint
        if any(mnt.is_relative_to(root) for root in owned):
            pass
        elif any(mnt.is_relative_to(r) and not _owned_by_live_session(mnt, r) for r in shared):
            pass
        else:
            continue
        error = lazy_unmount(mnt)
        report.append(error or f"unmounted stale safefs mount {mnt}")
    return report


# --- running the CLI -----------------------------------------------------------------------


def safefs_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a safefs subprocess: ours, unbuffered, plus `env` on top."""
    merged = dict(os.environ)
    merged["PYTHONUNBUFFERED"] = "1"
    if env:
        merged.update(env)
    return merged


def run_safefs(
    *args: object, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m safefs ARGS...` to completion; returns the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", "safefs", *map(os.fspath, args)],  # type: ignore[arg-type]
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=safefs_env(env),
        timeout=timeout,
    )


def describe(done: subprocess.CompletedProcess[str]) -> str:
    """A CompletedProcess as text for an assertion message."""
    args = " ".join(map(str, done.args[2:] if done.args[:2] == [sys.executable, "-m"] else done.args))
    return f"`{args}` exited {done.returncode}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}"


# --- waiting -------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.05, message: str | None = None
) -> T:
    """Poll `predicate` until it returns something truthy, and return that.

    Raises AssertionError after `timeout` seconds; exceptions from `predicate` propagate.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Callable[[], T], timeout: float, interval: float = 0.05, message: str | None = None
) -> T:
    """`wait_until` for trio tests: sleeps with trio so the event loop keeps running."""
    import trio

    deadline = trio.current_time() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if trio.current_time() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await trio.sleep(interval)


def log_tail(path: os.PathLike[str] | str, lines: int = 80) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    return "\n".join(text.splitlines()[-lines:])


# --- mounts --------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Mount:
    """One safefs daemon started by `mount_factory`, running in the foreground as a child.

    The daemon gets `--ready-fd`; `ready` holds its ready message ({"ok": true, "pid", "role",
    "holder"}) once it arrived. CLI helpers run `python -m safefs` with the mount's `env`.
    """

    src: Path
    mnt: Path
    cache_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    args: list[str]
    ready: dict[str, Any] | None = None
    _ready_fd: int | None = None
    _ready_buf: bytes = b""

    # -- state

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def path(self, *parts: str | os.PathLike[str]) -> Path:
        """A path inside the mount."""
        return self.mnt.joinpath(*parts)

    def log_tail(self, lines: int = 80) -> str:
        return log_tail(self.log_path, lines)

    def is_mounted(self) -> bool:
        return is_mounted(self.mnt)

    # -- start-up

    def _read_ready(self) -> bool:
        """Take what the daemon wrote to the ready pipe. True once the pipe reached EOF."""
        if self._ready_fd is None:
            return True
        while True:
            try:
                chunk = os.read(self._ready_fd, 65536)
            except BlockingIOError:
                return False
            if not chunk:
                os.close(self._ready_fd)
                self._ready_fd = None
                return True
            self._ready_buf += chunk
            if b"\n" in self._ready_buf and self.ready is None:
                line = self._ready_buf.split(b"\n", 1)[0]
                try:
                    self.ready = json.loads(line)
                except ValueError:
                    self.ready = {"ok": False, "error": {"message": f"bad ready line {line!r}"}}

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Mount:
        """Wait until the daemon said it is ready and MNT is mounted; fail with the log if not."""
        deadline = time.monotonic() + timeout
        mounted_since: float | None = None
        while True:
            eof = self._read_ready()
            if self.ready is not None and not self.ready.get("ok"):
                self._fail(f"daemon refused to start: {json.dumps(self.ready.get('error'))}")
            if not self.alive:
                self._fail(f"daemon exited with code {self.proc.returncode} before it was ready")
            if is_mounted(self.mnt) and os.path.ismount(self.mnt):
                now = time.monotonic()
                mounted_since = mounted_since or now
                # The ready line should come with the mount; if the daemon closed the pipe
                # without one, or stays silent for long, the mount itself is the signal.
                if self.ready is not None or eof or now - mounted_since > 5:
                    return self
            if time.monotonic() >= deadline:
                self._fail(f"{self.mnt} not mounted and ready within {timeout}s")
            time.sleep(0.05)

    def _fail(self, message: str) -> None:
        pytest.fail(f"{message}\n--- daemon log {self.log_path}\n{self.log_tail()}", pytrace=False)

    # -- the CLI against this mount

    def cli(self, *args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`python -m safefs ARGS...` with this mount's environment."""
        return run_safefs(*args, env=self.env, timeout=timeout)

    def status(self) -> dict[str, Any]:
        """`safefs status MNT --json`, parsed. Fails the test if the command fails."""
        done = self.cli("status", self.mnt, "--json")
        if done.returncode != 0:
            raise AssertionError(describe(done))
        try:
            return json.loads(done.stdout)
        except ValueError:
            raise AssertionError(f"status --json printed no JSON\n{describe(done)}") from None

    def sync(self, *args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`safefs sync MNT ARGS...` (e.g. "--release"); the caller checks the result."""
        return self.cli("sync", self.mnt, *args, timeout=timeout)

    def umount(
        self, *args: object, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """`safefs umount MNT ARGS...`, then wait for the daemon to exit.

        With check: the command and the daemon exit 0 and MNT is no longer mounted.
        """
        done = self.cli("umount", self.mnt, *args, timeout=timeout)
        try:
            self.proc.wait(timeout=30 if done.returncode == 0 else 1)
        except subprocess.TimeoutExpired:
            pass
        if check:
            problems = []
            if done.returncode != 0:
                problems.append(describe(done))
            if self.alive:
                problems.append(f"daemon {self.pid} still running 30 s after umount")
            elif self.proc.returncode != 0:
                problems.append(f"daemon exited with code {self.proc.returncode}")
            if is_mounted(self.mnt):
                problems.append(f"{self.mnt} is still mounted")
            if problems:
                raise AssertionError("\n".join(problems) + f"\n--- daemon log\n{self.log_tail()}")
        return done

    # -- violence

    def kill(self) -> None:
        """SIGKILL the daemon (a crash), drop the dead mount, reap the process."""
        if self.alive:
            self.proc.kill()
        if is_mounted(self.mnt):
            error = lazy_unmount(self.mnt)
            if error:
                raise AssertionError(error)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGSTOP the daemon (a paused host). `cont()` resumes it; cleanup does too."""
        os.kill(self.pid, signal.SIGSTOP)

    def cont(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    # -- teardown

    def cleanup(self) -> list[str]:
        """Leave nothing behind: unmount, stop the daemon, reap it. Never raises."""
        problems: list[str] = []
        try:
            if self.alive:
                self.cont()  # a stopped daemon cannot act on SIGTERM
            if is_mounted(self.mnt):
                error = lazy_unmount(self.mnt)
                if error:
                    problems.append(error)
            if self.alive:
                # The first SIGTERM asks for the final write-back, which may go on (retrying a
                # project that refuses it) for FINAL_FLUSH_STALL; a second one stops it at once.
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.terminate()
                    try:
                        self.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        problems.append(f"daemon {self.pid} ignored two SIGTERMs for 10 s; killed")
                        self.proc.kill()
                        self.proc.wait(timeout=10)
        except Exception as exc:  # cleanup must go on whatever happened
            problems.append(f"cleanup of {self.mnt}: {exc!r}")
        finally:
            if self._ready_fd is not None:
                os.close(self._ready_fd)
                self._ready_fd = None
        return problems


class MountFactory:
    """The callable behind the `mount_factory` fixture. See `__call__`."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.mounts: list[Mount] = []

    def _default_slot(self) -> tuple[Path, Path]:
        # First free pair of mnt/cache, mnt2/cache2, ...: a live mount keeps its pair, a
        # finished one (umounted or killed) hands it on, so a remount replays the same cache.
        busy = {m.mnt for m in self.mounts if m.alive}
        index = 1
        while True:
            suffix = "" if index == 1 else str(index)
            mnt = self.tmp_path / f"mnt{suffix}"
            if mnt not in busy:
                return mnt, self.tmp_path / f"cache{suffix}"
            index += 1

    def __call__(
        self,
        src: os.PathLike[str] | str | None = None,
        mnt: os.PathLike[str] | str | None = None,
        cache_dir: os.PathLike[str] | str | None = None,
        *extra_args: object,
        host_id: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> Mount:
        """Start `python -m safefs mount SRC MNT --foreground ...` and wait until it is ready.

        Defaults: src = tmp_path/src (created), mnt = tmp_path/mnt (then mnt2, mnt3 while
        earlier mounts are alive), cache = tmp_path/cache (paired with mnt). `extra_args` go
        last on the command line, so they can override --writeback-delay. With wait=False the
        Mount is returned as soon as the process started; call `.wait_ready()` later.
        """
        require_fuse()
        default_mnt, default_cache = self._default_slot()
        src_path = Path(src) if src is not None else self.tmp_path / "src"
        mnt_path = Path(mnt) if mnt is not None else default_mnt
        cache_path = Path(cache_dir) if cache_dir is not None else default_cache
        if src is None:
            src_path.mkdir(exist_ok=True)
        if mnt is None:
            mnt_path.mkdir(exist_ok=True)

        ready_r, ready_w = os.pipe()
        os.set_blocking(ready_r, False)
        args = [
            sys.executable, "-m", "safefs", "mount", os.fspath(src_path), os.fspath(mnt_path),
            "--foreground",
            "--cache-dir", os.fspath(cache_path),
            "--writeback-delay", DEFAULT_WRITEBACK_DELAY,
            "--ready-fd", str(ready_w),
        ]  # fmt: skip
        if host_id is not None:
            args += ["--host-id", host_id]
        if os.environ.get("SAFEFS_TEST_DEBUG") == "1":
            args.append("--debug")
        args += [os.fspath(a) for a in extra_args]  # type: ignore[misc]

        full_env = safefs_env(env)
        log_path = self.tmp_path / f"{mnt_path.name}.log"
        with open(log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(args)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=full_env,
                    pass_fds=(ready_w,),
                    start_new_session=True,  # the terminal's Ctrl-C goes to pytest, not here
                )
            finally:
                os.close(ready_w)
        mount = Mount(
            src=src_path.absolute(),
            mnt=mnt_path.absolute(),
            cache_dir=cache_path.absolute(),
            proc=proc,
            log_path=log_path,
            env=full_env,
            args=args,
            _ready_fd=ready_r,
        )
        self.mounts.append(mount)
        LIVE_MOUNTS.append(mount)
        if wait:
            mount.wait_ready()
        return mount

    def remount(self, old: Mount, *extra_args: object, **kwargs: Any) -> Mount:
        """Mount the same src/mnt/cache again (after umount or kill), e.g. to test replay."""
        return self(old.src, old.mnt, old.cache_dir, *extra_args, **kwargs)

    def cleanup(self) -> list[str]:
        problems = []
        for mount in reversed(self.mounts):
            problems += mount.cleanup()
            if mount in LIVE_MOUNTS:
                LIVE_MOUNTS.remove(mount)
        return problems


# Every Mount not yet cleaned up, so the session's end can reap what a crashed fixture left.
LIVE_MOUNTS: list[Mount] = []


def write_file(path: Path | str, data: bytes, *, fsync: bool = True) -> None:
    """Create or truncate `path` and write all of `data` (looping on short writes); fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
