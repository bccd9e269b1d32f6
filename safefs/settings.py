"""Mount defaults from config files: `/etc/safefs/config.toml`, then the user's own.

Files (TOML, read with tomllib), later ones winning key by key:
1. the site file, `/etc/safefs/config.toml` (SAFEFS_SITE_CONFIG overrides the path);
2. the user file, `$XDG_CONFIG_HOME/safefs/config.toml`, default `~/.config/safefs/config.toml`
   (SAFEFS_CONFIG overrides the path).
The command line and `-o` options win over both. Only the `[mount]` table is read; its keys are
the `safefs mount` long option names with underscores (KEYS, from options.MOUNT_OPTIONS), among
them `cache_root`: the directory under which each project's cache dir is made (node-local
scratch on a cluster).

Invariants:
- A missing file is no error; a bad one is a SettingsError whose message is one line naming
  the file, the line and the key (or the TOML syntax error and its line).
- Values are checked and converted here, so `load()` returns only valid values, each with
  where it came from (`Setting.source`).
Pure apart from reading the two files; no threads.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safefs import human, options
from safefs.errors import ExitCode, SafefsError

SITE_CONFIG = Path("/etc/safefs/config.toml")
TABLE = "mount"


class SettingsError(SafefsError):
    exit_code = ExitCode.USAGE


def seconds(value: Any) -> float:
    """A non-negative finite number of seconds (TOML int, float, or a string of one)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"not a number of seconds: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected seconds (a number), not {value!r}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"seconds must be a non-negative number, not {value!r}")
    return float(value)


def size(value: Any) -> int:
    """Bytes: a TOML integer, or a string with a binary suffix (512M, 10G, 1.5TiB)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    size = human.parse_size(value) if isinstance(value, str) else None
    if size is None:
        raise ValueError(f"invalid size {value!r} (try \"512M\" or \"10G\")")
    return size


def text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, not {value!r}")
    return value


def path(value: Any) -> str:
    value = text(value)
    if not os.path.isabs(os.path.expanduser(value)):
        raise ValueError(f"expected an absolute path, not {value!r}")
    return os.path.expanduser(value)


def port(value: Any) -> int:
    """A TCP port number, 1..65535."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"expected a port number (1-65535), not {value!r}")
    return value


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, not {value!r}")
    return value


LOG_LEVELS = ("debug", "info", "warning", "error")


def log_level(value: Any) -> str:
    value = text(value).lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, not {value!r}")
    return value


_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    options.SECONDS: seconds, options.SIZE: size, options.TEXT: text, options.PATH: path, options.FLAG: flag,
    options.PORT: port, options.LEVEL: log_level,
}  # fmt: skip
# key -> converter: the `safefs mount` options declared `config` (options.MOUNT_OPTIONS).
KEYS: dict[str, Callable[[Any], Any]] = {o.name: _CONVERTERS[o.kind] for o in options.MOUNT_OPTIONS if o.config}


@dataclasses.dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "FILE:LINE", "command line", ...


def config_files(env: Mapping[str, str]) -> list[Path]:
    """The files read, lowest precedence first."""
    site = Path(env.get("SAFEFS_SITE_CONFIG") or SITE_CONFIG)
    user = env.get("SAFEFS_CONFIG")
    if not user:
        base = env.get("XDG_CONFIG_HOME") or os.path.join(env.get("HOME") or "/root", ".config")
        user = os.path.join(base, "safefs", "config.toml")
    return [site, Path(user)]


def load(env: Mapping[str, str]) -> dict[str, Setting]:
    """Every setting the config files give, later files winning. Raises SettingsError."""
    settings: dict[str, Setting] = {}
    for file in config_files(env):
        found = read_file(file)
        for group in _ALTERNATIVES:
            if group & found.keys():
                for key in group - found.keys():
                    settings.pop(key, None)
        settings.update(found)
    return settings


def read_file(file: Path) -> dict[str, Setting]:
    """The `[mount]` settings of one file ({} if it does not exist). Raises SettingsError."""
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SettingsError(f"cannot read config file {file}: {exc.strerror}") from None
    source = raw.decode("utf-8", "replace")
    lines = source.splitlines()
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"at line (\d+)", str(exc))
        line = lines[int(found.group(1)) - 1] if found and 0 < int(found.group(1)) <= len(lines) else ""
        named = re.match(r"\s*([A-Za-z0-9_.\"'-]+)\s*=", line)
        hint = f" (key {named.group(1).strip()!r})" if named else ""
        raise SettingsError(f"{file}: {exc}{hint}") from None
    for key in data:
        if key != TABLE:
            where = _line_of(lines, key, table=None)
            raise SettingsError(f"{file}:{where}: unknown table or key {key!r} (only [{TABLE}] is read)")
    table = data.get(TABLE, {})
    if not isinstance(table, dict):
        raise SettingsError(f"{file}:{_line_of(lines, TABLE, table=None)}: {TABLE!r} must be a table")
    settings = {}
    for key, value in table.items():
        where = _line_of(lines, key, table=TABLE)
        if key not in KEYS:
            raise SettingsError(f"{file}:{where}: unknown key {key!r} in [{TABLE}] (known: {', '.join(KEYS)})")
        try:
            settings[key] = Setting(KEYS[key](value), f"{file}:{where}")
        except ValueError as exc:
            raise SettingsError(f"{file}:{where}: {key}: {exc}") from None
    return settings


def _line_of(lines: list[str], key: str, *, table: str | None) -> int | str:
    """The 1-based line that sets `key` (in `[table]` if given), or "?" if not found."""
    current = None
    pattern = re.compile(rf"""\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*(=|\.|$)""")
    header = re.compile(r"\s*\[+\s*([^\]]+?)\s*\]+")
    for number, line in enumerate(lines, 1):
        found = header.match(line)
        if found:
            current = found.group(1).strip().strip("\"'")
            if table is None and current.split(".")[0] == key:
                return number
            continue
        if current == table and pattern.match(line):
            return number
    return "?"


# Keys that name the same thing: a later file (or the command line) setting one drops the others.
_ALTERNATIVES = ({"cache_dir", "cache_root"},)


def fill(namespace: Any, loaded: Mapping[str, Setting]) -> None:
    """Set each attribute of `namespace` (parsed `safefs mount` arguments) that the command line
    left unset (None or False) to its loaded setting: the command line wins."""
    given = {key for key in KEYS if getattr(namespace, key, None) not in (None, False)}
    for group in _ALTERNATIVES:
        if group & given:
            given |= group
    for key, setting in loaded.items():
        if key not in given and hasattr(namespace, key):
            setattr(namespace, key, setting.value)
