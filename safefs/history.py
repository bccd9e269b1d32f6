"""The project's history: who held the write lease, from where, and what happened to it.

`<project>/.safefs/history/<host>-<hash>.jsonl`: one file per host (the hash is of the host
name and machine id), one JSON object per line: {"v": 1, "time" (wall seconds, the writing
host's clock), "event", "host", "user", "pid", "epoch", "mnt", "detail"}. Events:
acquire, takeover, release, self-fence (this host lost its lease), recover, conflict.
`safefs history MNT|SRC` merges every host's file and sorts by time.

Invariants:
- Appends from two hosts never tear a record: each host writes only its own file (NFS has no
  atomic O_APPEND across clients), with one write() of one whole line, O_APPEND; mounts on
  one host share the host's file, which the local kernel appends to atomically.
- Bounded: a file that reached ROTATE_BYTES is renamed to `<name>.old.jsonl` (replacing the
  previous one) before the next append, so a host keeps at most about 2 * ROTATE_BYTES.
- Reading tolerates anything another user of the project may have written: lines that are
  not a JSON object (a torn tail after a crash) are counted, not fatal; strings are made
  printable; at most MAX_READ bytes are read per file. Directories and files are opened
  without following symlinks (as lease and orphan files are).
- The history is a record for humans: nothing in safefs decides anything from it, and a failed
  append is logged by the caller, never fatal.

Threading: append() and read() block (NFS); the daemon calls append() in a worker thread with a
timeout, the CLI calls read() directly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

from safefs import layout
from safefs.lease.store import FILE_MODE, control_dir_fd

SUFFIX = ".jsonl"
OLD_SUFFIX = ".old.jsonl"
ROTATE_BYTES = 1 << 20
MAX_READ = 4 * ROTATE_BYTES
MAX_LINE = 4000  # a record is written in one write(); longer details are cut
EVENTS = ("acquire", "takeover", "release", "self-fence", "recover", "conflict")
RECORD_VERSION = 1

_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.jsonl")


def file_name(host: str, machine_id: str) -> str:
    """This host's history file name."""
    digest = hashlib.sha256(f"{host}\0{machine_id}".encode("utf-8", "surrogateescape")).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host).lstrip(".-")[:64] or "host"
    return f"{safe}-{digest}{SUFFIX}"


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return "".join(c if c.isprintable() else "?" for c in value[:MAX_LINE])
    return value


@dataclasses.dataclass(frozen=True)
class Event:
    event: str
    host: str
    user: str
    pid: int
    epoch: int | None
    mnt: str
    detail: str = ""
    time: float = dataclasses.field(default_factory=time.time)

    def to_line(self) -> bytes:
        record = {"v": RECORD_VERSION, **dataclasses.asdict(self)}
        line = json.dumps(record, sort_keys=True, ensure_ascii=True)
        if len(line) > MAX_LINE:
            record["detail"] = self.detail[: max(0, len(self.detail) - (len(line) - MAX_LINE) - 3)] + "..."
            line = json.dumps(record, sort_keys=True, ensure_ascii=True)
        return line.encode() + b"\n"


@dataclasses.dataclass
class History:
    records: list[dict[str, Any]]  # sorted by time, oldest first
    bad_lines: int  # lines that were not a record (a torn tail, or junk)
    files: list[str]


class HistoryLog:
    """Appends this host's events to the project's history; reads every host's."""

    def __init__(self, project: Path, host: str, machine_id: str) -> None:
        self.project = project
        self.name = file_name(host, machine_id)

    @property
    def path(self) -> Path:
        return layout.path(self.project, layout.HISTORY, self.name)

    def append(self, event: Event) -> None:
        """Append one record with one write(); rotate first if the file is full. Raises OSError."""
        line = event.to_line()
        dir_fd = control_dir_fd(self.project, layout.HISTORY, create=True)
        try:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.name, flags, FILE_MODE, dir_fd=dir_fd)
            try:
                if os.fstat(fd).st_size >= ROTATE_BYTES:
                    os.close(fd)
                    fd = -1
                    os.rename(self.name, self.name[: -len(SUFFIX)] + OLD_SUFFIX, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                    fd = os.open(self.name, flags, FILE_MODE, dir_fd=dir_fd)
                os.fchmod(fd, FILE_MODE)  # readable by every host and user of the project, whatever the umask
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"short append to {self.name}: {written} of {len(line)} bytes")
            finally:
                if fd >= 0:
                    os.close(fd)
        finally:
            os.close(dir_fd)


def read(project: Path) -> History:
    """Every host's history in `project`, merged and sorted by time. Raises OSError only if the
    history directory exists but cannot be listed."""
    try:
        dir_fd = control_dir_fd(project, layout.HISTORY)
    except FileNotFoundError:
        return History([], 0, [])
    records: list[dict[str, Any]] = []
    bad = 0
    files = []
    try:
        for entry in sorted(os.listdir(dir_fd)):
            if not _FILE_NAME.fullmatch(entry):
                continue
            try:
                data = _read_file(dir_fd, entry)
            except OSError:
                bad += 1
                continue
            files.append(entry)
            for raw in data.splitlines():
                try:
                    record = json.loads(raw)
                except ValueError:
                    record = None
                if not isinstance(record, dict) or not isinstance(record.get("time"), (int, float)):
                    bad += 1
                    continue
                records.append({key: _printable(value) for key, value in record.items()})
    finally:
        os.close(dir_fd)
    records.sort(key=lambda r: r["time"])
    return History(records, bad, files)


def _read_file(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{name} is not a regular file")
        chunks, total = [], 0
        while total < MAX_READ:
            chunk = os.read(fd, min(1 << 20, MAX_READ - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
