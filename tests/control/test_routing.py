"""KubeSpan routing: routed-set computation (pure) and the ruleset in a real namespace."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from ipaddress import ip_address
from ipaddress import ip_network as N

import pytest

from control import netlab, routing
from control.peerstate import PeerStateName
from control.ula import ULA_KUBESPAN, ULA_SIDEROLINK, is_ula
from tests import netns as nx

# --------------------------------------------------------------------------- pure


def test_routed_prefixes_bypass_and_ula() -> None:
    allowed = {
        "up": [N("10.0.1.0/24"), N("192.0.2.1/32"), N("fd7f:175a:b97c:5602::1/128")],
        "down": [N("10.0.2.0/24"), N("2001:db8:2::/48")],
        "unknown": [N("10.0.1.128/25")],  # inside "up"'s /24: collapsed away
    }
    states = {"up": PeerStateName.UP, "down": "down", "unknown": PeerStateName.UNKNOWN}
    everything = routing.routed_prefixes(allowed, states, allow_down_peer_bypass=False)
    assert [str(n) for n in everything] == [
        "10.0.1.0/24",
        "10.0.2.0/24",
        "192.0.2.1/32",
        "2001:db8:2::/48",
    ]
    only_up = routing.routed_prefixes(allowed, states, allow_down_peer_bypass=True)
    assert [str(n) for n in only_up] == ["10.0.1.0/24", "192.0.2.1/32"]
    assert routing.routed_prefixes({}, {}, False) == []
    # a peer without a status yet counts as not up; generators are fine as input
    nostatus = {"new": (n for n in [N("10.9.0.0/16")])}
    assert routing.routed_prefixes(nostatus, {}, allow_down_peer_bypass=True) == []
    nostatus = {"new": (n for n in [N("10.9.0.0/16")])}
    assert routing.routed_prefixes(nostatus, {}, allow_down_peer_bypass=False) == [N("10.9.0.0/16")]


def test_kubespan_ula_detection() -> None:
    assert is_ula(N("fd7f:175a:b97c:5602:e871:1bff:feb2:ccee/128"), ULA_KUBESPAN)
    assert is_ula(N("fd7f:175a:b97c:5602::/64"), ULA_KUBESPAN)
    assert not is_ula(N("fd7f:175a:b97c:5603::/64"), ULA_KUBESPAN)  # other ULA purpose
    assert not is_ula(N("fd7f:175a:b97c:5600::/56"), ULA_KUBESPAN)  # wider than the /64
    assert not is_ula(N("fc00::/7"), ULA_KUBESPAN)
    assert not is_ula(N("10.0.0.0/8"), ULA_KUBESPAN)
    # the same check on addresses (endpoints.py leaves SideroLink addresses out)
    assert is_ula(ip_address("fd7f:175a:b97c:5603::1"), ULA_SIDEROLINK)
    assert not is_ula(ip_address("fd7f:175a:b97c:5602::1"), ULA_SIDEROLINK)
    assert not is_ula(ip_address("10.0.0.3"), ULA_SIDEROLINK)
    # and the routed prefixes leave KubeSpan's own /64 out
    ula = N("fd7f:175a:b97c:5602::/64")
    assert routing.routed_prefixes({"k": [ula, N("10.1.0.0/16")]}, {}, False) == [N("10.1.0.0/16")]


def test_build_ruleset_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        routing.build_ruleset(["10.0.0.1/8"], 1420)  # host bits set
    with pytest.raises(ValueError):
        routing.build_ruleset(["not-a-prefix"], 1420)
    with pytest.raises(ValueError):
        routing.build_ruleset(["10.0.0.0/8 } ; flush ruleset ; {"], 1420)
    for mtu in (1279, 65536, "1420", None, True):
        with pytest.raises(ValueError):
            routing.build_ruleset([], mtu)  # type: ignore[arg-type]
    # the link name is checked (the one Linux rule) before anything is touched
    for link in ("", "x" * 16, "bad/name", "a b"):
        with pytest.raises(ValueError, match="invalid interface name"):
            routing.apply([], link, 1420)


def test_build_ruleset_mss_follows_mtu() -> None:
    text = routing.build_ruleset([N("10.0.0.0/8")], 1500)
    assert "maxseg size set 1448" in text and "maxseg size set 1428" in text
    text = routing.build_ruleset([], 1420)
    assert "maxseg size set 1368" in text and "maxseg size set 1348" in text
    assert "elements" not in text  # empty sets carry no element list


# --------------------------------------------------------------------------- namespace

ROUTED = ["192.0.2.0/24", "10.20.0.0/16", "2001:db8:1::/48"]
EXPECTED_RULES = (
    "ipv4 priority 32500 fwmark 0x40/0x60 lookup 180",
    "ipv6 priority 32500 fwmark 0x40/0x60 lookup 180",
)
EXPECTED_ROUTES = (
    "ipv4 default dev kubespan mtu 1420 table 180",
    "ipv6 default dev kubespan mtu 1420 table 180",
)


@pytest.fixture
def host(lab: nx.Lab) -> netlab.Netns:
    """A namespace with a `kubespan` link and an `uplink` holding the main default routes.

    Both are veth pairs with ARP/ND off, so packets leave at once and the tx counters
    say which way a packet was routed. The main table's default routes go via the
    uplink: without the KubeSpan mark everything would leave there.
    """
    ns = lab.netns("rt")
    for dev, peer in (("kubespan", "kspeer"), ("uplink", "uppeer")):
        ns.run("ip", "link", "add", dev, "type", "veth", "peer", "name", peer)
        for d in (dev, peer):
            ns.run("ip", "link", "set", d, "arp", "off", "up")
    netlab.add_address(ns, "uplink", "198.51.100.1/24")
    netlab.add_address(ns, "uplink", "2001:db8:ffff::1/64")
    netlab.add_address(ns, "kubespan", "fd7f:175a:b97c:5602::1/64")
    ns.run("ip", "route", "add", "default", "dev", "uplink")
    ns.run("ip", "-6", "route", "add", "default", "dev", "uplink")
    return ns


def _tx(ns: netlab.Netns, dev: str) -> int:
    return int(ns.run("cat", f"/sys/class/net/{dev}/statistics/tx_packets").stdout)


def _send_udp(ns: netlab.Netns, dst: str, mark: int = 0) -> None:
    """One UDP datagram from inside the namespace (optionally with SO_MARK set)."""
    family = "AF_INET6" if ":" in dst else "AF_INET"
    code = (
        "import socket;"
        f"s=socket.socket(socket.{family},socket.SOCK_DGRAM);"
        f"s.setsockopt(socket.SOL_SOCKET,socket.SO_MARK,{mark});"
        f"s.sendto(b'x',('{dst}',9))"
    )
    ns.run("python3", "-c", code)


def _went_via(ns: netlab.Netns, dst: str, mark: int = 0) -> str:
    before = {d: _tx(ns, d) for d in ("kubespan", "uplink")}
    _send_udp(ns, dst, mark)
    after = {d: _tx(ns, d) for d in ("kubespan", "uplink")}
    moved = [d for d in before if after[d] > before[d]]
    assert len(moved) == 1, f"{dst}: tx moved on {moved}"
    return moved[0]


@pytest.mark.netns
def test_apply_reads_back(host: netlab.Netns) -> None:
    routing.apply(ROUTED, "kubespan", 1420, netns=host.name)
    routing.apply(ROUTED, "kubespan", 1420, netns=host.name)  # idempotent
    snap = routing.snapshot(netns=host.name)
    assert snap.routed == ("10.20.0.0/16", "192.0.2.0/24", "2001:db8:1::/48")
    assert snap.rules == EXPECTED_RULES
    assert snap.routes == EXPECTED_ROUTES
    assert snap.nft is not None
    assert "type filter hook prerouting priority filter; policy accept;" in snap.nft
    assert "type route hook output priority filter; policy accept;" in snap.nft
    assert 'oifname "lo" accept' in snap.nft
    assert "meta mark & 0x00000060 == 0x00000020 accept" in snap.nft
    # independent of our own reader: what `ip` says
    assert "32500:\tfrom all fwmark 0x40/0x60 lookup 180" in host.run("ip", "rule").stdout
    assert "32500:\tfrom all fwmark 0x40/0x60 lookup 180" in host.run("ip", "-6", "rule").stdout
    assert "default dev kubespan" in host.run("ip", "route", "show", "table", "180").stdout
    assert "mtu 1420" in host.run("ip", "-6", "route", "show", "table", "180").stdout


@pytest.mark.netns
def test_marked_packets_go_to_table_180(host: netlab.Netns) -> None:
    routing.apply(ROUTED, "kubespan", 1420, netns=host.name)
    get = host.run("ip", "route", "get", "192.0.2.9", "mark", "0x40").stdout
    assert "dev kubespan" in get and "table 180" in get
    assert "dev uplink" in host.run("ip", "route", "get", "192.0.2.9").stdout
    # 0x60 under the mask is not 0x40: no KubeSpan table
    assert "dev uplink" in host.run("ip", "route", "get", "192.0.2.9", "mark", "0x60").stdout
    get6 = host.run("ip", "-6", "route", "get", "2001:db8:1::9", "mark", "0x40").stdout
    assert "dev kubespan" in get6 and "table 180" in get6


@pytest.mark.netns
def test_real_packets_are_marked_and_steered(host: netlab.Netns) -> None:
    routing.apply(ROUTED, "kubespan", 1420, netns=host.name)
    assert _went_via(host, "192.0.2.9") == "kubespan"
    assert _went_via(host, "10.20.3.4") == "kubespan"
    assert _went_via(host, "2001:db8:1::9") == "kubespan"
    assert _went_via(host, "203.0.113.9") == "uplink"  # not routed
    assert _went_via(host, "2001:db8:2::9") == "uplink"
    # WireGuard's own packets (mark 0x20) never loop into the tunnel
    assert _went_via(host, "192.0.2.9", mark=0x20) == "uplink"
    assert _went_via(host, "2001:db8:1::9", mark=0x20) == "uplink"
    # other mark bits survive: 0x1 stays set and the packet still goes to KubeSpan
    assert _went_via(host, "192.0.2.9", mark=0x1) == "kubespan"


def _syn_mss(ns: netlab.Netns, dst: str) -> int:
    """Connect to dst:80 from the namespace and read the MSS of the SYN on `kubespan`."""
    dump = ns.popen(
        [
            "tcpdump",
            "-l",
            "-i",
            "kubespan",
            "-nn",
            "-c",
            "1",
            "tcp[tcpflags] & tcp-syn != 0" if ":" not in dst else "ip6 and tcp",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert dump.stderr is not None
    try:
        # tcpdump prints "listening on" to stderr once the capture is live
        for _ in range(5):
            line = dump.stderr.readline().decode()
            if "listening" in line or not line:
                break
        assert "listening" in line, line
        family = "AF_INET6" if ":" in dst else "AF_INET"
        ns.run(
            "python3",
            "-c",
            f"import socket;s=socket.socket(socket.{family});s.settimeout(0.5)\n"
            f"try: s.connect(('{dst}',80))\nexcept OSError: pass",
            check=False,
        )
        out, _ = dump.communicate(timeout=20)
    finally:
        if dump.poll() is None:
            dump.kill()
            dump.wait()
    text = out.decode()
    assert "mss " in text, text
    return int(text.split("mss ")[1].split(",")[0].split("]")[0])


@pytest.mark.netns
def test_mss_clamped_on_syn(host: netlab.Netns) -> None:
    routing.apply(ROUTED, "kubespan", 1420, netns=host.name)
    # the socket routes via the 1500-byte uplink first (MSS 1460 / 1440); the clamp fixes it
    assert _syn_mss(host, "192.0.2.9") == 1420 - 52
    assert _syn_mss(host, "2001:db8:1::9") == 1420 - 72


@pytest.mark.netns
def test_update_is_atomic_and_bad_input_changes_nothing(host: netlab.Netns) -> None:
    set_a = ["192.0.2.0/24", "2001:db8:1::/48"]
    set_b = ["10.20.0.0/16", "198.18.0.0/15", "2001:db8:2::/48"]
    routing.apply(set_a, "kubespan", 1420, netns=host.name)
    seen: list[frozenset[str]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            out = host.run("nft", "-j", "list", "table", "inet", "kubespan", check=False).stdout
            elems: set[str] = set()
            rules = 0
            for item in json.loads(out or '{"nftables": []}')["nftables"]:
                for e in item.get("set", {}).get("elem", []):
                    elems.add(f"{e['prefix']['addr']}/{e['prefix']['len']}")
                rules += "rule" in item
            seen.append(frozenset(elems | {f"rules={rules}"}))

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(12):
            routing.apply(set_b if i % 2 == 0 else set_a, "kubespan", 1420, netns=host.name)
    finally:
        stop.set()
        t.join()
    full = {frozenset(set_a) | {"rules=10"}, frozenset(set_b) | {"rules=10"}}
    assert seen and set(seen) <= full, set(seen) - full
    # bad input: ValueError, and the installed state is untouched
    before = routing.snapshot(netns=host.name)
    with pytest.raises(ValueError):
        routing.apply(["192.0.2.0/24", "garbage"], "kubespan", 1420, netns=host.name)
    with pytest.raises(ValueError):
        routing.apply(set_b, "kubespan", 100, netns=host.name)
    with pytest.raises(routing.RoutingError):
        routing.apply(set_b, "nosuchlink", 1420, netns=host.name)
    host.run("ip", "link", "add", "ksdown", "type", "veth", "peer", "name", "ksdownp")
    with pytest.raises(routing.RoutingError, match="is down"):
        routing.apply(set_b, "ksdown", 1420, netns=host.name)
    assert routing.snapshot(netns=host.name) == before


@pytest.mark.netns
def test_mtu_change_updates_routes_and_clamp(host: netlab.Netns) -> None:
    routing.apply(ROUTED, "kubespan", 1420, netns=host.name)
    routing.apply(ROUTED, "kubespan", 1380, netns=host.name)
    snap = routing.snapshot(netns=host.name)
    assert snap.routes == tuple(r.replace("1420", "1380") for r in EXPECTED_ROUTES)
    assert snap.rules == EXPECTED_RULES  # not duplicated
    assert "maxseg size set 1328" in (snap.nft or "")


@pytest.mark.netns
def test_remove_leaves_nothing(host: netlab.Netns) -> None:
    pristine_rules = host.run("ip", "rule").stdout, host.run("ip", "-6", "rule").stdout
    routing.apply(ROUTED, "kubespan", 1420, netns=host.name)
    routing.remove(netns=host.name)
    assert routing.snapshot(netns=host.name).empty
    assert "kubespan" not in host.run("nft", "list", "ruleset").stdout
    assert (host.run("ip", "rule").stdout, host.run("ip", "-6", "rule").stdout) == pristine_rules
    assert host.run("ip", "route", "show", "table", "180").stdout.strip() == ""
    assert host.run("ip", "-6", "route", "show", "table", "180").stdout.strip() == ""
    assert _went_via(host, "192.0.2.9") == "uplink"
    routing.remove(netns=host.name)  # idempotent
    assert routing.snapshot(netns=host.name).empty


@pytest.mark.netns
def test_neighbour_discovery_stays_on_the_underlay(lab: nx.Lab) -> None:
    """A peer's IPv6 underlay address is a routed prefix, yet our answer to its neighbour
    solicitation must leave by the link it came on: steered into KubeSpan, the peer could
    never resolve us, and WireGuard's own packets to our IPv6 endpoint would go nowhere."""
    node, peer = lab.netns("nd"), lab.netns("ndpeer")
    node_dev, peer_dev = lab.veth(node, peer)
    netlab.add_address(node, node_dev, "2001:db8:77::1/64")
    netlab.add_address(peer, peer_dev, "2001:db8:77::2/64")
    node.run("ip", "link", "add", "kubespan", "type", "veth", "peer", "name", "kspeer")
    for dev in ("kubespan", "kspeer"):
        node.run("ip", "link", "set", dev, "arp", "off", "up")
    routing.apply([N("2001:db8:77::2/128")], "kubespan", 1420, netns=node.name)
    # (ordinary traffic to the peer is steered, as it should be)
    assert (
        "dev kubespan"
        in node.run("ip", "-6", "route", "get", "2001:db8:77::2", "mark", "0x40").stdout
    )

    def resolved() -> bool:
        peer.run("ping", "-c", "1", "-W", "1", "2001:db8:77::1", check=False)  # solicits
        state = peer.run("ip", "-6", "neigh", "show", "2001:db8:77::1", "dev", peer_dev).stdout
        return any(s in state for s in ("REACHABLE", "STALE", "DELAY", "PROBE"))

    deadline = time.monotonic() + 10
    while not resolved():
        assert time.monotonic() < deadline, "the peer never resolved the node's address"
    kubespan_tx = int(node.run("cat", "/sys/class/net/kubespan/statistics/tx_packets").stdout)
    assert kubespan_tx > 0  # the echo replies went into the tunnel (the peer is routed)
