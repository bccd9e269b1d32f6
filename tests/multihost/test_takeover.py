"""Takeover of a silent or dead writer, and the fencing of a writer that comes back (DESIGN.md
G1, G2, G6, section 3).

What these tests check, with several real daemons on one SRC (each its own host, see conftest):
- a writer paused (SIGSTOP) past T_break is taken over (epoch + 1); once resumed it writes
  nothing more to SRC (not the changes it had acknowledged before the pause, not when its
  write-back timer is overdue), answers writes with EROFS, says it is no longer the writer,
  and still holds its unflushed data in its cache; `safefs sync` on it does not exit 0 (G4:
  its acknowledged data is not on SRC, and cannot get there from this mount);
- a writer killed with SIGKILL is taken over: after about T_break by another machine ("ns"
  hosts), at once by a mount on the same machine, which sees the dead pid ("plain" hosts);
- a safety log: writers append "epoch=E seq=N" records to one file through their mounts while
  writers are paused and taken over; in the file SRC ends up with, no record of epoch k comes
  after the first record of epoch k + 1, and every record whose sync returned is there once.

Rules: hosts come only from the `cluster` fixture; a stopped host's mount and socket are never
touched; bounds come from the lease timings (conftest.Timings). "Never publishes" is checked
after QUIET seconds, longer than every timer of the resumed daemon that could fire.
"""

from __future__ import annotations

import errno
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import describe, wait_until
from tests.multihost.conftest import TIMINGS, fenced, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

QUIET = TIMINGS.t_break + 5 * TIMINGS.follower_poll  # how long a resumed writer gets to misbehave
# Parts of SRC that legitimately change while only the new writer runs: its heartbeat and
# lease temp files, and the generation record (checked on its own: its epoch must be the new one);
# and the fenced writer's orphan marker, a status record that changes no project file (checked
# on its own: only A's marker may be there).
# history: A records its self-fence
CHANGING = [".safefs/lease", ".safefs/generation", ".safefs/orphans", ".safefs/history"]
LOG = "safety.log"
LOG_LINE = re.compile(r"epoch=(\d+) seq=(\d+) host=(\S+)( after-resume)?\n")


def in_cache(host, marker: bytes) -> bool:
    """True if `marker` is in one of the host's cache files (the journal's LMDB files aside)."""
    for path in host.cache_dir.rglob("*"):
        if path.is_file() and not path.name.endswith(".mdb") and path.stat().st_size < 64 << 20:
            if marker in path.read_bytes():
                return True
    return False


def claimed_after(writer_status: dict, event_wall: float) -> float:
    """Seconds from `event_wall` (this machine's wall clock) to when the writer claimed its
    epoch (its lease record's `since`, written by a daemon on this same machine)."""
    return writer_status["lease"]["holder"]["since"] - event_wall


def published_epoch(src: Path) -> int | None:
    try:
        return json.loads((src / ".safefs" / "generation").read_bytes()).get("epoch")
    except FileNotFoundError:
        return None


def diff(before: dict, after: dict) -> dict:
    keys = set(before) | set(after)
    return {k: (before.get(k), after.get(k)) for k in sorted(keys) if before.get(k) != after.get(k)}


def pause_until_taken_over(cluster, writeback_delay):
    """A (writer) publishes "shared", then changes it and more without writing back, and is
    paused until B took over and published a file of its own. Returns (a, b, A's epoch)."""
    t = cluster.timings
    a = cluster.start("hostA", writeback_delay=writeback_delay)
    a.wait_writable()
    b = cluster.start("hostB")
    a.write("shared", "published by A before the pause\n")
    a.sync_ok()
    a.write("shared", "STALE: A's unflushed overwrite\n")
    a.write("stale-new", "STALE: A's unflushed new file\n")
    a.call("mkdir", a.path("stale-dir"))
    st = a.status()
    assert st["dirty_bytes"] > 0 or st["pending_ops"], f"A flushed before the pause, the test proves nothing: {st}"
    epoch = st["lease"]["epoch"]

    stopped_at = time.time()
    a.stop()
    _, st_b, _ = cluster.wait_new_writer([b], t.takeover_bound)
    assert st_b["lease"]["epoch"] == epoch + 1, st_b["lease"]
    took = claimed_after(st_b, stopped_at)
    assert took >= t.t_break - t.renew - t.poll, f"B claimed the lease {took:.2f}s after A stopped, before T_break"
    assert b.read("shared") == b"published by A before the pause\n"
    b.write("from-b", "written by B, the new writer\n")
    b.sync_ok()
    return a, b, epoch


