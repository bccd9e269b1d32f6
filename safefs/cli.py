"""The `safefs` command: init, mount, umount, sync, status, acquire, recover, config, history.

Every command but `mount --foreground` talks to a running daemon over its control socket
(safefs.control.client); `mount` spawns the daemon as `python -m safefs mount ...
--foreground --ready-fd N` in a new session and waits for its one-line JSON ready message.
This module holds main, the command table (build_parser) and the commands; beside it:
cli_options (value parsers, the mount options made from options.MOUNT_OPTIONS),
cli_launcher (spawning, stopping and unmounting the daemon) and cli_render (everything
printed: status, receipts, progress).

Invariants:
- This module imports none of trio, pyfuse3 or lmdb, not even indirectly, so `safefs status`
  starts fast and answers even if those are broken. Only `mount --foreground` imports
  safefs.daemon, inside the function that runs it.
- An expected failure prints `safefs: error: <message>` and, when there is one, `  hint: <hint>`
  on stderr, and exits with the error's ExitCode; Ctrl-C exits 130 without a traceback.
- Results go to stdout, errors and progress to stderr; progress only on a terminal.
Single-threaded; blocking calls are fine here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from safefs import __version__, checks, history, options, settings
from safefs.cli_launcher import ProcessWatch, busy_error, fusermount_unmount, spawn_daemon, write_ready
from safefs.cli_options import add_mount_options, mount_config, parse_seconds, setting_defaults
from safefs.cli_render import (
    ProgressBar,
    Unanswered,
    WaitReport,
    describe_conflict,
    describe_orphan,
    format_status,
    human_time,
    report_to,
    sync_receipt,
    unwritten_error,
)
from safefs.config import LeaseTimings, runtime_dir, socket_path
from safefs.control import client, protocol
from safefs.control.protocol import (
    AcquireReceipt,
    Ping,
    ProgressReport,
    RecoverReceipt,
    Status,
    SyncReceipt,
    UnmountReceipt,
    error_to_wire,
)
from safefs.errors import (
    EXIT_CODE_MEANING,
    BackingFailed,
    Busy,
    ExitCode,
    LeaseHeldElsewhere,
    NotMounted,
    Refused,
    SafefsError,
    SyncTimeout,
)
from safefs.human import human_bytes, plural

INTERRUPTED = 130  # the shell's code for "killed by SIGINT"
STATUS_TIMEOUT = 10.0  # ping and status answer from memory; longer means the daemon is stuck
CALL_GRACE = 15.0  # the daemon enforces an op's timeout; the client waits this much longer


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = options.translate(sys.argv[1:] if argv is None else argv, COMMANDS)
    except options.OptionError as exc:
        print(f"safefs: error: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors (code 2, ExitCode.USAGE)
        return exc.code if isinstance(exc.code, int) else int(ExitCode.USAGE)
    try:
        return int(args.command(args))
    except SafefsError as exc:
        print_error(exc)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("safefs: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # Whoever read our output went away (`safefs status | head -1`): nobody left to tell.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return int(ExitCode.ERROR)


def print_error(exc: SafefsError, stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    print(f"safefs: error: {exc.message}", file=stream)
    if exc.hint:
        print(f"  hint: {exc.hint}", file=stream)


# ---- command line ------------------------------------------------------------------------------


# The subcommands (test_cli checks): anything else first is the mount(8) form `safefs SRC MNT -o ...`.
COMMANDS = ("init", "mount", "umount", "sync", "status", "acquire", "recover", "config", "history")


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {int(code)}  {meaning}" for code, meaning in EXIT_CODE_MEANING.items())
    parser = argparse.ArgumentParser(
        prog="safefs",
        description="Mount an NFS project through a host-local write-back cache, one writer at a time.",
        epilog=f"exit codes:\n{codes}\n  {INTERRUPTED}  interrupted (Ctrl-C)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"safefs {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init",
        help="choose the project's lease backend",
        description="Write SRC/.safefs/config.toml: which lease backend every mount of the project uses. "
        "Refused while any mount holds the lease.",
    )
    init.set_defaults(command=cmd_init)
    init.add_argument("src", metavar="SRC", help="the project directory (on NFS)")
    init.add_argument(
        "--lease-backend", choices=("dir", "etcd"), default="dir",
        help="dir: files in SRC/.safefs/lease (default); etcd: an etcd cluster",
    )  # fmt: skip
    init.add_argument("--etcd-endpoints", metavar="URL[,URL...]", help="etcd client URLs, e.g. http://etcd1:2379")
    init.add_argument(
        "--etcd-prefix", metavar="P", help="key prefix of this project in etcd (default: kept, or a new random one)"
    )

    mount = commands.add_parser(
        "mount",
        help="mount a project",
        description="Mount the project SRC at MNT. Defaults come from /etc/safefs/config.toml and "
        "~/.config/safefs/config.toml ([mount] table; `safefs config` shows them); options given "
        "here win. mount(8) form: `safefs SRC MNT -o cache_dir=DIR,writeback_delay=5,allow_other`: "
        "every long option has an -o spelling with underscores; `ro` mounts as a follower; "
        "defaults, rw, _netdev, nofail, noauto, user and x-* are ignored (fstab type: fuse.safefs).",
    )
    mount.set_defaults(command=cmd_mount)
    mount.add_argument("src", metavar="SRC", help="the project directory (on NFS)")
    mount.add_argument("mnt", metavar="MNT", help="an empty directory to mount it on")
    add_mount_options(mount)

    umount = commands.add_parser(
        "umount",
        help="write everything back and unmount",
        description="Write everything back, unmount MNT, release the lease and wait for the daemon to exit. "
        "A busy mount (open files) is refused and nothing changes; changes that cannot be written back "
        "are reported with where they stay (exit 11).",
    )
    umount.set_defaults(command=cmd_umount)
    umount.add_argument("mnt", metavar="MNT")
    umount.add_argument(
        "--lazy", action="store_true", help="detach now even if files are open (fusermount3 -z)"
    )
    umount.add_argument(
        "--timeout", type=parse_seconds, metavar="S", help="give up after this long (default: no limit)"
    )

    sync = commands.add_parser(
        "sync",
        help="write everything back to the project",
        description="Return once everything written to MNT so far is on the project. Conflict copies made "
        "since the last sync are listed, and the exit code is then 10.",
    )
    sync.set_defaults(command=cmd_sync)
    sync.add_argument("mnt", metavar="MNT")
    sync.add_argument(
        "--release", action="store_true", help="then give up the write lease (the mount stays, read-only)"
    )
    sync.add_argument(
        "--timeout", type=parse_seconds, metavar="S", help="give up after this long (default: no limit)"
    )
    sync.add_argument("--json", action="store_true", help="print the receipt as JSON")

    status = commands.add_parser(
        "status",
        help="show a mount, or all mounts",
        description="Show the state of the mount at MNT, or of every mount of yours.",
    )
    status.set_defaults(command=cmd_status)
    status.add_argument("mnt", metavar="MNT", nargs="?")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument(
        "--prometheus",
        action="store_true",
        help="print the counters in the Prometheus text format (for node_exporter's textfile collector)",
    )

    acquire = commands.add_parser(
        "acquire", help="make a follower the writer",
        description="Take the write lease for the mount at MNT. A live holder is refused (exit 7); a holder "
        "whose heartbeat stopped is taken over, and that is waited for (T_break, then the lock delay).",
    )  # fmt: skip
    acquire.set_defaults(command=cmd_acquire)
    acquire.add_argument("mnt", metavar="MNT")
    acquire.add_argument("--wait", action="store_true", help="wait until the lease is free")
    acquire.add_argument("--timeout", type=parse_seconds, metavar="S", help="give up after this long")

    recover = commands.add_parser(
        "recover",
        help="write back changes a mount holds that the project lacks (after a lost lease)",
        description="Write back the changes the mount at MNT holds that its project lacks (after a lost "
        "lease or a crash), under a fresh lease; a file changed in the project meanwhile keeps "
        "its name and ours goes beside it as a conflict copy. Without MNT, list the mounts that "
        "hold such changes. With --cache-dir DIR SRC, do it for a cache dir whose mount is gone: "
        "list what DIR holds that the project SRC lacks (exit 11 if anything), or write it back "
        "with --write.",
    )
    recover.set_defaults(command=cmd_recover)
    recover.add_argument(
        "mnt", nargs="?", metavar="MNT|SRC",
        help="the mount (without it, list mounts that hold such changes); with --cache-dir, the project",
    )  # fmt: skip
    recover.add_argument("--cache-dir", metavar="DIR", help="the cache dir of a mount that is gone")
    recover.add_argument(
        "--write", action="store_true", help="with --cache-dir: write the changes back (default: list them)"
    )
    recover.add_argument(
        "--host-id", metavar="NAME",
        help="with --cache-dir: the --host-id the gone mount used (default: from its orphan marker, else hostname)",
    )  # fmt: skip
    recover.add_argument("--timeout", type=parse_seconds, metavar="S", help="give up the write-back after this long")

    config = commands.add_parser(
        "config",
        help="show the settings `safefs mount` would use, and where each comes from",
        description="Show the effective defaults of `safefs mount` and where each comes from: "
        "/etc/safefs/config.toml, then $XDG_CONFIG_HOME/safefs/config.toml (~/.config if unset), "
        "[mount] table, keys named like the long options with underscores; the command line wins.",
    )
    config.set_defaults(command=cmd_config)
    config.add_argument("--json", action="store_true", help="print JSON")

    history_cmd = commands.add_parser(
        "history",
        help="who held the write lease of a project, from where, and when it changed hands",
        description="Print the project's lease history (acquire, release, takeover, self-fence, "
        "recover, conflicts) from every host, oldest first. Read from PROJECT/.safefs/history/, "
        "so it works without a mount, from any host that can read the project.",
    )
    history_cmd.set_defaults(command=cmd_history)
    history_cmd.add_argument("path", metavar="MNT|SRC", help="a safefs mount, or the project directory")
    history_cmd.add_argument("--json", action="store_true", help="print JSON lines, one record each")
    return parser


# ---- init -----------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    """Fix the project's lease backend, only while the lease is free under the old and the new one."""
    from safefs import projectconf  # reads TOML; the etcd client loads httpx, needed only here

    src = Path(os.path.realpath(args.src))
    if not src.is_dir():
        raise Refused(f"{src} is not a directory", hint="give the project directory")
    old = projectconf.read(src)
    prefix = args.etcd_prefix
    if prefix is None and args.lease_backend == "etcd" and old.lease_backend == "etcd":
        prefix = old.etcd_prefix  # same project, same keys
    new = projectconf.make(args.lease_backend, args.etcd_endpoints, prefix)
    for conf in (old, new) if new != old else (old,):
        _refuse_if_held(src, conf)
    if new != old:
        projectconf.write(src, new)
        # A mount that read the old config just before we wrote it may have claimed meanwhile;
        # mounts check the config again after a claim, so one of us sees the other.
        try:
            _refuse_if_held(src, old)
        except SafefsError:
            projectconf.write(src, old)
            raise
    print(f"safefs: {src} uses {new.describe()}")
    return int(ExitCode.OK)


