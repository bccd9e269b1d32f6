"""The `safefs` command: init, mount, umount, sync, status, acquire, recover.

Every command but `mount --foreground` talks to a running daemon over its control socket
(safefs.control.client); `mount` spawns the daemon as `python -m safefs mount ...
--foreground --ready-fd N` in a new session and waits for its one-line JSON ready message.

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
import dataclasses
import json
import math
import os
import select
import shlex
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from safefs import __version__, checks, history, human, options, procs, settings, unmount
from safefs.config import LeaseTimings, MountConfig, default_cache_dir, runtime_dir, socket_path
from safefs.control import client, protocol
from safefs.control.protocol import (
    AcquireReceipt,
    Conflict,
    EtcdStatistics,
    Holder,
    LeaseStatistics,
    LogWarning,
    Orphan,
    Ping,
    ProgressReport,
    RecoverReceipt,
    Status,
    SyncReceipt,
    UnmountReceipt,
    WriteBackError,
    error_from_wire,
    error_to_wire,
)
from safefs.errors import (
    EXIT_CODE_MEANING,
    BackingFailed,
    Busy,
    DaemonFailed,
    ExitCode,
    LeaseHeldElsewhere,
    NotMounted,
    ProtocolError,
    Refused,
    SafefsError,
    SyncTimeout,
    Unwritten,
)
from safefs.human import human_bytes, human_seconds, plural

INTERRUPTED = 130  # the shell's code for "killed by SIGINT"
READY_TIMEOUT = 60.0  # a daemon not ready after this long is stopped (unless it waits for the lease)
STATUS_TIMEOUT = 10.0  # ping and status answer from memory; longer means the daemon is stuck
CALL_GRACE = 15.0  # the daemon enforces an op's timeout; the client waits this much longer
STOP_TIMEOUT = 10.0
PROGRESS_DELAY = 0.5  # operations quicker than this show no progress bar
WAIT_REPORT_DELAY = 1.0  # a command that waits longer than this says what it waits for
LOG_TAIL_LINES = 20


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


def parse_size(text: str) -> int:
    """Bytes in `text`: a plain number or one with a binary suffix (512M, 10G, 1.5TiB, 64k)."""
    size = human.parse_size(text)
    if size is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (try 512M or 10G)")
    return size


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be a non-negative number, not {text!r}")
    return value


# The subcommands (test_cli checks): anything else first is the mount(8) form `safefs SRC MNT -o ...`.
COMMANDS = ("init", "mount", "umount", "sync", "status", "acquire", "recover", "config", "history")


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    sub: argparse.ArgumentParser = commands.choices[name]
    return sub


# How `safefs mount` reads the value of each kind of option (options.MOUNT_OPTIONS).
_ARGUMENT_TYPES: dict[str, dict[str, Any]] = {
    options.SECONDS: {"type": parse_seconds}, options.SIZE: {"type": parse_size}, options.TEXT: {},
    options.PATH: {}, options.FLAG: {"action": "store_true"}, options.PORT: {"type": settings.port},
    options.LEVEL: {"choices": settings.LOG_LEVELS}, options.FD: {"type": int},
}  # fmt: skip


def add_mount_options(mount: argparse.ArgumentParser) -> None:
    """The arguments of `safefs mount`, one per options.MOUNT_OPTIONS entry, in its order."""
    advanced = None
    for option in options.MOUNT_OPTIONS:
        group: Any = mount
        if option.advanced:
            advanced = advanced or mount.add_argument_group("advanced options (mostly for tests)")
            group = advanced
        extra = {"metavar": option.metavar} if option.metavar else {}
        group.add_argument(
            option.flag, help=option.help or argparse.SUPPRESS, **_ARGUMENT_TYPES[option.kind], **extra
        )


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


def mount_config(args: argparse.Namespace) -> MountConfig:
    """The resolved MountConfig for `safefs mount` arguments; defaults come from MountConfig itself."""
    settings.fill(args, settings.load(os.environ))
    src = Path(os.path.realpath(args.src))
    mnt = checks.resolve_mountpoint(args.mnt)
    cache_dir = default_cache_dir(src, os.environ)
    if args.cache_root:
        cache_dir = Path(args.cache_root) / cache_dir.name
    cache_dir = Path(os.path.realpath(args.cache_dir or cache_dir))
    fields: dict[str, Any] = {}
    lease: dict[str, Any] = {}
    for option in options.MOUNT_OPTIONS:
        value = getattr(args, option.name)
        if option.field is None or option.field == "cache_dir" or value is None or value is False:
            continue  # not given: MountConfig's default (the cache dir is resolved above)
        if option.kind == options.PATH:
            value = Path(os.path.realpath(value))
        owner, _, name = option.field.rpartition(".")
        (lease if owner == "lease" else fields)[name] = value
    return MountConfig(src=src, mnt=mnt, cache_dir=cache_dir, lease=LeaseTimings(**lease), **fields)


def cmd_mount(args: argparse.Namespace) -> int:
    config = mount_config(args)
    if not args.foreground:
        checks.check_setup(config)  # refuse early and clearly, before spawning anything
        return spawn_daemon(config, debug=args.debug)
    try:
        checks.check_setup(config)
    except SafefsError as exc:
        if args.ready_fd is not None:
            _write_ready(args.ready_fd, protocol.Ready(ok=False, error=error_to_wire(exc)))
        raise
    from safefs import daemon  # only here: the daemon imports trio, pyfuse3 and lmdb

    return int(daemon.run(config, ready_fd=args.ready_fd, debug=args.debug))


def setting_defaults() -> dict[str, Any]:
    """What `safefs mount` uses for each config-file key that no file and no option sets."""
    mount = MountConfig(src=Path("/"), mnt=Path("/"), cache_dir=Path("/"))
    defaults = {}
    for option in options.MOUNT_OPTIONS:
        if not option.config:
            continue
        if option.default_text is not None:
            defaults[option.name] = option.default_text
        elif option.field is not None:
            defaults[option.name] = _field_value(mount, option)
        else:  # cache_root, the one without a field: the cache dirs' parent, from the environment
            defaults[option.name] = os.fspath(default_cache_dir(Path("/x"), os.environ).parent)
    return defaults


def _field_value(config: MountConfig, option: options.Option) -> Any:
    """The value of `option`'s MountConfig field in `config` (None for an option without one)."""
    if option.field is None:
        return None
    value: Any = config
    for name in option.field.split("."):
        value = getattr(value, name)
    return value


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


