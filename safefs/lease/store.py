"""Blocking, NFS-safe operations on the lease files (an in-memory twin is in tests/doubles.py).

The files, in `<project>/.safefs/` (the whole tree is drawn in safefs/layout.py):
  lease/epoch.N     immutable record of epoch N; created only by link(), never deleted
  lease/hb.N        heartbeat of epoch N: a counter its holder rewrites in place and fsyncs
  lease/released.N  clean-release marker; created only by link()
  lease/tmp/        uniquely named temp files, the sources of those links
  quarantine/N/     staging files of an epoch that was taken over, moved aside for recovery

Invariants:
- A name is claimed only by link()ing a complete, fsynced temp file to it: never taken with
  rename(), never broken with unlink(). The server's EEXIST is the final word, after one check:
  a retransmitted LINK may report EEXIST although it landed, so the target's inode is compared
  with the temp file's (and the caller compares the record's nonce with its own).
- Every observation opens the file and uses fstat (close-to-open consistency gives fresh data
  and attributes), never a possibly cached stat() of a name. A stale directory listing is
  harmless: the newest epoch is probed forward until the server says ENOENT.
- Files are 0644 and directories 0755 whatever the umask (fchmod/chmod after creating), so
  every user who can read the project can read its lease. Directories also take the project
  root's group-write and setgid bits, so a group-shared project stays claimable by the group.
- No policy: the store reports facts; lease.model decides.

Threading: every DirLeaseStore method blocks (NFS). The keeper calls them from worker threads
behind its "lease" CapacityLimiter; a DirLeaseStore holds no mutable state.
"""

from __future__ import annotations

import errno as _errno
import os
import pwd
import re
import secrets
import socket
import stat
from pathlib import Path
from typing import Protocol

from safefs import layout, procs
from safefs.layout import epoch_name, hb_name, released_name
from safefs.lease.model import CorruptLease, EpochRecord, Heartbeat, Identity, Observation

FILE_MODE = 0o644
DIR_MODE = 0o755
HEARTBEAT_MAX = 4096  # a heartbeat is one short line; read no more than this

_EPOCH = re.compile(r"epoch\.(\d{12})")


class LeaseStore(Protocol):
    """What the keeper needs from a lease backend. Every method may block; OSError means failed."""

    def observe(self) -> Observation:
        """Read the newest epoch, its record, whether it was released, and its heartbeat."""

    def claim(self, record: EpochRecord) -> EpochRecord:
        """Try to create `epoch.<record.epoch>` with `record`; return the record found there.

        It is `record` (or an earlier claim of ours, same nonce) if we won, another host's if not.
        """

    def renew(self, epoch: int, beat: bytes) -> bool:
        """Rewrite and fsync `hb.<epoch>` with `beat`; return True if `epoch.<epoch+1>` exists."""

    def release(self, epoch: int, note: bytes) -> None:
        """Link `released.<epoch>` (with `note` in it). Already released counts as done."""

    def quarantine(self, epoch: int) -> int:
        """Move the entries of `staging/k/` to `quarantine/k/` for every k <= epoch; return how many."""

    def pid_alive(self, pid: int, start_time: int = 0) -> bool:
        """Whether `pid` runs on this host (asked only when the holder shares our pid namespace);
        a zombie is dead, and so is a pid whose process did not start at `start_time` (if non-zero)."""


# -- this host --------------------------------------------------------------------------------


def local_identity(host_id: str | None = None) -> Identity:
    """This process's identity; `host_id` (--host-id) replaces the host name for humans and tests."""
    uid = os.getuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return Identity(
        host=host_id or socket.gethostname(),
        machine_id=_first_line("/etc/machine-id", "/var/lib/dbus/machine-id"),
        boot_id=_first_line("/proc/sys/kernel/random/boot_id"),
        pidns=os.stat("/proc/self/ns/pid").st_ino,
        pid=os.getpid(),
        uid=uid,
        user=user,
        nonce=secrets.token_hex(8),
        start_time=procs.start_time(os.getpid()),
    )


def _first_line(*paths: str) -> str:
    for path in paths:
        try:
            with open(path, encoding="ascii") as f:
                return f.readline().strip()
        except OSError:
            continue
    return ""  # unknown: then only the boot id and pid namespace tell hosts apart


