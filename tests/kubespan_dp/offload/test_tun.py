"""TUN offloads against the real kernel: the flags are accepted (and refused on
request), the kernel's TSO/USO super-packets split into valid packets, and our
coalesced super-packets are taken by the kernel, which segments them again when it
forwards them to a plain TUN (so their partial checksums must be right)."""

from __future__ import annotations

import fcntl
import os
import platform
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from control import netlab
from kubespan_dp import _offload as ofl
from kubespan_dp.tun import IFF_VNET_HDR, Tun
from tests import netns
from tests.kubespan_dp.offload.packets import (
    ACK,
    CWR,
    DST4,
    DST6,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    PSH,
    SRC4,
    SRC6,
    SYN,
    TCP,
    UDP,
    Flow,
    assert_valid,
    ip_header_len,
    l4_payload,
    parse_tcp,
    timestamps,
)

pytestmark = pytest.mark.netns

TUNGETIFF = 0x800454D2
UDP_SEGMENT = 103
ALL_OFFLOADS = {"csum", "tso4", "tso6", "uso4", "uso6"}
# USO arrived in Linux 6.2
HAS_USO = tuple(int(x) for x in platform.release().split(".")[:2]) >= (6, 2)


def _tun_flags(tun: Tun) -> int:
    ifr = fcntl.ioctl(tun.fd, TUNGETIFF, bytes(40))
    return int(struct.unpack_from("H", ifr, 16)[0])


def _make_tun(ns: netlab.Netns, lab: netns.Lab, offload: bool, *addrs: str) -> Tun:
    with ns.entered():
        tun = Tun(netlab.unique_name("ko", 6), mtu=1500, offload=offload)
        lab.defer(tun.close)
        tun.set_up()
    for a in addrs:
        netlab.add_address(ns, tun.name, a)
    return tun


