"""One writer at a time, and handing the lease over cleanly (DESIGN.md G1, G4, G5, sections 3, 4, 6).

What these tests check, with several real daemons on one SRC (each its own host, see conftest):
- hosts that mount at once elect exactly one writer; the others are followers whose
  `safefs status` names the holder (host, pid, user, since, heartbeat age);
- a follower answers every kind of change with EROFS and SRC stays as it was;
- `sync --release` on A then `acquire` on B hands the lease over (epoch + 1) without a lost
  byte, and A, now a follower, sees B's bytes (and B's unlink) within its poll interval plus a
  margin, and cannot write;
- a host that gets the lease back never serves what it cached in an earlier epoch, even when
  it did not poll as a follower meanwhile (the kernel and its cache held v1 for long): not old
  bytes, and not names another host removed in between.

Rules: hosts come only from the `cluster` fixture; file operations go through Host.call (a
child process, in the host's namespace in "ns" mode); waits are wait_until against deadlines
derived from the lease timings.
"""

from __future__ import annotations

import errno
import os
import pwd
import time

import pytest

from tests.helpers import describe, wait_until
from tests.multihost.conftest import TIMINGS, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

SEEN_MARGIN = 2.0  # beyond the follower poll: the test's own process start-up and the kernel
V1 = b"version one of f, written by A\n"
V2 = b"VERSION TWO OF F, WRITTEN BY B\n"  # same length as V1: only the content tells them apart
assert len(V1) == len(V2)


def readable(host, name):
    """The file's bytes on `host`, or None while it cannot be read."""
    try:
        return host.read(name)
    except OSError:
        return None


def wait_for_view(host, wanted, timeout):
    """Wait until `host` shows each name in `wanted` with those bytes (None: no such file);
    fail with what it showed last. Returns how long that took."""
    started = time.monotonic()
    seen = {}

    def matches():
        seen.update({name: readable(host, name) for name in wanted})
        return seen == wanted

    try:
        wait_until(matches, timeout, interval=0.1)
    except AssertionError:
        raise AssertionError(f"{host.name} still shows {seen} {timeout}s later, expected {wanted}") from None
    return time.monotonic() - started


def test_hosts_that_mount_at_once_elect_exactly_one_writer(cluster):
    hosts = [cluster.start(name, wait=False) for name in ("hostA", "hostB", "hostC")]
    for host in hosts:
        host.wait_ready()
    statuses = {host.name: host.status() for host in hosts}
    writers = [h for h in hosts if statuses[h.name]["role"] == "writer"]
    assert len(writers) == 1, f"expected one writer, got roles { {n: s['role'] for n, s in statuses.items()} }"
    (writer,) = writers
    epoch = statuses[writer.name]["lease"]["epoch"]
    assert epoch >= 1
    for host in hosts:
        assert host.ready["role"] == statuses[host.name]["role"], (host.name, host.ready, statuses[host.name]["role"])

    for follower in (h for h in hosts if h is not writer):
        st = statuses[follower.name]
        assert st["role"] == "follower"
        lease = st["lease"]
        assert lease["epoch"] == epoch, (follower.name, lease)
        holder = lease["holder"]
        assert holder is not None, f"{follower.name}: status names no holder: {lease}"
        assert holder["host"] == writer.name, (follower.name, holder)
        assert holder["pid"] == writer.pid, (follower.name, holder)
        assert holder["user"] == pwd.getpwuid(os.getuid()).pw_name, holder
        assert holder["since"], holder
        age = holder["heartbeat_age"]
        assert age is not None and 0 <= age < TIMINGS.t_break, f"holder's heartbeat age {age}: {lease}"
        assert follower.errno_of("write", follower.path("mine"), "x", "x") == errno.EROFS


