"""The control channel: protocol round trips, and the trio server against the stdlib client
over a real Unix socket.

Invariants protected:
- every safefs error crosses the socket as itself (class, message, hint, errno, exit code);
- the server survives a failing handler and answers the next request;
- only the daemon's uid (or root) gets an answer; the socket is 0600 in a 0700 dir;
- a dead daemon's socket is replaced, a live one is never stolen;
- the client says NotMounted when nobody listens, DaemonFailed when the daemon hangs up or
  does not answer in time.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from safefs import errors
from safefs.control import client, protocol, server
from safefs.control.protocol import (
    AcquireReceipt,
    ErrorReply,
    FinalWriteBack,
    FlushStatistics,
    Progress,
    ProgressReport,
    Request,
    Result,
    Status,
    SyncReceipt,
    UnmountReceipt,
)
from safefs.control.server import ProgressFn, serve
from safefs.errors import ExitCode, SafefsError
from safefs.flusher import FlusherStatistics
from safefs.mount.handle import flush_statistics
from safefs.writeback import FlushError

ERROR_CLASSES = sorted(
    (value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, SafefsError)),
    key=lambda cls: cls.__name__,
)


class FakeHandler:
    """A daemon stand-in: records calls, streams progress on sync, fails on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_with: BaseException | None = None

    def _record(self, op: str, **args: Any) -> None:
        self.calls.append((op, args))
        if self.fail_with is not None:
            failure, self.fail_with = self.fail_with, None
            raise failure

    async def status(self) -> Status:
        self._record("status")
        return Status(role="writer", pid=os.getpid(), mnt="/m", src="/s", flush=FlushStatistics(dirty_bytes=0))

    async def sync(self, *, release: bool, timeout: float | None, progress: ProgressFn) -> SyncReceipt:
        self._record("sync", release=release, timeout=timeout)
        for done in (1, 2, 3):
            await progress(ProgressReport(phase="flushing", files_done=done, files_total=3))
        return SyncReceipt(role="writer", epoch=2, generation=7, files=3, bytes=300, conflicts=[])

    async def acquire(self, *, wait: bool, timeout: float | None, progress: ProgressFn) -> AcquireReceipt:
        self._record("acquire", wait=wait, timeout=timeout)
        return AcquireReceipt(role="writer", epoch=3)

    async def prepare_unmount(self, *, timeout: float | None, lazy: bool, progress: ProgressFn) -> UnmountReceipt:
        self._record("prepare_unmount", timeout=timeout, lazy=lazy)
        return UnmountReceipt(role="follower", final=FinalWriteBack(src="/s", pid=os.getpid()))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: sun_path holds 107 bytes, pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="sfs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def served(short_dir: Path, nursery: trio.Nursery) -> tuple[FakeHandler, Path]:
    handler = FakeHandler()
    path = await nursery.start(serve, short_dir / "run" / "m.sock", handler)
    return handler, path


async def call(path: Path, op: str, args: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """The blocking client, run in a thread so the server keeps running."""
    return await trio.to_thread.run_sync(lambda: client.call(path, op, args, **kwargs))


async def raises(path: Path, op: str, args: dict[str, Any] | None = None, **kwargs: Any) -> SafefsError:
    with pytest.raises(SafefsError) as info:
        await call(path, op, args, **kwargs)
    return info.value


# ---- protocol ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Request("status"),
        Request("sync", {"release": True, "timeout": 2.5}),
        Progress({"phase": "flushing", "bytes_done": 10, "bytes_total": 20}),
        Result({"pid": 1, "lease": {"epoch": 3, "holder": None}, "errors": []}),
        ErrorReply("LeaseHeldElsewhere", "held by b", "wait", int(ExitCode.LEASE_HELD), errno.EROFS),
        ErrorReply("SafefsError", "x"),
    ],
)
def test_messages_round_trip_as_one_versioned_line(message: protocol.Message) -> None:
    line = protocol.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["v"] == protocol.PROTOCOL_VERSION
    decode = protocol.decode_request if isinstance(message, Request) else protocol.decode_reply
    assert decode(line[:-1]) == message


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_class_crosses_the_socket_as_itself(cls: type[SafefsError]) -> None:
    original = cls.__new__(cls)
    SafefsError.__init__(original, "something went wrong at /p", hint="do this", errno=errno.EXDEV)
    line = protocol.encode(ErrorReply.from_exception(original))
    rebuilt = protocol.decode_reply(line)
    assert isinstance(rebuilt, ErrorReply)
    exc = rebuilt.to_exception()
    assert type(exc) is cls
    assert (exc.message, exc.hint, exc.errno, exc.exit_code) == (
        "something went wrong at /p",
        "do this",
        errno.EXDEV,
        cls.exit_code,
    )
    assert str(exc) == "something went wrong at /p"