def _refuse_if_held(src: Path, conf: Any) -> None:
    from safefs.lease import backends

    store = backends.open_store(src, conf, LeaseTimings().t_break)
    try:
        obs = store.observe()
    except (OSError, SafefsError) as exc:
        raise BackingFailed(
            f"cannot read the lease in {conf.describe()}: {exc}",
            hint="the lease backend must answer to prove nobody holds the lease",
        ) from exc
    finally:
        if store.etcd is not None:
            store.etcd.client.close()
    if not obs.free:
        holder = obs.record.holder.describe() if obs.record is not None else "another mount"
        raise LeaseHeldElsewhere(
            f"the lease of {src} in {conf.describe()} is held by {holder} (epoch {obs.epoch}); "
            "the backend can change only while nobody holds it",
            hint="run `safefs sync --release MNT` or `safefs umount MNT` on that host first",
        )


# ---- mount ----------------------------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    config = mount_config(args)
    if not args.foreground:
        checks.check_setup(config)  # refuse early and clearly, before spawning anything
        return spawn_daemon(config, debug=args.debug)
    try:
        checks.check_setup(config)
    except SafefsError as exc:
        if args.ready_fd is not None:
            write_ready(args.ready_fd, protocol.Ready(ok=False, error=error_to_wire(exc)))
        raise
    from safefs import daemon  # only here: the daemon imports trio, pyfuse3 and lmdb

    return int(daemon.run(config, ready_fd=args.ready_fd, debug=args.debug))


