"""The WireGuard cross-platform configuration protocol (https://www.wireguard.com/xplatform/).

`parse_set` turns the body of a `set=1` request into a `SetRequest` and raises
`UapiError` on the first bad line, so the device applies a request whole or not at
all. `format_get` renders the device state as a `get=1` reply. Error numbers follow
wireguard-go: a bad key or value is -EINVAL, a line without `=` is -EPROTO, a
listen port that cannot be bound is -EADDRINUSE.

Semantics of a peer section are those of applying its lines in order: the
`allowed_ip=PREFIX`, `allowed_ip=-PREFIX` and `replace_allowed_ips` lines are kept
as one ordered list of changes and applied in that order, as wireguard-go applies
them (an addition takes the prefix from whichever peer had it; a removal drops it
only from this peer), `remove` or `update_only` anywhere in the section decide for
the whole section, and a repeated key keeps its last value.
"""

from __future__ import annotations

import errno
import socket
import string
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

from .netutil import (
    Address,
    EndpointError,
    IPNetwork,
    format_endpoint,
    parse_endpoint,
    parse_prefix,
    parse_uint,
)

EINVAL: Final = -errno.EINVAL
EPROTO: Final = -errno.EPROTO
EADDRINUSE: Final = -errno.EADDRINUSE
EIO: Final = -errno.EIO

ZERO_KEY: Final = bytes(32)


class _Unset(Enum):
    UNSET = 0


UNSET: Final = _Unset.UNSET


