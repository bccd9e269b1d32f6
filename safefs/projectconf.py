"""`<project>/.safefs/config.toml`: which lease backend a project uses (written by `safefs init`).

    lease_backend = "etcd"                       # or "dir" (the default, also without a file)
    etcd_endpoints = ["http://10.0.0.5:2379"]
    etcd_prefix = "safefs/3f2a..."               # every key of this project starts with it

Invariants:
- The file fixes the backend for every mount of the project, so two backends never both grant
  a writer. No file means the directory backend. A file safefs cannot read is an error, never
  a silent fall-back to the directory backend.
- It is replaced atomically (temp file, fsync, rename), opened one name at a time without
  following symlinks, like the lease files. Only `safefs init` writes it, and only while the
  lease is free under both the old and the new backend (checked by the caller).

Threading: blocking functions (NFS); the daemon calls them from worker threads.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import tomllib
from pathlib import Path

from safefs import layout
from safefs.errors import Refused
from safefs.lease.store import control_dir_fd

NAME = layout.CONFIG
BACKENDS = ("dir", "etcd")


@dataclasses.dataclass(frozen=True)
class ProjectConf:
    lease_backend: str = "dir"
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = ""

    def describe(self) -> str:
        if self.lease_backend == "etcd":
            return f"etcd at {','.join(self.etcd_endpoints)} (prefix {self.etcd_prefix})"
        return "the directory backend (.safefs/lease)"

    def to_toml(self) -> str:
        lines = ["# written by `safefs init`; change it only with `safefs init` (it checks the lease is free)",
                 f"lease_backend = {_quote(self.lease_backend)}"]  # fmt: skip
        if self.lease_backend == "etcd":
            lines.append(f"etcd_endpoints = [{', '.join(_quote(e) for e in self.etcd_endpoints)}]")
            lines.append(f"etcd_prefix = {_quote(self.etcd_prefix)}")
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A TOML basic string (JSON's escapes are a subset TOML accepts for these characters)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    if any(ord(c) < 0x20 or c == "\x7f" for c in escaped):
        raise Refused(f"control characters are not allowed in {text!r}")
    return f'"{escaped}"'


def make(backend: str, endpoints: str | None, prefix: str | None) -> ProjectConf:
    """A validated ProjectConf from `safefs init` options (a random prefix if none is given)."""
    if backend not in BACKENDS:
        raise Refused(f"unknown lease backend {backend!r}", hint=f"use one of: {', '.join(BACKENDS)}")
    if backend == "dir":
        if endpoints or prefix:
            raise Refused("--etcd-endpoints and --etcd-prefix need --lease-backend etcd")
        return ProjectConf()
    urls = tuple(e.strip() for e in (endpoints or "").split(",") if e.strip())
    if not urls:
        raise Refused("the etcd backend needs --etcd-endpoints URL[,URL...]", hint="e.g. http://etcd1:2379")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise Refused(f"etcd endpoint {url!r} is not an http:// or https:// URL")
    prefix = prefix if prefix else f"safefs/{secrets.token_hex(8)}"
    return ProjectConf("etcd", urls, prefix.rstrip("/"))


def parse(text: str, where: str = NAME) -> ProjectConf:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Refused(f"cannot read {where}: {e}", hint="rewrite it with `safefs init`") from e
    backend = data.get("lease_backend", "dir")
    if backend not in BACKENDS:
        raise Refused(f"{where} names an unknown lease backend {backend!r}", hint="rewrite it with `safefs init`")
    if backend == "dir":
        return ProjectConf()
    endpoints = data.get("etcd_endpoints")
    prefix = data.get("etcd_prefix")
    if not isinstance(endpoints, list) or not endpoints or not all(isinstance(e, str) for e in endpoints) \
            or not isinstance(prefix, str) or not prefix:  # fmt: skip
        raise Refused(f"{where}: the etcd backend needs etcd_endpoints (a list) and etcd_prefix",
                      hint="rewrite it with `safefs init`")  # fmt: skip
    return ProjectConf("etcd", tuple(endpoints), prefix)


def read(project: Path) -> ProjectConf:
    """The project's configuration; the directory backend when it has none. Raises Refused or OSError."""
    try:
        dir_fd = control_dir_fd(project)
    except FileNotFoundError:
        return ProjectConf()
    try:
        try:
            fd = os.open(NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return ProjectConf()
        try:
            raw = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    return parse(raw.decode("utf-8", "replace"), str(layout.path(project, NAME)))


def write(project: Path, conf: ProjectConf) -> None:
    data = conf.to_toml().encode()
    dir_fd = control_dir_fd(project, create=True)
    tmp = f".{NAME}.{secrets.token_hex(6)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    finally:
        os.close(dir_fd)
