"""KernelBackend on a real WireGuard module (runs inside the VM; see harness.py).

Two network namespaces joined by a veth, each with a kernel wireguard link configured
only through KernelBackend; `wg show dump` (wireguard-tools, an independent reader of
the same netlink API) cross-checks what the backend reports.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import os
import time
from dataclasses import dataclass, replace

import pytest
from pyroute2 import WireGuard

from control import netlab
from control.backends.base import ZERO_KEY, BackendConfigError, BackendError, PeerConfig
from control.backends.kernel import KernelBackend
from control.keys import generate_private_key, public_key
from tests import netns as nx
from tests.control.backends.cases import BAD_DEVICES
from tests.control.backends.cases import BAD_PEERS as SHARED_BAD_PEERS

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

net = ipaddress.ip_network
PORTS = (51820, 51821)


@dataclass
class Node:
    ns: netlab.Netns
    backend: KernelBackend
    link: str
    private_key: bytes
    public_key: bytes
    port: int
    outer4: str
    outer6: str
    inner4: str
    inner6: str

    def dump(self) -> list[list[str]]:
        out = nx.wg(self.ns, "show", self.link, "dump")
        return [line.split("\t") for line in out.splitlines()]

    def links(self) -> list[str]:
        out = self.ns.run("ip", "-br", "link").stdout
        return [line.split()[0].split("@")[0] for line in out.splitlines()]


def make_node(lab: nx.Lab, ns: netlab.Netns, veth: str, i: int) -> Node:
    netlab.add_address(ns, veth, f"{nx.OUTER4[i]}/24")
    netlab.add_address(ns, veth, f"{nx.OUTER6[i]}/64")
    backend = KernelBackend(netns=ns.name)
    link = netlab.unique_name("kswg", 8)
    priv = generate_private_key()
    backend.up(link, priv, PORTS[i], 0x20, 1420)
    lab.defer(backend.down)
    netlab.add_address(ns, link, f"{nx.INNER4[i]}/24")
    netlab.add_address(ns, link, f"{nx.INNER6[i]}/64")
    return Node(
        ns,
        backend,
        link,
        priv,
        public_key(priv),
        PORTS[i],
        nx.OUTER4[i],
        nx.OUTER6[i],
        nx.INNER4[i],
        nx.INNER6[i],
    )


def peer_of(node: Node, psk: bytes | None, outer: str = "4", keepalive: int = 0) -> PeerConfig:
    endpoint = (node.outer4 if outer == "4" else node.outer6, node.port)
    return PeerConfig(
        node.public_key,
        psk,
        endpoint,
        keepalive,
        (net(f"{node.inner4}/32"), net(f"{node.inner6}/128")),
    )


def make_pair(lab: nx.Lab, outer: str = "4") -> tuple[Node, Node, bytes]:
    a_ns, b_ns = lab.netns("kva"), lab.netns("kvb")
    va, vb = lab.veth(a_ns, b_ns)
    a, b = make_node(lab, a_ns, va, 0), make_node(lab, b_ns, vb, 1)
    psk = os.urandom(32)
    a.backend.apply_peers([peer_of(b, psk, outer)])
    b.backend.apply_peers([peer_of(a, psk, outer)])
    return a, b, psk


def dummy_peers(count: int, prefixes: int, first: int = 0) -> list[PeerConfig]:
    """Peers nobody answers for, each with many allowed IPs so dumps get large.

    Keepalive 0 and no route to their prefixes: the kernel never sends them a packet
    (their endpoints are in the test's own veth subnet anyway)."""
    peers = []
    for i in range(first, first + count):
        nets = tuple(net(f"10.{100 + i // 200}.{i % 200}.{j * 4}/30") for j in range(prefixes))
        peers.append(
            PeerConfig(
                public_key(generate_private_key()),
                None,
                (f"192.168.77.{i % 200 + 20}", 40000 + i),
                0,
                nets + (net(f"fd99::{i:x}:0/112"),),
            )
        )
    return peers


# ------------------------------------------------------------------------------ tests


def test_handshake_ping_and_peer_states(lab: nx.Lab) -> None:
    a, b, psk = make_pair(lab)
    started = time.time()
    nx.ping(a.ns, b.inner4)
    nx.ping(b.ns, a.inner6)
    states_a = a.backend.peer_states()
    dump = a.dump()
    states_a2 = a.backend.peer_states()
    assert set(states_a) == {b.public_key}
    s = states_a[b.public_key]
    assert s.endpoint == (b.outer4, b.port)
    assert s.last_handshake is not None and started - 2 <= s.last_handshake <= time.time() + 2
    assert s.rx_bytes > 0 and s.tx_bytes > 0
    # wireguard-tools reads the same kernel state: columns are
    # pubkey psk endpoint allowed-ips latest-handshake rx tx keepalive
    row = dump[1]
    assert row[2] == f"{b.outer4}:{b.port}"
    assert int(row[4]) == int(s.last_handshake)
    assert s.rx_bytes <= int(row[5]) <= states_a2[b.public_key].rx_bytes
    assert s.tx_bytes <= int(row[6]) <= states_a2[b.public_key].tx_bytes
    # The other side saw the same handshake and counts the same bytes the other way.
    sb = b.backend.peer_states()[a.public_key]
    assert sb.endpoint == (a.outer4, a.port)
    assert sb.last_handshake is not None and abs(sb.last_handshake - s.last_handshake) < 5
    # Configuration reads back exactly as applied (psk included, never echoed anywhere).
    assert a.backend.device_peers() == {b.public_key: peer_of(b, psk)}
    assert a.backend.read_device().listen_port == a.port
    assert a.backend.read_device().fwmark == 0x20
    assert a.backend.read_device().public_key == a.public_key
    link = a.ns.run("ip", "-d", "link", "show", a.link).stdout
    assert "mtu 1420" in link and "wireguard" in link and ",UP" in link


def test_ipv6_outer_endpoints(lab: nx.Lab) -> None:
    a, b, _ = make_pair(lab, outer="6")
    nx.ping(a.ns, b.inner4)
    assert a.backend.peer_states()[b.public_key].endpoint == (b.outer6, b.port)
    assert b.backend.peer_states()[a.public_key].endpoint == (a.outer6, a.port)


def test_many_peers_dump_is_merged(lab: nx.Lab) -> None:
    a, b, psk = make_pair(lab)
    others = dummy_peers(60, 24)
    # One peer with more allowed IPs than one netlink message holds: it must be cut.
    big = replace(
        others[0],
        allowed_ips=others[0].allowed_ips
        + tuple(net(f"10.250.{j // 250}.{j % 250}/32") for j in range(800)),
    )
    wanted = [peer_of(b, psk), big, *others[1:]]
    a.backend.apply_peers(wanted)
    with WireGuard(netns=a.ns.name) as wg:
        messages = wg.info(a.link)
    assert len(messages) > 1, "the dump should span several netlink messages"
    # Some peer is cut across two messages (its allowed IPs continue in the next one).
    keys_per_message = [
        {p.get_attr("WGPEER_A_PUBLIC_KEY") for p in m.get_attr("WGDEVICE_A_PEERS") or ()}
        for m in messages
    ]
    assert any(x & y for x, y in itertools.pairwise(keys_per_message))
    got = a.backend.device_peers()
    assert got == {p.public_key: p for p in wanted}
    assert len(a.backend.peer_states()) == 61
    rows = a.dump()[1:]
    assert len(rows) == 61
    assert sum(len(r[3].split(",")) for r in rows) == 2 + 60 * 25 + 800
    nx.ping(a.ns, b.inner4)
    # Shrinking removes exactly the dropped peers.
    a.backend.apply_peers(wanted[:11])
    assert set(a.backend.device_peers()) == {p.public_key for p in wanted[:11]}
    nx.ping(a.ns, b.inner4)


def test_diff_apply_keeps_sessions(lab: nx.Lab, caplog: pytest.LogCaptureFixture) -> None:
    a, b, psk = make_pair(lab)
    nx.ping(a.ns, b.inner4)
    before = a.backend.peer_states()[b.public_key]
    assert before.last_handshake is not None
    # The same configuration again: nothing is written.
    with caplog.at_level(logging.INFO, logger="control.backends.kernel"):
        caplog.clear()
        a.backend.apply_peers([peer_of(b, psk)])
    assert not [r for r in caplog.records if "changed" in r.getMessage()]
    # New peers around it, and the live peer itself changed in place (more allowed
    # IPs, a keepalive): its session and counters survive, no new handshake needed.
    extra = dummy_peers(5, 2)
    changed = replace(
        peer_of(b, psk),
        persistent_keepalive=7,
        allowed_ips=peer_of(b, psk).allowed_ips + (net("10.55.0.0/16"),),
    )
    with caplog.at_level(logging.INFO, logger="control.backends.kernel"):
        caplog.clear()
        a.backend.apply_peers([changed, *extra])
    assert any("6 peers added or changed" in r.getMessage() for r in caplog.records)
    after = a.backend.peer_states()[b.public_key]
    assert after.last_handshake == before.last_handshake
    assert after.rx_bytes >= before.rx_bytes and after.tx_bytes >= before.tx_bytes
    assert a.backend.device_peers()[b.public_key] == changed
    a.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "2", b.inner4)
    assert a.backend.peer_states()[b.public_key].last_handshake == before.last_handshake
    # Removing the extras leaves the live peer alone too.
    with caplog.at_level(logging.INFO, logger="control.backends.kernel"):
        caplog.clear()
        a.backend.apply_peers([changed])
    assert any("0 peers added or changed, 5 removed" in r.getMessage() for r in caplog.records)
    assert a.backend.peer_states()[b.public_key].last_handshake == before.last_handshake
    # A new endpoint for the live peer is written; the session keeps going.
    moved = replace(changed, endpoint=(b.outer6, b.port))
    a.backend.apply_peers([moved])
    assert a.backend.peer_states()[b.public_key].endpoint == (b.outer6, b.port)
    a.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "2", b.inner4)
    # Endpoint None keeps whatever the kernel has (it may have roamed).
    a.backend.apply_peers([replace(moved, endpoint=None)])
    assert a.backend.peer_states()[b.public_key].endpoint == (b.outer6, b.port)
    # Dropping the preshared key is a change the kernel sees.
    a.backend.apply_peers([replace(moved, preshared_key=None)])
    assert a.backend.device_peers()[b.public_key].preshared_key is None


