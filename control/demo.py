"""`kubespan demo`: a local KubeSpan mesh in network namespaces, shown working.

Topology "bridge" (the default): N nodes as namespaces on a bridge (underlay
192.0.2.0/24 and 2001:db8::/64, documentation ranges that are routed nowhere).
Topology "nat": a public node on that bridge, and node-a and node-b each behind a NAT
router of its own (nftables masquerade; --nat picks port-preserving or symmetric), with
no way to each other but through both NATs; they find each other's mapped endpoints via
discovery and punch through at the same time.

Starts our discovery service and one agent per node, waits for the mesh, prints the peer
table from the first node, then proves that traffic between two nodes goes through the
tunnel. Everything is removed on exit or Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from control.labcluster import LabCluster, Node, NodeOptions
from control.netlab import Lab, missing_facilities
from control.netlab.natlab import NAT_MODES, NatSite, PacketCounter

REQUIRED_TOOLS = ("ip", "nft", "iperf3", "ping", "nc")


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kubespan demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--topology",
        choices=("bridge", "nat"),
        default="bridge",
        help="bridge: N nodes on one segment (default); nat: a public node plus two nodes "
        "behind NAT routers",
    )
    parser.add_argument(
        "--nat",
        choices=tuple(NAT_MODES),
        default="port-preserving",
        help="with --topology nat: how both routers map ports (port-preserving: plain "
        "masquerade, hole punching connects the two; symmetric: masquerade fully-random, "
        "they cannot connect directly; default port-preserving)",
    )
    parser.add_argument(
        "-n", "--nodes", type=int, default=3, help="number of nodes (default 3; bridge only)"
    )
    parser.add_argument(
        "--mode",
        choices=("auto", "kernel", "userspace"),
        default="auto",
        help="WireGuard mode of every node (default auto: kernel if the module is there)",
    )
    parser.add_argument(
        "--timeout", type=float, default=120, help="seconds to wait for the full mesh"
    )
    parser.add_argument(
        "--iperf-seconds", type=int, default=3, help="length of the throughput check"
    )
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("a mesh needs at least 2 nodes")
    problems = missing_facilities(REQUIRED_TOOLS)
    if problems:
        # root for the namespaces; ./run demo installs the tools
        print(f"kubespan demo: cannot run here: {'; '.join(problems)}", file=sys.stderr)
        return 1

    workdir = Path(tempfile.mkdtemp(prefix="kubespan-demo-"))
    try:
        with Lab("ksd") as lab:
            cluster = LabCluster.create(lab, workdir, reconcile_interval=5)
            try:
                return run_demo(cluster, args)
            except KeyboardInterrupt:
                print("\ninterrupted: cleaning up", flush=True)
                return 130
            except (RuntimeError, TimeoutError) as exc:
                print(f"kubespan demo: {exc}", file=sys.stderr)
                return 1
            finally:
                step("stopping agents and the discovery service")
                cluster.close()
    finally:
        step("removed every namespace, link and process of the demo")
        shutil.rmtree(workdir, ignore_errors=True)


def run_demo(cluster: LabCluster, args: argparse.Namespace) -> int:
    if args.topology == "nat":
        return run_nat_demo(cluster, args)
    step(f"building {args.nodes} nodes as network namespaces on a bridge")
    nodes = [cluster.add_node(NodeOptions(mode=args.mode)) for _ in range(args.nodes)]
    for node in nodes:
        print(
            f"    {node.host.name}: netns {node.host.netns}, underlay {node.host.address4} "
            f"and {node.host.address6}, link {node.link}"
        )
    start_cluster(cluster, nodes)
    started = time.monotonic()

    def progress(up: int, want: int) -> None:
        print(f"    {time.monotonic() - started:5.1f}s  peer links up: {up}/{want}", flush=True)

    step("waiting for the full mesh")
    cluster.wait_full_mesh(args.timeout, progress)
    return show_traffic(cluster, nodes[0], nodes[1], args)


def start_cluster(cluster: LabCluster, nodes: list[Node]) -> None:
    step("starting the discovery service (192.0.2.250:3000, in the bridge namespace)")
    cluster.start_discovery()
    step("starting one KubeSpan agent per node")
    for node in nodes:
        cluster.start_agent(node)


def run_nat_demo(cluster: LabCluster, args: argparse.Namespace) -> int:
    step(f"building a public node and two nodes behind {args.nat} NAT routers")
    options = NodeOptions(mode=args.mode, harvest_extra_endpoints=True)
    public = cluster.add_node(options, host=cluster.bridge.add_host("public"))
    a, site_a = cluster.add_nat_node("a", args.nat, options)
    b, site_b = cluster.add_nat_node("b", args.nat, options)
    print(f"    public: {public.host.address4} on the public segment 192.0.2.0/24")
    for node, site in ((a, site_a), (b, site_b)):
        print(
            f"    {node.host.name}: {node.host.address4} behind {site.router.name} "
            f"(public address {site.public_address}, {NAT_MODES[site.mode]})"
        )
    counter = PacketCounter(public.host.ns, [site_a.public_address, site_b.public_address])
    start_cluster(cluster, [public, a, b])
    started = time.monotonic()

    def progress(up: int, want: int) -> None:
        print(f"    {time.monotonic() - started:5.1f}s  peer links up: {up}/{want}", flush=True)

    step("waiting for node-a and node-b to reach the public node")
    cluster.wait_full_mesh(args.timeout, progress, nodes=[public, a])
    cluster.wait_full_mesh(args.timeout, progress, nodes=[public, b])
    if args.nat == "symmetric":
        return show_symmetric(cluster, a, b, args)
    step("waiting for node-a <-> node-b, punched through both NATs")
    cluster.wait_full_mesh(args.timeout, progress, nodes=[a, b])
    print(f"    direct after {time.monotonic() - started:.1f}s")
    code = show_traffic(cluster, a, b, args)
    endpoint = direct_endpoint(cluster, a, b, site_b)
    crossed = counter.packets()
    print(f"    node-a reaches node-b at {endpoint}: node-b's NAT, not the public node")
    print(f"    packets between the two NAT addresses through the public node: {crossed}")
    return code if crossed == 0 else 1


def direct_endpoint(cluster: LabCluster, a: Node, b: Node, site_b: NatSite) -> str:
    for doc in cluster.get(a, "kubespanpeerstatuses"):
        if doc["spec"]["label"] == b.host.name:
            endpoint = str(doc["spec"]["endpoint"])
            if endpoint.startswith(f"{site_b.public_address}:"):
                return endpoint
            raise RuntimeError(f"node-a reaches node-b at {endpoint}, not through its NAT")
    raise RuntimeError("node-a does not know node-b")


def show_symmetric(cluster: LabCluster, a: Node, b: Node, args: argparse.Namespace) -> int:
    step("symmetric NATs: node-a and node-b punch at each other, but each NAT maps every")
    print(
        "    destination to another port, so no direct path opens; they stay connected\n"
        "    to the public node (a relay through it is what connects them)"
    )
    step(f"peer statuses seen from {a.host.name} (kubespan get kubespanpeerstatuses)")
    print(cluster.get_table(a, "kubespanpeerstatuses"))
    return 0


def show_traffic(cluster: LabCluster, first: Node, second: Node, args: argparse.Namespace) -> int:
    step(f"peer statuses seen from {first.host.name} (kubespan get kubespanpeerstatuses)")
    print(cluster.get_table(first, "kubespanpeerstatuses"))
    identity = cluster.get(second, "kubespanidentities")[0]["spec"]
    print(f"    {second.host.name} runs WireGuard in {identity.get('wireguardMode', '?')} mode")

    step(f"ping {second.host.name} from {first.host.name}: ordinary address and KubeSpan address")
    for target in (str(second.host.address4), identity["address"].split("/")[0]):
        out = first.host.run("ping", "-c", "3", "-i", "0.2", "-W", "2", target, check=False)
        summary = [
            line for line in out.stdout.splitlines() if "packet loss" in line or "rtt" in line
        ]
        print(f"    {target}: " + (" | ".join(summary) or out.stderr.strip()))
        if out.returncode != 0:
            raise RuntimeError(f"ping {target} failed")

    step(
        f"iperf3 {first.host.name} -> {second.host.name} "
        f"for {args.iperf_seconds}s through the tunnel"
    )
    server = second.host.spawn("iperf3", "-s", "-1", "-B", str(second.host.address4))
    time.sleep(0.5)
    out = first.host.run(
        "iperf3",
        "-c",
        str(second.host.address4),
        "-t",
        str(args.iperf_seconds),
        "-f",
        "m",
        timeout=args.iperf_seconds + 30,
        check=False,
    )
    server.wait(timeout=10)
    lines = [line for line in out.stdout.splitlines() if "receiver" in line or "sender" in line]
    print("\n".join(f"    {line.strip()}" for line in lines) or out.stderr)

    counters = [
        (d["spec"]["label"], d["spec"]["receiveBytes"], d["spec"]["transmitBytes"])
        for d in cluster.get(first, "kubespanpeerstatuses")
    ]
    print(
        f"    WireGuard byte counters on {first.host.name}: "
        + ", ".join(f"{label} rx {rx} tx {tx}" for label, rx, tx in counters)
    )
    step("the mesh works")
    return 0 if out.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