def daemon_argv(config: MountConfig, *, ready_fd: int, debug: bool) -> list[str]:
    """The command line of a foreground daemon with exactly `config`: every option with a
    MountConfig field, with that field's value (floats as repr, so they come back equal)."""
    flags = options.OPTIONS
    argv = [sys.executable, "-m", "safefs", "mount", os.fspath(config.src), os.fspath(config.mnt),
            flags["foreground"].flag, flags["ready_fd"].flag, str(ready_fd)]  # fmt: skip
    for option in options.MOUNT_OPTIONS:
        value = _field_value(config, option)
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


def mounted_message(config: MountConfig, ready: protocol.Ready) -> str:
    umount = f"unmount with: safefs umount {shlex.quote(os.fspath(config.mnt))}"
    where = f"safefs: mounted {config.src} at {config.mnt}"
    if ready.role == "writer":
        return f"{where} as writer (cache {config.cache_dir}); {umount}"
    holder = ready.holder
    held = f"{describe_holder(holder)} holds the write lease; " if holder is not None else ""
    return f"{where} as read-only follower ({held}cache {config.cache_dir}); {umount}"


def describe_holder(holder: Holder) -> str:
    details = [f"{key} {value}" for key, value in (("pid", holder.pid), ("user", holder.user)) if value is not None]
    name = str(holder.host or "another host")
    return f"{name} ({', '.join(details)})" if details else name


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


