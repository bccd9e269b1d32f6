"""`safefs recover --cache-dir DIR SRC [--write]`: a cache dir whose mount is gone.

When a host's mount is gone (its daemon crashed, the mount was torn down) but its cache dir
remains, the changes the project lacks are in that cache dir's journal. This command starts a
private daemon on DIR at a temporary mountpoint and asks it over its control socket: as a
follower that never takes the lease by itself, it says what the cache holds unwritten (files,
bytes, pending ops); with --write it takes a fresh lease, writes everything back under the
usual conflict rules (the project's version keeps its name, ours goes beside it) and gives the
lease back, exactly as `safefs recover MNT` does for a mount that still runs.

Exit codes: 0 when nothing is left unwritten, UNWRITTEN (11) when changes remain in the cache
(after a listing, or a write-back that could not finish), the usual codes otherwise (the lease
held by a live host, the cache dir in use by a running mount, a bad cache dir, NFS failing).

Invariants:
- The private daemon is always stopped (unmounted; its final write-back as a follower writes
  nothing) and waited for, and the temporary mountpoint removed, whatever failed.
- A listing writes nothing to the project's tree and nothing to the cache's contents; like
  any mount holding changes it may not write, the private daemon leaves (or refreshes) the
  cache's orphan marker in `SRC/.safefs/orphans`, so every host's `safefs status` shows it.
  Without --host-id it takes the host id from the marker this machine left for DIR, so that
  the marker is the daemon's own and goes once everything is written back.
- CLI layer: imports none of trio, pyfuse3, lmdb (the daemon is a separate process).
Single-threaded; blocking calls are fine here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import tempfile
from pathlib import Path

from safefs import checks, cli, human
from safefs.cli_launcher import ProcessWatch, fusermount_unmount, spawn_daemon
from safefs.config import MountConfig
from safefs.control import protocol
from safefs.control.protocol import RecoverReceipt, Status
from safefs.errors import ExitCode, Refused, SafefsError
from safefs.lease.store import local_identity
from safefs.orphans import OrphanStore

EXIT_WAIT = 3.0  # the private daemon exits by itself this soon after its unmount, normally
STOP_TIMEOUT = 60.0  # then after SIGTERM (its last orphan marker update may take a few seconds)


class UsageError(SafefsError):
    exit_code = ExitCode.USAGE


def run(args: argparse.Namespace) -> int:
    """`safefs recover --cache-dir DIR SRC [--write] [--host-id NAME] [--timeout S]`."""
    if args.cache_dir is None:
        raise UsageError("--write and --host-id go with --cache-dir DIR SRC",
                         hint="without a mount: safefs recover --cache-dir DIR SRC [--write]")  # fmt: skip
    if args.mnt is None:
        raise UsageError("--cache-dir DIR needs SRC, the project the cache belongs to",
                         hint="safefs recover --cache-dir DIR SRC [--write]")  # fmt: skip
    src = Path(os.path.realpath(args.mnt))
    cache_dir = Path(os.path.realpath(args.cache_dir))
    if not (cache_dir / "journal").is_dir():
        raise Refused(
            f"{cache_dir} is not a safefs cache dir (it has no journal)",
            hint="give the --cache-dir the lost mount used (`safefs status` names it in the orphan line)",
        )
    command = f"safefs recover --cache-dir {shlex.quote(str(cache_dir))} {shlex.quote(str(src))}"
    host_id = args.host_id or _marker_host(src, cache_dir)
    if host_id is not None and args.host_id is None:
        _note(f"host id {host_id}, from the orphan marker of {cache_dir} in the project")
    mnt = Path(tempfile.mkdtemp(prefix="safefs-recover-"))
    try:
        config = MountConfig(src=src, mnt=mnt, cache_dir=cache_dir, host_id=host_id, follower=True)
        checks.check_setup(config)
        _note(f"reading {cache_dir} through a private mount at {mnt}")
        spawn_daemon(config, debug=False, announce=False)
        try:
            if args.write:
                return _write_back(mnt, cache_dir, src, args.timeout, command)
            return _list(cli.call(mnt, "status", timeout=cli.STATUS_TIMEOUT), cache_dir, src, command)
        finally:
            _stop(mnt)
    finally:
        with contextlib.suppress(OSError):
            mnt.rmdir()


def _list(status: Status, cache_dir: Path, src: Path, command: str) -> int:
    if not _unwritten(status):
        print(f"safefs: {cache_dir} holds nothing that {src} lacks")
        return int(ExitCode.OK)
    print(f"safefs: {cache_dir} holds {_describe(status)} that {src} lacks")
    print(f"  write them back with: {command} --write")
    return int(ExitCode.UNWRITTEN)


def _write_back(mnt: Path, cache_dir: Path, src: Path, timeout: float | None, command: str) -> int:
    before = cli.call(mnt, "status", timeout=cli.STATUS_TIMEOUT)
    if not _unwritten(before):
        print(f"safefs: {cache_dir} holds nothing that {src} lacks")
        return int(ExitCode.OK)
    _note(f"writing back {_describe(before)} under a fresh lease")
    try:
        result: RecoverReceipt = cli.call(mnt, "recover", protocol.RecoverArgs(timeout=timeout), timeout=None)
    except SafefsError as exc:
        if exc.exit_code != ExitCode.LEASE_HELD:
            raise
        # The daemon's hint names a mount; this one is private and about to go.
        refusal = type(exc)(
            f"{exc.message}; nothing was written, the changes stay in {cache_dir}",
            hint=f"once that host released the lease (`safefs sync --release` there) or has been "
            f"silent for the lease's break time, run again: {command} --write",
        )
        refusal.exit_code = exc.exit_code
        raise refusal from None
    print(f"safefs: recovered {result.files} changes ({human.human_bytes(result.bytes)}) "
          f"from {cache_dir} into {src} (epoch {result.epoch})")  # fmt: skip
    for conflict in result.conflicts:
        kept = conflict.kept_as
        print(f"  conflict: {conflict.path or conflict.op}" + (f" kept as {kept}" if kept else ""))
    after = cli.call(mnt, "status", timeout=cli.STATUS_TIMEOUT)
    if _unwritten(after):
        print(f"safefs: {_describe(after)} still not in {src}; they stay in {cache_dir}")
        print(f"  try again with: {command} --write")
        return int(ExitCode.UNWRITTEN)
    return int(ExitCode.OK)


def _marker_host(src: Path, cache_dir: Path) -> str | None:
    """The --host-id the lost mount used, read from its orphan marker (this machine, this cache
    dir), so that the private daemon's marker is the same one and goes once all is written."""
    try:
        listing = OrphanStore(src).list()
    except OSError:
        return None  # no marker to match: the default host id will do
    machine_id = local_identity().machine_id
    hosts = {r.host for _, r in listing.records if r.cache_dir == str(cache_dir) and r.machine_id == machine_id}
    return hosts.pop() if len(hosts) == 1 else None


