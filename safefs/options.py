"""The options of `safefs mount`, declared once (MOUNT_OPTIONS), and mount(8)-style invocations:
`safefs SRC MNT -o key=value,flag,...` into `safefs mount` options.

Each `Option` of MOUNT_OPTIONS generates, from its one declaration: the argparse argument of
`safefs mount` (cli), the key of the config files' `[mount]` table (settings.KEYS), the `-o`
spelling for mount(8) and fstab (here), and the MountConfig field it sets, which is also how
the launcher passes it on to the daemon's command line (cli.daemon_argv). No option name is
spelled anywhere else (tests/unit/test_settings.py checks).

`mount -t fuse.safefs SRC MNT -o OPTS` and an fstab line of type `fuse.safefs` run
mount.fuse3, which runs `safefs SRC MNT -o OPTS` (found on PATH) and waits for it to exit:
`safefs mount` without --foreground does exactly that (it returns once the daemon serves).

Every long option of `safefs mount` but --ready-fd has an `-o` spelling, its name with
underscores (`--writeback-delay 5` is `-o writeback_delay=5`, `--allow-other` is
`-o allow_other`). Options of mount(8) and fstab that are not safefs's business are accepted and ignored
(MOUNT8_IGNORED, `x-*`, `comment=*`); `ro` mounts as a follower (never takes the write lease by
itself), `rw` is the default. Anything else is a one-line usage error.

Pure: argument lists in, argument lists out; stdlib only (a core module).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

# How an option's value is read; cli and settings map each kind to their parser and checker.
SECONDS, SIZE, TEXT, PATH, FLAG, PORT, LEVEL, FD = "seconds", "size", "text", "path", "flag", "port", "level", "fd"


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of `safefs mount`: `--NAME-WITH-DASHES`, config key and `-o NAME` (underscores)."""

    name: str  # the argparse dest, the config-file key and the -o spelling
    kind: str  # SECONDS, SIZE, TEXT, PATH, FLAG, PORT, LEVEL or FD
    help: str | None  # None: hidden from --help (internal)
    metavar: str | None = None
    field: str | None = None  # the MountConfig field it sets ("lease.renew": of its LeaseTimings)
    config: bool = True  # a key of the config files' [mount] table
    o: bool = True  # has an -o spelling
    advanced: bool = False  # listed under "advanced options" in --help
    default_text: str | None = None  # `safefs config`'s default when it is not the field's default

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def takes_value(self) -> bool:
        return self.kind != FLAG


# In the order of `safefs mount --help`.
MOUNT_OPTIONS: tuple[Option, ...] = (
    Option("cache_dir", PATH, "local cache (default: $XDG_CACHE_HOME/safefs/NAME-KEY)", "DIR", field="cache_dir",
           default_text="NAME-KEY under cache_root"),
    Option("writeback_delay", SECONDS, "write back a file quiet this long (default 5)", "SECONDS",
           field="writeback_delay"),
    Option("cache_size", SIZE, "evict clean data above this, e.g. 10G (default 10G)", "SIZE", field="cache_size"),
    Option("allow_other", FLAG, "let other users use the mount", field="allow_other"),
    Option("foreground", FLAG, "run the daemon in this process (debugging)", config=False),
    Option("host_id", TEXT, "human-readable host name in the lease (default: hostname)", "NAME", field="host_id",
           default_text="this host's name"),
    Option("debug", FLAG, "log debug messages", config=False),
    Option("cache_root", PATH, "make the cache dir under this (DIR/NAME-KEY), e.g. node-local scratch", "DIR"),
    Option("follower", FLAG, "never take the write lease by itself (-o ro)", field="follower", config=False),
    Option("log_file", PATH, "log here, rotated (default: daemon.log in the cache dir)", "FILE", field="log_file",
           default_text="daemon.log in the cache dir"),
    Option("log_level", LEVEL, "least severe messages logged (default info)", field="log_level"),
    Option("metrics_port", PORT, "serve Prometheus metrics on http://127.0.0.1:PORT/metrics (default: no listener)",
           "PORT", field="metrics_port", default_text="none (no listener)"),
    Option("ready_fd", FD, None, config=False, o=False),
    Option("lease_renew", SECONDS, "heartbeat interval", "S", field="lease.renew", advanced=True),
    Option("lease_break", SECONDS, "take over a lease silent this long", "S", field="lease.t_break", advanced=True),
    Option("lease_epsilon", SECONDS, "safety margin of the holder", "S", field="lease.epsilon", advanced=True),
    Option("lock_delay", SECONDS, "after a takeover, wait this long before changing the project", "S",
           field="lease.lock_delay", advanced=True),
    Option("lease_poll", SECONDS, "how often to read the holder's heartbeat", "S", field="lease.poll", advanced=True),
    Option("follower_poll", SECONDS, "how often a follower looks for news", "S", field="follower_poll",
           advanced=True),
    Option("backing_timeout", SECONDS, "fail reads of the project after this", "S", field="backing_timeout",
           advanced=True),
    Option("wait_lease", FLAG, "wait for the write lease instead of following", field="wait_for_lease",
           config=False, advanced=True),
)  # fmt: skip
OPTIONS = {option.name: option for option in MOUNT_OPTIONS}

