"""End-to-end: a node's life in the mesh, as Talos handles it.

- a restarted agent keeps its registration: peers never see it deleted and no traffic
  for it leaves the tunnel (counted on the bridge: nothing but WireGuard between hosts);
- `kubespan leave` withdraws it, and the peers drop it;
- a node whose reconcile fails (a real nftables refusal) is still announced;
- SIGHUP applies a new MTU and new endpoint filters in place (same link, same peers);
- with two discovery services the mesh lives on while either one is down.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from control import routing
from control.labcluster import DISCOVERY_ADDRESSES, DISCOVERY_PORT, LabCluster, Node, NodeOptions
from control.netlab import Host
from tests.cluster import running_cluster
from tests.e2e.test_mesh import (
    assert_ping,
    kubespan_address,
    ping,
    start_nodes,
    statuses,
    wait_until,
)

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (network namespaces, TUN, nftables)")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LabCluster]:
    need_root()
    with running_cluster(tmp_path, "ksl", reconcile_interval=3) as c:
        yield c


def node_id(node: Node) -> str:
    return yaml.safe_load((node.state_dir / "node-identity.yaml").read_text())["nodeId"]


def peer_specs(cluster: LabCluster, node: Node) -> dict[str, dict]:
    return {d["spec"]["label"]: d["spec"] for d in cluster.get(node, "kubespanpeerspecs")}


def link_info(node: Node) -> dict:
    return json.loads(node.host.run("ip", "-j", "link", "show", node.link).stdout)[0]


class PlainCounter:
    """Counts IP packets between hosts on the bridge that are not WireGuard.

    Left out: UDP to or from the WireGuard port, neighbour discovery and MLD, and ICMP
    destination-unreachable (a node whose WireGuard is stopped answers the tunnel's
    packets with port-unreachable: about WireGuard packets, not traffic in clear).
    Every other flow is remembered by (source, destination, protocol) for the message.
    """

    TABLE = "ksltest"

    def __init__(self, cluster: LabCluster) -> None:
        self.ns = cluster.bridge.ns
        nd = (
            "destination-unreachable, nd-neighbor-solicit, nd-neighbor-advert, "
            "nd-router-solicit, nd-router-advert, mld-listener-query, mld-listener-report, "
            "mld2-listener-report"
        )
        self.ns.run(
            "nft",
            f"""add table bridge {self.TABLE}