def test_a_follower_answers_every_change_with_erofs(cluster):
    a = cluster.start("hostA")
    a.wait_writable()
    b = cluster.start("hostB")
    assert b.status()["role"] == "follower"
    a.write("existing", "written by the writer\n")
    a.write("victim", "to be renamed over\n")
    a.call("mkdir", a.path("dir"))
    a.call("setxattr", a.path("existing"), "user.kept", "yes")
    a.sync_ok()
    wait_for_view(b, {"existing": b"written by the writer\n"}, TIMINGS.follower_poll + SEEN_MARGIN)
    before = snapshot(cluster.src, skip=[".safefs"])

    p = b.path
    attempts = {
        "create (O_EXCL)": ("write", p("created"), "data", "x"),
        "create-or-truncate": ("write", p("existing"), "new", "w"),
        "write existing": ("write", p("existing"), "overwrite", "r+"),
        "append": ("write", p("existing"), "more", "a"),
        "truncate": ("truncate", p("existing"), 0),
        "unlink": ("unlink", p("existing")),
        "mkdir": ("mkdir", p("newdir")),
        "rmdir": ("rmdir", p("dir")),
        "rename": ("rename", p("existing"), p("renamed")),
        "rename over": ("rename", p("existing"), p("victim")),
        "chmod": ("chmod", p("existing"), 0o600),
        "chown": ("chown", p("existing"), 65534, 65534),
        "utime": ("utime", p("existing")),
        "setxattr": ("setxattr", p("existing"), "user.safefs-test", "v"),
        "symlink": ("symlink", "existing", p("symlinked")),
        "link": ("link", p("existing"), p("linked")),
    }
    results = b.batch([(op, args) for op, *args in attempts.values()])
    wrong = {what: r for what, r in zip(attempts, results) if r.get("errno") != errno.EROFS}
    assert not wrong, f"follower changes that did not fail with EROFS ({errno.EROFS}): {wrong}"

    assert b.read("existing") == b"written by the writer\n"
    assert sorted(b.listdir()) == ["dir", "existing", "victim"]
    lease = b.status()["lease"]
    assert lease["holder"] and lease["holder"]["host"] == "hostA", lease
    a.sync_ok()
    time.sleep(TIMINGS.follower_poll)  # anything the follower might have queued had its chance
    assert snapshot(cluster.src, skip=[".safefs"]) == before, "SRC changed although only a follower tried"


def test_clean_handoff_with_sync_release_and_acquire(cluster):
    a = cluster.start("hostA")
    a.wait_writable()
    b = cluster.start("hostB")
    a.write("shared", V1)
    a.write("from-a", "A wrote this before the handoff\n")
    a.write("doomed", "B deletes this\n")
    assert a.read("shared") == V1 and a.read("doomed")  # A's kernel and cache now hold them
    # The epoch A holds, read before the release: once released.N lands, B (which wants the
    # lease) may claim N + 1 at any moment, and A's status would then show that one.
    epoch = a.status()["lease"]["epoch"]

    done = a.sync("--release")
    assert done.returncode == 0, describe(done)
    assert "released" in done.stdout and "generation" in done.stdout, f"no receipt: {describe(done)}"
    assert (cluster.src / "shared").read_bytes() == V1
    st_a = a.status()
    assert st_a["role"] == "follower", st_a["lease"]
    assert st_a["dirty_bytes"] == 0, st_a

    done = b.cli("acquire", b.mnt)
    assert done.returncode == 0, describe(done)
    st_b = b.status()
    assert st_b["role"] == "writer" and st_b["lease"]["epoch"] == epoch + 1, st_b["lease"]
    # acquire returns once the mount is writable: B writes at once.
    assert b.read("from-a") == b"A wrote this before the handoff\n"
    b.write("shared", V2)
    b.write("from-b", "B wrote this after the handoff\n")
    b.call("unlink", b.path("doomed"))
    b.sync_ok()
    assert (cluster.src / "shared").read_bytes() == V2

    wanted = {"shared": V2, "from-b": b"B wrote this after the handoff\n", "doomed": None}
    seen_after = wait_for_view(a, wanted, TIMINGS.follower_poll + SEEN_MARGIN)
    lease = a.status()["lease"]
    assert lease["holder"] and lease["holder"]["host"] == "hostB", lease
    assert lease["epoch"] == epoch + 1, lease
    assert a.errno_of("write", a.path("shared"), "A again", "r+") == errno.EROFS
    assert a.errno_of("write", a.path("a-new"), "A again", "x") == errno.EROFS
    assert (cluster.src / "shared").read_bytes() == V2, f"(A saw B's bytes {seen_after:.2f} s after B's sync)"


def test_after_a_handoff_the_old_writer_sees_names_the_new_one_removed(cluster):
    # Only the removed names are looked at: no lookup of a new name may refresh the directory
    # first. A's kernel learned them while A was the writer (long entry timeouts).
    a = cluster.start("hostA")
    a.wait_writable()
    b = cluster.start("hostB")
    a.write("doomed", "B deletes this\n")
    a.write("old-name", "B renames this\n")
    assert a.read("doomed") and a.read("old-name")
    a.sync_ok("--release")
    done = b.cli("acquire", b.mnt)
    assert done.returncode == 0, describe(done)
    b.call("unlink", b.path("doomed"))
    b.call("rename", b.path("old-name"), b.path("new-name"))
    b.sync_ok()
    wait_for_view(a, {"doomed": None, "old-name": None}, TIMINGS.follower_poll + SEEN_MARGIN)
    assert a.read("new-name") == b"B renames this\n"


POLLING = pytest.mark.parametrize(
    "a_follower_poll", [TIMINGS.follower_poll, 600.0], ids=["polling", "not-polling"]
)
# "not-polling": A never looks at B's generations while it follows, so only the cache
# validation on acquiring (DESIGN.md section 4) stands between A and what it cached in its epoch.