def process_alive(pid: int, start_time: int = 0) -> bool:
    return procs.process_alive(pid, start_time)


# -- the directory backend --------------------------------------------------------------------


_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOFOLLOW_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class DirLeaseStore:
    """The lease in `<project>/.safefs/lease/`, safe on NFS (research/lease.md section 5).

    Every directory below the project is opened from the project's own descriptor one name
    at a time with O_NOFOLLOW, and every file with O_NOFOLLOW: a symlink planted in
    `.safefs/` can never make safefs read, write or move anything outside the project.
    """

    def __init__(self, project: Path) -> None:
        self.project = project
        self.root = layout.path(project)
        self.lease_dir = self.root / layout.LEASE

    def __repr__(self) -> str:
        return f"DirLeaseStore({str(self.lease_dir)!r})"

    def __str__(self) -> str:  # for messages: the path, not Python syntax
        return str(self.lease_dir)

    def _dir_fd(self, *parts: str, create: bool = False) -> int:
        return control_dir_fd(self.project, *parts, create=create)

    def observe(self) -> Observation:
        try:
            dir_fd = self._dir_fd(layout.LEASE)
        except FileNotFoundError:
            return Observation(0, None, False, None)
        try:
            n = _newest_epoch(dir_fd)
            if n == 0:
                return Observation(0, None, False, None)
            record = EpochRecord.from_bytes(_read_at(dir_fd, epoch_name(n)))
            if record.epoch != n:
                raise CorruptLease(f"{self.lease_dir / epoch_name(n)} holds a record of epoch {record.epoch}")
            released = _exists_at(dir_fd, released_name(n))
            return Observation(n, record, released, _heartbeat_at(dir_fd, hb_name(n)))
        finally:
            os.close(dir_fd)

    def claim(self, record: EpochRecord) -> EpochRecord:
        holder = record.holder
        return self._publish(record.to_bytes(), f"{holder.host}.{holder.pid}.{holder.nonce}",
                             epoch_name(record.epoch), record)  # fmt: skip

    def _publish(self, content: bytes, label: str, name: str, record: EpochRecord | None) -> EpochRecord:
        """link() a complete temp file to `name` in lease/. For a claim (`record` given) return
        the record found there: ours if our link landed, the winner's otherwise."""
        lease_fd = self._dir_fd(layout.LEASE, create=True)
        tmp_fd = self._dir_fd(layout.LEASE, layout.LEASE_TMP, create=True)
        try:
            tmp, tmp_ino = _write_temp(tmp_fd, content, label)
            try:
                try:
                    os.link(tmp, name, src_dir_fd=tmp_fd, dst_dir_fd=lease_fd, follow_symlinks=False)
                except FileExistsError:
                    if record is None:
                        return record  # type: ignore[return-value]  # released either way
                    fd = os.open(name, _NOFOLLOW_READ, dir_fd=lease_fd)
                    try:
                        if os.fstat(fd).st_ino == tmp_ino:
                            return record  # our LINK landed; its retransmission got the EEXIST
                        return EpochRecord.from_bytes(_read_fd(fd))
                    finally:
                        os.close(fd)
                # On a local disk the new name is durable only once its directory is synced; on
                # NFS the LINK is already synchronous on the server and this costs one COMMIT.
                os.fsync(lease_fd)
                return record  # type: ignore[return-value]
            finally:
                try:
                    os.unlink(tmp, dir_fd=tmp_fd)
                except OSError:
                    pass  # a temp file left behind is garbage, not a hazard: nothing reads tmp/
        finally:
            os.close(tmp_fd)
            os.close(lease_fd)

    def renew(self, epoch: int, beat: bytes) -> bool:
        dir_fd = self._dir_fd(layout.LEASE)
        try:
            try:
                fd = os.open(hb_name(epoch), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except FileNotFoundError:
                fd = os.open(hb_name(epoch), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             FILE_MODE, dir_fd=dir_fd)  # fmt: skip
                os.fchmod(fd, FILE_MODE)
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(_errno.EINVAL, "the heartbeat is not a regular file", hb_name(epoch))
                _pwrite_all(fd, beat)
                os.ftruncate(fd, len(beat))
                os.fsync(fd)
            finally:
                os.close(fd)
            return _exists_at(dir_fd, epoch_name(epoch + 1))
        finally:
            os.close(dir_fd)

    def release(self, epoch: int, note: bytes) -> None:
        self._publish(note, f"released.{epoch}", released_name(epoch), None)

    def quarantine(self, epoch: int) -> int:
        try:
            staging_fd = self._dir_fd(layout.STAGING)
        except FileNotFoundError:
            return 0
        moved = 0
        try:
            epochs = [name for name in os.listdir(staging_fd) if name.isdigit() and int(name) <= epoch]
            for name in epochs:
                try:
                    src_fd = os.open(name, _NOFOLLOW_DIR, dir_fd=staging_fd)
                except FileNotFoundError:
                    continue
                try:
                    entries = os.listdir(src_fd)
                    if not entries:
                        continue
                    dst_fd = self._dir_fd(layout.QUARANTINE, name, create=True)
                    try:
                        # One rename per entry, not per directory: a late RENAME from the old
                        # holder names its source by (directory, name), so it now fails with
                        # ENOENT instead of landing.
                        for entry in entries:
                            os.rename(entry, entry, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
                            moved += 1
                    finally:
                        os.close(dst_fd)
                finally:
                    os.close(src_fd)
        finally:
            os.close(staging_fd)
        return moved

    def pid_alive(self, pid: int, start_time: int = 0) -> bool:
        return process_alive(pid, start_time)


def control_dir_fd(project: Path, *parts: str, create: bool = False) -> int:
    """An fd of `<project>/.safefs/<parts...>`, opened one name at a time, never through a
    symlink. With `create`, missing directories are made 0755 plus the project root's
    group-write and setgid bits (a group-shared project stays usable by the group)."""
    fd = os.open(project, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in (os.fsdecode(layout.DIR), *parts):
            if create:
                _ensure_dir_at(project, fd, part)
            child = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _ensure_dir_at(project: Path, dir_fd: int, name: str) -> None:
    try:
        os.mkdir(name, DIR_MODE, dir_fd=dir_fd)
    except FileExistsError:
        return
    try:
        shared = os.stat(project).st_mode & (stat.S_ISGID | stat.S_IWGRP)
    except OSError:
        shared = 0
    _chmod_dir_at(dir_fd, name, DIR_MODE | shared)


def _chmod_dir_at(dir_fd: int, name: str, mode: int) -> None:
    fd = os.open(name, _NOFOLLOW_DIR, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _write_temp(tmp_fd: int, content: bytes, label: str) -> tuple[str, int]:
    """A complete, fsynced file under a name nobody else uses; returns its name and inode."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:160]
    name = f"{safe}.{secrets.token_hex(6)}"
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE, dir_fd=tmp_fd)
    try:
        os.fchmod(fd, FILE_MODE)
        _pwrite_all(fd, content)
        os.fsync(fd)
        ino = os.fstat(fd).st_ino
    except BaseException:
        os.close(fd)
        try:
            os.unlink(name, dir_fd=tmp_fd)
        except OSError:
            pass
        raise
    os.close(fd)
    return name, ino


def _newest_epoch(dir_fd: int) -> int:
    n = max((int(m.group(1)) for name in os.listdir(dir_fd) if (m := _EPOCH.fullmatch(name))), default=0)
    # The listing may be stale (NFS caches directories): probe forward until the server says no.
    while _exists_at(dir_fd, epoch_name(n + 1)):
        n += 1
    return n


def _exists_at(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, _NOFOLLOW_READ, dir_fd=dir_fd)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _read_fd(fd: int, limit: int = 1 << 20) -> bytes:
    chunks = []
    size = 0
    while size < limit:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _heartbeat_at(dir_fd: int, name: str) -> Heartbeat | None:
    try:
        fd = os.open(name, _NOFOLLOW_READ, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        content = os.pread(fd, HEARTBEAT_MAX, 0)
    finally:
        os.close(fd)
    return Heartbeat(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, content)


def _pwrite_all(fd: int, data: bytes) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], done)