BAD_PEERS = {
    "short-key": lambda p: replace(p, public_key=b"short"),
    "short-psk": lambda p: replace(p, preshared_key=bytes(31)),
    "endpoint-ip": lambda p: replace(p, endpoint=("not-an-ip", 1)),
    "endpoint-port": lambda p: replace(p, endpoint=("10.0.0.1", 0)),
    "keepalive-high": lambda p: replace(p, persistent_keepalive=70000),
    "keepalive-negative": lambda p: replace(p, persistent_keepalive=-1),
    "allowed-ip-str": lambda p: replace(p, allowed_ips=("10.0.0.0/8",)),
}


def test_bad_peer_changes_nothing(lab: nx.Lab) -> None:
    # One pair for every case: building a pair is the slow part in the VM.
    a, b, psk = make_pair(lab)
    before = a.backend.device_peers()
    good_extra = dummy_peers(1, 1)[0]
    for name, bad in BAD_PEERS.items():
        with pytest.raises(BackendConfigError) as info:
            a.backend.apply_peers([good_extra, bad(peer_of(b, psk))])
        assert psk.hex() not in str(info.value), name
        assert a.backend.device_peers() == before, name


def test_duplicate_and_overlapping_peers_rejected(lab: nx.Lab) -> None:
    a, b, psk = make_pair(lab)
    before = a.backend.device_peers()
    p = peer_of(b, psk)
    with pytest.raises(BackendConfigError, match="twice"):
        a.backend.apply_peers([p, p])
    other = dummy_peers(1, 1)[0]
    with pytest.raises(BackendConfigError, match="already belongs"):
        a.backend.apply_peers([p, replace(other, allowed_ips=p.allowed_ips[:1])])
    assert a.backend.device_peers() == before


