"""Orphan markers: `<project>/.safefs/orphans/<name>.json`, so every host can see stranded changes.

An orphan is data a host's cache holds that the project lacks and that this host may not
write back on its own: it lost its lease (fenced, taken over), it unmounted while the project
failed, or it mounted as a follower with changes an earlier mount left in its cache. Only
that host can publish them (`safefs recover` there). The marker says so to everyone else:
`safefs status` on any host lists the markers it finds here.

Record (JSON, one file per (host, cache dir)): {"v": 1, "host", "machine_id", "cache_dir",
"pid", "user", "epoch" (the lease epoch the data was written under, or null if unknown),
"pending_ops", "dirty_files", "dirty_bytes", "since" (wall time the host first saw the
orphan), "updated" (wall time of this version), "reason"}. Wall times are the publishing
host's; nobody compares them with another clock, they are for humans.

Invariants:
- The name is `<host>-<hash>.json`: the host name reduced to [A-Za-z0-9_.-] plus a hash of
  (host, machine id, cache dir), so two caches never share a marker, and one cache keeps its
  marker across restarts (a new one replaces it).
- A marker is a mutable status record, not a claim: it is replaced with rename() over the
  old one (readers see the old or the new record, never a torn one), and removed with
  unlink(). Nothing else ever depends on it: a missing or stale marker hides or shows a
  warning, it cannot lose data or let two hosts write.
- Every directory is opened from the project's fd one name at a time with O_NOFOLLOW, and
  every file with O_NOFOLLOW (and O_NONBLOCK, so a planted FIFO cannot stall a reader): a
  symlink planted as `.safefs`, `.safefs/orphans` or a marker is never followed. A listing
  reports such entries, corrupt files and oversized files as skipped, with the reason.
- Files are 0644 and directories 0755 whatever the umask, like the lease files (the
  directory also takes the project root's group-write and setgid bits), so every host and
  user who can read the project can read the markers. Temp files start with "." and are
  never listed; a publisher removes its own temp files left by a crash.
- Strings read from a marker are made printable (control characters replaced) before anyone
  shows them: another user of the project may write anything here.

Threading: every OrphanStore method blocks (NFS) and holds no state between calls; callers
run them in worker threads behind a CapacityLimiter, with a timeout (the daemon abandons a
thread stuck in a hung NFS call). Record helpers are pure.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import hashlib
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

from safefs import layout
from safefs.lease.store import FILE_MODE, control_dir_fd

SUFFIX = ".json"
MAX_RECORD_BYTES = 64 << 10  # a record is a few hundred bytes; read no more than this
MAX_LISTED = 1000  # markers read by one listing (more are reported as skipped)
MAX_TEXT = 4096  # longest string kept from a record
RECORD_VERSION = 1

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def record_name(host: str, machine_id: str, cache_dir: str) -> str:
    """The marker name (without `.json`) of one cache dir on one host."""
    digest = hashlib.sha256("\0".join((host, machine_id, cache_dir)).encode("utf-8", "surrogateescape"))
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host).lstrip(".-")[:64] or "host"
    return f"{safe}-{digest.hexdigest()[:12]}"


def printable(text: str) -> str:
    """`text` with control characters replaced, cut to MAX_TEXT: safe to print to a terminal."""
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_TEXT])


@dataclasses.dataclass(frozen=True)
class OrphanRecord:
    host: str
    machine_id: str
    cache_dir: str
    pid: int
    user: str
    epoch: int | None
    pending_ops: int
    dirty_files: int
    dirty_bytes: int
    since: float
    updated: float
    reason: str

    @property
    def name(self) -> str:
        return record_name(self.host, self.machine_id, self.cache_dir)

    def to_dict(self) -> dict[str, Any]:
        return {"v": RECORD_VERSION, **dataclasses.asdict(self)}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: Any) -> OrphanRecord:
        """The record in `data` (a decoded marker); ValueError if it is not a valid one."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("v") != RECORD_VERSION:
            raise ValueError(f"unknown record version {data.get('v')!r}")
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = data.get(field.name)
            if field.name in ("host", "machine_id", "cache_dir", "user", "reason"):
                if not isinstance(value, str):
                    raise ValueError(f"{field.name} is not a string")
                value = printable(value)
            elif field.name in ("since", "updated"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{field.name} is not a number")
                value = float(value)
            elif field.name == "epoch" and value is None:
                pass
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{field.name} is not a non-negative integer")
            values[field.name] = value
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """An entry of the orphans directory that is not a readable marker, and why."""

    name: str
    error: str


@dataclasses.dataclass(frozen=True)
class Listing:
    records: list[tuple[str, OrphanRecord]]  # (marker name, record), sorted by name
    skipped: list[Skipped]


class OrphanStore:
    """The markers of one project (`<project>/.safefs/orphans/`)."""

    def __init__(self, project: Path) -> None:
        self.project = project
        self.path = layout.path(project, layout.ORPHANS)

    def __repr__(self) -> str:
        return f"OrphanStore({str(self.path)!r})"

    def publish(self, record: OrphanRecord) -> str:
        """Write `record` as its marker (temp file, fsync, rename over); return the marker name."""
        name = record.name
        dir_fd = self._dir_fd(create=True)
        try:
            tmp = f".{name}.{secrets.token_hex(6)}.tmp"
            fd = os.open(tmp, _CREATE_FLAGS, FILE_MODE, dir_fd=dir_fd)
            try:
                try:
                    os.fchmod(fd, FILE_MODE)
                    _write_all(fd, record.to_bytes())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, name + SUFFIX, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                _unlink_quietly(dir_fd, tmp)
                raise
            os.fsync(dir_fd)  # the new name is durable (on NFS the RENAME already was)
            self._remove_stale_temps(dir_fd, name)
            return name
        finally:
            os.close(dir_fd)

    def remove(self, name: str) -> bool:
        """Remove marker `name`; True if there was one. A missing marker (or directory) is fine."""
        _check_name(name)
        try:
            dir_fd = self._dir_fd()
        except FileNotFoundError:
            return False
        try:
            self._remove_stale_temps(dir_fd, name)
            try:
                os.unlink(name + SUFFIX, dir_fd=dir_fd)
            except FileNotFoundError:
                return False
            os.fsync(dir_fd)
            return True
        finally:
            os.close(dir_fd)

    def read(self, name: str) -> OrphanRecord | None:
        """Marker `name`, or None if there is none. ValueError if it is not a valid marker."""
        _check_name(name)
        try:
            dir_fd = self._dir_fd()
        except FileNotFoundError:
            return None
        try:
            return _read_record(dir_fd, name + SUFFIX)
        except FileNotFoundError:
            return None
        finally:
            os.close(dir_fd)

    def list(self) -> Listing:
        """Every marker, sorted by name; entries that are not valid markers come as skipped."""
        try:
            dir_fd = self._dir_fd()
        except FileNotFoundError:
            return Listing([], [])
        records: list[tuple[str, OrphanRecord]] = []
        skipped: list[Skipped] = []
        try:
            names = sorted(n for n in os.listdir(dir_fd) if n.endswith(SUFFIX) and not n.startswith("."))
            if len(names) > MAX_LISTED:
                skipped.append(Skipped(f"{len(names) - MAX_LISTED} more", f"more than {MAX_LISTED} markers; not read"))
            for entry in names[:MAX_LISTED]:
                name = entry[: -len(SUFFIX)]
                try:
                    records.append((name, _read_record(dir_fd, entry)))
                except FileNotFoundError:
                    continue  # removed since the listing: nothing to show
                except (OSError, ValueError) as exc:
                    skipped.append(Skipped(printable(entry), _why(exc)))
        finally:
            os.close(dir_fd)
        return Listing(records, skipped)

    # -- helpers --------------------------------------------------------------------------

    def _dir_fd(self, *, create: bool = False) -> int:
        """An fd of `<project>/.safefs/orphans`, never through a symlink (created if asked)."""
        return control_dir_fd(self.project, layout.ORPHANS, create=create)

    @staticmethod
    def _remove_stale_temps(dir_fd: int, name: str) -> None:
        """Our own temp files: one publisher per marker (the cache dir is locked), so any
        temp file of this name that is not being written right now was left by a crash."""
        prefix = f".{name}."
        for entry in os.listdir(dir_fd):
            if entry.startswith(prefix) and entry.endswith(".tmp"):
                _unlink_quietly(dir_fd, entry)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a marker name: {name!r}")


def _read_record(dir_fd: int, entry: str) -> OrphanRecord:
    try:
        fd = os.open(entry, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == _errno.ELOOP:
            raise ValueError("a symlink (not followed)") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = _read_upto(fd, MAX_RECORD_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
    try:
        decoded = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not valid JSON") from None
    return OrphanRecord.from_dict(decoded)


def _read_upto(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _unlink_quietly(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass  # a temp file left behind is garbage, not a hazard: nothing lists dot files


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return printable(str(exc))
