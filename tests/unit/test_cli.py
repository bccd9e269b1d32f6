"""The `safefs` command without a kernel mount: parsing, refusals, daemon spawning (with a fake
daemon), and the commands that talk to a daemon (against the real control server run with a
fake handler in a thread).

Invariants protected:
- errors are one `safefs: error:` line (plus an optional hint line) and the error's exit code;
- the CLI imports none of trio, pyfuse3, lmdb;
- `mount` reports the daemon's ready message, its refusal, or its death (with the log tail);
- Ctrl-C exits 130 without a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from safefs import cli, cli_launcher, cli_options, cli_render, config
from safefs.control import protocol
from safefs.control.server import serve
from safefs.errors import BackingFailed, Busy, ExitCode, SafefsError, SyncTimeout
from tests.helpers import REPO
from tests.unit.test_control import FakeHandler, short_dir  # noqa: F401 (short_dir is a fixture)

PYTHON = sys.executable


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "safefs", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


class ServerThread:
    """The real control server with `handler`, on trio in a thread, for in-process CLI calls."""

    def __init__(self, path: Path, handler: FakeHandler) -> None:
        self.path, self.handler = path, handler
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            await nursery.start(serve, self.path, self.handler)
            self._ready.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "control server did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)


@pytest.fixture
def daemon(
    tmp_path: Path, short_dir: Path, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> Iterator[tuple[FakeHandler, Path]]:
    """A fake daemon serving the (unmounted) directory MNT; the CLI finds it through socket_path."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = short_dir / "run"
    monkeypatch.setattr(
        cli, "socket_path", lambda m, env, uid: run / ("m.sock" if m == mnt else "other.sock")
    )
    monkeypatch.setattr(cli, "runtime_dir", lambda env, uid: run)
    handler = FakeHandler()
    with ServerThread(run / "m.sock", handler):
        yield handler, mnt


# ---- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64k", 64 << 10), ("512M", 512 << 20), ("10G", 10 << 30), ("10GiB", 10 << 30),
     ("2TB", 2 << 40), ("1.5G", 3 << 29), (" 3 m ", 3 << 20), ("0", 0)],
)  # fmt: skip
def test_sizes_are_parsed_with_binary_units(text: str, size: int) -> None:
    assert cli_options.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "12Q", "-1G", "1..2G", "10 gigs"])
def test_bad_sizes_are_usage_errors(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Exception, match="invalid size"):
        cli_options.parse_size(text)
    assert cli.main(["mount", str(tmp_path), str(tmp_path), f"--cache-size={text}"]) == ExitCode.USAGE
    assert "invalid size" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["-1", "soon", "nan", "inf"])
def test_bad_seconds_are_usage_errors(text: str) -> None:
    assert cli.main(["sync", "/x", f"--timeout={text}"]) == ExitCode.USAGE


def test_mount_config_is_resolved_with_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "proj").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "proj")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    args = cli.build_parser().parse_args(["mount", str(tmp_path / "link"), "rel-mnt"])
    monkeypatch.chdir(tmp_path)
    conf = cli.mount_config(args)
    assert conf.src == tmp_path / "proj" and conf.mnt == tmp_path / "rel-mnt"
    assert conf.cache_dir == config.default_cache_dir(tmp_path / "proj", os.environ)
    assert conf.cache_dir.parent == tmp_path / "xdg" / "safefs"
    assert conf == config.MountConfig(src=conf.src, mnt=conf.mnt, cache_dir=conf.cache_dir)


