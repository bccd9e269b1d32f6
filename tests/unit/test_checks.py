"""G7: unsafe or impossible set-ups are refused before anything is mounted, with a message
that names the path and a hint that says what to do.

Network and FUSE filesystems are simulated by replacing the two probes (statfs f_type and the
mount table); the real probes are checked against filesystems this machine has (/proc, /dev/shm).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from safefs import checks
from safefs.config import MountConfig
from safefs.errors import ExitCode, Refused


@pytest.fixture
def layout(tmp_path: Path) -> MountConfig:
    """A safe set-up: project, empty mountpoint and cache dir side by side on local disk."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "mnt").mkdir()
    return MountConfig(src=tmp_path / "proj", mnt=tmp_path / "mnt", cache_dir=tmp_path / "cache")


def refusal(config: MountConfig) -> Refused:
    with pytest.raises(Refused) as info:
        checks.check_setup(config)
    exc = info.value
    assert type(exc) is Refused and exc.exit_code == ExitCode.REFUSED
    assert "\n" not in exc.message and exc.hint, "one line plus a hint"
    return exc


def with_(config: MountConfig, **changes: Path) -> MountConfig:
    return MountConfig(**{**config.__dict__, **changes})


def test_a_safe_setup_passes(layout: MountConfig) -> None:
    checks.check_setup(layout)
    layout.cache_dir.mkdir()
    checks.check_setup(layout)


def test_missing_project(layout: MountConfig) -> None:
    missing = layout.src.parent / "gone"
    exc = refusal(with_(layout, src=missing))
    assert str(missing) in exc.message and "does not exist" in exc.message


def test_project_that_is_a_file(layout: MountConfig) -> None:
    file = layout.src.parent / "file"
    file.write_text("x")
    exc = refusal(with_(layout, src=file))
    assert str(file) in exc.message and "not a directory" in exc.message


def test_missing_mountpoint(layout: MountConfig) -> None:
    missing = layout.mnt.parent / "nomnt"
    exc = refusal(with_(layout, mnt=missing))
    assert str(missing) in exc.message and "does not exist" in exc.message
    assert f"mkdir -p {missing}" in (exc.hint or "")


def test_mountpoint_that_is_a_file(layout: MountConfig) -> None:
    file = layout.mnt.parent / "file"
    file.write_text("x")
    exc = refusal(with_(layout, mnt=file))
    assert str(file) in exc.message and "not a directory" in exc.message


def test_mountpoint_not_empty(layout: MountConfig) -> None:
    (layout.mnt / ".hidden").write_text("x")
    exc = refusal(layout)
    assert str(layout.mnt) in exc.message and "not empty" in exc.message


def test_mountpoint_that_is_already_a_mountpoint() -> None:
    exc = refusal(
        MountConfig(src=Path("/work"), mnt=Path("/proc"), cache_dir=Path("/var/tmp/safefs-test-cache"))
    )
    assert "/proc is already a mountpoint" in exc.message


def test_mountpoint_inside_the_project(layout: MountConfig) -> None:
    inner = layout.src / "sub"
    inner.mkdir()
    exc = refusal(with_(layout, mnt=inner))
    assert exc.message == f"mountpoint {inner} is inside the project {layout.src}"


def test_mountpoint_is_the_project(layout: MountConfig) -> None:
    exc = refusal(with_(layout, mnt=layout.src))
    assert "inside the project" in exc.message


def test_mountpoint_inside_the_project_through_a_symlink(layout: MountConfig) -> None:
    (layout.src / "sub").mkdir()
    link = layout.src.parent / "link"
    link.symlink_to(layout.src / "sub")
    exc = refusal(with_(layout, mnt=link))
    assert f"mountpoint {layout.src / 'sub'} is inside the project" in exc.message


def test_project_inside_the_mountpoint(layout: MountConfig) -> None:
    exc = refusal(with_(layout, src=layout.mnt / "p", mnt=layout.mnt))
    # The project must exist to get this far: make it, which also makes MNT non-empty.
    assert "does not exist" in exc.message
    (layout.mnt / "p").mkdir()
    exc = refusal(with_(layout, src=layout.mnt / "p", mnt=layout.mnt))
    assert exc.message == f"project {layout.mnt / 'p'} is inside the mountpoint {layout.mnt}"


def test_mountpoint_inside_the_cache_dir(layout: MountConfig) -> None:
    exc = refusal(with_(layout, cache_dir=layout.mnt.parent))
    assert exc.message.startswith(f"mountpoint {layout.mnt} is inside the cache dir")


def test_cache_dir_inside_the_mountpoint(layout: MountConfig) -> None:
    exc = refusal(with_(layout, cache_dir=layout.mnt / "cache"))
    assert exc.message == f"cache dir {layout.mnt / 'cache'} is inside the mountpoint {layout.mnt}"


def test_cache_dir_inside_the_project(layout: MountConfig) -> None:
    exc = refusal(with_(layout, cache_dir=layout.src / ".cache"))
    assert exc.message == f"cache dir {layout.src / '.cache'} is inside the project {layout.src}"


