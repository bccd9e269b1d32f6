"""Refuse unsafe or impossible set-ups before anything is mounted (DESIGN.md G7).

`check_setup(config)` raises `Refused` (one line naming the path, plus a hint saying how
to fix it) when:
- the project (SRC) is missing, not a directory, or not readable;
- the mountpoint (MNT) is missing, not a directory, not empty, already a mountpoint, or
  a dead FUSE mount;
- SRC, MNT and the cache dir overlap (one inside another, after realpath): a mountpoint
  inside the project or the cache makes the daemon read through its own mount and hang;
  a cache inside the project or the mount would be flushed into, or served from, itself;
- the cache dir (its nearest existing ancestor) is on a network or FUSE filesystem: LMDB
  needs local locking and mmap, and "fsync returned" must mean "on this host's disk" (G2);
- this user cannot open /dev/fuse, or asks for --allow-other while not root and
  /etc/fuse.conf lacks `user_allow_other` (fusermount3 would refuse it after the lease
  was taken, with a message that does not say how to fix it).
Two daemons on one cache dir are caught later by the journal's lock, not here.

`fuse_mount_owner(path)` is the uid that mounted the FUSE filesystem at `path`.

`fs_type_name(path)` names the filesystem a path is on ("ext4", "nfs4", "fuse.sshfs"...).

The filesystem type comes from statfs(2)'s f_type (through ctypes, libc) and from the
longest matching mount point in /proc/self/mountinfo; either one finding a network or FUSE
type is enough to refuse.

Resource layer: stdlib only, blocking (stat, statfs, reads /proc); call it before starting
trio or from a worker thread. Holds no state.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import grp
import os
import platform
import pwd
import stat
from pathlib import Path

from safefs import mounttable
from safefs.config import MountConfig
from safefs.errors import Refused

# statfs f_type magic numbers of filesystems a cache must not live on.
UNSAFE_FS_MAGIC: dict[int, str] = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x00C36400: "ceph",
    0x5346414F: "afs",
    0x6B414653: "kafs",
    0x73757245: "coda",
    0x0000564C: "ncpfs",
    0x01021997: "9p",
    0x19830326: "beegfs",
    0x13661366: "orangefs",
}

# Local filesystems, only so that fs_type_name can name them without /proc.
LOCAL_FS_MAGIC: dict[int, str] = {
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x01021994: "tmpfs",
    0x2FC12FC1: "zfs",
    0x794C7630: "overlay",
    0xF2F52010: "f2fs",
    0x9FA0: "proc",
    0x62656572: "sysfs",
}

# mountinfo type names (before any ".subtype") of filesystems a cache must not live on.
UNSAFE_FS_NAMES = frozenset(
    {
        "nfs", "nfs4", "smb", "smbfs", "smb3", "cifs", "fuse", "fuseblk", "lustre", "gpfs",
        "ceph", "afs", "kafs", "coda", "ncpfs", "9p", "beegfs", "orangefs", "pvfs2", "glusterfs",
    }
)  # fmt: skip

# Kernel pseudo filesystems: nothing written there is stored on a disk.
PSEUDO_FS_NAMES = frozenset(
    {
        "proc",
        "sysfs",
        "cgroup",
        "cgroup2",
        "devpts",
        "debugfs",
        "tracefs",
        "securityfs",
        "configfs",
        "bpf",
        "pstore",
    }
)


def check_setup(config: MountConfig) -> None:
    """Raise `Refused` if mounting `config.src` at `config.mnt` with `config.cache_dir` is unsafe."""
    src = Path(os.path.realpath(config.src))
    mnt = resolve_mountpoint(config.mnt)
    cache = Path(os.path.realpath(config.cache_dir))
    check_fuse_access(allow_other=config.allow_other)
    _check_project(src)
    _check_overlaps(src, mnt, cache)
    _check_mountpoint(mnt)
    _check_cache_dir(cache)


def resolve_mountpoint(path: Path | str) -> Path:
    """The real absolute path of a mountpoint, without touching the mount itself.

    realpath() would lstat the mountpoint, and a stat of a FUSE mount whose daemon is stopped
    or wedged hangs: `safefs status` must answer exactly then. So the parent is resolved and
    the last component kept as it is when the mount table lists it as a mount point.
    """
    parent, name = os.path.split(os.path.abspath(path))
    candidate = Path(os.path.realpath(parent)) / name
    if mount_type_at(candidate) is not None:
        return candidate
    return Path(os.path.realpath(candidate))


def mount_type_at(path: Path | str) -> str | None:
    """The filesystem type mounted exactly at `path` (as the mount table spells it), or None."""
    target = os.fsencode(path)
    found = None
    for mount_point, fstype in _read_mountinfo():
        if mount_point == target:
            found = fstype  # the last mount on a path is the visible one
    return found


def fuse_mount_owner(path: Path | str) -> int | None:
    """The uid that mounted the FUSE filesystem at `path` (its `user_id=` option), or None."""
    target = os.fsencode(path)
    owner = None
    for mount in mounttable.read() or []:
        if mount.mount_point != target:
            continue
        owner = None  # the last mount on a path is the visible one
        for option in mount.super_options:
            if option.startswith(b"user_id="):
                owner = int(option[len(b"user_id=") :])
    return owner


def user_name(uid: int) -> str:
    """The login name of `uid`, or "uid N" if it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def fs_type_name(path: Path | str) -> str:
    """The type of the filesystem holding `path` (or its nearest existing ancestor)."""
    existing = _nearest_existing(Path(os.path.realpath(path)))
    name = _mount_fstype(existing)
    if name:
        return name
    magic = _statfs_magic(existing)
    if magic is None:
        return "unknown"
    return UNSAFE_FS_MAGIC.get(magic) or LOCAL_FS_MAGIC.get(magic) or f"0x{magic:x}"


