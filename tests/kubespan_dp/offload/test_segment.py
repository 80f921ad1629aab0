"""TX segmentation (gso_split through _offload.segment): the kernel's TSO/USO
super-packets become valid MTU-sized IP packets; malformed virtio headers and
packets are refused without a write outside the slots (the wrapper checks guard
bytes around every slot)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kubespan_dp import _offload as ofl
from tests.kubespan_dp.offload.packets import (
    ACK,
    CWR,
    ECE,
    F_NEEDS_CSUM,
    FIN,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    PSH,
    UDP,
    Flow,
    assert_valid,
    ipv4,
    l4_payload,
    ones_sum,
    parse_tcp,
    pseudo_sum,
    super_packet,
    timestamps,
    vnet,
)


def tcp_super(
    v6: bool,
    payload: bytes,
    mss: int,
    flags: int = ACK,
    options: bytes = b"",
    seq: int = 1_000_000,
    ident: int = 7,
) -> tuple[bytes, bytes]:
    """A TSO super-packet as the kernel hands it over, with its virtio header."""
    f = Flow(v6=v6)
    whole = f.tcp(seq, payload, flags, options=options, ident=ident)
    pkt = super_packet([whole])
    ihl = 40 if v6 else 20
    hlen = ihl + 20 + len(options)
    hdr = vnet(F_NEEDS_CSUM, GSO_TCPV6 if v6 else GSO_TCPV4, hlen, mss, ihl, 16)
    return hdr, pkt


@pytest.mark.parametrize("v6", [False, True])
def test_tcp_segments_are_valid_packets(v6: bool) -> None:
    data = os.urandom(5000)
    hlen = (40 if v6 else 20) + 32
    mss = 1500 - hlen
    hdr, pkt = tcp_super(v6, data, mss, ACK | PSH | FIN | CWR | ECE, timestamps())
    segs = ofl.segment(hdr, pkt, 1500)
    assert [len(s) - hlen for s in segs] == [mss, mss, mss, 5000 - 3 * mss]
    for k, s in enumerate(segs):
        assert_valid(s)
        t = parse_tcp(s)
        assert t.seq == 1_000_000 + mss * k
        assert t.ack == 1000 and t.window == 502 and t.options == timestamps()
        want = ACK | ECE
        if k == 0:
            want |= CWR  # only the first keeps CWR
        if k == 3:
            want |= PSH | FIN  # only the last keeps PSH and FIN
        assert t.flags == want, (k, hex(t.flags))
        if not v6:
            assert t.ident == 7 + k
    assert b"".join(l4_payload(s) for s in segs) == data


def test_tcp_sequence_wraps_and_ip_id_wraps() -> None:
    data = os.urandom(3000)
    hdr, pkt = tcp_super(False, data, 1000, seq=0xFFFFFF00, ident=0xFFFF)
    segs = ofl.segment(hdr, pkt, 1500)
    assert [parse_tcp(s).seq for s in segs] == [0xFFFFFF00, (0xFFFFFF00 + 1000) % 2**32, 1744]
    assert [parse_tcp(s).ident for s in segs] == [0xFFFF, 0, 1]
    for s in segs:
        assert_valid(s)


def test_tcp_input_checksum_field_is_ignored() -> None:
    # the kernel leaves a partial sum there; whatever it is, the segments are right
    hdr, pkt = tcp_super(False, os.urandom(3000), 1400)
    pkt = pkt[:36] + b"\xde\xad" + pkt[38:]
    for s in ofl.segment(hdr, pkt, 1500):
        assert_valid(s)


def test_tcp_segments_shrink_to_fit_max_len() -> None:
    data = os.urandom(4000)
    hdr, pkt = tcp_super(True, data, 1440, options=timestamps())
    segs = ofl.segment(hdr, pkt, 1000)
    assert all(len(s) <= 1000 for s in segs)
    assert [len(l4_payload(s)) for s in segs] == [928] * 4 + [4000 - 4 * 928]
    for s in segs:
        assert_valid(s)
    assert b"".join(l4_payload(s) for s in segs) == data


def test_ipv4_options_are_copied_to_every_segment() -> None:
    f = Flow()
    whole = f.tcp(5, os.urandom(2500), ACK, options=timestamps(), ident=3)
    # rebuild with 4 bytes of IPv4 options (NOP NOP NOP EOL)
    opts = b"\x01\x01\x01\x00"
    assert f.src is not None and f.dst is not None
    pkt = super_packet([ipv4(f.src, f.dst, 6, whole[20:], ident=3, options=opts)])
    segs = ofl.segment(vnet(F_NEEDS_CSUM, GSO_TCPV4, 0, 1200, 24, 16), pkt, 1500)
    assert len(segs) == 3
    for s in segs:
        assert s[0] == 0x46 and s[20:24] == opts
        assert_valid(s)


@pytest.mark.parametrize("v6", [False, True])
def test_udp_segmentation_uso(v6: bool) -> None:
    f = Flow(v6=v6, proto=UDP)
    data = os.urandom(1200 * 7 + 333)
    pkt = super_packet([f.udp(data, ident=40)])
    ihl = 40 if v6 else 20
    segs = ofl.segment(vnet(F_NEEDS_CSUM, GSO_UDP_L4, ihl + 8, 1200, ihl, 6), pkt, 1500)
    assert [len(l4_payload(s)) for s in segs] == [1200] * 7 + [333]
    for k, s in enumerate(segs):
        assert_valid(s)
        if not v6:
            assert struct.unpack_from("!H", s, 4)[0] == 40 + k
    assert b"".join(l4_payload(s) for s in segs) == data


def test_udp_datagrams_cannot_shrink() -> None:
    f = Flow(proto=UDP)
    pkt = super_packet([f.udp(os.urandom(3000))])
    with pytest.raises(ofl.OffloadError, match="too_big"):
        ofl.segment(vnet(F_NEEDS_CSUM, GSO_UDP_L4, 28, 1400, 20, 6), pkt, 1000)


def test_udp_checksum_zero_is_sent_as_ffff() -> None:
    # find a payload whose UDP checksum comes out 0: the segment must carry 0xFFFF
    f = Flow(proto=UDP)
    base = f.udp(b"\0\0" + bytes(30))
    need = pseudo_sum(base, UDP, len(base) - 20)
    # choose the first two payload bytes so that the whole sum is 0xFFFF
    rest = base[:28] + b"\0\0" + base[30:]
    s = ones_sum(rest[20:26] + rest[28:], need)
    word = 0xFFFF ^ s
    pkt = f.udp(struct.pack("!H", word) + bytes(30))
    out = ofl.segment(vnet(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 6), super_packet([pkt]), 1500)
    assert struct.unpack_from("!H", out[0], 26)[0] == 0xFFFF
    assert_valid(out[0])


@pytest.mark.parametrize("proto", ["tcp", "udp"])
@pytest.mark.parametrize("v6", [False, True])
def test_gso_none_needs_csum_is_completed(proto: str, v6: bool) -> None:
    f = Flow(v6=v6)
    pkt = f.tcp(9, os.urandom(777)) if proto == "tcp" else Flow(v6=v6, proto=UDP).udp(b"x" * 99)
    partial = super_packet([pkt])  # only the pseudo-header sum in the field
    ihl = 40 if v6 else 20
    out = ofl.segment(
        vnet(F_NEEDS_CSUM, GSO_NONE, 0, 0, ihl, 16 if proto == "tcp" else 6), partial, 1500
    )
    assert out == [pkt]


def test_gso_none_without_needs_csum_is_copied() -> None:
    pkt = os.urandom(300)
    assert ofl.segment(vnet(), pkt, 1500) == [pkt]
    # DATA_VALID (the kernel checked it) changes nothing
    assert ofl.segment(vnet(flags=2), pkt, 1500) == [pkt]


def test_complete_checksum_matches_python() -> None:
    pkt = Flow().tcp(1, os.urandom(1001))
    assert ofl.complete_checksum(super_packet([pkt]), 20, 16) == pkt
    with pytest.raises(ofl.OffloadError, match="header"):
        ofl.complete_checksum(pkt, 20, len(pkt))


def test_checksum_helper() -> None:
    for n in (0, 1, 2, 3, 7, 8, 15, 16, 17, 100, 1501):
        data = os.urandom(n)
        assert ofl.checksum(data) == 0xFFFF ^ ones_sum(data)


def test_too_many_segments() -> None:
    hdr, pkt = tcp_super(False, os.urandom(3000), 1000)
    assert len(ofl.segment(hdr, pkt, 1500, max_segments=3)) == 3
    with pytest.raises(ofl.OffloadError, match="too_many"):
        ofl.segment(hdr, pkt, 1500, max_segments=2)


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("part", [1, 2, 3, 7, 200])
def test_split_in_parts_makes_the_same_segments(v6: bool, part: int) -> None:
    # the loop splits a super-packet across batches when its slots run out: the
    # segments (sequence, ids, flags only on the first/last, checksums) are the same
    hdr, pkt = tcp_super(v6, os.urandom(20000), 1000, ACK | PSH | FIN | CWR, timestamps())
    whole = ofl.segment(hdr, pkt, 1500, max_segments=64)
    assert len(whole) == 20
    assert ofl.segment(hdr, pkt, 1500, max_segments=64, part=part) == whole
    f = Flow(v6=v6, proto=UDP)
    ihl = 40 if v6 else 20
    udp = super_packet([f.udp(os.urandom(1200 * 9 + 5), ident=9)])
    uhdr = vnet(F_NEEDS_CSUM, GSO_UDP_L4, ihl + 8, 1200, ihl, 6)
    whole = ofl.segment(uhdr, udp, 1500)
    assert len(whole) == 10
    assert ofl.segment(uhdr, udp, 1500, part=part) == whole


def test_split_in_parts_of_a_plain_packet() -> None:
    hdr, pkt = tcp_super(False, os.urandom(500), 1000)
    plain = vnet(0, GSO_NONE, 0, 0, 0, 0)
    assert ofl.segment(plain, pkt, 1500, part=1) == ofl.segment(plain, pkt, 1500) == [pkt]


def test_vnet_header_roundtrip() -> None:
    h = ofl.vnet_header(1, 4, 60, 1400, 40, 16)
    assert h == vnet(1, 4, 60, 1400, 40, 16)
    assert ofl.parse_vnet_header(h) == (1, 4, 60, 1400, 40, 16)
    assert ofl.VNET_HDR_LEN == 10 and ofl.GSO_UDP_L4 == 5 and ofl.F_NEEDS_CSUM == 1


def _malformed() -> list[tuple[str, bytes, bytes, int, str]]:
    hdr4, tcp4 = tcp_super(False, os.urandom(3000), 1000)
    hdr6, tcp6 = tcp_super(True, os.urandom(3000), 1000)
    short4 = vnet(1, GSO_TCPV4, 0, 1000, 20, 16)  # hdr_len is only a hint: 0 passes
    udp4 = super_packet([Flow(proto=UDP).udp(os.urandom(2000))])
    frag = bytearray(tcp4)
    frag[6] |= 0x20  # MF
    with_options = bytearray(tcp4)
    with_options[0] = 0x46
    bad_doff = bytearray(tcp4)
    bad_doff[32] = 0x40  # data offset 4 words
    return [
        ("unknown gso type", vnet(1, 2, 40, 1000, 20, 16), tcp4, 1500, "header"),
        ("UFO", vnet(1, 3, 28, 1000, 20, 6), udp4, 1500, "header"),
        ("gso type 6", vnet(1, 6, 40, 1000, 20, 16), tcp4, 1500, "header"),
        ("ecn on udp", vnet(1, GSO_UDP_L4 | GSO_ECN, 28, 1000, 20, 6), udp4, 1500, "header"),
        ("ecn without gso", vnet(0, GSO_ECN), tcp4, 1500, "header"),
        ("gso_size 0", vnet(1, GSO_TCPV4, 40, 0, 20, 16), tcp4, 1500, "header"),
        ("no NEEDS_CSUM", vnet(0, GSO_TCPV4, 40, 1000, 20, 16), tcp4, 1500, "header"),
        ("csum_start wrong", vnet(1, GSO_TCPV4, 40, 1000, 24, 16), tcp4, 1500, "header"),
        ("csum_offset wrong", vnet(1, GSO_TCPV4, 40, 1000, 20, 6), tcp4, 1500, "header"),
        ("hdr_len past the end", vnet(1, GSO_TCPV4, 4000, 1000, 20, 16), tcp4, 1500, "header"),
        ("csum_start far out", vnet(1, GSO_TCPV4, 40, 1000, 60000, 16), tcp4, 1500, "header"),
        ("v6 packet as TCPV4", hdr4, tcp6, 1500, "protocol"),
        ("v4 packet as TCPV6", hdr6, tcp4, 1500, "protocol"),
        ("udp packet as TCPV4", hdr4, udp4, 1500, "protocol"),
        ("tcp as UDP_L4", vnet(1, GSO_UDP_L4, 28, 1000, 20, 6), tcp4, 1500, "protocol"),
        ("ip version 5", hdr4, b"\x55" + tcp4[1:], 1500, "protocol"),
        ("fragment", hdr4, bytes(frag), 1500, "protocol"),
        ("ihl says options", hdr4, bytes(with_options), 1500, "header"),
        ("tcp data offset < 5", hdr4, bytes(bad_doff), 1500, "protocol"),
        ("shorter than an IP header", short4, tcp4[:19], 1500, "short"),
        ("shorter than its TCP header", short4, tcp4[:30], 1500, "short"),
        ("no payload", hdr4, tcp4[:40], 1500, "short"),
        ("empty", short4, b"", 1500, "short"),
        ("empty GSO_NONE", vnet(), b"", 1500, "short"),
        ("GSO_NONE field past the end", vnet(1, 0, 0, 0, 10, 100), tcp4[:100], 1500, "header"),
        ("GSO_NONE field 1 byte out", vnet(1, 0, 0, 0, 90, 9), tcp4[:100], 1500, "header"),
        ("GSO_NONE too big", vnet(), os.urandom(1501), 1500, "too_big"),
        ("headers longer than max_len", hdr6, tcp6, 60, "too_big"),
        ("udp headers longer than max_len", vnet(1, GSO_UDP_L4, 28, 9, 20, 6), udp4, 28, "too_big"),
    ]


@pytest.mark.parametrize("case", _malformed(), ids=lambda c: c[0])
def test_malformed_input_is_refused(case: tuple[str, bytes, bytes, int, str]) -> None:
    _, hdr, pkt, mtu, reason = case
    with pytest.raises(ofl.OffloadError) as e:
        ofl.segment(hdr, pkt, mtu)
    assert e.value.reason == reason


def test_gso_none_checksum_field_at_the_very_end() -> None:
    pkt = os.urandom(100)
    out = ofl.segment(vnet(1, 0, 0, 0, 90, 8), pkt, 1500)
    assert out[0][:98] == pkt[:98]


@settings(max_examples=400, deadline=None)
@given(
    flags=st.integers(0, 255),
    gso_type=st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x85, 0x80, 0xFF]),
    hdr_len=st.integers(0, 0xFFFF),
    gso_size=st.integers(0, 0xFFFF),
    csum_start=st.integers(0, 0xFFFF),
    csum_offset=st.integers(0, 0xFFFF),
    body=st.binary(max_size=3000),
    mtu=st.integers(1, 9000),
)
def test_random_headers_never_write_outside_the_slots(
    flags: int,
    gso_type: int,
    hdr_len: int,
    gso_size: int,
    csum_start: int,
    csum_offset: int,
    body: bytes,
    mtu: int,
) -> None:
    hdr = vnet(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    try:
        segs = ofl.segment(hdr, body, mtu, max_segments=8)
    except ofl.OffloadError:
        return
    assert 1 <= len(segs) <= 8 and all(len(s) <= mtu for s in segs)


@settings(max_examples=300, deadline=None)
@given(
    v6=st.booleans(),
    n=st.integers(1, 9000),
    mss=st.integers(1, 1500),
    at=st.integers(0, 100),
    byte=st.integers(0, 255),
    mtu=st.integers(60, 1600),
)
def test_damaged_headers_never_write_outside_the_slots(
    v6: bool, n: int, mss: int, at: int, byte: int, mtu: int
) -> None:
    hdr, pkt = tcp_super(v6, bytes(n), mss, options=timestamps())
    pkt = pkt[:at] + bytes([byte]) + pkt[at + 1 :]
    try:
        segs = ofl.segment(hdr, pkt, mtu, max_segments=4096)
    except ofl.OffloadError:
        return
    assert all(len(s) <= mtu for s in segs)