def _write_ready(fd: int, message: protocol.Ready) -> None:
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
                    on_progress=_report_to(bar, waits),
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


def unwritten_error(mnt: Path, result: UnmountReceipt) -> Unwritten:
    """After an unmount that left changes in the cache: how many, where, why, what to run."""
    final = result.final
    cache_dir, src = final.cache_dir or "?", final.src or "?"
    why = f" ({final.unwritten_reason})" if final.unwritten_reason else ""
    what = f"{plural(final.unwritten, 'change')} ({human_bytes(final.unwritten_bytes or 0)})"
    if final.unwritten_files is not None and final.unwritten_ops is not None:
        what = f"{plural(final.unwritten_files, 'file')} ({human_bytes(final.unwritten_bytes or 0)}) " \
            f"and {plural(final.unwritten_ops, 'pending operation')}"  # fmt: skip
    return Unwritten(
        f"unmounted {mnt}, but {what} were not written back: they stay in the cache {cache_dir}{why}",
        hint=f"run `safefs recover --cache-dir {shlex.quote(cache_dir)} {shlex.quote(src)}` on this host "
        "to write them back (a file changed meanwhile is kept beside as a conflict copy)",
    )


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


def cmd_sync(args: argparse.Namespace) -> int:
    mnt = checks.resolve_mountpoint(args.mnt)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    with ProgressBar("syncing") as bar:
        result: SyncReceipt = call(
            mnt,
            "sync",
            protocol.SyncArgs(release=args.release, timeout=args.timeout),
            timeout=_client_timeout(deadline),
            on_progress=_report_to(bar, WaitReport()),
        )
    if args.json:
        print(json.dumps(protocol.to_wire(result), indent=2, sort_keys=True))
    else:
        print(sync_receipt(mnt, result, released=args.release))
    return int(ExitCode.SYNC_CONFLICTS if result.conflicts else ExitCode.OK)


def sync_receipt(mnt: Path, result: SyncReceipt, *, released: bool) -> str:
    """One line: what the sync wrote and which generation it published."""
    parts = [plural(result.files, "file"), f"{human_bytes(result.bytes)} written"]
    if result.generation is not None:
        epoch = f" (epoch {result.epoch})" if result.epoch is not None else ""
        parts.append(f"generation {result.generation}{epoch} published")
    line = f"safefs: synced {mnt}: {', '.join(parts)}"
    if released:
        line += "; write lease released, the mount is read-only now"
    conflicts = result.conflicts or []
    if conflicts:
        line += f"\n{plural(len(conflicts), 'conflict')} (both versions kept side by side):"
        line += "".join(f"\n  {describe_conflict(c)}" for c in conflicts)
    return line


def describe_conflict(item: Conflict) -> str:
    """One line for a conflict record: which name, why, and where the other version went."""
    text = f"{item.path or item.op}: {item.why or 'conflict'}"
    if item.kept_as:
        text += f"; {item.copy_holds or 'the other version'} is {item.kept_as}"
    if item.error:
        text += f" ({item.error})"
    if item.time is not None:
        text += f", at {_when(item.time)}"
    return text


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
        print(f"{_when(record['time'])}  {str(record.get('event', '?')):<10} {epoch:<9} {who}{detail}")
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


@dataclasses.dataclass(frozen=True)
class Unanswered:
    """A daemon `safefs status` found a socket of, but got no status from (in place of its status)."""

    socket: str
    error: str

    def format(self) -> str:
        return f"error:  {self.error}\nsocket: {self.socket}"


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


# ---- output -------------------------------------------------------------------------------------


