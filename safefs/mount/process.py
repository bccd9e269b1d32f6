"""What the daemon process needs around the services: the ready message to `safefs mount`,
the boot id, loading the inode table and opening the lease store at start-up, and the
periodic sync of the journal.

Threading: the trio thread (`ReadyFd` also before trio runs); the journal sync runs in the
journal's worker thread (InodeTable.sync).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from safefs import projectconf
from safefs.errors import DaemonFailed, Refused, SafefsError
from safefs.inodes import InodeTable
from safefs.lease import backends

if TYPE_CHECKING:
    from safefs.config import LeaseTimings, MountConfig
    from safefs.fs import Limiters
    from safefs.journal import Journal
    from safefs.lease.backends import ProjectLeaseStore

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


async def load_table(config: MountConfig, journal: Journal, limiters: Limiters) -> InodeTable:
    """The inode table, loaded from the journal, of a cache of the project `config.src`."""
    table = InodeTable(journal, limiters.flush)
    table.load(await limiters.journal.run(journal.load))
    # A cache replayed onto another project would write its changes there: refuse before
    # anything (the lease included) is touched. Caches from before this check carry no name.
    project = table.meta.get("project")
    if project is not None and project != str(config.src):
        raise Refused(f"the cache dir {config.cache_dir} belongs to the project {project}, not {config.src}",
                      hint="give that project, or another --cache-dir")  # fmt: skip
    table.set_meta("project", str(config.src))  # committed by fs.start
    return table


async def open_lease_store(config: MountConfig) -> ProjectLeaseStore:
    """The project's lease store, as its configuration names it (the lease dir, or etcd)."""
    try:
        conf = await trio.to_thread.run_sync(projectconf.read, config.src)
    except OSError as exc:
        raise DaemonFailed(f"cannot read the project's configuration: {exc}") from exc
    return backends.open_store(config.src, conf, config.lease.t_break)


def lease_timings(config: MountConfig, store: ProjectLeaseStore) -> LeaseTimings:
    """The lease timings of the mount: with etcd, renewals (keepalives) often enough for its TTL."""
    timings = config.lease
    if store.etcd is not None:  # keepalive at a quarter of the etcd lease's TTL at most
        timings = dataclasses.replace(timings, renew=min(timings.renew, timings.t_break / 4))
    return timings


async def sync_journal_periodically(table: InodeTable) -> None:
    """Bound what a host crash can take: committed changes reach the disk within a second,
    and what is marked but left for a later commit (fetched bytes) is committed by then."""
    synced = -1
    while True:
        await trio.sleep(JOURNAL_SYNC_INTERVAL)
        if table.commits != synced or table.uncommitted:
            await table.commit()
            synced = table.commits
            await table.sync()
