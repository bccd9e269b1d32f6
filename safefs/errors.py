"""The one error hierarchy of safefs, and the exit codes the CLI documents.

Invariants:
- Every error that safefs raises on purpose is a `SafefsError`. It carries an `errno`
  (what a FUSE request answers) and an `exit_code` (what the CLI exits with).
- Exit codes are named here and nowhere else; the README's table must be `exit_code_table()`
  to the letter (tests/unit/test_docs.py).
- Pure module: stdlib only, no I/O, safe from any thread.
"""

from __future__ import annotations

import enum
import errno as _errno


class ExitCode(enum.IntEnum):
    """Process exit codes of the `safefs` command. Documented in the README."""

    OK = 0
    ERROR = 1  # an unexpected failure (a bug); the log has the traceback
    USAGE = 2  # bad command line (argparse's own code)
    REFUSED = 3  # an unsafe or impossible set-up was refused (G7)
    NOT_MOUNTED = 4  # no safefs daemon answers for that mountpoint
    BUSY = 5  # the mount is in use (open files) or another daemon owns the cache dir
    SYNC_TIMEOUT = 6  # sync/umount gave up waiting; nothing was lost, data stays dirty in the cache
    LEASE_HELD = 7  # another host holds the write lease
    BACKING_FAILED = 8  # the backing tree (NFS) failed; dirty data is kept in the cache
    DAEMON_FAILED = 9  # the daemon died or never became ready
    SYNC_CONFLICTS = 10  # synced, with conflicts: some versions were kept as conflict copies
    UNWRITTEN = 11  # changes stay in the cache, not written back (safefs recover); see Unwritten


EXIT_CODE_MEANING = {
    ExitCode.OK: "success",
    ExitCode.ERROR: "unexpected error (a bug); see the daemon log",
    ExitCode.USAGE: "bad command line",
    ExitCode.REFUSED: "unsafe or impossible set-up refused (message says which and how to fix it)",
    ExitCode.NOT_MOUNTED: "no safefs daemon serves that mountpoint",
    ExitCode.BUSY: "mount busy (open files) or cache dir used by another daemon",
    ExitCode.SYNC_TIMEOUT: "sync timed out; dirty data stays safe in the cache",
    ExitCode.LEASE_HELD: "another host holds the write lease",
    ExitCode.BACKING_FAILED: "the project (NFS) failed; dirty data stays safe in the cache",
    ExitCode.DAEMON_FAILED: "the daemon exited or never became ready",
    ExitCode.SYNC_CONFLICTS: "synced, with conflicts: both versions are kept side by side, one as "
    "NAME.safefs-conflict-HOST-TIME (the receipt lists them)",
    ExitCode.UNWRITTEN: "changes stay in the cache, not in the project (message says where); run `safefs recover`",
}


class SafefsError(Exception):
    """Base of every expected safefs error.

    `errno` is what a filesystem request fails with; `exit_code` what the CLI exits with;
    `hint` an optional second line telling the user what to do.
    """

    errno: int = _errno.EIO
    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        if errno is not None:
            self.errno = errno


class FsError(SafefsError):
    """A POSIX error answered to a filesystem request (ENOENT, EEXIST, ENOTEMPTY...)."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(errno, str(errno)), errno=errno)


class ReadOnly(SafefsError):
    """This mount may not change the project (follower, or the lease was lost)."""

    errno = _errno.EROFS
    exit_code = ExitCode.LEASE_HELD


class LeaseHeldElsewhere(ReadOnly):
    """Another host holds the write lease."""


class LeaseLost(ReadOnly):
    """This host held the lease but could not renew it in time; it stopped writing."""


class Refused(SafefsError):
    """An unsafe or impossible set-up (G7). The message names the problem, the hint the fix."""

    errno = _errno.EINVAL
    exit_code = ExitCode.REFUSED


class CacheBusy(SafefsError):
    """Another daemon already uses this cache dir."""

    errno = _errno.EBUSY
    exit_code = ExitCode.BUSY


class NotMounted(SafefsError):
    exit_code = ExitCode.NOT_MOUNTED


class Busy(SafefsError):
    errno = _errno.EBUSY
    exit_code = ExitCode.BUSY


class SyncTimeout(SafefsError):
    errno = _errno.ETIMEDOUT
    exit_code = ExitCode.SYNC_TIMEOUT


class BackingFailed(SafefsError):
    """The backing tree (NFS) failed or did not answer in time."""

    errno = _errno.EIO
    exit_code = ExitCode.BACKING_FAILED


class Unwritten(SafefsError):
    """This mount holds changes it cannot write back (its lease was lost, or it followed over a
    crashed writer's cache): they stay in its cache dir for `safefs recover`."""

    errno = _errno.EROFS
    exit_code = ExitCode.UNWRITTEN


class DaemonFailed(SafefsError):
    exit_code = ExitCode.DAEMON_FAILED


class CacheFull(SafefsError):
    """The cache disk has no room for more dirty data."""

    errno = _errno.ENOSPC


class ProtocolError(SafefsError):
    """A malformed message on the control socket."""


def exit_code_table() -> str:
    """The Markdown table of exit codes the README shows."""
    rows = ["| code | meaning |", "|---|---|"]
    rows += [f"| {code.value} | {EXIT_CODE_MEANING[code]} |" for code in ExitCode]
    return "\n".join(rows)


def describe_exception(exc: BaseException) -> str:
    """An unexpected exception as words ("RuntimeError: fuse_session_mount failed"), groups flattened."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(describe_exception(inner) for inner in exc.exceptions))
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
