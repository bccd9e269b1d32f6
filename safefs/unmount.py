"""Taking a FUSE mount down, and noticing that it is gone: `fusermount3 -u` and the mount table.

- `fusermount(mnt, lazy=...)` runs `fusermount3 -u [-z] MNT`. An unmount the kernel refuses
  because files are open is `Busy`, and changed nothing. The daemon runs it itself, in its
  own mount namespace, before it gives up the lease, so a refused unmount leaves the mount
  the writer (issue 9, point 5).
- `mount_present(device)` says whether the FUSE connection `device` ("MAJOR:MINOR") is still
  mounted anywhere in this process's mount namespace. A copy of the mount in another
  namespace (`unshare --mount` made after it was mounted) keeps the kernel connection open
  after the unmount here, so the daemon cannot rely on the kernel closing /dev/fuse to learn
  that its mount is gone; it polls this instead (see Shutdown.watch_mount, in safefs/mount/shutdown.py).

Invariants: stdlib only (the CLI imports it); blocking calls, run in a worker thread by async
callers; nothing here touches the mount itself (a stat of a wedged mount would hang).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from safefs import mounttable
from safefs.errors import Busy, SafefsError


def fusermount(mnt: Path | str, *, lazy: bool) -> None:
    """`fusermount3 -u [-z] MNT`; raises Busy if open files keep it, SafefsError otherwise."""
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), os.fspath(mnt)]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except FileNotFoundError:
        raise SafefsError("fusermount3 is not installed", hint="install the fuse3 package") from None
    if done.returncode == 0:
        return
    message = done.stderr.strip() or f"fusermount3 exited with status {done.returncode}"
    if "busy" in message.lower():
        raise Busy(f"{mnt} is busy: files or directories in it are still open")
    raise SafefsError(f"fusermount3 could not unmount {mnt}: {message}")


def mount_present(device: str, mountinfo: str = mounttable.MOUNTINFO) -> bool:
    """Whether a mount of `device` ("MAJOR:MINOR") is in the mount table (True if unreadable)."""
    mounts = mounttable.read(mountinfo)
    if mounts is None:
        return True  # cannot tell: never end a session on a guess
    return any(mount.device == device for mount in mounts)