@pytest.mark.parametrize("writeback_delay", [600, 2], ids=["not-due", "due-on-resume"])
def test_a_paused_writer_is_taken_over_and_publishes_nothing_after_resuming(cluster, writeback_delay):
    # "due-on-resume": A's write-back timer expires while A is stopped, so it fires the moment
    # A runs again, racing the lease timer that fences A.
    a, _, epoch = pause_until_taken_over(cluster, writeback_delay)
    before = snapshot(cluster.src, skip=CHANGING)

    a.cont()
    write_errno = a.errno_of("write", a.path("shared"), "A after the pause\n", "r+")
    create_errno = a.errno_of("write", a.path("created-after-resume"), "A after the pause\n", "x")
    wait_until(lambda: fenced(a), 2.0, interval=0.1, message="A to say it is no longer the writer")
    time.sleep(QUIET)

    after = snapshot(cluster.src, skip=CHANGING)
    assert after == before, f"SRC changed after the old writer resumed: {diff(before, after)}"
    assert (cluster.src / "shared").read_bytes() == b"published by A before the pause\n"
    assert published_epoch(cluster.src) == epoch + 1, "a generation of the old epoch was published"
    assert (write_errno, create_errno) == (errno.EROFS, errno.EROFS), "the resumed writer still accepts writes"
    status = a.status()
    assert status["role"] == "follower" or status["lease"]["state"] == "lost", status["lease"]
    assert status["dirty_bytes"] > 0 or in_cache(a, b"STALE: A's unflushed new file"), (
        f"A's unflushed data is gone from its cache: {status}"
    )
    orphans = cluster.src / ".safefs" / "orphans"
    assert [p.name.split("-")[0] for p in orphans.iterdir()] == ["hostA"], "only A's orphan marker"


def test_sync_on_a_fenced_writer_does_not_report_its_data_safe(cluster):
    # G4: `safefs sync` exits 0 only when everything acknowledged is on SRC. A fenced writer
    # cannot write its dirty data back any more, so its sync must fail (and publish nothing).
    a, _, epoch = pause_until_taken_over(cluster, 600)
    a.cont()
    wait_until(lambda: fenced(a), 2.0, interval=0.1, message="A to say it is no longer the writer")
    before = snapshot(cluster.src, skip=CHANGING)
    done = a.sync(timeout=QUIET)
    assert snapshot(cluster.src, skip=CHANGING) == before, "the fenced writer's sync changed SRC"
    assert published_epoch(cluster.src) == epoch + 1
    status = a.status()
    assert done.returncode != 0, (
        f"sync on the fenced writer exited 0 with {status['dirty_bytes']} dirty bytes unwritten: {describe(done)}"
    )


def test_a_killed_writer_is_taken_over_after_about_t_break(cluster):
    t = cluster.timings
    a = cluster.start("hostA", writeback_delay=600)
    epoch = a.wait_writable()["lease"]["epoch"]
    b = cluster.start("hostB")
    c = cluster.start("hostC")
    a.write("synced", "A synced this before dying\n")
    a.sync_ok()
    a.write("unsynced", "A acknowledged this, then died\n")

    killed_at = time.time()
    a.kill()
    new, st, _ = cluster.wait_new_writer([b, c], t.takeover_bound)
    assert st["lease"]["epoch"] == epoch + 1, st["lease"]
    took = claimed_after(st, killed_at)
    if cluster.namespaced:
        # Another machine cannot see A's pid: only T_break of silence proves A dead.
        assert took >= t.t_break - t.renew - t.poll, f"{new.name} claimed the lease {took:.2f}s after the kill"
    else:
        # Same machine and boot, dead pid: no need to wait for T_break.
        assert took < t.t_break / 2, f"{new.name} waited {took:.2f}s for a holder whose pid is gone"

    other = c if new is b else b
    lease = wait_until(
        lambda: (lease := other.lease())["holder"] and lease["holder"]["host"] == new.name and lease,
        t.poll + t.follower_poll + 2.0,
        interval=0.1,
        message=f"{other.name} to name {new.name} as the holder",
    )
    assert lease["epoch"] == epoch + 1 and other.status()["role"] == "follower", lease
    assert new.read("synced") == b"A synced this before dying\n"
    assert new.errno_of("stat", new.path("unsynced")) == errno.ENOENT
    new.write("after-takeover", f"written by {new.name}\n")
    new.sync_ok()
    assert (cluster.src / "after-takeover").read_bytes() == f"written by {new.name}\n".encode()
    assert in_cache(a, b"A acknowledged this, then died\n"), "the dead writer's acknowledged data left its cache"


