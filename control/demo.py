"""`kubespan demo`: a local KubeSpan mesh in network namespaces, shown working.

Builds N nodes as namespaces on a bridge (underlay 192.0.2.0/24 and 2001:db8::/64,
documentation ranges that are routed nowhere), starts our discovery service and one
agent per node, waits for the full mesh, prints the peer table from node 1, then proves
that traffic between the nodes goes through the tunnel. Everything is removed on exit
or Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from control.labcluster import LabCluster, NodeOptions
from control.netlab import Lab, missing_facilities

REQUIRED_TOOLS = ("ip", "nft", "iperf3", "ping", "nc")


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kubespan demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-n", "--nodes", type=int, default=3, help="number of nodes (default 3)")
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
    step(f"building {args.nodes} nodes as network namespaces on a bridge")
    nodes = [cluster.add_node(NodeOptions(mode=args.mode)) for _ in range(args.nodes)]
    for node in nodes:
        print(
            f"    {node.host.name}: netns {node.host.netns}, underlay {node.host.address4} "
            f"and {node.host.address6}, link {node.link}"
        )
    step("starting the discovery service (192.0.2.250:3000, in the bridge namespace)")
    cluster.start_discovery()
    step("starting one KubeSpan agent per node")
    for node in nodes:
        cluster.start_agent(node)

    started = time.monotonic()

    def progress(up: int, want: int) -> None:
        print(f"    {time.monotonic() - started:5.1f}s  peer links up: {up}/{want}", flush=True)

    step("waiting for the full mesh")
    cluster.wait_full_mesh(args.timeout, progress)
    first, second = nodes[0], nodes[1]
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
