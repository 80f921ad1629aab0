"""Nodes behind NAT routers, for the NAT demo and tests.

The public segment is a `Bridge` (192.0.2.0/24: the discovery service, public nodes,
the routers' public legs). Each `NatSite` adds a router on that segment and one node
behind it, on a private segment of its own:

    public segment 192.0.2.0/24 (br0)
        |  eth0 = 192.0.2.R: the NAT's public address, masquerade on it
     router (nft: NAT_MODES[mode], unsolicited inbound dropped, forwarding LAN -> WAN)
        |  lan0 = 10.0.R.1/24
     node   eth0 = 10.0.R.2/24, default route via 10.0.R.1 (its only way out)

A router drops what arrives on its public leg unsolicited, as home routers do; that
also keeps the packet from leaving a conntrack entry that would make the masquerade
pick another port for the node's own flow to that sender later. Private nodes have
no route to each other except through both NATs, and nothing has a route out of the
lab. IPv4 only: NAT is an IPv4 habit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address

from control.netlab.bridge import Bridge, Host
from control.netlab.lab import add_address
from control.netlab.netns import Netns

# How each NAT maps a private node's flows to its public address.
NAT_MODES = {
    # Linux keeps the source port when no other flow holds it: one mapping for every
    # destination (endpoint-independent), which hole punching can use.
    "port-preserving": "masquerade",
    # A random port per flow: what one peer saw is no use to another.
    "symmetric": "masquerade fully-random",
}
PRIVATE_V4 = "10.0.{}.{}"
NODE_INDEX_BASE = 100  # private nodes' Host.index (names links) stays clear of the bridge's


@dataclass
class NatSite:
    router: Host  # on the public segment: router.address4 is the NAT's public address
    node: Host  # behind it
    mode: str

    @property
    def public_address(self) -> IPv4Address:
        return self.router.address4

    def udp_timeouts(self) -> tuple[int, int]:
        """The router's conntrack UDP timeouts, in seconds: (before a reply was seen,
        after): how long a mapping stays open without traffic."""
        out = self.router.run(
            "sysctl",
            "-n",
            "net.netfilter.nf_conntrack_udp_timeout",
            "net.netfilter.nf_conntrack_udp_timeout_stream",
        )
        unreplied, stream = (int(v) for v in out.stdout.split())
        return unreplied, stream


def add_nat_site(bridge: Bridge, name: str, mode: str) -> NatSite:
    """A router `nat-NAME` on the bridge and a node `node-NAME` behind it."""
    if mode not in NAT_MODES:
        raise ValueError(f"NAT mode {mode!r}: choose one of {', '.join(NAT_MODES)}")
    router = bridge.add_host(f"nat-{name}")
    net = router.index
    gateway, address = PRIVATE_V4.format(net, 1), PRIVATE_V4.format(net, 2)
    node = Host(
        f"node-{name}",
        bridge.lab.netns(f"node-{name}"),
        NODE_INDEX_BASE + net,
        IPv4Address(address),
    )
    bridge.lab.veth(router.ns, node.ns, name_a="lan0", name_b="eth0")
    add_address(router.ns, "lan0", f"{gateway}/24")
    add_address(node.ns, "eth0", f"{address}/24")
    node.run("ip", "route", "add", "default", "via", gateway)
    router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    router.ns.run("nft", "-f", "-", input=router_ruleset(mode))
    return NatSite(router, node, mode)


def router_ruleset(mode: str) -> str:
    return f"""
table ip natlab {{
    chain postrouting {{
        type nat hook postrouting priority srcnat;
        oifname "eth0" {NAT_MODES[mode]}
    }}
    chain input {{
        type filter hook input priority filter;
        iifname "eth0" ct state established,related accept
        iifname "eth0" counter drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "eth0" accept
    }}
}}
"""


class PacketCounter:
    """nftables counters in `ns` for packets between any two of `addresses`, in and out
    of every interface of the namespace (forwarded ones pass both)."""

    TABLE = "natlab_count"

    def __init__(self, ns: Netns, addresses: Iterable[IPv4Address]) -> None:
        self.ns = ns
        elements = ", ".join(str(a) for a in addresses)
        ns.run(
            "nft",
            "-f",
            "-",
            input=f"""
table ip {self.TABLE} {{
    set between {{ type ipv4_addr; elements = {{ {elements} }} }}
    chain in {{
        type filter hook prerouting priority raw;
        ip saddr @between ip daddr @between counter
    }}
    chain out {{
        type filter hook postrouting priority srcnat + 10;
        ip saddr @between ip daddr @between counter
    }}
}}
""",
        )

    def packets(self) -> int:
        out = self.ns.run("nft", "-j", "list", "table", "ip", self.TABLE).stdout
        return sum(
            item["counter"]["packets"]
            for entry in json.loads(out)["nftables"]
            if "rule" in entry
            for item in entry["rule"]["expr"]
            if "counter" in item
        )
