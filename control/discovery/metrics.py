"""Prometheus metrics of the service's state and counters (served by control.promhttp).

Metric names follow Sidero's discovery-service (discovery_state_*), plus request
counters by method and status code.
"""

from __future__ import annotations

import collections

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from control.discovery.store import Store, StoreUnavailable


class RequestCounters:
    def __init__(self) -> None:
        # Keys come from a fixed set (method names x status codes), so this stays small.
        self.handled: collections.Counter[tuple[str, str]] = collections.Counter()

    def record(self, method: str, code: str) -> None:
        self.handled[(method, code)] += 1


async def families(store: Store, requests: RequestCounters) -> list[Metric]:
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
