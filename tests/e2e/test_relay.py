"""End-to-end: agents reach each other through a relay when their direct path is blocked.

node1 is the public node: a KubeSpan node that also runs the relay (runRelay). Every
node lists node1's relay. nftables on node2 and node3 drop the WireGuard traffic between
them (both directions, v4 and v6), so only node1 can carry it: node2 <-> node3 goes
through the relay, the rest direct. When the block is lifted, the background direct
probes move the pair onto the direct path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from control.labcluster import LabCluster, Node, NodeOptions
from tests.cluster import running_cluster
from tests.e2e.test_mesh import kubespan_address, statuses, wait_until

pytestmark = pytest.mark.netns

RELAY = "192.0.2.1:51821"  # node1 is the first host on the bridge
BLOCK_TABLE = "ksrelaytest"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LabCluster]:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, TUN, nftables)")
    with running_cluster(tmp_path, "ksr", reconcile_interval=3) as c:
        yield c


def block_wireguard_between(a: Node, b: Node) -> None:
    """On `a`: drop WireGuard datagrams to and from `b`'s underlay addresses."""
    v4, v6 = b.host.address4, b.host.address6
    a.host.run(
        "nft",
        f"add table inet {BLOCK_TABLE}; "
        f"add chain inet {BLOCK_TABLE} out {{ type filter hook output priority 0; }}; "
        f"add chain inet {BLOCK_TABLE} in {{ type filter hook input priority 0; }}; "
        f"add rule inet {BLOCK_TABLE} out ip daddr {v4} udp dport 51820 drop; "
        f"add rule inet {BLOCK_TABLE} out ip6 daddr {v6} udp dport 51820 drop; "
        f"add rule inet {BLOCK_TABLE} in ip saddr {v4} udp sport 51820 drop; "
        f"add rule inet {BLOCK_TABLE} in ip6 saddr {v6} udp sport 51820 drop",
    )


def test_blocked_pair_goes_through_the_relay_then_direct(cluster: LabCluster) -> None:
    public = cluster.add_node(NodeOptions(relays=(RELAY,), run_relay=True))
    a, b = (cluster.add_node(NodeOptions(relays=(RELAY,))) for _ in range(2))
    block_wireguard_between(a, b)
    block_wireguard_between(b, a)
    for node in (public, a, b):
        cluster.start_agent(node, "--direct-retry-interval", "10")
    cluster.wait_full_mesh(timeout=150)

    def path(node: Node, peer: Node) -> str:
        status = statuses(cluster, node)[peer.host.name]
        return str(status["path"]) if status["state"] == "up" else ""

    assert path(a, b) == path(b, a) == "relayed"
    wait_until(  # (not while one of the probes every 10 s is on)
        lambda: statuses(cluster, a)[b.host.name]["endpoint"] == RELAY,
        timeout=30,
        what="the relay as node2's endpoint for node3",
    )
    wait_until(  # (on a loaded machine one may have met the public node via the relay first)
        lambda: path(a, public) == path(public, b) == "direct",
        timeout=60,
        what="node2 and node3 direct with the public node",
    )
    table = cluster.get_table(a, "kubespanpeerstatuses")
    assert "PATH" in table.splitlines()[0] and "relayed" in table
    b_address = kubespan_address(cluster, b)
    a.host.run("ping", "-c", "3", "-i", "0.2", "-W", "2", b_address)
    # Probes of the blocked direct path fail and the pair stays relayed (and up).
    out = a.host.run("ping", "-c", "60", "-i", "0.5", "-W", "2", b_address).stdout
    print("while probing every 10 s:", out.splitlines()[-2])
    assert path(a, b) == path(b, a) == "relayed"

    for node in (a, b):
        node.host.run("nft", f"delete table inet {BLOCK_TABLE}")
    wait_until(
        lambda: path(a, b) == "direct" and path(b, a) == "direct",
        timeout=90,
        what="the pair to move onto its direct path",
    )
    a.host.run("ping", "-c", "3", "-i", "0.2", "-W", "2", b_address)
