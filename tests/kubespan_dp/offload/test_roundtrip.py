"""Round trips with Hypothesis: a super-packet split by gso_split and coalesced by
gro_coalesce comes back byte for byte; any mix of packets coalesced and split again
gives every flow's packets back unchanged and in order."""

from __future__ import annotations

import os
from collections import defaultdict

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kubespan_dp import _offload as ofl
from tests.kubespan_dp.offload.packets import (
    ACK,
    CWR,
    ECE,
    F_NEEDS_CSUM,
    FIN,
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    PSH,
    SYN,
    TCP,
    UDP,
    Flow,
    assert_valid,
    ip_header_len,
    set_l4_checksum,
    super_packet,
    timestamps,
    vnet,
)


@settings(max_examples=200, deadline=None)
@given(
    v6=st.booleans(),
    udp=st.booleans(),
    ts=st.booleans(),
    gso=st.integers(1, 1500),
    nseg=st.integers(2, 64),
    last=st.integers(1, 1500),
    flags=st.sampled_from([ACK, ACK | PSH, ACK | CWR, ACK | ECE, ACK | CWR | ECE | PSH]),
    seq=st.integers(0, 2**32 - 1),
    ident=st.integers(0, 0xFFFF),
)
def test_split_then_coalesce_gives_the_super_packet_back(
    v6: bool,
    udp: bool,
    ts: bool,
    gso: int,
    nseg: int,
    last: int,
    flags: int,
    seq: int,
    ident: int,
) -> None:
    last = min(last, gso)
    n = gso * (nseg - 1) + last
    assume((40 if v6 else 20) + (8 if udp else 20 + 12 * ts) + n <= 65535)
    data = os.urandom(n)
    f = Flow(v6=v6, proto=UDP if udp else TCP)
    ihl = 40 if v6 else 20
    if udp:
        whole = f.udp(data, ident=ident)
        hlen, gso_type, off = ihl + 8, GSO_UDP_L4, 6
    else:
        options = timestamps() if ts else b""
        whole = f.tcp(seq, data, flags, options=options, ident=ident)
        hlen, off = ihl + 20 + len(options), 16
        gso_type = GSO_TCPV6 if v6 else GSO_TCPV4
        if flags & CWR:
            gso_type |= GSO_ECN
    pkt = super_packet([whole])
    hdr = vnet(F_NEEDS_CSUM, gso_type, hlen, gso, ihl, off)
    segs = ofl.segment(hdr, pkt, hlen + gso)
    assert len(segs) == nseg
    for s in segs:
        assert_valid(s)
    assert ofl.coalesce(segs, uso=True) == [(hdr, pkt)]


def _flow_key(p: bytes) -> tuple[bytes, ...]:
    ihl = ip_header_len(p)
    if p[0] >> 4 == 6:
        return (p[8:40], p[6:7], p[ihl : ihl + 4])
    return (p[12:20], p[9:10], p[ihl : ihl + 4])


MUTATIONS = ["none"] * 12 + ["gap", "psh", "fin", "syn", "ttl", "bad", "short", "cwr"]


@st.composite
def traffic(draw: st.DrawFn) -> list[bytes]:
    """Packets of a few flows, interleaved, mostly coalescable, some not."""
    flows = [Flow(sport=1), Flow(v6=True, sport=2), Flow(proto=UDP, sport=3), Flow(sport=4)]
    seq = [draw(st.integers(0, 2**32 - 1)) for _ in flows]
    ident = [0] * len(flows)
    out = []
    for _ in range(draw(st.integers(1, 80))):
        k = draw(st.integers(0, len(flows) - 1))
        f = flows[k]
        size = draw(st.sampled_from([1200, 1200, 1200, 700, 1]))
        m = draw(st.sampled_from(MUTATIONS))
        payload = os.urandom(size // 2 if m == "short" else size)
        if m == "gap":
            seq[k] += 1
        ttl = 63 if m == "ttl" else 64
        if f.proto == UDP:
            p = f.udp(payload, ident=ident[k], ttl=ttl)
        else:
            flags = {"psh": ACK | PSH, "fin": ACK | FIN, "syn": SYN, "cwr": ACK | CWR}
            p = f.tcp(seq[k], payload, flags.get(m, ACK), ident=ident[k], ttl=ttl)
            seq[k] = (seq[k] + len(payload)) % 2**32
        if m == "bad":
            p = set_l4_checksum(p, 0x0102)
        ident[k] = (ident[k] + 1) % 0x10000
        out.append(p)
    return out


@settings(max_examples=300, deadline=None)
@given(pkts=traffic(), uso=st.booleans())
def test_coalesce_then_split_keeps_every_flow_in_order(pkts: list[bytes], uso: bool) -> None:
    out = ofl.coalesce(pkts, uso=uso)
    assert len(out) <= len(pkts)
    back: dict[tuple[bytes, ...], list[bytes]] = defaultdict(list)
    for hdr, p in out:
        if hdr == bytes(10):
            back[_flow_key(p)].append(p)
            continue
        _, gso_type, hdr_len, gso_size, _, _ = ofl.parse_vnet_header(hdr)
        assert uso or gso_type != GSO_UDP_L4
        for s in ofl.segment(hdr, p, hdr_len + gso_size, max_segments=128):
            back[_flow_key(s)].append(s)
    want: dict[tuple[bytes, ...], list[bytes]] = defaultdict(list)
    for p in pkts:
        want[_flow_key(p)].append(p)
    assert back == want
