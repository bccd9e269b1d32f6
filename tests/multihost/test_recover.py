"""`safefs recover` (issue 4, point 6): a writer that lost its lease keeps its unwritten
changes in its cache; after another host took over and released, `recover` on the first
host writes them back under a fresh lease, and a file the other host changed meanwhile is
kept side by side as a conflict copy, never overwritten.

While such an orphan exists, `safefs status` on every host shows it (the host's marker in
SRC/.safefs/orphans, see safefs/orphans.py), and it is gone once `recover` wrote it back:
for a lost lease, and for a crashed writer whose cache comes back as a follower.

`safefs recover --cache-dir DIR SRC [--write]` (issue 9, item 9) does the same with no mount:
the crashed writer's mount is gone, its cache dir remains. It lists what the cache holds
(exit 11 while anything is unwritten, SRC untouched), refuses to write while another host
holds the lease (exit 7), writes back under a fresh lease with the usual conflict rules once
the lease is free (exit 0), and leaves no mount, daemon or temporary mountpoint behind.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers import describe, lazy_unmount, mount_table, run_safefs, wait_until, write_file
from tests.multihost.conftest import snapshot
from tests.multihost.test_takeover import fenced, pause_until_taken_over

ORPHANS = (".safefs", "orphans")
MARKER_BOUND = 10.0  # a resumed or restarted host publishes its marker within this (it retries every 0.5 s)


def orphan_of(status: dict, host: str) -> dict | None:
    """The orphan record of `host` in a status, or None."""
    assert status.get("orphans_error") is None, status.get("orphans_error")
    found = [o for o in status["orphans"] if o["host"] == host]
    assert len(found) <= 1, status["orphans"]
    return found[0] if found else None


def markers(src) -> list[str]:
    folder = src.joinpath(*ORPHANS)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]


def test_recover_writes_back_what_a_lost_lease_left_and_keeps_both_versions(cluster):
    a, b, epoch = pause_until_taken_over(cluster, 600)
    b.write("shared", "B changed shared meanwhile\n")
    b.sync_ok("--release")
    a.cont()
    wait_until(lambda: fenced(a), 5.0, interval=0.1, message="A to say it is no longer the writer")

    listing = a.cli("recover")
    assert listing.returncode == 0, describe(listing)
    assert f"safefs recover {a.mnt}" in listing.stdout, describe(listing)

    done = a.cli("recover", a.mnt, timeout=120)
    assert done.returncode == 0, describe(done)
    assert "conflict" in done.stdout, describe(done)

    src = cluster.src
    assert (src / "stale-new").read_bytes() == b"STALE: A's unflushed new file\n"
    assert (src / "stale-dir").is_dir()
    # B's version stays where it was; A's is beside it, whole.
    assert (src / "shared").read_bytes() == b"B changed shared meanwhile\n"
    copies = [p for p in src.iterdir() if p.name.startswith("shared.safefs-conflict-")]
    assert [c.read_bytes() for c in copies] == [b"STALE: A's unflushed overwrite\n"], copies
    assert (src / "from-b").read_bytes() == b"written by B, the new writer\n"
    status = a.status()
    assert status["dirty_bytes"] == 0 and status["pending_ops"] == 0, status
    assert status["role"] == "follower", "recover gives back the lease it took"
    generation = json.loads((src / ".safefs" / "generation").read_bytes())
    assert generation["epoch"] > epoch + 1, "recover published under a fresh epoch"

    # The project's history tells the story (issue 11 item 11), read from SRC on either host.
    def story() -> list[tuple[str, str]]:
        done = b.cli("history", src, "--json")
        assert done.returncode == 0, describe(done)
        return [(r["event"], r["host"]) for r in map(json.loads, done.stdout.splitlines())]

    # A notices its lost lease only once resumed, after B took over and released.
    want = [("acquire", a.name), ("takeover", b.name), ("release", b.name), ("self-fence", a.name),
            ("acquire", a.name), ("conflict", a.name), ("release", a.name), ("recover", a.name)]  # fmt: skip

    def told() -> bool:
        events = iter(story())
        return all(step in events for step in want)  # in this order, other events between

    wait_until(told, 30, interval=0.2, message=f"the history to hold {want}")


def test_recover_refuses_while_another_host_holds_the_lease(cluster):
    a, b, _ = pause_until_taken_over(cluster, 600)
    a.cont()
    wait_until(lambda: fenced(a), 5.0, interval=0.1, message="A to say it is no longer the writer")
    done = a.cli("recover", a.mnt, timeout=60)
    assert done.returncode == 7, describe(done)  # LEASE_HELD: B is alive and holds it
    assert "lease" in done.stderr, describe(done)
    assert not (cluster.src / "stale-new").exists()


def test_every_host_sees_an_orphan_until_it_is_recovered(cluster):
    a, b, epoch = pause_until_taken_over(cluster, 600)
    c = cluster.start("hostC")
    assert orphan_of(b.status(), "hostA") is None, "no marker while A is paused: it cannot know yet"
    a.cont()
    wait_until(lambda: fenced(a), 5.0, interval=0.1, message="A to say it is no longer the writer")

    for host in (b, c):
        orphan = wait_until(lambda: orphan_of(host.status(), "hostA"), MARKER_BOUND, interval=0.2,
                            message=f"{host.name} to show A's orphan")  # fmt: skip
        assert orphan["cache_dir"] == str(a.cache_dir), orphan
        assert orphan["pending_ops"] > 0 and orphan["dirty_bytes"] > 0 and orphan["dirty_files"] > 0, orphan
        assert orphan["epoch"] == epoch and orphan["pid"] == a.pid, orphan
        assert "lease lost" in orphan["reason"], orphan
        assert orphan["since"] <= orphan["updated"] <= time.time() + 1, orphan
    own = orphan_of(a.status(), "hostA")
    assert own is not None and own["pending_ops"] == orphan["pending_ops"], own

    # The CLI shows it too: JSON for every mount of the user (other tests' mounts may run too),
    # and a line that says what to do.
    listed = c.cli("status", "--json")
    ours = [s for s in json.loads(listed.stdout) if s.get("src") == str(cluster.src)]
    assert len(ours) == 3, describe(listed)
    for status in ours:
        assert orphan_of(status, "hostA") is not None, status
    human = c.cli("status", c.mnt)
    assert human.returncode == 0, describe(human)
    line = [s for s in human.stdout.splitlines() if "orphaned changes: host hostA" in s]
    assert line and "run `safefs recover` on hostA" in line[0], human.stdout

    (marker,) = markers(cluster.src)
    assert marker.startswith("hostA-") and marker.endswith(".json"), marker
    # The marker is in SRC only: .safefs is hidden from every mount.
    for host in (a, b, c):
        assert ".safefs" not in host.listdir(), host.name
        assert host.errno_of("stat", host.path(".safefs", "orphans", marker)) == errno.ENOENT, host.name

    # recover needs a free lease. B gives it up; C, a follower that wants the lease, takes it
    # as soon as it is free, and gives it up in turn (a released mount no longer wants it).
    b.sync_ok("--release")
    cluster.wait_new_writer([c], cluster.timings.takeover_bound)
    c.sync_ok("--release")
    done = a.cli("recover", a.mnt, timeout=120)
    assert done.returncode == 0, describe(done)
    assert markers(cluster.src) == [], "recover returned with A's marker still in SRC"
    for host in (a, b, c):
        assert orphan_of(host.status(), "hostA") is None, f"{host.name} still shows A's orphan"
    assert (cluster.src / "stale-new").read_bytes() == b"STALE: A's unflushed new file\n"


def test_a_crashed_writer_that_comes_back_as_a_follower_shows_its_orphan(cluster):
    t = cluster.timings
    a = cluster.start("hostA", writeback_delay=600)
    epoch = a.wait_writable()["lease"]["epoch"]
    b = cluster.start("hostB")
    a.write("unsynced", "A acknowledged this, then crashed\n")
    a.kill()
    cluster.wait_new_writer([b], t.takeover_bound)
    assert markers(cluster.src) == [], "a killed daemon publishes nothing"

    a2 = cluster.start("hostA", writeback_delay=600)  # the same cache dir, now a follower
    assert a2.status()["role"] == "follower"
    orphan = wait_until(lambda: orphan_of(b.status(), "hostA"), MARKER_BOUND, interval=0.2,
                        message="B to show the orphan A's cache holds")  # fmt: skip
    assert orphan["dirty_bytes"] > 0 or orphan["pending_ops"] > 0, orphan
    assert orphan["epoch"] is None and "earlier mount" in orphan["reason"], orphan
    assert orphan["pid"] == a2.pid and orphan["cache_dir"] == str(a2.cache_dir), orphan
    assert epoch >= 1

    b.sync_ok("--release")
    done = a2.cli("recover", a2.mnt, timeout=120)
    assert done.returncode == 0, describe(done)
    assert (cluster.src / "unsynced").read_bytes() == b"A acknowledged this, then crashed\n"
    assert markers(cluster.src) == []
    assert orphan_of(b.status(), "hostA") is None


# --------------------------------------------------------------------------- recover --cache-dir


UNWRITTEN, LEASE_HELD, BUSY, REFUSED, USAGE = 11, 7, 5, 3, 2  # safefs.errors.ExitCode


def recover_tmp(cache_dir) -> Path:
    """The TMPDIR of this test's `recover --cache-dir` runs, where they make their temporary
    mountpoints: the test's own directory, so another run on the machine never shows up there."""
    tmp = Path(cache_dir).parent / "recover-tmp"
    tmp.mkdir(exist_ok=True)
    return tmp


