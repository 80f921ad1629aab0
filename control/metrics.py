"""The agent's Prometheus metrics, built from its live state at scrape time.

The agent counts reconciles in a ``ReconcileStats``; everything per peer is read from its
``PeerTracker``. ``control.promhttp.MetricsServer`` serves what ``agent_families`` builds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from control.peerstate import PeerStatus
from control.peersync import PeerTracker

PEER_LABELS = ["label", "peer"]


@dataclass
class ReconcileStats:
    total: int = 0
    last_duration: float = 0.0

    def record(self, seconds: float) -> None:
        self.total += 1
        self.last_duration = seconds


def agent_families(tracker: PeerTracker, reconciles: ReconcileStats, now: float) -> list[Metric]:
    """All of the agent's metric families; ``now`` is wall-clock time (time.time())."""
    rows = tracker.rows()

    def per_peer(
        family: type[GaugeMetricFamily] | type[CounterMetricFamily],
        name: str,
        documentation: str,
        value: Callable[[str, PeerStatus], float],
    ) -> Metric:
        metric = family(name, documentation, labels=PEER_LABELS)
        for key, row in rows:
            metric.add_metric([row.label, key], value(key, row))
        return metric

    state = GaugeMetricFamily(
        "kubespan_peer_state",
        "peer state (label state=up|down|unknown)",
        labels=[*PEER_LABELS, "state"],
    )
    for key, row in rows:
        state.add_metric([row.label, key, row.state.value], 1)

    return [
        per_peer(
            GaugeMetricFamily,
            "kubespan_peer_up",
            "1 when the peer is up, 0 otherwise",
            lambda _, r: r.state.value == "up",
        ),
        state,
        per_peer(
            GaugeMetricFamily,
            "kubespan_peer_receive_bytes",
            "bytes received from the peer",
            lambda _, r: r.rx_bytes,
        ),
        per_peer(
            GaugeMetricFamily,
            "kubespan_peer_transmit_bytes",
            "bytes sent to the peer",
            lambda _, r: r.tx_bytes,
        ),
        per_peer(
            GaugeMetricFamily,
            "kubespan_peer_seconds_since_handshake",
            "seconds since the last handshake (-1: never)",
            lambda _, r: -1 if r.last_handshake is None else now - r.last_handshake,
        ),
        per_peer(
            CounterMetricFamily,
            "kubespan_peer_endpoint_changes_total",
            "times the agent switched the peer's endpoint",
            lambda k, _: tracker.endpoint_changes.get(k, 0),
        ),
        GaugeMetricFamily(
            "kubespan_reconcile_duration_seconds",
            "duration of the last reconcile",
            value=reconciles.last_duration,
        ),
        CounterMetricFamily("kubespan_reconcile_total", "reconciles run", value=reconciles.total),
        GaugeMetricFamily("kubespan_peers", "peers specified", value=len(rows)),
    ]