def unsafe_filesystem(path: Path | str) -> str | None:
    """The name of the network or FUSE filesystem holding `path`, or None if it looks local."""
    existing = _nearest_existing(Path(os.path.realpath(path)))
    magic = _statfs_magic(existing)
    name = _mount_fstype(existing)
    if magic in UNSAFE_FS_MAGIC:
        return name or UNSAFE_FS_MAGIC[magic]
    if name and name.split(".", 1)[0] in UNSAFE_FS_NAMES:
        return name
    return None


# ---- the checks ------------------------------------------------------------------------------

FUSE_DEVICE = Path("/dev/fuse")
FUSE_CONF = Path("/etc/fuse.conf")


def check_fuse_access(*, allow_other: bool) -> None:
    """Refuse if this user cannot mount FUSE filesystems (with these options) at all."""
    me = user_name(os.getuid())
    try:
        st = os.stat(FUSE_DEVICE)
    except OSError:
        raise Refused(
            f"{FUSE_DEVICE} does not exist: FUSE is not available on this host",
            hint="load the fuse module (`sudo modprobe fuse`); in a container, pass the device in "
            "(e.g. docker run --device /dev/fuse)",
        ) from None
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        group = _group_name(st.st_gid)
        if st.st_gid != 0 and st.st_mode & 0o060 == 0o060:
            hint = f"ask an admin to add you to its group: `sudo usermod -aG {group} {me}`, then log in again"
        else:
            hint = (
                f"it is mode {stat.S_IMODE(st.st_mode):04o}, owner {user_name(st.st_uid)}, group {group}; "
                "an admin can open it to users with `sudo chmod 0666 /dev/fuse` (the usual default), "
                "or to a group with `sudo chgrp fuse /dev/fuse && sudo chmod 0660 /dev/fuse` "
                "(a udev rule keeps it after a reboot)"
            )
        raise Refused(f"you ({me}) cannot open {FUSE_DEVICE}, so you cannot mount FUSE filesystems", hint=hint)
    if allow_other and os.getuid() != 0 and not _user_allow_other():
        raise Refused(
            f"--allow-other needs `user_allow_other` in {FUSE_CONF}, and it is not set there",
            hint=f"ask an admin to add the line `user_allow_other` to {FUSE_CONF}, "
            "or mount without --allow-other (then only you can use the mount)",
        )


def _user_allow_other() -> bool:
    try:
        lines = FUSE_CONF.read_text(errors="replace").splitlines()
    except OSError:
        return False
    return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in lines)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)



def _check_project(src: Path) -> None:
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise Refused(
            f"project {src} does not exist", hint="give the project directory (on NFS) as SRC"
        ) from None
    except OSError as exc:
        raise Refused(
            f"cannot reach project {src}: {exc.strerror}", hint="check that its filesystem is mounted"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"project {src} is not a directory", hint="give the project's top directory as SRC")
    if not os.access(src, os.R_OK | os.X_OK):
        raise Refused(f"you cannot read project {src}", hint="check its permissions")


# (inner, outer, hint): the set-up is refused when the inner one lies within the outer one.
_OVERLAPS = (
    ("mountpoint", "project",
     "choose a mountpoint outside the project (the daemon would read it through its own mount)"),
    ("project", "mountpoint", "choose a mountpoint outside the project"),
    ("mountpoint", "cache dir", "choose a mountpoint outside the cache dir, or another --cache-dir"),
    ("cache dir", "mountpoint", "give a --cache-dir on a local disk outside the mountpoint"),
    ("cache dir", "project", "give a --cache-dir on a local disk outside the project"),
    ("project", "cache dir", "give a --cache-dir that does not contain the project"),
)  # fmt: skip


