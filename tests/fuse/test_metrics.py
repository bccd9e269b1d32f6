"""`safefs status --prometheus` on a real mount (issue 11 item 7).

What these tests check: the output parses as the Prometheus text format (with
prometheus-client's own parser); the dirty gauges follow a write and `safefs sync`; the
written-back counter grows by what sync wrote; role, epoch and the lease heartbeat age are
there, labelled with the mountpoint.

Rules: mounts come only from the fixtures; no fixed sleeps.
"""

from __future__ import annotations

import os
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import describe, is_mounted, run_safefs

pytestmark = [pytest.mark.timeout(120), pytest.mark.fuse]

REFUSED = 3
LONG_DELAY = ("--writeback-delay", "600")  # nothing is written back on its own during the test


def scrape(mount) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels without mnt): value} of `status MNT --prometheus`."""
    done = mount.cli("status", mount.mnt, "--prometheus")
    assert done.returncode == 0, describe(done)
    samples = {}
    for family in text_string_to_metric_families(done.stdout):
        for sample in family.samples:
            assert sample.labels.get("mnt") == str(mount.mnt.resolve()), sample
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "mnt"))
            samples[(sample.name, labels)] = sample.value
    return samples


def test_status_prometheus_follows_writes_and_sync(mount_factory):
    m = mount_factory(None, None, None, *LONG_DELAY)
    data = os.urandom(200_000)
    (m.mnt / "a").write_bytes(data)

    before = scrape(m)
    assert before[("safefs_dirty_bytes", ())] >= len(data), before
    assert before[("safefs_dirty_files", ())] >= 1, before
    assert before[("safefs_oldest_dirty_age_seconds", ())] >= 0, before
    assert before[("safefs_role", (("role", "writer"),))] == 1, before
    assert before[("safefs_role", (("role", "follower"),))] == 0, before
    assert before[("safefs_lease_epoch", ())] >= 1, before
    assert 0 <= before[("safefs_lease_heartbeat_age_seconds", ())] < 60, before
    assert ("safefs_cache_bytes", ()) in before and ("safefs_evictions_total", ()) in before, before
    assert before[("safefs_conflicts", ())] == 0 and before[("safefs_errors", ())] == 0, before
    info = [key for key in before if key[0] == "safefs_mount_info"]
    assert len(info) == 1 and ("src", str(m.src.resolve())) in info[0][1], before

    assert m.sync().returncode == 0
    after = scrape(m)
    assert after[("safefs_dirty_bytes", ())] == 0 and after[("safefs_dirty_files", ())] == 0, after
    assert after[("safefs_oldest_dirty_age_seconds", ())] == 0, after
    written = after[("safefs_written_back_bytes_total", ())] - before[("safefs_written_back_bytes_total", ())]
    assert written >= len(data), (before, after)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_port_serves_the_same_metrics(mount_factory):
    port = free_port()
    m = mount_factory(None, None, None, *LONG_DELAY, "--metrics-port", str(port))
    (m.mnt / "a").write_bytes(b"x" * 5000)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = {
        (s.name, s.labels.get("mnt")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert values[("safefs_dirty_bytes", str(m.mnt.resolve()))] >= 5000, text


def test_metrics_port_in_use_is_refused_before_mounting(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_safefs(
            "mount", tmp_path / "src", tmp_path / "mnt", "--cache-dir", tmp_path / "cache",
            "--metrics-port", str(port),
        )  # fmt: skip
    assert done.returncode == REFUSED, describe(done)
    assert f"127.0.0.1:{port}" in done.stderr and "--metrics-port" in done.stderr, describe(done)
    assert not is_mounted(tmp_path / "mnt")