def cmd_config(args: argparse.Namespace) -> int:
    files = settings.config_files(os.environ)
    loaded = settings.load(os.environ)
    defaults = setting_defaults()
    rows = {}
    for key in settings.KEYS:
        if key in loaded:
            rows[key] = {"value": loaded[key].value, "source": loaded[key].source}
        else:
            rows[key] = {"value": defaults.get(key), "source": "default"}
    if args.json:
        listing = [{"path": os.fspath(f), "exists": f.exists()} for f in files]
        print(json.dumps({"files": listing, "settings": rows}, indent=2))
        return int(ExitCode.OK)
    print("safefs: settings of `safefs mount` (options given to it win); files read, in order:")
    for file in files:
        print(f"  {file}" + ("" if file.exists() else " (none)"))
    width = max(map(len, rows))
    for key, row in rows.items():
        value = row["value"]
        if key == "cache_size" and isinstance(value, int):
            value = human_bytes(value)
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, float):
            value = f"{value:g} s"
        print(f"{key:<{width}}  {value}  ({row['source']})")
    return int(ExitCode.OK)


# ---- commands that talk to a daemon ------------------------------------------------------------


def cmd_umount(args: argparse.Namespace) -> int:
    mnt = checks.resolve_mountpoint(args.mnt)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    ping_timeout = STATUS_TIMEOUT if deadline is None else min(STATUS_TIMEOUT, args.timeout)
    ping: Ping = call(mnt, "ping", timeout=ping_timeout)
    pid = ping.pid
    waits = WaitReport()
    # Watch the daemon from before the unmount, so a recycled pid can never be mistaken for it.
    with ProcessWatch(pid) as daemon:
        try:
            with ProgressBar("writing back") as bar:
                # The daemon writes back, unmounts (refused if busy, before it releases
                # anything), waits for its final write-back and says what that left.
                result: UnmountReceipt = call(
                    mnt,
                    "prepare_unmount",
                    protocol.PrepareUnmountArgs(timeout=_remaining(deadline), lazy=args.lazy),
                    timeout=_client_timeout(deadline),
                    on_progress=report_to(bar, waits),
                )
        except Busy:
            raise busy_error(mnt) from None
        except (SyncTimeout, BackingFailed) as exc:
            if exc.message.startswith(f"{mnt} is unmounted"):
                raise  # the unmount happened; the daemon's words are the right ones
            # The sync's words ("run safefs sync again") would be wrong here.
            if isinstance(exc, SyncTimeout):
                within = "in time" if args.timeout is None else f"within {args.timeout:g} s"
                why = f"the write-back did not finish {within}"
            else:
                why = f"the project failed ({exc.message})"
            raise type(exc)(
                f"{mnt} is still mounted: {why}; the dirty data stays safe in the cache",
                hint=f"run `safefs umount {mnt}` again once the project answers; or unmount it "
                f"anyway with `fusermount3 -u {mnt}`: the next mount on this host with the same "
                "cache writes the data back",
            ) from None
        if not result.final.unmounted:
            fusermount_unmount(mnt, lazy=args.lazy)  # a daemon that leaves the unmount to us
        if not waits.wait_exit(daemon, _remaining(deadline), f"the daemon (pid {pid}) to exit"):
            raise SyncTimeout(
                f"{mnt} is unmounted, but its daemon (pid {pid}) is still running after {args.timeout:g} s",
                hint="it is finishing up; its log is daemon.log in the cache dir",
            )
    project = result.final.src or "the project"
    if result.final.unwritten:
        raise unwritten_error(mnt, result)
    print(f"safefs: unmounted {mnt}; everything was written back to {project}")
    return int(ExitCode.OK)


