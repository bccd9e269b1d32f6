"""What the `safefs` command prints: a status as aligned lines, receipts of sync, unmount and
recover, progress bars and wait reports, all read from the typed results of the control
protocol (safefs.control.protocol), never from dict keys.

Invariants:
- No Python syntax reaches a human: yes/no, none, durations and sizes in words; a field or a
  key this side does not know (a newer daemon's) is still shown, never hidden.
- Progress is drawn on stderr, only on a terminal and only after PROGRESS_DELAY; rich is
  imported only then. What a command waits for is said (terminal or not) after
  WAIT_REPORT_DELAY.
- CLI layer: imports none of trio, pyfuse3, lmdb.
Single-threaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from safefs import human
from safefs.config import MountConfig
from safefs.control import protocol
from safefs.control.protocol import (
    Conflict,
    EtcdStatistics,
    Holder,
    LeaseStatistics,
    LogWarning,
    Orphan,
    ProgressReport,
    Status,
    SyncReceipt,
    UnmountReceipt,
    WriteBackError,
)
from safefs.errors import Unwritten
from safefs.human import human_bytes, human_seconds, plural

if TYPE_CHECKING:
    from safefs.cli_launcher import ProcessWatch

PROGRESS_DELAY = 0.5  # operations quicker than this show no progress bar
WAIT_REPORT_DELAY = 1.0  # a command that waits longer than this says what it waits for


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
        text += f", at {human_time(item.time)}"
    return text


@dataclasses.dataclass(frozen=True)
class Unanswered:
    """A daemon `safefs status` found a socket of, but got no status from (in place of its status)."""

    socket: str
    error: str

    def format(self) -> str:
        return f"error:  {self.error}\nsocket: {self.socket}"


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


def report_to(bar: ProgressBar, waits: WaitReport) -> Callable[[ProgressReport], None]:
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


def human_time(value: Any) -> str:
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
            text += f", since {human_time(holder.since)}"
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
        text += f" since {human_time(orphan.since)}"
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
        repeats = f" ({item.count} times, last at {human_time(item.time)})"
    when = "" if repeats else f" at {human_time(item.time)}"
    return f"{item.level or 'warning'}: {item.message}{when}{repeats}"


def describe_write_back_error(error: WriteBackError) -> str:
    retry = f" (retry at {human_time(error.retry_at)})" if error.retry_at is not None else ""
    return f"{error.op} {error.path}: {error.error}{retry}"