def test_an_fs_error_keeps_its_errno() -> None:
    exc = protocol.error_from_wire(protocol.error_to_wire(errors.FsError(errno.ENOENT)))
    assert isinstance(exc, errors.FsError) and exc.errno == errno.ENOENT


def test_an_unknown_error_type_becomes_safefs_error_with_the_senders_exit_code() -> None:
    exc = protocol.error_from_wire({"type": "FromTheFuture", "message": "new", "exit_code": 5})
    assert type(exc) is SafefsError
    assert exc.exit_code == ExitCode.BUSY and exc.message == "new"
    odd = protocol.error_from_wire({"type": "Refused", "message": "m", "exit_code": 99})
    assert isinstance(odd, errors.Refused) and odd.exit_code == ExitCode.ERROR


def test_an_unexpected_exception_is_reported_as_a_bug() -> None:
    reply = ErrorReply.from_exception(ZeroDivisionError("division by zero"))
    assert reply.type == "SafefsError" and reply.exit_code == ExitCode.ERROR
    assert "ZeroDivisionError: division by zero" in reply.message
    assert "bug" in (reply.hint or "")


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        b'{"op": "status"}',
        b'{"v": 2, "op": "status"}',
        b'{"v": 1}',
        b'{"v": 1, "op": "status", "args": [1]}',
        b"\xff\xfe",
    ],
)
def test_a_malformed_request_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(errors.ProtocolError):
        protocol.decode_request(line)


@pytest.mark.parametrize(
    "line",
    [
        b'{"v": 1}',
        b'{"v": 1, "ok": false, "error": "x"}',
        b'{"v": 1, "progress": 3}',
        b'{"v": 1, "ok": true, "result": 1}',
    ],
)
def test_a_malformed_reply_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(errors.ProtocolError):
        protocol.decode_reply(line)


def test_op_arguments_are_typed_and_checked() -> None:
    assert Request("sync", {"release": True, "timeout": 3}).typed_args() == protocol.SyncArgs(True, 3.0)
    assert Request("sync").typed_args() == protocol.SyncArgs(False, None)
    assert Request("acquire", {"wait": True, "future": 1}).typed_args() == protocol.AcquireArgs(True, None)
    assert Request("prepare_unmount", {"timeout": None}).typed_args() == protocol.PrepareUnmountArgs(None)
    for bad in ({"timeout": -1}, {"timeout": "3"}, {"timeout": True}, {"release": "yes"}):
        with pytest.raises(errors.ProtocolError):
            Request("sync", bad).typed_args()
    with pytest.raises(errors.ProtocolError, match="unknown control operation"):
        Request("format_disk").typed_args()


# ---- server and client ---------------------------------------------------------------------------


async def test_ping_is_answered_by_the_server_with_its_pid(served: tuple[FakeHandler, Path]) -> None:
    handler, path = served
    result = await call(path, "ping", timeout=5)
    assert result.pid == os.getpid() and result.protocol == protocol.PROTOCOL_VERSION
    assert handler.calls == []


async def test_status_returns_the_handlers_status(served: tuple[FakeHandler, Path]) -> None:
    handler, path = served
    status = await call(path, "status", timeout=5)
    assert status == Status(role="writer", pid=os.getpid(), mnt="/m", src="/s", flush=FlushStatistics(dirty_bytes=0))
    assert handler.calls == [("status", {})]