def test_safety_log_never_has_an_old_epoch_after_a_newer_one(cluster):
    t = cluster.timings
    # A short write-back delay: the lines appended just before each pause are still being
    # written back when the writer stops, and due the moment it resumes.
    hosts = [cluster.start(name, writeback_delay=1.0) for name in ("hostA", "hostB", "hostC", "hostD")]
    writer, _, _ = cluster.wait_new_writer(hosts, 10.0)
    synced: list[str] = []
    resumed_errnos: dict[str, int] = {}
    retired = []
    seq = 0

    def append(host, epoch, n, suffix=""):
        nonlocal seq
        lines = [f"epoch={epoch} seq={seq + i} host={host.name}{suffix}\n" for i in range(n)]
        seq += n
        host.call("append_lines", host.path(LOG), lines)
        return lines

    for _ in range(len(hosts) - 1):
        epoch = writer.wait_writable()["lease"]["epoch"]
        for _ in range(2):
            synced += append(writer, epoch, 3)
            writer.sync_ok()
        for follower in cluster.running():
            if follower is not writer:
                follower.batch([("read", (follower.path(LOG),))])  # the followers cache the log
        append(writer, epoch, 2)  # not synced: left to the write-back timer
        stopped_at = time.time()
        writer.stop()
        candidates = [h for h in hosts if h is not writer and h not in retired]
        new, st, _ = cluster.wait_new_writer(candidates, t.takeover_bound)
        assert st["lease"]["epoch"] == epoch + 1, st["lease"]
        assert claimed_after(st, stopped_at) >= t.t_break - t.renew - t.poll, st["lease"]
        writer.cont()
        resumed_errnos[writer.name] = writer.errno_of(
            "append_lines", writer.path(LOG), [f"epoch={epoch} seq={seq} host={writer.name} after-resume\n"]
        )
        retired.append(writer)
        writer = new

    epoch = writer.wait_writable()["lease"]["epoch"]
    synced += append(writer, epoch, 3)
    writer.sync_ok()
    time.sleep(QUIET)  # the resumed writers had every chance to write back what they held
    writer.sync_ok()

    text = (cluster.src / LOG).read_text()
    lines = text.splitlines(keepends=True)
    torn = [(i, line) for i, line in enumerate(lines) if not LOG_LINE.fullmatch(line)]
    assert not torn, f"torn or foreign lines in {LOG}: {torn}\n{text}"
    newest, late = 0, []
    for i, line in enumerate(lines):
        e = int(LOG_LINE.fullmatch(line)[1])
        if e < newest:
            late.append((i, line.strip(), f"after a record of epoch {newest}"))
        newest = max(newest, e)
    assert not late, f"records of an old epoch after a newer epoch began: {late}\n{text}"
    counts = Counter(lines)
    missing = [line.strip() for line in synced if counts[line] == 0]
    doubled = [line.strip() for line, n in counts.items() if n > 1]
    assert not missing, f"synced records lost: {missing}\n{text}"
    assert not doubled, f"records written twice: {doubled}\n{text}"
    assert not any(line.endswith(" after-resume\n") for line in lines), text
    assert resumed_errnos == {h.name: errno.EROFS for h in retired}, (
        f"errno of an append on each writer after it resumed: {resumed_errnos}"
    )
