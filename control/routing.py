"""Steering traffic into KubeSpan: nftables marks plus policy routing.

The same for every WireGuard backend. Packets to a routed peer prefix get the mark bit
0x40 (under mask 0x60); a policy rule sends marked packets to table 180, whose default
routes point at the KubeSpan link. WireGuard's own encrypted packets carry 0x20 and
are let through untouched, so they leave by the normal routes instead of looping back
into the tunnel. On the output path the chain is of type "route": changing the mark
there makes the kernel redo the route lookup. IPv6 neighbour discovery is never marked:
it belongs to the underlay link it was sent on. TCP SYNs towards the tunnel have their
MSS clamped to fit the link MTU (MTU - 52 for IPv4, MTU - 72 for IPv6, leaving room
for IP + TCP headers and 12 bytes of TCP options), as Talos does.

The whole nftables table is replaced in one `nft -f` transaction, so a reader never
sees a half-built ruleset. Policy rules and routes go through pyroute2 netlink; call
from a plain thread, not from a uvloop loop.

Every function takes `netns`: the name of a network namespace (as `ip netns` knows it)
to act in, or None for the caller's own.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import TypeVar

from pyroute2 import IPRoute

from control.ula import ULA_KUBESPAN, is_ula
from kubespan_dp.netutil import IPNetwork, check_ifname

NFT_TABLE = "kubespan"  # table inet kubespan
# IPv6 neighbour discovery is about the link it is sent on, never for the tunnel: a
# node's underlay addresses are routed peer prefixes, and an answer to a peer's
# neighbour solicitation steered into KubeSpan would leave the peer unable to resolve
# us on the underlay, so WireGuard's own packets to an IPv6 endpoint would go nowhere.
NEIGHBOUR_DISCOVERY = (
    "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect"
)
SET_V4 = "kubespan_targets_ipv4"
SET_V6 = "kubespan_targets_ipv6"
CHAIN_PREROUTING = "kubespan_prerouting"
CHAIN_OUTPUT = "kubespan_outgoing"

WIREGUARD_MARK = 0x20  # set by WireGuard on its own UDP packets
FORCE_MARK = 0x40  # "route this through KubeSpan"
MARK_MASK = WIREGUARD_MARK | FORCE_MARK
ROUTE_TABLE = 180
RULE_PRIORITY = 32500
MIN_MTU = 1280
MAX_MTU = 65535

# IP header + TCP header + 12 bytes of TCP options (timestamps).
MSS_OVERHEAD_V4 = 20 + 20 + 12
MSS_OVERHEAD_V6 = 40 + 20 + 12

_FAMILIES = (socket.AF_INET, socket.AF_INET6)


class RoutingError(RuntimeError):
    """Routing could not be installed, read or removed."""


# ---------------------------------------------------------------------------
# Which prefixes are routed


_PeerKey = TypeVar("_PeerKey")


def routed_prefixes(
    allowed_ips: Mapping[_PeerKey, Iterable[IPNetwork]],
    states: Mapping[_PeerKey, str],
    allow_down_peer_bypass: bool,
) -> list[IPNetwork]:
    """The prefixes to steer into KubeSpan, collapsed, IPv4 first.

    `allowed_ips` and `states` are keyed by peer (any key). With
    `allow_down_peer_bypass` only peers that are up count (traffic to a down peer
    takes the normal routes); without it every peer's prefixes are routed, so traffic
    never leaks around the tunnel. A state may be a `PeerStateName` or its string.
    """
    picked: list[IPNetwork] = []
    for key, nets in allowed_ips.items():
        state = states.get(key)
        state_name = getattr(state, "value", state)  # PeerStateName or plain string
        if allow_down_peer_bypass and state_name != "up":
            continue
        # KubeSpan's own ULA space is reached via the link's /64, not the marks.
        picked.extend(n for n in nets if not is_ula(n, ULA_KUBESPAN))
    return _collapse(picked)


def _collapse(nets: Iterable[IPNetwork]) -> list[IPNetwork]:
    nets = list(nets)
    v4 = [n for n in nets if n.version == 4]
    v6 = [n for n in nets if n.version == 6]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def _coerce_prefixes(prefixes: Iterable[object]) -> list[IPNetwork]:
    out: list[IPNetwork] = []
    for p in prefixes:
        if isinstance(p, (IPv4Network, IPv6Network)):
            out.append(p)
            continue
        try:
            out.append(ipaddress.ip_network(str(p), strict=True))
        except ValueError as exc:
            raise ValueError(f"not an IP prefix: {p!r}") from exc
    return out


# ---------------------------------------------------------------------------
# The nftables ruleset


def build_ruleset(prefixes: Iterable[object], mtu: int) -> str:
    """`nft -f` input that atomically replaces table inet kubespan."""
    _check_mtu(mtu)
    nets = _collapse(_coerce_prefixes(prefixes))
    v4 = ", ".join(str(n) for n in nets if n.version == 4)
    v6 = ", ".join(str(n) for n in nets if n.version == 6)
    own = f"meta mark & 0x{MARK_MASK:08x} == 0x{WIREGUARD_MARK:08x} accept"
    keep = 0xFFFFFFFF & ~MARK_MASK
    set_mark = f"meta mark set meta mark & 0x{keep:08x} | 0x{FORCE_MARK:08x} accept"
    mss4, mss6 = mtu - MSS_OVERHEAD_V4, mtu - MSS_OVERHEAD_V6
    syn = "tcp flags & (syn | rst) == syn"
    lines = [
        # add + delete + define in one transaction: works whether or not the table exists
        f"add table inet {NFT_TABLE}",
        f"delete table inet {NFT_TABLE}",
        f"table inet {NFT_TABLE} {{",
        f"\tset {SET_V4} {{",
        "\t\ttype ipv4_addr",
        "\t\tflags interval",
        *([f"\t\telements = {{ {v4} }}"] if v4 else []),
        "\t}",
        f"\tset {SET_V6} {{",
        "\t\ttype ipv6_addr",
        "\t\tflags interval",
        *([f"\t\telements = {{ {v6} }}"] if v6 else []),
        "\t}",
        f"\tchain {CHAIN_PREROUTING} {{",
        "\t\ttype filter hook prerouting priority filter; policy accept;",
        f"\t\t{own}",
        f"\t\tip daddr @{SET_V4} {set_mark}",
        f"\t\tip6 daddr @{SET_V6} {set_mark}",
        "\t}",
        f"\tchain {CHAIN_OUTPUT} {{",
        "\t\ttype route hook output priority filter; policy accept;",
        f"\t\t{own}",
        '\t\toifname "lo" accept',
        f"\t\ticmpv6 type {{ {NEIGHBOUR_DISCOVERY} }} accept",
        f"\t\tip daddr @{SET_V4} {syn} tcp option maxseg size > {mss4} "
        f"tcp option maxseg size set {mss4}",
        f"\t\tip daddr @{SET_V4} {set_mark}",
        f"\t\tip6 daddr @{SET_V6} {syn} tcp option maxseg size > {mss6} "
        f"tcp option maxseg size set {mss6}",
        f"\t\tip6 daddr @{SET_V6} {set_mark}",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _check_mtu(mtu: int) -> None:
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not MIN_MTU <= mtu <= MAX_MTU:
        raise ValueError(f"MTU must be an integer in [{MIN_MTU}, {MAX_MTU}], got {mtu!r}")


def _nft(args: list[str], netns: str | None, stdin: str | None = None) -> str:
    argv = ["nft", *args]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RoutingError(f"nft failed to run: {exc}") from exc
    if done.returncode != 0:
        raise RoutingError(f"nft {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def remove_nftables(*, netns: str | None = None) -> None:
    _nft(["-f", "-"], netns, f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n")


# ---------------------------------------------------------------------------
# Policy rules and table 180


def _our_rules(ipr: IPRoute, family: int) -> list:
    return [
        r
        for r in ipr.get_rules(family=family)
        if r.get("FRA_TABLE") == ROUTE_TABLE and r.get("FRA_FWMARK") == FORCE_MARK
    ]


def apply_policy(link: str, mtu: int, *, netns: str | None = None) -> None:
    """Rules `fwmark 0x40/0x60 lookup 180` (v4, v6) and default routes via `link`."""
    check_ifname(link)
    _check_mtu(mtu)
    try:
        with IPRoute(**({"netns": netns} if netns else {})) as ipr:
            found = ipr.link_lookup(ifname=link)
            if not found:
                raise RoutingError(f"link {link!r} does not exist")
            oif = found[0]
            if (
                not ipr.get_links(oif)[0]["flags"] & 1
            ):  # IFF_UP; IPv6 refuses routes via a down link
                raise RoutingError(f"link {link!r} is down")
            for family in _FAMILIES:
                rules = _our_rules(ipr, family)
                exact = [
                    r
                    for r in rules
                    if r.get("FRA_PRIORITY") == RULE_PRIORITY and r.get("FRA_FWMASK") == MARK_MASK
                ]
                for r in rules:  # stale variants (other mask/priority) go
                    if r not in exact[:1]:
                        _del_rule(ipr, r)
                if not exact:
                    ipr.rule(
                        "add",
                        family=family,
                        table=ROUTE_TABLE,
                        priority=RULE_PRIORITY,
                        fwmark=FORCE_MARK,
                        fwmask=MARK_MASK,
                    )
                dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
                ipr.route(
                    "replace",
                    family=family,
                    dst=dst,
                    oif=oif,
                    table=ROUTE_TABLE,
                    metrics={"mtu": mtu},
                )
    except RoutingError:
        raise
    except Exception as exc:  # netlink errors carry no secrets
        raise RoutingError(f"policy routing setup failed: {exc}") from exc


def _del_rule(ipr: IPRoute, r) -> None:
    ipr.rule(
        "del",
        family=r["family"],
        table=r.get("FRA_TABLE"),
        priority=r.get("FRA_PRIORITY"),
        fwmark=r.get("FRA_FWMARK"),
        fwmask=r.get("FRA_FWMASK"),
    )


def remove_policy(*, netns: str | None = None) -> None:
    try:
        with IPRoute(**({"netns": netns} if netns else {})) as ipr:
            for family in _FAMILIES:
                for r in _our_rules(ipr, family):
                    _del_rule(ipr, r)
                for route in _table_routes(ipr, family):
                    ipr.route(
                        "del",
                        family=family,
                        dst=route.get("RTA_DST"),
                        dst_len=route["dst_len"],
                        oif=route.get("RTA_OIF"),
                        table=ROUTE_TABLE,
                        priority=route.get("RTA_PRIORITY"),
                    )
    except Exception as exc:
        raise RoutingError(f"policy routing removal failed: {exc}") from exc


def _table_routes(ipr: IPRoute, family: int) -> list:
    return [
        r
        for r in ipr.get_routes(family=family, table=ROUTE_TABLE)
        if r.get("RTA_TABLE") == ROUTE_TABLE
    ]


# ---------------------------------------------------------------------------
# The whole thing


def apply(routed: Iterable[object], link: str, mtu: int, *, netns: str | None = None) -> None:
    """Install or update everything; idempotent. Validates all input before any change."""
    check_ifname(link)
    ruleset = build_ruleset(routed, mtu)  # raises ValueError on bad prefixes / MTU
    apply_policy(link, mtu, netns=netns)
    _nft(["-f", "-"], netns, ruleset)


def remove(*, netns: str | None = None) -> None:
    """Remove the nftables table, the policy rules and table 180; idempotent."""
    remove_nftables(netns=netns)
    remove_policy(netns=netns)


@dataclass(frozen=True)
class RoutingSnapshot:
    """What is installed, normalised so two hosts (or two backends) compare equal."""

    nft: str | None  # `nft list table inet kubespan`, handles and indentation dropped
    routed: tuple[str, ...]  # set elements as prefixes, collapsed, v4 first
    rules: tuple[str, ...]  # e.g. "ipv4 priority 32500 fwmark 0x40/0x60 lookup 180"
    routes: tuple[str, ...]  # e.g. "ipv6 default dev kubespan mtu 1420 table 180"

    @property
    def empty(self) -> bool:
        return self.nft is None and not self.rules and not self.routes


def snapshot(*, netns: str | None = None) -> RoutingSnapshot:
    """Read back what is installed (rules/routes of table 180, the nftables table)."""
    nft_text, routed = _read_nft(netns)
    rules: list[str] = []
    routes: list[str] = []
    try:
        with IPRoute(**({"netns": netns} if netns else {})) as ipr:
            names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
            for family, fname in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
                for r in _our_rules(ipr, family):
                    rules.append(
                        f"{fname} priority {r.get('FRA_PRIORITY')} fwmark 0x{r.get('FRA_FWMARK'):x}"
                        f"/0x{(r.get('FRA_FWMASK') or 0xFFFFFFFF):x} lookup {r.get('FRA_TABLE')}"
                    )
                for route in _table_routes(ipr, family):
                    dst = route.get("RTA_DST")
                    dst_s = "default" if dst is None else f"{dst}/{route['dst_len']}"
                    metrics = route.get("RTA_METRICS")
                    mtu = metrics.get("RTAX_MTU") if metrics is not None else None
                    dev = names.get(route.get("RTA_OIF"), "?")
                    routes.append(f"{fname} {dst_s} dev {dev} mtu {mtu} table {ROUTE_TABLE}")
    except Exception as exc:
        raise RoutingError(f"reading policy routing failed: {exc}") from exc
    return RoutingSnapshot(nft_text, routed, tuple(sorted(rules)), tuple(sorted(routes)))


def _read_nft(netns: str | None) -> tuple[str | None, tuple[str, ...]]:
    listing = json.loads(_nft(["-j", "list", "tables"], netns) or "{}")
    present = any(
        item.get("table", {}).get("family") == "inet"
        and item.get("table", {}).get("name") == NFT_TABLE
        for item in listing.get("nftables", [])
    )
    if not present:
        return None, ()
    text = _nft(["list", "table", "inet", NFT_TABLE], netns)
    norm = "\n".join(
        line.split(" # handle")[0].strip() for line in text.splitlines() if line.strip()
    )
    data = json.loads(_nft(["-j", "list", "table", "inet", NFT_TABLE], netns))
    nets: list[IPNetwork] = []
    for item in data.get("nftables", []):
        s = item.get("set")
        if s and s.get("name") in (SET_V4, SET_V6):
            for elem in s.get("elem", []):
                nets.extend(_elem_networks(elem))
    return norm, tuple(str(n) for n in _collapse(nets))


def _elem_networks(elem: object) -> list[IPNetwork]:
    if isinstance(elem, dict) and "elem" in elem:  # element with attributes
        elem = elem["elem"]["val"]
    if isinstance(elem, str):
        return [ipaddress.ip_network(elem)]
    if isinstance(elem, dict) and "prefix" in elem:
        return [ipaddress.ip_network(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")]
    if isinstance(elem, dict) and "range" in elem:
        lo, hi = (ipaddress.ip_address(a) for a in elem["range"])
        return list(ipaddress.summarize_address_range(lo, hi))
    raise RoutingError(f"unexpected nftables set element {elem!r}")