def hand_over_and_back(cluster, a_follower_poll, prepare, change):
    """A writes (`prepare(a)`) and releases; B acquires, changes things (`change(b)`) and
    releases; A acquires again. Returns (a, b) with A the writer of epoch E + 2."""
    a = cluster.start("hostA", "--follower-poll", a_follower_poll)
    a.wait_writable()
    b = cluster.start("hostB")
    prepare(a)
    epoch = a.status()["lease"]["epoch"]  # before the release: then B may claim E + 1 at once
    a.sync_ok("--release")
    done = b.cli("acquire", b.mnt)
    assert done.returncode == 0, describe(done)
    change(b)
    b.sync_ok("--release")
    done = a.cli("acquire", a.mnt)
    assert done.returncode == 0, describe(done)
    st = a.status()
    assert st["role"] == "writer" and st["lease"]["epoch"] == epoch + 2, st["lease"]
    return a, b


@POLLING
def test_a_returning_writer_never_serves_bytes_cached_in_an_earlier_epoch(cluster, a_follower_poll):
    def prepare(a):
        a.write("f", V1)
        a.call("mkdir", a.path("d"))
        a.write("d/inner", V1)
        assert a.read("f") == V1 and a.read("d/inner") == V1  # A's kernel and cache hold v1

    def change(b):
        assert b.read("f") == V1
        b.write("f", V2)
        b.write("d/inner", V2)
        b.write("new", "B created this\n")

    a, _ = hand_over_and_back(cluster, a_follower_poll, prepare, change)
    for attempt in range(3):
        assert a.read("f") == V2, f"read {attempt + 1} after acquiring served A's own v1"
    assert a.read("d/inner") == V2
    assert a.read("new") == b"B created this\n"
    a.write("f", "appended by A\n", "a")
    a.sync_ok()
    assert (cluster.src / "f").read_bytes() == V2 + b"appended by A\n"


@POLLING
def test_a_returning_writer_does_not_resurrect_names_removed_in_between(cluster, a_follower_poll):
    def prepare(a):
        a.write("gone", "B deletes this\n")
        a.write("old-name", "B renames this\n")
        assert a.read("gone") and a.read("old-name")  # A's kernel knows both names

    def change(b):
        b.call("unlink", b.path("gone"))
        b.call("rename", b.path("old-name"), b.path("new-name"))

    a, _ = hand_over_and_back(cluster, a_follower_poll, prepare, change)
    # Ask for the names before listing the directory: a listing may refresh it first.
    looked_up = {name: a.batch([("stat", (a.path(name),)), ("read", (a.path(name),))])
                 for name in ("gone", "old-name")}  # fmt: skip
    resurrected = {name: r for name, r in looked_up.items() if any("errno" not in x for x in r)}
    assert not resurrected, f"names B removed are still served by A after it acquired: {resurrected}"
    assert a.listdir() == ["new-name"]
    assert a.read("new-name") == b"B renames this\n"


READER_SCRIPT = r"""
import hashlib, sys
with open(sys.argv[1], "rb") as f:
    first = f.read(4096)
    print("opened", flush=True)
    sys.stdin.readline()  # the test says when the writer's next version is visible
    rest = f.read()
print(hashlib.sha256(first + rest).hexdigest(), len(first + rest), flush=True)
"""


def test_a_reader_on_a_follower_keeps_the_version_it_opened(cluster):
    """G5: the writer publishes a new version while a process on a follower has the old one
    open and half read. That process reads the old version to its end, whole; a new open
    sees the new version. Never a mix of the two."""
    import hashlib
    import subprocess
    import sys

    a = cluster.start("hostA")
    a.wait_writable()
    b = cluster.start("hostB")
    old = bytes(range(256)) * 4096  # 1 MiB: many fetch blocks, below the atomic-publish limit
    new = bytes(reversed(range(256))) * 4096
    versions = cluster.src.parent / "versions"
    versions.mkdir()
    (versions / "old").write_bytes(old)
    (versions / "new").write_bytes(new)
    a.call("copy", versions / "old", a.path("stack"))
    a.sync_ok()
    wait_for_view(b, {"stack": old}, TIMINGS.follower_poll + SEEN_MARGIN)

    reader = subprocess.Popen(
        b._enter() + [sys.executable, "-I", "-c", READER_SCRIPT, str(b.path("stack"))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=b.env,
    )  # fmt: skip
    try:
        assert reader.stdout.readline().strip() == "opened", reader.stderr.read()
        a.call("copy", versions / "new", a.path("stack"))
        a.sync_ok()
        wait_for_view(b, {"stack": new}, TIMINGS.follower_poll + SEEN_MARGIN)  # B saw the publish
        out, err = reader.communicate("go\n", timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    digest, size = out.split()
    assert int(size) == len(old), f"the open file changed size under the reader: {out} {err}"
    assert digest == hashlib.sha256(old).hexdigest(), (
        "the reader got a mix of versions" if digest != hashlib.sha256(new).hexdigest()
        else "the reader's open file switched to the new version"
    )
    assert b.read("stack") == new
