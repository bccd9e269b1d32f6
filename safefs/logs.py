"""The daemon's log: where it goes, how much, and the recent problems `status` shows.

Where: `--log-file FILE` (or `log_file` in the config file) is written with rotation
(ROTATE_BYTES, ROTATE_KEEP old files FILE.1 ...). `safefs mount` in the background passes
`CACHE_DIR/daemon.log` when none is given. Without a file the log goes to stderr; under
systemd, stderr is the journal (JOURNAL_STREAM names it), and each line then starts with its
syslog priority (`<3>` for errors, sd-daemon(3)) so `journalctl -p warning` works, and carries
no timestamp of its own (the journal has one).

Invariants:
- When stderr is the log file itself (the background daemon's stderr catches tracebacks and
  faulthandler dumps), the file handler is the only handler, and after a rotation stderr is
  pointed at the new file, so nothing is written twice or into a rotated file.
- `recent()` keeps the last RECENT_MAX WARNING-or-worse messages (repeats folded into a count):
  the errors a user must act on show in `safefs status`, not only in the log.
Thread-safe as logging is: handlers may be called from worker threads.
"""

from __future__ import annotations

import collections
import logging
import logging.handlers
import os
import sys
import threading
from pathlib import Path
from typing import Any

ROTATE_BYTES = 10 << 20
ROTATE_KEEP = 3
RECENT_MAX = 20
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "<%(priority)d>%(levelname)s %(name)s: %(message)s"
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _RotatingFile(logging.handlers.RotatingFileHandler):
    """Rotates, and keeps fd 2 on the current file when stderr was that file."""

    def __init__(self, path: Path, *, owns_stderr: bool) -> None:
        super().__init__(path, maxBytes=ROTATE_BYTES, backupCount=ROTATE_KEEP, encoding="utf-8")
        self.owns_stderr = owns_stderr

    def _open(self) -> Any:
        # 0600 also for the files rotation creates: the log names files of the project.
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def doRollover(self) -> None:  # noqa: N802 (logging's name)
        super().doRollover()
        if self.owns_stderr and self.stream is not None:
            sys.stderr.flush()
            os.dup2(self.stream.fileno(), 2)


class _Priority(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.priority = _PRIORITY.get(record.levelno, 6)
        return True


class RecentProblems(logging.Handler):
    """The last WARNING-or-worse messages, newest last, repeats counted."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._items: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 (a bad log call must not break the daemon)
            return
        with self._guard:
            item = self._items.pop(message, None) or {"message": message, "count": 0}
            item.update(level=record.levelname.lower(), time=record.created, count=item["count"] + 1)
            self._items[message] = item
            while len(self._items) > RECENT_MAX:
                self._items.popitem(last=False)

    def items(self) -> list[dict[str, Any]]:
        with self._guard:
            return [dict(item) for item in self._items.values()]


_recent = RecentProblems()


def recent() -> list[dict[str, Any]]:
    """The recent warnings and errors, oldest first: {"level", "message", "time", "count"}."""
    return _recent.items()


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        st = os.fstat(2)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def setup(level: str = "info", log_file: Path | None = None) -> str:
    """Configure the root logger for the daemon; return where the log goes (for a log line)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    handler: logging.Handler
    if log_file is not None:
        owns_stderr = _same_file(2, log_file)
        handler = _RotatingFile(log_file, owns_stderr=owns_stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        where = f"{log_file} (rotated at {ROTATE_BYTES >> 20} MiB, {ROTATE_KEEP} kept)"
        try:
            os.chmod(log_file, 0o600)  # it names files of the project: private like the cache
        except OSError:
            pass
    elif _stderr_is_journal():
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_Priority())
        handler.setFormatter(logging.Formatter(JOURNAL_FORMAT))
        where = "the systemd journal"
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        where = "stderr"
    root.addHandler(handler)
    root.addHandler(_recent)
    return where
