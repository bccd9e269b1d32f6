"""The `safefs` command's side of the control socket: blocking, stdlib only (no trio).

`call(sock_path, op, args)` sends one request and returns its typed result (the op's class in
`protocol.OP_RESULTS`, e.g. a `Status`), passing each progress line to `on_progress` as a
`ProgressReport` as it arrives; an error reply is raised as the `safefs.errors` exception it
names. `list_daemons(runtime_dir)` finds the sockets of running daemons.

Invariants:
- Nothing listening (no socket file, or a dead daemon's leftover) is `NotMounted`; a daemon
  that hangs up without a final reply is `DaemonFailed`; an expired `timeout` is
  `DaemonFailed` too (the daemon did not answer), never a silent success.
- Importing this module imports neither trio, pyfuse3 nor lmdb.
Threading: a call owns its socket; calls from several threads are independent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safefs.control import protocol
from safefs.control.protocol import ErrorReply, OpArgs, Progress, ProgressReport, Request, Result
from safefs.errors import DaemonFailed, NotMounted, ProtocolError, SafefsError

_RECEIVE_BYTES = 1 << 16
SIGNAL_SLICE = 0.5  # the longest one recv() blocks, so a pending Ctrl-C is acted on (see _receive)


def call(
    sock_path: Path | str,
    op: str,
    args: OpArgs | dict[str, Any] | None = None,
    *,
    timeout: float | None = None,
    on_progress: Callable[[ProgressReport], None] | None = None,
    label: str | None = None,
    idle_timeout: float | None = None,
) -> Any:
    """Run `op` on the daemon listening at `sock_path`; wait at most `timeout` seconds (None: forever).

    With `idle_timeout` (and no `timeout`) the wait has no bound as long as the daemon sends a
    line (progress) at least that often: for operations whose length only the daemon knows.
    `label` names the daemon in error messages (e.g. "for /home/u/proj"); default: its socket.
    `args` are the op's typed arguments (protocol.SyncArgs, ...) or their dict. The result is
    an instance of `protocol.OP_RESULTS[op]`.
    """
    wire_args = dict(args or {}) if isinstance(args, dict) or args is None else dataclasses.asdict(args)
    deadline = None if timeout is None else time.monotonic() + timeout
    idle = idle_timeout if timeout is None else None
    request = protocol.encode(Request(op, wire_args))
    result_type = protocol.OP_RESULTS.get(op)
    daemon = f"the safefs daemon {label or f'at {sock_path}'}"
    with _connect(Path(sock_path), timeout, daemon) as sock:
        # The daemon may have answered (a refusal) and closed already: the reply is read below.
        with contextlib.suppress(BrokenPipeError):
            sock.sendall(request)
        for line in _lines(sock, deadline, daemon, idle):
            reply = protocol.decode_reply(line)
            if isinstance(reply, Progress):
                if on_progress is not None:
                    on_progress(protocol.from_wire(ProgressReport, reply.data))
            elif isinstance(reply, Result):
                return reply.result if result_type is None else protocol.from_wire(result_type, reply.result)
            else:
                assert isinstance(reply, ErrorReply)
                raise reply.to_exception()
    raise DaemonFailed(
        f"{daemon} closed the connection without answering {op!r}",
        hint="it may have exited; see `safefs status` and the daemon log (daemon.log in the cache dir)",
    )


def list_daemons(runtime_dir: Path | str) -> list[Path]:
    """The control sockets in `runtime_dir`, sorted. Some may be stale: `call` then says NotMounted."""
    try:
        entries = list(os.scandir(runtime_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    sockets = []
    for entry in entries:
        if not entry.name.endswith(".sock"):
            continue
        try:
            if stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                sockets.append(Path(entry.path))
        except FileNotFoundError:
            continue  # a daemon removed it while we looked
    return sorted(sockets)


def listening(path: Path | str, timeout: float = 1.0) -> bool:
    """Whether a daemon still accepts connections at `path` (one that exited does not)."""
    try:
        _connect(Path(path), timeout, f"the safefs daemon at {path}").close()
    except NotMounted:
        return False
    except SafefsError:
        return True  # there, but not answering as it should: that is for the caller to report
    return True


def _connect(path: Path, timeout: float | None, daemon: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise NotMounted(
            f"no safefs daemon listens on {path}",
            hint="`safefs status` lists the running mounts",
        ) from None
    except PermissionError:
        sock.close()
        raise SafefsError(
            f"no permission to use the control socket {path}",
            hint="run safefs as the user who mounted it",
            errno=errno.EACCES,
        ) from None
    except TimeoutError:
        sock.close()
        raise DaemonFailed(f"{daemon} did not accept a connection in time") from None
    except OSError as exc:
        sock.close()
        raise SafefsError(f"cannot connect to the control socket {path}: {exc.strerror or exc}") from None
    return sock


def _lines(sock: socket.socket, deadline: float | None, daemon: str, idle: float | None = None) -> Iterator[bytes]:
    """Yield each complete line the daemon sends, until it closes the connection. With `idle`,
    the deadline is that long after the last data received."""
    buffer = bytearray()
    while True:
        if idle is not None:
            deadline = time.monotonic() + idle
        chunk = _receive(sock, deadline, daemon)
        if not chunk:
            return
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            yield line
        if len(buffer) > protocol.MAX_LINE_BYTES:
            raise ProtocolError("control reply too long")


def _receive(sock: socket.socket, deadline: float | None, daemon: str) -> bytes:
    """The next data from the daemon (b"" once it hung up), waiting until `deadline` (None: forever).

    The wait is cut into slices of at most SIGNAL_SLICE: a Ctrl-C that lands just before
    recv() blocks (or on another thread) interrupts nothing, and Python acts on it only when
    the call returns, so without slices `safefs sync` would ignore it until the daemon answers.
    """
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise DaemonFailed(
                f"{daemon} did not answer in time",
                hint="it may be stuck; its log (daemon.log in the cache dir) may say why",
            )
        sock.settimeout(SIGNAL_SLICE if left is None else min(left, SIGNAL_SLICE))
        try:
            return sock.recv(_RECEIVE_BYTES)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return b""