def test_up_rejects_bad_arguments_without_leftovers(lab: nx.Lab) -> None:
    ns = lab.netns("kvx")
    backend = KernelBackend(netns=ns.name)
    key = generate_private_key()
    for args in [
        ("bad/name", key, 1, 0, 1420),
        ("x" * 16, key, 1, 0, 1420),
        ("kswgok", key[:5], 1, 0, 1420),
        ("kswgok", key, 70000, 0, 1420),
        ("kswgok", key, 1, -1, 1420),
        ("kswgok", key, 1, 0, 1000),
    ]:
        with pytest.raises(BackendConfigError):
            backend.up(*args)
    assert ns.run("ip", "-br", "link").stdout.split()[0] == "lo"
    assert len(ns.run("ip", "-br", "link").stdout.splitlines()) == 1


def test_refuses_what_the_userspace_backend_refuses(lab: nx.Lab) -> None:
    """The table tests/control/backends/test_parity.py runs against the userspace
    backend: the same refusals, word for word, and nothing reaches the kernel."""
    a, b, psk = make_pair(lab)
    before = a.backend.device_peers()
    for name, (peers, message) in SHARED_BAD_PEERS.items():
        with pytest.raises(BackendConfigError) as info:
            a.backend.apply_peers(peers())
        assert str(info.value) == message, name
    assert a.backend.device_peers() == before
    for name, (args, message) in BAD_DEVICES.items():
        with pytest.raises(BackendConfigError) as info:
            a.backend.up(*args)
        assert str(info.value) == message, name
    assert a.backend.link == a.link and a.link in a.links()


