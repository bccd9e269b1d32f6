"""mount(8)-style invocations: `safefs SRC MNT -o key=value,flag,...` into `safefs mount` options.

`mount -t fuse.safefs SRC MNT -o OPTS` and an fstab line of type `fuse.safefs` run
mount.fuse3, which runs `safefs SRC MNT -o OPTS` (found on PATH) and waits for it to exit:
`safefs mount` without --foreground does exactly that (it returns once the daemon serves).

Every long option of `safefs mount` has an `-o` spelling, its name with underscores
(`--writeback-delay 5` is `-o writeback_delay=5`, `--allow-other` is `-o allow_other`); the
spellings are read from the mount parser itself, so a new option gets one without an edit
here. Options of mount(8) and fstab that are not safefs's business are accepted and ignored
(MOUNT8_IGNORED, `x-*`, `comment=*`); `ro` mounts as a follower (never takes the write lease by
itself), `rw` is the default. Anything else is a one-line usage error.

Pure: argument lists in, argument lists out.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

# Standard mount(8)/fstab options with no meaning for safefs: accepted, ignored.
MOUNT8_IGNORED = frozenset(
    {"defaults", "rw", "_netdev", "nofail", "auto", "noauto", "user", "nouser", "users", "owner",
     "dev", "suid", "nodev", "nosuid", "exec", "noexec"}
)  # fmt: skip
IGNORED_PREFIXES = ("x-", "comment=")
READ_ONLY = {"ro": "follower"}  # mount(8) spelling -> safefs -o spelling
HIDDEN = {"ready_fd", "help"}  # internal options with no -o spelling
MOUNT8_FLAGS = {"-n", "-s", "-v"}  # what mount(8) may pass a mount.TYPE helper: no meaning here


class OptionError(ValueError):
    """An -o option safefs does not know, or a value where none belongs (one line)."""


def spellings(mount_parser: argparse.ArgumentParser) -> dict[str, tuple[str, bool]]:
    """-o name -> (long option, takes a value), for every long option of `safefs mount`."""
    table = {}
    for action in mount_parser._actions:  # noqa: SLF001 (argparse has no public listing)
        for string in action.option_strings:
            if not string.startswith("--"):
                continue
            name = string[2:].replace("-", "_")
            if name not in HIDDEN and action.help != argparse.SUPPRESS:
                table[name] = (string, action.nargs != 0)
    return table


def expand(options: str, mount_parser: argparse.ArgumentParser) -> list[str]:
    """One `-o` argument (`a=1,b,c=2`) as `safefs mount` long options. Raises OptionError."""
    table = spellings(mount_parser)
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


def translate(
    argv: Sequence[str], commands: Sequence[str], mount_parser: argparse.ArgumentParser
) -> list[str]:
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
            out += expand(value, mount_parser)
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
