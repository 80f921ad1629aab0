"""UDP GRO batches of any size: 32 GSO super-datagrams of 128 transport messages
each (4096 segments, twice what the C loop holds before writing to TUN) reach one
PacketLoop in a burst; every inner packet is delivered and nothing is written past
a buffer (scripts/asan.sh runs this in-process under AddressSanitizer)."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from kubespan_dp import _batch as bt
from kubespan_dp import _fastpath as fp
from tests import netns
from tests.kubespan_dp.fastpath.test_loop import INNER, OUTER, PORT, Side, _wait
from tests.kubespan_dp.wgpair import ipv4_packet

pytestmark = pytest.mark.netns

UDP_SEGMENT = 103
SO_RCVBUFFORCE = 33


def _udp4(src: str, dst: str, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 9, 9, 8 + len(payload), 0)
    return ipv4_packet(src, dst, udp + payload)


def test_gro_burst_of_4096_segments(lab: netns.Lab) -> None:
    a_ns, b_ns = lab.netns("kga"), lab.netns("kgb")
    va, vb = lab.veth(a_ns, b_ns)
    netns.add_address(a_ns, va, f"{OUTER[0]}/24")
    netns.add_address(b_ns, vb, f"{OUTER[1]}/24")
    b = Side(lab, b_ns, 1)
    b.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    k1, k2 = os.urandom(32), os.urandom(32)
    now = time.monotonic()
    b.loop.set_keypairs(0, fp.Keypair(k2, k1, 0x2222, 0x1111, created=now), None)
    seal = bt.AEADKey(k1)
    # the loop's threads wait until the whole burst is queued on the socket: its
    # first receive then gets all 32 messages (4096 segments) in one batch
    b.loop.stop()
    with a_ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((OUTER[0], PORT))
        counter = 0
        for _ in range(32):
            msgs = []
            for _ in range(128):
                inner = _udp4(INNER[0], INNER[1], bytes(4))  # 32 bytes: no padding
                msgs.append(struct.pack("<IIQ", 4, 0x2222, counter) + seal.seal(counter, inner))
                counter += 1
            seg = len(msgs[0])
            s.sendmsg(
                [b"".join(msgs)],
                [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", seg))],
                0,
                (OUTER[1], PORT),
            )
        b.loop.start()
        try:
            _wait(lambda: b.loop.rx_packets >= 4096, timeout=15)
        except AssertionError:
            raise AssertionError((b.loop.rx_packets, b.loop.drops())) from None
    finally:
        s.close()
    assert b.loop.rx_packets == 4096
    drops = b.loop.drops()
    assert not {"replay", "decrypt_failed", "udp_truncated"} & set(drops), drops
