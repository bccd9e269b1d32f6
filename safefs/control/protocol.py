"""Messages of the control socket: versioned, newline-delimited JSON, one request per connection.

Wire format (each message one line of UTF-8 JSON ending in b"\\n"):
- request:  {"v": 1, "op": "<op>", "args": {...}}
- progress: {"v": 1, "progress": {...}}            zero or more, only before the final reply
- result:   {"v": 1, "ok": true, "result": {...}}
- error:    {"v": 1, "ok": false, "error": {"type", "message", "hint", "exit_code", "errno"}}

Progress payloads are free-form dicts; the CLI's progress bar understands `phase` (str),
`bytes_done`, `bytes_total`, `files_done`, `files_total` (ints, totals may be absent); a
call that waits sends `waiting_for` and `detail` (str) each second, which the CLI prints.
Results are dicts too; `ping` (answered by the server itself) gives `pid`, `version`,
`protocol`; the CLI's sync receipt reads `epoch`, `generation`, `files_written`,
`bytes_written`; `status` keys are listed in the shared contract, plus `orphans` (every
host's orphan markers in the project, safefs/orphans.py; null if they could not be read),
`orphans_error` and `orphans_skipped`.

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