table bridge {self.TABLE} {{
  counter plain {{ }}
  set seen4 {{ type ipv4_addr . ipv4_addr . inet_proto; flags dynamic; size 1024; }}
  set seen6 {{ type ipv6_addr . ipv6_addr . inet_proto; flags dynamic; size 1024; }}
  chain between_hosts {{
    type filter hook forward priority 0; policy accept;
    udp sport 51820 accept
    udp dport 51820 accept
    icmp type destination-unreachable accept
    icmpv6 type {{ {nd} }} accept
    meta protocol ip add @seen4 {{ ip saddr . ip daddr . meta l4proto }}
    meta protocol ip6 add @seen6 {{ ip6 saddr . ip6 daddr . meta l4proto }}
    meta protocol {{ ip, ip6 }} counter name plain
  }}
}}""",
        )

    def packets(self) -> int:
        out = self.ns.run("nft", "-j", "list", "counter", "bridge", self.TABLE, "plain").stdout
        return next(
            item["counter"]["packets"] for item in json.loads(out)["nftables"] if "counter" in item
        )

    def listing(self) -> str:
        return self.ns.run("nft", "list", "table", "bridge", self.TABLE).stdout


class Watch:
    """Every Watch reply of the discovery services, as a client sees them (raw)."""

    def __init__(self, cluster: LabCluster, path: Path) -> None:
        self.path = path
        targets = [
            f"{address}:{DISCOVERY_PORT}"
            for address in DISCOVERY_ADDRESSES[: cluster.discovery_services]
        ]
        argv = [sys.executable, "-m", "tests.e2e.discovery_watch", cluster.cluster_id, *targets]
        self.proc = cluster.bridge.ns.popen(argv, log=path)

    def lines(self) -> list[dict]:
        text = self.path.read_text() if self.path.exists() else ""
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def wait_snapshot(self, *ids: str) -> None:
        def ready() -> bool:
            snaps = [line for line in self.lines() if line["snapshot"]]
            return bool(snaps) and all(set(ids) <= set(s["ids"]) for s in snaps)

        wait_until(ready, 30, "the watch's first snapshot", interval=0.2)

    def deletions(self) -> list[dict]:
        return [line for line in self.lines() if line["deleted"]]


class Pinger:
    """A ping running in the background; `stop()` gives (sent, received)."""

    def __init__(self, host: Host, target: str) -> None:
        self.proc = subprocess.Popen(
            host.ns.argv(["ping", "-i", "0.2", "-W", "1", target]),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self) -> tuple[int, int]:
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=10)
        match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert match, out
        return int(match.group(1)), int(match.group(2))


def kubespan_cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return node.host.run(sys.executable, "-m", "control.cli", *args, check=False)


# -- restart and leave -----------------------------------------------------------------------


def test_restart_keeps_the_node_registered_and_its_traffic_in_the_tunnel(
    cluster: LabCluster,
) -> None:
    a, b, c = start_nodes(cluster, 3)
    cluster.wait_full_mesh(timeout=120)
    watch = Watch(cluster, cluster.workdir / "watch.jsonl")
    watch.wait_snapshot(node_id(a), node_id(b), node_id(c))
    counter = PlainCounter(cluster)
    pingers = [
        Pinger(a.host, str(b.host.address4)),
        Pinger(a.host, str(b.host.address6)),
        Pinger(c.host, str(b.host.address4)),
    ]
    try:
        # Traffic flows through the tunnel before the restart ...
        wait_until(
            lambda: ping(a.host, str(b.host.address4), 1),
            30,
            "a reaching b",
            report=cluster.wireguard_report,
        )
        cluster.stop_agent(b)
        assert b.link not in b.host.run("ip", "-o", "link", "show").stdout, "b's link is gone"
        # ... b is stopped: its peers keep it (routed into the tunnel, nothing in clear) ...
        for node in (a, c):
            assert b.host.name in peer_specs(cluster, node)
        assert not ping(a.host, str(b.host.address4), 2)
        cluster.start_agent(b)
        # ... and it flows again once b is back.
        for node in (a, c):
            wait_until(
                lambda node=node: (
                    statuses(cluster, node)[b.host.name]["state"] == "up"
                    and ping(node.host, str(b.host.address4), 1)
                ),
                90,
                f"{node.host.name} reaching b again",
            )
        assert ping(a.host, kubespan_address(cluster, b))
    finally:
        results = [p.stop() for p in pingers]
    assert all(received > 0 for _, received in results), results
    assert watch.deletions() == [], "peers were told b was deleted"
    assert counter.packets() == 0, f"traffic in clear on the underlay:\n{counter.listing()}"
    for node in (a, c):
        assert b.host.name in peer_specs(cluster, node)


def test_leave_withdraws_the_node_and_its_peers_drop_it(cluster: LabCluster) -> None:
    a, b = start_nodes(cluster, 2)
    cluster.wait_full_mesh(timeout=90)
    config = str(b.config_path)

    refused = kubespan_cli(b, "leave", "-c", config)
    assert refused.returncode == 1, refused
    assert "is running" in refused.stderr and "stop it first" in refused.stderr

    cluster.stop_agent(b)
    assert b.host.name in peer_specs(cluster, a), "a stop alone keeps the registration"

    left = kubespan_cli(b, "leave", "-c", config)
    assert left.returncode == 0, left
    assert f"node {node_id(b)} removed from discovery service" in left.stdout
    wait_until(lambda: b.host.name not in peer_specs(cluster, a), 30, "a dropping b")
    assert "peer:" not in a.host.run("wg", "show", a.link).stdout

    # Without a node identity there is nothing to remove, and it says so.
    (b.state_dir / "node-identity.yaml").unlink()
    nothing = kubespan_cli(b, "leave", "-c", config)
    assert nothing.returncode == 1 and "no node identity" in nothing.stderr


# -- announcing does not depend on the reconcile ---------------------------------------------


def test_node_is_announced_and_refreshed_while_its_reconcile_fails(cluster: LabCluster) -> None:
    (a,) = start_nodes(cluster, 1)
    b = cluster.add_node(NodeOptions())
    # A table of our name that another process owns: every `nft` of b's agent on it is
    # refused (EPERM) for as long as that process lives.
    blocker = subprocess.Popen(
        b.host.ns.argv(["nft", "-i"]),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert blocker.stdin is not None
        blocker.stdin.write(f"add table inet {routing.NFT_TABLE} {{ flags owner; }}\n")
        blocker.stdin.flush()
        wait_until(
            lambda: routing.NFT_TABLE in b.host.run("nft", "list", "tables").stdout,
            10,
            "the owned table",
            interval=0.1,
        )
        cluster.start_agent(b)
        wait_until(lambda: "reconcile failed" in cluster.agent_log(b), 60, "b's reconcile fail")
        assert "Operation not permitted" in cluster.agent_log(b)
        # Announced all the same ...
        wait_until(lambda: b.host.name in peer_specs(cluster, a), 60, "a learning b")
        # ... and refreshed: a new address of b reaches a as an endpoint.
        b.host.run("ip", "addr", "add", "198.51.100.77/32", "dev", "eth0")
        wait_until(
            lambda: "198.51.100.77:51820" in peer_specs(cluster, a)[b.host.name]["endpoints"],
            60,
            "a learning b's new endpoint",
        )
        assert cluster.peers_up(a) == 0, "b configures no peer while its routing fails"
    finally:
        if blocker.stdin is not None:
            blocker.stdin.close()  # nft exits, its table goes
        blocker.wait(timeout=10)
    cluster.wait_full_mesh(timeout=90)
    assert ping(a.host, kubespan_address(cluster, b))


# -- SIGHUP: in place ---------------------------------------------------------------------------


def test_sighup_applies_mtu_and_filters_in_place(cluster: LabCluster) -> None:
    a = cluster.add_node()
    b = cluster.add_node(NodeOptions(endpoint_filters=("0.0.0.0/0",)))  # IPv4 endpoints only
    for node in (a, b):
        cluster.start_agent(node)
    cluster.wait_full_mesh(timeout=90)
    before = link_info(b)
    assert before["mtu"] == 1420
    assert peer_specs(cluster, a)[b.host.name]["endpoints"] == [f"{b.host.address4}:51820"]
    key = cluster.get(b, "kubespanidentities")[0]["spec"]["publicKey"]

    def reload(**options) -> None:
        for name, value in options.items():
            setattr(b.options, name, value)
        cluster.write_config(b)
        assert b.agent is not None
        os.kill(b.agent.pid, signal.SIGHUP)  # `ip netns exec` execs: this is the agent

    # (Endpoints a node no longer announces stay on the service until they expire, so
    # the filters are widened: what is new shows at once.)
    reload(mtu=1380, endpoint_filters=None)
    wait_until(lambda: link_info(b)["mtu"] == 1380, 30, "the new MTU on b's link")
    wait_until(
        lambda: any("mtu 1380" in r for r in routing.snapshot(netns=b.host.netns).routes),
        30,
        "the new MTU on b's routes",
    )
    wait_until(
        lambda: f"[{b.host.address6}]:51820" in peer_specs(cluster, a)[b.host.name]["endpoints"],
        30,
        "b's IPv6 endpoint on a",
    )
    after = link_info(b)
    assert after["ifindex"] == before["ifindex"], "the link was recreated"
    assert cluster.peers_up(b) == 1 and cluster.peers_up(a) == 1
    assert "torn down" not in cluster.agent_log(b)
    assert cluster.get(b, "kubespanidentities")[0]["spec"]["publicKey"] == key
    # The MTU holds end to end: 1380 - 28 fits unfragmented, one byte more does not.
    assert b.host.run("ping", "-c1", "-W2", "-M", "do", "-s", "1352", str(a.host.address4)).stdout
    too_big = b.host.run(
        "ping", "-c1", "-W2", "-M", "do", "-s", "1353", str(a.host.address4), check=False
    )
    assert too_big.returncode != 0 and "1380" in too_big.stdout + too_big.stderr
    nft = b.host.run("nft", "list", "table", "inet", routing.NFT_TABLE).stdout
    assert "maxseg size set 1328" in nft  # MSS clamp follows: 1380 - 52

    reload(mtu=0)  # Talos: 0 means the default
    wait_until(lambda: link_info(b)["mtu"] == 1420, 30, "the default MTU back")
    assert link_info(b)["ifindex"] == before["ifindex"]
    assert cluster.peers_up(b) == 1
    assert "torn down" not in cluster.agent_log(b)


# -- two discovery services -----------------------------------------------------------------------


def test_mesh_lives_on_while_either_of_two_discovery_services_is_down(tmp_path: Path) -> None:
    need_root()
    with running_cluster(tmp_path, "ksl", reconcile_interval=3, discovery_services=2) as cluster:
        a, b = start_nodes(cluster, 2)
        cluster.wait_full_mesh(timeout=90)
        for down in (0, 1):
            cluster.stop_discovery(down)
            # A node that joins now only reaches the other service, and still finds
            # everyone; nobody loses a peer.
            (late,) = start_nodes(cluster, 1)
            cluster.wait_full_mesh(timeout=150)
            nodes = [n for n in cluster.nodes if n.agent is not None]
            for node in nodes:
                assert cluster.peers_up(node) == len(nodes) - 1
            for node in nodes:
                if node is not a:
                    assert_ping(cluster, a.host, kubespan_address(cluster, node), 2)
            assert_ping(cluster, late.host, str(a.host.address4), 2)
            cluster.start_discovery(down)
        assert len(cluster.nodes) == 4