def cmd_sync(args: argparse.Namespace) -> int:
    mnt = checks.resolve_mountpoint(args.mnt)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with ProgressBar("syncing") as bar:
        result: SyncReceipt = call(
            mnt,
            "sync",
            protocol.SyncArgs(release=args.release, timeout=args.timeout),
            timeout=_client_timeout(deadline),
            on_progress=report_to(bar, WaitReport()),
        )
    if args.json:
        print(json.dumps(protocol.to_wire(result), indent=2, sort_keys=True))
    else:
        print(sync_receipt(mnt, result, released=args.release))
    return int(ExitCode.SYNC_CONFLICTS if result.conflicts else ExitCode.OK)


def cmd_acquire(args: argparse.Namespace) -> int:
    mnt = checks.resolve_mountpoint(args.mnt)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    # Without --wait a live holder is refused at once, but a takeover of a dead one (T_break,
    # then the lock delay) is waited for: as long as the daemon reports, each second, on it.
    result: AcquireReceipt = call(
        mnt, "acquire", protocol.AcquireArgs(wait=args.wait, timeout=args.timeout),
        timeout=_client_timeout(deadline), on_progress=WaitReport().update, idle_timeout=STATUS_TIMEOUT + CALL_GRACE,
    )  # fmt: skip
    epoch = f" (epoch {result.epoch})" if result.epoch is not None else ""
    print(f"safefs: {mnt} is the writer now{epoch}")
    return int(ExitCode.OK)


