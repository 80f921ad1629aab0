"""PacketLoop on its own: two namespaces, a TUN device and a UDP socket in each, the
C loops joined with hand-installed keypairs (no core).  Real packets, real kernel."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from control import netlab
from kubespan_dp import _fastpath as fp
from kubespan_dp.tun import Tun
from tests import netns

pytestmark = pytest.mark.netns

OUTER = ("192.168.78.1", "192.168.78.2")
INNER = ("10.78.0.1", "10.78.0.2")
PORT = 51820


class Side:
    def __init__(self, lab: netns.Lab, ns: netlab.Netns, i: int, offload: bool = False) -> None:
        self.ns = ns
        with ns.entered():
            self.tun = Tun(netlab.unique_name("kf", 6), offload=offload)
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO, as the device
            self.sock.bind(("0.0.0.0", PORT))
            self.sock.setblocking(False)
            self.tun.set_up()
        lab.defer(self.close)
        ns.run("ip", "addr", "add", f"{INNER[i]}/24", "dev", self.tun.name)
        uso = {"uso4", "uso6"} <= self.tun.offloads
        self.loop = fp.PacketLoop(
            self.tun.fd, self.sock.fileno(), -1, 1420, vnet_hdr=self.tun.vnet_hdr, uso=uso
        )
        self.loop.add_peer(0)
        self.loop.set_endpoint(0, (OUTER[1 - i], PORT))
        self.loop.set_allowed_ips([(socket.inet_aton(INNER[1 - i]), 32, 0)])
        self.loop.start()

    def close(self) -> None:
        self.loop.stop()
        self.sock.close()
        self.tun.close()


def _pair(lab: netns.Lab, offload: bool = False) -> tuple[Side, Side]:
    a, b = lab.netns("kfa"), lab.netns("kfb")
    va, vb = lab.veth(a, b)
    netlab.add_address(a, va, f"{OUTER[0]}/24")
    netlab.add_address(b, vb, f"{OUTER[1]}/24")
    return Side(lab, a, 0, offload), Side(lab, b, 1, offload)


@pytest.fixture
def pair(lab: netns.Lab) -> tuple[Side, Side]:
    return _pair(lab)


def _keys(a: Side, b: Side, now: float | None = None) -> tuple[fp.Keypair, fp.Keypair]:
    k1, k2 = os.urandom(32), os.urandom(32)
    now = time.monotonic() if now is None else now
    ka = fp.Keypair(k1, k2, 0x1111, 0x2222, is_initiator=True, created=now)
    kb = fp.Keypair(k2, k1, 0x2222, 0x1111, created=now)
    a.loop.set_keypairs(0, ka, None)
    b.loop.set_keypairs(0, kb, None)
    return ka, kb


def _wait(pred, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_ping_and_bulk_tcp_through_the_c_loop(pair: tuple[Side, Side]) -> None:
    a, b = pair
    _keys(a, b)
    netns.ping(a.ns, INNER[1], count=3)
    # 20 MB over TCP, checksummed at both ends
    sent, got, _ = netns.tcp_transfer(b.ns, a.ns, INNER[1], 20 << 20)
    assert sent == got
    tx, rx, *_, flags = a.loop.peer_stats(0)
    assert tx > 20 << 20 and rx > 0 and flags & fp.FLAG_ACTIVITY
    # (the kernel's own IPv6 chatter on a fresh link has no route: "no_route")
    for side in (a, b):
        assert set(side.loop.drops()) <= {"no_route"}, side.loop.drops()
    assert a.loop.take_slow() == [] and b.loop.take_slow() == []


def test_offloads_and_crypto_lanes(lab: netns.Lab) -> None:
    """With a virtio header on both TUNs: TSO super-packets split, decrypted segments
    coalesced, nothing dropped; the crypto-lane helpers take a share of the cipher
    work in both directions (with more than one lane)."""
    a, b = _pair(lab, offload=True)
    assert a.loop.vnet_hdr and b.loop.vnet_hdr
    _keys(a, b)
    netns.ping(a.ns, INNER[1], count=3)

    def transfer_until_shared() -> bool:
        sent, got, _ = netns.tcp_transfer(b.ns, a.ns, INNER[1], 20 << 20)
        assert sent == got
        return fp.crypto_lanes() == 1 or (
            a.loop.crypto_shared[0] > 0 and b.loop.crypto_shared[1] > 0
        )

    _wait(transfer_until_shared, timeout=60)
    if fp.crypto_lanes() == 1:
        assert a.loop.crypto_shared == b.loop.crypto_shared == (0, 0)
    assert b.loop.rx_packets >= (20 << 20) // 1400
    for side in (a, b):
        assert set(side.loop.drops()) <= {"no_route"}, side.loop.drops()
    assert a.loop.take_slow() == [] and b.loop.take_slow() == []


def test_no_keypair_goes_to_the_slow_queue(pair: tuple[Side, Side]) -> None:
    a, b = pair
    a.ns.run("ping", "-c", "1", "-W", "1", INNER[1], check=False)
    items = _wait(a.loop.take_slow)
    kind, data, addr, peer, _local = items[0]
    assert (kind, addr, peer) == (fp.SLOW_PACKET, None, 0)
    assert data[0] >> 4 == 4 and socket.inet_ntoa(data[16:20]) == INNER[1]


def test_handshake_datagrams_go_to_their_own_queue_with_their_source(pair) -> None:
    a, b = pair
    with a.ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((OUTER[0], 40000))
        msg = struct.pack("<I", 1) + os.urandom(144)
        s.sendto(msg, (OUTER[1], PORT))
        items = _wait(b.loop.take_handshakes)
    finally:
        s.close()
    assert items == [(msg, (OUTER[0], 40000), (socket.inet_aton(OUTER[1]), 0))]
    assert b.loop.take_slow() == []


def test_c_drops_by_size_type_and_index(pair) -> None:
    """wireguard-go's socket reader drops these; so does C, counted per reason,
    and none of them reaches Python.  Data on an index Python pushed does."""
    a, b = pair
    _keys(a, b)
    junk = [
        b"",  # empty
        b"\x01\x00",  # short
        struct.pack("<I", 1) + bytes(100),  # initiation of the wrong size
        struct.pack("<I", 2) + bytes(87),  # response of the wrong size
        struct.pack("<I", 3) + bytes(61),  # cookie reply of the wrong size
        struct.pack("<I", 4) + bytes(20),  # transport shorter than header + tag
        struct.pack("<I", 9) + bytes(60),  # no such type
        struct.pack("<I", 0x101) + bytes(144),  # reserved bytes set
        struct.pack("<IIQ", 4, 0x5555, 1) + bytes(32),  # an index nobody has
    ]
    with a.ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for msg in junk:
            s.sendto(msg, (OUTER[1], PORT))
        want = {"invalid_size": 6, "invalid_type": 2, "unknown_index": 1}
        _wait(lambda: all(b.loop.drops().get(k, 0) >= n for k, n in want.items()))
        assert b.loop.take_slow() == [] and b.loop.take_handshakes() == []
        # the core's not-yet-confirmed session: Python pushed its index
        b.loop.set_pending([0x5555])
        pending = struct.pack("<IIQ", 4, 0x5555, 2) + bytes(32)
        s.sendto(pending, (OUTER[1], PORT))
        items = _wait(b.loop.take_slow)
        assert [i[1] for i in items] == [pending]
    finally:
        s.close()
    drops = b.loop.drops()
    assert {k: drops.get(k) for k in want} == want, drops


def test_wrong_source_and_forged_packets_dropped_and_endpoint_roams(pair) -> None:
    a, b = pair
    ka, kb = _keys(a, b)
    netns.ping(a.ns, INNER[1], count=1)
    # B no longer routes A's inner address to A: A's packets fail the source check
    b.loop.set_allowed_ips([(socket.inet_aton("10.99.0.0"), 16, 0)])
    a.ns.run("ping", "-c", "2", "-W", "1", INNER[1], check=False)
    _wait(lambda: b.loop.drops().get("source_not_allowed", 0) >= 2)
    # forged transport message on B's live index: counted, not delivered
    with a.ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(struct.pack("<IIQ", 4, 0x2222, 999) + os.urandom(64), (OUTER[1], PORT))
        _wait(lambda: b.loop.drops().get("decrypt_failed", 0) >= 1)
    finally:
        s.close()
    # roaming: B learns A's new source address from authenticated packets
    b.loop.set_allowed_ips([(socket.inet_aton(INNER[0]), 32, 0)])
    b.loop.set_endpoint(0, ("192.168.78.3", PORT))  # a stale, wrong endpoint
    netns.ping(a.ns, INNER[1], count=2)
    assert b.loop.get_endpoint(0) == (OUTER[0], PORT)
    assert b.loop.peer_stats(0)[-1] & fp.FLAG_ENDPOINT


def test_expired_keypair_not_used(pair) -> None:
    a, b = pair
    _keys(a, b, now=time.monotonic() - 181)
    a.ns.run("ping", "-c", "1", "-W", "1", INNER[1], check=False)
    items = _wait(a.loop.take_slow)
    assert items[0][0] == fp.SLOW_PACKET


def test_bad_configuration_rejected(pair) -> None:
    a, _ = pair
    with pytest.raises(ValueError):
        a.loop.set_allowed_ips([(b"\x01\x02\x03", 8, 0)])
    with pytest.raises(ValueError):
        a.loop.set_allowed_ips([(socket.inet_aton("10.0.0.0"), 33, 0)])
    with pytest.raises(ValueError):
        a.loop.add_peer(10**7)
    with pytest.raises(ValueError):
        a.loop.set_keypairs(5, None, None)  # not an active peer
    with pytest.raises(ValueError):
        fp.PacketLoop(-1, -1, -1, 70000)
    # the routing table is unchanged by the rejected calls
    assert (
        a.loop.route(socket.inet_aton("0.0.0.0") * 4 + socket.inet_aton(INNER[1]) + bytes(8)) == -1
    )


def test_jumbo_mtu_followed(pair) -> None:
    a, b = pair
    _keys(a, b)
    for side in (a, b):
        side.ns.run("ip", "link", "set", side.tun.name, "mtu", "4000")
        side.loop.set_mtu(4000)
    a.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do", "-s", "3900", INNER[1])
    assert "too_big" not in a.loop.drops() and "too_big" not in b.loop.drops()