def test_cache_dir_that_is_a_file(layout: MountConfig) -> None:
    layout.cache_dir.write_text("x")
    exc = refusal(layout)
    assert f"cache dir {layout.cache_dir} is not a directory" == exc.message


@pytest.mark.parametrize(
    ("magic", "name"),
    [(0x6969, "nfs"), (0xFF534D42, "cifs"), (0xFE534D42, "smb2"), (0x517B, "smb"), (0x65735546, "fuse"),
     (0x0BD00BD0, "lustre"), (0x47504653, "gpfs"), (0x00C36400, "ceph"), (0x6B414653, "kafs")],
)  # fmt: skip
def test_cache_dir_on_a_network_or_fuse_filesystem_by_statfs(
    layout: MountConfig, monkeypatch: pytest.MonkeyPatch, magic: int, name: str
) -> None:
    probed: list[Path] = []

    def statfs_magic(path: Path) -> int:
        probed.append(path)
        return magic

    monkeypatch.setattr(checks, "_statfs_magic", statfs_magic)
    monkeypatch.setattr(checks, "_mount_fstype", lambda path: None)
    exc = refusal(with_(layout, cache_dir=layout.cache_dir / "not" / "yet"))
    assert exc.message.startswith(
        f"cache dir {layout.cache_dir / 'not' / 'yet'} is on {name}, a network or FUSE"
    )
    assert "--cache-dir" in (exc.hint or "")
    # The cache dir does not exist yet: its nearest existing ancestor is what gets probed.
    assert probed and probed[-1] == layout.cache_dir.parent


@pytest.mark.parametrize("fstype", ["nfs4", "fuse.sshfs", "cifs", "fuseblk", "glusterfs", "9p"])
def test_cache_dir_on_a_network_or_fuse_filesystem_by_mount_table(
    layout: MountConfig, monkeypatch: pytest.MonkeyPatch, fstype: str
) -> None:
    # statfs says ext4 (or cannot tell); the mount table alone is enough to refuse.
    monkeypatch.setattr(checks, "_statfs_magic", lambda path: 0xEF53)
    monkeypatch.setattr(checks, "_mount_fstype", lambda path: fstype)
    exc = refusal(layout)
    assert f"is on {fstype}, a network or FUSE filesystem" in exc.message


def test_the_mount_table_name_is_preferred_in_the_message(
    layout: MountConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checks, "_statfs_magic", lambda path: 0x6969)
    monkeypatch.setattr(checks, "_mount_fstype", lambda path: "nfs4")
    assert "is on nfs4," in refusal(layout).message


def test_cache_dir_on_a_pseudo_filesystem(layout: MountConfig) -> None:
    exc = refusal(with_(layout, cache_dir=Path("/proc/safefs-cache")))
    assert exc.message == "cache dir /proc/safefs-cache is on proc, which is not a disk"


def test_real_local_filesystems_are_not_taken_for_network_ones() -> None:
    assert checks.fs_type_name("/proc") == "proc"
    assert checks.fs_type_name("/proc/self/no/such/thing") == "proc"
    assert checks.unsafe_filesystem("/proc") is None
    if os.path.ismount("/dev/shm"):
        assert checks.fs_type_name("/dev/shm") == "tmpfs"
        assert checks.unsafe_filesystem("/dev/shm/x/y") is None
        assert checks._statfs_magic(Path("/dev/shm")) == 0x01021994
    assert checks._statfs_magic(Path("/proc")) == 0x9FA0


def test_mount_table_longest_prefix_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    table = [
        (b"/", "ext4"),
        (b"/nfs", "nfs4"),
        (b"/nfs/local", "xfs"),
        (b"/nfsx", "tmpfs"),
        (b"/nfs", "fuse.sshfs"),
    ]
    monkeypatch.setattr(checks, "_read_mountinfo", lambda: table)
    assert checks._mount_fstype(Path("/nfs/proj")) == "fuse.sshfs"  # mounted over /nfs later
    assert checks._mount_fstype(Path("/nfs/local/c")) == "xfs"
    assert checks._mount_fstype(Path("/nfsx/c")) == "tmpfs"
    assert checks._mount_fstype(Path("/home")) == "ext4"
    assert checks.mount_type_at(Path("/nfs")) == "fuse.sshfs"
    assert checks.mount_type_at(Path("/nfs/proj")) is None


def test_resolve_mountpoint_does_not_look_inside_a_mount(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert checks.resolve_mountpoint(tmp_path / "link") == tmp_path / "real"
    # A listed mount point is taken as it is: realpath would stat it (and hang on a wedged mount).
    monkeypatch.setattr(
        checks, "mount_type_at", lambda path: "fuse.safefs" if path == tmp_path / "link" else None
    )
    real_realpath, resolved = os.path.realpath, []

    def realpath(path: Any, **kwargs: Any) -> str:
        resolved.append(os.fspath(path))
        return real_realpath(path, **kwargs)

    monkeypatch.setattr(os.path, "realpath", realpath)
    assert checks.resolve_mountpoint(tmp_path / "link") == tmp_path / "link"
    assert resolved == [os.fspath(tmp_path)]