class UapiError(Exception):
    """A request the device refuses; `errno` is the (negative) number sent back."""

    def __init__(self, errno_value: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_value


@dataclass
class PeerUpdate:
    public_key: bytes
    remove: bool = False
    update_only: bool = False
    preshared_key: bytes | None | _Unset = UNSET  # None: all-zero, i.e. no PSK
    endpoint: Address | _Unset = UNSET
    persistent_keepalive: int | _Unset = UNSET
    replace_allowed_ips: bool = False
    # the section's allowed-IP lines in order (see `core.AllowedIPChange`):
    # (PREFIX, True) adds, (PREFIX, False) removes, (None, False) removes them all
    allowed_ip_changes: list[tuple[IPNetwork | None, bool]] = field(default_factory=list)

    @property
    def allowed_ips(self) -> list[IPNetwork]:
        """The prefixes the section adds, in order."""
        return [net for net, add in self.allowed_ip_changes if add and net is not None]


@dataclass
class SetRequest:
    private_key: bytes | None | _Unset = UNSET  # None: all-zero, i.e. no key
    listen_port: int | _Unset = UNSET
    fwmark: int | _Unset = UNSET
    replace_peers: bool = False
    peers: list[PeerUpdate] = field(default_factory=list)


_HEX = frozenset(string.hexdigits)


def parse_key(value: str, what: str) -> bytes:
    if len(value) != 64:
        raise UapiError(EINVAL, f"{what}: a key is 64 hex digits, got {len(value)} characters")
    # bytes.fromhex skips whitespace: "ab cd..." would become a 31-byte key
    if not _HEX.issuperset(value):
        raise UapiError(EINVAL, f"{what}: not hex")
    return bytes.fromhex(value)


def check_zone(host: str) -> None:
    """An IPv6 zone (`fe80::1%eth0`) must name an interface that exists, or be a
    32-bit index: refused at set time, not when the endpoint is first used."""
    _, sep, zone = host.partition("%")
    if not sep:
        return
    if zone.isdigit():
        if int(zone) >= 1 << 32:
            raise UapiError(EINVAL, f"zone index {zone[:12]!r} out of range")
        return
    try:
        socket.if_nametoindex(zone)
    except (OSError, ValueError):
        raise UapiError(EINVAL, f"no interface {zone[:16]!r} for the endpoint's zone") from None


def _flag(value: str, key: str) -> bool:
    if value != "true":
        raise UapiError(EINVAL, f"{key} takes only 'true', got {value!r}")
    return True


def _number(value: str, maximum: int, key: str) -> int:
    try:
        return parse_uint(value, maximum)
    except ValueError as e:
        raise UapiError(EINVAL, f"{key}: {e}") from None


def parse_set(lines: list[str]) -> SetRequest:
    """Parse the lines of a set request (after `set=1`, before the blank line)."""
    req = SetRequest()
    peer: PeerUpdate | None = None
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep:
            raise UapiError(EPROTO, f"line without '=': {line[:40]!r}")
        if key == "public_key":
            peer = PeerUpdate(parse_key(value, key))
            req.peers.append(peer)
        elif peer is None:
            _device_line(req, key, value)
        else:
            _peer_line(peer, key, value)
    return req


def _device_line(req: SetRequest, key: str, value: str) -> None:
    if key == "private_key":
        k = parse_key(value, key)
        req.private_key = None if k == ZERO_KEY else k
    elif key == "listen_port":
        req.listen_port = _number(value, 0xFFFF, key)
    elif key == "fwmark":
        # wg sends fwmark=0 to clear; an empty value is accepted as "clear" too
        req.fwmark = 0 if value == "" else _number(value, 0xFFFFFFFF, key)
    elif key == "replace_peers":
        req.replace_peers = _flag(value, key)
    else:
        raise UapiError(EINVAL, f"unknown device key {key[:40]!r}")


def _peer_line(peer: PeerUpdate, key: str, value: str) -> None:
    if key == "remove":
        peer.remove = _flag(value, key)
    elif key == "update_only":
        peer.update_only = _flag(value, key)
    elif key == "preshared_key":
        k = parse_key(value, key)
        peer.preshared_key = None if k == ZERO_KEY else k
    elif key == "endpoint":
        try:
            peer.endpoint = parse_endpoint(value)
        except EndpointError as e:
            raise UapiError(EINVAL, str(e)) from None
        check_zone(peer.endpoint[0])
    elif key == "persistent_keepalive_interval":
        peer.persistent_keepalive = _number(value, 0xFFFF, key)
    elif key == "replace_allowed_ips":
        if _flag(value, key):
            # at this point in the section, as wireguard-go: what earlier lines
            # took from other peers stays taken
            peer.replace_allowed_ips = True
            peer.allowed_ip_changes.append((None, False))
    elif key == "allowed_ip":
        remove = value.startswith("-")
        try:
            net = parse_prefix(value[1:] if remove else value)
        except ValueError as e:
            raise UapiError(EINVAL, f"allowed_ip {value[:50]!r}: {e}") from None
        peer.allowed_ip_changes.append((net, not remove))
    elif key == "protocol_version":
        if value != "1":
            raise UapiError(EINVAL, f"unsupported protocol_version {value[:10]!r}")
    else:
        raise UapiError(EINVAL, f"unknown peer key {key[:40]!r}")


# --------------------------------------------------------------------------- get


@dataclass
class PeerInfo:
    public_key: bytes
    preshared_key: bytes | None
    endpoint: Address | None
    last_handshake_ns: int  # wall clock, 0 = never
    tx_bytes: int
    rx_bytes: int
    persistent_keepalive: int
    allowed_ips: list[IPNetwork]


@dataclass
class DeviceInfo:
    private_key: bytes | None
    listen_port: int
    fwmark: int
    peers: list[PeerInfo]


def format_get(dev: DeviceInfo) -> str:
    """The body of a get reply (the caller appends `errno=0`)."""
    out: list[str] = []
    if dev.private_key:
        out.append(f"private_key={dev.private_key.hex()}")
    if dev.listen_port:
        out.append(f"listen_port={dev.listen_port}")
    if dev.fwmark:
        out.append(f"fwmark={dev.fwmark}")
    for p in dev.peers:
        secs, nsecs = divmod(p.last_handshake_ns, 1_000_000_000)
        out.append(f"public_key={p.public_key.hex()}")
        out.append(f"preshared_key={(p.preshared_key or ZERO_KEY).hex()}")
        out.append("protocol_version=1")
        if p.endpoint is not None:
            out.append(f"endpoint={format_endpoint(p.endpoint)}")
        out.append(f"last_handshake_time_sec={secs}")
        out.append(f"last_handshake_time_nsec={nsecs}")
        out.append(f"tx_bytes={p.tx_bytes}")
        out.append(f"rx_bytes={p.rx_bytes}")
        out.append(f"persistent_keepalive_interval={p.persistent_keepalive}")
        out += [f"allowed_ip={net}" for net in p.allowed_ips]
    return "".join(line + "\n" for line in out)


def format_errno(value: int) -> str:
    return f"errno={value}\n\n"