class ProgressBar:
    """Progress of a write-back on stderr, drawn with rich: only on a terminal, only after PROGRESS_DELAY.

    Shows the bytes done of the total, the files left, the rate and the time left (rich derives
    both from the updates) and what the daemon waits for (the write-back, a lock delay, a
    failing project). Off a terminal nothing is drawn and rich is not even imported.
    """

    def __init__(self, label: str, stream: TextIO | None = None, *, delay: float = PROGRESS_DELAY) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.delay = delay
        self.enabled = self.stream.isatty()
        self.started = time.monotonic()
        self.drawn = False
        self._progress: Any = None
        self._task: Any = None

    def update(self, progress: ProgressReport) -> None:
        if not self.enabled or time.monotonic() - self.started < self.delay:
            return
        if self._progress is None:
            self._start()
        bytes_done, bytes_total = progress.bytes_done, progress.bytes_total
        files_done, files_total = progress.files_done, progress.files_total
        files = ""
        if files_total is not None and files_done is not None:
            files = f"{plural(int(files_total - files_done), 'file')} left"
        waiting = progress.waiting_for
        self._progress.update(
            self._task,
            description=str(progress.phase or self.label),
            total=bytes_total if bytes_total else None,
            completed=bytes_done or 0,
            files=files,
            waiting=f"waiting for {waiting}" if waiting else "",
        )
        self._progress.refresh()
        self.drawn = True

    def _start(self) -> None:
        from rich.console import Console  # only here: a terminal that waits long enough to need it
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,  # fmt: skip
        )

        console = Console(file=self.stream, force_terminal=True)
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=24), DownloadColumn(binary_units=True),
            TextColumn("{task.fields[files]}"), TransferSpeedColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[waiting]}"),
            console=console, auto_refresh=False, transient=True, redirect_stdout=False, redirect_stderr=False,
        )  # fmt: skip
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=None, files="", waiting="")

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()  # transient: the line is erased; the receipt follows


class WaitReport:
    """Says on stderr (terminal or not) what a command waits for, once it has waited longer
    than WAIT_REPORT_DELAY: one line per new reason, from the daemon's `waiting_for` progress
    or from the command itself (`wait_exit`)."""

    def __init__(self, stream: TextIO | None = None, *, delay: float = WAIT_REPORT_DELAY) -> None:
        self.stream = stream or sys.stderr
        self.delay = delay
        self.started = time.monotonic()
        self.said: str | None = None

    def update(self, progress: ProgressReport) -> None:
        what = progress.waiting_for
        if what is None or what == self.said or time.monotonic() - self.started < self.delay:
            return
        self.said = what
        detail = progress.detail
        print(f"safefs: waiting for {what}" + (f" ({detail})" if detail else ""), file=self.stream, flush=True)

    def wait_exit(self, watch: ProcessWatch, timeout: float | None, what: str) -> bool:
        """`watch.wait_exit(timeout)`, saying what it waits for after the first second."""
        first = self.delay if timeout is None else min(self.delay, timeout)
        if watch.wait_exit(first):
            return True
        self.started = -math.inf
        self.update(ProgressReport(waiting_for=what))
        return watch.wait_exit(None if timeout is None else max(0.0, timeout - first))


def _report_to(bar: ProgressBar, waits: WaitReport) -> Callable[[ProgressReport], None]:
    def report(progress: ProgressReport) -> None:
        bar.update(progress)
        waits.update(progress)

    return report


def human_value(key: str, value: Any) -> str:
    """Any status value as words: yes/no, none, durations for keys that hold seconds, no Python syntax."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = protocol.to_wire(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "none"
    if isinstance(value, float):
        if key.endswith(("delay", "age", "timeout", "poll", "interval", "seconds")):
            return human_seconds(value)
        return f"{value:g}"
    if isinstance(value, dict):
        parts = [f"{k.replace('_', ' ')} {human_value(k, v)}" for k, v in value.items()]
        return ", ".join(parts) if parts else "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(human_value(key, v) for v in value) if value else "none"
    return str(value)


def _when(value: Any) -> str:
    """A wall-clock time from status (seconds since the epoch) for humans; text passes through."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return human.wall_time(value)
    return str(value)


