"""Prometheus metrics of the service's state and counters (served by control.promhttp).

Metric names follow Sidero's discovery-service (discovery_state_*,
discovery_server_hello_requests_total), plus requests by method and status code: counts
and latency (a Watch's latency is its stream's lifetime).
"""

from __future__ import annotations

import bisect
import collections
import re
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from control.discovery.store import Store, StoreUnavailable

# Seconds; unary calls take a millisecond or so, a rate-limited one up to 10 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_CLIENT_VERSIONS = 64  # distinct label values kept; later ones count as "other"
_VERSION = re.compile(r"([A-Za-z][\w.-]{0,31}/)?v?(\d{1,6})\.(\d{1,6})")


def client_version_label(version: str) -> str:
    """A bounded label for a client's self-reported version: Talos's 'v1.9.3' -> 'v1.9',
    'kubespan-py/0.1.0' -> 'kubespan-py/v0.1'; empty -> 'unknown', anything else 'other'."""
    m = _VERSION.match(version.strip())
    if m:
        return f"{m.group(1) or ''}v{m.group(2)}.{m.group(3)}"
    return "unknown" if not version.strip() else "other"


class RequestCounters:
    def __init__(self) -> None:
        # Keys come from a fixed set (method names x status codes), so this stays small.
        self.handled: collections.Counter[tuple[str, str]] = collections.Counter()
        # (method, code) -> (count per bucket, the last one +Inf), sum of seconds
        self.latency: dict[tuple[str, str], tuple[list[int], float]] = {}
        self.hello_versions: collections.Counter[str] = collections.Counter()

    def record(self, method: str, code: str, seconds: float = 0.0) -> None:
        self.handled[(method, code)] += 1
        counts, total = self.latency.get((method, code)) or ([0] * (len(LATENCY_BUCKETS) + 1), 0)
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency[(method, code)] = (counts, total + seconds)

    def hello(self, client_version: str) -> None:
        label = client_version_label(client_version)
        if label not in self.hello_versions and len(self.hello_versions) >= MAX_CLIENT_VERSIONS:
            label = "other"
        self.hello_versions[label] += 1


@dataclass
class SnapshotStats:
    """The in-memory store's snapshot writes."""

    written: int = 0
    failed: int = 0
    last_seconds: float = 0.0  # how long the last successful write took
    last_bytes: int = 0
    last_success: float = 0.0  # Unix time; 0: never

    def families(self) -> list[Metric]:
        writes = CounterMetricFamily(
            "discovery_snapshot_writes_total",
            "State snapshot writes, by result.",
            labels=["result"],
        )
        writes.add_metric(["ok"], self.written)
        writes.add_metric(["error"], self.failed)
        return [
            writes,
            GaugeMetricFamily(
                "discovery_snapshot_duration_seconds",
                "How long the last successful snapshot write took.",
                value=self.last_seconds,
            ),
            GaugeMetricFamily(
                "discovery_snapshot_size_bytes",
                "Size of the last snapshot written.",
                value=self.last_bytes,
            ),
            GaugeMetricFamily(
                "discovery_snapshot_last_success_timestamp_seconds",
                "When the last snapshot was written (Unix time; 0: never).",
                value=self.last_success,
            ),
        ]


async def families(
    store: Store, requests: RequestCounters, snapshots: SnapshotStats | None = None
) -> list[Metric]:
    """Read at scrape time, on the loop that owns ``store``.

    With the store unreachable the state gauges are left out (not reported as zero)."""
    gc_runs, gc_clusters, gc_affiliates = store.gc_totals()
    requests_total = CounterMetricFamily(
        "discovery_server_requests_total",
        "gRPC requests handled, by method and status code.",
        labels=["method", "code"],
    )
    for (method, code), n in sorted(requests.handled.items()):
        requests_total.add_metric([method, code], n)
    latency = HistogramMetricFamily(
        "discovery_server_request_duration_seconds",
        "Time to handle a gRPC request (a Watch: its stream's life), by method and status code.",
        labels=["method", "code"],
    )
    for (method, code), (counts, total) in sorted(requests.latency.items()):
        cumulative, buckets = 0, []
        for bound, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        latency.add_metric([method, code], buckets, total)
    hello = CounterMetricFamily(
        "discovery_server_hello_requests_total",
        "Number of hello requests by client version.",
        labels=["client_version"],
    )
    for version, n in sorted(requests.hello_versions.items()):
        hello.add_metric([version], n)
    counters: list[Metric] = [
        CounterMetricFamily(
            "discovery_state_gc_runs_total", "The number of GC runs.", value=gc_runs
        ),
        CounterMetricFamily(
            "discovery_state_gc_clusters_total",
            "The total number of GC'ed clusters.",
            value=gc_clusters,
        ),
        CounterMetricFamily(
            "discovery_state_gc_affiliates_total",
            "The total number of GC'ed affiliates.",
            value=gc_affiliates,
        ),
        requests_total,
        latency,
        hello,
        *(snapshots.families() if snapshots else []),
    ]
    try:
        s = await store.stats()
    except StoreUnavailable:
        return counters
    return [
        GaugeMetricFamily(
            "discovery_state_clusters",
            "The current number of clusters in the state.",
            value=s.clusters,
        ),
        GaugeMetricFamily(
            "discovery_state_affiliates",
            "The current number of affiliates in the state.",
            value=s.affiliates,
        ),
        GaugeMetricFamily(
            "discovery_state_endpoints",
            "The current number of endpoints in the state.",
            value=s.endpoints,
        ),
        GaugeMetricFamily(
            "discovery_state_subscriptions",
            "The current number of subscriptions in the state.",
            value=s.subscriptions,
        ),
        *counters,
    ]
