"""safefs.metrics: the Prometheus exposition of status answers, without a mount.

Checks: it parses with prometheus-client's parser; counters end in _total; several mounts are
told apart by the `mnt` label; a key a status lacks (a follower has no lease holder) leaves
its sample out instead of inventing one; None and booleans are never written as numbers.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from safefs import metrics

WRITER = {
    "mnt": "/m1", "src": "/p1", "host": "h", "pid": 7, "role": "writer",
    "dirty_bytes": 10, "dirty_files": 1, "oldest_dirty_age": 2.5, "pending_ops": [1, 2],
    "bytes_fetched": 5, "bytes_written": 6, "cache_bytes": 3, "cache_limit": 100,
    "cache_hits": 4, "evictions": 0, "conflicts": [{}], "errors": [], "warnings": [],
    "flushing": False,
    "lease": {"epoch": 3, "deadline": 9.0, "generation": 2, "holder": {"heartbeat_age": 0.5}},
}  # fmt: skip
FOLLOWER = {"mnt": "/m2", "role": "follower", "dirty_bytes": 0, "oldest_dirty_age": None,
            "lease": {"epoch": 3, "deadline": None, "holder": None}}  # fmt: skip


def samples(text: str) -> dict[tuple[str, str], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.labels["mnt"] + ("/" + s.labels["role"] if "role" in s.labels else "")
            found[(s.name, key)] = s.value
    return found


def test_exposition_of_two_mounts():
    text = metrics.exposition([WRITER, FOLLOWER])
    got = samples(text)
    assert got[("safefs_dirty_bytes", "/m1")] == 10
    assert got[("safefs_pending_ops", "/m1")] == 2
    assert got[("safefs_written_back_bytes_total", "/m1")] == 6
    assert got[("safefs_conflicts", "/m1")] == 1
    assert got[("safefs_role", "/m1/writer")] == 1 and got[("safefs_role", "/m1/follower")] == 0
    assert got[("safefs_role", "/m2/follower")] == 1
    assert got[("safefs_lease_heartbeat_age_seconds", "/m1")] == 0.5
    assert got[("safefs_oldest_dirty_age_seconds", "/m2")] == 0  # nothing dirty: age 0
    assert ("safefs_lease_heartbeat_age_seconds", "/m2") not in got  # no holder: no sample
    assert ("safefs_lease_expires_in_seconds", "/m2") not in got
    assert ("safefs_written_back_bytes_total", "/m2") not in got  # not reported: not invented
    assert "# TYPE safefs_fetched_bytes_total counter" in text or "# TYPE safefs_fetched_bytes counter" in text
    assert "None" not in text and "False" not in text


def test_no_mounts_is_an_empty_but_valid_exposition():
    assert list(text_string_to_metric_families(metrics.exposition([])))  # families, no samples