async def test_sync_streams_progress_lines_before_its_result(served: tuple[FakeHandler, Path]) -> None:
    handler, path = served
    seen: list[ProgressReport] = []
    result = await call(path, "sync", protocol.SyncArgs(release=True, timeout=4), on_progress=seen.append)
    assert [p.files_done for p in seen] == [1, 2, 3]
    assert result == SyncReceipt(role="writer", epoch=2, generation=7, files=3, bytes=300, conflicts=[])
    assert handler.calls == [("sync", {"release": True, "timeout": 4.0})]


async def test_acquire_and_prepare_unmount_get_their_arguments(served: tuple[FakeHandler, Path]) -> None:
    handler, path = served
    assert await call(path, "acquire", {"wait": True}) == AcquireReceipt(role="writer", epoch=3)
    assert (await call(path, "prepare_unmount", {"timeout": 9})).final.src == "/s"
    assert handler.calls == [
        ("acquire", {"wait": True, "timeout": None}),
        ("prepare_unmount", {"timeout": 9.0, "lazy": False}),
    ]


async def test_a_safefs_error_in_the_handler_reaches_the_client_as_itself(
    served: tuple[FakeHandler, Path],
) -> None:
    handler, path = served
    handler.fail_with = errors.LeaseHeldElsewhere("host b holds the lease", hint="wait for it")
    exc = await raises(path, "acquire")
    assert type(exc) is errors.LeaseHeldElsewhere
    assert (exc.message, exc.hint, exc.exit_code) == (
        "host b holds the lease",
        "wait for it",
        ExitCode.LEASE_HELD,
    )


async def test_a_crashing_handler_gives_an_error_reply_and_the_server_keeps_serving(
    served: tuple[FakeHandler, Path], caplog: pytest.LogCaptureFixture
) -> None:
    handler, path = served
    handler.fail_with = RuntimeError("flusher exploded")
    exc = await raises(path, "status")
    assert exc.exit_code == ExitCode.ERROR and "RuntimeError: flusher exploded" in exc.message
    (record,) = [r for r in caplog.records if r.name == server.__name__ and r.levelno >= logging.ERROR]
    assert record.exc_info is not None and "control:" in record.getMessage()
    assert (await call(path, "status")).role == "writer"


async def test_an_unknown_op_or_bad_arguments_get_a_protocol_error(served: tuple[FakeHandler, Path]) -> None:
    handler, path = served
    assert type(await raises(path, "format_disk")) is errors.ProtocolError
    assert type(await raises(path, "sync", {"timeout": "soon"})) is errors.ProtocolError
    assert handler.calls == []


async def test_a_request_of_another_protocol_version_is_refused(served: tuple[FakeHandler, Path]) -> None:
    _, path = served

    def raw_exchange() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(os.fspath(path))
            sock.sendall(b'{"v": 99, "op": "status"}\n')
            return sock.makefile("rb").readline()

    reply = protocol.decode_reply(await trio.to_thread.run_sync(raw_exchange))
    assert isinstance(reply, ErrorReply) and reply.type == "ProtocolError" and "version 99" in reply.message


async def test_socket_is_0600_in_a_0700_directory_and_removed_on_exit(short_dir: Path) -> None:
    path = short_dir / "run" / "m.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, path, FakeHandler())
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_a_loose_control_directory_is_tightened(short_dir: Path, nursery: trio.Nursery) -> None:
    run = short_dir / "run"
    run.mkdir(mode=0o755)
    os.chmod(run, 0o755)
    await nursery.start(serve, run / "m.sock", FakeHandler())
    assert stat.S_IMODE(run.stat().st_mode) == 0o700


