"""`safefs status --prometheus` on a real mount (issue 11 item 7).

What these tests check: the output parses as the Prometheus text format (with
prometheus-client's own parser); the dirty gauges follow a write and `safefs sync`; the
written-back counter grows by what sync wrote; role, epoch and the lease heartbeat age are
there, labelled with the mountpoint.

Rules: mounts come only from the fixtures; no fixed sleeps.
"""

from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import describe

pytestmark = [pytest.mark.timeout(120), pytest.mark.fuse]

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
