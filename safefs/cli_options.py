"""The `safefs` command line's argument parsing: value parsers, and `safefs mount`'s options
made from their one declaration (options.MOUNT_OPTIONS) into argparse arguments and a MountConfig.

Invariants:
- A mount option is never spelled here: add_mount_options, mount_config and setting_defaults
  read options.MOUNT_OPTIONS (tests/unit/test_settings.py checks).
- Config files (settings) fill what the command line left unset: the command line wins.
- CLI layer: imports none of trio, pyfuse3, lmdb.
Single-threaded; pure apart from reading the config files and resolving paths.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from safefs import checks, human, options, settings
from safefs.config import LeaseTimings, MountConfig, default_cache_dir


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
            defaults[option.name] = field_value(mount, option)
        else:  # cache_root, the one without a field: the cache dirs' parent, from the environment
            defaults[option.name] = os.fspath(default_cache_dir(Path("/x"), os.environ).parent)
    return defaults


def field_value(config: MountConfig, option: options.Option) -> Any:
    """The value of `option`'s MountConfig field in `config` (None for an option without one)."""
    if option.field is None:
        return None
    value: Any = config
    for name in option.field.split("."):
        value = getattr(value, name)
    return value