async def test_a_dead_daemons_socket_is_replaced(short_dir: Path, nursery: trio.Nursery) -> None:
    path = short_dir / "m.sock"
    with socket.socket(socket.AF_UNIX) as leftover:
        leftover.bind(os.fspath(path))  # bound, never listening: what a killed daemon leaves
    with pytest.raises(errors.NotMounted):
        client.call(path, "ping", timeout=5)
    await nursery.start(serve, path, FakeHandler())
    assert (await call(path, "ping", timeout=5)).pid == os.getpid()


async def test_a_live_daemons_socket_is_never_stolen(served: tuple[FakeHandler, Path]) -> None:
    _, path = served
    with pytest.raises(errors.Refused, match="already serves"):
        await serve(path, FakeHandler())
    assert (await call(path, "ping", timeout=5)).pid == os.getpid()


async def test_a_file_that_is_not_a_socket_is_left_alone(short_dir: Path) -> None:
    path = short_dir / "m.sock"
    path.write_text("precious")
    with pytest.raises(errors.Refused, match="not a control socket"):
        await serve(path, FakeHandler())
    assert path.read_text() == "precious"


async def test_a_too_long_socket_path_is_refused_clearly(short_dir: Path) -> None:
    with pytest.raises(errors.Refused, match="longer than"):
        await serve(short_dir / ("x" * 120) / "m.sock", FakeHandler())


