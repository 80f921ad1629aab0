"""The contract between the KubeSpan agent and a WireGuard implementation.

Both backends (kernel module over netlink, our userspace daemon over UAPI) expose the
same synchronous interface; the agent never needs to know which one runs underneath.
Keys are raw 32-byte values here; hex and base64 appear only at the edges.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol, runtime_checkable

Address = tuple[str, int]  # (ip, port); IPv6 ip without brackets
IPNetwork = IPv4Network | IPv6Network


class BackendError(RuntimeError):
    """The WireGuard backend could not do what was asked (message never holds keys)."""


@dataclass(frozen=True)
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None
    # None means "leave the endpoint WireGuard currently has" (it may have roamed).
    endpoint: Address | None
    persistent_keepalive: int  # seconds, 0 = off
    allowed_ips: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class PeerState:
    public_key: bytes
    endpoint: Address | None
    last_handshake: float | None  # wall clock (time.time()), None = never
    rx_bytes: int
    tx_bytes: int


@runtime_checkable
class WireGuardBackend(Protocol):
    mode: str  # "kernel" | "userspace"

    def up(
        self, link: str, private_key: bytes, listen_port: int, fwmark: int, mtu: int
    ) -> None: ...

    def apply_peers(self, peers: Sequence[PeerConfig]) -> None:
        """Make the device's peers exactly `peers`, touching only those that changed."""
        ...

    def peer_states(self) -> dict[bytes, PeerState]: ...

    def down(self) -> None:
        """Remove the link and stop any process; safe to call more than once."""
        ...