def cmd_recover(args: argparse.Namespace) -> int:
    """Write back a mount's orphaned changes (see Daemon.recover), or list the mounts that have some."""
    if args.cache_dir is not None or args.write or args.host_id is not None:
        from safefs import recover  # a sibling that uses this module's helpers

        return recover.run(args)
    if args.mnt is None:
        statuses: list[Status] = []
        for sock in client.list_daemons(runtime_dir(os.environ, os.getuid())):
            try:
                statuses.append(client.call(sock, "status", timeout=STATUS_TIMEOUT))
            except SafefsError:
                continue
        # A writer writes back by itself; only a mount that may not holds an orphan.
        orphans = [s for s in statuses if (s.flush.dirty_files or s.flush.pending_ops) and s.role != "writer"]
        for status in orphans:
            print(f"{status.mnt}: {status.flush.dirty_files or 0} files, {status.flush.dirty_bytes or 0} B "
                  f"not in the project (role {status.role}); run: safefs recover {status.mnt}")
        if not orphans:
            print("safefs: no mounted cache holds changes the project lacks")
        # Markers of caches that are not mounted here, found in the projects of our mounts.
        local = {(s.host, s.cache_dir) for s in statuses}
        others: dict[tuple[Any, Any], str] = {}
        for status in statuses:
            for orphan in status.orphan_listing.orphans or []:
                key = (orphan.host, orphan.cache_dir)
                if key not in local and key not in others:
                    others[key] = f"{status.src}: {describe_orphan(orphan)}"
        if others:
            print("caches elsewhere hold changes the projects of these mounts lack:")
            print("\n".join(f"  {line}" for line in others.values()))
        return int(ExitCode.OK)
    mnt = checks.resolve_mountpoint(args.mnt)
    result: RecoverReceipt = call(mnt, "recover", protocol.RecoverArgs(timeout=args.timeout), timeout=None)
    print(f"safefs: recovered {plural(result.files, 'change')} ({human_bytes(result.bytes)}) from {mnt}")
    for conflict in result.conflicts:
        print(f"  conflict: {describe_conflict(conflict)}")
    return int(ExitCode.OK)


def project_of(path: str) -> Path:
    """The project directory for `path`: a safefs mount's SRC (asked from its daemon), else `path`."""
    resolved = Path(os.path.realpath(path))
    fstype = checks.mount_type_at(resolved)
    if fstype is not None and fstype.startswith("fuse"):
        status: Status = call(resolved, "status", timeout=STATUS_TIMEOUT)
        return Path(str(status.src))
    if not resolved.is_dir():
        raise NotMounted(f"{resolved} is neither a safefs mount nor a project directory")
    return resolved


def cmd_history(args: argparse.Namespace) -> int:
    project = project_of(args.path)
    try:
        found = history.read(project)
    except OSError as exc:
        raise BackingFailed(f"cannot read the history of {project}: {exc.strerror or exc}") from None
    if args.json:
        for record in found.records:
            print(json.dumps(record, sort_keys=True))
        return int(ExitCode.OK)
    if not found.records:
        print(f"safefs: no history recorded in {project} yet")
    for record in found.records:
        epoch = f"epoch {record['epoch']}" if record.get("epoch") is not None else ""
        who = f"{record.get('user', '?')}@{record.get('host', '?')}"
        detail = f"  {record['detail']}" if record.get("detail") else ""
        print(f"{human_time(record['time'])}  {str(record.get('event', '?')):<10} {epoch:<9} {who}{detail}")
    if found.bad_lines:
        print(f"safefs: {plural(found.bad_lines, 'line')} of {project}/.safefs/history were not records "
              "(skipped)", file=sys.stderr)  # fmt: skip
    return int(ExitCode.OK)


