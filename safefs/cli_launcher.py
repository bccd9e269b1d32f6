"""Starting and stopping a safefs daemon for the `safefs` command: `spawn_daemon` runs
`python -m safefs mount ... --foreground --ready-fd N` (daemon_argv) in a new session and waits
for its one-line ready message; ProcessWatch waits for a daemon (not our child) to exit;
fusermount_unmount unmounts, a busy mount being a Busy error that says who keeps it busy.

Invariants:
- The daemon's command line reproduces its MountConfig exactly (daemon_argv: every option
  with a MountConfig field, from options.MOUNT_OPTIONS).
- A daemon that does not get ready in time, or a Ctrl-C while waiting, stops it (SIGTERM);
  its last log lines are shown when it failed.
- A pid is watched through a pidfd where the kernel has them: a recycled pid is never
  mistaken for the daemon.
- CLI layer: imports none of trio, pyfuse3, lmdb (the daemon is a separate process).
Single-threaded; blocking calls are fine here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from safefs import options, procs, unmount
from safefs.cli_options import field_value
from safefs.cli_render import WAIT_REPORT_DELAY, mounted_message
from safefs.config import MountConfig
from safefs.control import protocol
from safefs.control.protocol import error_from_wire
from safefs.errors import Busy, DaemonFailed, ExitCode, ProtocolError, Refused

READY_TIMEOUT = 60.0  # a daemon not ready after this long is stopped (unless it waits for the lease)
STOP_TIMEOUT = 10.0
LOG_TAIL_LINES = 20


def daemon_argv(config: MountConfig, *, ready_fd: int, debug: bool) -> list[str]:
    """The command line of a foreground daemon with exactly `config`: every option with a
    MountConfig field, with that field's value (floats as repr, so they come back equal)."""
    flags = options.OPTIONS
    argv = [sys.executable, "-m", "safefs", "mount", os.fspath(config.src), os.fspath(config.mnt),
            flags["foreground"].flag, flags["ready_fd"].flag, str(ready_fd)]  # fmt: skip
    for option in options.MOUNT_OPTIONS:
        value = field_value(config, option)
        if option.field is None or value is None or value is False:
            continue
        if option.kind == options.FLAG:
            argv.append(option.flag)
        elif isinstance(value, float):
            argv += [option.flag, repr(value)]
        else:
            argv += [option.flag, os.fspath(value) if isinstance(value, Path) else str(value)]
    if debug:
        argv.append(flags["debug"].flag)
    return argv


def spawn_daemon(config: MountConfig, *, debug: bool, announce: bool = True) -> int:
    """Start the daemon in its own session, wait until its mount is ready, say where it is
    (unless not `announce`)."""
    try:
        config.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise Refused(
            f"cannot create cache dir {config.cache_dir}: {exc.strerror}", hint="give another --cache-dir"
        ) from None
    if config.log_file is None:
        config = dataclasses.replace(config, log_file=config.cache_dir / "daemon.log")
    assert config.log_file is not None
    log_path = config.log_file
    try:
        log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise Refused(f"cannot create the log's directory {log_path.parent}: {exc.strerror}") from None
    read_fd, write_fd = os.pipe()
    try:
        try:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.fchmod(log_fd, 0o600)  # the log names files of the project: private like the cache
            with open(log_fd, "ab") as log_file:
                log_start = log_file.tell()
                process = subprocess.Popen(
                    daemon_argv(config, ready_fd=write_fd, debug=debug),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=(write_fd,),
                    start_new_session=True,  # a Ctrl-C or hang-up of this shell must not reach the daemon
                    cwd="/",  # keep no directory busy
                    env=_daemon_environment(),
                )
        finally:
            os.close(write_fd)  # the daemon has its copy; EOF on read_fd now means it is gone
        what = "the write lease before mounting (--wait-lease)" if config.wait_for_lease else \
            f"the daemon (pid {process.pid}) to mount"  # fmt: skip
        try:
            line = _read_line(
                read_fd, None if config.wait_for_lease else READY_TIMEOUT,
                on_slow=lambda: print(f"safefs: waiting for {what} (its log: {log_path})",
                                      file=sys.stderr, flush=True),
            )  # fmt: skip
        except TimeoutError:
            _stop(process)
            _print_log_tail(log_path, log_start)
            raise DaemonFailed(
                f"the daemon did not get ready within {READY_TIMEOUT:.0f} s, so it was stopped",
                hint=f"its log is {log_path}",
            ) from None
        except BaseException:
            _stop(process)  # Ctrl-C: the user no longer wants this mount
            raise
    finally:
        os.close(read_fd)

    if not line:
        try:
            code: int | None = process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        _print_log_tail(log_path, log_start)
        how = "exited" if code is None else f"exited with status {code}"
        raise DaemonFailed(f"the daemon {how} before the mount was ready", hint=f"its log is {log_path}")
    try:
        ready = protocol.from_wire(protocol.Ready, json.loads(line))
    except (ValueError, ProtocolError):
        raise DaemonFailed(
            f"the daemon sent a malformed ready message: {line[:200]!r}", hint=f"its log is {log_path}"
        ) from None
    if not ready.ok:
        raise error_from_wire(ready.error)
    if announce:
        print(mounted_message(config, ready))
    return int(ExitCode.OK)


