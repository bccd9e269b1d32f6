"""The lease and the follower notifications on etcd, with real daemons and a real etcd (issue 12).

What these tests check, with several daemons on one SRC whose `.safefs/config.toml` (written by
`safefs init`) names the etcd backend:
- mounts racing for the lease: exactly one writer every time, 20 rounds;
- a clean handoff (`sync --release`, `acquire`); the follower learns of the new generation from
  etcd (not from the NFS file, polled only every 30 s while etcd answers); status shows the
  backend, endpoints, TTL, time to expiry and revision;
- a writer SIGSTOPped past the TTL is taken over and publishes nothing after SIGCONT, neither
  on SRC nor in etcd; a killed writer is taken over only once etcd expired its lease;
- etcd stopped under a writer: it turns read-only before the TTL, keeps its dirty data, and
  `safefs recover` writes it back once etcd is back; etcd restarted: never a second writer;
- a follower keeps serving reads with etcd down; `safefs init` is refused while the lease is held.

Hosts are plain processes on this machine: with etcd, the holder's pid never decides a takeover.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time

import pytest

from safefs.errors import ExitCode
from tests.etcd_server import EtcdServer, etcd_server  # noqa: F401  (fixture)
from tests.helpers import describe, wait_until
from tests.multihost.conftest import TIMINGS, fenced, snapshot

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(300)]

TTL = TIMINGS.t_break  # the etcd lease's TTL is T_break
# history: A records its self-fence
CHANGING = [".safefs/lease", ".safefs/generation", ".safefs/orphans", ".safefs/history"]


@pytest.fixture
def host_mode() -> str:
    return "plain"


@pytest.fixture
def etcd_cluster(cluster, etcd_server: EtcdServer):
    done = subprocess.run(
        [sys.executable, "-m", "safefs", "init", str(cluster.src), "--lease-backend", "etcd",
         "--etcd-endpoints", etcd_server.url, "--etcd-prefix", "test/project"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, describe(done)
    cluster.etcd = etcd_server
    return cluster


def etcd_generation(server: EtcdServer) -> dict | None:
    import base64
    import urllib.request

    body = json.dumps({"key": base64.b64encode(b"test/project/generation").decode()}).encode()
    with urllib.request.urlopen(urllib.request.Request(server.url + "/v3/kv/range", data=body), timeout=5) as r:
        kvs = json.load(r).get("kvs") or []
    return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


def test_mounts_racing_for_the_lease_get_exactly_one_writer_every_round(etcd_cluster):
    hosts = [etcd_cluster.start(name, wait=False) for name in ("hostA", "hostB", "hostC")]
    for host in hosts:
        host.wait_ready()
    writer, _, _ = etcd_cluster.wait_new_writer(hosts, 10.0)
    epochs = []
    for _round in range(20):
        assert writer.cli("sync", writer.mnt, "--release").returncode == 0
        procs = [
            subprocess.Popen([sys.executable, "-m", "safefs", "acquire", str(h.mnt)], env=h.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for h in hosts
        ]  # fmt: skip
        codes = [p.wait(timeout=60) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        assert sorted(codes) == [0] + [int(ExitCode.LEASE_HELD)] * 2, codes
        writers = etcd_cluster.writers()
        assert len(writers) == 1, [(h.name, s["lease"]) for h, s in writers]
        writer = hosts[codes.index(0)]
        assert writers[0][0] is writer
        epochs.append(writers[0][1]["lease"]["epoch"])
    assert epochs == sorted(set(epochs)), epochs


def test_clean_handoff_and_the_follower_is_told_by_etcd(etcd_cluster):
    a = etcd_cluster.start("hostA")
    a.wait_writable()
    b = etcd_cluster.start("hostB")
    a.write("shared", "v1 by A\n")
    a.call("mkdir", a.path("sub"))
    a.write("sub/other", "untouched\n")
    a.sync_ok()
    lease = a.lease()
    assert lease["backend"] == "etcd" and lease["endpoints"] == [etcd_cluster.etcd.url], lease
    assert lease["ttl"] == TTL and 0 < lease["expires_in"] <= TTL and lease["revision"] > 0, lease
    assert etcd_generation(etcd_cluster.etcd)["epoch"] == lease["epoch"]
    wait_until(lambda: b.read("shared") == b"v1 by A\n", 5.0, interval=0.1)
    assert b.read("sub/other") == b"untouched\n"

    assert a.cli("sync", a.mnt, "--release").returncode == 0
    done = b.cli("acquire", b.mnt)
    assert done.returncode == 0, describe(done)
    st_b = b.status()
    assert st_b["role"] == "writer" and st_b["lease"]["epoch"] > lease["epoch"], st_b["lease"]
    b.write("shared", "v2 by B\n")
    b.sync_ok()
    lease_b = b.lease()
    # A reads the NFS file only every 30 s while etcd answers: it must hear of this from etcd.
    told = f"generation {lease_b['generation']} of epoch {lease_b['epoch']} (from etcd)"
    wait_until(lambda: told in a.log_tail(200), 5.0, interval=0.1, message=f"A to log {told!r}")
    wait_until(lambda: a.read("shared") == b"v2 by B\n", 5.0, interval=0.1, message="A to see B's write")
    b.write("third", "x\n")
    b.sync_ok()
    wait_until(lambda: "third" in a.listdir(), 5.0, interval=0.1, message="A to see B's new name")
    assert a.read("sub/other") == b"untouched\n"
    assert a.errno_of("write", a.path("shared"), "A again", "r+") == errno.EROFS


def test_a_paused_writer_is_taken_over_after_the_ttl_and_publishes_nothing(etcd_cluster):
    a = etcd_cluster.start("hostA", writeback_delay=2)
    epoch = a.wait_writable()["lease"]["epoch"]
    b = etcd_cluster.start("hostB")
    a.write("shared", "published by A\n")
    a.sync_ok()
    a.write("shared", "STALE: A's unflushed overwrite\n")
    a.write("stale-new", "STALE\n")
    stopped_at = time.time()
    a.stop()
    _, st_b, _ = etcd_cluster.wait_new_writer([b], TTL + TIMINGS.lock_delay + 10)
    assert st_b["lease"]["epoch"] > epoch
    took = st_b["lease"]["holder"]["since"] - stopped_at
    assert took >= TTL - 2 * TIMINGS.renew, f"B took over {took:.2f}s after the pause, before etcd's TTL"
    b.write("from-b", "B\n")
    b.sync_ok()
    before = snapshot(etcd_cluster.src, skip=CHANGING)
    new_generation = etcd_generation(etcd_cluster.etcd)
    assert new_generation["epoch"] == st_b["lease"]["epoch"]

    a.cont()
    assert a.errno_of("write", a.path("shared"), "A after the pause\n", "r+") == errno.EROFS
    wait_until(lambda: fenced(a), 2.0, interval=0.1, message="A to say it is no longer the writer")
    time.sleep(TTL + 2)  # A's overdue write-back timer and etcd publisher get every chance
    assert snapshot(etcd_cluster.src, skip=CHANGING) == before
    assert etcd_generation(etcd_cluster.etcd) == new_generation, "the fenced writer published to etcd"
    assert json.loads((etcd_cluster.src / ".safefs/generation").read_bytes())["epoch"] == st_b["lease"]["epoch"]
    assert a.status()["dirty_bytes"] > 0


def test_a_killed_writer_is_taken_over_only_after_the_ttl(etcd_cluster):
    a = etcd_cluster.start("hostA")
    epoch = a.wait_writable()["lease"]["epoch"]
    b = etcd_cluster.start("hostB")
    a.write("synced", "A\n")
    a.sync_ok()
    killed_at = time.time()
    a.kill()
    _, st, _ = etcd_cluster.wait_new_writer([b], TTL + TIMINGS.lock_delay + 10)
    took = st["lease"]["holder"]["since"] - killed_at
    assert st["lease"]["epoch"] > epoch
    # Same machine, dead pid: the directory backend takes over at once; etcd waits for its TTL.
    assert took >= TTL - 2 * TIMINGS.renew, f"taken over {took:.2f}s after the kill"
    assert b.read("synced") == b"A\n"
    b.write("after", "B\n")
    b.sync_ok()
    assert (etcd_cluster.src / "after").read_bytes() == b"B\n"


def test_etcd_stopped_under_a_writer_fences_it_before_the_ttl_and_recover_writes_back(etcd_cluster):
    a = etcd_cluster.start("hostA", writeback_delay=600)
    a.wait_writable()
    a.write("kept", "acknowledged while etcd was up\n")
    assert a.status()["dirty_bytes"] > 0
    stopped_at = time.monotonic()
    etcd_cluster.etcd.stop()
    status = wait_until(lambda: fenced(a), TTL + 5, interval=0.05, message="A to fence itself")
    assert time.monotonic() - stopped_at < TTL, "A was writable after etcd could have expired its lease"
    assert status["dirty_bytes"] > 0, "A dropped its dirty data"
    assert a.errno_of("write", a.path("new"), "x", "x") == errno.EROFS
    assert not (etcd_cluster.src / "kept").exists()
    started = time.monotonic()
    assert a.status()["role"] in ("follower", "writer")  # the control socket answers with etcd down
    assert time.monotonic() - started < 5

    etcd_cluster.etcd.start()  # same data dir: A's old key lives until etcd expires it
    done = wait_until(
        lambda: (d := a.cli("recover", a.mnt, timeout=60)).returncode == 0 and d,
        3 * TTL + 20, interval=0.5, message="recover to succeed once etcd is back",
    )  # fmt: skip
    assert (etcd_cluster.src / "kept").read_bytes() == b"acknowledged while etcd was up\n", describe(done)


def test_etcd_restarted_never_yields_a_second_writer(etcd_cluster):
    a = etcd_cluster.start("hostA")
    a.wait_writable()
    b = etcd_cluster.start("hostB")
    etcd_cluster.etcd.stop()
    etcd_cluster.etcd.start()
    deadline = time.monotonic() + 2 * TTL + 3
    while time.monotonic() < deadline:
        writers = etcd_cluster.writers()
        assert len(writers) <= 1, [(h.name, s["lease"]) for h, s in writers]
        assert b.status()["role"] == "follower"
        time.sleep(0.1)


def test_a_follower_keeps_serving_reads_with_etcd_down(etcd_cluster):
    a = etcd_cluster.start("hostA")
    a.wait_writable()
    b = etcd_cluster.start("hostB")
    a.write("f", "readable\n")
    a.write("g", "never read before etcd went down\n")
    a.sync_ok()
    wait_until(lambda: b.read("f") == b"readable\n", 5.0, interval=0.1)
    etcd_cluster.etcd.stop()
    for _ in range(3):
        assert b.read("f") == b"readable\n"
        assert b.read("g") == b"never read before etcd went down\n"
        started = time.monotonic()
        assert b.status()["role"] == "follower"
        assert time.monotonic() - started < 5
        time.sleep(1)


def test_init_is_refused_while_a_mount_holds_the_lease(etcd_cluster):
    a = etcd_cluster.start("hostA")
    a.wait_writable()
    before = (etcd_cluster.src / ".safefs" / "config.toml").read_text()
    done = a.cli("init", etcd_cluster.src)  # back to the directory backend
    assert done.returncode == int(ExitCode.LEASE_HELD), describe(done)
    assert "hostA" in done.stderr
    assert (etcd_cluster.src / ".safefs" / "config.toml").read_text() == before
    assert a.cli("sync", a.mnt, "--release").returncode == 0
    done = a.cli("init", etcd_cluster.src)
    assert done.returncode == 0, describe(done)


def test_a_follower_refreshes_only_the_directories_a_generation_names(etcd_cluster):
    # Only the syncs write back (and publish), so each step below is one generation.
    a = etcd_cluster.start("hostA", writeback_delay=600)
    a.wait_writable()
    b = etcd_cluster.start("hostB")
    for d in ("quiet", "busy"):
        a.call("mkdir", a.path(d))
        a.write(f"{d}/old", "old\n")
    a.sync_ok()
    wait_until(lambda: b.listdir("quiet") == ["old"] and b.listdir("busy") == ["old"], 5.0, interval=0.1)
    # Changed behind safefs's back: only a refresh of quiet/ can show it.
    (etcd_cluster.src / "quiet" / "out-of-band").write_text("x\n")
    a.write("busy/new", "new\n")
    a.sync_ok()
    wait_until(lambda: "new" in b.listdir("busy"), 5.0, interval=0.1, message="B to see busy/new")
    assert b.read("busy/new") == b"new\n"
    record = json.loads((etcd_cluster.src / ".safefs" / "generation").read_bytes())
    assert b.listdir("quiet") == ["old"], f"B refreshed a directory {record} did not name"
    # A sync with nothing to write back publishes a generation that names nothing: B, which
    # sees it, refreshes nothing (it used to refresh everything, on every follower).
    a.sync_ok()
    told = f"generation {record['generation'] + 1} of epoch {record['epoch']}"
    wait_until(lambda: told in b.log_tail(200), 5.0, interval=0.1, message=f"B to log {told!r}")
    assert json.loads((etcd_cluster.src / ".safefs" / "generation").read_bytes())["changed"] == []
    assert b.listdir("quiet") == ["old"], "B refreshed everything for a generation that named nothing"
    # `safefs sync` on a follower means "show me the latest": everything is refreshed.
    b.sync_ok()
    assert b.listdir("quiet") == ["old", "out-of-band"]


def test_a_mount_that_cannot_reach_etcd_follows_read_only_and_says_why(etcd_cluster):
    etcd_cluster.etcd.stop()
    a = etcd_cluster.start("hostA")
    status = a.status()
    assert status["role"] == "follower", status["lease"]
    assert "etcd" in (status["lease"].get("last_error") or ""), status["lease"]
    assert "following read-only" in a.log_tail(50)
    assert a.errno_of("write", a.path("f"), "x", "x") == errno.EROFS
    etcd_cluster.etcd.start()
    a.wait_writable(timeout=20)
    a.write("f", "written once etcd answered\n")
    a.sync_ok()
    assert (etcd_cluster.src / "f").read_bytes() == b"written once etcd answered\n"
