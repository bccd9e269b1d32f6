"""scripts/bench-scale: one writer and many follower daemons on one project, per lease backend.

    scripts/bench-scale [--followers 20] [--rounds 5] [--idle 30] [--backends dir,etcd]
                        [--dir DIR] [--json FILE]

For each backend (dir: the lease and generation files on the project; etcd: a local etcd
started here, on 127.0.0.1 and a free port, and `safefs init SRC --lease-backend etcd`):
1. mount the writer, then N followers (`safefs mount`, default lease timings and poll
   intervals: what a site would run), each its own daemon, host id and cache dir;
2. idle: read every follower's counters (`safefs status`: lease.project_polls, the calls its
   lease and generation polls made to the project; lease.etcd_requests), wait --idle seconds,
   read them again: requests per second per follower, to the project and to etcd;
3. --rounds times: write a file on the writer, `safefs sync` it, and take the wall time sync
   returned; then wait until every follower's status says it saw that generation
   (lease.generation_seen_at, the follower's own wall time of learning it; one machine, one
   clock). Latency = seen_at - sync returned (0 for a follower that knew before sync returned),
   and seen_at - the generation record's own time (when the writer published it), over all
   followers and rounds: median and max;
4. unmount everything (also on failure or Ctrl-C) and stop etcd.

The "project" is a local directory here: what is measured is how often and how fast the
followers ask, not how slow NFS answers. Single-threaded, blocking.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from safefs.config import socket_path  # noqa: E402
from safefs.control import client, protocol  # noqa: E402

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def safefs(*args: object, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([PY, "-m", "safefs", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"safefs {' '.join(map(str, args))} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def status(mnt: Path) -> dict[str, Any]:
    # The JSON object, as `safefs status --json` prints it.
    status = client.call(socket_path(mnt, os.environ, os.getuid()), "status", timeout=10)
    wire: dict[str, Any] = protocol.to_wire(status)
    return wire


class Etcd:
    def __init__(self, root: Path) -> None:
        self.port, peer_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{peer_port}"
        binary = shutil.which("etcd") or "/usr/bin/etcd"
        self.log = open(root / "etcd.log", "wb")
        self.proc = subprocess.Popen(
            [binary, "--name", "bench", "--data-dir", str(root / "etcd-data"), "--listen-client-urls", self.url,
             "--advertise-client-urls", self.url, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"bench={peer}", "--logger", "zap", "--log-level", "warn"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                req = urllib.request.Request(self.url + "/v3/kv/range", data=b'{"key": "AA=="}')
                with urllib.request.urlopen(req, timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("etcd did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self.log.close()


def run_backend(backend: str, root: Path, followers: int, rounds: int, idle: float) -> dict[str, Any]:
    src = root / "src"
    src.mkdir(parents=True)
    mounts: list[Path] = []
    etcd = Etcd(root) if backend == "etcd" else None
    try:
        if etcd is not None:
            safefs("init", src, "--lease-backend", "etcd", "--etcd-endpoints", etcd.url)

        def mount(name: str) -> Path:
            mnt = root / f"mnt-{name}"
            mnt.mkdir()
            safefs("mount", src, mnt, "--cache-dir", root / f"cache-{name}", "--host-id", name,
                   "--writeback-delay", "600")
            mounts.append(mnt)
            return mnt

        writer = mount("writer")
        assert status(writer)["role"] == "writer"
        fols = [mount(f"f{i:03d}") for i in range(followers)]
        print(f"{backend}: writer and {followers} followers mounted", file=sys.stderr)
        time.sleep(5)  # let start-up traffic settle

        def counters() -> list[tuple[int, int]]:
            out = []
            for m in fols:
                lease = status(m)["lease"]
                out.append((int(lease.get("project_polls") or 0), int(lease.get("etcd_requests") or 0)))
            return out

        before, t0 = counters(), time.monotonic()
        time.sleep(idle)
        after, t1 = counters(), time.monotonic()
        span = t1 - t0
        project_rate = [(a[0] - b[0]) / span for a, b in zip(after, before)]
        etcd_rate = [(a[1] - b[1]) / span for a, b in zip(after, before)]

        latencies: list[float] = []  # from the sync's return (0 if a follower knew before)
        from_publish: list[float] = []  # from the generation record's own time (the writer's wall clock)
        for r in range(rounds):
            (writer / f"probe-{r}").write_text(f"round {r}\n")
            safefs("sync", writer)
            synced = time.time()
            target = status(writer)["lease"]["generation"]
            published = json.loads((src / ".safefs" / "generation").read_bytes())
            assert published["generation"] == target
            seen: dict[Path, float] = {}
            deadline = time.monotonic() + 60
            while len(seen) < len(fols):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(fols) - len(seen)} followers never saw generation {target}")
                for m in fols:
                    if m in seen:
                        continue
                    lease = status(m)["lease"]
                    if (lease.get("generation") or 0) >= target and lease.get("generation_seen_at"):
                        seen[m] = lease["generation_seen_at"]
                time.sleep(0.05)
            latencies += [max(0.0, t - synced) for t in seen.values()]
            from_publish += [t - published["time"] for t in seen.values()]
            assert (fols[0] / f"probe-{r}").read_text() == f"round {r}\n"
        return {
            "backend": backend, "followers": followers, "rounds": rounds, "idle_seconds": round(span, 1),
            "visible_median_s": round(statistics.median(latencies), 3), "visible_max_s": round(max(latencies), 3),
            "from_publish_median_s": round(statistics.median(from_publish), 3),
            "from_publish_max_s": round(max(from_publish), 3),
            "idle_project_calls_per_s_per_follower": round(statistics.mean(project_rate), 3),
            "idle_etcd_requests_per_s_per_follower": round(statistics.mean(etcd_rate), 3),
        }  # fmt: skip
    finally:
        for mnt in reversed(mounts):
            done = subprocess.run([PY, "-m", "safefs", "umount", str(mnt), "--timeout", "60"], capture_output=True)
            if done.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        if etcd is not None:
            etcd.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--followers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle counting")
    parser.add_argument("--backends", default="dir,etcd")
    parser.add_argument("--dir", help="scratch directory (default: a new temporary one, removed after)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="safefs-bench-scale-"))
    results = []
    try:
        for backend in args.backends.split(","):
            results.append(run_backend(backend, base / backend, args.followers, args.rounds, args.idle))
            print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    print(f"{'backend':8} {'followers':>9} {'after sync: median':>19} {'max':>7} {'after publish: median':>22} "
          f"{'max':>7} {'idle project calls/s/follower':>30} {'idle etcd req/s/follower':>25}")  # fmt: skip
    for r in results:
        print(f"{r['backend']:8} {r['followers']:>9} {r['visible_median_s']:>18.3f}s {r['visible_max_s']:>6.3f}s "
              f"{r['from_publish_median_s']:>21.3f}s {r['from_publish_max_s']:>6.3f}s "
              f"{r['idle_project_calls_per_s_per_follower']:>30.3f} "
              f"{r['idle_etcd_requests_per_s_per_follower']:>25.3f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
