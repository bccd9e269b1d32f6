"""contrib/slurm/safefs-job on simulated cluster nodes (issue 11 item 10).

What these tests check, with the user's workstation and two job nodes on one project (each its
own host with its own --host-id and node-local cache dir, see conftest; "plain" mode, because
the wrapper mounts by itself):
- the job's first node (SLURM_NODEID=0) becomes the writer with `safefs acquire --wait` once
  the workstation released the lease; the workstation and the other node stay followers and
  the other node cannot write (EROFS) but reads the project;
- when the job step ends, everything it wrote is on the project, the lease is free (the
  workstation takes it back without waiting for a takeover) and the node's mount is gone;
- the same when the job is cancelled (SIGTERM to the wrapper, as Slurm sends): exit 143, the
  changes written back, the lease released.

Rules: the workstation comes from the `cluster` fixture; the wrapper's mounts are unmounted
even if a test fails; waits are wait_until against deadlines, the job commands wait on files.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, describe, is_mounted, lazy_unmount, safefs_env, wait_until
from tests.multihost.conftest import TIMINGS

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

WRAPPER = REPO / "contrib" / "slurm" / "safefs-job"
STEP_TIMEOUT = 60.0


@pytest.fixture
def host_mode() -> str:
    return "plain"  # the wrapper starts its own daemons: nodes are told apart by --host-id


class Job:
    """Wrapper processes on simulated nodes node0, node1... of one job."""

    def __init__(self, root: Path, src: Path) -> None:
        self.root, self.src = root, src
        self.procs: dict[int, subprocess.Popen[str]] = {}

    def mnt(self, node: int) -> Path:
        return self.root / f"mnt-node{node}"

    def start(self, node: int, script: str) -> subprocess.Popen[str]:
        mount_args = ["--host-id", f"node{node}", "--writeback-delay", "0.5", *TIMINGS.args()]
        env = safefs_env({
            "SAFEFS": f"{shlex.quote(sys.executable)} -m safefs",
            "SAFEFS_MOUNT_ARGS": " ".join(mount_args),
            "SAFEFS_JOB_CACHE_ROOT": str(self.root / f"scratch-node{node}"),
            "SLURM_JOB_ID": "4242",
            "SLURM_NODEID": str(node),
            "MNT": str(self.mnt(node)),
            "FLAGS": str(self.root),
        })  # fmt: skip
        log = open(self.root / f"job-node{node}.log", "w")
        proc = subprocess.Popen(
            [str(WRAPPER), str(self.src), str(self.mnt(node)), "--", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        log.close()
        self.procs[node] = proc
        return proc

    def log(self, node: int) -> str:
        return (self.root / f"job-node{node}.log").read_text()

    def wait_flag(self, name: str) -> str:
        path = self.root / name
        wait_until(path.exists, STEP_TIMEOUT, interval=0.1, message=f"{name} from the job step")
        return path.read_text()

    def cleanup(self) -> None:
        for node, proc in self.procs.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            if is_mounted(self.mnt(node)):
                lazy_unmount(self.mnt(node))


@pytest.fixture
def job(cluster, tmp_path):
    job = Job(tmp_path, cluster.src)
    yield job
    job.cleanup()


def role(mnt: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "safefs", "status", str(mnt), "--json"],
        capture_output=True, text=True, timeout=60, env=safefs_env(),
    )  # fmt: skip
    assert done.returncode == 0, describe(done)
    return json.loads(done.stdout)["role"]


def start_workstation(cluster):
    ws = cluster.start("workstation")
    ws.write("input", b"data from the workstation\n")
    ws.sync_ok("--release")  # what the user does before submitting (the README's example)
    return ws


def test_job_first_node_writes_others_follow_and_the_workstation_takes_it_back(cluster, job):
    ws = start_workstation(cluster)
    writer = job.start(
        0, 'cat "$MNT/input" > "$MNT/output" && echo "made on node0" >> "$MNT/output" && '
        'touch "$FLAGS/node0-started" && while [ ! -e "$FLAGS/go" ]; do sleep 0.1; done',
    )  # fmt: skip
    job.wait_flag("node0-started")
    follower = job.start(
        1, 'cat "$MNT/input" > "$FLAGS/node1-read"; '
        'if { echo x > "$MNT/nope"; } 2> "$FLAGS/node1-error"; '
        'then echo wrote; else echo refused; fi > "$FLAGS/node1-write"',
    )  # fmt: skip
    assert follower.wait(timeout=STEP_TIMEOUT) == 0, job.log(1)
    assert job.wait_flag("node1-read") == "data from the workstation\n"
    assert job.wait_flag("node1-write") == "refused\n", job.log(1)
    assert "Read-only file system" in (job.root / "node1-error").read_text()
    assert role(job.mnt(0)) == "writer", job.log(0)
    assert ws.status()["role"] == "follower"
    assert not is_mounted(job.mnt(1)), "the follower node's mount outlived its job step"

    (job.root / "go").touch()
    assert writer.wait(timeout=STEP_TIMEOUT) == 0, job.log(0)
    assert (cluster.src / "output").read_bytes() == b"data from the workstation\nmade on node0\n"
    assert not is_mounted(job.mnt(0)), job.log(0)
    done = ws.cli("acquire", ws.mnt)  # no --wait: the job released the lease, no takeover needed
    assert done.returncode == 0, describe(done)
    ws.wait_writable()
    assert ws.read("output") == b"data from the workstation\nmade on node0\n"


def test_cancelled_job_still_writes_back_and_releases(cluster, job):
    ws = start_workstation(cluster)
    writer = job.start(0, 'echo partial > "$MNT/result" && touch "$FLAGS/node0-started" && exec sleep 600')
    job.wait_flag("node0-started")
    writer.send_signal(signal.SIGTERM)  # scancel
    assert writer.wait(timeout=STEP_TIMEOUT) == 128 + signal.SIGTERM, job.log(0)
    assert (cluster.src / "result").read_bytes() == b"partial\n", job.log(0)
    assert not is_mounted(job.mnt(0)), job.log(0)
    done = ws.cli("acquire", ws.mnt)
    assert done.returncode == 0, describe(done)
    ws.wait_writable()