async def test_a_peer_with_another_uid_is_refused(
    served: tuple[FakeHandler, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    handler, path = served
    monkeypatch.setattr(server, "_allowed_uids", lambda: {os.getuid() + 4242})
    exc = await raises(path, "status", timeout=5)
    assert type(exc) is errors.Refused and f"uid {os.getuid()} may not control" in exc.message
    assert handler.calls == []


@pytest.mark.skipif(
    os.getuid() != 0, reason="switching to another uid needs root; the test above covers the check"
)
async def test_a_real_process_of_another_uid_is_refused(served: tuple[FakeHandler, Path]) -> None:
    handler, path = served
    # Loosen every mode on the way, as a careless admin might: the peer check must still hold.
    os.chmod(path.parent.parent, 0o711)
    os.chmod(path.parent, 0o711)
    os.chmod(path, 0o666)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no trio, no pytest; always _exit
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                client.call(path, "status", timeout=5)
                outcome = "answered"
            except SafefsError as exc:
                outcome = f"{type(exc).__name__} {int(exc.exit_code)} {exc.message}"
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    await trio.to_thread.run_sync(os.waitpid, pid, 0)
    with os.fdopen(read_end, "rb") as f:
        outcome = f.read().decode()
    assert outcome.startswith(f"Refused {int(ExitCode.REFUSED)} uid 65534 may not control"), outcome
    assert handler.calls == []


async def test_progress_that_cannot_be_sent_does_not_abort_the_operation(
    short_dir: Path, nursery: trio.Nursery
) -> None:
    finished = trio.Event()

    class SlowSync(FakeHandler):
        async def sync(self, *, release: bool, timeout: float | None, progress: ProgressFn) -> SyncReceipt:
            await progress(ProgressReport(extra={"not json": {1, 2}}))  # a handler bug: logged, dropped
            await trio.sleep(0.2)  # meanwhile the client hangs up
            await progress(ProgressReport(files_done=1))
            finished.set()
            return SyncReceipt()

    path = await nursery.start(serve, short_dir / "m.sock", SlowSync())

    def hang_up_early() -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(os.fspath(path))
            sock.sendall(protocol.encode(Request("sync")))

    await trio.to_thread.run_sync(hang_up_early)
    with trio.fail_after(5):
        await finished.wait()
    assert (await call(path, "ping", timeout=5)).pid == os.getpid()


# ---- client on its own ---------------------------------------------------------------------------


def test_client_says_not_mounted_when_nothing_listens(short_dir: Path) -> None:
    with pytest.raises(errors.NotMounted) as info:
        client.call(short_dir / "none.sock", "status", timeout=1)
    assert "none.sock" in info.value.message and info.value.hint
    assert info.value.exit_code == ExitCode.NOT_MOUNTED


async def test_client_says_daemon_failed_when_the_daemon_hangs_up(
    short_dir: Path, nursery: trio.Nursery
) -> None:
    path = short_dir / "m.sock"
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(os.fspath(path))
    listener.listen()

    async def hang_up() -> None:
        conn, _ = await listener.accept()
        conn.close()

    nursery.start_soon(hang_up)
    exc = await raises(path, "status", timeout=5)
    assert type(exc) is errors.DaemonFailed and "without answering" in exc.message
    listener.close()


def test_client_says_daemon_failed_when_the_daemon_does_not_answer_in_time(short_dir: Path) -> None:
    path = short_dir / "m.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(os.fspath(path))
        listener.listen()  # accepted by the kernel, never answered: a stopped daemon
        with pytest.raises(errors.DaemonFailed, match="did not answer in time"):
            client.call(path, "status", timeout=0.2)


def test_list_daemons_finds_only_sockets(short_dir: Path) -> None:
    assert client.list_daemons(short_dir / "missing") == []
    (short_dir / "notes.sock").write_text("not a socket")
    (short_dir / "other").mkdir()
    sockets = []
    for name in ("b.sock", "a.sock"):
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(os.fspath(short_dir / name))
        sockets.append(sock)
    try:
        assert client.list_daemons(short_dir) == [short_dir / "a.sock", short_dir / "b.sock"]
    finally:
        for sock in sockets:
            sock.close()


# ---- typed payloads ------------------------------------------------------------------------------

# A writer's status as the daemon sends it (every key of the contract, an etcd lease backend).
WIRE_STATUS: dict[str, Any] = {
    "src": "/nfs/p", "mnt": "/m", "cache_dir": "/c", "pid": 12, "host": "h", "role": "writer", "state": "mounted",
    "dirty_bytes": 5, "dirty_files": 1, "oldest_dirty_age": 0.5, "pending_ops": 2, "flushes": 3, "flushing": False,
    "errors": [{"op": "flush", "path": "a", "error": "EIO", "retry_at": 1.5e9}],
    "conflicts": [{"op": "rename", "error": "ENOENT", "why": "gone", "time": "2026-12-07 10:15:00 UTC"}],
    "bytes_fetched": 7, "bytes_written": 8, "cache_bytes": 9, "cache_limit": 10, "cache_hits": 11, "fetches": 12,
    "evictions": 0, "inodes": 4, "internal_errors": 0, "kernel_writeback_cache": True, "writeback_delay": 5,
    "lease": {"role": "writer", "state": "held", "epoch": 3, "writable": True, "publishable": True,
              "publishing_from": None, "holder": {"host": "h", "pid": 12, "user": "u", "since": 1.7e9,
                                                  "heartbeat_age": 0.1},
              "deadline": 9.5, "lock_delay": 0.0, "lost_reason": None, "last_error": None, "generation": 4,
              "backend": "etcd", "endpoints": ["http://e:2379"], "prefix": "p/", "ttl": 180, "expires_in": None,
              "revision": 5, "etcd_requests": 6, "project_polls": 7, "generation_seen_at": None},
    "warnings": [{"message": "m", "count": 2, "level": "warning", "time": 1.7e9}],
    "orphans": [{"name": "n", "host": "o", "machine_id": "x", "cache_dir": "/oc", "pid": 1, "user": "u", "epoch": None,
                 "pending_ops": 0, "dirty_files": 1, "dirty_bytes": 2, "since": 1.0, "updated": 2.0, "reason": "r"}],
    "orphans_error": None, "orphans_skipped": [{"name": "bad", "error": "not JSON"}],
}  # fmt: skip


def test_a_status_decodes_to_attributes_and_encodes_to_the_same_json() -> None:
    status = protocol.from_wire(Status, WIRE_STATUS)
    assert status.flush.errors is not None and status.flush.errors[0].error == "EIO"
    assert status.lease is not None and status.lease.holder is not None and status.lease.holder.pid == 12
    assert status.lease.etcd is not None and status.lease.etcd.ttl == 180
    assert status.orphan_listing.orphans is not None and status.orphan_listing.orphans[0].host == "o"
    assert protocol.to_wire(status) == WIRE_STATUS
    assert json.dumps(protocol.to_wire(status), sort_keys=True) == json.dumps(WIRE_STATUS, sort_keys=True)
    dir_backend = {**WIRE_STATUS["lease"], "backend": "dir"}
    for key in ("endpoints", "prefix", "ttl", "expires_in", "revision", "etcd_requests"):
        del dir_backend[key]
    wire = {**WIRE_STATUS, "lease": dir_backend}
    assert protocol.to_wire(protocol.from_wire(Status, wire)) == wire, "keys of another backend appeared"


def test_the_flushers_statistics_reach_status_under_the_same_keys() -> None:
    """Flusher.statistics() is a frozen dataclass (issue 13: 4); status converts it in one
    place, and every field arrives under the key the contract names, with its value."""
    keys = [f.name for f in dataclasses.fields(FlusherStatistics)]
    assert keys == [f.name for f in dataclasses.fields(FlushStatistics)]
    wire = {key: WIRE_STATUS[key] for key in keys}
    stats = FlusherStatistics(**{**wire, "errors": tuple(FlushError(**e) for e in wire["errors"]),
                                 "conflicts": tuple(wire["conflicts"])})  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.flushes = 4  # type: ignore[misc]
    assert protocol.to_wire(flush_statistics(stats)) == wire
    clean = dataclasses.replace(stats, oldest_dirty_age=None, errors=(), conflicts=())
    assert protocol.to_wire(flush_statistics(clean)) == {**wire, "oldest_dirty_age": None, "errors": [],
                                                         "conflicts": []}  # fmt: skip


def test_keys_this_side_does_not_know_are_kept_not_dropped() -> None:
    status = protocol.from_wire(Status, {**WIRE_STATUS, "new_counter": 1, "lease": {"epoch": 1, "new": "x"}})
    assert status.extra == {"new_counter": 1}
    assert status.lease is not None and status.lease.extra == {"new": "x"}
    assert protocol.to_wire(status)["new_counter"] == 1 and protocol.to_wire(status)["lease"]["new"] == "x"


@pytest.mark.parametrize(
    "wire",
    [
        # a writer's sync: conflicts since the last sync
        {"role": "writer", "epoch": 2, "generation": 5, "files": 1, "bytes": 4, "ops": 0, "released": True,
         "conflicts": []},
        # a follower's: no conflicts key
        {"role": "follower", "epoch": 2, "generation": None, "files": 0, "bytes": 0, "ops": 0, "released": False},
        # an unmounted mount's: what the final write-back left
        {"src": "/p", "cache_dir": "/c", "pid": 3, "role": "writer", "state": "exiting", "unmounted": True,
         "unwritten": 0, "unwritten_files": 0, "unwritten_ops": 0, "unwritten_bytes": 0, "unwritten_reason": None,
         "files": 1, "bytes": 2, "ops": 3, "generation": 4, "epoch": 5, "released": True},
    ],
)  # fmt: skip
def test_every_shape_of_sync_receipt_keeps_its_keys(wire: dict[str, Any]) -> None:
    receipt = protocol.from_wire(SyncReceipt, wire)
    assert protocol.to_wire(receipt) == wire
    assert (receipt.final is not None) == ("unmounted" in wire)


@pytest.mark.parametrize(
    "cls, wire",
    [
        (Status, {"pid": "12"}),
        (Status, {"lease": []}),
        (Status, {"dirty_files": True}),
        (SyncReceipt, {"conflicts": [1]}),
        (protocol.Ping, {"pid": 1, "version": "1"}),  # no protocol
        (FlushStatistics, {"dirty_files": 1, "new_counter": 2}),  # would vanish from status
    ],
)
def test_a_malformed_payload_is_a_protocol_error(cls: type, wire: dict[str, Any]) -> None:
    with pytest.raises(errors.ProtocolError):
        protocol.from_wire(cls, wire)