def test_daemon_argv_reproduces_the_config_exactly(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(
        ["mount", str(tmp_path / "s"), str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c"),
         "--writeback-delay", "0.25", "--cache-size", "3G", "--allow-other", "--host-id", "hosta",
         "--lease-renew", "0.5", "--lease-break", "4", "--lease-epsilon", "0.5", "--lock-delay", "1",
         "--lease-poll", "0.2", "--follower-poll", "0.3", "--backing-timeout", "7", "--wait-lease"]
    )  # fmt: skip
    conf = cli.mount_config(args)
    assert conf.cache_size == 3 << 30 and conf.lease.t_break == 4.0 and conf.wait_for_lease
    argv = cli_launcher.daemon_argv(conf, ready_fd=7, debug=True)
    assert argv[:4] == [PYTHON, "-m", "safefs", "mount"]
    again = cli.build_parser().parse_args(argv[3:])
    assert again.foreground and again.ready_fd == 7 and again.debug
    assert cli.mount_config(again) == conf


# ---- errors and exit codes ---------------------------------------------------------------------


def test_status_of_a_nonexistent_mountpoint_is_one_clear_line() -> None:
    done = run_cli("status", "/nonexistent")
    assert done.returncode == ExitCode.NOT_MOUNTED == 4
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["safefs: error: no safefs mount at /nonexistent (no such directory)"]


def test_the_cli_imports_no_trio_pyfuse3_or_lmdb() -> None:
    check = (
        "import safefs.cli, sys; assert not {'trio','pyfuse3','lmdb'} & set(sys.modules), sys.modules.keys()"
    )
    done = subprocess.run([PYTHON, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_refused_mount_prints_the_error_and_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mnt").mkdir()
    code = cli.main(
        ["mount", str(tmp_path / "nope"), str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c")]
    )
    assert code == ExitCode.REFUSED
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"safefs: error: project {tmp_path / 'nope'} does not exist",
        "  hint: give the project directory (on NFS) as SRC",
    ]
    assert not (tmp_path / "c").exists(), "nothing is created for a refused mount"


def test_a_refused_foreground_mount_tells_the_parent_through_the_ready_fd(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    code = cli.main(
        ["mount", str(tmp_path / "nope"), str(tmp_path), "--foreground", "--ready-fd", str(write_end)]
    )
    assert code == ExitCode.REFUSED
    with os.fdopen(read_end, "rb") as f:
        ready = json.loads(f.readline())
    assert ready["ok"] is False and ready["error"]["type"] == "Refused" and ready["error"]["exit_code"] == 3


def test_recover_without_a_mount_lists_mounts_holding_unwritten_changes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli.client, "list_daemons", lambda _: ["/run/a.sock", "/run/b.sock"])
    statuses = {
        "/run/a.sock": {"mnt": "/m/a", "dirty_files": 2, "dirty_bytes": 10, "pending_ops": 1, "role": "follower"},
        "/run/b.sock": {"mnt": "/m/b", "dirty_files": 0, "dirty_bytes": 0, "pending_ops": 0, "role": "writer"},
        # A writer with write-back still to do is not an orphan: it writes back by itself.
        "/run/c.sock": {"mnt": "/m/c", "dirty_files": 3, "dirty_bytes": 30, "pending_ops": 2, "role": "writer"},
    }
    monkeypatch.setattr(cli.client, "list_daemons", lambda _: list(statuses))
    monkeypatch.setattr(cli.client, "call", lambda sock, op, **kw: status_of(statuses[sock]))
    assert cli.main(["recover"]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "safefs recover /m/a" in out and "/m/b" not in out and "/m/c" not in out


def test_recover_with_nothing_to_recover_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli.client, "list_daemons", lambda _: [])
    assert cli.main(["recover"]) == ExitCode.OK
    assert "no mounted cache" in capsys.readouterr().out


def test_ctrl_c_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.client, "call", interrupted)
    assert cli.main(["sync", "/somewhere"]) == 130
    assert capsys.readouterr().err == "safefs: interrupted\n"


@pytest.fixture
def silent_daemon(tmp_path: Path, short_dir: Path) -> Iterator[tuple[dict[str, str], Path, socket.socket]]:  # noqa: F811
    """A control socket for MNT that accepts requests and never answers: (env, MNT, listener)."""
    env = dict(os.environ, XDG_RUNTIME_DIR=str(short_dir))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock_path = config.socket_path(mnt, env, os.getuid())
    sock_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(os.fspath(sock_path))
        try:
            listener.listen()
            listener.settimeout(30)
            yield env, mnt, listener
        finally:
            sock_path.unlink(missing_ok=True)


def interruptible() -> None:
    """For Popen's preexec_fn: SIGINT back to its default in the child, which Python turns into
    KeyboardInterrupt. A test run started in the background by a non-interactive shell
    (`cmd &`) has SIGINT ignored, and a child inherits that: the CLI would rightly ignore
    Ctrl-C too, and the tests below could not send it one."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def take_request(listener: socket.socket, op: str) -> socket.socket:
    connection, _ = listener.accept()
    assert connection.makefile("rb").readline().startswith(b'{"v":1,"op":"%s"' % op.encode())
    return connection


def test_sigint_while_waiting_for_the_daemon_exits_130(silent_daemon) -> None:
    # The real CLI waits for a daemon that never answers, then gets SIGINT.
    env, mnt, listener = silent_daemon
    child = subprocess.Popen([PYTHON, "-m", "safefs", "sync", str(mnt)], cwd=REPO, env=env,
                             stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)  # fmt: skip
    try:
        with take_request(listener, "sync"):
            child.send_signal(signal.SIGINT)
            _, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130
    assert err == "safefs: interrupted\n"


# The child's SIGINT lands on a thread other than the one blocked in recv(): Python's handler
# only marks it, and nothing interrupts the recv. This is what a Ctrl-C that arrives just
# before the CLI enters recv() looks like (the CI failure: no exit within 30 s under load).
SIGINT_BESIDE_RECV = textwrap.dedent(
    """
    import signal, sys, threading
    from safefs.cli import main

    def interrupt_elsewhere():
        sys.stdin.read(1)  # the test says when: the CLI is waiting for the reply by then
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    threading.Thread(target=interrupt_elsewhere, daemon=True).start()
    sys.exit(main(["sync", sys.argv[1]]))
    """
)


def test_a_sigint_the_blocked_receive_does_not_see_still_exits_130(silent_daemon) -> None:
    env, mnt, listener = silent_daemon
    child = subprocess.Popen([PYTHON, "-c", SIGINT_BESIDE_RECV, str(mnt)], cwd=REPO, env=env,
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=interruptible)  # fmt: skip
    try:
        with take_request(listener, "sync"):
            time.sleep(0.5)  # into recv()
            _, err = child.communicate("x", timeout=30)  # never answered: only the signal ends it
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 130, err
    assert err == "safefs: interrupted\n"


def test_status_of_all_mounts_skips_a_daemon_that_exits_while_asked(silent_daemon) -> None:
    """A daemon that takes the status request, then closes its socket and exits (its unmount
    finishing) is gone, not failed: `safefs status` exits 0 (it exited 9, once, in CI)."""
    env, _, listener = silent_daemon
    sock_path = listener.getsockname()

    def exit_while_asked() -> None:
        connection = take_request(listener, "status")
        listener.close()  # the daemon's end: no more connections
        connection.close()  # and no answer to the one it had

    exiting = threading.Thread(target=exit_while_asked, daemon=True)
    exiting.start()
    try:
        done = run_cli("status", env=env)
    finally:
        exiting.join(30)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert sock_path not in done.stdout + done.stderr  # not listed as unanswered


# ---- mount: spawning the daemon ---------------------------------------------------------------

FAKE_DAEMON = textwrap.dedent(
    """
    import json, os, sys, time
    fd, mode = int(sys.argv[1]), sys.argv[2]
    print("fake daemon: session leader", os.getsid(0) == os.getpid(), "stdin", os.readlink("/proc/self/fd/0"),
          "cwd", os.getcwd(), flush=True)
    def ready(message):
        os.write(fd, json.dumps(message).encode() + b"\\n")
    if mode == "writer":
        ready({"ok": True, "pid": os.getpid(), "role": "writer", "holder": None})
    elif mode == "follower":
        ready({"ok": True, "pid": os.getpid(), "role": "follower",
               "holder": {"host": "hostb", "pid": 77, "user": "ann"}})
    elif mode == "refused":
        ready({"ok": False,
               "error": {"type": "CacheBusy", "message": "cache dir in use", "hint": "stop it", "exit_code": 5}})
    elif mode == "garbage":
        os.write(fd, b"READY\\n")
    elif mode == "dies":
        print("boom: the fake daemon cannot start", file=sys.stderr)
        sys.exit(3)
    elif mode == "hangs":
        time.sleep(60)
    """
)


@pytest.fixture
def fake_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    (tmp_path / "proj").mkdir()
    (tmp_path / "mnt").mkdir()
    cache = tmp_path / "cache"

    def mount(mode: str) -> int:
        monkeypatch.setattr(
            cli_launcher,
            "daemon_argv",
            lambda conf, *, ready_fd, debug: [PYTHON, "-c", FAKE_DAEMON, str(ready_fd), mode],
        )
        return cli.main(["mount", str(tmp_path / "proj"), str(tmp_path / "mnt"), "--cache-dir", str(cache)])

    mount.cache = cache  # type: ignore[attr-defined]
    mount.tmp = tmp_path  # type: ignore[attr-defined]
    yield mount


pytestmark_spawn = pytest.mark.filterwarnings("ignore::ResourceWarning")  # the daemon outlives its Popen


@pytestmark_spawn
def test_mount_reports_a_writer_and_how_to_unmount(
    fake_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fake_daemon("writer") == ExitCode.OK
    tmp, cache = fake_daemon.tmp, fake_daemon.cache
    assert capsys.readouterr().out == (
        f"safefs: mounted {tmp / 'proj'} at {tmp / 'mnt'} as writer (cache {cache}); "
        f"unmount with: safefs umount {tmp / 'mnt'}\n"
    )
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    log = (cache / "daemon.log").read_text()
    assert "fake daemon: session leader True stdin /dev/null cwd /" in log


@pytestmark_spawn
def test_mount_reports_a_follower_and_the_holder(
    fake_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fake_daemon("follower") == ExitCode.OK
    out = capsys.readouterr().out
    assert "as read-only follower (hostb (pid 77, user ann) holds the write lease; cache" in out


@pytestmark_spawn
def test_mount_passes_on_the_daemons_refusal(fake_daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert fake_daemon("refused") == ExitCode.BUSY
    assert capsys.readouterr().err == "safefs: error: cache dir in use\n  hint: stop it\n"


@pytestmark_spawn
def test_mount_shows_the_log_tail_when_the_daemon_dies(
    fake_daemon: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    (fake_daemon.cache).mkdir()
    (fake_daemon.cache / "daemon.log").write_text("old line from an earlier run\n")
    assert fake_daemon("dies") == ExitCode.DAEMON_FAILED
    err = capsys.readouterr().err
    assert "  | boom: the fake daemon cannot start" in err
    assert "old line" not in err, "only this run's log lines"
    assert "safefs: error: the daemon exited with status 3 before the mount was ready" in err


@pytestmark_spawn
def test_mount_rejects_a_garbled_ready_message(fake_daemon: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert fake_daemon("garbage") == ExitCode.DAEMON_FAILED
    assert "malformed ready message: b'READY'" in capsys.readouterr().err


@pytestmark_spawn
def test_mount_stops_a_daemon_that_never_gets_ready(
    fake_daemon: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_launcher, "READY_TIMEOUT", 0.5)
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    assert fake_daemon("hangs") == ExitCode.DAEMON_FAILED
    assert "did not get ready within" in capsys.readouterr().err
    assert started[0].poll() == -signal.SIGTERM


# ---- commands talking to a daemon -----------------------------------------------------------


def test_status_prints_aligned_key_value_lines(
    daemon: tuple[FakeHandler, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, mnt = daemon
    assert cli.main(["status", str(mnt)]) == ExitCode.OK
    lines = capsys.readouterr().out.splitlines()
    assert "role:    writer" in lines
    value_columns = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in lines}
    assert len(value_columns) == 1, lines


def test_status_json_is_the_daemons_dict(
    daemon: tuple[FakeHandler, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, mnt = daemon
    assert cli.main(["status", str(mnt), "--json"]) == ExitCode.OK
    assert json.loads(capsys.readouterr().out)["role"] == "writer"


def test_status_without_a_mountpoint_lists_every_daemon(
    daemon: tuple[FakeHandler, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, mnt = daemon
    stale = socket.socket(socket.AF_UNIX)  # a dead daemon's leftover is skipped
    stale.bind(os.fspath(cli.runtime_dir(os.environ, os.getuid()) / "dead.sock"))
    try:
        assert cli.main(["status", "--json"]) == ExitCode.OK
        assert [s["role"] for s in json.loads(capsys.readouterr().out)] == ["writer"]
        assert cli.main(["status"]) == ExitCode.OK
        assert "role:    writer" in capsys.readouterr().out
    finally:
        stale.close()


def test_status_without_daemons_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "runtime_dir", lambda env, uid: tmp_path / "none")
    assert cli.main(["status"]) == ExitCode.OK
    assert capsys.readouterr().out == "safefs: no mounts are running\n"


def test_a_directory_nobody_serves_is_not_mounted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["umount", str(tmp_path)]) == ExitCode.NOT_MOUNTED
    assert capsys.readouterr().err.splitlines() == [
        f"safefs: error: no safefs mount at {tmp_path}",
        "  hint: `safefs status` lists the running mounts",
    ]


def test_sync_prints_a_receipt(daemon: tuple[FakeHandler, Path], capsys: pytest.CaptureFixture[str]) -> None:
    handler, mnt = daemon
    assert cli.main(["sync", str(mnt), "--release", "--timeout", "30"]) == ExitCode.OK
    assert capsys.readouterr().out == (
        f"safefs: synced {mnt}: 3 files, 300 B written, generation 7 (epoch 2) published; "
        "write lease released, the mount is read-only now\n"
    )
    assert handler.calls == [("sync", {"release": True, "timeout": 30.0})]


def test_sync_timeout_exits_with_its_code(
    daemon: tuple[FakeHandler, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    handler, mnt = daemon
    handler.fail_with = SyncTimeout("sync did not finish in 1 s; 3 files stay dirty", hint="try again")
    assert cli.main(["sync", str(mnt), "--timeout", "1"]) == ExitCode.SYNC_TIMEOUT
    assert (
        capsys.readouterr().err
        == "safefs: error: sync did not finish in 1 s; 3 files stay dirty\n  hint: try again\n"
    )


def test_acquire(daemon: tuple[FakeHandler, Path], capsys: pytest.CaptureFixture[str]) -> None:
    handler, mnt = daemon
    assert cli.main(["acquire", str(mnt), "--wait", "--timeout", "5"]) == ExitCode.OK
    assert capsys.readouterr().out == f"safefs: {mnt} is the writer now (epoch 3)\n"
    assert handler.calls == [("acquire", {"wait": True, "timeout": 5.0})]


class FakeWatch:
    exits = True
    watched: list[int] = []

    def __init__(self, pid: int) -> None:
        self.watched.append(pid)

    def wait_exit(self, timeout: float | None) -> bool:
        return self.exits

    def __enter__(self) -> FakeWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def test_umount_writes_back_unmounts_and_waits_for_the_daemon(
    daemon: tuple[FakeHandler, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    handler, mnt = daemon
    unmounted: list[tuple[Path, bool]] = []
    monkeypatch.setattr(cli, "fusermount_unmount", lambda m, *, lazy: unmounted.append((m, lazy)))
    monkeypatch.setattr(cli, "ProcessWatch", FakeWatch)
    FakeWatch.watched.clear()
    assert cli.main(["umount", str(mnt), "--lazy"]) == ExitCode.OK
    assert handler.calls == [("prepare_unmount", {"timeout": None, "lazy": True})]
    assert unmounted == [(mnt, True)]
    assert FakeWatch.watched == [os.getpid()]  # the pid the server answered ping with
    assert capsys.readouterr().out == f"safefs: unmounted {mnt}; everything was written back to /s\n"


def test_umount_times_out_if_the_daemon_does_not_exit(
    daemon: tuple[FakeHandler, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, mnt = daemon
    monkeypatch.setattr(cli, "fusermount_unmount", lambda m, *, lazy: None)
    monkeypatch.setattr(cli, "ProcessWatch", type("StuckWatch", (FakeWatch,), {"exits": False}))
    assert cli.main(["umount", str(mnt), "--timeout", "2"]) == ExitCode.SYNC_TIMEOUT
    assert "is still running after 2 s" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error, why",
    [
        (SyncTimeout("sync timed out; dirty data stays safe in the cache"), "the write-back did not finish within 2 s"),
        (BackingFailed("EIO on a/b"), "the project failed (EIO on a/b)"),
    ],
)
def test_umount_that_cannot_write_back_says_the_mount_stays_and_the_data_is_kept(
    daemon: tuple[FakeHandler, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    error: SafefsError, why: str,
) -> None:
    handler, mnt = daemon
    handler.fail_with = error
    unmounted: list[Path] = []
    monkeypatch.setattr(cli, "fusermount_unmount", lambda m, *, lazy: unmounted.append(m))
    monkeypatch.setattr(cli, "ProcessWatch", FakeWatch)
    assert cli.main(["umount", str(mnt), "--timeout", "2"]) == error.exit_code
    assert unmounted == [], "unmounted although the write-back failed"
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"safefs: error: {mnt} is still mounted: {why}; the dirty data stays safe in the cache"
    assert f"run `safefs umount {mnt}` again" in err[1] and "next mount on this host" in err[1]


def test_a_busy_mount_is_a_busy_error_with_a_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def busy(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert command == ["fusermount3", "-u", str(tmp_path)]
        return subprocess.CompletedProcess(
            command, 1, "", f"fusermount3: failed to unmount {tmp_path}: Device or resource busy\n"
        )

    monkeypatch.setattr(subprocess, "run", busy)
    with pytest.raises(Busy) as info:
        cli.fusermount_unmount(tmp_path, lazy=False)
    assert info.value.exit_code == ExitCode.BUSY
    assert str(tmp_path) in info.value.message and "--lazy" in (info.value.hint or "")


def test_another_fusermount_failure_is_reported_verbatim(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda command, **kw: subprocess.CompletedProcess(command, 1, "", "fusermount3: entry not found\n"),
    )
    with pytest.raises(SafefsError, match="could not unmount .*: fusermount3: entry not found$"):
        cli.fusermount_unmount(tmp_path, lazy=True)


# ---- waiting for a process, progress, status formatting -----------------------------------------


def test_process_watch_sees_a_process_exit() -> None:
    process = subprocess.Popen(["sleep", "30"])
    with cli.ProcessWatch(process.pid) as watch:
        assert not watch.wait_exit(0.05)
        process.terminate()
        assert watch.wait_exit(10)
    process.wait()
    assert cli.ProcessWatch(process.pid).wait_exit(0)  # long gone


def test_process_watch_without_pidfd_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    process = subprocess.Popen(["sleep", "30"])
    try:
        assert not cli.ProcessWatch(process.pid).wait_exit(0.05)
    finally:
        process.kill()
        process.wait()
    assert cli.ProcessWatch(process.pid).wait_exit(5)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_and_clears_it() -> None:
    terminal = FakeTerminal()
    with cli_render.ProgressBar("syncing", terminal, delay=0) as bar:
        bar.update(protocol.ProgressReport(bytes_done=1 << 30, bytes_total=4 << 30, files_done=1, files_total=4,
                                           waiting_for="the write-back"))  # fmt: skip
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())
    for part in ("syncing", "1.0/4.0", "GiB", "3 files left", "waiting for the write-back"):
        assert part in drawn, drawn
    assert terminal.getvalue().endswith("\x1b[2K"), "the progress display was not erased at the end"


def test_progress_bar_stays_quiet_off_a_terminal_and_for_quick_operations() -> None:
    pipe = io.StringIO()
    with cli_render.ProgressBar("syncing", pipe, delay=0) as bar:
        bar.update(protocol.ProgressReport(files_done=1))
    terminal = FakeTerminal()
    with cli_render.ProgressBar("syncing", terminal, delay=3600) as bar:
        bar.update(protocol.ProgressReport(files_done=1))
    assert pipe.getvalue() == terminal.getvalue() == ""


def status_of(wire: dict[str, Any]) -> protocol.Status:
    """The Status a daemon sending `wire` gives the CLI."""
    return protocol.from_wire(protocol.Status, wire)


FULL_STATUS = {
    "src": "/nfs/proj", "mnt": "/home/u/proj", "cache_dir": "/var/tmp/c", "pid": 4242, "role": "follower",
    "dirty_bytes": 3 << 20, "dirty_files": 2, "oldest_dirty_age": 75.0, "pending_ops": 4,
    "bytes_fetched": 1 << 30, "bytes_written": 0, "cache_bytes": 5 << 30, "cache_limit": 10 << 30,
    "errors": [{"op": "flush", "path": "/a", "error": "EIO", "retry_at": None}], "conflicts": [],
    "lease": {"epoch": 3, "generation": 9, "deadline": None,
              "holder": {"host": "hostb", "pid": 77, "user": "ann", "since": "2026-11-25 02:00", "heartbeat_age": 2.5}},
    "hit_rate": 0.93,
}  # fmt: skip


def test_status_formatting_shows_every_contract_key() -> None:
    lines = cli.format_status(status_of(FULL_STATUS)).splitlines()
    assert lines == [
        "mount:        /home/u/proj",
        "project:      /nfs/proj",
        "role:         follower",
        "epoch:        3",
        "generation:   9",
        "lease holder: hostb (pid 77, user ann), since 2026-11-25 02:00, heartbeat 2.5 s ago",
        "dirty:        3.0 MiB in 2 files, oldest 1 min 15 s",
        "pending ops:  4",
        "fetched:      1.0 GiB from the project",
        "written:      0 B to the project",
        "cache:        5.0 GiB of 10.0 GiB",
        "cache dir:    /var/tmp/c",
        "pid:          4242",
        "errors:       1",
        "conflicts:    none",
        "hit rate:     0.93",
        "  error: flush /a: EIO",
    ]


ORPHAN_A = {
    "name": "hostA-0123456789ab", "host": "hostA", "machine_id": "m", "cache_dir": "/var/tmp/ca", "pid": 9,
    "user": "ann", "epoch": 4, "pending_ops": 3, "dirty_files": 2, "dirty_bytes": 12 << 10,
    "since": 1_700_000_000.0, "updated": 1_700_000_100.0, "reason": "lease lost: epoch 5 was claimed by another mount",
}  # fmt: skip


def test_status_formatting_lists_orphans_and_says_where_to_recover() -> None:
    own = {**ORPHAN_A, "host": "hostb", "cache_dir": "/var/tmp/c", "epoch": None, "pending_ops": 0, "reason": ""}
    status = {**FULL_STATUS, "host": "hostb", "orphans": [ORPHAN_A, own], "orphans_error": None,
              "orphans_skipped": [{"name": "x.json", "error": "not valid JSON"}]}  # fmt: skip
    lines = cli.format_status(status_of(status)).splitlines()
    assert "orphans:      2" in lines
    since = cli_render.human_time(ORPHAN_A["since"])
    assert (
        f"  orphaned changes: host hostA (cache /var/tmp/ca) 3 pending ops and 12.0 KiB in 2 files unwritten "
        f"since {since} (lease lost: epoch 5 was claimed by another mount; epoch 4); run `safefs recover` on hostA"
    ) in lines
    assert (
        f"  orphaned changes: host hostb (cache /var/tmp/c) 12.0 KiB in 2 files unwritten since {since}; "
        "run `safefs recover /home/u/proj` on this host"
    ) in lines
    assert "  unreadable orphan marker: name=x.json, error=not valid JSON" in lines
    assert not any(line.startswith("orphans error") or line.startswith("orphans skipped") for line in lines)


def test_status_formatting_says_when_orphans_could_not_be_read() -> None:
    status = {**FULL_STATUS, "orphans": None, "orphans_error": "/nfs/proj/.safefs/orphans did not answer within 3 s",
              "orphans_skipped": []}  # fmt: skip
    assert "orphans:      unknown: /nfs/proj/.safefs/orphans did not answer within 3 s" in cli.format_status(
        status_of(status)
    ).splitlines()
    assert "orphans:      none" in cli.format_status(status_of({**status, "orphans": []})).splitlines()


def test_recover_without_a_mount_also_names_other_hosts_orphans(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli.client, "list_daemons", lambda _: ["/run/a.sock", "/run/b.sock"])
    local = {**ORPHAN_A, "host": "here", "cache_dir": "/c/b"}  # the marker of a mount of ours
    statuses = {
        "/run/a.sock": {"mnt": "/m/a", "src": "/p", "host": "here", "cache_dir": "/c/a", "dirty_files": 0,
                        "pending_ops": 0, "orphans": [ORPHAN_A, local]},
        "/run/b.sock": {"mnt": "/m/b", "src": "/p", "host": "here", "cache_dir": "/c/b", "dirty_files": 1,
                        "pending_ops": 0, "orphans": [ORPHAN_A, local]},
    }  # fmt: skip
    monkeypatch.setattr(cli.client, "call", lambda sock, op, **kw: status_of(statuses[sock]))
    assert cli.main(["recover"]) == ExitCode.OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("/m/b: 1 files") and out[0].endswith("safefs recover /m/b")
    assert out[1] == "caches elsewhere hold changes the projects of these mounts lack:"
    assert len(out) == 3 and out[2].startswith("  /p: orphaned changes: host hostA (cache /var/tmp/ca)")
    assert out[2].endswith("run `safefs recover` on hostA")


CONFLICT = {"path": "d/x", "kept_as": "d/x.safefs-conflict-h-20261207-101500", "copy_holds": "the mount's version",
            "why": "made in the mount while the project got another object of that name",
            "time": "2026-12-07 10:15:00 UTC"}  # fmt: skip


def test_sync_receipt_lists_conflicts_by_name_copy_and_reason() -> None:
    receipt = cli.sync_receipt(Path("/m"), protocol.from_wire(protocol.SyncReceipt, {
        "files": 1, "bytes": 4, "generation": 5, "epoch": 1, "conflicts": [CONFLICT]}), released=False)  # fmt: skip
    assert receipt.splitlines() == [
        "safefs: synced /m: 1 file, 4 B written, generation 5 (epoch 1) published",
        "1 conflict (both versions kept side by side):",
        "  d/x: made in the mount while the project got another object of that name; the mount's version is "
        "d/x.safefs-conflict-h-20261207-101500, at 2026-12-07 10:15:00 UTC",
    ]
    assert "conflict" not in cli.sync_receipt(Path("/m"), protocol.SyncReceipt(conflicts=[]), released=False)


def test_status_formatting_shows_conflicts_with_readable_times() -> None:
    lines = cli.format_status(status_of({**FULL_STATUS, "conflicts": [CONFLICT]})).splitlines()
    assert "conflicts:    1" in lines
    assert f"  conflict: {cli.describe_conflict(protocol.from_wire(protocol.Conflict, CONFLICT))}" in lines
    assert "time=" not in "\n".join(lines)


def test_mount8_translation_knows_every_subcommand():
    """`safefs init SRC` must never be read as the mount(8) form `safefs SRC MNT`."""
    parser = cli.build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(cli.COMMANDS) == set(commands.choices)
