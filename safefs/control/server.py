"""The daemon's side of the control socket (trio).

`serve(path, handler)` listens on a Unix stream socket and answers one request per
connection (see `protocol` for the wire format). The daemon starts it with
`await nursery.start(serve, path, handler)`; it runs until cancelled.

Invariants:
- The socket is mode 0600 in a directory of mode 0700 owned by the daemon's uid, and each
  connection's peer uid (SO_PEERCRED) must be the daemon's uid or root: nobody else can
  sync, acquire or unmount someone's project, even if the file modes were loosened.
- An existing socket file is removed only when nothing answers on it (a dead daemon's
  leftover); a live daemon's socket is never stolen. On exit the socket is removed only if
  it is still ours (same inode).
- A connection never takes the server down: any exception while answering becomes an
  error reply (unexpected ones are logged with their traceback) and the server keeps serving.
- An operation that started runs to its end even if the client goes away (a half-done sync
  is harmless but pointless); progress lines are then dropped. A reply that is ready is sent
  even while the server is being cancelled (bounded by PROGRESS_SEND_TIMEOUT).

Threading: everything here runs in the trio thread and never blocks it, apart from a few
calls on the local runtime dir at start and exit (mkdir, chmod, unlink); the handler's
methods are async and must not block either.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, Protocol

import trio

from safefs import __version__
from safefs.control import protocol
from safefs.control.protocol import (
    AcquireReceipt,
    ErrorReply,
    Ping,
    Progress,
    ProgressReport,
    RecoverReceipt,
    Request,
    Result,
    Status,
    SyncReceipt,
    UnmountReceipt,
)
from safefs.errors import ProtocolError, Refused, SafefsError

log = logging.getLogger(__name__)

ProgressFn = Callable[[ProgressReport], Awaitable[None]]

REQUEST_TIMEOUT = 10.0  # a client gets this long to send its one request line
MAX_REQUEST_BYTES = 64 << 10
PROGRESS_SEND_TIMEOUT = 10.0  # a client that reads nothing for this long loses its connection
STALE_PROBE_TIMEOUT = 2.0
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlHandler(Protocol):
    """What the daemon offers the control socket. Each method returns its op's result type
    (protocol.OP_RESULTS), which the server encodes."""

    async def status(self) -> Status: ...

    async def sync(self, *, release: bool, timeout: float | None, progress: ProgressFn) -> SyncReceipt: ...

    async def acquire(self, *, wait: bool, timeout: float | None, progress: ProgressFn) -> AcquireReceipt: ...

    async def prepare_unmount(self, *, timeout: float | None, lazy: bool, progress: ProgressFn) -> UnmountReceipt: ...

    async def recover(self, *, timeout: float | None) -> RecoverReceipt: ...


async def serve(
    path: Path,
    handler: ControlHandler,
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve `handler` on the Unix socket `path` until cancelled. Reports `path` when listening."""
    path = Path(path)
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise Refused(
            f"control socket path {path} is longer than {SOCKET_PATH_MAX} bytes",
            hint="set XDG_RUNTIME_DIR to a shorter directory",
        )
    _prepare_directory(path.parent)
    await _remove_stale_socket(path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    inode = None
    try:
        try:
            await sock.bind(os.fspath(path))
        except OSError as exc:  # e.g. another daemon bound it since we looked
            raise Refused(f"cannot listen on the control socket {path}: {exc.strerror}") from None
        # The directory is 0700, so nobody else can reach the socket in the moment before chmod.
        os.chmod(path, 0o600)
        inode = os.stat(path).st_ino
        sock.listen(64)
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, partial(_serve_connection, handler), [listener])
            log.info("control: listening on %s", path)
            task_status.started(path)
            await trio.sleep_forever()
    finally:
        sock.close()
        if inode is not None:
            _remove_own_socket(path, inode)
    raise AssertionError("unreachable")


def _prepare_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"control directory {directory} is not a directory", hint="remove it")
    if st.st_uid != os.getuid():
        raise Refused(
            f"control directory {directory} belongs to uid {st.st_uid}, not to you (uid {os.getuid()})",
            hint="remove it, or set XDG_RUNTIME_DIR to a directory of your own",
        )
    if st.st_mode & 0o077:
        os.chmod(directory, 0o700)


