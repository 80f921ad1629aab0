"""Our daemon against wireguard-go and against itself, configured with stock `wg`.

Each scenario runs against both wireguard-go builds (control.netlab.wggo: the modern
one with offloads, "wggo-modern", and bookworm's old one, "wggo-old") and against
ours; the first host (`a`) is always ours.
"""

from __future__ import annotations

import base64
import os
import time

import pytest

from control import netlab
from tests import netns
from tests.netns import INNER4, INNER6, OUTER4

pytestmark = pytest.mark.netns

WGGO = list(netns.WGGO_KINDS)
WGGO_IDS = [netns.WGGO_IDS[k] for k in WGGO]
PAIRS = [("kubespan-wg", k) for k in WGGO] + [("kubespan-wg", "kubespan-wg")]
PAIR_IDS = [f"ours-{i}" for i in WGGO_IDS] + ["ours-ours"]
TRANSFER_BYTES = 100 * 1000 * 1000


def peer_row(host: netns.WgHost, public_key: str) -> list[str]:
    """The dump row of one peer: key psk endpoint allowed handshake rx tx keepalive."""
    for row in host.dump()[1:]:
        if row[0] == public_key:
            return row
    raise AssertionError(f"{host.ifname} has no peer {public_key}")


@pytest.mark.parametrize("kinds", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("outer", ["4", "6"])
def test_handshake_and_ping_both_families(
    lab: netns.Lab, kinds: tuple[str, str], outer: str
) -> None:
    start = time.time()
    a, b = netns.build_pair(lab, *kinds, outer=outer)
    netns.ping(a.ns, INNER4[1])
    netns.ping(a.ns, INNER6[1])
    netns.ping(b.ns, INNER4[0])
    netns.ping(b.ns, INNER6[0])
    for host, other in ((a, b), (b, a)):
        row = peer_row(host, other.public_key)
        handshake = int(row[4])
        assert start - 2 <= handshake <= time.time() + 2, row
        assert int(row[5]) > 0 and int(row[6]) > 0, row
        expected = (
            f"{OUTER4[1 if host is a else 0]}:{other.port}"
            if outer == "4"
            else f"[{netns.OUTER6[1 if host is a else 0]}]:{other.port}"
        )
        assert row[2] == expected

    # both sides count whole UDP payloads: what one sent, the other received
    def balanced() -> bool:
        ra, rb = peer_row(a, b.public_key), peer_row(b, a.public_key)
        return ra[5] == rb[6] and ra[6] == rb[5]

    netlab.wait_until(balanced, timeout=15, what="tx/rx counters to match across the pair")


@pytest.mark.parametrize("kinds", PAIRS, ids=PAIR_IDS)
def test_tcp_transfer_100mb(lab: netns.Lab, kinds: tuple[str, str]) -> None:
    a, b = netns.build_pair(lab, *kinds)
    netns.ping(a.ns, INNER4[1])
    for server, client, ip in ((b, a, INNER4[1]), (a, b, INNER4[0])):
        sent, got, seconds = netns.tcp_transfer(server.ns, client.ns, ip, TRANSFER_BYTES)
        assert sent == got
        print(
            f"{client.daemon.kind} -> {server.daemon.kind}: {TRANSFER_BYTES / 1e6:.0f} MB in "
            f"{seconds:.1f} s = {TRANSFER_BYTES * 8 / seconds / 1e6:.0f} Mbit/s"
        )
    assert a.daemon.alive() and b.daemon.alive()


@pytest.mark.parametrize("kinds", PAIRS, ids=PAIR_IDS)
def test_preshared_key(lab: netns.Lab, kinds: tuple[str, str]) -> None:
    psk = base64.b64encode(os.urandom(32)).decode()
    a, b = netns.build_pair(lab, *kinds, psk=psk)
    netns.ping(a.ns, INNER4[1])
    assert peer_row(a, b.public_key)[1] == psk
    # a different key on b; a forgets its session and must make a new handshake
    keys = lab.tempdir()
    (keys / "other").write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    (keys / "same").write_text(psk + "\n")
    b.wg("set", b.ifname, "peer", a.public_key, "preshared-key", str(keys / "other"))
    a.wg("set", a.ifname, "peer", b.public_key, "remove")
    a.set_peer(
        b,
        f"{INNER4[1]}/32,{INNER6[1]}/128",
        f"{OUTER4[1]}:{b.port}",
        "preshared-key",
        str(keys / "same"),
    )
    r = a.ns.run("ping", "-c", "3", "-i", "0.3", "-W", "1", INNER4[1], check=False)
    assert r.returncode != 0, "a handshake with mismatched preshared keys must fail"
    assert peer_row(a, b.public_key)[4] == "0"


@pytest.mark.parametrize("kinds", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("mover", ["ours", "other"])
def test_roaming(lab: netns.Lab, kinds: tuple[str, str], mover: str) -> None:
    a, b = netns.build_pair(lab, *kinds)
    netns.ping(a.ns, INNER4[1])
    still, moving = (b, a) if mover == "ours" else (a, b)
    # a new listen port: the other side follows the source of authenticated packets
    moving.wg("set", moving.ifname, "listen-port", "40000")
    netns.ping(moving.ns, INNER4[0] if moving is b else INNER4[1])
    ip_now = OUTER4[1] if moving is b else OUTER4[0]
    assert peer_row(still, moving.public_key)[2] == f"{ip_now}:40000"
    # a new address: the old one is deleted, so the sender must pick the new one
    new_ip = "192.168.77.9"
    moving.ns.run("ip", "addr", "del", f"{ip_now}/24", "dev", moving.veth)
    netlab.add_address(moving.ns, moving.veth, f"{new_ip}/24")
    netns.ping(moving.ns, INNER4[0] if moving is b else INNER4[1])
    assert peer_row(still, moving.public_key)[2] == f"{new_ip}:40000"
    netns.ping(still.ns, INNER6[1] if moving is b else INNER6[0])


@pytest.mark.parametrize("kinds", PAIRS, ids=PAIR_IDS)
def test_peer_removed_and_readded(lab: netns.Lab, kinds: tuple[str, str]) -> None:
    a, b = netns.build_pair(lab, *kinds)
    netns.ping(a.ns, INNER4[1])
    a.wg("set", a.ifname, "peer", b.public_key, "remove")
    assert len(a.dump()) == 1
    r = a.ns.run("ping", "-c", "2", "-W", "1", INNER4[1], check=False)
    assert r.returncode != 0
    a.set_peer(b, f"{INNER4[1]}/32,{INNER6[1]}/128", f"{OUTER4[1]}:{b.port}")
    netns.ping(a.ns, INNER4[1])
    netns.ping(b.ns, INNER6[0])


@pytest.mark.parametrize("kinds", PAIRS, ids=PAIR_IDS)
def test_other_peers_changes_leave_session_alone(lab: netns.Lab, kinds: tuple[str, str]) -> None:
    """Adding, changing and removing another peer, and a syncconf of the same config,
    do not disturb an established session (no new handshake, traffic keeps flowing)."""
    a, b = netns.build_pair(lab, *kinds)
    netns.ping(a.ns, INNER4[1])
    before = peer_row(a, b.public_key)[4]
    _, other = netns.genkey(a.ns)
    a.wg(
        "set", a.ifname, "peer", other, "allowed-ips", "10.99.0.0/16", "endpoint", "192.168.77.50:1"
    )
    a.wg("set", a.ifname, "peer", other, "allowed-ips", "10.98.0.0/16", "persistent-keepalive", "5")
    assert len(a.dump()) == 3
    a.wg("set", a.ifname, "peer", other, "remove")
    conf = a.wg("showconf", a.ifname)
    a.wg("syncconf", a.ifname, "/dev/stdin", input=conf)
    netns.ping(a.ns, INNER4[1], count=2)
    assert peer_row(a, b.public_key)[4] == before
    assert len(a.dump()) == 2


NAT_TIMEOUT = 2


def build_nat(
    lab: netns.Lab, kinds: tuple[str, str]
) -> tuple[netns.WgHost, netns.WgHost, netlab.Netns]:
    """a (behind NAT) -- r (masquerade, short UDP conntrack timeouts) -- b (public).
    b knows no route to a's network and no endpoint for a: it can only answer through
    the NAT mapping that a's packets create."""
    na, nr, nb = lab.netns("na"), lab.netns("nr"), lab.netns("nb")
    a0, r0 = lab.veth(na, nr)
    r1, b0 = lab.veth(nr, nb)
    netlab.add_address(na, a0, "192.168.10.2/24")
    netlab.add_address(nr, r0, "192.168.10.1/24")
    netlab.add_address(nr, r1, "192.168.20.1/24")
    netlab.add_address(nb, b0, "192.168.20.2/24")
    na.run("ip", "route", "add", "default", "via", "192.168.10.1")
    nr.run(
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        f"net.netfilter.nf_conntrack_udp_timeout={NAT_TIMEOUT}",
        f"net.netfilter.nf_conntrack_udp_timeout_stream={NAT_TIMEOUT}",
    )
    nr.run(
        "nft",
        "-f",
        "-",
        input=(
            "table ip nat {\n chain post {\n"
            "  type nat hook postrouting priority 100; policy accept;\n"
            f'  oifname "{r1}" masquerade\n }}\n}}\n'
        ),
    )
    hosts = []
    for ns, kind, veth, port in ((na, kinds[0], a0, 51820), (nb, kinds[1], b0, 51821)):
        d = lab.daemon(ns, kind)
        priv, pub = netns.genkey(ns)
        hosts.append(netns.WgHost(ns, d, priv, pub, port, veth))
    a, b = hosts
    keydir = lab.tempdir()
    for i, h in enumerate(hosts):
        (keydir / f"k{i}").write_text(h.private_key + "\n")
        netlab.add_address(h.ns, h.ifname, f"{INNER4[i]}/24")
        h.ns.run("ip", "link", "set", h.ifname, "up")
    a.wg(
        "set",
        a.ifname,
        "private-key",
        str(keydir / "k0"),
        "listen-port",
        "51820",
        "peer",
        b.public_key,
        "allowed-ips",
        f"{INNER4[1]}/32",
        "endpoint",
        f"192.168.20.2:{b.port}",
        "persistent-keepalive",
        "1",
    )
    b.wg(
        "set",
        b.ifname,
        "private-key",
        str(keydir / "k1"),
        "listen-port",
        str(b.port),
        "peer",
        a.public_key,
        "allowed-ips",
        f"{INNER4[0]}/32",
    )
    return a, b, nr


@pytest.mark.parametrize(
    "kinds",
    [("kubespan-wg", k) for k in WGGO]
    + [(k, "kubespan-wg") for k in WGGO]
    + [("kubespan-wg", "kubespan-wg")],
    ids=[f"ours-behind-nat-{i}" for i in WGGO_IDS]
    + [f"{i}-behind-nat" for i in WGGO_IDS]
    + ["ours-ours"],
)
def test_keepalive_holds_nat_mapping(lab: netns.Lab, kinds: tuple[str, str]) -> None:
    a, b, _ = build_nat(lab, kinds)
    # a's keepalive alone makes the handshake: b learns a's public (NATed) endpoint
    netlab.wait_until(
        lambda: peer_row(b, a.public_key)[2].startswith("192.168.20.1:"),
        timeout=20,
        what="b to learn a's NAT endpoint",
    )
    time.sleep(3 * NAT_TIMEOUT)  # idle, apart from keepalives
    netns.ping(b.ns, INNER4[0], timeout=5)
    # control: without keepalives the mapping expires and b cannot reach a
    a.wg("set", a.ifname, "peer", b.public_key, "persistent-keepalive", "0")
    time.sleep(3 * NAT_TIMEOUT)
    r = b.ns.run("ping", "-c", "2", "-W", "1", INNER4[0], check=False)
    assert r.returncode != 0, "the NAT mapping should have expired without keepalives"


@pytest.mark.parametrize("wggo", WGGO, ids=WGGO_IDS)
@pytest.mark.parametrize("outer", ["4", "6"])
def test_replies_from_the_address_written_to(lab: netns.Lab, outer: str, wggo: str) -> None:
    """b knows ours (a) by a secondary address; a must answer from that address, or
    b (wireguard-go, which roams to the source of what it receives) would move away."""
    a, b = netns.build_pair(lab, "kubespan-wg", wggo, outer=outer)
    second = "192.168.77.11" if outer == "4" else "fd00:77::11"
    if outer == "4":
        netlab.add_address(a.ns, a.veth, f"{second}/24")
    else:  # deprecated, so the kernel would never pick it as a source by itself
        a.ns.run("ip", "addr", "add", f"{second}/64", "dev", a.veth, "nodad", "preferred_lft", "0")
    endpoint = f"{second}:{a.port}" if outer == "4" else f"[{second}]:{a.port}"
    b.wg("set", b.ifname, "peer", a.public_key, "endpoint", endpoint)
    netns.ping(b.ns, INNER4[0])
    netns.ping(a.ns, INNER6[1])
    assert peer_row(b, a.public_key)[2] == endpoint