def cmd_status(args: argparse.Namespace) -> int:
    if args.mnt is not None:
        status: Status = call(checks.resolve_mountpoint(args.mnt), "status", timeout=STATUS_TIMEOUT)
        if args.prometheus:
            print(_prometheus([status]), end="")
        else:
            wire = protocol.to_wire(status)
            print(json.dumps(wire, indent=2, sort_keys=True) if args.json else format_status(status))
        return int(ExitCode.OK)

    statuses: list[Status | Unanswered] = []
    code = ExitCode.OK
    for sock in client.list_daemons(runtime_dir(os.environ, os.getuid())):
        try:
            statuses.append(client.call(sock, "status", timeout=STATUS_TIMEOUT))
        except NotMounted:
            continue  # a dead daemon's leftover socket
        except SafefsError as exc:
            if not client.listening(sock):
                continue  # it exited while we asked (an unmount finishing): gone, not failed
            statuses.append(Unanswered(socket=os.fspath(sock), error=exc.message))
            code = ExitCode.DAEMON_FAILED
    if args.prometheus:
        print(_prometheus([s for s in statuses if isinstance(s, Status)]), end="")
    elif args.json:
        print(json.dumps(protocol.to_wire(statuses), indent=2, sort_keys=True))
    elif not statuses:
        print("safefs: no mounts are running")
    else:
        print("\n\n".join(format_status(s) if isinstance(s, Status) else s.format() for s in statuses))
    return int(code)


def _prometheus(statuses: list[Status]) -> str:
    from safefs import metrics  # only here: prometheus-client is needed by this option alone

    return metrics.exposition([protocol.to_wire(status) for status in statuses])


def call(
    mnt: Path,
    op: str,
    args: protocol.OpArgs | None = None,
    *,
    timeout: float | None,
    on_progress: Callable[[ProgressReport], None] | None = None,
    idle_timeout: float | None = None,
) -> Any:
    """`client.call` on the daemon serving `mnt`, saying which mountpoint is not mounted.
    The result is the op's type in protocol.OP_RESULTS."""
    try:
        return client.call(
            socket_path(mnt, os.environ, os.getuid()),
            op,
            args,
            timeout=timeout,
            on_progress=on_progress,
            label=f"for {mnt}",
            idle_timeout=idle_timeout,
        )
    except NotMounted:
        raise not_mounted(mnt) from None


def not_mounted(mnt: Path) -> NotMounted:
    """The error for "no daemon answers for `mnt`", saying what is at `mnt` instead."""
    fstype = checks.mount_type_at(mnt)
    owner = checks.fuse_mount_owner(mnt) if fstype is not None and fstype.startswith("fuse") else None
    if owner is not None and owner != os.getuid():
        # Its daemon's socket is in the owner's runtime dir: only they (or root as them) reach it.
        name = checks.user_name(owner)
        return NotMounted(
            f"{mnt} is {name}'s mount ({fstype}), not yours: its daemon answers only {name}",
            hint=f"ask {name}, or run the command as them (e.g. `sudo -u {name} safefs status {mnt}`)",
        )
    if fstype is not None and fstype.startswith("fuse"):
        # Not stat()ed: if the daemon is alive but unreachable, a stat could hang.
        return NotMounted(
            f"{mnt} is a FUSE mount, but no safefs daemon answers for it",
            hint=f"if its daemon died, unmount it with: fusermount3 -u -z {mnt}; "
            "`safefs recover` writes back what it left",
        )
    if fstype is None and not os.path.lexists(mnt):
        return NotMounted(f"no safefs mount at {mnt} (no such directory)")
    return NotMounted(f"no safefs mount at {mnt}", hint="`safefs status` lists the running mounts")


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _client_timeout(deadline: float | None) -> float | None:
    remaining = _remaining(deadline)
    return None if remaining is None else remaining + CALL_GRACE
