"""A KubeSpan cluster in a namespace lab: discovery service plus one agent per host.

Used by the demo and the end-to-end tests. The discovery service runs in the bridge
namespace on 192.0.2.250:3000 (plain h2c), so every node reaches it over the underlay
and nothing leaves the lab. With ``discovery_services=2`` a second one runs on
192.0.2.251:3000 and the nodes' configs list both (DiscoveryServiceConfig documents,
as Talos 1.14 writes them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from control.backends.uapi_client import UAPIClient, UAPIError
from control.netlab import Bridge, Host, Lab, add_address, stop_processes
from control.netlab.natlab import NatSite, add_nat_site
from kubespan_dp.uapisock import socket_path

DISCOVERY_ADDRESSES = ("192.0.2.250", "192.0.2.251")
DISCOVERY_ADDRESS = DISCOVERY_ADDRESSES[0]
DISCOVERY_PORT = 3000


@dataclass
class NodeOptions:
    mode: str | None = None  # WireGuard mode; None: the cluster's default_mode
    allow_down_peer_bypass: bool = False
    harvest_extra_endpoints: bool = False
    extra_endpoints: tuple[str, ...] = ()
    endpoint_filters: tuple[str, ...] | None = None
    listen_port: int = 51820
    mtu: int | None = None  # kubespan.mtu; None: not in the config (1420)
    relays: tuple[str, ...] = ()  # "ip:port" of relays to use (KubeSpanPyConfig)
    run_relay: bool = False  # the node runs a relay on port 51821


@dataclass
class Node:
    host: Host
    link: str
    state_dir: Path
    config_path: Path
    log_path: Path
    options: NodeOptions
    agent: subprocess.Popen | None = None


@dataclass
class LabCluster:
    lab: Lab
    bridge: Bridge
    workdir: Path
    cluster_id: str
    cluster_secret: str
    reconcile_interval: float = 5.0
    default_mode: str = "userspace"
    discovery_services: int = 1
    nodes: list[Node] = field(default_factory=list)
    discoveries: dict[int, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        lab: Lab,
        workdir: Path,
        reconcile_interval: float = 5.0,
        default_mode: str = "userspace",
        discovery_services: int = 1,
    ) -> LabCluster:
        import base64

        cluster_id = base64.urlsafe_b64encode(os.urandom(32)).decode()
        secret = base64.b64encode(os.urandom(32)).decode()
        bridge = Bridge(lab)
        for address in DISCOVERY_ADDRESSES[:discovery_services]:
            add_address(bridge.ns, "br0", f"{address}/24")
        return cls(
            lab,
            bridge,
            Path(workdir),
            cluster_id,
            secret,
            reconcile_interval,
            default_mode,
            discovery_services,
        )

    # -- discovery services -----------------------------------------------------------

    def discovery_files(self, index: int = 0) -> tuple[Path, Path]:
        """(log, snapshot) of service `index` (the first keeps its historical names)."""
        tag = str(index) if index else ""
        return self.workdir / f"discovery{tag}.log", self.workdir / f"discovery{tag}.snapshot"

    def start_discovery(self, index: int = 0, timeout: float = 90.0) -> None:
        """Start service `index` and wait until it accepts connections (slow in an
        emulated VM)."""
        address = DISCOVERY_ADDRESSES[index]
        log, snapshot = self.discovery_files(index)
        argv = [
            sys.executable,
            "-m",
            "control.discovery",
            "--listen",
            f"{address}:{DISCOVERY_PORT}",
            "--snapshot-path",
            str(snapshot),
        ]
        proc = self.discoveries[index] = self.bridge.ns.popen(argv, log=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = self.bridge.ns.run("nc", "-z", "-w1", address, str(DISCOVERY_PORT), check=False)
            if probe.returncode == 0:
                return
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(
            f"discovery service did not start; see {log}:\n{log.read_text()[-2000:]}"
        )

    def start_discoveries(self) -> None:
        for index in range(self.discovery_services):
            self.start_discovery(index)

    def stop_discovery(self, index: int | None = None) -> None:
        """Stop service `index` (default: every service)."""
        for i in list(self.discoveries) if index is None else [index]:
            proc = self.discoveries.pop(i, None)
            if proc is not None:
                stop_processes([proc])

    def discovery_urls(self) -> list[str]:
        return [
            f"http://{address}:{DISCOVERY_PORT}"
            for address in DISCOVERY_ADDRESSES[: self.discovery_services]
        ]

    # -- nodes ------------------------------------------------------------------------

    def add_node(self, options: NodeOptions | None = None, host: Host | None = None) -> Node:
        host = host or self.bridge.add_host()
        options = options or NodeOptions()
        node_dir = self.workdir / host.name
        node_dir.mkdir(parents=True, exist_ok=True)
        link = f"ksp{self.lab.tag[2:]}{host.index}"[:15]
        node = Node(
            host,
            link,
            node_dir / "state",
            node_dir / "machine.yaml",
            node_dir / "agent.log",
            options,
        )
        self.write_config(node)
        self.nodes.append(node)
        return node

    def add_nat_node(
        self, name: str, nat_mode: str, options: NodeOptions | None = None
    ) -> tuple[Node, NatSite]:
        """A node `node-NAME` behind a NAT router `nat-NAME` of mode `nat_mode` (see
        control.netlab.natlab); the router's public leg is on the bridge."""
        site = add_nat_site(self.bridge, name, nat_mode)
        return self.add_node(options, host=site.node), site

    def write_config(self, node: Node, enabled: bool = True) -> None:
        o = node.options
        kubespan: dict = {
            "enabled": enabled,
            "allowDownPeerBypass": o.allow_down_peer_bypass,
            "harvestExtraEndpoints": o.harvest_extra_endpoints,
        }
        if o.mtu is not None:
            kubespan["mtu"] = o.mtu
        if o.endpoint_filters is not None:
            kubespan["filters"] = {"endpoints": list(o.endpoint_filters)}
        cluster: dict = {"id": self.cluster_id, "secret": self.cluster_secret}
        urls = self.discovery_urls()
        if len(urls) == 1:
            cluster["discovery"] = {
                "enabled": True,
                "registries": {
                    "kubernetes": {"disabled": True},
                    "service": {"endpoint": urls[0]},
                },
            }
        docs = [
            {
                "version": "v1alpha1",
                "machine": {"network": {"kubespan": kubespan}},
                "cluster": cluster,
            },
            {
                "apiVersion": "v1alpha1",
                "kind": "KubeSpanPyConfig",
                "listenPort": o.listen_port,
                "wireguardMode": o.mode or self.default_mode,
                "stateDir": str(node.state_dir),
                "linkName": node.link,
                **({"relays": list(o.relays)} if o.relays else {}),
                **({"runRelay": True} if o.run_relay else {}),
            },
        ]
        if len(urls) > 1:  # Talos 1.14: one document per service, no .cluster.discovery
            docs += [
                {
                    "apiVersion": "v1alpha1",
                    "kind": "DiscoveryServiceConfig",
                    "name": f"lab{index}",
                    "endpoint": url,
                }
                for index, url in enumerate(urls)
            ]
        if o.extra_endpoints:
            docs.append(
                {
                    "apiVersion": "v1alpha1",
                    "kind": "KubeSpanEndpointsConfig",
                    "extraAnnouncedEndpoints": list(o.extra_endpoints),
                }
            )
        node.config_path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        node.config_path.chmod(0o600)

    def start_agent(self, node: Node, *extra_args: str) -> None:
        argv = [
            sys.executable,
            "-m",
            "control.cli",
            "agent",
            "-c",
            str(node.config_path),
            "--hostname",
            node.host.name,
            "--reconcile-interval",
            str(self.reconcile_interval),
            *extra_args,
        ]
        if os.environ.get("KUBESPAN_LAB_DEBUG"):  # agent and daemon log at debug level
            argv.append("--verbose")
        node.agent = node.host.spawn(*argv, log_path=str(node.log_path))

    def stop_agent(self, node: Node, kill: bool = False) -> None:
        if node.agent is None:
            return
        if kill:
            # Kill the agent and its daemon outright, as a crashed node would. A kernel
            # WireGuard link outlives its agent (a crashed machine's would not), so it
            # goes too; a userspace one is already gone with its daemon.
            node.host.ns.kill(signal.SIGKILL)
            node.agent.wait(timeout=10)
            node.host.run("ip", "link", "del", node.link, check=False)
        else:
            stop_processes([node.agent], grace=20)
        node.agent = None

    def agent_log(self, node: Node) -> str:
        try:
            return node.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- queries ----------------------------------------------------------------------

    def get(self, node: Node, rtype: str) -> list[dict]:
        """`kubespan get RTYPE -o json` run inside the node; the documents it prints."""
        proc = node.host.run(
            sys.executable,
            "-m",
            "control.cli",
            "get",
            rtype,
            "-o",
            "json",
            "--link",
            node.link,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"kubespan get {rtype} on {node.host.name}: {proc.stderr.strip()}")
        return _json_stream(proc.stdout)

    def get_table(self, node: Node, rtype: str) -> str:
        return node.host.run(
            sys.executable, "-m", "control.cli", "get", rtype, "--link", node.link
        ).stdout

    def peers_up(self, node: Node) -> int:
        try:
            return sum(
                1 for doc in self.get(node, "kubespanpeerstatuses") if doc["spec"]["state"] == "up"
            )
        except RuntimeError:
            return 0

    def wait_full_mesh(
        self,
        timeout: float = 120.0,
        progress: Callable[[int, int], None] | None = None,
        nodes: list[Node] | None = None,
    ) -> None:
        nodes = nodes if nodes is not None else [n for n in self.nodes if n.agent is not None]
        want = len(nodes) * (len(nodes) - 1)
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            up = sum(min(self.peers_up(n), len(nodes) - 1) for n in nodes)
            if progress and up != last:
                progress(up, want)
                last = up
            if up >= want:
                return
            for n in nodes:
                if n.agent is not None and n.agent.poll() is not None:
                    raise RuntimeError(
                        f"agent on {n.host.name} exited ({n.agent.returncode}):\n"
                        + self.agent_log(n)[-3000:]
                    )
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.host.name}\n{self.agent_log(n)[-2000:]}" for n in nodes)
                raise TimeoutError(
                    f"full mesh not reached in {timeout:.0f}s ({up}/{want} peer links up)\n{logs}"
                )
            time.sleep(1)

    def wireguard_report(self, nodes: list[Node] | None = None) -> str:
        """What every running node's WireGuard, routing and agent say now: printed by a
        test when traffic that should flow does not."""
        nodes = nodes if nodes is not None else [n for n in self.nodes if n.agent is not None]
        parts: list[str] = []
        for node in nodes:
            run = node.host.run
            parts.append(f"=== {node.host.name} ({self.get_mode(node)})")
            parts.append(run("wg", "show", node.link, "dump", check=False).stdout.strip())
            parts.append(_uapi_stats(node.link))
            parts.append(run("ip", "rule", "show", check=False).stdout.strip())
            parts.append(run("ip", "-6", "rule", "show", check=False).stdout.strip())
            for family in ("-4", "-6"):
                routes = run("ip", family, "route", "show", "table", "all", check=False).stdout
                parts.append("\n".join(r for r in routes.splitlines() if node.link in r))
            log = self.agent_log(node).splitlines()
            parts.append("\n".join(log[-40:]))
        return "\n".join(parts)

    def get_mode(self, node: Node) -> str:
        try:
            return str(self.get(node, "kubespanidentities")[0]["spec"]["wireguardMode"])
        except (RuntimeError, IndexError, KeyError):
            return "?"

    def close(self) -> None:
        for node in self.nodes:
            self.stop_agent(node)
        self.stop_discovery()


def _json_stream(text: str) -> list[dict]:
    decoder = json.JSONDecoder()
    docs, pos = [], 0
    text = text.strip()
    while pos < len(text):
        doc, end = decoder.raw_decode(text, pos)
        docs.append(doc)
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return docs


def _uapi_stats(link: str) -> str:
    """The userspace daemon's drop counters; empty for kernel WireGuard."""
    path = socket_path(link)
    if not path.exists():
        return ""
    try:
        stats = UAPIClient(path, timeout=5).stats()
    except UAPIError as exc:
        return f"stats: {exc}"
    return " ".join(f"{k}={v}" for k, v in stats.items())
