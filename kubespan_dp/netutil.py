"""Network helpers shared by the data plane and the control plane.

The one home of a few rules both sides need: what a Linux interface name may be, the
text and tuple forms of a UDP endpoint, and the address type aliases. Then the UDP
socket side: dual-stack binding and sticky source addresses.

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
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

Address = tuple[str, int]  # (ip, port); an IPv6 ip without brackets
IPNetwork = IPv4Network | IPv6Network
IPAddress = IPv4Address | IPv6Address

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # absent from Python 3.11's socket module
IPV6_RECVPKTINFO = socket.IPV6_RECVPKTINFO
IPV6_PKTINFO = socket.IPV6_PKTINFO
SOCKET_BUFFER = 7 << 20  # as wireguard-go: absorbs bursts the event loop cannot drain at once
CMSG_SPACE = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(20)

_DIGITS = re.compile(r"[0-9]+")


# --------------------------------------------------------------------------- interface names

IFNAMSIZ = 16  # the kernel's name buffer, NUL included: a name has at most 15 bytes
# What the kernel's isspace() matches: lib/ctype.c also counts 0xA0 (Latin-1 NBSP),
# which shows up inside UTF-8 sequences such as "à".
_KERNEL_SPACE = frozenset(b" \t\n\v\f\r\xa0")
_FORBIDDEN = _KERNEL_SPACE | frozenset(b"/:\0")


class InterfaceNameError(ValueError):
    pass


def check_ifname(name: object) -> str:
    """The name if Linux would accept it (net/core/dev.c dev_valid_name), else raise.

    1 to 15 bytes (UTF-8), not "." or "..", no '/', ':', whitespace or NUL. The same
    rule serves the config, the backends, the daemon's command line and the UAPI socket
    path (a '/' there would leave /var/run/wireguard)."""
    if not isinstance(name, str):
        raise InterfaceNameError(f"invalid interface name {name!r}: not a string")
    try:
        raw = name.encode()
    except UnicodeEncodeError:
        raise InterfaceNameError(f"invalid interface name {name!r}: not UTF-8") from None
    if not raw:
        why = "empty"
    elif len(raw) >= IFNAMSIZ:
        why = f"longer than {IFNAMSIZ - 1} bytes"
    elif name in (".", ".."):
        why = "'.' and '..' are reserved"
    elif not _FORBIDDEN.isdisjoint(raw):
        why = "contains '/', ':', whitespace or NUL"
    else:
        return name
    raise InterfaceNameError(f"invalid interface name {name!r}: {why}")


def valid_ifname(name: object) -> bool:
    try:
        check_ifname(name)
    except InterfaceNameError:
        return False
    return True


# --------------------------------------------------------------------------- endpoints


class EndpointError(ValueError):
    """A malformed endpoint; the message says what is wrong, the caller adds where."""


def parse_uint(text: str, maximum: int) -> int:
    """A strict decimal: digits only (no sign, spaces, underscores), <= maximum."""
    if not _DIGITS.fullmatch(text):
        raise ValueError(f"not a decimal number: {text!r}")
    value = int(text)
    if value > maximum:
        raise ValueError(f"{value} is larger than {maximum}")
    return value


def parse_endpoint(text: str) -> Address:
    """`a.b.c.d:port` or `[v6(%zone)]:port`, numeric only (as UAPI and netip demand).

    Raises EndpointError. An IPv4-mapped IPv6 address comes back as plain IPv4."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            sep = ""  # a bare IPv6 address: where would its port start?
    if not sep:
        raise EndpointError("expected ip:port (IPv6 as [ip]:port)")
    try:
        number = parse_uint(port, 0xFFFF)
    except ValueError:
        number = 0
    if number == 0:
        raise EndpointError(f"port {port!r} is not in 1-65535")
    endpoint = check_endpoint((host, number))
    if text.startswith("[") and ":" not in host:
        raise EndpointError("brackets are only for IPv6 addresses")
    return endpoint


def check_endpoint(endpoint: object) -> Address:
    """An (ip, port) tuple checked and normalised (ip in canonical text, IPv4-mapped
    IPv6 as IPv4, port 1-65535). Raises EndpointError."""
    if not isinstance(endpoint, tuple) or len(endpoint) != 2:
        raise EndpointError(f"expected (ip, port), got {endpoint!r}")
    host, port = endpoint
    try:
        if not isinstance(host, (str, IPv4Address, IPv6Address)):
            raise ValueError  # ip_address() would take an integer
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise EndpointError(f"{host!r} is not an IP address") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise EndpointError(f"port {port!r} is not in 1-65535")
    if isinstance(addr, IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped), port
    return str(addr), port


def format_endpoint(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_prefix(text: str) -> IPNetwork:
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
