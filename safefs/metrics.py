"""Prometheus metrics of safefs mounts, made from the daemon's `status` answer (issue 11 item 7).

`exposition(statuses)` is the Prometheus text format (version 0.0.4) for `safefs status
--prometheus`; `StatusCollector(get_statuses)` is the same as a prometheus-client collector,
for a registry served by an HTTP listener. Every sample is labelled with the mount's `mnt`,
so one scrape can cover several mounts. Names follow the Prometheus conventions: base units
in the name (`_bytes`, `_seconds`), counters end in `_total`, the role is a 0/1 gauge per role
(`safefs_role{role="writer"} 1`). Rates (write-back bytes per second) are left to PromQL:
`rate(safefs_written_back_bytes_total[1m])`.

`serve(port, get_statuses)` starts prometheus-client's HTTP listener on 127.0.0.1 (never on
other interfaces: the metrics name project paths) in its own daemon thread; each scrape calls
`get_statuses()` from that thread, so it must be thread-safe (the daemon passes a call into its
trio loop).

A key missing from a status (an older daemon, a follower without a lease holder) leaves its
sample out rather than inventing a value.

Resource layer: prometheus-client and the stdlib only; pure functions of the status dicts,
no I/O except the listener; safe from any thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

ROLES = ("writer", "follower")

# (metric name, status key, help); counters get "_total" appended by prometheus-client.
GAUGES = (
    ("safefs_dirty_bytes", "dirty_bytes", "Bytes written to the mount and not yet written back to the project."),
    ("safefs_dirty_files", "dirty_files", "Files with changes not yet written back to the project."),
    ("safefs_cache_bytes", "cache_bytes", "Bytes held in the local cache."),
    ("safefs_cache_limit_bytes", "cache_limit", "Cache size above which clean data is evicted."),
    ("safefs_writeback_delay_seconds", "writeback_delay", "How long a file must be quiet before write-back."),
    ("safefs_inodes", "inodes", "Inodes the daemon holds."),
)
COUNTERS = (
    ("safefs_fetched_bytes", "bytes_fetched", "Bytes read from the project into the cache."),
    ("safefs_written_back_bytes", "bytes_written", "Bytes written back to the project."),
    ("safefs_cache_hits", "cache_hits", "Reads served from the local cache."),
    ("safefs_fetches", "fetches", "Reads that fetched data from the project."),
    ("safefs_evictions", "evictions", "Cached files evicted to stay under the cache limit."),
    ("safefs_flushes", "flushes", "Write-back rounds."),
    ("safefs_internal_errors", "internal_errors", "Unexpected errors in the daemon (bugs); see its log."),
)
LISTS = (
    ("safefs_conflicts", "conflicts", "Conflicts written (changes kept aside because the project changed)."),
    ("safefs_errors", "errors", "Current errors writing back to the project."),
    ("safefs_warnings", "warnings", "Distinct recent warnings the user should act on."),
)



def _field(key: str) -> Callable[[dict[str, Any]], Any]:
    """The status field `key`, for one metric's values."""
    return lambda status: status.get(key)


def _length(key: str) -> Callable[[dict[str, Any]], Any]:
    """How many items the status list `key` holds (None when it is not a list)."""
    return lambda status: len(status[key]) if isinstance(status.get(key), list) else None

def exposition(statuses: Iterable[dict[str, Any]]) -> str:
    """The Prometheus text exposition of these `status` answers."""
    registry = CollectorRegistry(auto_describe=False)
    listed = list(statuses)
    registry.register(StatusCollector(lambda: listed))
    return generate_latest(registry).decode()


class StatusCollector:
    """A prometheus-client collector: each scrape turns `get_statuses()` into metric families."""

    def __init__(self, get_statuses: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self._get_statuses = get_statuses

    def collect(self) -> Iterator[Metric]:
        return iter(families(list(self._get_statuses())))


def families(statuses: list[dict[str, Any]]) -> list[Metric]:
    """One metric family per name, with a sample per mount that reports the value."""
    labels = ["mnt"]
    out: list[Metric] = []

    def gauge(name: str, doc: str, values: Iterable[tuple[list[str], float]], extra: Sequence[str] = ()) -> None:
        family = GaugeMetricFamily(name, doc, labels=labels + list(extra))
        for label_values, value in values:
            family.add_metric(label_values, value)
        out.append(family)

    def numbers(get: Callable[[dict[str, Any]], Any]) -> list[tuple[list[str], float]]:
        found = []
        for status in statuses:
            value = get(status)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found.append(([str(status.get("mnt", ""))], float(value)))
        return found

    info = GaugeMetricFamily(
        "safefs_mount_info", "A safefs mount: its project, host and daemon pid (value 1).",
        labels=["mnt", "src", "host", "pid"],
    )  # fmt: skip
    for status in statuses:
        info.add_metric([str(status.get(k, "")) for k in ("mnt", "src", "host", "pid")], 1)
    out.append(info)
    for name, key, doc in GAUGES:
        gauge(name, doc, numbers(_field(key)))
    gauge(
        "safefs_oldest_dirty_age_seconds",
        "Age of the oldest change not yet written back (0 when nothing is dirty).",
        numbers(lambda s: 0 if "dirty_bytes" in s and s.get("oldest_dirty_age") is None else s.get("oldest_dirty_age")),
    )
    gauge(
        "safefs_pending_ops",
        "Operations waiting to be written back.",
        numbers(lambda s: len(s["pending_ops"]) if isinstance(s.get("pending_ops"), list) else s.get("pending_ops")),
    )
    for name, key, doc in COUNTERS:
        family = CounterMetricFamily(name, doc, labels=labels)
        for label_values, value in numbers(_field(key)):
            family.add_metric(label_values, value)
        out.append(family)
    for name, key, doc in LISTS:
        gauge(name, doc, numbers(_length(key)))
    role = GaugeMetricFamily(
        "safefs_role", "1 for the mount's current role (writer or follower).", labels=["mnt", "role"]
    )
    for status in statuses:
        current = status.get("role")
        for name in sorted({*ROLES, *([current] if isinstance(current, str) else [])}):
            role.add_metric([str(status.get("mnt", "")), name], 1 if name == current else 0)
    out.append(role)
    gauge(
        "safefs_lease_epoch", "Epoch of the write lease this mount last saw.", numbers(lambda s: _lease(s).get("epoch"))
    )
    gauge(
        "safefs_lease_heartbeat_age_seconds",
        "Seconds since the lease holder last renewed its lease.",
        numbers(lambda s: (_lease(s).get("holder") or {}).get("heartbeat_age")),
    )
    gauge(
        "safefs_lease_expires_in_seconds",
        "Seconds until this mount's write lease runs out unless renewed (writers only).",
        numbers(lambda s: _lease(s).get("deadline")),
    )
    gauge(
        "safefs_generation",
        "Generation of the project this mount last published or saw.",
        numbers(lambda s: _lease(s).get("generation")),
    )
    return out


def _lease(status: dict[str, Any]) -> dict[str, Any]:
    lease = status.get("lease")
    return lease if isinstance(lease, dict) else {}


class Listener:
    """A running metrics listener; `close()` stops it (idempotent)."""

    def __init__(self, port: int, get_statuses: Callable[[], Iterable[dict[str, Any]]]) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(StatusCollector(get_statuses))
        self._server, self._thread = start_http_server(port, addr="127.0.0.1", registry=registry)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(port: int, get_statuses: Callable[[], Iterable[dict[str, Any]]]) -> Listener:
    """Serve the statuses as metrics on http://127.0.0.1:`port`/metrics. Raises OSError (port in use)."""
    return Listener(port, get_statuses)