def _reader(fd: int, timeout: float = 20) -> Iterator[bytes]:
    """What the kernel writes to the TUN; TimeoutError once `timeout` seconds have
    passed (the caller stops iterating when it has what it waits for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            try:
                yield os.read(fd, 65536 + 10)
            except BlockingIOError:
                continue
    raise TimeoutError("the kernel did not send what the test waits for")


def _proto(p: bytes) -> int:
    return p[6] if p[0] >> 4 == 6 else p[9]


def _ports(p: bytes) -> tuple[int, int]:
    sport, dport = struct.unpack_from("!HH", p, ip_header_len(p))
    return sport, dport


def _wait(pred: Callable[[], bool], timeout: float = 10) -> None:
    netlab.wait_until(pred, timeout=timeout, interval=0.02)


def test_offloads_are_accepted(lab: netns.Lab) -> None:
    ns = lab.netns("kot")
    tun = _make_tun(ns, lab, True)
    assert tun.vnet_hdr
    assert tun.offloads == (ALL_OFFLOADS if HAS_USO else ALL_OFFLOADS - {"uso4", "uso6"})
    assert _tun_flags(tun) & IFF_VNET_HDR


def test_plain_tun_without_offload(lab: netns.Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = lab.netns("kot")
    for tun in (_make_tun(ns, lab, False), _forced_off(ns, lab, monkeypatch)):
        assert not tun.vnet_hdr and tun.offloads == frozenset()
        assert not _tun_flags(tun) & IFF_VNET_HDR


def _forced_off(ns: netlab.Netns, lab: netns.Lab, monkeypatch: pytest.MonkeyPatch) -> Tun:
    monkeypatch.setenv("KUBESPAN_WG_TUN_OFFLOAD", "0")
    return _make_tun(ns, lab, True)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_kernel_tso_super_packet_splits_into_valid_segments(lab: netns.Lab, v6: bool) -> None:
    """A TCP connection into the TUN (we play the server by hand): the kernel sends
    a write of 60 KB as TSO super-packets; split, they are valid consecutive segments
    carrying the written bytes."""
    ns = lab.netns("kotx")
    local, peer = (SRC6, DST6) if v6 else (SRC4, DST4)
    tun = _make_tun(ns, lab, True, f"{local}/16")  # the peer is routed into the TUN
    family = socket.AF_INET6 if v6 else socket.AF_INET
    client = ns.socket(family, socket.SOCK_STREAM)
    lab.defer(client.close)
    client.setblocking(False)
    client.connect_ex((peer, 5201))
    packets = _reader(tun.fd)
    for raw in packets:
        hdr, syn = raw[:10], raw[10:]
        if _proto(syn) == TCP and _ports(syn)[1] == 5201 and syn[ip_header_len(syn) + 13] & SYN:
            break
    for s in ofl.segment(hdr, syn, 1500):  # the kernel may leave its checksum to us
        assert_valid(s)
    cport = _ports(syn)[0]
    c = parse_tcp(syn)
    tsval = struct.unpack_from("!I", c.options, c.options.index(b"\x08\x0a") + 2)[0]
    server = Flow(v6=v6, src=peer, dst=local, sport=5201, dport=cport)
    mss = 1500 - (60 if v6 else 40)
    options = struct.pack("!BBH", 2, 4, mss) + timestamps(77, tsval)
    synack = server.tcp(9000, b"", SYN | ACK, ack=c.seq + 1, window=65535, options=options)
    os.write(tun.fd, bytes(10) + synack)
    # connected: writable with no error
    _wait(lambda: bool(select.select([], [client], [], 0)[1]))
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    data = os.urandom(60000)
    sent = 0

    def writable() -> bool:
        nonlocal sent
        try:
            sent += client.send(data[sent:])
        except BlockingIOError:
            pass
        return sent > 10000  # several segments: TSO sends them as one

    _wait(writable)
    start = c.seq + 1
    for raw in packets:
        hdr, pkt = raw[:10], raw[10:]
        if _proto(pkt) != TCP or _ports(pkt) != (cport, 5201):
            continue
        flags, gso_type, _, gso_size, csum_start, csum_offset = ofl.parse_vnet_header(hdr)
        if gso_type == GSO_NONE:
            continue
        assert gso_type == (GSO_TCPV6 if v6 else GSO_TCPV4)
        assert (flags & F_NEEDS_CSUM, csum_start, csum_offset) == (1, ip_header_len(pkt), 16)
        segs = ofl.segment(hdr, pkt, 1500)
        break
    assert len(segs) >= 2
    seq = parse_tcp(segs[0]).seq
    for s in segs:
        assert_valid(s)
        assert len(s) <= 1500
        t = parse_tcp(s)
        assert t.seq == seq and len(t.payload) <= gso_size
        assert t.payload == data[seq - start : seq - start + len(t.payload)]
        assert not t.flags & PSH or s is segs[-1]
        seq += len(t.payload)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_kernel_uso_super_packet_splits_into_datagrams(lab: netns.Lab, v6: bool) -> None:
    if not HAS_USO:
        pytest.skip("USO needs Linux 6.2")
    ns = lab.netns("kotu")
    local, peer = (SRC6, DST6) if v6 else (SRC4, DST4)
    tun = _make_tun(ns, lab, True, f"{local}/16")  # the peer is routed into the TUN
    sock = ns.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
    lab.defer(sock.close)
    data = os.urandom(1200 * 8 + 100)
    sock.sendmsg([data], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", 1200))], 0, (peer, 9999))
    for raw in _reader(tun.fd):
        hdr, pkt = raw[:10], raw[10:]
        if _proto(pkt) == UDP and _ports(pkt)[1] == 9999:
            break
    assert ofl.parse_vnet_header(hdr)[1] == GSO_UDP_L4  # the kernel left it to us
    segs = ofl.segment(hdr, pkt, 1500)
    assert [len(l4_payload(s)) for s in segs] == [1200] * 8 + [100]
    for s in segs:
        assert_valid(s)
    assert b"".join(l4_payload(s) for s in segs) == data


def _forwarder(lab: netns.Lab, v6: bool) -> tuple[Tun, Tun]:
    """A namespace routing from an offload TUN (SRC side) to a plain one (DST side)."""
    ns = lab.netns("kofw")
    ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
    ns.run("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0")
    if v6:
        a = _make_tun(ns, lab, True, "fd81:1::1/64")
        b = _make_tun(ns, lab, False, "fd81:2::1/64")
    else:
        a = _make_tun(ns, lab, True, "10.81.1.1/24")
        b = _make_tun(ns, lab, False, "10.81.2.1/24")
    return a, b


def _same_but_forwarded(got: bytes, sent: bytes) -> bool:
    if got[0] >> 4 == 6:  # hop limit one less
        return got[:7] + got[8:] == sent[:7] + sent[8:] and got[7] == sent[7] - 1
    # TTL one less, so another header checksum
    return got[:8] + got[9:10] + got[12:] == sent[:8] + sent[9:10] + sent[12:]


@pytest.mark.parametrize(
    "kind, v6",
    [("tcp", False), ("tcp", True), ("tcp-cwr", False), ("udp", False), ("udp", True)],
    ids=str,
)
def test_coalesced_super_packet_is_forwarded_as_the_original_segments(
    lab: netns.Lab, kind: str, v6: bool
) -> None:
    """The kernel takes our super-packet and, forwarding it to a TUN without
    offloads, segments it and finishes the checksums from our partial sums: out
    come the packets we coalesced (TTL one less)."""
    proto = UDP if kind == "udp" else TCP
    if proto == UDP and not HAS_USO:
        pytest.skip("USO needs Linux 6.2")
    a, b = _forwarder(lab, v6)
    f = Flow(v6=v6, proto=proto)
    if proto == TCP:
        sizes = [1388] * 9 + [300]
        flags = [ACK] * 9 + [ACK | PSH]
        if kind == "tcp-cwr":
            flags[0] |= CWR  # coalesced with VIRTIO_NET_HDR_GSO_ECN
        segs = [
            f.tcp(7000 + 1388 * k, os.urandom(n), flags[k], ident=50 + k, options=timestamps())
            for k, n in enumerate(sizes)
        ]
    else:
        segs = [f.udp(os.urandom(1300), ident=k) for k in range(7)]
        segs.append(f.udp(os.urandom(90), ident=7))
    out = ofl.coalesce(segs, uso=True)
    assert len(out) == 1
    gso_type = ofl.parse_vnet_header(out[0][0])[1]
    assert gso_type != GSO_NONE and bool(gso_type & GSO_ECN) == (kind == "tcp-cwr")
    os.write(a.fd, out[0][0] + out[0][1])
    got = []
    for pkt in _reader(b.fd):
        if _proto(pkt) == proto and _ports(pkt) == (f.sport, f.dport):
            assert_valid(pkt)
            got.append(pkt)
            if len(got) == len(segs):
                break
    assert all(_same_but_forwarded(g, s) for g, s in zip(got, segs, strict=True))