def recover_cache(cache_dir, src, *args: object, timeout: float = 120):
    env = {"TMPDIR": str(recover_tmp(cache_dir))}
    return run_safefs("recover", "--cache-dir", cache_dir, src, *args, env=env, timeout=timeout)


def private_mounts(tmp: Path) -> list[str]:
    """Mounts and temporary mountpoints `recover --cache-dir` would leave behind in `tmp`."""
    prefix = "safefs-recover-"
    left = [str(e.mountpoint) for e in mount_table() if e.mountpoint.parent == tmp]
    return left + [str(p) for p in tmp.glob(prefix + "*")]


def test_recover_from_the_cache_dir_of_a_crashed_writer_whose_mount_is_gone(cluster):
    t = cluster.timings
    src = cluster.src
    a = cluster.start("hostA", writeback_delay=600)
    a.wait_writable()
    assert private_mounts(recover_tmp(a.cache_dir)) == []
    b = cluster.start("hostB")
    a.write("shared", "published by A before the crash\n")
    a.sync_ok()
    a.write("shared", "A's unsynced change\n")
    a.write("unsynced", "A acknowledged this, then crashed\n")
    a.kill()
    assert lazy_unmount(a.mnt) is None  # the mount is gone ("ns": it died with its namespace)
    cluster.wait_new_writer([b], t.takeover_bound)
    b.write("shared", "B changed shared meanwhile\n")
    b.sync_ok()
    before = snapshot(src, skip=[".safefs"])

    listing = recover_cache(a.cache_dir, src, "--host-id", "hostA")
    assert listing.returncode == UNWRITTEN, describe(listing)
    assert "2 changed files" in listing.stdout and "--write" in listing.stdout, describe(listing)
    assert snapshot(src, skip=[".safefs"]) == before, "a listing changed the project"

    # The listing's daemon left A's orphan marker (hostA: this machine, this cache dir); from
    # here on the host id comes from it, so the marker goes once everything is written.
    assert len(markers(src)) == 1, markers(src)
    held = recover_cache(a.cache_dir, src, "--write")
    assert "host id hostA, from the orphan marker" in held.stderr, describe(held)
    assert held.returncode == LEASE_HELD, describe(held)  # B is alive and holds the lease
    assert "lease" in held.stderr, describe(held)
    assert snapshot(src, skip=[".safefs"]) == before, "a refused recover changed the project"

    b.sync_ok("--release")
    done = recover_cache(a.cache_dir, src, "--write")
    assert done.returncode == 0, describe(done)
    assert "conflict: shared" in done.stdout, describe(done)
    assert (src / "unsynced").read_bytes() == b"A acknowledged this, then crashed\n"
    # The project's version keeps its name; A's goes beside it, whole.
    assert (src / "shared").read_bytes() == b"B changed shared meanwhile\n"
    copies = [p for p in src.iterdir() if p.name.startswith("shared.safefs-conflict-")]
    assert [c.read_bytes() for c in copies] == [b"A's unsynced change\n"], copies
    generation = json.loads((src / ".safefs" / "generation").read_bytes())
    assert generation["epoch"] >= 3, "recover published under a fresh epoch (A 1, B 2)"
    assert markers(src) == [], "recover left A's orphan marker"
    assert orphan_of(b.status(), "hostA") is None

    again = recover_cache(a.cache_dir, src)
    assert again.returncode == 0, describe(again)
    assert "holds nothing" in again.stdout, describe(again)
    assert private_mounts(recover_tmp(a.cache_dir)) == [], "recover --cache-dir left a mount or a mountpoint"


