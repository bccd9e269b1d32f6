"""Messages of the control socket: versioned, newline-delimited JSON, one request per connection.

Wire format (each message one line of UTF-8 JSON ending in b"\\n"):
- request:  {"v": 1, "op": "<op>", "args": {...}}
- progress: {"v": 1, "progress": {...}}            zero or more, only before the final reply
- result:   {"v": 1, "ok": true, "result": {...}}
- error:    {"v": 1, "ok": false, "error": {"type", "message", "hint", "exit_code", "errno"}}

Payloads are typed: each op's result is a frozen dataclass below (OP_RESULTS: `Ping`,
`Status`, `SyncReceipt`, `AcquireReceipt`, `UnmountReceipt`, `RecoverReceipt`), progress is a
`ProgressReport`, and `Status` is built from statistics objects (`FlushStatistics`,
`LeaseStatistics`, `OrphanListing`, ...). `to_wire` and `from_wire` (safefs.control.wire,
re-exported here) map them to and from JSON objects by the fields' names and OMIT_NONE/FLAT
metadata, and are the only code that spells the keys; the daemon returns the dataclasses, the
server encodes them, the client decodes them and the CLI reads their attributes. The keys
are a public interface (`safefs status --json`, `sync --json`).

Invariants:
- Every decode either returns a well-formed message or raises `ProtocolError`; nothing else.
- An error crosses the socket as its class *name*; the client rebuilds the same
  `safefs.errors` class (or plain `SafefsError` for a name it does not know) with the
  sender's message, hint, errno and exit code. Rebuilding calls `SafefsError.__init__`,
  not the subclass's, so error classes must keep all their state in those four fields.
- Pure module: stdlib only, no I/O, safe from any thread.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import json
from typing import Any

from safefs import errors
from safefs.control.wire import FLAT, OMIT_NONE
from safefs.control.wire import from_wire as from_wire  # re-exported: protocol.from_wire
from safefs.control.wire import to_wire as to_wire  # re-exported: protocol.to_wire
from safefs.errors import ExitCode, ProtocolError, SafefsError

PROTOCOL_VERSION = 1
# A request or reply line longer than this is refused; status with thousands of errors fits.
MAX_LINE_BYTES = 16 << 20

OPS = ("ping", "status", "sync", "acquire", "prepare_unmount", "recover")


# ---- typed arguments of each op ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NoArgs:
    pass


@dataclasses.dataclass(frozen=True)
class SyncArgs:
    release: bool = False  # give up the lease after the flush; the mount stays up as follower
    timeout: float | None = None  # seconds; None waits for as long as it takes


@dataclasses.dataclass(frozen=True)
class AcquireArgs:
    wait: bool = False  # wait for a held lease to become free instead of failing
    timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class PrepareUnmountArgs:
    timeout: float | None = None
    lazy: bool = False  # detach now even if files are open (fusermount3 -z)


@dataclasses.dataclass(frozen=True)
class RecoverArgs:
    timeout: float | None = None


OP_ARGS: dict[str, type] = {
    "ping": NoArgs,
    "status": NoArgs,
    "sync": SyncArgs,
    "acquire": AcquireArgs,
    "prepare_unmount": PrepareUnmountArgs,
    "recover": RecoverArgs,
}

OpArgs = NoArgs | SyncArgs | AcquireArgs | PrepareUnmountArgs | RecoverArgs


def parse_args(op: str, args: dict[str, Any]) -> OpArgs:
    """The typed arguments of `op`, checked. Unknown keys are ignored (a newer client may send more)."""
    if op not in OP_ARGS:
        raise ProtocolError(f"unknown control operation {op!r}", hint=_VERSION_HINT)
    cls = OP_ARGS[op]
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in args:
            continue
        value = args[field.name]
        if field.name == "timeout":
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            ):
                raise ProtocolError(f"{op}: timeout must be a non-negative number or null, not {value!r}")
            values[field.name] = None if value is None else float(value)
        elif not isinstance(value, bool):
            raise ProtocolError(f"{op}: {field.name} must be true or false, not {value!r}")
        else:
            values[field.name] = value
    return cls(**values)


# ---- messages ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    op: str
    args: dict[str, Any] = dataclasses.field(default_factory=dict)

    def typed_args(self) -> OpArgs:
        return parse_args(self.op, self.args)

    def to_wire(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "op": self.op, "args": self.args}


@dataclasses.dataclass(frozen=True)
class Progress:
    data: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "progress": self.data}


@dataclasses.dataclass(frozen=True)
class Result:
    result: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, "ok": True, "result": self.result}


@dataclasses.dataclass(frozen=True)
class ErrorReply:
    type: str  # the class name in safefs.errors
    message: str
    hint: str | None = None
    exit_code: int = ExitCode.ERROR
    errno: int | None = None

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorReply:
        """The reply for `exc`. Anything that is not a SafefsError is a bug and says so."""
        if isinstance(exc, SafefsError):
            return cls(
                type=type(exc).__name__,
                message=exc.message,
                hint=exc.hint,
                exit_code=int(exc.exit_code),
                errno=exc.errno,
            )
        return cls(
            type="SafefsError",
            message=f"internal error in the daemon: {type(exc).__name__}: {exc}",
            hint="this is a bug; the daemon log has the traceback",
            exit_code=int(ExitCode.ERROR),
            errno=_errno.EIO,
        )

    def to_exception(self) -> SafefsError:
        """The `safefs.errors` exception this reply stands for."""
        cls = _error_classes().get(self.type, SafefsError)
        exc = cls.__new__(cls)
        SafefsError.__init__(exc, self.message, hint=self.hint, errno=self.errno)
        try:
            exc.exit_code = ExitCode(self.exit_code)
        except ValueError:
            exc.exit_code = ExitCode.ERROR
        return exc

    def to_wire(self) -> dict[str, Any]:
        error = {
            "type": self.type,
            "message": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
            "errno": self.errno,
        }
        return {"v": PROTOCOL_VERSION, "ok": False, "error": error}


Reply = Progress | Result | ErrorReply
Message = Request | Progress | Result | ErrorReply

_VERSION_HINT = "the daemon and the safefs command may be different versions; unmount and mount again"


def _error_classes() -> dict[str, type[SafefsError]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, SafefsError)
    }


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """The `error` object of a reply for `exc`."""
    return ErrorReply.from_exception(exc).to_wire()["error"]


def error_from_wire(error: Any) -> SafefsError:
    """The exception an `error` object (as in a reply or the daemon's ready line) stands for."""
    return _error_reply(error).to_exception()


# ---- encoding -------------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """One line of JSON. Raises TypeError/ValueError if a payload is not JSON-serialisable."""
    return json.dumps(message.to_wire(), separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _load(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"control message too long ({len(line)} bytes)")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed control message: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed control message: not a JSON object")
    if obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"control protocol version {obj.get('v')!r} is not supported (this side speaks {PROTOCOL_VERSION})",
            hint=_VERSION_HINT,
        )
    return obj


def decode_request(line: bytes) -> Request:
    obj = _load(line)
    op, args = obj.get("op"), obj.get("args", {})
    if not isinstance(op, str):
        raise ProtocolError("malformed control request: no op")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError("malformed control request: args is not an object")
    return Request(op, args)


def decode_reply(line: bytes) -> Reply:
    obj = _load(line)
    if "progress" in obj:
        if not isinstance(obj["progress"], dict):
            raise ProtocolError("malformed progress message")
        return Progress(obj["progress"])
    if obj.get("ok") is True:
        result = obj.get("result", {})
        if not isinstance(result, dict):
            raise ProtocolError("malformed control reply: result is not an object")
        return Result(result)
    if obj.get("ok") is False:
        return _error_reply(obj.get("error"))
    raise ProtocolError("malformed control reply: neither progress, result nor error")


def _error_reply(error: Any) -> ErrorReply:
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        raise ProtocolError("malformed error reply")
    hint, code, err = error.get("hint"), error.get("exit_code"), error.get("errno")
    return ErrorReply(
        type=str(error.get("type") or "SafefsError"),
        message=error["message"],
        hint=hint if isinstance(hint, str) else None,
        exit_code=code if isinstance(code, int) and not isinstance(code, bool) else int(ExitCode.ERROR),
        errno=err if isinstance(err, int) and not isinstance(err, bool) else None,
    )


# ---- typed payloads: results, progress and statistics ---------------------------------------


def _extra() -> Any:
    return dataclasses.field(default_factory=dict, metadata=FLAT)


@dataclasses.dataclass(frozen=True)
class Ping:
    """`ping`, answered by the server itself: who serves this socket."""

    pid: int
    version: str
    protocol: int
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class Ready:
    """The daemon's one-line ready message to `safefs mount` (on --ready-fd, not the socket):
    the role it mounted with and the lease holder, or the error that stopped it."""

    ok: bool
    pid: int | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    role: str | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    holder: Holder | None = None
    error: dict[str, Any] | None = dataclasses.field(default=None, metadata=OMIT_NONE)  # as error_to_wire
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class ProgressReport:
    """What a long operation is doing, sent about once a second. Only the fields set are sent."""

    phase: str | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    waiting_for: str | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    detail: str | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    until: float | None = dataclasses.field(default=None, metadata=OMIT_NONE)  # wall time
    files_done: int | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    files_total: int | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    bytes_done: int | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    bytes_total: int | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class Conflict:
    """A conflict the write-back ran into: which name, why, where the other version went.
    Which fields are set depends on the kind (a name kept side by side, an op that cannot apply)."""

    path: str | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    op: str | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    kept_as: str | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    copy_holds: str | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    why: str | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    error: str | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    time: str | float | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class WriteBackError:
    """The project failed (or hangs) on an op of the write-back; it is retried at `retry_at`."""

    op: str | None = None
    path: str | None = None
    error: str | None = None
    retry_at: float | None = None  # wall time
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class FlushStatistics:
    """The flusher's counters (merged into `status`; from_wire refuses a key it has no field for)."""

    dirty_bytes: int | None = None
    dirty_files: int | None = None
    oldest_dirty_age: float | None = None
    pending_ops: int | None = None
    flushes: int | None = None
    flushing: bool | None = None
    errors: list[WriteBackError] | None = None
    conflicts: list[Conflict] | None = None


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds the write lease, as its lease record says."""

    host: str | None = None
    pid: int | None = None
    user: str | None = None
    since: float | str | None = None  # wall time
    heartbeat_age: float | None = None
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class EtcdStatistics:
    """The etcd lease backend, when the project uses it (merged into `lease`)."""

    endpoints: list[str] | None = None
    prefix: str | None = None
    ttl: float | None = None
    expires_in: float | None = None
    revision: int | None = None
    etcd_requests: int | None = None


@dataclasses.dataclass(frozen=True)
class LeaseStatistics:
    """The lease keeper's view (`status`'s `lease`), with the generation and the backend."""

    role: str | None = None
    state: str | None = None
    epoch: int | None = None
    writable: bool | None = None
    publishable: bool | None = None
    publishing_from: float | None = None  # wall time the lock delay ends, while it runs
    holder: Holder | None = None
    deadline: float | None = None
    lock_delay: float | None = None
    lost_reason: str | None = None
    last_error: str | None = None
    generation: int | None = None
    backend: str | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    etcd: EtcdStatistics | None = dataclasses.field(default=None, metadata=FLAT)
    project_polls: int | None = None
    generation_seen_at: float | None = None
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class LogWarning:
    """A recent WARNING or ERROR of the daemon's log, repeats counted (safefs.logs)."""

    level: str | None = None
    message: str | None = None
    time: float | None = None  # wall time of the last one
    count: int | None = None
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class Orphan:
    """A host's orphan marker in the project (safefs/orphans.py): changes a cache holds unwritten."""

    name: str | None = None
    host: str | None = None
    machine_id: str | None = None
    cache_dir: str | None = None
    pid: int | None = None
    user: str | None = None
    epoch: int | None = None
    pending_ops: int | None = None
    dirty_files: int | None = None
    dirty_bytes: int | None = None
    since: float | None = None
    updated: float | None = None
    reason: str | None = None
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class SkippedOrphan:
    name: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class OrphanListing:
    """Every host's orphan markers (merged into `status`); `orphans` is None if they could not be read."""

    orphans: list[Orphan] | None = None
    orphans_error: str | None = None
    orphans_skipped: list[SkippedOrphan] | None = None


