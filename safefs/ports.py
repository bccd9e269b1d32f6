"""What the services (fs, flusher) ask of the world around them: the lease, and the kernel's
caches. The daemon wires the real ones (the lease keeper, fuse_ops' notifier); these are the
shapes, and the stand-ins for a stack without a lease or a kernel.

Threading: as each implementation says; `WriteGate.publishable` is callable from any thread.
"""

from __future__ import annotations

from typing import Protocol


class WriteGate(Protocol):
    """What the filesystem asks before changing anything (the lease, DESIGN.md G1/G6)."""

    def require_writable(self) -> int:
        """Return the epoch allowed to write into the cache, or raise ReadOnly."""

    def require_publishable(self) -> int:
        """Return the epoch allowed to change the project, or raise ReadOnly."""

    def publishable(self) -> bool:
        """`require_publishable` as a yes or no, callable from any thread."""


class AlwaysWritable:
    epoch = 0

    def require_writable(self) -> int:
        return 0

    def require_publishable(self) -> int:
        return 0

    def writable(self) -> bool:
        return True

    def publishable(self) -> bool:
        return True


class Invalidator(Protocol):
    """Tells the kernel to forget what it cached. Callers hold no lock while awaiting it."""

    async def invalidate_inode(self, ino: int) -> None: ...
    async def invalidate_entry(self, parent: int, name: bytes) -> None: ...


    def later_inode(self, ino: int) -> None:
        """Queue an invalidation (for callers inside a request that the kernel would block)."""

    def later_entry(self, parent: int, name: bytes) -> None: ...


class NoInvalidator:
    async def invalidate_inode(self, ino: int) -> None:
        pass

    async def invalidate_entry(self, parent: int, name: bytes) -> None:
        pass

    def later_inode(self, ino: int) -> None:
        pass

    def later_entry(self, parent: int, name: bytes) -> None:
        pass
