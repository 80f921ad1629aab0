"""RX coalescing (gro_coalesce through _offload.coalesce): which decrypted packets
become one TCP/UDP super-packet for the kernel, with what virtio header, and which
must go out alone and in order.  The wrapper checks that nothing outside each
packet's 10-byte headroom and the used part of the arena was written."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest

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
    ICMP,
    PSH,
    RST,
    SYN,
    TCP,
    UDP,
    URG,
    Flow,
    assert_valid,
    complete,
    ipv4,
    l4_payload,
    ones_sum,
    parse_tcp,
    parse_vnet,
    pseudo_sum,
    set_l4_checksum,
    super_packet,
    timestamps,
)

ZERO = bytes(10)
MSS = 1448


def stream(f: Flow, sizes: list[int], seq: int = 5000, ident: int = 100, **kw: Any) -> list[bytes]:
    """Consecutive TCP segments of flow f with these payload sizes."""
    out = []
    for k, n in enumerate(sizes):
        out.append(f.tcp(seq, os.urandom(n), ident=ident + k, **kw))
        seq += n
    return out


def resegment(hdr: bytes, pkt: bytes) -> list[bytes]:
    """A coalesced packet split again, into segments of its own gso_size."""
    _, _, hdr_len, gso_size, _, _ = parse_vnet(hdr)
    return ofl.segment(hdr, pkt, hdr_len + gso_size, max_segments=128)


def check_super(hdr: bytes, pkt: bytes, segments: list[bytes]) -> None:
    """hdr/pkt is the coalesced form of segments (checked against pure Python)."""
    v6 = pkt[0] >> 4 == 6
    ihl = 40 if v6 else 20
    proto = pkt[6] if v6 else pkt[9]
    hlen = len(segments[0]) - len(l4_payload(segments[0]))
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = parse_vnet(hdr)
    assert flags == F_NEEDS_CSUM
    if proto == TCP:
        want = GSO_TCPV6 if v6 else GSO_TCPV4
        if segments[0][ihl + 13] & CWR:
            want |= GSO_ECN
        assert (gso_type, csum_offset) == (want, 16)
    else:
        assert (gso_type, csum_offset) == (GSO_UDP_L4, 6)
    assert (hdr_len, csum_start) == (hlen, ihl)
    assert gso_size == len(l4_payload(segments[0]))
    # the packet is what the kernel would have made of the segments: the partial
    # checksum (pseudo-header sum over the whole length) in the field
    assert pkt == super_packet(segments)
    off = ihl + csum_offset
    assert struct.unpack_from("!H", pkt, off)[0] == pseudo_sum(pkt, proto, len(pkt) - ihl)
    assert_valid(complete(pkt, csum_start, csum_offset))
    # and splitting it again gives the segments back
    assert resegment(hdr, pkt) == segments


def singles(out: list[tuple[bytes, bytes]]) -> list[bytes]:
    assert all(h == ZERO for h, _ in out)
    return [p for _, p in out]


@pytest.mark.parametrize("v6", [False, True])
def test_bulk_tcp_becomes_one_super_packet(v6: bool) -> None:
    f = Flow(v6=v6)
    segs = stream(f, [MSS] * 9 + [500], options=timestamps())
    last = bytearray(segs[-1])
    ihl = 40 if v6 else 20
    last[ihl + 13] |= PSH  # PSH on the last segment joins
    segs[-1] = set_l4_checksum(bytes(last))
    out = ofl.coalesce(segs)
    assert len(out) == 1
    check_super(*out[0], segs)
    assert parse_tcp(out[0][1]).flags == ACK | PSH


def test_two_interleaved_flows_coalesce_separately() -> None:
    a, b = Flow(sport=1), Flow(sport=2)
    sa, sb = stream(a, [MSS] * 4), stream(b, [1000] * 3)
    out = ofl.coalesce([sa[0], sb[0], sa[1], sb[1], sa[2], sb[2], sa[3]])
    assert len(out) == 2
    check_super(*out[0], sa)
    check_super(*out[1], sb)


def test_other_packets_pass_through_with_a_zero_header() -> None:
    icmp = ipv4("10.81.1.2", "10.81.2.2", ICMP, b"\x08\x00" + os.urandom(30))
    syn = Flow().tcp(1, b"", SYN)
    pure_ack = Flow(sport=9).tcp(1, b"")
    udp = Flow(proto=UDP).udp(b"x" * 100)
    garbage = [b"", b"\x45", os.urandom(19), b"\x60" + bytes(30), b"\x70" + os.urandom(60)]
    pkts = [icmp, syn, pure_ack, udp, *garbage]
    assert singles(ofl.coalesce(pkts)) == pkts
    assert singles(ofl.coalesce(pkts, uso=True)) == pkts


def _runs(out: list[tuple[bytes, bytes]]) -> list[int]:
    """Segments per output (1 for a packet alone)."""
    n = []
    for h, p in out:
        n.append(1 if h == ZERO else len(resegment(h, p)))
    return n


def _edit(pkt: bytes, at: int, value: int, fix: bool = True) -> bytes:
    b = bytearray(pkt)
    b[at] = value
    if pkt[0] >> 4 == 4 and at < 20:
        struct.pack_into("!H", b, 10, 0)
        struct.pack_into("!H", b, 10, 0xFFFF ^ ones_sum(bytes(b[:20])))
    return set_l4_checksum(bytes(b)) if fix else bytes(b)


def test_sequence_gap_ends_the_run() -> None:
    f = Flow()
    s = stream(f, [MSS] * 4)
    gap = f.tcp(5000 + 5 * MSS, os.urandom(MSS), ident=104)
    assert _runs(ofl.coalesce([*s, gap])) == [4, 1]


def test_reordered_segment_is_not_merged_backwards() -> None:
    s = stream(Flow(), [MSS] * 4)
    out = ofl.coalesce([s[0], s[2], s[1], s[3]])
    # s[3] follows s[2], but s[1] came between: everything goes out as it came
    assert singles(out) == [s[0], s[2], s[1], s[3]]


@pytest.mark.parametrize(
    "what, at, value",
    [
        ("ttl", 8, 63),
        ("tos", 1, 0x10),
        ("df", 6, 0x00),
        ("ack", 28, 0x55),
        ("window", 34, 0x11),
        ("tsval", 47, 0x99),
        ("ece", 33, ACK | ECE),
    ],
)
def test_a_difference_ends_the_run(what: str, at: int, value: int) -> None:
    s = stream(Flow(), [MSS] * 4, options=timestamps())
    s[2:] = [_edit(p, at, value) for p in s[2:]]
    assert _runs(ofl.coalesce(s)) == [2, 2], what


@pytest.mark.parametrize(
    "what, at, value", [("traffic class", 1, 0x10), ("flow label", 3, 0x01), ("hop limit", 7, 1)]
)
def test_a_difference_ends_the_run_v6(what: str, at: int, value: int) -> None:
    s = stream(Flow(v6=True), [MSS] * 4)
    s[2:] = [_edit(p, at, value) for p in s[2:]]
    assert _runs(ofl.coalesce(s)) == [2, 2], what


def test_same_ece_on_every_segment_coalesces() -> None:
    s = stream(Flow(), [MSS] * 3, flags=ACK | ECE)
    out = ofl.coalesce(s)
    assert len(out) == 1
    check_super(*out[0], s)


@pytest.mark.parametrize("flag", [SYN, FIN, RST, URG])
def test_control_flags_are_never_coalesced(flag: int) -> None:
    s = stream(Flow(), [MSS] * 5)
    s[2] = _edit(s[2], 33, ACK | flag)
    out = ofl.coalesce(s)
    assert _runs(out) == [2, 1, 2]
    assert out[1] == (ZERO, s[2])


def test_fin_after_data_keeps_its_place() -> None:
    f = Flow()
    s = stream(f, [MSS] * 3)
    fin = f.tcp(5000 + 3 * MSS, b"", ACK | FIN, ident=103)
    more = f.tcp(5000 + 3 * MSS + 1, os.urandom(10), ident=104)
    out = ofl.coalesce([*s, fin, more])
    assert _runs(out) == [3, 1, 1]
    assert out[1][1] == fin and out[2][1] == more


def test_psh_ends_the_run_and_is_kept() -> None:
    s = stream(Flow(), [MSS] * 5)
    s[1] = _edit(s[1], 33, ACK | PSH)
    out = ofl.coalesce(s)
    assert _runs(out) == [2, 3]
    check_super(*out[0], s[:2])
    assert parse_tcp(out[0][1]).flags == ACK | PSH


def test_cwr_starts_a_run_and_sets_ecn() -> None:
    s = stream(Flow(), [MSS] * 5)
    s[2] = _edit(s[2], 33, ACK | CWR)
    out = ofl.coalesce(s)
    assert _runs(out) == [2, 3]
    check_super(*out[1], s[2:])
    assert parse_vnet(out[1][0])[1] == GSO_TCPV4 | GSO_ECN


def test_larger_after_smaller_is_not_merged() -> None:
    s = stream(Flow(), [1000, 500, 1000])
    assert _runs(ofl.coalesce(s)) == [2, 1]
    s = stream(Flow(), [500, 1000, 1000])
    assert _runs(ofl.coalesce(s)) == [1, 2]


def test_different_tcp_options_length_or_bytes() -> None:
    f = Flow()
    a = stream(f, [MSS] * 2, options=timestamps())
    b = f.tcp(5000 + 2 * MSS, os.urandom(MSS), ident=102)  # no options
    c = f.tcp(5000 + 3 * MSS, os.urandom(MSS), ident=103, options=timestamps(1))
    assert _runs(ofl.coalesce([*a, b])) == [2, 1]
    assert _runs(ofl.coalesce([*a, c])) == [2, 1]


def test_ipv4_fragments_and_options_pass_through_and_keep_order() -> None:
    f = Flow()
    s = stream(f, [MSS] * 4)
    frag = _edit(s[1], 6, 0x20, fix=False)  # MF: a fragment between these hosts
    assert f.src is not None and f.dst is not None
    opts = ipv4(f.src, f.dst, TCP, s[2][20:], ident=102, options=b"\x01\x01\x01\x00")
    out = ofl.coalesce([s[0], frag, opts, s[3]])
    assert singles(out) == [s[0], frag, opts, s[3]]


def test_fragment_between_other_hosts_does_not_matter() -> None:
    s = stream(Flow(), [MSS] * 3)
    other = Flow(src="10.9.9.9")
    frag = _edit(other.tcp(1, os.urandom(100)), 6, 0x20, fix=False)
    out = ofl.coalesce([s[0], frag, s[1], s[2]])
    assert _runs(out) == [3, 1]


def test_bad_checksums_are_left_to_the_kernel() -> None:
    s = stream(Flow(), [MSS] * 6)
    bad_member = set_l4_checksum(s[2], 0x1234)
    out = ofl.coalesce([s[0], s[1], bad_member, s[3], s[4], s[5]])
    assert _runs(out) == [2, 1, 3]
    assert out[1] == (ZERO, bad_member)
    bad_head = set_l4_checksum(s[0], 0x1234)
    out = ofl.coalesce([bad_head, *s[1:]])
    assert _runs(out) == [1, 5]
    assert out[0] == (ZERO, bad_head)
    bad_ip = bytearray(s[1])
    bad_ip[11] ^= 1  # IPv4 header checksum
    out = ofl.coalesce([s[0], bytes(bad_ip), *s[2:]])
    assert _runs(out) == [1, 1, 4]


def test_64k_limit() -> None:
    s = stream(Flow(), [MSS] * 50, options=timestamps())
    out = ofl.coalesce(s)
    first = (65535 - 52) // MSS
    assert _runs(out) == [first, 50 - first]
    assert len(out[0][1]) <= 65535
    check_super(*out[0], s[:first])
    check_super(*out[1], s[first:])
    s6 = stream(Flow(v6=True), [1000] * 70)
    out = ofl.coalesce(s6)
    assert all(len(p) <= 65535 for _, p in out) and sum(_runs(out)) == 70


@pytest.mark.parametrize("v6", [False, True])
def test_udp_coalesces_only_with_uso(v6: bool) -> None:
    f = Flow(v6=v6, proto=UDP)
    dgrams = [f.udp(os.urandom(1200), ident=k) for k in range(5)] + [f.udp(b"z" * 300, ident=5)]
    assert singles(ofl.coalesce(dgrams)) == dgrams
    out = ofl.coalesce(dgrams, uso=True)
    assert len(out) == 1
    check_super(*out[0], dgrams)


def test_udp_rules() -> None:
    f = Flow(proto=UDP)
    big_after_small = [f.udp(b"a" * 500), f.udp(b"b" * 400), f.udp(b"c" * 500)]
    assert _runs(ofl.coalesce(big_after_small, uso=True)) == [2, 1]
    no_checksum = [f.udp(b"a" * 500), f.udp(b"b" * 500, csum=0), f.udp(b"c" * 500)]
    assert _runs(ofl.coalesce(no_checksum, uso=True)) == [1, 1, 1]
    bad = [f.udp(b"a" * 500), f.udp(b"b" * 500, csum=1), f.udp(b"c" * 500)]
    assert _runs(ofl.coalesce(bad, uso=True)) == [1, 1, 1]
    many = [f.udp(os.urandom(100)) for _ in range(70)]
    assert _runs(ofl.coalesce(many, uso=True)) == [64, 6]
    other = Flow(proto=UDP, dport=53)
    mixed = [f.udp(b"a" * 500), other.udp(b"q" * 50), f.udp(b"b" * 500)]
    out = ofl.coalesce(mixed, uso=True)
    assert _runs(out) == [2, 1]


def test_udp_length_field_must_match() -> None:
    f = Flow(proto=UDP)
    d = [f.udp(b"a" * 500) for _ in range(3)]
    b = bytearray(d[1])
    struct.pack_into("!H", b, 24, 400)  # UDP length says less than the packet
    d[1] = set_l4_checksum(bytes(b))
    assert _runs(ofl.coalesce(d, uso=True)) == [1, 1, 1]


def test_small_arena_writes_segments_alone_in_order() -> None:
    a, b = Flow(sport=1), Flow(sport=2)
    sa, sb = stream(a, [MSS] * 3), stream(b, [MSS] * 3)
    pkts = [sa[0], sb[0], sa[1], sb[1], sa[2], sb[2]]
    assert singles(ofl.coalesce(pkts, arena_size=0)) == pkts
    room = 10 + 40 + 3 * MSS  # the first run fits, the second does not
    out = ofl.coalesce(pkts, arena_size=room)
    assert _runs(out) == [3, 1, 1, 1]
    assert [p for _, p in out[1:]] == sb


def test_too_many_packets_is_an_error() -> None:
    assert len(ofl.coalesce([b""] * ofl.GRO_MAX_PACKETS)) == ofl.GRO_MAX_PACKETS
    with pytest.raises(ValueError):
        ofl.coalesce([b""] * (ofl.GRO_MAX_PACKETS + 1))


def test_many_flows_at_once() -> None:
    # 2048 packets of 1024 flows: every flow's pair coalesces, whatever the hashing
    flows = [Flow(sport=1000 + k) for k in range(1024)]
    pkts = []
    for k, f in enumerate(flows):
        pkts += stream(f, [100, 100], seq=k)
    out = ofl.coalesce(pkts)
    assert _runs(out) == [2] * 1024
