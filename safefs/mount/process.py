"""What the daemon process needs around the services: the ready message to `safefs mount`,
the boot id, and the periodic sync of the journal.

Threading: the trio thread (`ReadyFd` also before trio runs); the journal sync runs in the
journal's worker thread (InodeTable.sync).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from safefs.errors import SafefsError

if TYPE_CHECKING:
    from safefs.inodes import InodeTable

JOURNAL_SYNC_INTERVAL = 1.0


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class ReadyFd:
    """The one-line message that tells `safefs mount` how start-up went."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def send(self, message: dict[str, Any]) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, (json.dumps(message) + "\n").encode())
        except OSError:
            pass  # the parent went away; carry on serving
        finally:
            os.close(self._fd)
            self._fd = None

    def failed(self, exc: SafefsError) -> None:
        self.send(
            {"ok": False, "error": {"type": type(exc).__name__, "message": exc.message,
                                    "hint": exc.hint, "exit_code": int(exc.exit_code)}}
        )  # fmt: skip


async def sync_journal_periodically(table: InodeTable) -> None:
    """Bound what a host crash can take: committed changes reach the disk within a second."""
    synced = -1
    while True:
        await trio.sleep(JOURNAL_SYNC_INTERVAL)
        if table.commits != synced:
            synced = table.commits
            await table.sync()
