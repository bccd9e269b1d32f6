"""The one reader of the kernel's mount table: fields, escapes, mount order, unreadable tables."""

from __future__ import annotations

from pathlib import Path

from safefs import checks, mounttable
from safefs.fuse_ops import mount_device

TABLE = (
    b"22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    b"41 22 0:52 / /tmp/a\\040b/mnt rw,nosuid,nodev shared:30 - fuse.safefs safefs rw,user_id=0,group_id=0\n"
    b"not a mountinfo line\n"
    b"57 22 0:60 / /tmp/a\\040b/mnt rw master:2 unbindable - fuse.safefs safefs rw,user_id=1000\n"
)


def test_lines_are_parsed_into_mounts_in_mount_order(tmp_path: Path) -> None:
    (tmp_path / "mountinfo").write_bytes(TABLE)
    mounts = mounttable.read(str(tmp_path / "mountinfo"))
    assert mounts is not None
    assert [(m.device, m.mount_point, m.fstype) for m in mounts] == [
        ("252:1", b"/", "ext4"),
        ("0:52", b"/tmp/a b/mnt", "fuse.safefs"),
        ("0:60", b"/tmp/a b/mnt", "fuse.safefs"),  # optional fields before "-" are skipped
    ]
    assert mounts[1].super_options == (b"rw", b"user_id=0", b"group_id=0")
    assert mount_device("/tmp/a b/mnt", str(tmp_path / "mountinfo")) == "0:60", "the newest mount wins"
    assert mount_device("/tmp/a", str(tmp_path / "mountinfo")) is None


def test_an_unreadable_table_is_none_not_empty(tmp_path: Path) -> None:
    assert mounttable.read(str(tmp_path / "missing")) is None
    assert mount_device("/", str(tmp_path / "missing")) is None


def test_escapes_are_decoded() -> None:
    assert mounttable.unescape(rb"/mnt/with\040space\134x") == b"/mnt/with space\\x"


def test_the_live_table_has_the_root_and_checks_read_it() -> None:
    mounts = mounttable.read()
    assert mounts and any(m.mount_point == b"/" for m in mounts)
    assert checks.mount_type_at(Path("/")) == [m.fstype for m in mounts if m.mount_point == b"/"][-1]
