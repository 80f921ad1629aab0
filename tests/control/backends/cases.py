"""Bad backend input and the one message every backend must answer it with.

Shared by the host tests (the shared validation, KernelBackend before netlink,
UserspaceBackend against a real daemon) and the kernel VM guest test, so a backend
that drifts from the common rule fails with the very same table.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import ip_network as N

from control.backends.base import PeerConfig

K1, K2 = bytes([1]) * 32, bytes([2]) * 32
KEY = bytes(range(32))  # a private key for up(): any 32 bytes will do
PSK = bytes(range(32, 64))


def peer(key: bytes = K1, psk=PSK, ep=("192.0.2.1", 51820), ka=25, ips=None) -> PeerConfig:
    ips = ips if ips is not None else (N(f"10.77.{key[0]}.0/24"),)
    return PeerConfig(key, psk, ep, ka, ips)


# name -> (peers to apply, the exact BackendConfigError message)
BAD_PEERS: dict[str, tuple[Callable[[], list], str]] = {
    "short public key": (
        lambda: [peer(b"short")],
        "peer #0 public key must be 32 raw bytes (got 5)",
    ),
    "public key not bytes": (
        lambda: [peer("a" * 32, ips=())],  # type: ignore[arg-type]  # wrong on purpose
        "peer #0 public key must be 32 raw bytes (got str)",
    ),
    "short preshared key": (
        lambda: [peer(), peer(K2, psk=bytes(31))],
        "peer #1 preshared key must be 32 raw bytes (got 31)",
    ),
    "duplicate public key": (
        lambda: [peer(), peer(ips=(N("10.1.0.0/16"),))],
        "peer #1: public key appears twice (also peer #0)",
    ),
    "a prefix on two peers": (
        lambda: [peer(), peer(K2, ips=(N("10.9.0.0/16"), N("10.77.1.0/24")))],
        "peer #1: allowed IP 10.77.1.0/24 already belongs to peer #0",
    ),
    "allowed IP as a string": (
        lambda: [peer(ips=("10.0.0.0/8",))],
        "peer #0: allowed IP '10.0.0.0/8' is not an IPv4Network or IPv6Network",
    ),
    "endpoint host": (
        lambda: [peer(ep=("not-an-ip", 1))],
        "peer #0 endpoint: 'not-an-ip' is not an IP address",
    ),
    "endpoint port too high": (
        lambda: [peer(ep=("192.0.2.1", 70000))],
        "peer #0 endpoint: port 70000 is not in 1-65535",
    ),
    "endpoint port 0": (
        lambda: [peer(ep=("2001:db8::1", 0))],
        "peer #0 endpoint: port 0 is not in 1-65535",
    ),
    "endpoint as text": (
        lambda: [peer(ep="192.0.2.1:5")],
        "peer #0 endpoint: expected (ip, port), got '192.0.2.1:5'",
    ),
    "keepalive negative": (
        lambda: [peer(ka=-1)],
        "peer #0 persistent keepalive must be an integer in [0, 65535], got -1",
    ),
    "keepalive too high": (
        lambda: [peer(ka=70000)],
        "peer #0 persistent keepalive must be an integer in [0, 65535], got 70000",
    ),
    "not a PeerConfig": (
        lambda: ["nonsense"],
        "peer #0: not a PeerConfig but str",
    ),
}

# name -> (up() arguments, the exact BackendConfigError message)
BAD_DEVICES: dict[str, tuple[tuple, str]] = {
    "name with a slash": (
        ("bad/name", KEY, 51820, 0, 1420),
        "invalid interface name 'bad/name': contains '/', ':', whitespace or NUL",
    ),
    "name too long": (
        ("x" * 16, KEY, 51820, 0, 1420),
        f"invalid interface name '{'x' * 16}': longer than 15 bytes",
    ),
    "short private key": (
        ("kswgok", KEY[:5], 51820, 0, 1420),
        "private key must be 32 raw bytes (got 5)",
    ),
    "listen port": (
        ("kswgok", KEY, 70000, 0, 1420),
        "listen port must be an integer in [0, 65535], got 70000",
    ),
    "fwmark": (
        ("kswgok", KEY, 51820, -1, 1420),
        "fwmark must be an integer in [0, 4294967295], got -1",
    ),
    "MTU": (
        ("kswgok", KEY, 51820, 0, 1000),
        "MTU must be an integer in [1280, 65535], got 1000",
    ),
}
