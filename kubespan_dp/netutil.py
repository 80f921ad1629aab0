"""UDP endpoint helpers: address text forms, dual-stack binding, sticky source addresses.

WireGuard answers a peer from the local address the peer wrote to (otherwise a
multi-homed host replies from the "wrong" address and NATs drop it). We learn that
address from IP_PKTINFO / IPV6_PKTINFO on receive and pass it back on send.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import struct

Address = tuple[str, int]

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # absent from Python 3.11's socket module
IPV6_RECVPKTINFO = socket.IPV6_RECVPKTINFO
IPV6_PKTINFO = socket.IPV6_PKTINFO
SOCKET_BUFFER = 7 << 20  # as wireguard-go: absorbs bursts the event loop cannot drain at once
CMSG_SPACE = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(20)

_DIGITS = re.compile(r"[0-9]+")


class EndpointError(ValueError):
    pass


def parse_uint(text: str, maximum: int) -> int:
    """A strict decimal: digits only (no sign, spaces, underscores), <= maximum."""
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"not a decimal number: {text!r}")
    value = int(text)
    if value > maximum:
        raise ValueError(f"{value} is larger than {maximum}")
    return value


def parse_endpoint(text: str) -> Address:
    """`a.b.c.d:port` or `[v6(%zone)]:port`, numeric only (as UAPI and netip demand)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or ":" not in host:
            raise EndpointError(f"bad IPv6 endpoint {text!r}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise EndpointError(f"bad endpoint {text!r}")
    try:
        addr = ipaddress.ip_address(host)
        number = parse_uint(port, 0xFFFF)
    except ValueError as e:
        raise EndpointError(f"bad endpoint {text!r}: {e}") from None
    if number == 0:
        raise EndpointError(f"bad endpoint {text!r}: port 0")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped), number
    return str(addr), number


def format_endpoint(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_prefix(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """`ip/bits`; host bits are masked off as allowed-IPs insertion does."""
    host, sep, bits = text.partition("/")
    if not sep or "%" in host:
        raise ValueError(f"bad prefix {text!r}")
    addr = ipaddress.ip_address(host)
    length = parse_uint(bits, addr.max_prefixlen)
    return ipaddress.ip_network((addr, length), strict=False)


# --------------------------------------------------------------------------- sockets


def _tune(sock: socket.socket, fwmark: int) -> None:
    sock.setblocking(False)
    for force, plain in (
        (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
        (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    if fwmark:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)


def _open(family: int, port: int, fwmark: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            sock.bind(("::", port))
        else:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind(("0.0.0.0", port))
        _tune(sock, fwmark)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_pair(port: int, fwmark: int) -> tuple[socket.socket | None, socket.socket | None, int]:
    """Bind v4 and v6 UDP sockets on the same port (0 = pick one free in both).

    A host without IPv6 (or IPv4) gets only the family it has. Raises OSError
    (EADDRINUSE ...) when the port cannot be had."""
    attempts = 100 if port == 0 else 1
    last: OSError | None = None
    for _ in range(attempts):
        v4 = v6 = None
        try:
            v4 = _open(socket.AF_INET, port, fwmark)
        except OSError as e:
            if e.errno != errno.EAFNOSUPPORT:
                raise
        chosen = v4.getsockname()[1] if v4 else port
        try:
            v6 = _open(socket.AF_INET6, chosen, fwmark)
        except OSError as e:
            if e.errno == errno.EADDRINUSE and v4 is not None and port == 0:
                v4.close()  # the random v4 port is taken in v6: try another
                last = e
                continue
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                if v4:
                    v4.close()
                raise
        if v4 is None and v6 is None:
            raise OSError(errno.EAFNOSUPPORT, "neither IPv4 nor IPv6 is available")
        if v6 is not None and v4 is None:
            chosen = v6.getsockname()[1]
        return v4, v6, chosen
    raise last or OSError(errno.EADDRINUSE, "no free port")


def set_mark(sock: socket.socket, fwmark: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)


def local_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> tuple[bytes, int] | None:
    """The (packed local address, ifindex) a datagram was sent to, from its cmsgs."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
            return data[4:8], 0
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            # struct in6_pktinfo { in6_addr addr; unsigned ifindex; }
            addr = data[:16]
            link_local = addr[0] == 0xFE and (addr[1] & 0xC0) == 0x80
            return addr, struct.unpack_from("=I", data, 16)[0] if link_local else 0
    return None


def source_cmsg(local: tuple[bytes, int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data asking the kernel to send from `local`."""
    addr, ifindex = local
    if len(addr) == 4:
        return [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, addr, b"\0" * 4))]
    return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, struct.pack("=16sI", addr, ifindex))]
