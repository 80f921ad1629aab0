"""End-to-end: nodes behind NAT routers (control.netlab.natlab), with hole punching.

The lab: discovery and a public node on the public segment; node-a behind router
nat-a, node-b behind nat-b. Agents run with the agent's default 30 s reconcile
interval, so a prompt connection is the punching's doing, not a fast test loop's.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path

import pytest

from control.agent import PERSISTENT_KEEPALIVE
from control.labcluster import LabCluster, Node, NodeOptions
from control.netlab.natlab import NatSite, PacketCounter
from control.peerstate import DIRECT_RETRY_INTERVAL, ENDPOINT_CONNECTION_TIMEOUT
from control.punch import PUNCH_WINDOW
from tests.cluster import running_cluster
from tests.e2e.test_mesh import assert_ping, kubespan_address, statuses, wait_until

pytestmark = pytest.mark.netns
NEVER = "0001-01-01T00:00:00Z"

OPTIONS = NodeOptions(harvest_extra_endpoints=True)
TIME_TO_DIRECT = 30.0


@pytest.fixture
def cluster(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, TUN, nftables)")
    with running_cluster(tmp_path, "ksn", reconcile_interval=30) as c:
        yield c


def build(cluster: LabCluster, mode: str) -> tuple[Node, Node, Node, NatSite, NatSite]:
    """Public node up first, then A and B started together (as a pair would join)."""
    public = cluster.add_node(OPTIONS, host=cluster.bridge.add_host("public"))
    a, site_a = cluster.add_nat_node("a", mode, OPTIONS)
    b, site_b = cluster.add_nat_node("b", mode, OPTIONS)
    cluster.start_agent(public)
    wait_until(lambda: cluster.get(public, "kubespanidentities"), 60, "the public node's agent")
    cluster.start_agent(a)
    cluster.start_agent(b)
    return public, a, b, site_a, site_b


def peer(cluster: LabCluster, node: Node, label: str) -> dict:
    return statuses(cluster, node)[label]


def up_at(cluster: LabCluster, node: Node, label: str, endpoint: str) -> bool:
    status = peer(cluster, node, label)
    return status["state"] == "up" and status["endpoint"] == endpoint


def since(timestamp: str) -> float:
    return time.time() - datetime.fromisoformat(timestamp).timestamp()


def ping(node: Node, address: str) -> None:
    out = node.host.run("ping", "-c", "3", "-i", "0.2", "-W", "2", address, check=False)
    assert out.returncode == 0, f"ping {address} from {node.host.name}: {out.stdout}{out.stderr}"


def test_port_preserving_nats_connect_directly(cluster: LabCluster) -> None:
    public, a, b, site_a, site_b = build(cluster, "port-preserving")
    counter = PacketCounter(public.host.ns, [site_a.public_address, site_b.public_address])
    for site in (site_a, site_b):  # keepalives hold the mapping open once up
        assert min(site.udp_timeouts()) > PERSISTENT_KEEPALIVE
    wait_until(
        lambda: cluster.get(a, "kubespanidentities") and cluster.get(b, "kubespanidentities"),
        60,
        "both agents up",
        interval=0.2,
    )
    both_up, both_up_wall = time.monotonic(), time.time()

    wait_until(
        lambda: (
            up_at(cluster, a, "node-b", f"{site_b.public_address}:51820")
            and up_at(cluster, b, "node-a", f"{site_a.public_address}:51820")
        ),
        TIME_TO_DIRECT + 30,  # a miss is reported with its time below, not as a timeout
        "A and B up through each other's NAT",
        interval=0.2,
    )
    elapsed = time.monotonic() - both_up
    handshake = datetime.fromisoformat(peer(cluster, a, "node-b")["lastHandshakeTime"])
    print(
        f"\nA <-> B: first handshake {handshake.timestamp() - both_up_wall:.1f} s, "
        f"reported up and direct {elapsed:.1f} s after both agents were up"
    )
    assert elapsed < TIME_TO_DIRECT, (
        f"A <-> B took {elapsed:.1f}s\n--- a\n{cluster.agent_log(a)[-3000:]}"
        f"\n--- b\n{cluster.agent_log(b)[-3000:]}"
    )

    ping(a, kubespan_address(cluster, b))
    ping(b, str(b.host.address4))  # sanity: own address
    ping(a, str(b.host.address4))  # B's private address, routed through the tunnel
    assert counter.packets() == 0, "A <-> B packets crossed the public node"
    # Both still reach the public node at once: a punch turn that a handshake beat
    # must not leave WireGuard on an endpoint that goes nowhere (a miss prints what
    # every WireGuard had).
    for node in (a, b):
        assert peer(cluster, node, "public")["state"] == "up"
        assert_ping(cluster, node.host, kubespan_address(cluster, public))


def test_symmetric_nats_break_nothing(cluster: LabCluster) -> None:
    public, a, b, site_a, site_b = build(cluster, "symmetric")
    counter = PacketCounter(public.host.ns, [site_a.public_address, site_b.public_address])
    wait_until(
        lambda: (
            all(peer(cluster, n, "public")["state"] == "up" for n in (a, b))
            and {peer(cluster, public, n)["state"] for n in ("node-a", "node-b")} == {"up"}
        ),
        90,
        "A and B up with the public node",
    )
    # The two punched at each other, also at the mappings the public node harvested
    # (another port per destination: no use to anyone else), and WireGuard tried each
    # for the full connection timeout: through two symmetric NATs nothing got through.
    harvested_b = re.compile(rf"punching towards node-b at .*{site_b.public_address}:(?!51820)")
    wait_until(
        lambda: (
            harvested_b.search(cluster.agent_log(a))
            and "punching towards node-a" in cluster.agent_log(b)
        ),
        90,
        "A punching at B's harvested mapping",
    )
    wait_until(
        lambda: (
            since(peer(cluster, a, "node-b")["lastEndpointChange"])
            > ENDPOINT_CONNECTION_TIMEOUT + PUNCH_WINDOW
        ),
        120,
        "A's last endpoint for B tried out",
    )
    for node, label in ((a, "node-b"), (b, "node-a")):
        status = peer(cluster, node, label)
        assert status["state"] != "up" and status["lastHandshakeTime"] == NEVER, status
    for node in (a, b):
        assert peer(cluster, node, "public")["state"] == "up"
        ping(node, kubespan_address(cluster, public))
    ping(public, kubespan_address(cluster, a))
    assert counter.packets() == 0  # nothing relays A <-> B (yet)


def pings(node: Node, address: str) -> bool:
    out = node.host.run("ping", "-c", "3", "-i", "0.2", "-W", "2", address, check=False)
    return out.returncode == 0 and " 0% packet loss" in out.stdout


def test_symmetric_nats_connect_through_the_relay(cluster: LabCluster) -> None:
    """Issue 16 test 2: the public node runs the relay, every node lists it; A and B
    (both behind symmetric NATs) connect through it, ping and iperf3 work."""
    public_host = cluster.bridge.add_host("public")
    relay = f"{public_host.address4}:51821"
    options = NodeOptions(harvest_extra_endpoints=True, relays=(relay,))
    public = cluster.add_node(
        NodeOptions(harvest_extra_endpoints=True, relays=(relay,), run_relay=True),
        host=public_host,
    )
    a, _ = cluster.add_nat_node("a", "symmetric", options)
    b, _ = cluster.add_nat_node("b", "symmetric", options)
    cluster.start_agent(public)
    wait_until(lambda: cluster.get(public, "kubespanidentities"), 60, "the public node's agent")
    cluster.start_agent(a)
    cluster.start_agent(b)

    def relayed(node: Node, label: str) -> bool:
        status = peer(cluster, node, label)
        return status["state"] == "up" and status["path"] == "relayed"

    wait_until(
        lambda: relayed(a, "node-b") and relayed(b, "node-a"),
        240,  # each direct candidate gets its 15 s first, at a 30 s reconcile interval
        "A and B up through the relay",
    )
    # The public node answers directly; a node that met it through the relay (its
    # direct endpoint slow to answer on a loaded machine) moves at its next direct retry.
    wait_until(
        lambda: all(peer(cluster, n, "public")["path"] == "direct" for n in (a, b)),
        DIRECT_RETRY_INTERVAL + 60,
        "A and B direct with the public node",
    )
    b_address = kubespan_address(cluster, b)
    # (wait_until: a ping may meet one of the 3 s direct probes, every 2 minutes)
    wait_until(lambda: pings(a, b_address), 30, "A pinging B")
    wait_until(lambda: pings(b, kubespan_address(cluster, a)), 30, "B pinging A")

    server = b.host.spawn("iperf3", "-s", "-1", "-B", b_address, "-p", "5299")
    try:
        wait_until(
            lambda: b.host.run("ss", "-Htln", "sport = :5299").stdout.strip(),
            10,
            "iperf3 server",
            interval=0.1,
        )
        out = a.host.run("iperf3", "-c", b_address, "-p", "5299", "-t", "5", "-J", timeout=60)
    finally:
        server.wait(timeout=30)
    received = json.loads(out.stdout)["end"]["sum_received"]
    print(f"\nA -> B through the relay: {received['bits_per_second'] / 1e6:.0f} Mbit/s (iperf3)")
    assert received["bytes"] > 0