@dataclasses.dataclass(frozen=True)
class Status:
    """`status`: one mount's state and counters."""

    src: str | None = None
    mnt: str | None = None
    cache_dir: str | None = None
    pid: int | None = None
    host: str | None = None
    role: str | None = None
    state: str | None = None  # mounted -> unmounted (final write-back) -> exiting
    flush: FlushStatistics = dataclasses.field(default_factory=FlushStatistics, metadata=FLAT)
    bytes_fetched: int | None = None
    bytes_written: int | None = None
    cache_bytes: int | None = None
    cache_limit: int | None = None
    cache_hits: int | None = None
    fetches: int | None = None
    evictions: int | None = None
    inodes: int | None = None
    internal_errors: int | None = None
    kernel_writeback_cache: bool | None = None
    writeback_delay: float | None = None
    lease: LeaseStatistics | None = None
    warnings: list[LogWarning] | None = None
    orphan_listing: OrphanListing = dataclasses.field(default_factory=OrphanListing, metadata=FLAT)
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class FinalWriteBack:
    """What an unmounted mount's final write-back left: everything written, or how much stays
    in which cache and why."""

    src: str | None = None
    cache_dir: str | None = None
    pid: int | None = None
    state: str | None = None
    unmounted: bool | None = None
    unwritten: int | None = None  # files + pending ops
    unwritten_files: int | None = None
    unwritten_ops: int | None = None
    unwritten_bytes: int | None = None
    unwritten_reason: str | None = None