def _check_overlaps(src: Path, mnt: Path, cache: Path) -> None:
    paths = {"project": src, "mountpoint": mnt, "cache dir": cache}
    for inner, outer, hint in _OVERLAPS:
        if _is_within(paths[inner], paths[outer]):
            raise Refused(f"{inner} {paths[inner]} is inside the {outer} {paths[outer]}", hint=hint)


def _check_mountpoint(mnt: Path) -> None:
    # The mount table first: a stat of a wedged FUSE mount would hang.
    if mount_type_at(mnt) is not None:
        raise _already_mounted(mnt)
    try:
        st = os.stat(mnt)
    except FileNotFoundError:
        raise Refused(f"mountpoint {mnt} does not exist", hint=f"create it first: mkdir -p {mnt}") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise Refused(
                f"mountpoint {mnt} is a dead FUSE mount (its daemon is gone)",
                hint=f"unmount it with: fusermount3 -u -z {mnt}; `safefs recover` writes back what it left",
            ) from None
        raise Refused(f"cannot use mountpoint {mnt}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(f"mountpoint {mnt} is not a directory", hint="mount on an empty directory")
    if os.path.ismount(mnt):
        raise _already_mounted(mnt)
    try:
        with os.scandir(mnt) as entries:
            not_empty = any(True for _ in entries)
    except OSError as exc:
        raise Refused(f"cannot list mountpoint {mnt}: {exc.strerror}", hint="check its permissions") from None
    if not_empty:
        raise Refused(
            f"mountpoint {mnt} is not empty",
            hint="mount on an empty directory (the mount would hide the files in it)",
        )


def _already_mounted(mnt: Path) -> Refused:
    return Refused(
        f"{mnt} is already a mountpoint",
        hint=f"unmount it first (`safefs status` lists safefs mounts; a dead one: fusermount3 -u -z {mnt})",
    )


def _check_cache_dir(cache: Path) -> None:
    existing = _nearest_existing(cache)
    if existing == cache and not cache.is_dir():
        raise Refused(f"cache dir {cache} is not a directory", hint="give another --cache-dir")
    unsafe = unsafe_filesystem(cache)
    if unsafe is not None:
        raise Refused(
            f"cache dir {cache} is on {unsafe}, a network or FUSE filesystem; it must be on a local disk",
            hint="give a local --cache-dir (e.g. under /var/tmp or /scratch), or set XDG_CACHE_HOME to one",
        )
    fstype = fs_type_name(existing)
    if fstype in PSEUDO_FS_NAMES:
        raise Refused(
            f"cache dir {cache} is on {fstype}, which is not a disk",
            hint="give a --cache-dir on a local disk",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "cache dir" if existing == cache else f"cannot create cache dir {cache}: directory"
        raise Refused(f"{what} {existing} is not writable", hint="give a --cache-dir you can write to")


# ---- filesystem facts -----------------------------------------------------------------------


def _is_within(path: Path, ancestor: Path) -> bool:
    """True if `path` is `ancestor` or below it (both real absolute paths)."""
    return path == ancestor or ancestor in path.parents


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        try:
            os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            return candidate  # there, but broken (a dead mount): statfs/mountinfo still name it
        return candidate
    return Path("/")


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _statfs_magic(path: Path) -> int | None:
    """statfs(2) f_type of `path`, or None if it cannot be read."""
    libc = _libc()
    statfs = getattr(libc, "statfs", None)
    if statfs is None:
        return None
    buffer = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on x86_64
    if statfs(os.fsencode(path), buffer) != 0:
        return None
    # f_type is the first field: a long on most 64-bit ABIs, an unsigned int on s390x.
    field = ctypes.c_uint if platform.machine() == "s390x" else ctypes.c_ulong
    return field.from_buffer(buffer).value & 0xFFFFFFFF


def _read_mountinfo() -> list[tuple[bytes, str]]:
    """(mount point, filesystem type) of each mount, in mount order (none if unreadable)."""
    return [(mount.mount_point, mount.fstype) for mount in mounttable.read() or []]


def _mount_fstype(path: Path) -> str | None:
    """The type of the mount holding `path`: the longest mount point containing it, last one wins."""
    target = os.fsencode(path)
    best, best_length = None, -1
    for mount_point, fstype in _read_mountinfo():
        inside = mount_point == b"/" or target == mount_point or target.startswith(mount_point + b"/")
        if inside and len(mount_point) >= best_length:
            best, best_length = fstype, len(mount_point)
    return best
