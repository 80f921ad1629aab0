"""IPv4/IPv6 TCP and UDP packets built and checked in pure Python, independent of
the C checksum code under test (RFC 1071 sums over struct-unpacked words)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any

TCP, UDP, ICMP = 6, 17, 1
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

SRC4, DST4 = "10.81.1.2", "10.81.2.2"
SRC6, DST6 = "fd81:1::2", "fd81:2::2"

VNET_HDR_LEN = 10
F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 4, 5, 0x80


def ones_sum(data: bytes, acc: int = 0) -> int:
    """The folded ones' complement sum of big-endian 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    for (word,) in struct.iter_unpack("!H", data):
        acc += word
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return acc


def pseudo_sum(ip: bytes, proto: int, l4_len: int) -> int:
    addrs = ip[8:40] if ip[0] >> 4 == 6 else ip[12:20]
    return ones_sum(addrs + struct.pack("!HHH", proto, l4_len >> 16, l4_len & 0xFFFF))


def ip_header_len(ip: bytes) -> int:
    return 40 if ip[0] >> 4 == 6 else (ip[0] & 0x0F) * 4


def l4_checksum(ip: bytes) -> int:
    """The checksum the TCP/UDP field must hold (computed with the field zeroed)."""
    ihl = ip_header_len(ip)
    proto = ip[6] if ip[0] >> 4 == 6 else ip[9]
    off = ihl + (16 if proto == TCP else 6)
    l4 = ip[ihl:off] + b"\0\0" + ip[off + 2 :]
    c = 0xFFFF ^ ones_sum(l4, pseudo_sum(ip, proto, len(l4)))
    return 0xFFFF if proto == UDP and c == 0 else c


def ipv4_header_ok(ip: bytes) -> bool:
    return ones_sum(ip[: ip_header_len(ip)]) == 0xFFFF


def l4_ok(ip: bytes) -> bool:
    ihl = ip_header_len(ip)
    proto = ip[6] if ip[0] >> 4 == 6 else ip[9]
    return ones_sum(ip[ihl:], pseudo_sum(ip, proto, len(ip) - ihl)) == 0xFFFF


def assert_valid(ip: bytes) -> None:
    """Lengths and every checksum of a TCP/UDP packet are right."""
    if ip[0] >> 4 == 4:
        assert struct.unpack_from("!H", ip, 2)[0] == len(ip), "IPv4 total length"
        assert ipv4_header_ok(ip), "IPv4 header checksum"
        proto = ip[9]
    else:
        assert struct.unpack_from("!H", ip, 4)[0] == len(ip) - 40, "IPv6 payload length"
        proto = ip[6]
    ihl = ip_header_len(ip)
    if proto == UDP:
        assert struct.unpack_from("!H", ip, ihl + 4)[0] == len(ip) - ihl, "UDP length"
    assert l4_ok(ip), f"{'UDP' if proto == UDP else 'TCP'} checksum"


def ipv4(
    src: str,
    dst: str,
    proto: int,
    l4: bytes,
    *,
    ttl: int = 64,
    tos: int = 0,
    ident: int = 0,
    frag: int = 0x4000,  # DF
    options: bytes = b"",
    total: int | None = None,
) -> bytes:
    ihl = 5 + len(options) // 4
    total = 4 * ihl + len(l4) if total is None else total
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        tos,
        total,
        ident,
        frag,
        ttl,
        proto,
        0,
        ip_address(src).packed,
        ip_address(dst).packed,
    )
    head += options
    c = 0xFFFF ^ ones_sum(head)
    return head[:10] + struct.pack("!H", c) + head[12:] + l4


def ipv6(
    src: str, dst: str, nh: int, l4: bytes, *, hlim: int = 64, tclass: int = 0, flow: int = 0
) -> bytes:
    first = (6 << 28) | (tclass << 20) | flow
    return (
        struct.pack("!IHBB16s16s", first, len(l4), nh, hlim, ip_address(src).packed,
                    ip_address(dst).packed)
        + l4
    )  # fmt: skip


def set_l4_checksum(ip: bytes, value: int | None = None) -> bytes:
    """ip with its TCP/UDP checksum field set (to the right one by default)."""
    ihl = ip_header_len(ip)
    proto = ip[6] if ip[0] >> 4 == 6 else ip[9]
    off = ihl + (16 if proto == TCP else 6)
    c = l4_checksum(ip) if value is None else value
    return ip[:off] + struct.pack("!H", c) + ip[off + 2 :]


