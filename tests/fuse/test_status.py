"""`safefs status` and `safefs sync` against a real mount (DESIGN.md G4, section 7).

What these tests check: `status --json` has every key of the shared contract with a sane type
and value; dirty counters go up after a write and back to 0 after `safefs sync`, which exits
0 only once SRC has the bytes; the human form prints readable lines; asking about a path no
daemon serves exits 4 (NOT_MOUNTED) with one error line.

Rules: mounts come only from the fixtures; no fixed sleeps.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import MountFactory, run_safefs

pytestmark = pytest.mark.timeout(120)

KIB = 1 << 10
NOT_MOUNTED = 4
LONG_DELAY = ("--writeback-delay", "600")  # nothing is written back on its own during the test

NUMBER = (int, float)
CONTRACT_TYPES: dict[str, type | tuple[type, ...]] = {
    "src": str,
    "mnt": str,
    "cache_dir": str,
    "pid": int,
    "role": str,
    "dirty_bytes": int,
    "dirty_files": int,
    "oldest_dirty_age": (int, float, type(None)),
    "pending_ops": (int, list),
    "bytes_fetched": int,
    "bytes_written": int,
    "cache_bytes": int,
    "cache_limit": int,
    "errors": list,
    "conflicts": list,
    "lease": dict,
}


def check_types(status: dict) -> None:
    missing = sorted(set(CONTRACT_TYPES) - set(status))
    assert not missing, f"status lacks contract keys {missing}: {status}"
    for key, kind in CONTRACT_TYPES.items():
        value = status[key]
        assert isinstance(value, kind) and not isinstance(value, bool), (
            f"status[{key!r}] = {value!r} ({type(value).__name__}), expected {kind}"
        )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("safefs: error:")]


@pytest.mark.fuse
def test_status_json_has_the_contract_keys(mounted):
    st = mounted.status()
    check_types(st)
    assert Path(st["src"]) == mounted.src.resolve()
    assert Path(st["mnt"]) == mounted.mnt.resolve()
    assert Path(st["cache_dir"]) == mounted.cache_dir.resolve()
    assert st["pid"] == mounted.proc.pid
    assert st["role"] == "writer"
    assert st["dirty_bytes"] == 0 and st["dirty_files"] == 0
    assert st["oldest_dirty_age"] is None
    assert st["bytes_fetched"] >= 0 and st["bytes_written"] >= 0
    assert 0 <= st["cache_bytes"] and st["cache_limit"] > 0
    assert st["errors"] == [] and st["conflicts"] == []


@pytest.mark.fuse
def test_status_json_names_the_lease_holder(mounted):
    lease = mounted.status()["lease"]
    for key in ("epoch", "holder", "deadline", "generation"):
        assert key in lease, f"lease lacks {key!r}: {lease}"
    assert isinstance(lease["epoch"], int) and lease["epoch"] >= 1, f"writer holds no epoch: {lease}"
    assert isinstance(lease["generation"], int) and lease["generation"] >= 0, lease
    assert isinstance(lease["deadline"], (int, float)), lease
    holder = lease["holder"]
    assert isinstance(holder, dict), f"writer's status names no holder: {lease}"
    for key in ("host", "pid", "user", "since", "heartbeat_age"):
        assert key in holder, f"lease holder lacks {key!r}: {holder}"
    assert holder["pid"] == mounted.proc.pid
    assert holder["host"] and holder["user"]
    assert isinstance(holder["heartbeat_age"], (int, float)) and 0 <= holder["heartbeat_age"] < 60, holder


@pytest.mark.fuse
def test_dirty_counters_and_sync(mount_factory):
    m = mount_factory(None, None, None, *LONG_DELAY)
    first, second = os.urandom(100 * KIB), os.urandom(50 * KIB)
    (m.mnt / "a").write_bytes(first)
    os.mkdir(m.mnt / "d")
    (m.mnt / "d" / "b").write_bytes(second)
    st = m.status()
    assert st["dirty_bytes"] >= len(first) + len(second), st
    assert st["dirty_files"] >= 2, st
    assert isinstance(st["oldest_dirty_age"], (int, float)) and st["oldest_dirty_age"] >= 0, st
    assert not (m.src / "a").exists(), "write reached SRC before sync (write-through?)"
    written = st["bytes_written"]

    result = m.sync()
    assert result.returncode == 0, f"safefs sync exited {result.returncode}: {result.stderr}"
    # G4: when sync returns, SRC has everything acknowledged before it started.
    assert (m.src / "a").read_bytes() == first
    assert (m.src / "d" / "b").read_bytes() == second
    st = m.status()
    assert st["dirty_bytes"] == 0 and st["dirty_files"] == 0, st
    assert st["oldest_dirty_age"] is None, st
    assert st["bytes_written"] - written >= len(first) + len(second), st
    assert st["role"] == "writer", "plain sync must keep the lease"

    # Dirty again, and a second sync.
    (m.mnt / "a").write_bytes(b"again")
    assert m.status()["dirty_files"] >= 1
    assert m.sync().returncode == 0
    assert (m.src / "a").read_bytes() == b"again"
    assert m.status()["dirty_bytes"] == 0
    # Nothing dirty: sync still succeeds.
    assert m.sync().returncode == 0


@pytest.mark.fuse
def test_sync_publishes_a_new_generation(mounted):
    before = mounted.status()["lease"]["generation"]
    assert isinstance(before, int), f"no generation in status: {mounted.status()['lease']}"
    (mounted.mnt / "f").write_bytes(b"new generation")
    assert mounted.sync().returncode == 0
    after = mounted.status()["lease"]["generation"]
    assert isinstance(after, int) and after > before, f"generation {before} -> {after} after sync"


@pytest.mark.fuse
def test_human_status_prints_lines(mounted):
    result = mounted.cli("status", str(mounted.mnt))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) >= 3, f"human status too terse: {result.stdout!r}"
    assert "writer" in result.stdout.lower()
    assert "{" not in lines[0], "human status printed JSON"
    everything = mounted.cli("status")  # no MNT: every mount of this user
    assert everything.returncode == 0, everything.stderr
    assert str(mounted.mnt.resolve()) in everything.stdout


@pytest.mark.parametrize("json_flag", [True, False], ids=["json", "human"])
def test_status_of_a_path_nobody_serves_exits_4(tmp_path, json_flag):
    plain = tmp_path / "not-a-mount"
    plain.mkdir()
    for path in (plain, tmp_path / "does-not-exist"):
        args = ["status", str(path)] + (["--json"] if json_flag else [])
        result = run_safefs(*args)
        assert result.returncode == NOT_MOUNTED, (
            f"status of {path} exited {result.returncode}: {result.stderr}"
        )
        assert len(error_lines(result.stderr)) == 1, result.stderr


def test_sync_of_a_path_nobody_serves_exits_4(tmp_path):
    result = run_safefs("sync", str(tmp_path))
    assert result.returncode == NOT_MOUNTED, result.stderr
    assert len(error_lines(result.stderr)) == 1, result.stderr


@pytest.mark.fuse
def test_status_after_the_daemon_was_killed_exits_4(mount_factory):
    m = mount_factory()
    m.kill()
    result = run_safefs("status", str(m.mnt), "--json")
    assert result.returncode == NOT_MOUNTED, f"exited {result.returncode}: {result.stderr}"
    assert len(error_lines(result.stderr)) == 1, result.stderr


def test_log_file_and_level_options_and_warnings_in_status(mount_factory: MountFactory, tmp_path: Path) -> None:
    """Issue 11 item 6: --log-file/--log-level are honoured, and a WARNING shows in `status`."""
    log_file = tmp_path / "logs" / "safefs.log"
    log_file.parent.mkdir()
    mount = mount_factory(None, None, None, "--log-file", log_file, "--log-level", "warning",
                          env={"SAFEFS_FAULTS": "[]"})  # fmt: skip
    text = log_file.read_text()
    assert "WARNING safefs.daemon: daemon: fault injection on: []" in text
    assert " INFO " not in text  # below --log-level
    status = mount.status()
    assert any(w["message"] == "daemon: fault injection on: []" and w["level"] == "warning" for w in status["warnings"])
    done = mount.cli("status", mount.mnt)
    assert "warnings:" in done.stdout and "warning: daemon: fault injection on: []" in done.stdout, done.stdout