async def _remove_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise Refused(f"{path} exists and is not a control socket", hint="remove it")
    try:
        with trio.move_on_after(STALE_PROBE_TIMEOUT):
            stream = await trio.open_unix_socket(path)
            await stream.aclose()
    except OSError:
        # Nothing listens: a dead daemon left it behind.
        log.info("control: removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    # It answered, or hung: either way a daemon lives there and the socket is not ours to take.
    raise Refused(
        f"another safefs daemon already serves this mountpoint (its control socket {path} answers)",
        hint="see `safefs status`; unmount it first",
    )


def _remove_own_socket(path: Path, inode: int) -> None:
    try:
        if os.lstat(path).st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("control: could not remove socket %s: %s", path, exc)


def _allowed_uids() -> set[int]:
    return {os.getuid(), 0}


def _peer_credentials(stream: trio.SocketStream) -> tuple[int, int]:
    """(pid, uid) of the process at the other end."""
    raw = stream.socket.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _gid = _UCRED.unpack(raw)
    return pid, uid


class _Connection:
    """One client connection: sends progress lines and the final reply, tolerating a vanished client."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._send_lock = trio.Lock()  # a handler may report progress from several tasks
        self.alive = True

    async def send(self, data: bytes) -> None:
        if not self.alive:
            return
        async with self._send_lock:
            with trio.move_on_after(PROGRESS_SEND_TIMEOUT) as scope:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    log.debug("control: client went away")
                    self.alive = False
            if scope.cancelled_caught:
                # A half-sent line would garble the rest, so this connection is done.
                log.info("control: client stopped reading; dropping its connection")
                self.alive = False

    async def progress(self, report: ProgressReport) -> None:
        try:
            line = protocol.encode(Progress(protocol.to_wire(report)))
        except (TypeError, ValueError):
            # A malformed progress report must not abort the operation it reports on.
            log.exception("control: progress data is not JSON-serialisable: %r", report)
            return
        await self.send(line)


async def _serve_connection(handler: ControlHandler, stream: trio.SocketStream) -> None:
    try:
        await _answer(handler, stream)
    except Exception:
        # The server must outlive any one connection (serve_listeners would let this crash it).
        log.exception("control: connection failed")
    finally:
        await stream.aclose()


async def _answer(handler: ControlHandler, stream: trio.SocketStream) -> None:
    connection = _Connection(stream)
    peer_pid, peer_uid = _peer_credentials(stream)
    if peer_uid not in _allowed_uids():
        log.warning("control: refused a request from uid %d (pid %d)", peer_uid, peer_pid)
        refusal = Refused(
            f"uid {peer_uid} may not control this safefs daemon (it runs as uid {os.getuid()})",
            hint="run safefs as the user who mounted it",
        )
        await connection.send(protocol.encode(ErrorReply.from_exception(refusal)))
        return

    op = "?"
    try:
        line = None
        with trio.move_on_after(REQUEST_TIMEOUT):
            line = await _receive_line(stream)
        if line is None:
            log.debug("control: a client closed or sent no request within %s s", REQUEST_TIMEOUT)
            return
        request = protocol.decode_request(line)
        op = request.op
        log.debug("control: %s from pid %d", op, peer_pid)
        reply: Result | ErrorReply = Result(await _dispatch(handler, request, connection))
        data = protocol.encode(reply)
    except SafefsError as exc:
        log.info("control: %s failed: %s", op, exc)
        data = protocol.encode(ErrorReply.from_exception(exc))
    except Exception as exc:
        log.exception("control: %s failed with an unexpected error", op)
        data = protocol.encode(ErrorReply.from_exception(exc))
    with trio.CancelScope(shield=True):  # an answer is sent even while the daemon shuts down
        await connection.send(data)


async def _receive_line(stream: trio.SocketStream) -> bytes | None:
    """The first line the client sends, without its newline; None if it closed without one."""
    buffer = bytearray()
    while True:
        chunk = await stream.receive_some(MAX_REQUEST_BYTES)
        if not chunk:
            return None
        end = chunk.find(b"\n")
        if end >= 0:
            buffer += chunk[:end]
            return bytes(buffer)
        buffer += chunk
        if len(buffer) > MAX_REQUEST_BYTES:
            raise ProtocolError("control request too long")


async def _dispatch(handler: ControlHandler, request: Request, connection: _Connection) -> dict[str, Any]:
    args = request.typed_args()
    if request.op == "ping":
        result: Any = Ping(pid=os.getpid(), version=__version__, protocol=protocol.PROTOCOL_VERSION)
    elif request.op == "status":
        result = await handler.status()
    elif isinstance(args, protocol.SyncArgs):
        result = await handler.sync(release=args.release, timeout=args.timeout, progress=connection.progress)
    elif isinstance(args, protocol.AcquireArgs):
        result = await handler.acquire(wait=args.wait, timeout=args.timeout, progress=connection.progress)
    elif isinstance(args, protocol.PrepareUnmountArgs):
        result = await handler.prepare_unmount(timeout=args.timeout, lazy=args.lazy, progress=connection.progress)
    elif isinstance(args, protocol.RecoverArgs):
        result = await handler.recover(timeout=args.timeout)
    else:
        raise ProtocolError(f"unknown control operation {request.op!r}")
    expected = protocol.OP_RESULTS[request.op]
    if not isinstance(result, expected):
        raise TypeError(f"handler.{request.op} returned {type(result).__name__}, not a {expected.__name__}")
    wire: dict[str, Any] = protocol.to_wire(result)
    return wire
