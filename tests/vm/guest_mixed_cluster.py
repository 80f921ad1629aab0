"""A mixed KubeSpan cluster on a kernel with WireGuard (runs inside the VM).

Kernel-mode nodes (one forced, one picked by `auto`) and a userspace node in one
mesh: every pair must come up and carry traffic both ways, which is also the interop
proof between our dataplane and the kernel's. The routing layer is the same code in
both modes; here that is compared on the live nodes, not assumed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from control import routing
from control.labcluster import LabCluster, Node, NodeOptions
from control.netlab import Host
from tests.cluster import running_cluster

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path, "ksv", reconcile_interval=3) as c:
        yield c


def ping(host: Host, target: str) -> bool:
    return host.run("ping", "-c", "2", "-i", "0.3", "-W", "3", target, check=False).returncode == 0


def kubespan_address(cluster: LabCluster, node: Node) -> str:
    return cluster.get(node, "kubespanidentities")[0]["spec"]["address"].split("/")[0]


def routing_view(node: Node) -> str:
    """The node's nftables table, policy rules and table-180 routes, with what
    legitimately differs between nodes (link name, peer prefixes) blanked out."""
    host = node.host
    parts = [
        host.run("nft", "list", "table", "inet", routing.NFT_TABLE).stdout,
        host.run("ip", "-4", "rule", "show", "pref", str(routing.RULE_PRIORITY)).stdout,
        host.run("ip", "-6", "rule", "show", "pref", str(routing.RULE_PRIORITY)).stdout,
        host.run("ip", "-4", "route", "show", "table", str(routing.ROUTE_TABLE)).stdout,
        host.run("ip", "-6", "route", "show", "table", str(routing.ROUTE_TABLE)).stdout,
    ]
    text = "\n".join(parts).replace(node.link, "LINK")
    text = re.sub(r"elements = \{[^}]*\}", "elements = {...}", text)
    return re.sub(r"[ \t]+", " ", text).strip()


def test_mixed_cluster_kernel_and_userspace(cluster: LabCluster) -> None:
    modes = ["kernel", "auto", "userspace"]
    nodes = [cluster.add_node(NodeOptions(mode=m)) for m in modes]
    for node in nodes:
        cluster.start_agent(node)
    started = time.monotonic()
    cluster.wait_full_mesh(timeout=480)
    print(f"mixed mesh of {len(nodes)} up after {time.monotonic() - started:.0f}s")

    picked = [cluster.get(n, "kubespanidentities")[0]["spec"]["wireguardMode"] for n in nodes]
    assert picked == ["kernel", "kernel", "userspace"]
    for node, mode in zip(nodes, picked, strict=True):
        details = node.host.run("ip", "-d", "link", "show", node.link).stdout
        assert ("wireguard" in details) == (mode == "kernel"), details
        assert ("tun" in details) == (mode == "userspace"), details

    # Every ordered pair, over the KubeSpan ULA and the node's underlay v4 address
    # (the latter steered into the tunnel by the routing layer).
    addresses = {n.host.name: (kubespan_address(cluster, n), str(n.host.address4)) for n in nodes}
    failures = [
        f"{a.host.name} -> {b.host.name} {target}"
        for a in nodes
        for b in nodes
        if a is not b
        for target in addresses[b.host.name]
        if not ping(a.host, target)
    ]
    assert not failures, f"no traffic: {failures}"

    # Counters moved on every node for every peer.
    for node in nodes:
        st = {d["spec"]["label"]: d["spec"] for d in cluster.get(node, "kubespanpeerstatuses")}
        assert len(st) == 2 and all(s["state"] == "up" for s in st.values()), st

    views = {n.host.name: routing_view(n) for n in nodes}
    kernel_view, userspace_view = views[nodes[0].host.name], views[nodes[2].host.name]
    assert "elements = {...}" in kernel_view and "fwmark 0x40/0x60" in kernel_view, kernel_view
    assert kernel_view == userspace_view, f"kernel:\n{kernel_view}\n\nuserspace:\n{userspace_view}"
    assert views[nodes[1].host.name] == kernel_view