@dataclass
class Flow:
    """One direction of a TCP or UDP conversation; builds its packets."""

    v6: bool = False
    proto: int = TCP
    sport: int = 40000
    dport: int = 5201
    src: str | None = None
    dst: str | None = None
    ttl: int = 64
    tos: int = 0

    def __post_init__(self) -> None:
        if self.src is None:
            self.src = SRC6 if self.v6 else SRC4
        if self.dst is None:
            self.dst = DST6 if self.v6 else DST4

    def ip(self, proto: int, l4: bytes, ident: int = 0, **kw: Any) -> bytes:
        assert self.src is not None and self.dst is not None
        ttl = kw.pop("ttl", self.ttl)
        tos = kw.pop("tos", self.tos)
        if self.v6:
            return ipv6(self.src, self.dst, proto, l4, hlim=ttl, tclass=tos, **kw)
        return ipv4(self.src, self.dst, proto, l4, ttl=ttl, tos=tos, ident=ident, **kw)

    def tcp(
        self,
        seq: int,
        payload: bytes,
        flags: int = ACK,
        *,
        ack: int = 1000,
        window: int = 502,
        options: bytes = b"",
        ident: int = 0,
        csum: int | None = None,
        **ip_kw: Any,
    ) -> bytes:
        doff = (20 + len(options)) // 4
        l4 = struct.pack(
            "!HHIIBBHHH", self.sport, self.dport, seq & 0xFFFFFFFF, ack, doff << 4, flags,
            window, 0, 0,
        ) + options + payload  # fmt: skip
        return set_l4_checksum(self.ip(TCP, l4, ident, **ip_kw), csum)

    def udp(
        self, payload: bytes, *, ident: int = 0, csum: int | None = None, **ip_kw: Any
    ) -> bytes:
        l4 = struct.pack("!HHHH", self.sport, self.dport, 8 + len(payload), 0) + payload
        return set_l4_checksum(self.ip(UDP, l4, ident, **ip_kw), csum)


def timestamps(tsval: int = 123456, tsecr: int = 654321) -> bytes:
    """NOP NOP TS: the 12 option bytes of every Linux data segment."""
    return struct.pack("!BBBBII", 1, 1, 8, 10, tsval, tsecr)


@dataclass
class Tcp:
    """The fields of a TCP packet the tests look at."""

    seq: int
    ack: int
    flags: int
    window: int
    options: bytes
    payload: bytes
    ident: int


def parse_tcp(ip: bytes) -> Tcp:
    ihl = ip_header_len(ip)
    seq, ack, off, flags, window = struct.unpack_from("!IIBBH", ip, ihl + 4)
    doff = (off >> 4) * 4
    ident = 0 if ip[0] >> 4 == 6 else struct.unpack_from("!H", ip, 4)[0]
    return Tcp(seq, ack, flags, window, ip[ihl + 20 : ihl + doff], ip[ihl + doff :], ident)


def l4_payload(ip: bytes) -> bytes:
    ihl = ip_header_len(ip)
    proto = ip[6] if ip[0] >> 4 == 6 else ip[9]
    if proto == UDP:
        return ip[ihl + 8 :]
    return ip[ihl + (ip[ihl + 12] >> 4) * 4 :]


def vnet(
    flags: int = 0,
    gso_type: int = 0,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    """A virtio_net_hdr in host (little-endian) byte order."""
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def parse_vnet(b: bytes) -> tuple[int, int, int, int, int, int]:
    flags, gso_type, hdr_len, gso_size, start, offset = struct.unpack("<BBHHHH", b)
    return flags, gso_type, hdr_len, gso_size, start, offset


def super_packet(segments: list[bytes]) -> bytes:
    """What the kernel would hand over for `segments` of one TCP/UDP flow (all but the
    last of one payload size): the first's headers with the whole length, the
    payloads joined, the partial (pseudo-header) checksum in the field, the flags of
    the last segment's PSH/FIN added (as GSO would have them)."""
    first = segments[0]
    ihl = ip_header_len(first)
    v6 = first[0] >> 4 == 6
    proto = first[6] if v6 else first[9]
    hlen = len(first) - len(l4_payload(first))
    ip = bytearray(first[:hlen] + b"".join(l4_payload(s) for s in segments))
    if v6:
        struct.pack_into("!H", ip, 4, len(ip) - 40)
    else:
        struct.pack_into("!H", ip, 10, 0)
        struct.pack_into("!H", ip, 2, len(ip))
        struct.pack_into("!H", ip, 10, 0xFFFF ^ ones_sum(bytes(ip[:ihl])))
    if proto == TCP:
        ip[ihl + 13] |= segments[-1][ihl + 13] & (PSH | FIN)
        off = ihl + 16
    else:
        struct.pack_into("!H", ip, ihl + 4, len(ip) - ihl)
        off = ihl + 6
    struct.pack_into("!H", ip, off, pseudo_sum(bytes(ip), proto, len(ip) - ihl))
    return bytes(ip)


def complete(ip: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Finish a NEEDS_CSUM checksum the way the kernel does (pure Python)."""
    at = csum_start + csum_offset
    c = 0xFFFF ^ ones_sum(ip[csum_start:])
    return ip[:at] + struct.pack("!H", c or 0xFFFF) + ip[at + 2 :]