# Standard mount(8)/fstab options with no meaning for safefs: accepted, ignored.
MOUNT8_IGNORED = frozenset(
    {"defaults", "rw", "_netdev", "nofail", "auto", "noauto", "user", "nouser", "users", "owner",
     "dev", "suid", "nodev", "nosuid", "exec", "noexec"}
)  # fmt: skip
IGNORED_PREFIXES = ("x-", "comment=")
READ_ONLY = {"ro": "follower"}  # mount(8) spelling -> safefs -o spelling
MOUNT8_FLAGS = {"-n", "-s", "-v"}  # what mount(8) may pass a mount.TYPE helper: no meaning here


class OptionError(ValueError):
    """An -o option safefs does not know, or a value where none belongs (one line)."""


def spellings() -> dict[str, tuple[str, bool]]:
    """-o name -> (long option, takes a value), for every option of `safefs mount` that has one."""
    return {option.name: (option.flag, option.takes_value) for option in MOUNT_OPTIONS if option.o}


def expand(options: str) -> list[str]:
    """One `-o` argument (`a=1,b,c=2`) as `safefs mount` long options. Raises OptionError."""
    table = spellings()
    argv: list[str] = []
    for option in filter(None, (o.strip() for o in options.split(","))):
        name, has_value, value = option.partition("=")
        name = READ_ONLY.get(name, name)
        if name in table:
            long_option, takes_value = table[name]
            if takes_value and not has_value:
                raise OptionError(f"mount option {name!r} needs a value ({name}=...)")
            if not takes_value and has_value:
                raise OptionError(f"mount option {name!r} takes no value")
            argv += [long_option, value] if takes_value else [long_option]
        elif name in MOUNT8_IGNORED or option.startswith(IGNORED_PREFIXES):
            continue
        else:
            raise OptionError(f"unknown mount option {option!r} (`safefs mount --help` lists them; "
                              "-o spells --some-option as some_option)")  # fmt: skip
    return argv


def translate(argv: Sequence[str], commands: Sequence[str]) -> list[str]:
    """`argv` with mount(8)'s form (`SRC MNT [-o OPTS] [-t TYPE] [-n -s -v]`) turned into
    `mount SRC MNT --long-options...`, and `-o OPTS` of `safefs mount` expanded. Any other
    command line is returned as it is. Raises OptionError."""
    argv = list(argv)
    # A path first (mount(8) passes SRC as written in fstab), or an -o anywhere; a mistyped
    # command (`safefs stauts`) stays what it is, for argparse to name.
    mount8 = bool(argv) and argv[0] not in commands and not argv[0].startswith("-") and \
        ("/" in argv[0] or any(a.startswith("-o") for a in argv))  # fmt: skip
    if not mount8 and (not argv or argv[0] != "mount"):
        return argv
    rest = argv if mount8 else argv[1:]
    out = ["mount"]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "-o" or (arg.startswith("-o") and len(arg) > 2):
            value = arg[2:] if len(arg) > 2 else (rest[i + 1] if i + 1 < len(rest) else None)
            if value is None:
                raise OptionError("-o needs a list of options (-o key=value,flag,...)")
            out += expand(value)
            i += 1 if len(arg) > 2 else 2
            continue
        if mount8 and arg == "-t":
            i += 2  # the type (fuse.safefs): we know who we are
            continue
        if mount8 and arg in MOUNT8_FLAGS:
            i += 1
            continue
        out.append(arg)
        i += 1
    return out