def test_recover_cache_dir_refuses_what_it_cannot_do(mount_factory, tmp_path):
    m = mount_factory()
    write_file(m.mnt / "f", b"data\n")
    busy = recover_cache(m.cache_dir, m.src, "--write")
    assert busy.returncode == BUSY, describe(busy)  # a running mount owns that cache dir
    assert str(m.cache_dir) in busy.stderr, describe(busy)
    m.umount()
    assert (m.src / "f").read_bytes() == b"data\n"

    done = recover_cache(m.cache_dir, m.src)
    assert done.returncode == 0 and "holds nothing" in done.stdout, describe(done)
    other = tmp_path / "other-project"
    other.mkdir()
    wrong = recover_cache(m.cache_dir, other, "--write")
    assert wrong.returncode == REFUSED and "belongs to the project" in wrong.stderr, describe(wrong)
    assert os.listdir(other) == [], "a cache was replayed onto another project"
    not_a_cache = tmp_path / "not-a-cache"
    not_a_cache.mkdir()
    refused = recover_cache(not_a_cache, m.src, "--write")
    assert refused.returncode == REFUSED and "not a safefs cache dir" in refused.stderr, describe(refused)
    assert os.listdir(not_a_cache) == [], "a refused recover created files"
    for args in (("--write",), ("--cache-dir", m.cache_dir)):
        usage = run_safefs("recover", *args)
        assert usage.returncode == USAGE and usage.stderr.count("\n") <= 2, describe(usage)
    helped = run_safefs("recover", "--help")
    assert helped.returncode == 0 and "--cache-dir DIR SRC" in helped.stdout, describe(helped)
