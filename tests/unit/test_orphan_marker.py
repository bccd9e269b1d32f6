"""The orphan marker's upkeep (safefs/mount/orphan_marker.py) against a real project directory,
with the lease keeper and the unwritten counts stubbed: a follower with changes publishes a
marker with the counts, a writer removes a marker left behind once it has written everything
back, and a writer with no marker does not walk its dirty inodes every half second to learn
nothing.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from safefs.clock import SystemClock
from safefs.mount.orphan_marker import OrphanMarker
from safefs.orphans import OrphanRecord, OrphanStore

pytestmark = pytest.mark.timeout(60)


class Counts:
    """The unwritten counts, and how often anyone asked for them."""

    def __init__(self, ops: int = 0, files: int = 0, nbytes: int = 0) -> None:
        self.value = (ops, files, nbytes)
        self.calls = 0

    def __call__(self) -> tuple[int, int, int]:
        self.calls += 1
        return self.value


def make_marker(tmp_path: Path, role: str, counts: Counts) -> tuple[OrphanMarker, SimpleNamespace, Path]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    config = SimpleNamespace(src=src, cache_dir=tmp_path / "cache")
    keeper = SimpleNamespace(role=role, statistics=lambda: SimpleNamespace(state="released", lost_reason=None))
    identity = SimpleNamespace(host="hostA", machine_id="m-hostA", user="alice")
    marker = OrphanMarker(config, SystemClock(), keeper, identity, counts, lambda: None)  # type: ignore[arg-type]
    return marker, keeper, src


def records(src: Path) -> list[OrphanRecord]:
    return [record for _, record in OrphanStore(src).list().records]


def markers(src: Path) -> list[str]:
    return [record.host for record in records(src)]


async def test_a_follower_with_unwritten_changes_publishes_a_marker_with_its_counts(tmp_path: Path) -> None:
    counts = Counts(ops=2, files=3, nbytes=4096)
    marker, _, src = make_marker(tmp_path, "follower", counts)
    await marker._sync_orphan_marker(timeout=10)
    [record] = records(src)
    assert (record.host, record.pending_ops, record.dirty_files, record.dirty_bytes) == ("hostA", 2, 3, 4096)


async def test_a_writer_removes_a_marker_left_behind_once_nothing_is_unwritten(tmp_path: Path) -> None:
    counts = Counts(ops=1, files=1, nbytes=10)
    marker, keeper, src = make_marker(tmp_path, "follower", counts)
    await marker._sync_orphan_marker(timeout=10)
    assert markers(src) == ["hostA"]
    keeper.role = "writer"
    await marker._sync_orphan_marker(timeout=10)
    assert markers(src) == ["hostA"]  # left alone until the writer has written everything back
    counts.value = (0, 0, 0)
    await marker._sync_orphan_marker(timeout=10)
    assert markers(src) == []


async def test_a_writer_without_a_marker_does_not_count_its_dirty_inodes(tmp_path: Path) -> None:
    counts = Counts()
    marker, _, src = make_marker(tmp_path, "writer", counts)
    await marker._sync_orphan_marker(timeout=10)  # the first look: nothing unwritten, no marker
    assert counts.calls == 1
    counts.value = (50_000, 100_000, 1 << 30)  # then the writer gets busy
    for _ in range(5):
        await marker._sync_orphan_marker(timeout=10)
    assert counts.calls == 1, "a writer with no marker walked its dirty inodes for nothing"
    assert markers(src) == []
    # Leaving with changes unwritten still counts them and leaves a marker.
    await marker._sync_orphan_marker(timeout=10, reason="unmounted with changes unwritten")
    [record] = records(src)
    assert (record.dirty_files, record.reason) == (100_000, "unmounted with changes unwritten")


async def test_a_writer_that_may_have_a_marker_counts_until_it_can_remove_it(tmp_path: Path) -> None:
    counts = Counts(ops=1, files=2, nbytes=3)
    marker, _, src = make_marker(tmp_path, "writer", counts)
    for _ in range(3):  # an earlier mount's marker may exist: it goes once the journal is empty
        await marker._sync_orphan_marker(timeout=10)
    assert counts.calls == 3
    counts.value = (0, 0, 0)
    await marker._sync_orphan_marker(timeout=10)
    await marker._sync_orphan_marker(timeout=10)
    assert counts.calls == 4
