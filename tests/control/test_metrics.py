"""The agent's metric families and the shared prometheus_client HTTP server (no root)."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable
from ipaddress import IPv6Address

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from control.backends.base import PeerState
from control.metrics import ReconcileStats, agent_families
from control.peerspec import PeerSpec
from control.peersync import PeerTracker
from control.promhttp import MetricsServer
from tests.promtext import key, samples, types

NOW = 1_700_000_000.0
KEY = "a" * 43 + "="


def tracker_with_one_peer_up() -> PeerTracker:
    tracker = PeerTracker()
    spec = PeerSpec(KEY, IPv6Address("fd00::2"), (), (("192.0.2.2", 51820),), "node2")
    tracker.observe(spec, None, NOW - 100)  # first endpoint chosen: one change
    wg = PeerState(b"\x00" * 32, ("192.0.2.2", 51820), NOW - 10, 1000, 2000)
    tracker.observe(spec, wg, NOW)
    return tracker


def exposition(families: list[Metric]) -> str:
    server = MetricsServer(lambda: families)

    async def scrape() -> str:
        await server.start("127.0.0.1", 0)
        try:
            return generate_latest(server.registry).decode()
        finally:
            await server.stop()

    return asyncio.run(scrape())


def test_agent_metric_names_types_and_values() -> None:
    stats = ReconcileStats()
    stats.record(0.25)
    stats.record(0.5)
    text = exposition(agent_families(tracker_with_one_peer_up(), stats, NOW))
    assert types(text) == {
        "kubespan_peer_up": "gauge",
        "kubespan_peer_state": "gauge",
        "kubespan_peer_receive_bytes": "gauge",
        "kubespan_peer_transmit_bytes": "gauge",
        "kubespan_peer_seconds_since_handshake": "gauge",
        "kubespan_peer_endpoint_changes_total": "counter",
        "kubespan_reconcile_duration_seconds": "gauge",
        "kubespan_reconcile_total": "counter",
        "kubespan_peers": "gauge",
    }
    peer = {"label": "node2", "peer": KEY}
    assert samples(text) == {
        key("kubespan_peer_up", **peer): 1,
        key("kubespan_peer_state", **peer, state="up"): 1,
        key("kubespan_peer_receive_bytes", **peer): 1000,
        key("kubespan_peer_transmit_bytes", **peer): 2000,
        key("kubespan_peer_seconds_since_handshake", **peer): 10,
        key("kubespan_peer_endpoint_changes_total", **peer): 1,
        key("kubespan_reconcile_duration_seconds"): 0.5,
        key("kubespan_reconcile_total"): 2,
        key("kubespan_peers"): 1,
    }


def test_peer_never_handshaken_reports_minus_one() -> None:
    tracker = PeerTracker()
    spec = PeerSpec(KEY, IPv6Address("fd00::2"), (), (), "node2")
    tracker.observe(spec, None, NOW)
    got = samples(exposition(agent_families(tracker, ReconcileStats(), NOW)))
    peer = {"label": "node2", "peer": KEY}
    assert got[key("kubespan_peer_seconds_since_handshake", **peer)] == -1
    assert got[key("kubespan_peer_up", **peer)] == 0


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_two_servers_in_one_process_serve_their_own_values_on_metrics_only(host: str) -> None:
    counts = {"one": 1, "two": 2}

    async def main() -> None:
        def families(name: str) -> Callable[[], list[GaugeMetricFamily]]:
            return lambda: [GaugeMetricFamily("x", "x", value=counts[name])]

        servers = {name: MetricsServer(families(name)) for name in counts}
        ports = {name: await s.start(host, 0) for name, s in servers.items()}
        base = {
            name: f"http://[{host}]:{p}" if ":" in host else f"http://{host}:{p}"
            for name, p in ports.items()
        }
        try:
            for name, url in base.items():
                counts[name] += 10  # read at scrape time, on the loop
                status, text = await asyncio.to_thread(get, url + "/metrics")
                assert status == 200
                assert samples(text) == {key("x"): counts[name]}
                assert (await asyncio.to_thread(get, url + "/other"))[0] == 404
        finally:
            for s in servers.values():
                await s.stop()

    asyncio.run(main())
