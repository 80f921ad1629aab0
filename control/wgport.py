"""Send UDP datagrams from WireGuard's listen port without owning it.

A NAT maps a flow by its addresses and ports, so a datagram sent from the WireGuard
port to some destination opens (or refreshes) the very mapping WireGuard's own packets
to that destination will use: that is what hole punching and relay registration need.
The port belongs to WireGuard's socket (kernel or userspace), so it cannot be bound
again; a raw socket writes the UDP header itself and the kernel adds the IP header.

The datagrams carry WireGuard's fwmark, so KubeSpan's policy routing sends them out on
the underlay like WireGuard's own packets, never into the tunnel.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable

from control.routing import WIREGUARD_MARK

UDP_HEADER = struct.Struct("!HHHH")
# Linux IPV6_CHECKSUM: the kernel fills in the checksum at this offset of the payload.
IPV6_CHECKSUM = getattr(socket, "IPV6_CHECKSUM", 7)
UDP_CHECKSUM_OFFSET = 6
MAX_PAYLOAD = 65_507


def udp_datagram(src_port: int, dst_port: int, payload: bytes) -> bytes:
    """UDP header + payload; checksum 0 (IPv4: none; IPv6: the kernel computes it)."""
    if not 0 < src_port < 65536 or not 0 < dst_port < 65536:
        raise ValueError(f"UDP ports must be 1-65535, got {src_port} -> {dst_port}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"UDP payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    return UDP_HEADER.pack(src_port, dst_port, 8 + len(payload), 0) + payload


def send_from_port(
    src_port: int,
    destination: tuple[str, int],
    payloads: list[bytes],
    *,
    mark: int = WIREGUARD_MARK,
) -> None:
    """Sends each payload to `destination` as UDP from local port `src_port`.

    Needs CAP_NET_RAW (and CAP_NET_ADMIN for the mark). Raises OSError when the
    destination cannot be reached; ValueError on a bad port or payload.
    """
    host, port = destination
    address = ipaddress.ip_address(host)
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    # A raw UDP socket also receives a copy of every incoming UDP datagram; it lives
    # only for this call, so nothing piles up in it.
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP) as sock:
        if mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, UDP_CHECKSUM_OFFSET)
        for payload in payloads:
            # The port field of a raw socket's address is ignored; ours is in the header.
            sock.sendto(udp_datagram(src_port, port, payload), (str(address), 0))


def send_to_each(
    src_port: int, destinations: Iterable[tuple[str, int]], payload: bytes
) -> dict[tuple[str, int], Exception]:
    """Sends `payload` from `src_port` to each destination; the errors by destination
    (one that cannot be reached, say a peer's private address elsewhere, does not stop
    the others)."""
    errors: dict[tuple[str, int], Exception] = {}
    for destination in destinations:
        try:
            send_from_port(src_port, destination, [payload])
        except (OSError, ValueError) as exc:
            errors[destination] = exc
    return errors