def _unwritten(status: Status) -> bool:
    return bool(status.flush.dirty_files or status.flush.pending_ops)


def _describe(status: Status) -> str:
    flush = status.flush
    files, nbytes, ops = flush.dirty_files or 0, flush.dirty_bytes or 0, flush.pending_ops or 0
    return f"{human.plural(files, 'changed file')} ({human.human_bytes(nbytes)}) and {human.plural(ops, 'pending op')}"


def _stop(mnt: Path) -> None:
    """Unmount the private mount and wait for its daemon to exit.

    The daemon is our child, so its pid cannot be reused before we exit. It ends its session
    when the kernel closes the FUSE connection, which a copy of the mount in another mount
    namespace (made by `unshare` while ours existed) can delay indefinitely: after a short wait
    it is told to stop (SIGTERM: as a follower its final write-back has nothing to write)."""
    try:
        pid = cli.call(mnt, "ping", timeout=cli.STATUS_TIMEOUT).pid
    except SafefsError:
        pid = None
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(ProcessWatch(pid)) if pid is not None else None
        try:
            fusermount_unmount(mnt, lazy=False)
        except SafefsError:
            fusermount_unmount(mnt, lazy=True)  # nobody else should use it; detach anyway
        if daemon is None or daemon.wait_exit(EXIT_WAIT):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon.pid, signal.SIGTERM)
        if not daemon.wait_exit(STOP_TIMEOUT):
            _note(f"the private daemon (pid {pid}) is still finishing; its log is daemon.log in the cache dir")


def _note(text: str) -> None:
    print(f"safefs: {text}", file=sys.stderr)