def _daemon_environment() -> dict[str, str]:
    env = dict(os.environ)
    # A source checkout is not on the path of an interpreter started in "/": put it there.
    package_root = str(Path(__file__).resolve().parent.parent)
    installed = {sysconfig.get_paths()[key] for key in ("purelib", "platlib")}
    if package_root not in installed:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


def _read_line(fd: int, timeout: float | None, on_slow: Callable[[], None] | None = None) -> bytes:
    """The first line written to `fd` (b"" if it is closed first). TimeoutError after `timeout`.
    `on_slow` is called once if that takes longer than WAIT_REPORT_DELAY."""
    deadline = None if timeout is None else time.monotonic() + timeout
    slow_at = time.monotonic() + WAIT_REPORT_DELAY
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = bytearray()
    while b"\n" not in data:
        if on_slow is not None and time.monotonic() >= slow_at:
            on_slow()
            on_slow = None
        wait_ms = None if deadline is None else max(deadline - time.monotonic(), 0) * 1000
        if wait_ms == 0:
            raise TimeoutError
        if on_slow is not None:
            wait_ms = max(0.0, slow_at - time.monotonic()) * 1000 if wait_ms is None else \
                min(wait_ms, max(0.0, slow_at - time.monotonic()) * 1000 + 1)  # fmt: skip
        if not poller.poll(wait_ms):
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return bytes(data.split(b"\n", 1)[0])


def write_ready(fd: int, message: protocol.Ready) -> None:
    try:
        os.write(fd, json.dumps(protocol.to_wire(message)).encode() + b"\n")
        os.close(fd)
    except OSError:
        pass  # the parent is gone; stderr (the log) still has the error


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()  # the daemon stops cleanly on SIGTERM: writes back, unmounts
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        print(f"safefs: the daemon (pid {process.pid}) is still stopping", file=sys.stderr)


def _print_log_tail(log_path: Path, start: int) -> None:
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            lines = f.read()[-(64 << 10) :].decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return
    if lines:
        print(f"safefs: the daemon's last log lines ({log_path}):", file=sys.stderr)
        for line in lines:
            print(f"  | {line}", file=sys.stderr)


class ProcessWatch:
    """Waits for a process that is not our child to exit, through a pidfd (no pid-reuse race)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd: int | None = None
        self._gone = False
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._gone = True
        except OSError:
            pass  # no pidfd on this kernel: poll the pid instead

    def wait_exit(self, timeout: float | None) -> bool:
        """True once the process has exited; False if it still runs after `timeout` seconds."""
        if self._gone:
            return True
        if self._fd is not None:
            poller = select.poll()
            poller.register(self._fd, select.POLLIN)
            return bool(poller.poll(None if timeout is None else timeout * 1000))
        deadline = None if timeout is None else time.monotonic() + timeout
        while _pid_alive(self.pid):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            select.select([], [], [], 0.1)
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ProcessWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _pid_alive(pid: int) -> bool:
    return procs.process_alive(pid)  # a zombie daemon has exited, whoever reaps it


def fusermount_unmount(mnt: Path, *, lazy: bool) -> None:
    try:
        unmount.fusermount(mnt, lazy=lazy)
    except Busy:
        raise busy_error(mnt) from None


def busy_error(mnt: Path) -> Busy:
    """A refused unmount: who keeps `mnt` busy, and that nothing changed."""
    inside = Path(os.getcwd()) == mnt or mnt in Path(os.getcwd()).parents
    who = "your shell's current directory is inside it" if inside else f"`fuser -vm {mnt}` lists who"
    return Busy(
        f"{mnt} is busy: files or directories in it are still open ({who}); nothing was changed",
        hint=f"close them and run `safefs umount {mnt}` again, or use --lazy "
        "(detach now; the daemon writes back and exits once the last file is closed)",
    )
