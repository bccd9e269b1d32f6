"""Orphan markers (safefs.orphans) on a real directory: publish, replace, list, remove; modes;
corrupt, oversized and hostile entries; symlinks planted as `.safefs`, `.safefs/orphans` or
a marker are never followed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest

from safefs import orphans
from safefs.orphans import OrphanRecord, OrphanStore, record_name

pytestmark = pytest.mark.timeout(60)


def make(host: str = "hostA", cache_dir: str = "/var/cache/safefs/proj", **changes: object) -> OrphanRecord:
    record = OrphanRecord(
        host=host, machine_id="m-" + host, cache_dir=cache_dir, pid=1234, user="alice", epoch=7,
        pending_ops=3, dirty_files=2, dirty_bytes=12288, since=1_700_000_000.0,
        updated=1_700_000_060.0, reason="lease lost (epoch 8 was claimed by another mount)",
    )  # fmt: skip
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    return src


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "victim.json").write_bytes(make("victim").to_bytes())
    return out


def orphans_dir(project: Path) -> Path:
    return project / ".safefs" / "orphans"


def tree(root: Path) -> dict[str, bytes | str]:
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = os.fspath(path.relative_to(root))
        found[rel] = "link" if path.is_symlink() else "dir" if path.is_dir() else path.read_bytes()
    return found


# -- names ---------------------------------------------------------------------------------


def test_names_are_stable_distinct_and_safe() -> None:
    assert record_name("hostA", "m", "/c") == record_name("hostA", "m", "/c")
    names = {
        record_name("hostA", "m", "/c"),
        record_name("hostA", "m", "/d"),  # another cache dir on the same host
        record_name("hostA", "n", "/c"),  # another machine with the same name and path
        record_name("hostB", "m", "/c"),
        record_name("host/A", "m", "/c"),  # sanitised to the same text as host_A...
        record_name("host_A", "m", "/c"),  # ...but the hash tells them apart
    }
    assert len(names) == 6
    for name in names | {record_name("../../etc", "", ""), record_name("", "", ""), record_name(".x\n", "", "")}:
        assert orphans._NAME.fullmatch(name), name
        assert "/" not in name and not name.startswith(".")
    assert make().name.startswith("hostA-")


# -- publish, list, read, remove -------------------------------------------------------------


def test_publish_list_read_remove(project: Path) -> None:
    store = OrphanStore(project)
    assert store.list() == orphans.Listing([], [])  # no .safefs yet: nothing, and nothing created
    assert not (project / ".safefs").exists()

    a, b = make("hostA"), make("hostB", pending_ops=0, epoch=None)
    assert store.publish(a) == a.name
    store.publish(b)
    listing = store.list()
    assert listing.records == sorted([(a.name, a), (b.name, b)])
    assert listing.skipped == []
    assert store.read(a.name) == a
    assert json.loads((orphans_dir(project) / f"{a.name}.json").read_bytes())["host"] == "hostA"

    newer = dataclasses.replace(a, pending_ops=1, updated=a.updated + 5)
    store.publish(newer)  # replaces the old version in place
    assert store.read(a.name) == newer
    assert sorted(p.name for p in orphans_dir(project).iterdir()) == sorted([f"{a.name}.json", f"{b.name}.json"])

    assert store.remove(a.name) is True
    assert store.remove(a.name) is False  # already gone is fine
    assert store.read(a.name) is None
    assert store.list().records == [(b.name, b)]


def test_remove_and_read_without_a_directory_are_fine(project: Path) -> None:
    store = OrphanStore(project)
    assert store.remove(make().name) is False
    assert store.read(make().name) is None
    assert not (project / ".safefs").exists(), "remove must not create anything"


def test_modes_ignore_the_umask_and_follow_a_shared_project(project: Path) -> None:
    os.chmod(project, 0o2775)
    old = os.umask(0o077)
    try:
        OrphanStore(project).publish(make())
    finally:
        os.umask(old)
    marker = orphans_dir(project) / f"{make().name}.json"
    assert stat.S_IMODE(marker.stat().st_mode) == 0o644
    assert stat.S_IMODE(orphans_dir(project).stat().st_mode) == 0o2775
    assert stat.S_IMODE((project / ".safefs").stat().st_mode) == 0o2775


def test_stale_temp_files_are_never_listed_and_are_cleaned_by_their_owner(project: Path) -> None:
    store = OrphanStore(project)
    record = make()
    store.publish(record)
    stale = orphans_dir(project) / f".{record.name}.abcdef.tmp"
    stale.write_bytes(b"half a rec")
    other = orphans_dir(project) / ".someone-else.123.tmp"
    other.write_bytes(b"")
    assert store.list() == orphans.Listing([(record.name, record)], [])
    store.publish(record)
    assert not stale.exists()
    assert other.exists(), "a publisher removes only its own temp files"


def test_a_failed_publish_leaves_the_old_marker_and_no_temp_file(project: Path, monkeypatch) -> None:
    store = OrphanStore(project)
    old = make()
    store.publish(old)

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(orphans.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        store.publish(dataclasses.replace(old, pending_ops=99))
    monkeypatch.undo()
    assert store.read(old.name) == old
    assert [p.name for p in orphans_dir(project).iterdir()] == [f"{old.name}.json"]


# -- what a listing skips ---------------------------------------------------------------------


def test_corrupt_oversized_and_odd_entries_are_skipped_with_a_reason(project: Path) -> None:
    store = OrphanStore(project)
    good = make()
    store.publish(good)
    d = orphans_dir(project)
    (d / "garbage.json").write_bytes(b"\x00not json")
    (d / "wrong.json").write_text(json.dumps({"v": 1, "host": "x"}))
    (d / "negative.json").write_text(json.dumps({**make().to_dict(), "pending_ops": -1}))
    (d / "future.json").write_text(json.dumps({**make().to_dict(), "v": 2}))
    (d / "huge.json").write_bytes(b" " * (orphans.MAX_RECORD_BYTES + 1))
    (d / "adir.json").mkdir()
    os.mkfifo(d / "fifo.json")  # must not hang the reader
    (d / "notes.txt").write_text("not a marker name: ignored")
    listing = store.list()
    assert listing.records == [(good.name, good)]
    reasons = {s.name: s.error for s in listing.skipped}
    assert set(reasons) == {
        "garbage.json", "wrong.json", "negative.json", "future.json", "huge.json", "adir.json", "fifo.json"
    }  # fmt: skip
    assert "JSON" in reasons["garbage.json"]
    assert "larger" in reasons["huge.json"]
    assert "regular" in reasons["fifo.json"]


def test_control_characters_in_a_record_are_made_printable(project: Path) -> None:
    hostile = {**make().to_dict(), "host": "evil\x1b[2J\x07", "reason": "a\nb"}
    orphans_dir(project).mkdir(parents=True)
    (orphans_dir(project) / "evil.json").write_text(json.dumps(hostile))
    ((_, record),) = OrphanStore(project).list().records
    assert record.host == "evil?[2J?" and record.reason == "a?b"


def test_many_markers_are_bounded(project: Path, monkeypatch) -> None:
    monkeypatch.setattr(orphans, "MAX_LISTED", 3)
    store = OrphanStore(project)
    for i in range(5):
        store.publish(make(f"host{i}"))
    listing = store.list()
    assert len(listing.records) == 3
    assert [s.name for s in listing.skipped] == ["2 more"]


def test_names_with_path_parts_are_refused(project: Path) -> None:
    store = OrphanStore(project)
    for bad in ("../x", "a/b", ".hidden", "", "x\x00"):
        with pytest.raises(ValueError):
            store.remove(bad)
        with pytest.raises(ValueError):
            store.read(bad)


# -- planted symlinks ---------------------------------------------------------------------------


def test_a_symlink_planted_as_the_orphans_dir_is_not_followed(project: Path, outside: Path) -> None:
    (project / ".safefs").mkdir()
    os.symlink(outside, orphans_dir(project))
    before = tree(outside)
    store = OrphanStore(project)
    with pytest.raises(OSError):
        store.publish(make())
    with pytest.raises(OSError):
        store.list()
    with pytest.raises(OSError):
        store.remove(make("victim").name)
    assert tree(outside) == before


def test_a_symlink_planted_as_safefs_is_not_followed(project: Path, outside: Path) -> None:
    (outside / "orphans").mkdir()
    (outside / "orphans" / "victim.json").write_bytes(make("victim").to_bytes())
    os.symlink(outside, project / ".safefs")
    before = tree(outside)
    store = OrphanStore(project)
    with pytest.raises(OSError):
        store.publish(make())
    with pytest.raises(OSError):
        store.list()
    with pytest.raises(OSError):
        store.remove("victim")
    assert tree(outside) == before


def test_a_symlink_planted_as_a_marker_is_skipped_and_replaced_not_followed(project: Path, outside: Path) -> None:
    store = OrphanStore(project)
    record = make()
    orphans_dir(project).mkdir(parents=True)
    os.symlink(outside / "victim.json", orphans_dir(project) / f"{record.name}.json")
    os.symlink(outside / "victim.json", orphans_dir(project) / "link.json")
    before = tree(outside)

    listing = store.list()
    assert listing.records == []
    assert {s.name: s.error for s in listing.skipped} == {
        f"{record.name}.json": "a symlink (not followed)", "link.json": "a symlink (not followed)"
    }  # fmt: skip
    with pytest.raises(ValueError, match="symlink"):
        store.read(record.name)
    store.publish(record)  # rename replaces the link itself
    assert not (orphans_dir(project) / f"{record.name}.json").is_symlink()
    assert store.read(record.name) == record
    assert store.remove("link") is True  # unlink removes the link, not its target
    assert tree(outside) == before