def test_zero_psk_is_no_psk(lab: nx.Lab, caplog: pytest.LogCaptureFixture) -> None:
    a, b, psk = make_pair(lab)
    a.backend.apply_peers([peer_of(b, ZERO_KEY)])
    assert a.dump()[1][1] == "(none)"  # wg show dump: the peer's preshared key column
    assert a.backend.device_peers()[b.public_key].preshared_key is None
    # The zero key and None are one and the same: applying None writes nothing.
    with caplog.at_level(logging.INFO, logger="control.backends.kernel"):
        caplog.clear()
        a.backend.apply_peers([peer_of(b, None)])
    assert not [r for r in caplog.records if "changed" in r.getMessage()]


def test_up_failure_removes_the_link_it_made(lab: nx.Lab) -> None:
    ns = lab.netns("kvp")
    first = KernelBackend(netns=ns.name)
    first.up(netlab.unique_name("kswg", 8), generate_private_key(), 51830, 0, 1420)
    lab.defer(first.down)
    second = KernelBackend(netns=ns.name)
    name = netlab.unique_name("kswg", 8)
    with pytest.raises(BackendError, match="Address already in use"):
        second.up(name, generate_private_key(), 51830, 0, 1420)
    assert name not in ns.run("ip", "-br", "link").stdout
    # A name taken by another kind of link is refused, and that link is left alone.
    with pytest.raises(BackendError, match="not wireguard"):
        second.up("lo", generate_private_key(), 51831, 0, 1420)
    assert "lo" in ns.run("ip", "-br", "link").stdout


def test_up_adopts_existing_link_with_its_sessions(lab: nx.Lab) -> None:
    a, b, psk = make_pair(lab)
    nx.ping(a.ns, b.inner4)
    before = a.backend.peer_states()[b.public_key]
    # A restarted agent: a fresh backend object over the same link keeps the peers.
    again = KernelBackend(netns=a.ns.name)
    again.up(a.link, a.private_key, a.port, 0x20, 1420)
    again.apply_peers([peer_of(b, psk)])
    assert again.peer_states()[b.public_key].last_handshake == before.last_handshake
    a.ns.run("ping", "-c", "1", "-W", "2", b.inner4)


def test_down_leaves_nothing(lab: nx.Lab) -> None:
    a, b, _ = make_pair(lab)
    a.backend.apply_peers(dummy_peers(3, 2))
    assert a.link in a.links()
    a.backend.down()
    assert a.link not in a.links()
    assert not [n for n in a.links() if n.startswith("kswg")]
    a.backend.down()  # idempotent
    with pytest.raises(BackendError, match="not up"):
        a.backend.peer_states()
    with pytest.raises(BackendError, match="not up"):
        a.backend.apply_peers([])
