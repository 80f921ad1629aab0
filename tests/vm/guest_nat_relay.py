"""Issue 16 test 5: two NATed nodes, one in userspace mode and one in kernel mode,
connect through the relay (runs inside the VM, whose kernel has WireGuard).

Both NATs are symmetric (`fully-random`), so no direct path exists: A (our daemon) and
B (kernel WireGuard) each register with the relay on the public node (itself a kernel
node) from their WireGuard port, and their unmodified WireGuard talks through it.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pytest

from control.labcluster import LabCluster, Node, NodeOptions
from control.peerstate import DIRECT_RETRY_INTERVAL
from tests.cluster import running_cluster
from tests.e2e.test_mesh import kubespan_address, statuses, wait_until
from tests.netns import tcp_transfer

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

RELAY_PORT = 51821


@pytest.fixture
def cluster(tmp_path: Path):
    with running_cluster(tmp_path, "ksq", reconcile_interval=5) as c:
        yield c


def relayed(cluster: LabCluster, node: Node, label: str) -> bool:
    status = statuses(cluster, node)[label]
    return status["state"] == "up" and status["path"] == "relayed"


def pings(node: Node, address: str) -> bool:
    out = node.host.run("ping", "-c", "3", "-i", "0.3", "-W", "3", address, check=False)
    return out.returncode == 0 and " 0% packet loss" in out.stdout


def wireguard_endpoints(node: Node) -> str:
    """What the node's WireGuard itself uses (kernel: netlink, via `wg`)."""
    return node.host.run("wg", "show", node.link, "endpoints").stdout


def test_userspace_and_kernel_nodes_behind_symmetric_nats_meet_at_the_relay(
    cluster: LabCluster,
) -> None:
    public_host = cluster.bridge.add_host("public")
    relay = f"{public_host.address4}:{RELAY_PORT}"
    public = cluster.add_node(
        NodeOptions(mode="kernel", harvest_extra_endpoints=True, relays=(relay,), run_relay=True),
        host=public_host,
    )
    a, _ = cluster.add_nat_node(
        "a",
        "symmetric",
        NodeOptions(mode="userspace", harvest_extra_endpoints=True, relays=(relay,)),
    )
    b, _ = cluster.add_nat_node(
        "b", "symmetric", NodeOptions(mode="kernel", harvest_extra_endpoints=True, relays=(relay,))
    )
    cluster.start_agent(public)
    wait_until(lambda: cluster.get(public, "kubespanidentities"), 120, "the public node's agent")
    cluster.start_agent(a)
    cluster.start_agent(b)
    started = time.monotonic()

    wait_until(
        lambda: cluster.get(a, "kubespanidentities") and cluster.get(b, "kubespanidentities"),
        120,
        "A's and B's agents",
    )
    modes = [
        cluster.get(n, "kubespanidentities")[0]["spec"]["wireguardMode"] for n in (public, a, b)
    ]
    assert modes == ["kernel", "userspace", "kernel"], modes

    wait_until(
        lambda: relayed(cluster, a, "node-b") and relayed(cluster, b, "node-a"),
        480,  # each direct candidate is tried first; the VM is emulated (no KVM)
        "A (userspace) and B (kernel) up through the relay",
        interval=2,
    )
    print(f"\nA <-> B relayed after {time.monotonic() - started:.0f}s")
    # The public node answers directly; a node that met it through the relay (its
    # direct endpoint slow to answer in the emulated VM) moves at its next direct retry.
    wait_until(
        lambda: all(statuses(cluster, n)["public"]["path"] == "direct" for n in (a, b)),
        DIRECT_RETRY_INTERVAL + 60,
        "A and B direct with the public node",
        interval=2,
    )
    # Kernel WireGuard on B sends to A through the relay's address, set over netlink.
    # (wait_until: a read may meet one of the 3 s direct probes, every 2 minutes, which
    # points WireGuard at the peer's direct endpoint meanwhile)
    for node in (a, b):
        wait_until(
            partial(lambda n: relay in wireguard_endpoints(n), node),
            30,
            f"{node.host.name}'s WireGuard on the relay",
            interval=0.5,
            report=partial(wireguard_endpoints, node),
        )

    a_address, b_address = kubespan_address(cluster, a), kubespan_address(cluster, b)
    # (wait_until: a ping may meet one of the 3 s direct probes, every 2 minutes)
    wait_until(lambda: pings(a, b_address), 60, "A pinging B", interval=2)
    wait_until(lambda: pings(b, a_address), 60, "B pinging A", interval=2)

    # TCP both ways through the relay, checked end to end.
    for server, client, address in ((a, b, a_address), (b, a, b_address)):
        sent, got, seconds = tcp_transfer(server.host.ns, client.host.ns, address, 4_000_000)
        assert sent == got, f"{client.host.name} -> {server.host.name}: data changed"
        print(
            f"{client.host.name} -> {server.host.name} through the relay: "
            f"{4_000_000 * 8 / seconds / 1e6:.0f} Mbit/s (emulated VM)"
        )