@dataclasses.dataclass(frozen=True)
class UnmountReceipt:
    """`prepare_unmount`: the role at the end and what the final write-back left."""

    role: str | None = None
    final: FinalWriteBack = dataclasses.field(default_factory=FinalWriteBack, metadata=FLAT)
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class SyncReceipt:
    """`sync`: what was written back and which generation it published. On an unmounted mount
    (sync waits for the final write-back) `final` says what that left."""

    role: str | None = None
    epoch: int | None = None
    generation: int | None = None
    files: int = 0
    bytes: int = 0
    ops: int = 0
    released: bool = False
    conflicts: list[Conflict] | None = dataclasses.field(default=None, metadata=OMIT_NONE)  # since the last sync
    final: FinalWriteBack | None = dataclasses.field(default=None, metadata=FLAT)
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class AcquireReceipt:
    role: str | None = None
    epoch: int | None = None
    extra: dict[str, Any] = _extra()


@dataclasses.dataclass(frozen=True)
class RecoverReceipt:
    """`recover`: the changes written back (counted before), conflicts, and whether the lease
    taken for it was given back."""

    files: int = 0
    bytes: int = 0
    epoch: int | None = None
    generation: int | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    conflicts: list[Conflict] = dataclasses.field(default_factory=list)
    released: bool | None = dataclasses.field(default=None, metadata=OMIT_NONE)
    extra: dict[str, Any] = _extra()


# The result type of each op: what the handler returns, the server sends and the client gets.
OP_RESULTS: dict[str, type] = {
    "ping": Ping,
    "status": Status,
    "sync": SyncReceipt,
    "acquire": AcquireReceipt,
    "prepare_unmount": UnmountReceipt,
    "recover": RecoverReceipt,
}