# Fields format_status shows in rows of its own. Every other field that is set, and every key
# this side does not know (`extra`: a newer daemon's), is shown as it comes, so nothing is hidden.
_SHOWN_FIELDS = frozenset(
    {
        "mnt", "src", "cache_dir", "pid", "role", "state", "lease", "dirty_bytes", "dirty_files", "oldest_dirty_age",
        "pending_ops", "bytes_fetched", "bytes_written", "cache_bytes", "cache_limit", "errors", "conflicts",
        "orphan_listing", "warnings", "flush", "extra",
    }
)  # fmt: skip


def _other_fields(status: Status) -> dict[str, Any]:
    """The fields of `status` (its flusher's too) that format_status has no row of its own for."""
    fields = {}
    for payload in (status, status.flush):
        for field in dataclasses.fields(payload):
            value = getattr(payload, field.name)
            if field.name not in _SHOWN_FIELDS and value is not None:
                fields[field.name] = value
    return {**fields, **status.extra}


def format_status(status: Status) -> str:
    """A daemon's status as aligned `key: value` lines."""
    rows: list[tuple[str, str]] = []
    details: list[str] = []

    def row(key: str, value: Any) -> None:
        if value is not None:
            rows.append((key, str(value)))

    flush = status.flush
    row("mount", status.mnt)
    row("project", status.src)
    row("role", describe_role(status))
    if status.state == "unmounted":
        changes = (flush.dirty_files or 0) + (flush.pending_ops or 0)
        row("state", f"unmounted, writing back {plural(int(changes), 'file')} / "
                     f"{human_bytes(flush.dirty_bytes or 0)}")  # fmt: skip
    else:
        row("state", status.state)
    lease = status.lease or LeaseStatistics()
    row("epoch", lease.epoch)
    row("generation", lease.generation)
    holder = lease.holder
    if holder is not None:
        text = describe_holder(holder)
        if holder.since is not None:
            text += f", since {_when(holder.since)}"
        if holder.heartbeat_age is not None:
            text += f", heartbeat {human_seconds(holder.heartbeat_age)} ago"
        row("lease holder", text)
    elif status.lease is not None:
        row("lease holder", "nobody")
    if lease.deadline is not None:
        row("lease deadline", f"in {human_seconds(lease.deadline)}")
    if lease.backend == "etcd":
        etcd = lease.etcd or EtcdStatistics()
        text = f"etcd {','.join(etcd.endpoints or [])}, prefix {etcd.prefix}, TTL {etcd.ttl} s"
        if etcd.expires_in is not None:
            text += f", expires in {human_seconds(etcd.expires_in)}"
        row("lease backend", text + f", revision {etcd.revision}")
    elif lease.backend:
        row("lease backend", lease.backend)
    if flush.dirty_bytes is not None:
        files = flush.dirty_files if flush.dirty_files is not None else "?"
        dirty = f"{human_bytes(flush.dirty_bytes)} in {plural(files, 'file')}"
        if flush.oldest_dirty_age is not None:
            dirty += f", oldest {human_seconds(flush.oldest_dirty_age)}"
        row("dirty", dirty)
    row("pending ops", flush.pending_ops)
    if status.bytes_fetched is not None:
        row("fetched", f"{human_bytes(status.bytes_fetched)} from the project")
    if status.bytes_written is not None:
        row("written", f"{human_bytes(status.bytes_written)} to the project")
    if status.cache_bytes is not None:
        limit = status.cache_limit
        row("cache", human_bytes(status.cache_bytes) + (f" of {human_bytes(limit)}" if limit is not None else ""))
    row("cache dir", status.cache_dir)
    row("pid", status.pid)
    if flush.errors is not None:
        row("errors", len(flush.errors) if flush.errors else "none")
        details += [f"  error: {describe_write_back_error(error)}" for error in flush.errors]
    if flush.conflicts is not None:
        row("conflicts", len(flush.conflicts) if flush.conflicts else "none")
        details += [f"  conflict: {describe_conflict(conflict)}" for conflict in flush.conflicts]
    if status.warnings is not None:  # recent WARNING/ERROR log messages (safefs.logs)
        row("warnings", len(status.warnings) if status.warnings else "none")
        details += [f"  {_describe_warning(item)}" for item in status.warnings]
    listing = status.orphan_listing
    if listing.orphans is not None:
        row("orphans", len(listing.orphans) if listing.orphans else "none")
        details += [f"  {describe_orphan(orphan, status)}" for orphan in listing.orphans]
    elif listing.orphans_error:
        row("orphans", f"unknown: {listing.orphans_error}")
    for skipped in listing.orphans_skipped or []:
        details.append(f"  unreadable orphan marker: name={skipped.name}, error={skipped.error}")
    others = _other_fields(status)
    for key in sorted(others):
        row(key.replace("_", " "), human_value(key, others[key]))

    width = max((len(key) for key, _ in rows), default=0) + 1
    return "\n".join([f"{key + ':':<{width}} {value}" for key, value in rows] + details)


def describe_role(status: Status) -> str | None:
    """`writer`, `writer (publishing from HH:MM:SS)` during the lock delay after a takeover, or
    `follower`; a fenced ex-writer says that its unwritten changes stay for `safefs recover`."""
    role = status.role
    lease = status.lease or LeaseStatistics()
    until = lease.publishing_from
    if role == "writer" and until is not None:
        return f"writer (publishing from {time.strftime('%H:%M:%S', time.localtime(until))})"
    unwritten = (status.flush.dirty_files or 0) + (status.flush.pending_ops or 0)
    if role != "writer" and lease.state == "lost" and unwritten:
        return (f"{role} (lost the write lease; its unwritten changes stay in its cache for "
                f"`safefs recover`)")  # fmt: skip
    return role


def _is_own_orphan(orphan: Orphan, status: Status) -> bool:
    """Whether `orphan` is the marker of the mount `status` describes (same host, same cache)."""
    return orphan.host == status.host and orphan.cache_dir == status.cache_dir


def describe_orphan(orphan: Orphan, status: Status | None = None) -> str:
    """One line for an orphan marker: whose, how much, since when, why, and what to do.

    `status` is the mount that found it: its own marker gets the `safefs recover MNT` to run."""
    host = orphan.host or "an unknown host"
    counts = []
    if orphan.pending_ops:
        counts.append(plural(int(orphan.pending_ops), "pending op"))
    if orphan.dirty_files or orphan.dirty_bytes:
        counts.append(f"{human_bytes(orphan.dirty_bytes or 0)} in {plural(int(orphan.dirty_files or 0), 'file')}")
    changes = " and ".join(counts) or "changes"
    text = f"orphaned changes: host {host} (cache {orphan.cache_dir}) {changes} unwritten"
    if orphan.since is not None:
        text += f" since {_when(orphan.since)}"
    why = [str(orphan.reason)] if orphan.reason else []
    if orphan.epoch is not None:
        why.append(f"epoch {orphan.epoch}")
    if why:
        text += f" ({'; '.join(why)})"
    if status is not None and _is_own_orphan(orphan, status) and status.mnt:
        return text + f"; run `safefs recover {status.mnt}` on this host"
    return text + f"; run `safefs recover` on {host}"


def _describe_warning(item: LogWarning) -> str:
    repeats = ""
    if item.count and item.count > 1:
        repeats = f" ({item.count} times, last at {_when(item.time)})"
    when = "" if repeats else f" at {_when(item.time)}"
    return f"{item.level or 'warning'}: {item.message}{when}{repeats}"


def describe_write_back_error(error: WriteBackError) -> str:
    retry = f" (retry at {_when(error.retry_at)})" if error.retry_at is not None else ""
    return f"{error.op} {error.path}: {error.error}{retry}"
